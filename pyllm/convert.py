"""Convert a GGUF file, a Hugging Face directory or a llama2.c checkpoint into a pyllm parameters file.

    convert(src, out, progress=True, tokenizer=None) -> {"tensors", "parameters", "file_size", "seconds", ...}

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
import struct
import sys
import time

import numpy as np

from . import __version__, format
from .format import FLAG_QKV_BIAS, FLAG_TIED_OUTPUT, TensorSpec

__all__ = ["convert", "ConvertError"]

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
HF_ARCHS = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
GGUF_ARCHS = ("llama", "qwen2")
# tokens that end a turn in chat models: written as eot/eom_token_id when the vocabulary has them
EOT_TOKENS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endofturn|>")
EOM_TOKENS = ("<|eom_id|>",)
# pre-tokenizer regexes as tokenizer.json spells them
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>\Z")


class ConvertError(Exception):
    """The source cannot be converted; the message is one line naming why."""


# --- small helpers ---------------------------------------------------------------------------
def _f16(name, a):
    """a as float16 (any float array; no copy if it is float16); refuses values float16 cannot hold."""
    b = np.asarray(a, dtype=np.float16)  # a copy only if a is not float16 already
    if not np.isfinite(b).all():
        bad = np.asarray(a, dtype=np.float32)
        raise ConvertError(f"tensor {name}: values do not fit float16 "
                           f"(max |x| = {float(np.nanmax(np.abs(bad))):.4g}, or NaN/inf in the source)")
    return b


def _drop_mapped_pages(memmap):
    """Drop a read-only file mapping's pages from this process's resident set (they stay in the
    page cache): a big source read tensor by tensor then costs one tensor's memory, not the file's."""
    mm = getattr(memmap, "_mmap", None)
    if mm is not None and hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        mm.madvise(mmap.MADV_DONTNEED)


def _unpermute(w, n_head):
    """Undo llama.cpp's Q/K row permutation: within each head, GGUF row 2j+s holds the
    Hugging Face row s*(head_dim/2)+j (s = 0, 1). Works on weights (rows, cols) and biases."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


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
        raise ConvertError(f"unsupported rope scaling type {kind!r} (supported: linear, llama3)")
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


def _pad_vocab(tok, rows):
    """Make the token lists as long as the embedding (llama.cpp's [PAD{i}] unused tokens)."""
    n = len(tok["tokens"])
    if n > rows:
        raise ConvertError(f"the tokenizer has {n} tokens but the embedding only {rows} rows")
    if n < rows:
        tok["tokens"] = tok["tokens"] + [f"[PAD{i}]" for i in range(n, rows)]
        if tok.get("token_type") is not None:
            tok["token_type"] = list(tok["token_type"]) + [UNUSED] * (rows - n)
        if tok.get("scores") is not None:
            tok["scores"] = list(tok["scores"]) + [-1e9] * (rows - n)
    return tok


def _check_shapes(expect, shapes):
    for name, shape in expect.items():
        if name not in shapes:
            raise ConvertError(f"missing tensor {name}")
        if tuple(shapes[name]) != tuple(shape):
            raise ConvertError(f"tensor {name} has shape {tuple(shapes[name])}, expected {tuple(shape)}")


class _Model:
    """What a reader produces: header cfg, metadata and lazy source tensors."""

    def __init__(self):
        self.cfg = {}            # header ints + norm_eps
        self.config = {}         # meta["config"]
        self.tokenizer = {}
        self.chat_template = None
        self.load = {}           # our tensor name -> callable returning a float array
        self.inputs = []         # files hashed for provenance
        self.tok_files = []      # other files read (tokenizer, chat template)
        self.source_format = None


# --- GGUF ----------------------------------------------------------------------------------
def _read_gguf(path):
    import gguf
    from gguf import GGMLQuantizationType as QT

    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as e:  # gguf raises ValueError/struct errors on a damaged file
        raise ConvertError(f"{path}: not a readable GGUF file ({e})") from None
    fields = {}
    for k, f in reader.fields.items():
        if not k.startswith("GGUF."):
            try:
                fields[k] = f.contents()
            except Exception as e:
                raise ConvertError(f"{path}: cannot read GGUF key {k} ({e})") from None
    arch = fields.get("general.architecture")
    if arch not in GGUF_ARCHS:
        raise ConvertError(f"unsupported GGUF architecture {arch!r} (supported: {', '.join(GGUF_ARCHS)})")

    traits = getattr(gguf.quants, "_type_traits", None)  # the types gguf-py can dequantize
    supported = {QT.F32, QT.F16} | set(traits or ())
    for t in reader.tensors:
        if traits is not None and t.tensor_type not in supported:
            raise ConvertError(f"tensor {t.name}: unsupported GGUF tensor type {t.tensor_type.name}")

    def kv(key, default=KeyError):
        v = fields.get(f"{arch}.{key}", default)
        if v is KeyError:
            raise ConvertError(f"{path}: GGUF key {arch}.{key} is missing")
        if isinstance(v, list):
            raise ConvertError(f"{path}: GGUF key {arch}.{key} is per-layer ({v[:4]}...), not supported")
        return v

    dim, n_layers = int(kv("embedding_length")), int(kv("block_count"))
    n_heads = int(kv("attention.head_count"))
    n_kv = int(kv("attention.head_count_kv", n_heads))
    head_dim = int(kv("attention.key_length", dim // n_heads if n_heads else 0))
    if int(kv("attention.value_length", head_dim)) != head_dim:
        raise ConvertError(f"{path}: key_length != value_length is not supported")
    rope_dim = int(kv("rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ConvertError(f"partial rotary embeddings (rope.dimension_count {rope_dim} < head_dim "
                           f"{head_dim}) are not supported")
    hidden = int(kv("feed_forward_length"))
    theta = float(kv("rope.freq_base", 10000.0))
    ctx = int(kv("context_length"))
    eps = float(kv("attention.layer_norm_rms_epsilon"))
    window = int(kv("attention.sliding_window", 0) or 0)

    tensors = {t.name: t for t in reader.tensors}
    shapes = {n: tuple(int(x) for x in reversed(t.shape.tolist())) for n, t in tensors.items()}
    if "token_embd.weight" not in shapes:
        raise ConvertError("missing tensor token_embd.weight")
    vocab = shapes["token_embd.weight"][0]
    tied = "output.weight" not in tensors
    qkv_bias = "blk.0.attn_q.bias" in tensors
    expect = {"token_embd.weight": (vocab, dim), "output_norm.weight": (dim,)}
    if not tied:
        expect["output.weight"] = (vocab, dim)
    for i in range(n_layers):
        p = f"blk.{i}."
        expect.update({p + "attn_norm.weight": (dim,), p + "attn_q.weight": (n_heads * head_dim, dim),
                       p + "attn_k.weight": (n_kv * head_dim, dim), p + "attn_v.weight": (n_kv * head_dim, dim),
                       p + "attn_output.weight": (dim, n_heads * head_dim), p + "ffn_norm.weight": (dim,),
                       p + "ffn_gate.weight": (hidden, dim), p + "ffn_up.weight": (hidden, dim),
                       p + "ffn_down.weight": (dim, hidden)})
        if qkv_bias:
            expect.update({p + "attn_q.bias": (n_heads * head_dim,), p + "attn_k.bias": (n_kv * head_dim,),
                           p + "attn_v.bias": (n_kv * head_dim,)})
    if "rope_freqs.weight" in tensors:
        expect["rope_freqs.weight"] = (head_dim // 2,)
    extra = sorted(set(tensors) - set(expect))
    if extra:
        raise ConvertError(f"unsupported tensor {extra[0]} in the GGUF file ({len(extra)} not understood)")
    _check_shapes(expect, shapes)

    def deq(name):
        t = tensors[name]
        try:  # F16 as it is (a copy; dequantize would double it as f32)
            a = np.array(t.data.view(np.float16)) if t.tensor_type == QT.F16 else \
                np.array(gguf.quants.dequantize(t.data, t.tensor_type))
        except NotImplementedError:
            raise ConvertError(f"tensor {name}: unsupported GGUF tensor type {t.tensor_type.name}") from None
        _drop_mapped_pages(reader.data)
        return a.reshape(shapes[name])

    permute = arch == "llama"  # llama.cpp's convert permutes Q/K only for NORM-rope architectures

    def qk(name, heads):
        a = deq(name)
        return _unpermute(a, heads) if permute else a

    m = _Model()
    m.source_format, m.inputs = "gguf", [path]
    m.cfg = dict(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim,
                 hidden_dim=hidden, vocab_size=vocab, max_seq_len=ctx,
                 flags=(FLAG_TIED_OUTPUT if tied else 0) | (FLAG_QKV_BIAS if qkv_bias else 0),
                 sliding_window=window, norm_eps=eps)

    # RoPE: llama.cpp divides each base frequency by rope_freqs.weight (Llama 3 factors),
    # and multiplies positions by 1/factor for linear scaling
    scaling = None
    stype = fields.get(f"{arch}.rope.scaling.type")
    if stype not in (None, "none"):
        factor = fields.get(f"{arch}.rope.scaling.factor")
        if stype != "linear" or not factor:
            raise ConvertError(f"unsupported rope scaling type {stype!r} (supported: linear, llama3)")
        scaling = {"rope_type": "linear", "factor": float(factor)}
    elif fields.get(f"{arch}.rope.scale_linear"):
        scaling = {"rope_type": "linear", "factor": float(fields[f"{arch}.rope.scale_linear"])}
    if "rope_freqs.weight" in tensors:
        if scaling:
            raise ConvertError("a rope_freqs.weight tensor together with linear rope scaling is not supported")
        scaling = {"rope_type": "llama3", "freq_factors": "rope_freqs.weight"}
        orig = fields.get(f"{arch}.rope.scaling.original_context_length")
        if orig:
            scaling["original_max_position_embeddings"] = int(orig)

    def rope():
        inv = rope_freqs(theta, head_dim, scaling if scaling and scaling["rope_type"] == "linear" else None)
        if "rope_freqs.weight" in tensors:
            factors = deq("rope_freqs.weight").astype(np.float64)
            if not (np.isfinite(factors).all() and (factors > 0).all()):
                raise ConvertError("rope_freqs.weight holds non-positive or non-finite factors")
            inv = (inv.astype(np.float64) / factors).astype(np.float32)
        return inv

    L = m.load
    L["tok_embd"] = lambda: deq("token_embd.weight")
    L["rope_freqs"] = rope
    L["output_norm"] = lambda: deq("output_norm.weight")
    if not tied:
        L["output"] = lambda: deq("output.weight")
    for i in range(n_layers):
        p = f"blk.{i}."  # the same prefix in GGUF and in our names
        L[p + "attn_norm"] = lambda p=p: deq(p + "attn_norm.weight")
        L[p + "attn_qkv"] = lambda p=p: np.concatenate(
            [qk(p + "attn_q.weight", n_heads), qk(p + "attn_k.weight", n_kv), deq(p + "attn_v.weight")])
        if qkv_bias:
            L[p + "attn_qkv_bias"] = lambda p=p: np.concatenate(
                [qk(p + "attn_q.bias", n_heads), qk(p + "attn_k.bias", n_kv), deq(p + "attn_v.bias")])
        L[p + "attn_out"] = lambda p=p: deq(p + "attn_output.weight")
        L[p + "ffn_norm"] = lambda p=p: deq(p + "ffn_norm.weight")
        L[p + "ffn_gate_up"] = lambda p=p: np.concatenate([deq(p + "ffn_gate.weight"), deq(p + "ffn_up.weight")])
        L[p + "ffn_down"] = lambda p=p: deq(p + "ffn_down.weight")

    ftype = fields.get("general.file_type")
    try:
        ftype = gguf.LlamaFileType(ftype).name if ftype is not None else None
    except ValueError:
        pass
    m.config = {"architecture": arch, "name": fields.get("general.name") or os.path.basename(path),
                "rope_theta": theta, "rope_scaling": scaling, "context_length": ctx}
    m.config.update({k.split(".", 1)[1]: v for k, v in fields.items()
                     if k in ("general.basename", "general.organization", "general.finetune",
                              "general.size_label", "general.license")})
    if ftype is not None:
        m.config["gguf_file_type"] = ftype

    tok = {k[len("tokenizer.ggml."):]: v for k, v in fields.items() if k.startswith("tokenizer.ggml.")}
    if tok.get("model") not in ("gpt2", "llama"):
        raise ConvertError(f"unsupported tokenizer model {tok.get('model')!r} (supported: gpt2, llama)")
    if not tok.get("tokens"):
        raise ConvertError(f"{path}: the GGUF file has no tokenizer.ggml.tokens")
    _add_turn_ids(tok)
    m.tokenizer = _pad_vocab(tok, vocab)
    m.chat_template = fields.get("tokenizer.chat_template")
    return m


def _add_turn_ids(tok):
    """eot/eom_token_id from the vocabulary when the source does not say (llama.cpp guesses
    them by these names when it loads a model)."""
    for names, key in ((EOT_TOKENS, "eot_token_id"), (EOM_TOKENS, "eom_token_id")):
        if key not in tok:
            found = [t for t in names if t in tok["tokens"]]
            if found:
                tok[key] = tok["tokens"].index(found[0])


# --- Hugging Face ---------------------------------------------------------------------------
_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": None}


def _st_header(path):
    """{name: (dtype, shape, begin, end)} from a safetensors file's JSON header."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100 << 20:
                raise ValueError("header too large")
            head = json.loads(f.read(n))
        size = os.path.getsize(path)
    except (OSError, ValueError, struct.error) as e:
        raise ConvertError(f"{path}: not a readable safetensors file ({e})") from None
    out = {}
    for name, info in head.items():
        if name == "__metadata__":
            continue
        b, e = info["data_offsets"]
        if not 8 + n + e <= size:
            raise ConvertError(f"{path}: tensor {name} lies past the end of the file (truncated?)")
        out[name] = (info["dtype"], tuple(info["shape"]), 8 + n + b, 8 + n + e)
    return out


def _st_load(path, name, dtype, shape, begin):
    if dtype == "BF16":  # numpy has no bfloat16: its bits are the top half of a float32
        raw = np.fromfile(path, dtype="<u2", count=int(np.prod(shape)), offset=begin)
        return (raw.astype(np.uint32) << 16).view(np.float32).reshape(shape)
    from safetensors import safe_open
    with safe_open(path, framework="numpy") as f:
        return f.get_tensor(name)


def _read_hf(d):
    cfg_path = os.path.join(d, "config.json")
    if not os.path.isfile(cfg_path):
        raise ConvertError(f"{d}: missing config.json (not a Hugging Face model directory)")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            hc = json.load(f)
    except (OSError, ValueError) as e:
        raise ConvertError(f"{cfg_path}: cannot read ({e})") from None
    archs = hc.get("architectures") or [hc.get("model_type")]
    arch_name = archs[0] if archs else None
    if arch_name not in HF_ARCHS:
        raise ConvertError(f"unsupported architecture {arch_name!r} (supported: {', '.join(HF_ARCHS)})")
    arch = HF_ARCHS[arch_name]
    if hc.get("hidden_act", "silu") != "silu":
        raise ConvertError(f"unsupported hidden_act {hc.get('hidden_act')!r} (only silu)")
    if arch in ("llama", "mistral") and hc.get("attention_bias"):
        raise ConvertError("attention_bias=true (an o_proj bias) is not supported")
    if hc.get("mlp_bias"):
        raise ConvertError("mlp_bias=true is not supported")

    def need(key):
        if hc.get(key) is None:
            raise ConvertError(f"{cfg_path}: {key} is missing")
        return hc[key]

    dim, n_layers = int(need("hidden_size")), int(need("num_hidden_layers"))
    n_heads = int(need("num_attention_heads"))
    n_kv = int(hc.get("num_key_value_heads") or n_heads)
    head_dim = int(hc.get("head_dim") or dim // n_heads)
    hidden = int(need("intermediate_size"))
    ctx = int(need("max_position_embeddings"))
    eps = float(hc.get("rms_norm_eps", 1e-6))

    # RoPE: transformers 5 writes rope_parameters {rope_type, rope_theta, ...}, older
    # versions rope_theta and rope_scaling {type|rope_type, factor, ...}
    rp = hc.get("rope_parameters") or {}
    if any(isinstance(v, dict) for v in rp.values()):
        raise ConvertError("per-layer-type rope_parameters are not supported")
    theta = float(rp.get("rope_theta", hc.get("rope_theta", 10000.0)))
    scaling = hc.get("rope_scaling") or (rp if _rope_type(rp) else None)
    if _rope_type(scaling) is None:
        scaling = None
    else:
        scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
        scaling.setdefault("rope_type", scaling.get("type"))
        if _rope_type(scaling) == "llama3":
            scaling.setdefault("original_max_position_embeddings", ctx)
    if float((rp or {}).get("partial_rotary_factor", hc.get("partial_rotary_factor", 1.0))) != 1.0:
        raise ConvertError("partial_rotary_factor != 1 is not supported")
    rope_freqs(theta, head_dim, scaling)  # unsupported scaling types fail here, before any work

    window = 0
    if arch == "mistral":
        window = int(hc.get("sliding_window") or 0)
    elif arch == "qwen2":
        types = hc.get("layer_types")
        if types is None and hc.get("use_sliding_window"):
            mwl = int(hc.get("max_window_layers", n_layers))
            types = ["sliding_attention" if i >= mwl else "full_attention" for i in range(n_layers)]
        kinds = set(types or ["full_attention"])
        if kinds == {"sliding_attention"}:
            window = int(hc.get("sliding_window") or 0)
        elif kinds != {"full_attention"}:
            raise ConvertError(f"mixed sliding-window and full-attention layers are not supported ({sorted(kinds)})")

    # weights
    index = os.path.join(d, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError) as e:
            raise ConvertError(f"{index}: cannot read ({e})") from None
        files = [os.path.join(d, x) for x in files]
        for p in files:
            if not os.path.isfile(p):
                raise ConvertError(f"missing weights file {p} (listed in model.safetensors.index.json)")
    else:
        files = sorted(os.path.join(d, x) for x in os.listdir(d) if x.endswith(".safetensors"))
    if not files:
        other = [x for x in os.listdir(d) if x.endswith((".bin", ".pt", ".pth"))]
        raise ConvertError(f"{d}: no *.safetensors weights" + (f" ({other[0]} is not supported)" if other else ""))
    where = {}
    for p in files:
        for name, (dt, shape, b, _) in _st_header(p).items():
            where[name] = (p, dt, shape, b)
    shapes = {n: w[2] for n, w in where.items()}

    tied = bool(hc.get("tie_word_embeddings", False)) or "lm_head.weight" not in where
    qkv_bias = arch == "qwen2"
    P = "model.layers."
    expect = {"model.embed_tokens.weight": None, "model.norm.weight": (dim,)}
    if "model.embed_tokens.weight" not in shapes:
        raise ConvertError("missing tensor model.embed_tokens.weight")
    vocab = shapes["model.embed_tokens.weight"][0]
    expect["model.embed_tokens.weight"] = (vocab, dim)
    if not tied:
        expect["lm_head.weight"] = (vocab, dim)
    for i in range(n_layers):
        p = f"{P}{i}."
        expect.update({p + "input_layernorm.weight": (dim,), p + "post_attention_layernorm.weight": (dim,),
                       p + "self_attn.q_proj.weight": (n_heads * head_dim, dim),
                       p + "self_attn.k_proj.weight": (n_kv * head_dim, dim),
                       p + "self_attn.v_proj.weight": (n_kv * head_dim, dim),
                       p + "self_attn.o_proj.weight": (dim, n_heads * head_dim),
                       p + "mlp.gate_proj.weight": (hidden, dim), p + "mlp.up_proj.weight": (hidden, dim),
                       p + "mlp.down_proj.weight": (dim, hidden)})
        if qkv_bias:
            expect.update({p + "self_attn.q_proj.bias": (n_heads * head_dim,),
                           p + "self_attn.k_proj.bias": (n_kv * head_dim,),
                           p + "self_attn.v_proj.bias": (n_kv * head_dim,)})
    ignored = {"lm_head.weight"} if tied else set()
    extra = sorted(n for n in set(where) - set(expect) - ignored if not n.endswith("rotary_emb.inv_freq"))
    if extra:
        raise ConvertError(f"unsupported tensor {extra[0]} ({len(extra)} not understood)")
    _check_shapes(expect, shapes)
    for n in expect:
        if where[n][1] not in _ST_DTYPES:
            raise ConvertError(f"tensor {n}: unsupported safetensors dtype {where[n][1]} (supported: F32, F16, BF16)")

    def get(name):
        p, dt, shape, b = where[name]
        return _st_load(p, name, dt, shape, b)

    m = _Model()
    m.source_format = "hf"
    m.inputs = [cfg_path] + files
    m.cfg = dict(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim,
                 hidden_dim=hidden, vocab_size=vocab, max_seq_len=ctx,
                 flags=(FLAG_TIED_OUTPUT if tied else 0) | (FLAG_QKV_BIAS if qkv_bias else 0),
                 sliding_window=window, norm_eps=eps)
    L = m.load
    L["tok_embd"] = lambda: get("model.embed_tokens.weight")
    L["rope_freqs"] = lambda: rope_freqs(theta, head_dim, scaling)
    L["output_norm"] = lambda: get("model.norm.weight")
    if not tied:
        L["output"] = lambda: get("lm_head.weight")
    for i in range(n_layers):
        g, p = f"{P}{i}.", f"blk.{i}."
        L[p + "attn_norm"] = lambda g=g: get(g + "input_layernorm.weight")
        L[p + "attn_qkv"] = lambda g=g: np.concatenate([get(g + f"self_attn.{x}_proj.weight") for x in "qkv"])
        if qkv_bias:
            L[p + "attn_qkv_bias"] = lambda g=g: np.concatenate([get(g + f"self_attn.{x}_proj.bias") for x in "qkv"])
        L[p + "attn_out"] = lambda g=g: get(g + "self_attn.o_proj.weight")
        L[p + "ffn_norm"] = lambda g=g: get(g + "post_attention_layernorm.weight")
        L[p + "ffn_gate_up"] = lambda g=g: np.concatenate([get(g + "mlp.gate_proj.weight"),
                                                            get(g + "mlp.up_proj.weight")])
        L[p + "ffn_down"] = lambda g=g: get(g + "mlp.down_proj.weight")

    m.config = {"architecture": arch, "hf_architecture": arch_name,
                "name": hc.get("_name_or_path") or os.path.basename(os.path.abspath(d)),
                "rope_theta": theta, "rope_scaling": scaling, "context_length": ctx}
    tok, template, tok_files = _hf_tokenizer(d, hc)
    m.tokenizer = _pad_vocab(tok, vocab)
    m.chat_template = template
    m.tok_files = tok_files
    return m


def _flatten(node, key):
    """A tokenizer.json component as a list (a Sequence's members, or itself)."""
    if not node:
        return []
    if node.get("type") == "Sequence":
        return [x for sub in node.get(key, []) for x in _flatten(sub, key)]
    return [node]


def _detect_pre(pre_tokenizer):
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer.json pre_tokenizer."""
    parts = _flatten(pre_tokenizer, "pretokenizers")
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        rx = (parts[0].get("pattern") or {}).get("Regex")
        if rx == LLAMA3_REGEX:
            return "llama3"
        if rx == QWEN2_REGEX:
            return "qwen2"
    raise ConvertError(f"unsupported pre-tokenizer {json.dumps(pre_tokenizer)[:160]}")


def _token_id(value, to_id):
    if isinstance(value, dict):
        value = value.get("content")
    return to_id.get(value) if isinstance(value, str) else None


def _hf_tokenizer(d, hc):
    """meta["tokenizer"] (GGUF tokenizer.ggml.* keys without the prefix) from tokenizer.json."""
    path = os.path.join(d, "tokenizer.json")
    if not os.path.isfile(path):
        spm_model = os.path.exists(os.path.join(d, "tokenizer.model"))
        extra = " (tokenizer.model alone is not supported)" if spm_model else ""
        raise ConvertError(f"{d}: missing tokenizer.json{extra}")
    files = [path]
    try:
        with open(path, encoding="utf-8") as f:
            tj = json.load(f)
        tc_path = os.path.join(d, "tokenizer_config.json")
        tc = {}
        if os.path.isfile(tc_path):
            files.append(tc_path)
            with open(tc_path, encoding="utf-8") as f:
                tc = json.load(f)
    except (OSError, ValueError) as e:
        raise ConvertError(f"{d}: cannot read the tokenizer ({e})") from None
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise ConvertError(f"unsupported tokenizer model type {model.get('type')!r} in tokenizer.json (only BPE)")
    spm = bool(model.get("byte_fallback"))

    vocab = model.get("vocab") or {}
    added = tj.get("added_tokens") or []
    n = max([i for i in vocab.values()] + [a["id"] for a in added] + [-1]) + 1
    tokens, types = [None] * n, [NORMAL] * n
    for t, i in vocab.items():
        tokens[i] = t
    for a in added:
        tokens[a["id"]] = a["content"]
        types[a["id"]] = CONTROL if a.get("special") else USER_DEFINED
    for i, t in enumerate(tokens):
        if t is None:  # a hole in the ids
            tokens[i], types[i] = f"[PAD{i}]", UNUSED
    to_id = {}
    for i, t in enumerate(tokens):
        to_id.setdefault(t, i)

    merges = []
    for mg in model.get("merges") or []:
        a, b = mg.split(" ", 1) if isinstance(mg, str) else mg
        merges.append(f"{a} {b}" if " " not in a and " " not in b else [a, b])

    tok = {"model": "llama" if spm else "gpt2", "tokens": tokens, "token_type": types}
    if spm:
        if model.get("unk_token") in to_id:
            types[to_id[model["unk_token"]]] = UNKNOWN
        for i, t in enumerate(tokens):
            if types[i] == NORMAL and _BYTE_TOKEN.match(t):
                types[i] = BYTE
        # score: -(rank of the first merge that makes the token); tokens no merge makes
        # (single characters, bytes, specials, added tokens) -1e9. The SentencePiece-style
        # tokenizer merges the pair whose merged token scores highest, i.e. the earliest merge.
        scores = [-1e9] * n
        for r, mg in enumerate(merges):
            a, b = mg.split(" ", 1) if isinstance(mg, str) else mg
            i = to_id.get(a + b)
            if i is not None and scores[i] == -1e9 and types[i] == NORMAL:
                scores[i] = -float(r)
        tok["scores"] = scores
        norm = _flatten(tj.get("normalizer"), "normalizers")
        pre = _flatten(tj.get("pre_tokenizer"), "pretokenizers")
        prefix = any(x.get("type") == "Prepend" and x.get("prepend") == "\u2581" for x in norm) or any(
            x.get("type") == "Metaspace" and (x.get("prepend_scheme") in ("first", "always")
                                               or x.get("add_prefix_space")) for x in pre)
        tok["add_space_prefix"] = bool(prefix)
    else:
        tok["pre"] = _detect_pre(tj.get("pre_tokenizer"))
        tok["add_space_prefix"] = False
    tok["merges"] = merges

    # special tokens: tokenizer_config.json's *_token, else config.json's *_token_id
    for typ, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"),
                     ("pad", "padding_token_id")):
        i = _token_id(tc.get(f"{typ}_token"), to_id)
        if i is None:
            v = hc.get(f"{typ}_token_id")
            if isinstance(v, list):
                v = v[0] if v else None
            i = v if isinstance(v, int) and 0 <= v < n else None
        if i is None and typ == "unk" and spm:
            i = to_id.get(model.get("unk_token"))
        if i is not None:
            tok[key] = i
    _add_turn_ids(tok)

    # add BOS/EOS: tokenizer_config.json says, else the post-processor's template does
    single = []
    for p in _flatten(tj.get("post_processor"), "processors"):
        if p.get("type") == "TemplateProcessing":
            single = p.get("single") or []
    first = single[0].get("SpecialToken") if single else None
    last = single[-1].get("SpecialToken") if single else None
    add_bos, add_eos = tc.get("add_bos_token"), tc.get("add_eos_token")
    tok["add_bos_token"] = add_bos if isinstance(add_bos, bool) else bool(first)
    tok["add_eos_token"] = add_eos if isinstance(add_eos, bool) else bool(last)
    if tok["add_bos_token"] and "bos_token_id" not in tok and first and first.get("id") in to_id:
        tok["bos_token_id"] = to_id[first["id"]]

    template = tc.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if template is None:
        jinja = os.path.join(d, "chat_template.jinja")
        cj = os.path.join(d, "chat_template.json")
        try:
            if os.path.isfile(jinja):
                files.append(jinja)
                with open(jinja, encoding="utf-8") as f:
                    template = f.read()
            elif os.path.isfile(cj):
                files.append(cj)
                with open(cj, encoding="utf-8") as f:
                    template = json.load(f).get("chat_template")
        except (OSError, ValueError) as e:
            raise ConvertError(f"{d}: cannot read the chat template ({e})") from None
    return tok, template if isinstance(template, str) else None, files


# --- llama2.c -----------------------------------------------------------------------------
# run.c's Config: dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size (negative: the
# classifier is not shared with the embedding), seq_len; then float32 weights in the order of
# export.py's legacy_export (= run.c's memory_map_weights).
_L2C_HEADER = struct.Struct("<7i")
_L2C_MAGIC = 0x616B3432  # "ak42": the header of llama2.c's newer (version 1, 2) exports
L2C_EPS, L2C_THETA = 1e-5, 10000.0  # hard-coded in run.c


def _llama2c_header(path, size):
    """The header as a dict (with the size it implies) if it is a plausible llama2.c one, else None."""
    try:
        with open(path, "rb") as f:
            head = f.read(_L2C_HEADER.size)
    except OSError:
        return None
    if len(head) < _L2C_HEADER.size:
        return None
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq = _L2C_HEADER.unpack(head)
    if not all(0 < v < format.LIMIT for v in (dim, hidden, n_layers, n_heads, n_kv, abs(vocab), seq)):
        return None
    if dim % n_heads or n_heads % n_kv or (dim // n_heads) % 2:
        return None
    hs = dim // n_heads
    kv_dim = n_kv * hs
    L, V = n_layers, abs(vocab)
    floats = (V * dim + L * dim + L * dim * dim + 2 * L * dim * kv_dim + L * dim * dim + L * dim
              + 3 * L * dim * hidden + dim + 2 * (seq * hs // 2) + (V * dim if vocab < 0 else 0))
    return {"dim": dim, "hidden": hidden, "n_layers": L, "n_heads": n_heads, "n_kv": n_kv, "vocab": V,
            "shared": vocab > 0, "seq_len": seq, "head_dim": hs,
            "expected_size": _L2C_HEADER.size + 4 * floats, "size": size}


def _llama2c_tokenizer(path, vocab):
    """meta["tokenizer"] from a llama2.c tokenizer.bin: int32 max_token_length, then per token
    float32 score, int32 length, UTF-8 bytes. llama2.c's tokenizer.py export wrote each
    SentencePiece piece with its "▁" replaced by a space, and BOS/EOS as <s>/</s> between two
    newlines; both are undone. <unk> is UNKNOWN, <s>/</s> CONTROL, <0xNN> BYTE (as in Llama 2).
    run.c reads exactly the model's vocab_size tokens; a file holding more or fewer is refused."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConvertError(f"{path}: {e.strerror or e}") from None
    if len(data) < 4:
        raise ConvertError(f"{path}: not a llama2.c tokenizer.bin (only {len(data)} bytes)")
    pos, tokens, scores, types = 4, [], [], []
    for i in range(vocab):
        if pos + 8 > len(data):
            raise ConvertError(f"{path}: holds {i} tokens, the model's vocabulary has {vocab} "
                               f"(truncated, or the tokenizer of another model?)")
        score, n = struct.unpack_from("<fi", data, pos)
        pos += 8
        if n < 0 or pos + n > len(data):
            raise ConvertError(f"{path}: token {i} has a bad length {n} (truncated or not a tokenizer.bin?)")
        try:
            t = data[pos:pos + n].decode("utf-8")
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
        raise ConvertError(f"{path}: holds more than the model's {vocab} tokens (the tokenizer of "
                           f"another model? give the right one with --tokenizer)")
    # run.c: BOS 1, EOS 2 and the byte tokens at 3..258 are fixed ids; a dummy-prefix space
    tok = {"model": "llama", "tokens": tokens, "scores": scores, "token_type": types,
           "bos_token_id": 1, "eos_token_id": 2, "add_bos_token": True, "add_eos_token": False,
           "add_space_prefix": True}
    if "<unk>" in tokens:
        tok["unknown_token_id"] = tokens.index("<unk>")
    _add_turn_ids(tok)
    return tok


def _read_llama2c(path, h, tok_path):
    dim, hidden, L, nh, nkv, V, hs = (h[k] for k in ("dim", "hidden", "n_layers", "n_heads", "n_kv", "vocab",
                                                    "head_dim"))
    if tok_path is None:
        tok_path = os.path.join(os.path.dirname(os.path.abspath(path)), "tokenizer.bin")
        if not os.path.isfile(tok_path):
            raise ConvertError(f"{path} is a llama2.c checkpoint but {tok_path} does not exist "
                               f"(give its tokenizer.bin with --tokenizer PATH)")
    elif not os.path.isfile(tok_path):
        raise ConvertError(f"{tok_path}: no such file")
    tok = _llama2c_tokenizer(tok_path, V)

    raw = np.memmap(path, dtype="<f4", mode="r", offset=_L2C_HEADER.size,
                    shape=((h["expected_size"] - _L2C_HEADER.size) // 4,))
    pos = 0

    def take(*shape):
        nonlocal pos
        n = int(np.prod(shape))
        a = raw[pos:pos + n].reshape(shape)
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
    m.cfg = dict(dim=dim, n_layers=L, n_heads=nh, n_kv_heads=nkv, head_dim=hs, hidden_dim=hidden,
                 vocab_size=V, max_seq_len=h["seq_len"], flags=FLAG_TIED_OUTPUT if h["shared"] else 0,
                 sliding_window=0, norm_eps=L2C_EPS)
    ld = m.load
    ld["tok_embd"] = lambda: emb
    ld["rope_freqs"] = lambda: rope_freqs(L2C_THETA, hs)
    ld["output_norm"] = lambda: rms_final
    if wcls is not None:
        ld["output"] = lambda: wcls
    for i in range(L):
        p = f"blk.{i}."
        ld[p + "attn_norm"] = lambda i=i: rms_att[i]
        # run.c rotates adjacent pairs (2j, 2j+1) of each head: Meta's layout, as llama.cpp's GGUF
        ld[p + "attn_qkv"] = lambda i=i: np.concatenate([_unpermute(wq[i], nh), _unpermute(wk[i], nkv), wv[i]])
        ld[p + "attn_out"] = lambda i=i: wo[i]
        ld[p + "ffn_norm"] = lambda i=i: rms_ffn[i]
        ld[p + "ffn_gate_up"] = lambda i=i: np.concatenate([w1[i], w3[i]])  # w2(silu(w1 x) * w3 x)
        ld[p + "ffn_down"] = lambda i=i: w2[i]
    m.config = {"architecture": "llama", "name": os.path.splitext(os.path.basename(path))[0],
                "rope_theta": L2C_THETA, "rope_scaling": None, "context_length": h["seq_len"]}
    m.tokenizer = tok
    return m


# --- the conversion --------------------------------------------------------------------------
def _same_file(a, b):
    try:
        if os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b):
            return True
    except OSError:
        pass
    return os.path.realpath(a) == os.path.realpath(b)


def _inputs_of(src):
    """("gguf" | "hf" | "llama2c", the GGUF file, the model directory or the checkpoint)."""
    if not os.path.exists(src):
        raise ConvertError(f"{src}: no such file or directory")
    if os.path.isdir(src):
        return "hf", src
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
        raise ConvertError(f"{src}: a llama2.c version 1/2 export; only the legacy version 0 format is "
                           f"supported (llama2.c's export.py --version 0)")
    size = os.path.getsize(src)
    h = _llama2c_header(src, size)
    if h is not None and h["expected_size"] == size:
        return "llama2c", (src, h)
    hint = (f" (read as a llama2.c checkpoint its header implies {h['expected_size']} bytes, the file has "
            f"{size})" if h is not None else "")
    raise ConvertError(f"{src}: neither a GGUF file, a llama2.c checkpoint nor a Hugging Face model "
                       f"directory{hint}")


def convert(src, out, progress=True, tokenizer=None):
    """Convert SRC (a .gguf file, a Hugging Face directory or a llama2.c checkpoint) into the
    pyllm file OUT. tokenizer: a llama2.c checkpoint's tokenizer.bin (default: the one next to it)."""
    t0 = time.time()
    src, out = os.fspath(src), os.fspath(out)
    kind, where = _inputs_of(src)
    if tokenizer is not None and kind != "llama2c":
        raise ConvertError("a separate tokenizer file is only used with llama2.c checkpoints")
    if os.path.isdir(out):
        raise ConvertError(f"{out}: is a directory (give the output file's name)")
    out_dir = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(out_dir):
        raise ConvertError(f"{out_dir}: no such directory")
    if kind in ("gguf", "llama2c") and _same_file(out, src):
        raise ConvertError(f"refusing to convert {src} onto itself")

    if kind == "llama2c":
        m = _read_llama2c(where[0], where[1], None if tokenizer is None else os.fspath(tokenizer))
    else:
        m = _read_gguf(where) if kind == "gguf" else _read_hf(where)
    for p in m.inputs + m.tok_files:
        if _same_file(out, p):
            raise ConvertError(f"refusing to convert onto the input file {p}")

    specs = {}
    for tname, shape, dtype in format.tensor_layout(m.cfg):
        fn = m.load[tname]
        conv = (lambda a: np.asarray(a, dtype=np.float32)) if dtype == "f32" else \
            (lambda a, tname=tname: _f16(tname, a))
        specs[tname] = TensorSpec(tname, shape, dtype, load=lambda fn=fn, conv=conv: conv(fn()))

    name = os.path.basename(os.path.abspath(src))
    provenance = {"source": name, "source_format": m.source_format, "sha256": _sha256(m.inputs),
                  "converter": f"pyllm {__version__}",
                  "converted_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if m.source_format in ("hf", "llama2c"):
        provenance["sha256_of"] = [os.path.basename(p) for p in m.inputs]
    meta = {"config": m.config, "tokenizer": m.tokenizer, "chat_template": m.chat_template,
            "provenance": provenance}

    from tqdm import tqdm
    with tqdm(total=sum(s.nbytes for s in specs.values()), unit="B", unit_scale=True, unit_divisor=1024,
              file=sys.stderr, disable=not progress, desc=f"converting {name}", dynamic_ncols=True) as bar:
        try:
            size = format.write(out, m.cfg, meta, specs, progress=lambda s: bar.update(s.nbytes))
        except format.FormatError as e:
            raise ConvertError(str(e)) from None
        except OSError as e:
            raise ConvertError(f"writing {out}: {e.strerror or e}") from e
    return {"out": out, "tensors": len(specs), "parameters": int(sum(np.prod(s.shape) for s in specs.values())),
            "file_size": size, "seconds": time.time() - t0, "source_format": m.source_format,
            "architecture": m.config["architecture"]}

