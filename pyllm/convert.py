"""Convert a GGUF file, a Hugging Face directory or a llama2.c checkpoint into a pyllm
parameters file.

    convert(src, out, progress=True, tokenizer=None)
        -> {"tensors", "parameters", "file_size", "seconds", ...}

Sources:
  * GGUF, architectures "llama" (Llama 1/2/3, TinyLlama, Mistral, SmolLM2) and "qwen2".
    Any tensor type gguf-py dequantizes (F32, F16, BF16, Q4_0..Q8_0, Q2_K..Q6_K, IQ*).
    llama.cpp stores the Q and K rows of "llama" models permuted for its interleaved RoPE
    (pairs (2i, 2i+1)); they are put back into the Hugging Face rotate-half order (pairs
    (i, i + head_dim/2)) that the kernel uses. "qwen2" GGUFs are not permuted.
  * A Hugging Face directory: config.json (LlamaForCausalLM, MistralForCausalLM,
    Qwen2ForCausalLM), *.safetensors (one file or shards; F32, F16, BF16), tokenizer.json
    and tokenizer_config.json (chat template, BOS/EOS).
  * A llama2.c checkpoint (karpathy/llama2.c, the legacy "version 0" export: a header of
    7 int32 and float32 weights, no magic; recognized by its size matching the header
    exactly) with its tokenizer.bin (next to it, or convert(..., tokenizer=PATH)). Its Q/K
    rows are in Meta's interleaved RoPE layout and are permuted to rotate-half as above.

Every tensor is rounded to float16 (rope_freqs: float32); Q, K, V are fused into attn_qkv
and gate, up into ffn_gate_up as format.tensor_layout says. The tensors are produced one
at a time while the file is written, so memory stays near the size of the largest one.
The write is atomic (format.write): a failed or interrupted conversion leaves no OUT.
"""

import datetime
import hashlib
import json
import math
import mmap
import os
import re
import reprlib
import stat
import struct
import sys
import time

import numpy as np

from . import __version__, format, outfile, safeio
from .format import FLAG_QKV_BIAS, FLAG_TIED_OUTPUT, TensorSpec

__all__ = ["convert", "ConvertError"]

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
HF_ARCHS = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
GGUF_ARCHS = ("llama", "qwen2")
# tokens that end a turn in chat models: written as eot/eom_token_id when the vocabulary has them
EOT_TOKENS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endofturn|>")
EOM_TOKENS = ("<|eom_id|>",)
# pre-tokenizer regexes as tokenizer.json spells them
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 48
_REPR.maxlevel = 2
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>\Z")


class ConvertError(Exception):
    """The source cannot be converted; the message is one line naming why."""


# --- small helpers ---------------------------------------------------------------------------
def _f16(name, a):
    """a as float16 (any float array; no copy if it is float16); refuses values float16 cannot
    hold."""
    b = np.asarray(a, dtype=np.float16)  # a copy only if a is not float16 already
    if not np.isfinite(b).all():
        bad = np.asarray(a, dtype=np.float32)
        raise ConvertError(
            f"tensor {name}: values do not fit float16 "
            f"(max |x| = {float(np.nanmax(np.abs(bad))):.4g}, or NaN/inf in the source)"
        )
    return b


def _drop_mapped_pages(memmap):
    """Drop a read-only file mapping's pages from this process's resident set (they stay in the
    page cache): a big source read tensor by tensor then costs one tensor's memory, not the
    file's."""
    mm = getattr(memmap, "_mmap", None)
    if mm is not None and hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        mm.madvise(mmap.MADV_DONTNEED)


def _unpermute(w, n_head):
    """Undo llama.cpp's Q/K row permutation: within each head, GGUF row 2j+s holds the
    Hugging Face row s*(head_dim/2)+j (s = 0, 1). Works on weights (rows, cols) and biases."""
    return (
        w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def rope_freqs(theta, head_dim, scaling=None):
    """Inverse RoPE frequencies (float32, head_dim/2): 1/theta^(2i/head_dim), scaled.

    scaling: None, {"rope_type": "linear", "factor"}, or {"rope_type": "llama3", "factor",
    "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"} (the formula
    of transformers' _compute_llama3_parameters)."""
    inv = 1.0 / float(theta) ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    kind = _rope_type(scaling)
    if kind == "linear":
        inv = inv / float(scaling["factor"])
    elif kind == "llama3":
        try:
            factor = float(scaling["factor"])
            low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
            old_ctx = float(scaling["original_max_position_embeddings"])
        except (KeyError, TypeError, ValueError) as e:
            raise ConvertError(f"llama3 rope scaling without a usable {e} parameter") from None
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = np.where(medium, smoothed, scaled)
    elif kind is not None:
        raise ConvertError(
            f"unsupported rope scaling type {_show(kind)} (supported: linear, llama3)"
        )
    return inv.astype(np.float32)


def _rope_type(scaling):
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type"))
    return None if kind in (None, "default", "none") else kind


def _sha256(paths):
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while True:
                chunk = f.read(1 << 22)
                if not chunk:
                    break
                h.update(chunk)
    return h.hexdigest()


def _pad_vocab(tok, rows, where=""):
    """Make the token lists as long as the embedding (llama.cpp's [PAD{i}] unused tokens)."""
    n = len(tok["tokens"])
    if n > rows:
        raise ConvertError(
            f"{where}{': ' if where else ''}the tokenizer has {n} tokens but the embedding "
            f"only {rows} rows"
        )
    if n < rows:
        tok["tokens"] = tok["tokens"] + [f"[PAD{i}]" for i in range(n, rows)]
        if tok.get("token_type") is not None:
            tok["token_type"] = list(tok["token_type"]) + [UNUSED] * (rows - n)
        if tok.get("scores") is not None:
            tok["scores"] = list(tok["scores"]) + [-1e9] * (rows - n)
    return tok


class _Model:
    """What a reader produces: header cfg, metadata and lazy source tensors."""

    def __init__(self):
        self.cfg = {}  # header ints + norm_eps
        self.config = {}  # meta["config"]
        self.tokenizer = {}
        self.chat_template = None
        self.load = {}  # our tensor name -> callable returning a float array
        self.inputs = []  # files hashed for provenance
        self.tok_files = []  # other files read (index, tokenizer, chat template)
        self.template_key = None  # where the chat template came from, for errors
        self.source_format = None


# --- values a source claims --------------------------------------------------------------
def _int(where, key, v, lo=1, hi=format.LIMIT - 1):
    """v as an int in lo..hi, else a ConvertError naming the file and the key."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or not lo <= v <= hi:
        raise ConvertError(f"{where}: {key} = {_show(v)} is not an integer in {lo}..{hi}")
    return int(v)


def _num(where, key, v, positive=True):
    """v as a finite float (positive unless told otherwise)."""
    if (
        isinstance(v, (bool, np.bool_))
        or not isinstance(v, (int, float, np.integer, np.floating))
        or not math.isfinite(float(v))
        or (positive and not float(v) > 0)
    ):
        raise ConvertError(
            f"{where}: {key} = {_show(v)} is not a finite{' positive' if positive else ''} number"
        )
    return float(v)


def _show(v):
    """A value from a file, short and printable (repr escapes control characters), for an error."""
    return _REPR.repr(v.item() if isinstance(v, np.generic) else v)


def _name(s):
    """A name from a file (tensor, key) as it reads in an error: as is if short and printable."""
    return s if isinstance(s, str) and len(s) <= 96 and s.isprintable() else _show(s)


def _msg(e):
    """An exception's message as one short printable line (it may quote the file)."""
    text = str(e)
    if not text.isprintable():
        text = text.encode("unicode_escape").decode("ascii")
    return text if len(text) <= 200 else text[:197] + "..."


def _is_file(path):
    """False if PATH does not exist; a one-line error if it exists but is not a regular file
    (a FIFO would block the read, a device would never end)."""
    try:
        safeio.stat_regular(path)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise ConvertError(safeio.error_line(path, e)) from None
    return True


def _check_cfg(where, cfg):
    try:
        format.check_config(cfg)
    except format.FormatError as e:
        raise ConvertError(f"{where}: {e}") from None


# --- the canonical source tensors ----------------------------------------------------------
# Every tensor a source holds, as one table for all readers: its key, its shape from the
# header cfg, whether each layer has one, and the condition under which it exists (None:
# always; "untied": an output matrix apart from the embedding; "qkv_bias"; "rope_factors":
# Llama 3 frequency factors, GGUF only). Each reader maps keys to its own names ({i}: layer).
_TENSORS = (
    ("tok_embd", lambda c: (c["vocab_size"], c["dim"]), False, None),
    ("output_norm", lambda c: (c["dim"],), False, None),
    ("output", lambda c: (c["vocab_size"], c["dim"]), False, "untied"),
    ("rope_factors", lambda c: (c["head_dim"] // 2,), False, "rope_factors"),
    ("attn_norm", lambda c: (c["dim"],), True, None),
    ("attn_q", lambda c: (c["n_heads"] * c["head_dim"], c["dim"]), True, None),
    ("attn_k", lambda c: (c["n_kv_heads"] * c["head_dim"], c["dim"]), True, None),
    ("attn_v", lambda c: (c["n_kv_heads"] * c["head_dim"], c["dim"]), True, None),
    ("attn_q_bias", lambda c: (c["n_heads"] * c["head_dim"],), True, "qkv_bias"),
    ("attn_k_bias", lambda c: (c["n_kv_heads"] * c["head_dim"],), True, "qkv_bias"),
    ("attn_v_bias", lambda c: (c["n_kv_heads"] * c["head_dim"],), True, "qkv_bias"),
    ("attn_out", lambda c: (c["dim"], c["n_heads"] * c["head_dim"]), True, None),
    ("ffn_norm", lambda c: (c["dim"],), True, None),
    ("ffn_gate", lambda c: (c["hidden_dim"], c["dim"]), True, None),
    ("ffn_up", lambda c: (c["hidden_dim"], c["dim"]), True, None),
    ("ffn_down", lambda c: (c["dim"], c["hidden_dim"]), True, None),
)
GGUF_NAMES = {
    "tok_embd": "token_embd.weight",
    "output_norm": "output_norm.weight",
    "output": "output.weight",
    "rope_factors": "rope_freqs.weight",
    "attn_norm": "blk.{i}.attn_norm.weight",
    "attn_q": "blk.{i}.attn_q.weight",
    "attn_k": "blk.{i}.attn_k.weight",
    "attn_v": "blk.{i}.attn_v.weight",
    "attn_q_bias": "blk.{i}.attn_q.bias",
    "attn_k_bias": "blk.{i}.attn_k.bias",
    "attn_v_bias": "blk.{i}.attn_v.bias",
    "attn_out": "blk.{i}.attn_output.weight",
    "ffn_norm": "blk.{i}.ffn_norm.weight",
    "ffn_gate": "blk.{i}.ffn_gate.weight",
    "ffn_up": "blk.{i}.ffn_up.weight",
    "ffn_down": "blk.{i}.ffn_down.weight",
}
_HF_LAYER = "model.layers.{i}."
HF_NAMES = {
    "tok_embd": "model.embed_tokens.weight",
    "output_norm": "model.norm.weight",
    "output": "lm_head.weight",
    "attn_norm": _HF_LAYER + "input_layernorm.weight",
    "attn_q": _HF_LAYER + "self_attn.q_proj.weight",
    "attn_k": _HF_LAYER + "self_attn.k_proj.weight",
    "attn_v": _HF_LAYER + "self_attn.v_proj.weight",
    "attn_q_bias": _HF_LAYER + "self_attn.q_proj.bias",
    "attn_k_bias": _HF_LAYER + "self_attn.k_proj.bias",
    "attn_v_bias": _HF_LAYER + "self_attn.v_proj.bias",
    "attn_out": _HF_LAYER + "self_attn.o_proj.weight",
    "ffn_norm": _HF_LAYER + "post_attention_layernorm.weight",
    "ffn_gate": _HF_LAYER + "mlp.gate_proj.weight",
    "ffn_up": _HF_LAYER + "mlp.up_proj.weight",
    "ffn_down": _HF_LAYER + "mlp.down_proj.weight",
}


def _groups(cfg, rope_factors=False):
    g = {None}
    if not cfg["flags"] & FLAG_TIED_OUTPUT:
        g.add("untied")
    if cfg["flags"] & FLAG_QKV_BIAS:
        g.add("qkv_bias")
    if rope_factors:
        g.add("rope_factors")
    return g


def _source_names(where, cfg, names, shapes, groups, ignored=()):
    """{(key, layer or None): the source's name} for every tensor cfg implies, after checking
    that the source holds each with its shape and nothing else (names in IGNORED may be left
    over). shapes: {source name: shape}."""
    per_layer = sum(1 for _, _, layer, when in _TENSORS if layer and when in groups)
    if per_layer * cfg["n_layers"] > len(shapes):  # before a table as long as the claim is built
        raise ConvertError(
            f"{where}: {cfg['n_layers']} layers claimed, but the file holds only "
            f"{len(shapes)} tensors"
        )
    out = {}
    for key, shape_of, layer, when in _TENSORS:
        if when not in groups:
            continue
        shape = shape_of(cfg)
        for i in range(cfg["n_layers"]) if layer else (None,):
            name = names[key].format(i=i)
            if name not in shapes:
                raise ConvertError(f"{where}: missing tensor {name}")
            if tuple(shapes[name]) != tuple(shape):
                raise ConvertError(
                    f"{where}: tensor {name} has shape {tuple(shapes[name])}, "
                    f"expected {tuple(shape)}"
                )
            out[key, i] = name
    used = set(out.values())
    extra = sorted(n for n in shapes if n not in used and n not in ignored)
    if extra:
        raise ConvertError(
            f"{where}: unsupported tensor {_name(extra[0])} ({len(extra)} not understood)"
        )
    return out


def _fused_loaders(cfg, get, rope, interleaved=False):
    """Our tensor name -> a callable producing it, from get(key, layer) over the canonical
    source tensors. interleaved: Q/K rows are in Meta's/llama.cpp's RoPE pair order and are
    put back into rotate-half order."""
    heads = {
        "attn_q": cfg["n_heads"],
        "attn_k": cfg["n_kv_heads"],
        "attn_q_bias": cfg["n_heads"],
        "attn_k_bias": cfg["n_kv_heads"],
    }

    def src(key, i=None):
        a = get(key, i)
        return _unpermute(a, heads[key]) if interleaved and key in heads else a

    L = {
        "tok_embd": lambda: src("tok_embd"),
        "rope_freqs": rope,
        "output_norm": lambda: src("output_norm"),
    }
    if not cfg["flags"] & FLAG_TIED_OUTPUT:
        L["output"] = lambda: src("output")
    for i in range(cfg["n_layers"]):
        p = f"blk.{i}."
        L[p + "attn_norm"] = lambda i=i: src("attn_norm", i)
        L[p + "attn_qkv"] = lambda i=i: np.concatenate(
            [src("attn_q", i), src("attn_k", i), src("attn_v", i)]
        )
        if cfg["flags"] & FLAG_QKV_BIAS:
            L[p + "attn_qkv_bias"] = lambda i=i: np.concatenate(
                [src("attn_q_bias", i), src("attn_k_bias", i), src("attn_v_bias", i)]
            )
        L[p + "attn_out"] = lambda i=i: src("attn_out", i)
        L[p + "ffn_norm"] = lambda i=i: src("ffn_norm", i)
        L[p + "ffn_gate_up"] = lambda i=i: np.concatenate([src("ffn_gate", i), src("ffn_up", i)])
        L[p + "ffn_down"] = lambda i=i: src("ffn_down", i)
    return L


# --- GGUF ----------------------------------------------------------------------------------
# value types of the GGUF key-value section: fixed item sizes (8: string, 9: array)
_GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def _gguf_prescan(path, data):
    """Walk a GGUF file's header (key-value pairs and tensor infos) before gguf-py reads it:
    every count is checked against the bytes left, so a truncated file or a claim of 2^40
    items is refused with the key it was reading, before anything is allocated for it.
    Returns the number of bytes from each tensor's data offset to the end of the file."""
    size = len(data)
    pos = 4
    if size < 24:
        raise ConvertError(f"{path}: truncated GGUF header ({size} bytes)")
    (version,) = struct.unpack_from("<I", data, pos)
    e = "<" if version & 0xFFFF else ">"  # gguf-py reads byte-swapped (big-endian) files too
    version, n_tensors, n_kv = struct.unpack_from(e + "IQQ", data, pos)
    pos += 20
    if version not in (2, 3):
        raise ConvertError(f"{path}: GGUF version {version} (supported: 2, 3)")
    where = ["the header"]

    def need(n, what):
        if n > size - pos:
            raise ConvertError(
                f"{path}: truncated GGUF file: reading {what} of {where[0]}, {n} bytes needed, "
                f"{size - pos} left"
            )

    def u(fmt, what):
        nonlocal pos
        need(struct.calcsize(fmt), what)
        v = struct.unpack_from(e + fmt, data, pos)[0]
        pos += struct.calcsize(fmt)
        return v

    def string(what):
        nonlocal pos
        n = u("Q", what + " length")
        need(n, what)
        s = bytes(data[pos : pos + n])
        pos += n
        return s

    def value(t, depth=0):
        nonlocal pos
        if t in _GGUF_SIZES:
            need(_GGUF_SIZES[t], "a value")
            pos += _GGUF_SIZES[t]
        elif t == _GGUF_STRING:
            string("a string")
        elif t == _GGUF_ARRAY and depth < 2:
            it, count = u("I", "an array's type"), u("Q", "an array's length")
            if it in _GGUF_SIZES:
                need(count * _GGUF_SIZES[it], f"an array of {count} items")
                pos += count * _GGUF_SIZES[it]
            elif it in (_GGUF_STRING, _GGUF_ARRAY):
                need(count * 8, f"an array of {count} items")  # each at least its 8-byte length
                for _ in range(count):
                    value(it, depth + 1)
            else:
                raise ConvertError(f"{path}: GGUF key {where[0]}: unknown array item type {it}")
        else:
            raise ConvertError(f"{path}: GGUF key {where[0]}: unknown value type {t}")

    need(n_kv * 12, f"{n_kv} key-value pairs")
    alignment = 32
    for k in range(n_kv):
        where[0] = f"key-value pair {k}"
        try:
            key = string("a key").decode("utf-8")
        except UnicodeDecodeError:
            raise ConvertError(f"{path}: GGUF key-value pair {k}: the key is not UTF-8") from None
        where[0] = _name(key)
        t = u("I", "the value type")
        start = pos
        value(t)
        if key == "general.alignment":
            alignment = struct.unpack_from(e + "I", data, start)[0] if t == 4 else 0
            if not (alignment and alignment & (alignment - 1) == 0 and alignment <= 1 << 16):
                raise ConvertError(
                    f"{path}: GGUF key general.alignment is not a power of two up to 65536"
                )
    need(n_tensors * 24, f"{n_tensors} tensor infos")
    import gguf

    tensors = []
    for k in range(n_tensors):
        where[0] = f"tensor info {k}"
        name = _name(string("a tensor name").decode("utf-8", "replace"))
        where[0] = f"tensor {name}"
        n_dims = u("I", "the number of dimensions")
        if not 1 <= n_dims <= 4:
            raise ConvertError(f"{path}: GGUF tensor {name} has {n_dims} dimensions (1..4)")
        dims = [u("Q", "a dimension") for _ in range(n_dims)]
        t, offset = u("I", "the type"), u("Q", "the data offset")
        tensors.append((name, dims, t, offset))
    data_start = -(-pos // alignment) * alignment
    for name, dims, t, offset in tensors:
        try:
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(t)]
        except (ValueError, KeyError):
            raise ConvertError(f"{path}: GGUF tensor {name}: unknown tensor type {t}") from None
        n = math.prod(dims)
        if dims[0] % block:
            raise ConvertError(
                f"{path}: GGUF tensor {name}: {dims[0]} columns are not whole blocks of {block}"
            )
        if data_start + offset + n // block * type_size > size:
            raise ConvertError(
                f"{path}: GGUF tensor {name} lies past the end of the file (truncated?)"
            )


def _gguf_open(path):
    """(the gguf-py reader, its key-value fields, the architecture), the header walked first."""
    import gguf
    from gguf import GGMLQuantizationType as QT

    try:
        data = np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as e:
        raise ConvertError(f"{path}: cannot map the file ({_msg(e)})") from None
    _gguf_prescan(path, data)
    del data
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as e:  # gguf raises ValueError/struct errors on a damaged file
        raise ConvertError(
            f"{path}: not a readable GGUF file ({type(e).__name__}: {_msg(e)})"
        ) from None
    fields = {}
    for k, f in reader.fields.items():
        if not k.startswith("GGUF."):
            try:
                fields[k] = f.contents()
            except Exception as e:
                raise ConvertError(
                    f"{path}: cannot read GGUF key {_name(k)} ({type(e).__name__}: {_msg(e)})"
                ) from None
    arch = fields.get("general.architecture")
    if arch not in GGUF_ARCHS:
        raise ConvertError(
            f"unsupported GGUF architecture {_show(arch)} (supported: {', '.join(GGUF_ARCHS)})"
        )
    traits = getattr(gguf.quants, "_type_traits", None)  # the types gguf-py can dequantize
    supported = {QT.F32, QT.F16} | set(traits or ())
    for t in reader.tensors:
        if traits is not None and t.tensor_type not in supported:
            raise ConvertError(
                f"{path}: tensor {_name(t.name)}: unsupported GGUF tensor type {t.tensor_type.name}"
            )
    return reader, fields, arch


def _gguf_cfg(path, fields, arch):
    """The header cfg (without vocab_size and flags) and rope theta from {arch}.* keys."""

    def kv(key, default=KeyError, check=_int):
        v = fields.get(f"{arch}.{key}", default)
        if v is KeyError:
            raise ConvertError(f"{path}: GGUF key {arch}.{key} is missing")
        if isinstance(v, list):
            raise ConvertError(
                f"{path}: GGUF key {arch}.{key} is per-layer ({_show(v[:4])}...), not supported"
            )
        return check(path, f"GGUF key {arch}.{key}", v)

    dim, n_heads = kv("embedding_length"), kv("attention.head_count")
    head_dim = kv("attention.key_length", dim // n_heads)
    if kv("attention.value_length", head_dim) != head_dim:
        raise ConvertError(f"{path}: key_length != value_length is not supported")
    rope_dim = kv("rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise ConvertError(
            f"partial rotary embeddings (rope.dimension_count {rope_dim} < head_dim "
            f"{head_dim}) are not supported"
        )
    cfg = dict(
        dim=dim,
        n_layers=kv("block_count"),
        n_heads=n_heads,
        n_kv_heads=kv("attention.head_count_kv", n_heads),
        head_dim=head_dim,
        hidden_dim=kv("feed_forward_length"),
        max_seq_len=kv("context_length"),
        sliding_window=kv("attention.sliding_window", 0, lambda p, k, v: _int(p, k, v or 0, 0)),
        norm_eps=kv("attention.layer_norm_rms_epsilon", check=_num),
    )
    return cfg, kv("rope.freq_base", 10000.0, _num)


def _gguf_rope_scaling(path, fields, arch, factors):
    """RoPE scaling as meta["config"] records it. llama.cpp divides each base frequency by
    rope_freqs.weight (Llama 3 factors), and multiplies positions by 1/factor for linear scaling."""
    scaling = None
    stype = fields.get(f"{arch}.rope.scaling.type")
    if stype not in (None, "none"):
        factor = fields.get(f"{arch}.rope.scaling.factor")
        if stype != "linear" or not factor:
            raise ConvertError(
                f"unsupported rope scaling type {_show(stype)} (supported: linear, llama3)"
            )
        scaling = {
            "rope_type": "linear",
            "factor": _num(path, f"GGUF key {arch}.rope.scaling.factor", factor),
        }
    elif fields.get(f"{arch}.rope.scale_linear"):
        scaling = {
            "rope_type": "linear",
            "factor": _num(
                path, f"GGUF key {arch}.rope.scale_linear", fields[f"{arch}.rope.scale_linear"]
            ),
        }
    if factors:
        if scaling:
            raise ConvertError(
                "a rope_freqs.weight tensor together with linear rope scaling is not supported"
            )
        scaling = {"rope_type": "llama3", "freq_factors": "rope_freqs.weight"}
        orig = fields.get(f"{arch}.rope.scaling.original_context_length")
        if orig:
            scaling["original_max_position_embeddings"] = _int(
                path, f"GGUF key {arch}.rope.scaling.original_context_length", orig
            )
    return scaling


def _gguf_meta(path, fields, arch, m, theta, scaling):
    """meta's config (name, provenance-ish general.* keys), tokenizer and chat template."""
    import gguf

    ftype = fields.get("general.file_type")
    try:
        ftype = gguf.LlamaFileType(ftype).name if ftype is not None else None
    except (ValueError, TypeError):
        ftype = None
    name = fields.get("general.name")
    m.config = {
        "architecture": arch,
        "name": name if isinstance(name, str) and name else os.path.basename(path),
        "rope_theta": theta,
        "rope_scaling": scaling,
        "context_length": m.cfg["max_seq_len"],
    }
    m.config.update(
        {
            k.split(".", 1)[1]: v
            for k, v in fields.items()
            if k
            in (
                "general.basename",
                "general.organization",
                "general.finetune",
                "general.size_label",
                "general.license",
            )
            and isinstance(v, str)
        }
    )
    if ftype is not None:
        m.config["gguf_file_type"] = ftype

    tok = {
        k[len("tokenizer.ggml.") :]: v for k, v in fields.items() if k.startswith("tokenizer.ggml.")
    }
    if tok.get("model") not in ("gpt2", "llama"):
        raise ConvertError(
            f"unsupported tokenizer model {_show(tok.get('model'))} (supported: gpt2, llama)"
        )
    if not tok.get("tokens"):
        raise ConvertError(f"{path}: the GGUF file has no tokenizer.ggml.tokens")
    _check_tokens(path, "GGUF key tokenizer.ggml", tok)
    _add_turn_ids(tok)
    m.tokenizer = _pad_vocab(tok, m.cfg["vocab_size"], path)
    m.chat_template = fields.get("tokenizer.chat_template")
    m.template_key = f"{path}: GGUF key tokenizer.chat_template"


def _read_gguf(path):
    import gguf

    reader, fields, arch = _gguf_open(path)
    cfg, theta = _gguf_cfg(path, fields, arch)
    tensors = {t.name: t for t in reader.tensors}
    shapes = {n: tuple(int(x) for x in reversed(t.shape.tolist())) for n, t in tensors.items()}
    if "token_embd.weight" not in shapes:
        raise ConvertError(f"{path}: missing tensor token_embd.weight")
    factors = "rope_freqs.weight" in tensors
    flags = (FLAG_TIED_OUTPUT if "output.weight" not in tensors else 0) | (
        FLAG_QKV_BIAS if "blk.0.attn_q.bias" in tensors else 0
    )

    m = _Model()
    m.source_format, m.inputs = "gguf", [path]
    m.cfg = dict(
        cfg,
        vocab_size=_int(path, "the rows of token_embd.weight", shapes["token_embd.weight"][0]),
        flags=flags,
    )
    m.cfg = {k: m.cfg[k] for k in format.HEADER_INTS + ("norm_eps",)}
    _check_cfg(path, m.cfg)
    names = _source_names(path, m.cfg, GGUF_NAMES, shapes, _groups(m.cfg, factors))
    scaling = _gguf_rope_scaling(path, fields, arch, factors)

    def deq(name):
        t = tensors[name]
        try:  # F16 as it is (a copy; dequantize would double it as f32)
            if t.tensor_type == gguf.GGMLQuantizationType.F16:
                a = np.array(t.data.view(np.float16))
            else:
                a = np.array(gguf.quants.dequantize(t.data, t.tensor_type))
        except NotImplementedError:
            raise ConvertError(
                f"tensor {name}: unsupported GGUF tensor type {t.tensor_type.name}"
            ) from None
        _drop_mapped_pages(reader.data)
        return a.reshape(shapes[name])

    def rope():
        inv = rope_freqs(
            theta,
            cfg["head_dim"],
            scaling if scaling and scaling["rope_type"] == "linear" else None,
        )
        if factors:
            f = deq("rope_freqs.weight").astype(np.float64)
            if not (np.isfinite(f).all() and (f > 0).all()):
                raise ConvertError("rope_freqs.weight holds non-positive or non-finite factors")
            inv = (inv.astype(np.float64) / f).astype(np.float32)
        return inv

    # llama.cpp's convert permutes Q/K only for NORM-rope architectures
    m.load = _fused_loaders(
        m.cfg, lambda key, i=None: deq(names[key, i]), rope, interleaved=arch == "llama"
    )
    _gguf_meta(path, fields, arch, m, theta, scaling)
    return m


def _check_tokens(where, prefix, tok):
    """The tokenizer lists' types and lengths, each error naming the key (Tokenizer checks
    the rest when the converted file is tried before it is written)."""
    tokens = tok.get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise ConvertError(f"{where}: {prefix}.tokens is not a list of strings")
    n = len(tokens)
    for key, kind in (("scores", (int, float)), ("token_type", int)):
        v = tok.get(key)
        if v is not None and (
            not isinstance(v, list)
            or len(v) != n
            or not all(isinstance(x, kind) and not isinstance(x, bool) for x in v)
        ):
            raise ConvertError(f"{where}: {prefix}.{key} is not a list of {n} numbers")
    merges = tok.get("merges")
    if merges is not None and (
        not isinstance(merges, list) or not all(isinstance(x, str) for x in merges)
    ):
        raise ConvertError(f"{where}: {prefix}.merges is not a list of strings")
    for key, v in list(tok.items()):
        if key.endswith("_token_id"):
            _int(where, f"{prefix}.{key}", v, 0, n - 1)


def _add_turn_ids(tok):
    """eot/eom_token_id from the vocabulary when the source does not say (llama.cpp guesses
    them by these names when it loads a model)."""
    for names, key in ((EOT_TOKENS, "eot_token_id"), (EOM_TOKENS, "eom_token_id")):
        if key not in tok:
            found = [t for t in names if t in tok["tokens"]]
            if found:
                tok[key] = tok["tokens"].index(found[0])


# --- Hugging Face ---------------------------------------------------------------------------
_ST_DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2"}  # BF16: the top half of a float32
_ST_SIZES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
JSON_LIMIT = 64 << 20  # config.json, index, tokenizer_config.json
TOKENIZER_LIMIT = 512 << 20  # tokenizer.json


def _json_file(path, limit=JSON_LIMIT, kind=dict):
    """A JSON file's value (of type KIND); non-regular files, huge files, deep nesting refused."""
    try:
        data = outfile.read_regular(path, limit, "JSON file")
        v = json.loads(data.decode("utf-8"))
    except outfile.OutputError as e:
        raise ConvertError(str(e)) from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, nesting
        raise ConvertError(f"{path}: cannot read ({type(e).__name__}: {_msg(e)})") from None
    if not isinstance(v, kind):
        raise ConvertError(f"{path}: not a JSON {'object' if kind is dict else kind.__name__}")
    return v


def _st_header(path):
    """{name: (dtype, shape, begin, end)} from a safetensors file's JSON header, every entry
    checked: known dtype, non-negative shape, size = elements x dtype size, inside the file,
    no two tensors overlapping."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > min(size - 8, 100 << 20):
                raise ValueError(f"header length {n} is larger than the file or 100 MiB")
            head = json.loads(f.read(n))
    except (OSError, ValueError, RecursionError, struct.error) as e:
        raise ConvertError(
            f"{path}: not a readable safetensors file ({type(e).__name__}: {_msg(e)})"
        ) from None
    if not isinstance(head, dict):
        raise ConvertError(
            f"{path}: not a readable safetensors file (the header is not a JSON object)"
        )
    out, spans = {}, []
    for name, info in head.items():
        if name == "__metadata__":
            continue
        shown = _name(name)
        try:
            dtype, shape, (b, e) = info["dtype"], info["shape"], info["data_offsets"]
            if (
                not isinstance(dtype, str)
                or not isinstance(shape, list)
                or not all(
                    isinstance(x, int) and not isinstance(x, bool) and x >= 0
                    for x in shape + [b, e]
                )
            ):
                raise TypeError
        except (TypeError, KeyError, ValueError):
            raise ConvertError(
                f"{path}: tensor {shown}: the header entry is not "
                f"{{dtype, shape, data_offsets}} ({_show(info)})"
            ) from None
        if dtype not in _ST_SIZES:
            raise ConvertError(f"{path}: tensor {shown}: unknown safetensors dtype {_show(dtype)}")
        if not b <= e or 8 + n + e > size:
            raise ConvertError(f"{path}: tensor {shown} lies past the end of the file (truncated?)")
        if e - b != math.prod(shape) * _ST_SIZES[dtype]:
            raise ConvertError(
                f"{path}: tensor {shown}: {e - b} bytes do not hold {dtype}{tuple(shape)}"
            )
        out[name] = (dtype, tuple(shape), 8 + n + b, 8 + n + e)
        spans.append((b, e, name))
    spans.sort()
    for (_, e1, n1), (b2, _, n2) in zip(spans, spans[1:]):
        if b2 < e1:
            raise ConvertError(f"{path}: tensors {_name(n1)} and {_name(n2)} overlap")
    return out


def _st_load(path, name, dtype, shape, begin):
    raw = np.fromfile(path, dtype=_ST_DTYPES[dtype], count=math.prod(shape), offset=begin).reshape(
        shape
    )
    if dtype == "BF16":  # numpy has no bfloat16: its bits are the top half of a float32
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw


def _hf_config(cfg_path, hc):
    """The header cfg and RoPE of a config.json, every value's type and range checked."""

    def get(key, default=KeyError, check=_int, **kw):
        v = hc.get(key)
        if v is None:
            if default is KeyError:
                raise ConvertError(f"{cfg_path}: {key} is missing")
            return default
        return check(cfg_path, key, v, **kw)

    def flag(key):
        v = hc.get(key)
        if v is not None and not isinstance(v, bool):
            raise ConvertError(f"{cfg_path}: {key} = {_show(v)} is not true or false")
        return bool(v)

    dim, n_layers = get("hidden_size"), get("num_hidden_layers")
    n_heads = get("num_attention_heads")
    n_kv = get("num_key_value_heads", n_heads)
    head_dim = get("head_dim", dim // n_heads)
    if head_dim == 0:
        raise ConvertError(f"{cfg_path}: hidden_size {dim} < num_attention_heads {n_heads}")
    hidden = get("intermediate_size")
    ctx = get("max_position_embeddings")
    eps = get("rms_norm_eps", 1e-6, _num)

    # RoPE: transformers 5 writes rope_parameters {rope_type, rope_theta, ...}, older
    # versions rope_theta and rope_scaling {type|rope_type, factor, ...}
    rp = hc.get("rope_parameters") or {}
    for key, v in (("rope_parameters", rp), ("rope_scaling", hc.get("rope_scaling") or {})):
        if not isinstance(v, dict):
            raise ConvertError(f"{cfg_path}: {key} = {_show(v)} is not an object")
    if any(isinstance(v, dict) for v in rp.values()):
        raise ConvertError("per-layer-type rope_parameters are not supported")
    theta = _num(cfg_path, "rope_theta", rp.get("rope_theta", hc.get("rope_theta", 10000.0)))
    scaling = hc.get("rope_scaling") or (rp if _rope_type(rp) else None)
    if _rope_type(scaling) is None:
        scaling = None
    else:
        scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
        scaling.setdefault("rope_type", scaling.get("type"))
        if _rope_type(scaling) == "llama3":
            scaling.setdefault("original_max_position_embeddings", ctx)
        for k, v in scaling.items():
            if k in (
                "factor",
                "low_freq_factor",
                "high_freq_factor",
                "original_max_position_embeddings",
            ):
                _num(cfg_path, f"rope_scaling.{k}", v)
    partial = rp.get("partial_rotary_factor", hc.get("partial_rotary_factor", 1.0))
    if _num(cfg_path, "partial_rotary_factor", partial) != 1.0:
        raise ConvertError("partial_rotary_factor != 1 is not supported")
    rope_freqs(theta, head_dim, scaling)  # unsupported scaling types fail here, before any work
    return (
        dict(
            dim=dim,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=n_kv,
            head_dim=head_dim,
            hidden_dim=hidden,
            max_seq_len=ctx,
            norm_eps=eps,
        ),
        theta,
        scaling,
        get,
        flag,
    )


def _read_hf(d):
    cfg_path = os.path.join(d, "config.json")
    if not _is_file(cfg_path):
        raise ConvertError(f"{d}: missing config.json (not a Hugging Face model directory)")
    hc = _json_file(cfg_path)
    archs = hc.get("architectures") or [hc.get("model_type")]
    arch_name = archs[0] if isinstance(archs, list) and archs else None
    if not isinstance(arch_name, str) or arch_name not in HF_ARCHS:
        raise ConvertError(
            f"unsupported architecture {_show(arch_name)} (supported: {', '.join(HF_ARCHS)})"
        )
    arch = HF_ARCHS[arch_name]
    if hc.get("hidden_act", "silu") != "silu":
        raise ConvertError(f"unsupported hidden_act {_show(hc.get('hidden_act'))} (only silu)")
    if arch in ("llama", "mistral") and hc.get("attention_bias"):
        raise ConvertError("attention_bias=true (an o_proj bias) is not supported")
    if hc.get("mlp_bias"):
        raise ConvertError("mlp_bias=true is not supported")
    cfg, theta, scaling, get, flag = _hf_config(cfg_path, hc)
    n_layers = cfg["n_layers"]

    window = 0
    if arch == "mistral":
        window = get("sliding_window", 0, lo=0)
    elif arch == "qwen2":
        types = hc.get("layer_types")
        if types is None and flag("use_sliding_window"):
            mwl = get("max_window_layers", n_layers, lo=0)
            types = ["sliding_attention" if i >= mwl else "full_attention" for i in range(n_layers)]
        if types is not None and (
            not isinstance(types, list) or not all(isinstance(t, str) for t in types)
        ):
            raise ConvertError(f"{cfg_path}: layer_types is not a list of strings")
        kinds = set(types or ["full_attention"])
        if kinds == {"sliding_attention"}:
            window = get("sliding_window", 0, lo=0)
        elif kinds != {"full_attention"}:
            raise ConvertError(
                f"mixed sliding-window and full-attention layers are not supported "
                f"({_show(sorted(kinds))})"
            )

    # weights
    index = os.path.join(d, "model.safetensors.index.json")
    read = [cfg_path]
    if _is_file(index):
        read.append(index)
        wm = _json_file(index).get("weight_map")
        if not isinstance(wm, dict) or not all(isinstance(x, str) for x in wm.values()):
            raise ConvertError(f"{index}: weight_map is not an object of file names")
        files = sorted(set(wm.values()))
        for x in files:
            if os.path.basename(x) != x or x in ("", ".", ".."):
                raise ConvertError(f"{index}: weight_map names {_show(x)}, not a file in {d}")
        files = [os.path.join(d, x) for x in files]
        for p in files:
            if not _is_file(p):
                raise ConvertError(
                    f"missing weights file {p} (listed in model.safetensors.index.json)"
                )
    else:
        files = sorted(
            os.path.join(d, x)
            for x in os.listdir(d)
            if x.endswith(".safetensors") and os.path.isfile(os.path.join(d, x))
        )
    if not files:
        other = [x for x in os.listdir(d) if x.endswith((".bin", ".pt", ".pth"))]
        raise ConvertError(
            f"{d}: no *.safetensors weights" + (f" ({other[0]} is not supported)" if other else "")
        )
    where = {}
    for p in files:
        for name, (dt, shape, b, _) in _st_header(p).items():
            if name in where:
                raise ConvertError(f"{p}: tensor {_name(name)} is also in {where[name][0]}")
            where[name] = (p, dt, shape, b)
    shapes = {n: w[2] for n, w in where.items()}

    tied = flag("tie_word_embeddings") or "lm_head.weight" not in where
    qkv_bias = arch == "qwen2"
    if "model.embed_tokens.weight" not in shapes or len(shapes["model.embed_tokens.weight"]) != 2:
        raise ConvertError(f"{d}: missing tensor model.embed_tokens.weight (a matrix)")
    vocab = _int(d, "the rows of model.embed_tokens.weight", shapes["model.embed_tokens.weight"][0])

    m = _Model()
    m.source_format = "hf"
    m.inputs = [cfg_path] + files
    m.cfg = dict(
        cfg,
        vocab_size=vocab,
        sliding_window=window,
        flags=(FLAG_TIED_OUTPUT if tied else 0) | (FLAG_QKV_BIAS if qkv_bias else 0),
    )
    m.cfg = {k: m.cfg[k] for k in format.HEADER_INTS + ("norm_eps",)}
    _check_cfg(cfg_path, m.cfg)
    ignored = {n for n in shapes if n.endswith("rotary_emb.inv_freq")} | (
        {"lm_head.weight"} if tied else set()
    )
    names = _source_names(d, m.cfg, HF_NAMES, shapes, _groups(m.cfg), ignored)
    for n in names.values():
        if where[n][1] not in _ST_DTYPES:
            raise ConvertError(
                f"tensor {n}: unsupported safetensors dtype {where[n][1]} "
                "(supported: F32, F16, BF16)"
            )

    def src(key, i=None):
        p, dt, shape, b = where[names[key, i]]
        return _st_load(p, names[key, i], dt, shape, b)

    m.load = _fused_loaders(m.cfg, src, lambda: rope_freqs(theta, cfg["head_dim"], scaling))
    name = hc.get("_name_or_path")
    m.config = {
        "architecture": arch,
        "hf_architecture": arch_name,
        "name": name if isinstance(name, str) and name else os.path.basename(os.path.abspath(d)),
        "rope_theta": theta,
        "rope_scaling": scaling,
        "context_length": cfg["max_seq_len"],
    }
    tok, template, tok_files, template_key = _hf_tokenizer(d, hc)
    m.tokenizer = _pad_vocab(tok, vocab, os.path.join(d, "tokenizer.json"))
    m.chat_template = template
    m.template_key = template_key
    m.tok_files = read[1:] + tok_files
    return m


def _flatten(node, key):
    """A tokenizer.json component as a list (a Sequence's members, or itself)."""
    if not isinstance(node, dict):
        return []
    if node.get("type") == "Sequence":
        subs = node.get(key)
        return [x for sub in (subs if isinstance(subs, list) else []) for x in _flatten(sub, key)]
    return [node]


def _detect_pre(pre_tokenizer):
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer.json pre_tokenizer."""
    parts = _flatten(pre_tokenizer, "pretokenizers")
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt2"
    if (
        kinds == ["Digits", "ByteLevel"]
        and parts[0].get("individual_digits")
        and parts[1].get("use_regex", True)
    ):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        pattern = parts[0].get("pattern")
        rx = pattern.get("Regex") if isinstance(pattern, dict) else None
        if rx == LLAMA3_REGEX:
            return "llama3"
        if rx == QWEN2_REGEX:
            return "qwen2"
    raise ConvertError(f"unsupported pre-tokenizer {_show(pre_tokenizer)}")


def _token_id(value, to_id):
    if isinstance(value, dict):
        value = value.get("content")
    return to_id.get(value) if isinstance(value, str) else None


def _hf_vocab(path, model, added):
    """tokens, types from tokenizer.json's model.vocab and added_tokens: every id an int in
    0..LIMIT-1, every token a string, no id given to two different tokens."""
    vocab = model.get("vocab") or {}
    if not isinstance(vocab, dict):
        raise ConvertError(f"{path}: model.vocab is not an object")
    if not isinstance(added, list) or not all(isinstance(a, dict) for a in added):
        raise ConvertError(f"{path}: added_tokens is not a list of objects")
    by_id = {}
    for t, i in vocab.items():
        i = _int(path, f"model.vocab[{_show(t)}]", i, 0)
        if i in by_id:
            raise ConvertError(
                f"{path}: model.vocab gives id {i} to both {_show(by_id[i])} and {_show(t)}"
            )
        by_id[i] = t
    special = {}
    for k, a in enumerate(added):
        i = _int(path, f"added_tokens[{k}].id", a.get("id"), 0)
        t = a.get("content")
        if not isinstance(t, str):
            raise ConvertError(f"{path}: added_tokens[{k}].content = {_show(t)} is not a string")
        if by_id.get(i, t) != t:
            raise ConvertError(
                f"{path}: added_tokens[{k}] gives id {i} to {_show(t)}, already {_show(by_id[i])}"
            )
        by_id[i] = t
        special[i] = bool(a.get("special"))
    n = max(by_id, default=-1) + 1
    tokens, types = [None] * n, [NORMAL] * n
    for i, t in by_id.items():
        tokens[i] = t
    for i, s in special.items():
        types[i] = CONTROL if s else USER_DEFINED
    for i, t in enumerate(tokens):
        if t is None:  # a hole in the ids
            tokens[i], types[i] = f"[PAD{i}]", UNUSED
    return tokens, types


def _hf_tokenizer(d, hc):
    """meta["tokenizer"] (GGUF tokenizer.ggml.* keys without the prefix) from tokenizer.json;
    the chat template, the files read, and where the template came from."""
    path = os.path.join(d, "tokenizer.json")
    if not _is_file(path):
        spm_model = os.path.exists(os.path.join(d, "tokenizer.model"))
        extra = " (tokenizer.model alone is not supported)" if spm_model else ""
        raise ConvertError(f"{d}: missing tokenizer.json{extra}")
    files = [path]
    tj = _json_file(path, TOKENIZER_LIMIT)
    tc_path = os.path.join(d, "tokenizer_config.json")
    tc = {}
    if _is_file(tc_path):
        files.append(tc_path)
        tc = _json_file(tc_path)
    model = tj.get("model") or {}
    if not isinstance(model, dict) or model.get("type") != "BPE":
        t = model.get("type") if isinstance(model, dict) else model
        raise ConvertError(
            f"unsupported tokenizer model type {_show(t)} in tokenizer.json (only BPE)"
        )
    spm = bool(model.get("byte_fallback"))
    tokens, types = _hf_vocab(path, model, tj.get("added_tokens") or [])
    n = len(tokens)
    to_id = {}
    for i, t in enumerate(tokens):
        to_id.setdefault(t, i)

    merges, pairs = [], []
    raw_merges = model.get("merges") or []
    if not isinstance(raw_merges, list):
        raise ConvertError(f"{path}: model.merges is not a list")
    for k, mg in enumerate(raw_merges):
        if isinstance(mg, str) and " " in mg:
            a, b = mg.split(" ", 1)
        elif isinstance(mg, list) and len(mg) == 2 and all(isinstance(x, str) for x in mg):
            a, b = mg
        else:
            raise ConvertError(f"{path}: model.merges[{k}] = {_show(mg)} is not a pair of tokens")
        pairs.append((a, b))
        merges.append(f"{a} {b}" if " " not in a and " " not in b else [a, b])

    tok = {"model": "llama" if spm else "gpt2", "tokens": tokens, "token_type": types}
    if spm:
        if _token_id(model.get("unk_token"), to_id) is not None:
            types[to_id[model["unk_token"]]] = UNKNOWN
        for i, t in enumerate(tokens):
            if types[i] == NORMAL and _BYTE_TOKEN.match(t):
                types[i] = BYTE
        # score: -(rank of the first merge that makes the token); tokens no merge makes
        # (single characters, bytes, specials, added tokens) -1e9. The SentencePiece-style
        # tokenizer merges the pair whose merged token scores highest, i.e. the earliest merge.
        scores = [-1e9] * n
        for r, (a, b) in enumerate(pairs):
            i = to_id.get(a + b)
            if i is not None and scores[i] == -1e9 and types[i] == NORMAL:
                scores[i] = -float(r)
        tok["scores"] = scores
        norm = _flatten(tj.get("normalizer"), "normalizers")
        pre = _flatten(tj.get("pre_tokenizer"), "pretokenizers")
        prefix = any(
            x.get("type") == "Prepend" and x.get("prepend") == "\u2581" for x in norm
        ) or any(
            x.get("type") == "Metaspace"
            and (x.get("prepend_scheme") in ("first", "always") or x.get("add_prefix_space"))
            for x in pre
        )
        tok["add_space_prefix"] = bool(prefix)
    else:
        tok["pre"] = _detect_pre(tj.get("pre_tokenizer"))
        tok["add_space_prefix"] = False
    tok["merges"] = merges

    # special tokens: tokenizer_config.json's *_token, else config.json's *_token_id
    for typ, key in (
        ("bos", "bos_token_id"),
        ("eos", "eos_token_id"),
        ("unk", "unknown_token_id"),
        ("pad", "padding_token_id"),
    ):
        i = _token_id(tc.get(f"{typ}_token"), to_id)
        if i is None:
            v = hc.get(f"{typ}_token_id")
            if isinstance(v, list):
                v = v[0] if v else None
            i = v if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < n else None
        if i is None and typ == "unk" and spm:
            i = _token_id(model.get("unk_token"), to_id)
        if i is not None:
            tok[key] = i
    _add_turn_ids(tok)

    # add BOS/EOS: tokenizer_config.json says, else the post-processor's template does
    single = []
    for p in _flatten(tj.get("post_processor"), "processors"):
        if p.get("type") == "TemplateProcessing":
            single = p.get("single") or []
    single = single if isinstance(single, list) and all(isinstance(x, dict) for x in single) else []
    first = single[0].get("SpecialToken") if single else None
    last = single[-1].get("SpecialToken") if single else None
    first = first if isinstance(first, dict) else None
    add_bos, add_eos = tc.get("add_bos_token"), tc.get("add_eos_token")
    tok["add_bos_token"] = add_bos if isinstance(add_bos, bool) else bool(first)
    tok["add_eos_token"] = add_eos if isinstance(add_eos, bool) else bool(last)
    if (
        tok["add_bos_token"]
        and "bos_token_id" not in tok
        and first
        and _token_id(first.get("id"), to_id) is not None
    ):
        tok["bos_token_id"] = to_id[first["id"]]

    template, key = tc.get("chat_template"), f"{tc_path}: chat_template"
    if isinstance(template, list):  # named templates: the default one
        template = next(
            (
                t.get("template")
                for t in template
                if isinstance(t, dict) and t.get("name") == "default"
            ),
            None,
        )
    if template is None:
        jinja = os.path.join(d, "chat_template.jinja")
        cj = os.path.join(d, "chat_template.json")
        if _is_file(jinja):
            files.append(jinja)
            key = jinja
            try:
                template = outfile.read_regular(jinja, JSON_LIMIT, "chat template").decode("utf-8")
            except (outfile.OutputError, UnicodeDecodeError) as e:
                raise ConvertError(f"{jinja}: cannot read the chat template ({_msg(e)})") from None
        elif _is_file(cj):
            files.append(cj)
            template, key = _json_file(cj).get("chat_template"), f"{cj}: chat_template"
    if template is not None and not isinstance(template, str):
        raise ConvertError(f"{key} is not a string")
    return tok, template, files, key


# --- llama2.c -----------------------------------------------------------------------------
# run.c's Config: dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size (negative: the
# classifier is not shared with the embedding), seq_len; then float32 weights in the order of
# export.py's legacy_export (= run.c's memory_map_weights).
_L2C_HEADER = struct.Struct("<7i")
_L2C_MAGIC = 0x616B3432  # "ak42": the header of llama2.c's newer (version 1, 2) exports
L2C_EPS, L2C_THETA = 1e-5, 10000.0  # hard-coded in run.c


def _llama2c_header(path, size):
    """The header as a dict (with the size it implies) if a plausible llama2.c one, else None."""
    try:
        with open(path, "rb") as f:
            head = f.read(_L2C_HEADER.size)
    except OSError:
        return None
    if len(head) < _L2C_HEADER.size:
        return None
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq = _L2C_HEADER.unpack(head)
    if not all(
        0 < v < format.LIMIT for v in (dim, hidden, n_layers, n_heads, n_kv, abs(vocab), seq)
    ):
        return None
    if dim % n_heads or n_heads % n_kv or (dim // n_heads) % 2:
        return None
    hs = dim // n_heads
    kv_dim = n_kv * hs
    L, V = n_layers, abs(vocab)
    floats = (
        V * dim
        + L * dim
        + L * dim * dim
        + 2 * L * dim * kv_dim
        + L * dim * dim
        + L * dim
        + 3 * L * dim * hidden
        + dim
        + 2 * (seq * hs // 2)
        + (V * dim if vocab < 0 else 0)
    )
    return {
        "dim": dim,
        "hidden": hidden,
        "n_layers": L,
        "n_heads": n_heads,
        "n_kv": n_kv,
        "vocab": V,
        "shared": vocab > 0,
        "seq_len": seq,
        "head_dim": hs,
        "expected_size": _L2C_HEADER.size + 4 * floats,
        "size": size,
    }


def _llama2c_tokenizer(path, vocab):
    """meta["tokenizer"] from a llama2.c tokenizer.bin: int32 max_token_length, then per token
    float32 score, int32 length, UTF-8 bytes. llama2.c's tokenizer.py export wrote each
    SentencePiece piece with its "▁" replaced by a space, and BOS/EOS as <s>/</s> between two
    newlines; both are undone. <unk> is UNKNOWN, <s>/</s> CONTROL, <0xNN> BYTE (as in Llama 2).
    run.c reads exactly the model's vocab_size tokens; a file holding more or fewer is refused."""
    try:
        data = outfile.read_regular(path, TOKENIZER_LIMIT, "tokenizer.bin")
    except outfile.OutputError as e:
        raise ConvertError(str(e)) from None
    if len(data) < 4:
        raise ConvertError(f"{path}: not a llama2.c tokenizer.bin (only {len(data)} bytes)")
    pos, tokens, scores, types = 4, [], [], []
    for i in range(vocab):
        if pos + 8 > len(data):
            raise ConvertError(
                f"{path}: holds {i} tokens, the model's vocabulary has {vocab} "
                f"(truncated, or the tokenizer of another model?)"
            )
        score, n = struct.unpack_from("<fi", data, pos)
        pos += 8
        if n < 0 or pos + n > len(data):
            raise ConvertError(
                f"{path}: token {i} has a bad length {n} (truncated or not a tokenizer.bin?)"
            )
        try:
            t = data[pos : pos + n].decode("utf-8")
        except UnicodeDecodeError:
            raise ConvertError(f"{path}: token {i} is not valid UTF-8") from None
        pos += n
        if not math.isfinite(score):
            raise ConvertError(f"{path}: token {i} has a non-finite score {score}")
        if t in ("\n<s>\n", "\n</s>\n"):
            t, ty = t.strip("\n"), CONTROL
        elif t == "<unk>":
            ty = UNKNOWN
        elif _BYTE_TOKEN.match(t):
            ty = BYTE
        else:
            t, ty = t.replace(" ", "\u2581"), NORMAL
        tokens.append(t)
        scores.append(score)
        types.append(ty)
    if pos != len(data):
        raise ConvertError(
            f"{path}: holds more than the model's {vocab} tokens (the tokenizer of "
            f"another model? give the right one with --tokenizer)"
        )
    # run.c: BOS 1, EOS 2 and the byte tokens at 3..258 are fixed ids; a dummy-prefix space
    tok = {
        "model": "llama",
        "tokens": tokens,
        "scores": scores,
        "token_type": types,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "add_bos_token": True,
        "add_eos_token": False,
        "add_space_prefix": True,
    }
    if "<unk>" in tokens:
        tok["unknown_token_id"] = tokens.index("<unk>")
    _add_turn_ids(tok)
    return tok


def _read_llama2c(path, h, tok_path):
    dim, hidden, L, nh, nkv, V, hs = (
        h[k] for k in ("dim", "hidden", "n_layers", "n_heads", "n_kv", "vocab", "head_dim")
    )
    if tok_path is None:
        tok_path = os.path.join(os.path.dirname(os.path.abspath(path)), "tokenizer.bin")
        if not _is_file(tok_path):
            raise ConvertError(
                f"{path} is a llama2.c checkpoint but {tok_path} does not exist "
                f"(give its tokenizer.bin with --tokenizer PATH)"
            )
    elif not _is_file(tok_path):
        raise ConvertError(f"{tok_path}: no such file")
    tok = _llama2c_tokenizer(tok_path, V)

    raw = np.memmap(
        path,
        dtype="<f4",
        mode="r",
        offset=_L2C_HEADER.size,
        shape=((h["expected_size"] - _L2C_HEADER.size) // 4,),
    )
    pos = 0

    def take(*shape):
        nonlocal pos
        n = int(np.prod(shape))
        a = raw[pos : pos + n].reshape(shape)
        pos += n
        return a

    emb, rms_att = take(V, dim), take(L, dim)
    wq, wk, wv = take(L, nh * hs, dim), take(L, nkv * hs, dim), take(L, nkv * hs, dim)
    wo, rms_ffn = take(L, dim, nh * hs), take(L, dim)
    w1, w2, w3 = take(L, hidden, dim), take(L, dim, hidden), take(L, hidden, dim)
    rms_final = take(dim)
    take(2 * (h["seq_len"] * hs // 2))  # freq_cis_real, freq_cis_imag: run.c ignores them
    wcls = None if h["shared"] else take(V, dim)
    assert pos == raw.shape[0]

    m = _Model()
    m.source_format = "llama2c"
    m.inputs = [path, tok_path]
    m.cfg = dict(
        dim=dim,
        n_layers=L,
        n_heads=nh,
        n_kv_heads=nkv,
        head_dim=hs,
        hidden_dim=hidden,
        vocab_size=V,
        max_seq_len=h["seq_len"],
        flags=FLAG_TIED_OUTPUT if h["shared"] else 0,
        sliding_window=0,
        norm_eps=L2C_EPS,
    )
    per_layer = {
        "attn_norm": rms_att,
        "attn_q": wq,
        "attn_k": wk,
        "attn_v": wv,
        "attn_out": wo,
        "ffn_norm": rms_ffn,
        "ffn_gate": w1,
        "ffn_up": w3,
        "ffn_down": w2,
    }  # w2(silu(w1 x) * w3 x)
    whole = {"tok_embd": emb, "output_norm": rms_final, "output": wcls}
    # run.c rotates adjacent pairs (2j, 2j+1) of each head: Meta's layout, as llama.cpp's GGUF
    m.load = _fused_loaders(
        m.cfg,
        lambda key, i=None: whole[key] if i is None else per_layer[key][i],
        lambda: rope_freqs(L2C_THETA, hs),
        interleaved=True,
    )
    m.config = {
        "architecture": "llama",
        "name": os.path.splitext(os.path.basename(path))[0],
        "rope_theta": L2C_THETA,
        "rope_scaling": None,
        "context_length": h["seq_len"],
    }
    m.tokenizer = tok
    return m


# --- the conversion --------------------------------------------------------------------------
def _inputs_of(src):
    """("gguf" | "hf" | "llama2c", the GGUF file, the model directory or the checkpoint)."""
    try:
        st = os.stat(src)
    except FileNotFoundError:
        raise ConvertError(f"{src}: no such file or directory") from None
    except OSError as e:
        raise ConvertError(f"{src}: {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        return "hf", src
    if not stat.S_ISREG(st.st_mode):
        raise ConvertError(f"{src}: not a regular file or a directory")
    if os.path.basename(src) == "config.json" or src.endswith(".safetensors"):
        return "hf", os.path.dirname(os.path.abspath(src))
    try:
        with open(src, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ConvertError(f"{src}: {e.strerror or e}") from None
    if magic == b"GGUF":
        return "gguf", src
    if len(magic) == 4 and struct.unpack("<I", magic)[0] == _L2C_MAGIC:
        raise ConvertError(
            f"{src}: a llama2.c version 1/2 export; only the legacy version 0 format is "
            f"supported (llama2.c's export.py --version 0)"
        )
    size = st.st_size
    h = _llama2c_header(src, size)
    if h is not None and h["expected_size"] == size:
        return "llama2c", (src, h)
    hint = (
        f" (read as a llama2.c checkpoint its header implies {h['expected_size']} bytes, "
        f"the file has "
        f"{size})"
        if h is not None
        else ""
    )
    raise ConvertError(
        f"{src}: neither a GGUF file, a llama2.c checkpoint nor a Hugging Face model "
        f"directory{hint}"
    )


def _check_loadable(src, m, meta):
    """What pyllm.load and pyllm chat will do with the metadata, done before writing, so that
    a conversion that succeeds gives a file that loads."""
    from .chat import ChatError, Template
    from .tokenizer import Tokenizer

    try:
        tok = Tokenizer(m.tokenizer)
        tok.decode(tok.encode("Hello, world! 12345 \u00e9\u4e16 \n\n"))
    except Exception as e:  # ValueError, TypeError, KeyError: the tokenizer's own refusals
        raise ConvertError(
            f"{src}: the tokenizer would not load ({type(e).__name__}: {_msg(e)})"
        ) from None
    if m.chat_template is not None:
        try:
            Template(m.chat_template)
        except ChatError as e:
            raise ConvertError(f"{m.template_key}: {e}") from None
    try:
        json.dumps(meta, ensure_ascii=False).encode("utf-8")
    except (UnicodeEncodeError, ValueError, TypeError) as e:
        raise ConvertError(
            f"{src}: the metadata cannot be written as UTF-8 JSON ({type(e).__name__}: "
            f"{str(e)[:120]}; a lone surrogate in a token or the template?)"
        ) from None


def convert(src, out, progress=True, tokenizer=None):
    """Convert SRC (a .gguf file, a Hugging Face directory or a llama2.c checkpoint) into the
    pyllm file OUT. tokenizer: a llama2.c checkpoint's tokenizer.bin (default: the one next to it).
    SIGTERM and SIGHUP end it with a ConvertError (and no OUT), as Ctrl-C does with
    KeyboardInterrupt."""
    try:
        with outfile.signals_raise():
            return _convert(src, out, progress, tokenizer)
    except KeyboardInterrupt:
        if outfile.committed(out):
            raise ConvertError(
                f"interrupted just after {os.fspath(out)} was written (it is complete)"
            ) from None
        raise
    except outfile.Interrupted as e:
        if outfile.committed(out):
            raise ConvertError(
                f"{e} just after {os.fspath(out)} was written (it is complete)"
            ) from None
        raise ConvertError(f"{e}; {os.fspath(out)} was not written") from None


def _convert(src, out, progress, tokenizer):
    t0 = time.time()
    src, out = os.fspath(src), os.fspath(out)
    kind, where = _inputs_of(src)
    if tokenizer is not None and kind != "llama2c":
        raise ConvertError("a separate tokenizer file is only used with llama2.c checkpoints")
    try:
        outfile.check_output(out, [src] if kind != "hf" else [])
    except outfile.OutputError as e:
        raise ConvertError(
            str(e).replace("the input file", "its input", 1) if kind != "hf" else str(e)
        ) from None

    if kind == "llama2c":
        m = _read_llama2c(where[0], where[1], None if tokenizer is None else os.fspath(tokenizer))
    else:
        m = _read_gguf(where) if kind == "gguf" else _read_hf(where)
    inputs = m.inputs + m.tok_files
    try:
        outfile.check_output(out, inputs)
    except outfile.OutputError as e:
        raise ConvertError(str(e)) from None

    specs = {}
    for tname, shape, dtype in format.tensor_layout(m.cfg):
        fn = m.load[tname]
        conv = (
            (lambda a: np.asarray(a, dtype=np.float32))
            if dtype == "f32"
            else (lambda a, tname=tname: _f16(tname, a))
        )
        specs[tname] = TensorSpec(tname, shape, dtype, load=lambda fn=fn, conv=conv: conv(fn()))

    name = os.path.basename(os.path.abspath(src))
    provenance = {
        "source": name,
        "source_format": m.source_format,
        "sha256": _sha256(m.inputs),
        "converter": f"pyllm {__version__}",
        "converted_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if m.source_format in ("hf", "llama2c"):
        provenance["sha256_of"] = [os.path.basename(p) for p in m.inputs]
    meta = {
        "config": m.config,
        "tokenizer": m.tokenizer,
        "chat_template": m.chat_template,
        "provenance": provenance,
    }
    _check_loadable(src, m, meta)

    from tqdm import tqdm

    with tqdm(
        total=sum(s.nbytes for s in specs.values()),
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        disable=not progress,
        desc=f"converting {name}",
        dynamic_ncols=True,
    ) as bar:
        try:
            size = format.write(
                out, m.cfg, meta, specs, progress=lambda s: bar.update(s.nbytes), inputs=inputs
            )
        except (format.FormatError, outfile.OutputError) as e:
            raise ConvertError(str(e)) from None
        except OSError as e:
            raise ConvertError(f"writing {out}: {e.strerror or e}") from e
    return {
        "out": out,
        "tensors": len(specs),
        "parameters": int(sum(np.prod(s.shape) for s in specs.values())),
        "file_size": size,
        "seconds": time.time() - t0,
        "source_format": m.source_format,
        "architecture": m.config["architecture"],
    }
