"""pyllm.tokenizer against Hugging Face `tokenizers` as the oracle.

* the real SmolLM2 tokenizer, read from its GGUF in weights/;
* tiny BPE tokenizers trained here with `tokenizers`: byte-level (gpt2, llama3, qwen2
  pre-tokenizers) and SentencePiece-style with <0xNN> byte fallback (the "llama" model);
* every pre-tokenizer in the table against HF Split pre-tokenizers running the same regexes.
"""

import json
import os
import random
import re
import unicodedata

import pytest
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from pyllm.tokenizer import BYTE_CHARS, PRE_TOKENIZERS, StreamDecoder, Tokenizer, pre_tokenize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM_GGUF = os.path.join(ROOT, "weights", GGUF_NAME)


# --- fixtures: the SmolLM2 tokenizer --------------------------------------------------------
def find_smollm_gguf():
    if not os.path.exists(SMOLLM_GGUF):
        pytest.fail(f"{SMOLLM_GGUF} is missing: run `make weights` first")
    return SMOLLM_GGUF


def meta_from_gguf(path):
    """meta["tokenizer"] as the converter writes it: tokenizer.ggml.* without the prefix."""
    import gguf

    reader = gguf.GGUFReader(path)
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml."):
            meta[key[len("tokenizer.ggml.") :]] = field.contents()
    return json.loads(json.dumps(meta))  # plain lists/ints, as read back from the model file


@pytest.fixture(scope="module")
def smollm_meta():
    return meta_from_gguf(find_smollm_gguf())


@pytest.fixture(scope="module")
def smollm(smollm_meta):
    return Tokenizer(smollm_meta)


@pytest.fixture(scope="module")
def smollm_hf(smollm_meta):
    return hf_byte_level(smollm_meta, [pre_tokenizers.Digits(individual_digits=True)])


def hf_byte_level(meta, pre=(), regex=None, ignore_merges=False):
    """HF byte-level BPE from our dict: pre-tokenizers `pre`, then ByteLevel (GPT-2 regex,
    or a Split on `regex` followed by ByteLevel without its regex)."""
    vocab = {t: i for i, t in enumerate(meta["tokens"])}
    merges = [tuple(m.split(" ", 1)) for m in meta["merges"]]
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
    seq = list(pre)
    if regex is None:
        seq.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    else:
        seq += [
            pre_tokenizers.Split(Regex(regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    hf.pre_tokenizer = pre_tokenizers.Sequence(seq)
    hf.decoder = decoders.ByteLevel()
    add_hf_specials(hf, meta)
    return hf


def add_hf_specials(hf, meta):
    types = meta["token_type"]
    hf.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, ty in zip(meta["tokens"], types)
            if ty in (2, 3)
        ]
    )
    user = [
        AddedToken(t, special=False, normalized=False)
        for t, ty in zip(meta["tokens"], types)
        if ty == 4
    ]
    if user:
        hf.add_tokens(user)


# --- the test strings ---------------------------------------------------------------------
FIXED = [
    "",
    " ",
    "  ",
    "\n",
    "a",
    "Hello world!",
    "Hello, world! How are you?",
    "The quick brown fox jumps over the lazy dog.",
    # code
    "def f(x):\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}\n",
    '{"key": [1, 2, 3], "nested": {"a": null, "b": true}}',
    '<div class="x">&amp; &lt;tag&gt;</div>',
    "SELECT * FROM t WHERE id=42;",
    "x=1;y=2\r\nz = x+y",
    "import numpy as np\nnp.zeros((3,4), dtype=np.float16)",
    "    indented\n        more\n\tTab\n",
    "#include <stdio.h>",
    "a->b->c",
    "i++; j--; k**=2",
    # numbers
    "1234567",
    "3.14e-10",
    "-0.5",
    "1,000,000.00",
    "12:30:45",
    "v1.2.3-rc4",
    "0x7fff_ffff",
    "２０２４年",
    "٣٤٥٦",
    "Ⅻ Ⅸ",
    "½ ¾ ² ³",
    "1st 2nd 3rd 4th",
    "$100 €50 ¥1000",
    "99%",
    # whitespace
    "a  b",
    "a   b",
    "a \t b",
    "trailing   ",
    "   leading",
    "\t\ttabs",
    "\n\n\nnewlines\n\n",
    "mixed \t\n \r\n end",
    "a\u00a0b",
    "a\u3000b",
    "a\u2028b",
    "x\u200by",
    "\r\r\n\n",
    " \n ",
    "line1\nline2\n",
    "   \n   ",
    "\u2003em\u2002en",
    "\x1c\x1d\x1e\x1f\x85",
    "a\x04b",
    "th\x1de",
    # emoji
    "👍",
    "👍🏽",
    "👨‍👩‍👧‍👦",
    "🏳️‍🌈",
    "🇫🇷🇩🇪",
    "1️⃣",
    "I ❤️ 🍕!",
    "😀😃😄😁",
    # scripts
    "日本語のテキストです。",
    "中文测试，你好世界！",
    "한국어 텍스트",
    "مرحبا بالعالم",
    "שלום עולם",
    "नमस्ते दुनिया",
    "สวัสดีครับ",
    "Привет, мир!",
    "Γειά σου Κόσμε",
    "Ελληνικά ΚΕΦΑΛΑΙΑ",
    # accents, composed and decomposed
    unicodedata.normalize("NFC", "café naïve résumé Ångström Åland"),
    unicodedata.normalize("NFD", "café naïve résumé Ångström Åland"),
    "e\u0301\u0301\u0301",
    "Z\u0351\u0352\u0353a\u0354l\u0355g\u0356o",
    # contractions
    "it's don't we're I've I'm they'll she'd",
    "IT'S DON'T WE'RE",
    "'s 't 're 've 'm 'll 'd",
    "rock'n'roll",
    "'''",
    "l'homme",
    "'ſ 'K",
    # punctuation
    "!!!???...",
    "---===+++",
    "=> <= != ==",
    "<<>>",
    "...\n",
    "(a), [b]; {c}!",
    "«quoted» „this“",
    "“smart quotes” ‘single’",
    "…",
    "—–-",
    "@user #tag $var %mod ^hat &amp *star",
    # special tokens inside text
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>",
    "<|endoftext|><|endoftext|>",
    "a<|im_end|>b",
    " <|im_start|> ",
    "<|im_start",
    "<|im_end|",
    "<|im_start|><|im_end|>",
    "<repo_name>pyllm<file_sep>x.py",
    "<jupyter_code>1+1",
    "<s>[INST] hi [/INST]</s>",
    "<unk>",
    "<tool>call</tool>",
    # long words (the heap path)
    "a" * 300,
    "ab" * 150,
    "Z" * 97,
    "x" + "!" * 120,
    "🙂" * 40,
    "aGVsbG8gd29ybGQgdGhpcyBpcyBhIGxvbmcgYmFzZTY0IHN0cmluZyB3aXRoIG5vIHNwYWNlcw==" * 3,
]

WORDS = (
    "the of and to in is that for it as with was on be by this are or at from but not "
    "have an they which you one were all we she her his can there use each their if will "
    "about out many then them these so some would make like into him time has two more go "
    "see number no way could people my than first water been call who its now find long "
    "down day did get come made may part Model token Python encode decode byte merge"
).split()


def random_unicode_char(rng):
    """A random character assigned in Unicode 14 (Python's unicodedata): the regex module's
    newer tables and Oniguruma agree on every one of those."""
    while True:
        r = rng.random()
        if r < 0.3:
            cp = rng.randrange(0x20, 0x7F)
        elif r < 0.6:
            cp = rng.randrange(0xA0, 0x3000)
        elif r < 0.8:
            cp = rng.randrange(0x3000, 0x10000)
        else:
            cp = rng.randrange(0x10000, 0x30000)
        c = chr(cp)
        if 0xD800 <= cp < 0xE000 or unicodedata.category(c) in ("Cn", "Cs"):
            continue
        return c


def make_corpus(seed=1234, n_random=140, n_mix=140):
    rng = random.Random(seed)
    out = list(FIXED)
    for _ in range(n_random):
        out.append("".join(random_unicode_char(rng) for _ in range(rng.randint(1, 30))))
    pieces = FIXED[1:] + WORDS
    seps = ["", " ", "  ", "\n", "\t", " \n", "\r\n", "   ", ". ", ", "]
    for _ in range(n_mix):
        out.append("".join(rng.choice(pieces) + rng.choice(seps) for _ in range(rng.randint(2, 8))))
    return out


CORPUS = make_corpus()


def compare(ours, theirs, corpus):
    bad = []
    for s in corpus:
        a = ours(s)
        b = theirs(s)
        if a != b:
            bad.append((s, a, b))
    assert not bad, f"{len(bad)}/{len(corpus)} differ; first: {bad[:3]!r}"


# --- SmolLM2 --------------------------------------------------------------------------------
def test_smollm_fields(smollm, smollm_meta):
    assert smollm.vocab_size == 49152 == len(smollm_meta["tokens"])
    assert smollm.model == "gpt2" and smollm.pre == "smollm"
    assert smollm.bos_id == 1 and smollm.eos_id == 2
    assert smollm.add_bos is False
    assert smollm.token_bytes(1) == b"<|im_start|>"
    assert smollm.token_bytes(smollm_meta["tokens"].index("Ġthe")) == b" the"


def test_smollm_matches_hf(smollm, smollm_hf):
    assert len(CORPUS) >= 300
    compare(
        lambda s: smollm.encode(s),
        lambda s: smollm_hf.encode(s, add_special_tokens=False).ids,
        CORPUS,
    )


def test_smollm_known_ids(smollm, smollm_meta):
    toks = smollm_meta["tokens"]
    ids = smollm.encode("<|im_start|>user\nhi 123<|im_end|>")
    assert [toks[i] for i in ids] == [
        "<|im_start|>",
        "user",
        "Ċ",
        "hi",
        "Ġ",
        "1",
        "2",
        "3",
        "<|im_end|>",
    ]


def test_smollm_long_texts(smollm, smollm_hf):
    texts = []
    for name in ("pyllm/tokenizer.py", "tests/test_tokenizer.py"):
        with open(os.path.join(ROOT, name), encoding="utf-8") as f:
            texts.append(f.read())
    texts.append(" ".join(CORPUS))
    texts.append("\n".join(CORPUS))
    compare(
        lambda s: smollm.encode(s),
        lambda s: smollm_hf.encode(s, add_special_tokens=False).ids,
        texts,
    )


def test_heap_merge_equals_simple_merge(smollm_meta):
    """Long words merge with a heap; forcing either path gives the same ids."""
    heap, simple = Tokenizer(smollm_meta), Tokenizer(smollm_meta)
    heap._heap_min, simple._heap_min = 1, 10**9
    rng = random.Random(3)
    words = [w for s in CORPUS for w in s.split()]
    words += [
        "".join(rng.choice("abcdeéth 1!.") for _ in range(rng.randint(2, 200))) for _ in range(100)
    ]
    for w in words:
        assert heap.encode(w) == simple.encode(w), repr(w)


def test_smollm_special_false(smollm, smollm_hf):
    """special=False: control-token text is plain text (HF: encode_special_tokens)."""
    cases = [s for s in CORPUS if "<" in s] + ["<|im_start|>user\nhi<|im_end|>"]
    smollm_hf.encode_special_tokens = True
    try:
        compare(
            lambda s: smollm.encode(s, special=False),
            lambda s: smollm_hf.encode(s, add_special_tokens=False).ids,
            cases,
        )
    finally:
        smollm_hf.encode_special_tokens = False
    ids = smollm.encode("<|im_start|>", special=False)
    assert len(ids) > 1 and 1 not in ids


def test_smollm_add_bos(smollm):
    assert smollm.encode("hi") == smollm.encode("hi", add_bos=False)
    assert smollm.encode("hi", add_bos=True) == [smollm.bos_id] + smollm.encode("hi")


def missing_bytes(tok):
    """Bytes whose byte-level character is not a token (SmolLM2 lacks a few): encode drops them."""
    return {b for b, c in enumerate(BYTE_CHARS) if c not in tok._to_id}


def lossless(tok, corpus):
    bad = missing_bytes(tok)
    return [s for s in corpus if not bad.intersection(s.encode())]


def test_smollm_roundtrip(smollm):
    assert 0x1D in missing_bytes(smollm) and 0x20 not in missing_bytes(smollm)
    for s in lossless(smollm, CORPUS):
        assert smollm.decode(smollm.encode(s)) == s, repr(s)
    assert smollm.decode(smollm.encode("a\x1db")) == "ab"


def test_smollm_decode_matches_hf(smollm, smollm_hf):
    for s in CORPUS[::3]:
        ids = smollm.encode(s, special=False)
        assert smollm.decode(ids) == smollm_hf.decode(ids, skip_special_tokens=False), repr(s)


def stream(tok, ids):
    dec = StreamDecoder(tok)
    parts = [dec.push(i) for i in ids]
    parts.append(dec.flush())
    return parts


def test_smollm_stream_decoder(smollm):
    split_seen = 0
    for s in lossless(smollm, CORPUS):
        ids = smollm.encode(s)
        parts = stream(smollm, ids)
        assert "".join(parts) == s, repr(s)
        for i, _piece in zip(ids, parts):
            try:
                smollm.token_bytes(i).decode("utf-8")
            except UnicodeDecodeError:  # this token ends mid-character
                split_seen += 1
        assert all("\ufffd" not in p for p in parts if "\ufffd" not in s)
    assert split_seen > 20  # the corpus does split characters across tokens


def test_stream_decoder_invalid_bytes(smollm, smollm_meta):
    """Bytes that never form UTF-8 come out as U+FFFD, exactly as decode() gives them."""
    bl = {b: smollm._to_id[c] for b, c in enumerate(BYTE_CHARS) if c in smollm._to_id}
    rng = random.Random(7)
    for _ in range(50):
        ids = [
            bl[rng.choice([0x41, 0x80, 0xBF, 0xC3, 0xE2, 0xF0, 0x9F, 0xF4, 0xEF])]
            for _ in range(rng.randint(1, 12))
        ]
        assert "".join(stream(smollm, ids)) == smollm.decode(ids)
    ids = [bl[0xE2], bl[0x82]]  # an incomplete 3-byte sequence
    assert stream(smollm, ids) == ["", "", "\ufffd"]
    assert smollm.decode(ids) == "\ufffd"


def test_lone_surrogates(smollm):
    """encode never crashes on lone surrogates: each becomes U+FFFD."""
    raw = b"caf\xe9 \xff\xfe ok"
    s = raw.decode("utf-8", "surrogateescape")
    assert smollm.encode(s) == smollm.encode(
        s.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    )
    assert smollm.decode(smollm.encode(s)) == "caf\ufffd \ufffd\ufffd ok"
    assert smollm.encode("\ud800") == smollm.encode("\ufffd")
    with pytest.raises(TypeError):
        smollm.encode(b"bytes")


def test_decode_bad_id(smollm):
    with pytest.raises(ValueError):
        smollm.decode([smollm.vocab_size])
    with pytest.raises(ValueError):
        smollm.token_bytes(-1)


# --- errors ---------------------------------------------------------------------------------
def test_unsupported():
    base = {"tokens": ["a", "b", "ab"], "merges": ["a b"]}
    with pytest.raises(ValueError, match="model"):
        Tokenizer(dict(base, model="bert"))
    with pytest.raises(ValueError, match="pre-tokenizer"):
        Tokenizer(dict(base, model="gpt2", pre="no-such-pre"))
    with pytest.raises(ValueError, match="merges"):
        Tokenizer({"model": "gpt2", "tokens": ["a"]})
    with pytest.raises(ValueError, match="token_type"):
        Tokenizer(dict(base, model="gpt2", token_type=[1]))
    with pytest.raises(ValueError, match="tokens"):
        Tokenizer({"model": "gpt2", "tokens": [], "merges": []})
    with pytest.raises(ValueError):
        Tokenizer(dict(base, model="gpt2", add_bos_token=True)).encode("ab")  # no BOS id
    # a missing pre-tokenizer is llama.cpp's "default"
    assert Tokenizer(dict(base, model="gpt2")).pre == "default"


# --- every pre-tokenizer against HF Split ---------------------------------------------------
def onig(pattern):
    """Our patterns write non-ASCII characters as \\uXXXX / \\UXXXXXXXX escapes; Oniguruma
    (HF) gets the characters themselves."""
    return re.sub(
        r"\\u([0-9a-fA-F]{4})|\\U([0-9a-fA-F]{8})",
        lambda m: chr(int(m.group(1) or m.group(2), 16)),
        pattern,
    )


def hf_split(regexes):
    return [pre_tokenizers.Split(Regex(onig(r)), behavior="isolated") for r in regexes]


@pytest.mark.parametrize(
    "pre", sorted({rx: n for n, (rx, _, _) in PRE_TOKENIZERS.items()}.values())
)
def test_pre_tokenizer_matches_hf(pre):
    hf = pre_tokenizers.Sequence(hf_split(PRE_TOKENIZERS[pre][0]))
    compare(
        lambda s: pre_tokenize(s, pre), lambda s: [p for p, _ in hf.pre_tokenize_str(s)], CORPUS
    )


def test_smollm_pre_is_digits_then_gpt2():
    assert pre_tokenize("ab 123 it's  x", "smollm") == [
        "ab",
        " ",
        "1",
        "2",
        "3",
        " it",
        "'s",
        " ",
        " x",
    ]


# --- tiny trained byte-level BPE ------------------------------------------------------------
def training_text(seed=99, n=1500):
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 12))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 10 ** rng.randint(1, 6))))
        if rng.random() < 0.2:
            words.append(rng.choice(FIXED[:80]))
        lines.append(" ".join(words) + rng.choice([".", "!", "?", ",", ":", ""]))
    return lines


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def train_byte_level(pre_tok, vocab_size=700):
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tok
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    hf.train_from_iterator(training_text(), trainer)
    model = json.loads(hf.to_str())["model"]
    tokens = [None] * len(model["vocab"])
    for t, i in model["vocab"].items():
        tokens[i] = t
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [3 if t in SPECIALS else 1 for t in tokens]
    return tokens, types, merges


@pytest.mark.parametrize("pre", ["gpt2", "llama3", "qwen2", "smollm", "default"])
def test_trained_byte_level(pre):
    regex = None if pre in ("gpt2", "smollm") else PRE_TOKENIZERS[pre][0]
    digits = [pre_tokenizers.Digits(individual_digits=True)] if pre == "smollm" else []
    if regex is None:
        train_pre = pre_tokenizers.Sequence(
            digits + [pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    else:
        train_pre = pre_tokenizers.Sequence(
            hf_split(regex) + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    tokens, types, merges = train_byte_level(train_pre)
    meta = {
        "model": "gpt2",
        "pre": pre,
        "tokens": tokens,
        "token_type": types,
        "merges": merges,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "add_bos_token": False,
    }
    ours = Tokenizer(meta)
    ignore = PRE_TOKENIZERS[pre][1]
    if regex is None:
        hf = hf_byte_level(meta, digits)
    else:
        hf = HFTokenizer(
            models.BPE(
                vocab={t: i for i, t in enumerate(tokens)},
                merges=[tuple(m.split(" ", 1)) for m in merges],
                ignore_merges=ignore,
            )
        )
        hf.pre_tokenizer = train_pre
        add_hf_specials(hf, meta)
    compare(lambda s: ours.encode(s), lambda s: hf.encode(s, add_special_tokens=False).ids, CORPUS)
    for s in CORPUS[::4]:
        assert ours.decode(ours.encode(s)) == s


def test_ignore_merges():
    """llama3 looks a whole word up before merging (llama.cpp ignore_merges, HF ignore_merges)."""
    tokens = list(BYTE_CHARS) + ["bc", "ab", "abc"]
    merges = ["b c", "a b"]
    for pre, ignore in (("gpt2", False), ("llama3", True)):
        meta = {"model": "gpt2", "pre": pre, "tokens": tokens, "merges": merges}
        hf = HFTokenizer(
            models.BPE(
                vocab={t: i for i, t in enumerate(tokens)},
                merges=[tuple(m.split(" ")) for m in merges],
                ignore_merges=ignore,
            )
        )
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        ids = Tokenizer(meta).encode("abc")
        assert ids == hf.encode("abc").ids
        assert [tokens[i] for i in ids] == (["abc"] if ignore else ["a", "bc"])
    assert Tokenizer(
        {"model": "gpt2", "pre": "llama3", "tokens": tokens, "merges": merges, "bos_token_id": 0}
    ).add_bos  # llama.cpp's default for llama3
    assert not Tokenizer(
        {
            "model": "gpt2",
            "pre": "llama3",
            "tokens": tokens,
            "merges": merges,
            "bos_token_id": 0,
            "add_bos_token": False,
        }
    ).add_bos


# --- SentencePiece-style BPE with byte fallback ----------------------------------------------
SPM_SPECIALS = ["<unk>", "<s>", "</s>"]


def train_spm(vocab_size=600):
    hf = HFTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPM_SPECIALS, show_progress=False
    )
    hf.train_from_iterator(training_text(seed=5), trainer)
    vocab = json.loads(hf.to_str())["model"]["vocab"]
    pieces = sorted((i, t) for t, i in vocab.items() if t not in SPM_SPECIALS)
    tokens = SPM_SPECIALS + [f"<0x{b:02X}>" for b in range(256)] + [t for _, t in pieces]
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    # the score of a piece: earlier merges score higher (as SentencePiece orders pieces)
    scores = [0.0] * (3 + 256) + [-float(k) for k in range(len(pieces))]
    return {
        "model": "llama",
        "tokens": tokens,
        "token_type": types,
        "scores": scores,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "unknown_token_id": 0,
        "add_bos_token": True,
        "add_eos_token": False,
        "add_space_prefix": True,
    }


def spm_merges(tokens, scores):
    """Merges as transformers' SentencePieceExtractor derives them: every split of a piece
    into two pieces, ordered by the piece's score."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for piece, score in zip(tokens, scores):
        local = [
            (piece[:k], piece[k:], score)
            for k in range(1, len(piece))
            if piece[:k] in vocab and piece[k:] in vocab
        ]
        local.sort(key=lambda x: (vocab[x[0]], vocab[x[1]]))
        merges += local
    merges.sort(key=lambda x: x[2], reverse=True)
    return [(a, b) for a, b, _ in merges]


def hf_spm(meta):
    """The oracle: the HF form of a Llama (SentencePiece BPE) tokenizer (legacy normalizer)."""
    tokens = meta["tokens"]
    hf = HFTokenizer(
        models.BPE(
            vocab={t: i for i, t in enumerate(tokens)},
            merges=spm_merges(tokens, meta["scores"]),
            unk_token="<unk>",
            byte_fallback=True,
            fuse_unk=True,
        )
    )
    hf.normalizer = normalizers.Sequence(
        [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
    )
    hf.decoder = decoders.Sequence(
        [
            decoders.Replace("\u2581", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    add_hf_specials(hf, meta)
    return hf


@pytest.fixture(scope="module")
def spm_meta():
    meta = train_spm()
    meta["tokens"].append("<tool>")  # a user-defined token
    meta["token_type"].append(4)
    meta["scores"].append(0.0)
    return meta


def test_spm_matches_hf(spm_meta):
    ours, hf = Tokenizer(spm_meta), hf_spm(spm_meta)
    assert ours._spm_split  # the per-word path
    compare(
        lambda s: ours.encode(s, add_bos=False),
        lambda s: hf.encode(s, add_special_tokens=False).ids,
        CORPUS,
    )
    # byte fallback is exercised, and BOS is added by default
    ids = ours.encode("\U0001d11e ok")  # 𝄞 is not in the vocabulary
    assert ids[0] == 1 and any(spm_meta["token_type"][i] == 6 for i in ids)
    assert ours.encode("a<s>b", special=False, add_bos=False) != ours.encode("a<s>b", add_bos=False)


def test_spm_unsplit_path(spm_meta):
    """A vocabulary with a token holding an inner "▁" is tokenized as one sequence."""
    meta = json.loads(json.dumps(spm_meta))
    for t in ("e\u2581t", "s\u2581a", "\u2581the\u2581"):
        meta["tokens"].append(t)
        meta["token_type"].append(1)
        meta["scores"].append(10.0)
    ours, hf = Tokenizer(meta), hf_spm(meta)
    assert not ours._spm_split
    compare(
        lambda s: ours.encode(s, add_bos=False),
        lambda s: hf.encode(s, add_special_tokens=False).ids,
        CORPUS,
    )
    ids = ours.encode("the test the a", add_bos=False)
    assert any(meta["tokens"][i] in ("e\u2581t", "s\u2581a", "\u2581the\u2581") for i in ids)


def test_spm_decode(spm_meta):
    ours, hf = Tokenizer(spm_meta), hf_spm(spm_meta)
    for s in CORPUS:
        if "\u2581" in s:
            continue
        ids = ours.encode(s, add_bos=False, special=False)
        if "<tool>" not in s:
            assert ours.decode(ids) == s, repr(s)
            assert "".join(stream(ours, ids)) == s, repr(s)
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=False), repr(s)
    assert ours.decode(ours.encode("hi there")) == "<s> hi there"  # as llama.cpp/HF show it
    assert ours.token_bytes(3 + 0x41) == b"A"
    assert ours.token_bytes(1) == b"<s>"


def test_spm_defaults():
    """llama.cpp defaults for a llama model: BOS 1, EOS 2, unknown 0, BOS added, space prefix."""
    tokens = ["<unk>", "<s>", "</s>", "\u2581", "a", "\u2581a"]
    tok = Tokenizer(
        {
            "model": "llama",
            "tokens": tokens,
            "token_type": [2, 3, 3, 1, 1, 1],
            "scores": [0, 0, 0, -1, -2, -3],
        }
    )
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.add_space_prefix) == (1, 2, True, True)
    assert tok.encode("a a") == [1, 5, 5]
    assert tok.encode("b") == [1, 3, 0]  # no byte tokens: the unknown token
    assert tok.decode([5, 5]) == "a a"
    no_prefix = Tokenizer(
        {
            "model": "llama",
            "tokens": tokens,
            "token_type": [2, 3, 3, 1, 1, 1],
            "scores": [0, 0, 0, -1, -2, -3],
            "add_space_prefix": False,
            "add_bos_token": False,
            "add_eos_token": True,
        }
    )
    assert no_prefix.encode("a a") == [4, 5, 2]
    assert no_prefix.encode("a a", add_bos=False) == [4, 5]


# --- the two algorithms' classes ------------------------------------------------------------
def test_factory_builds_the_model_class(smollm, smollm_meta, spm_meta):
    from pyllm.tokenizer import ByteLevelBPE, SentencePieceBPE

    spm = Tokenizer(spm_meta)
    assert type(smollm) is ByteLevelBPE and type(spm) is SentencePieceBPE
    assert isinstance(smollm, Tokenizer) and isinstance(spm, Tokenizer)
    assert (smollm.model, spm.model, spm.pre) == ("gpt2", "llama", None)
    # the classes build directly too, the same tokenizer
    text = "Hello <|im_start|>world, 123 héllo"
    assert ByteLevelBPE(smollm_meta).encode(text) == smollm.encode(text)
    assert SentencePieceBPE(spm_meta).encode(text) == spm.encode(text)
    with pytest.raises(ValueError, match="is not 'llama'"):
        SentencePieceBPE(smollm_meta)
    for bad in ("gpt2", None, {"model": ["gpt2"]}, {"model": None}):
        with pytest.raises(ValueError, match="not a dict|unsupported tokenizer model"):
            Tokenizer(bad)
    # copies (and pickles) rebuild the same class
    import copy
    import pickle

    for tok in (smollm, spm):
        for twin in (copy.deepcopy(tok), pickle.loads(pickle.dumps(tok))):
            assert type(twin) is type(tok) and twin.encode(text) == tok.encode(text)


def test_merge_heap_best_pair_first_leftmost_on_ties():
    from pyllm.tokenizer import _merge_heap

    merges = {"aa": (0, "aa"), "aaaa": (-1, "aaaa"), "ab": (1, "ab")}
    join = lambda a, b: a + b  # noqa: E731
    assert _merge_heap(list("aaa"), join, merges) == ["aa", "a"]  # leftmost of two equal pairs
    assert _merge_heap(list("aaaa"), join, merges) == ["aaaa"]  # aa aa, then the better aaaa
    assert _merge_heap(list("aab"), join, merges) == ["aa", "b"]  # aa (0) before ab (1)
    assert _merge_heap(list("ba"), join, merges) == ["b", "a"]
    assert _merge_heap(["a"], join, merges) == ["a"] and _merge_heap([], join, merges) == []
