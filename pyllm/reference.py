"""The reference forward pass: plain numpy, float32 math over the f16 weights of a ModelFile.

This is the spec the C kernel is checked against (`pyllm check`, tests/test_kernel.py), and
it is checked against Hugging Face transformers itself (tests/make_fixtures.py). It is meant
to be read: one formula per line, no tiling, no cache, every position at once.
"""

import numpy as np

from . import format

CACHE_TYPES = ("f16", "f32")


def rmsnorm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(x, cos, sin):
    """Rotate-half RoPE (Hugging Face layout). x: (T, heads, head_dim); cos, sin: (T, hd/2)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def silu(x):
    return x / (1.0 + np.exp(-x))


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def reference_logits(mf, ids, cache_type="f16", cache_type_k=None, cache_type_v=None):
    """Logits (len(ids), vocab) of token ids at positions 0.. in a fresh context.

    cache_type: "f16" rounds keys (after RoPE) and values to float16, as the kernel's
    default KV cache stores them; "f32" keeps them in float32, as its exact mode does.
    cache_type_k, cache_type_v: the keys' or the values' own (as pyllm.load's).
    """
    types = (cache_type_k or cache_type, cache_type_v or cache_type)
    if not set(types) <= set(CACHE_TYPES):
        raise ValueError(f"cache types {types}: each one of {', '.join(CACHE_TYPES)}")
    if isinstance(mf, str):
        mf = format.read(mf)
    c = mf.config
    nh, nkv, hd, hid = c["n_heads"], c["n_kv_heads"], c["head_dim"], c["hidden_dim"]
    eps, sw = np.float32(c["norm_eps"]), c["sliding_window"]

    def w(name):
        return np.asarray(mf.matrix(name), dtype=np.float32)

    ids = np.asarray(ids, dtype=np.int64)
    T = len(ids)
    x = w("tok_embd")[ids]  # (T, d)

    angle = np.arange(T, dtype=np.float32)[:, None] * w("rope_freqs")[None, :]  # (T, hd/2)
    cos, sin = np.cos(angle), np.sin(angle)

    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    allowed = j <= i
    if sw:
        allowed &= j > i - sw
    mask = np.where(allowed, np.float32(0), np.float32(-np.inf))

    for layer in range(c["n_layers"]):
        p = f"blk.{layer}."
        h = rmsnorm(x, w(p + "attn_norm"), eps)
        qkv = h @ w(p + "attn_qkv").T
        if c["flags"] & format.FLAG_QKV_BIAS:
            qkv = qkv + w(p + "attn_qkv_bias")
        q = rope(qkv[:, : nh * hd].reshape(T, nh, hd), cos, sin)
        k = rope(qkv[:, nh * hd : (nh + nkv) * hd].reshape(T, nkv, hd), cos, sin)
        v = qkv[:, (nh + nkv) * hd :].reshape(T, nkv, hd)
        if types[0] == "f16":
            k = k.astype(np.float16).astype(np.float32)
        if types[1] == "f16":
            v = v.astype(np.float16).astype(np.float32)
        group = nh // nkv  # query head n uses kv head n // group
        k = np.repeat(k, group, axis=1).transpose(1, 0, 2)  # (nh, T, hd)
        v = np.repeat(v, group, axis=1).transpose(1, 0, 2)
        q = q.transpose(1, 0, 2)
        att = softmax(q @ k.transpose(0, 2, 1) / np.float32(np.sqrt(hd)) + mask)  # (nh, T, T)
        o = (att @ v).transpose(1, 0, 2).reshape(T, nh * hd)
        x = x + o @ w(p + "attn_out").T

        h = rmsnorm(x, w(p + "ffn_norm"), eps)
        gu = h @ w(p + "ffn_gate_up").T
        x = x + (silu(gu[:, :hid]) * gu[:, hid:]) @ w(p + "ffn_down").T

    x = rmsnorm(x, w("output_norm"), eps)
    head = w("tok_embd" if c["flags"] & format.FLAG_TIED_OUTPUT else "output")
    return (x @ head.T).astype(np.float32)
