"""Tokenizers built from the tokenizer metadata of a model file (meta["tokenizer"]).

The dict mirrors GGUF's ``tokenizer.ggml.*`` keys without the prefix:

  model            "gpt2": byte-level BPE (merges ranked by position), ByteLevelBPE
                   "llama": SentencePiece-style BPE (merges by token score, "▁" for
                   spaces, <0xNN> byte fallback), SentencePieceBPE
  pre              llama.cpp's pre-tokenizer name (gpt2 model only; see PRE_TOKENIZERS)
  tokens, token_type, merges, scores, bos/eos/unknown/padding_token_id,
  add_bos_token, add_eos_token, add_space_prefix

``Tokenizer(meta)`` returns the class of its model; both share the base Tokenizer
(vocabulary, special tokens, BOS/EOS, decoding) and one heap merge (_merge_heap).

Behaviour, following llama.cpp's llama-vocab.cpp (and Hugging Face tokenizers, which
the tests use as the oracle):

* Special tokens. With ``special=True`` the text of every control, user-defined or
  unknown token written in the text becomes that single id (leftmost-longest match),
  like llama.cpp's ``parse_special``. With ``special=False`` only user-defined tokens
  are matched (as llama.cpp and HF do); control-token text is tokenized as plain text.
* Pre-tokenizers apply a list of regexes in turn, each splitting the pieces the previous
  one produced; text a regex does not match stays a piece of its own. The regexes are
  llama.cpp's (for llama3/qwen2 the original case-insensitive contraction form from
  tokenizer.json). Python's ``regex`` module provides the Unicode classes; for code
  points assigned after Unicode 14 its tables can be newer than Oniguruma's (HF).
* Byte-level BPE works on token ids: a rank dict keyed by id pairs, the result cached
  per pre-token word. Pre-tokenizers llama.cpp runs with ``ignore_merges`` (llama3,
  tekken) first look the whole word up in the vocabulary. A byte whose character is not
  in the vocabulary (SmolLM2 lacks a few control and never-valid UTF-8 bytes) is dropped
  and its neighbours may merge, as HF does (llama.cpp drops it but merges not across it).
* SentencePiece-style ("llama"): a space is prefixed to the text and to each fragment
  following a special token (``add_space_prefix``, default true), spaces become "▁",
  adjacent symbols merge by highest score of the merged token (leftmost on ties), and
  characters that are not tokens become their UTF-8 bytes' <0xNN> tokens (or unknown).
* Invalid input: ``encode`` takes a str; lone surrogates (e.g. from ``surrogateescape``)
  cannot be UTF-8 encoded, so each one is replaced by U+FFFD before tokenizing. Nothing
  else is normalized. ``decode`` replaces invalid UTF-8 with U+FFFD (errors="replace").
* Decoding renders control tokens as their text. For "llama" models with
  ``add_space_prefix`` one leading space of the first token is dropped (as llama.cpp
  and HF do). No clean-up of spaces around punctuation is done.
* BOS/EOS: ``add_bos=None`` uses the file's add_bos_token (and appends EOS if the file's
  add_eos_token is true); True/False force BOS on/off and never append EOS. When the
  file does not say, llama.cpp's defaults apply (BOS for llama models and llama3/tekken).
"""

import codecs
import heapq
import operator
import re
from typing import Optional

import regex

__all__ = [
    "Tokenizer",
    "ByteLevelBPE",
    "SentencePieceBPE",
    "StreamDecoder",
    "PRE_TOKENIZERS",
    "pre_tokenize",
]

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_CACHE_MAX = 1 << 17  # cached words per tokenizer before the cache is dropped
_SPM_SPACE = "\u2581"  # ▁

# --- pre-tokenizer regexes (llama.cpp src/llama-vocab.cpp, llm_tokenizer_bpe) ----------
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_GPT2_NOTAIL = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_DIGIT = r"\p{N}"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SEED_CODER = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}"
    r"| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2_NOTAIL, r"\p{N}+", r"[0-9][0-9][0-9]")
_FALCON = (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2_NOTAIL, r"[0-9][0-9][0-9]")
_DEEPSEEK_CODER = (
    r"[\r\n]",
    r"\s?\p{L}+",
    r"\s?\p{P}+",
    r"[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+",
    r"\p{N}",
)
_DEEPSEEK_LLM = (
    r"[\r\n]",
    (
        r"\s?[A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af"
        r"\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5"
        r"\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba"
        r"\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45"
        r"\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe"
        r"\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc"
        r"\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134"
        r"\u2139\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee"
        r"\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf"
        r"\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3"
        r"\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df"
        r"\U0001e900-\U0001e943]+"
    ),
    r"\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
    r"\s+$",
    r"[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+",
    r"\p{N}+",
)
_DEEPSEEK3 = (
    r"\p{N}{1,3}",
    r"[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)
_BLOOM = (r" ?[^(\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+",)

# name -> (regexes applied in turn, ignore_merges, default add_bos)
_PRE_GROUPS = [
    (("default",), _DEFAULT, False, False),
    (
        (
            "gpt2",
            "gpt-2",
            "phi-2",
            "mpt",
            "olmo",
            "jais",
            "jina-es",
            "jina-de",
            "jina-v1-en",
            "jina-v2-es",
            "jina-v2-de",
            "jina-v2-code",
            "roberta-bpe",
            "gigachat",
            "exaone4",
            "trillion",
            "granite-docling",
            "a.x-4.0",
            "mellum",
            "modern-bert",
        ),
        (_GPT2,),
        False,
        False,
    ),
    (
        (
            "smollm",
            "starcoder",
            "refact",
            "command-r",
            "codeshell",
            "exaone",
            "minerva-7b",
            "mellum2",
        ),
        (_DIGIT, _GPT2),
        False,
        False,
    ),
    (
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"),
        (_LLAMA3,),
        True,
        True,
    ),
    (("dbrx", "smaug-bpe", "chatglm-bpe", "glm4"), (_LLAMA3,), False, False),
    (
        ("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez", "hunyuan", "solar-open", "kormo"),
        (_QWEN2,),
        False,
        False,
    ),
    (("qwen35",), (_QWEN35,), False, False),
    (("tekken",), (_TEKKEN,), True, True),
    (("gpt-4o", "llama4"), (_GPT4O,), False, False),
    (("seed-coder",), (_SEED_CODER,), False, False),
    (("falcon",), _FALCON, False, False),
    (("deepseek-llm",), _DEEPSEEK_LLM, False, False),
    (("deepseek-coder",), _DEEPSEEK_CODER, False, False),
    (("deepseek-v3",), _DEEPSEEK3, False, False),
    (("poro-chat", "bloom", "gpt3-finnish"), _BLOOM, False, False),
    (("viking",), _BLOOM + (_DIGIT,), False, False),
]
PRE_TOKENIZERS = {name: (rxs, ign, bos) for names, rxs, ign, bos in _PRE_GROUPS for name in names}

_compiled = {}


def _regexes(pre):
    rxs = _compiled.get(pre)
    if rxs is None:
        rxs = _compiled[pre] = [regex.compile(p) for p in PRE_TOKENIZERS[pre][0]]
    return rxs


def _split(text, rxs):
    """Apply regexes in turn: each splits every piece into its matches and the gaps."""
    pieces = [text]
    for rx in rxs:
        out = []
        for p in pieces:
            found = rx.findall(p)
            if sum(map(len, found)) == len(p):  # the matches cover the piece (usual case)
                out += found
                continue
            pos = 0
            for m in rx.finditer(p):
                s, e = m.span()
                if s == e:
                    continue
                if s > pos:
                    out.append(p[pos:s])
                out.append(p[s:e])
                pos = e
            if pos < len(p):
                out.append(p[pos:])
        pieces = out
    return pieces


def pre_tokenize(text, pre):
    """The pre-token words of text under llama.cpp pre-tokenizer `pre` (no special tokens)."""
    if pre not in PRE_TOKENIZERS:
        raise ValueError(f"unsupported pre-tokenizer {pre!r}")
    return _split(text, _regexes(pre))


# --- GPT-2 byte <-> unicode mapping -----------------------------------------------------
def _byte_chars():
    bs = list(range(0x21, 0x7F)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = [""] * 256
    for b, c in zip(bs, cs):
        table[b] = chr(c)
    return table


BYTE_CHARS = _byte_chars()  # byte value -> its character in byte-level vocabularies
_TO_BYTE_LEVEL = {b: BYTE_CHARS[b] for b in range(256)}  # str.translate over latin-1 text
_FROM_BYTE_LEVEL = {ord(c): b for b, c in enumerate(BYTE_CHARS)}
_SURROGATE = re.compile("[\ud800-\udfff]")
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>\Z")
_SPM_WORD_START = re.compile("(?<=[^\u2581])(?=\u2581)")


_SPECIAL_TYPES = (CONTROL, USER_DEFINED, UNKNOWN)  # tokens that stand for their own text


def _clean(text):
    if not isinstance(text, str):
        raise TypeError(f"encode() takes a str, not {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = _SURROGATE.sub("\ufffd", text)
    return text


def _merge_heap(syms, key, merges):
    """Merge adjacent symbols, the best pair first, until no pair merges: merges[key(a, b)]
    is the pair's (priority, merged symbol), the lowest priority first and the leftmost on
    ties. A heap of candidate pairs over a linked list, stale entries skipped: O(n log n).
    Returns the surviving symbols in order."""
    pair = merges.get
    m = len(syms)
    if m < 2:
        return list(syms)
    nxt = list(range(1, m + 1))
    nxt[-1] = -1
    prv = list(range(-1, m - 1))
    heap = []
    for i in range(m - 1):
        v = pair(key(syms[i], syms[i + 1]))
        if v is not None:
            heap.append((v[0], i, syms[i], syms[i + 1], v[1]))
    heapq.heapify(heap)
    while heap:
        _, i, a, b, merged = heapq.heappop(heap)
        j = nxt[i]
        if syms[i] != a or j < 0 or syms[j] != b:
            continue  # stale: a neighbour merged since
        syms[i] = merged
        syms[j] = None
        k = nxt[i] = nxt[j]
        if k >= 0:
            prv[k] = i
            v = pair(key(merged, syms[k]))
            if v is not None:
                heapq.heappush(heap, (v[0], i, merged, syms[k], v[1]))
        p = prv[i]
        if p >= 0:
            v = pair(key(syms[p], merged))
            if v is not None:
                heapq.heappush(heap, (v[0], p, syms[p], merged, v[1]))
    return [s for s in syms if s is not None]


class Tokenizer:
    """encode(text) -> ids, decode(ids) -> text, token_bytes(id) -> bytes.

    Tokenizer(meta) builds the class of meta["model"]: ByteLevelBPE ("gpt2") or
    SentencePieceBPE ("llama"). This base holds what the two share: the vocabulary and
    token types, special tokens and their splitting, BOS/EOS, the word cache and decoding.
    A subclass reads its own metadata (_read_model), turns a fragment of plain text into
    ids (_encode_fragment, usually through _encode_words and its _word_ids) and a normal
    token into its bytes (_normal_bytes)."""

    model = None  # the metadata's "model" name of a subclass
    pre = None  # the pre-tokenizer's name (byte-level BPE)
    add_space_prefix = False  # a space before the text and after each special token
    _id_defaults = {}  # special-token ids a model family assumes when the file gives none
    _bos_default = False  # add_bos when the file does not say

    def __new__(cls, tok=None):
        if cls is Tokenizer:  # the factory: the class of the metadata's model
            if not isinstance(tok, dict):
                raise ValueError("tokenizer metadata is not a dict")
            model = tok.get("model")
            cls = _MODELS.get(model) if isinstance(model, str) else None
            if cls is None:
                raise ValueError(
                    f"unsupported tokenizer model {model!r} "
                    f"(supported: {', '.join(map(repr, _MODELS))})"
                )
        return super().__new__(cls)

    def __init__(self, tok: dict):
        if not isinstance(tok, dict):
            raise ValueError("tokenizer metadata is not a dict")
        if tok.get("model", self.model) != self.model:
            raise ValueError(f"tokenizer model {tok.get('model')!r} is not {self.model!r}")
        tokens = tok.get("tokens")
        if (
            not isinstance(tokens, list)
            or not tokens
            or not all(isinstance(t, str) for t in tokens)
        ):
            raise ValueError("tokenizer 'tokens' must be a non-empty list of strings")
        n = len(tokens)
        types = tok.get("token_type")
        if types is None:
            types = [NORMAL] * n
        elif not isinstance(types, list) or len(types) != n:
            raise ValueError(f"tokenizer 'token_type' must be a list of {n} ints")
        self.vocab_size = n
        self._tokens = tokens
        self._types = list(map(int, types))
        self._to_id = dict(
            zip(reversed(tokens), range(n - 1, -1, -1))
        )  # first id wins on duplicates
        self._pieces = [None] * n  # token_bytes cache
        self._cache = {}  # word -> ids
        self._read_model(tok)

        def special_id(key):
            v = tok.get(key, self._id_defaults.get(key))
            if v is None:
                return None
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"tokenizer {key!r} must be an int, not {v!r}")
            return v if 0 <= v < n else None

        self.bos_id = special_id("bos_token_id")
        self.eos_id = special_id("eos_token_id")
        self.unk_id = special_id("unknown_token_id")
        self.pad_id = special_id("padding_token_id")
        if "add_bos_token" in tok:
            self.add_bos = bool(tok["add_bos_token"])
            if self.add_bos and self.bos_id is None:
                raise ValueError("add_bos_token is true but bos_token_id is not a valid id")
        else:
            self.add_bos = self._bos_default and self.bos_id is not None
        self.add_eos = bool(tok.get("add_eos_token", False))

        # special-token splitting: leftmost-longest match of the token texts
        self._special_ids = {}
        self._nonnormal = [i for i, ty in enumerate(self._types) if ty != NORMAL]
        self._special_rx = self._special_regex(_SPECIAL_TYPES)
        self._user_rx = self._special_regex((USER_DEFINED,))

    def _read_model(self, tok):
        """The subclass's own metadata (merges, scores, pre-tokenizer)."""
        raise NotImplementedError

    def _special_regex(self, kinds):
        texts = []
        for i in self._nonnormal:
            t = self._tokens[i]
            if self._types[i] in kinds and t:
                self._special_ids.setdefault(t, i)
                texts.append(t)
        if not texts:
            return None
        texts = sorted(set(texts), key=len, reverse=True)
        return re.compile("(" + "|".join(map(re.escape, texts)) + ")")

    # --- encoding ---
    def encode(self, text: str, add_bos: Optional[bool] = None, special: bool = True) -> list:
        text = _clean(text)
        out = []
        add_eos = False
        if add_bos is None:
            add_bos, add_eos = self.add_bos, self.add_eos
        if add_bos:
            if self.bos_id is None:
                raise ValueError("add_bos is set but the tokenizer has no BOS token")
            out.append(self.bos_id)
        rx = self._special_rx if special else self._user_rx
        parts = rx.split(text) if rx is not None else [text]
        after_special = True
        for k, part in enumerate(parts):
            if k & 1:
                out.append(self._special_ids[part])
                after_special = True
            elif part:
                self._encode_fragment(part, after_special, out)
                after_special = False
        if add_eos and self.eos_id is not None:
            out.append(self.eos_id)
        return out

    def _encode_fragment(self, text, after_special, out):
        """Append the ids of text, a fragment without special tokens."""
        raise NotImplementedError

    def _encode_words(self, words, out, cache=True):
        """Append each word's _word_ids, remembered per word when cache is true."""
        known = self._cache
        if len(known) > _CACHE_MAX:
            known.clear()
        for w in words:
            ids = known.get(w)
            if ids is None:
                ids = self._word_ids(w)
                if cache:
                    known[w] = ids
            out += ids

    def _word_ids(self, word):
        raise NotImplementedError

    # --- decoding ---
    def token_bytes(self, id) -> bytes:
        """The raw bytes of one token; control and user-defined tokens give their text."""
        piece = self._pieces[id] if 0 <= id < self.vocab_size else None
        if piece is None:
            if not 0 <= id < self.vocab_size:
                raise ValueError(
                    f"token id {id} is outside the vocabulary (0..{self.vocab_size - 1})"
                )
            piece = self._pieces[id] = self._make_piece(id)
        return piece

    def _make_piece(self, id):
        text, ty = self._tokens[id], self._types[id]
        if ty in _SPECIAL_TYPES:
            return text.encode("utf-8", "surrogatepass")
        if ty == BYTE:
            m = _BYTE_TOKEN.match(text)
            if m:
                return bytes([int(m.group(1), 16)])
        return self._normal_bytes(text)

    def _normal_bytes(self, text):
        """The bytes a normal token's text stands for."""
        raise NotImplementedError

    def _strips_space(self, id):
        return self.add_space_prefix and self._types[id] not in _SPECIAL_TYPES

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        data = b"".join(self.token_bytes(i) for i in ids)
        if ids and data[:1] == b" " and self._strips_space(ids[0]):
            data = data[1:]
        return data.decode("utf-8", "replace")


class ByteLevelBPE(Tokenizer):
    """Byte-level BPE ("gpt2"): the pre-tokenizer's regexes cut the text into words; a word's
    UTF-8 bytes become the byte alphabet's tokens, then merge by rank (the merges' order)."""

    model = "gpt2"
    _heap_min = 48  # words of more bytes than this merge with a heap (O(n log n))

    def _read_model(self, tok):
        pre = tok.get("pre") or "default"
        if pre not in PRE_TOKENIZERS:
            raise ValueError(
                f"unsupported pre-tokenizer {pre!r} for the gpt2 model "
                f"(supported: {', '.join(sorted(PRE_TOKENIZERS))})"
            )
        self.pre = pre
        _, self._ignore_merges, self._bos_default = PRE_TOKENIZERS[pre]
        self._rxs = _regexes(pre)
        merges = tok.get("merges")
        if not isinstance(merges, list):
            raise ValueError("tokenizer 'merges' (a list) is required for the gpt2 model")
        self._byte_ids = [self._to_id.get(c) for c in BYTE_CHARS]
        self._ranks = self._build_ranks(merges)

    def _build_ranks(self, merges):
        """{left_id * vocab_size + right_id: (rank, merged_id)}. A merge is "left right",
        split at the first space after its first character (as llama.cpp does), or a pair."""
        get, n = self._to_id.get, self.vocab_size
        ranks = {}
        for r, m in enumerate(merges):
            if type(m) is str and m[:1] != " ":
                a, _, b = m.partition(" ")
            elif isinstance(m, str):
                k = m.find(" ", 1)
                a, b = (m[:k], m[k + 1 :]) if k > 0 else ("", "")
            elif (
                isinstance(m, (list, tuple)) and len(m) == 2 and all(isinstance(x, str) for x in m)
            ):
                a, b = m
            else:
                raise ValueError(f"tokenizer merge {r} is not a string 'left right': {m!r}")
            z = get(a + b)
            if z is not None and a and b:
                x, y = get(a), get(b)
                if x is not None and y is not None:
                    ranks.setdefault(x * n + y, (r, z))
        return ranks

    def _encode_fragment(self, text, after_special, out):
        self._encode_words(_split(text, self._rxs), out)

    def _word_ids(self, word):
        data = word.encode("utf-8")
        if self._ignore_merges:
            i = self._to_id.get(data.decode("latin-1").translate(_TO_BYTE_LEVEL))
            if i is not None:
                return (i,)
        bids = self._byte_ids
        syms = [bids[b] for b in data]
        if None in syms:  # a byte without a token is dropped, as HF and llama.cpp do
            syms = [s for s in syms if s is not None]
            if not syms:
                return ()
        ranks, n = self._ranks, self.vocab_size
        get = ranks.get
        if len(syms) > self._heap_min:
            return tuple(_merge_heap(syms, lambda a, b: a * n + b, ranks))
        while len(syms) > 1:  # a short word: rescan for the best pair, merge it everywhere
            best, best_key = None, 0
            prev = syms[0]
            for s in syms[1:]:
                v = get(prev * n + s)
                if v is not None and (best is None or v[0] < best[0]):
                    best, best_key = v, prev * n + s
                prev = s
            if best is None:
                break
            merged, out, i, last = best[1], [], 0, len(syms) - 1
            while i <= last:
                if i < last and syms[i] * n + syms[i + 1] == best_key:
                    out.append(merged)
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            syms = out
        return tuple(syms)

    def _normal_bytes(self, text):
        t = text.translate(_FROM_BYTE_LEVEL)
        try:
            return t.encode("latin-1")
        except UnicodeEncodeError:  # characters outside the byte alphabet stand for themselves
            return b"".join(
                bytes([ord(c)]) if ord(c) < 256 else c.encode("utf-8", "surrogatepass") for c in t
            )


class SentencePieceBPE(Tokenizer):
    """SentencePiece-style BPE ("llama"): spaces become "▁" (one is prefixed to the text and
    after each special token), adjacent symbols merge by the highest score of the merged
    token, and characters that are no token become their bytes' <0xNN> tokens (or unknown).
    llama.cpp's defaults: BOS 1, EOS 2, unknown 0, BOS added."""

    model = "llama"
    _id_defaults = {"bos_token_id": 1, "eos_token_id": 2, "unknown_token_id": 0}
    _bos_default = True

    def _read_model(self, tok):
        n = self.vocab_size
        self.add_space_prefix = bool(tok.get("add_space_prefix", True))
        scores = tok.get("scores")
        if scores is None:
            scores = [0.0] * n
        elif not isinstance(scores, list) or len(scores) != n:
            raise ValueError(f"tokenizer 'scores' must be a list of {n} numbers")
        scores = [float(s) for s in scores]
        # a token's text -> (minus its score, the text): the merge of two symbols into it
        self._merges = {t: (-scores[i], t) for t, i in self._to_id.items()}
        self._byte_ids = [self._to_id.get(f"<0x{b:02X}>") for b in range(256)]
        # words can be cut before each "▁" that follows another character when no token
        # holds such a "▁" (true of SentencePiece vocabularies split on whitespace)
        inner = re.compile("[^\u2581]\u2581")
        self._spm_split = not any(_SPM_SPACE in t and inner.search(t) for t in self._tokens)

    def _encode_fragment(self, text, after_special, out):
        if self.add_space_prefix and after_special:
            text = " " + text
        text = text.replace(" ", _SPM_SPACE)
        words = _SPM_WORD_START.split(text) if self._spm_split else [text]
        self._encode_words(words, out, cache=self._spm_split)

    def _word_ids(self, word):
        """llama.cpp's llm_tokenizer_spm: merge the adjacent pair whose concatenation is the
        highest-scoring token (leftmost on ties) until none is; then byte fallback."""
        get = self._to_id.get
        ids = []
        for s in _merge_heap(list(word), operator.add, self._merges):
            t = get(s)
            if t is not None:
                ids.append(t)
                continue
            # only single characters can fail to be tokens: byte fallback
            for b in s.encode("utf-8"):
                t = self._byte_ids[b]
                if t is None:
                    t = self.unk_id
                if t is not None:
                    ids.append(t)
        return tuple(ids)

    def _normal_bytes(self, text):
        return text.replace(_SPM_SPACE, " ").encode("utf-8", "surrogatepass")


_MODELS = {c.model: c for c in (ByteLevelBPE, SentencePieceBPE)}


class StreamDecoder:
    """Decode ids one at a time; text is released only once its UTF-8 bytes are complete,
    so a character split across tokens comes out whole. The concatenation of every push()
    and the final flush() equals tokenizer.decode(all ids)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._dec = codecs.getincrementaldecoder("utf-8")("replace")
        self._first = True

    def push(self, id) -> str:
        id = int(id)
        data = self.tokenizer.token_bytes(id)
        if self._first:
            self._first = False
            if data[:1] == b" " and self.tokenizer._strips_space(id):
                data = data[1:]
        return self._dec.decode(data, False)

    def flush(self) -> str:
        text = self._dec.decode(b"", True)
        self._dec.reset()
        return text
