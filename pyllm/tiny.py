"""Tiny random models in the pyllm format: make_tiny_model(path, seed, **overrides).

For `pyllm check` and the tests: the weights are random but scaled so activations stay
O(1) and logits O(1..10); the tokenizer is a minimal GPT-2 byte-level BPE (256 byte
tokens, a few merges, specials).
"""

import re
from collections import Counter

import numpy as np

from . import format

BASE = dict(
    dim=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=16,
    hidden_dim=96,
    vocab_size=300,
    max_seq_len=512,
    flags=0,
    sliding_window=0,
    norm_eps=1e-5,
)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TRAIN_TEXT = (
    "the cat sat on the mat. the dog ate the bone. hello world! "
    "def main():\n    return 1 + 2\nThe capital of France is Paris. 12345 "
) * 3


def byte_chars():
    """GPT-2's bytes_to_unicode: byte value -> printable character."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def tiny_tokenizer(vocab_size):
    """tokens = 256 byte chars + BPE merges learned from TRAIN_TEXT + SPECIALS (at the end)."""
    chars = byte_chars()
    n_merges = vocab_size - 256 - len(SPECIALS)
    assert n_merges >= 0, "vocab_size must be >= 259"
    pieces = re.findall(r" ?[A-Za-z]+| ?[^\sA-Za-z]+|\s+", TRAIN_TEXT)
    words = [[chars[b] for b in w.encode()] for w in pieces]
    tokens, merges = list(chars), []
    for _ in range(n_merges):
        pairs = Counter((a, b) for w in words for a, b in zip(w, w[1:]))
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        merges.append(f"{a} {b}")
        tokens.append(a + b)
        new = []
        for w in words:
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new.append(out)
        words = new
    while len(tokens) < vocab_size - len(SPECIALS):  # corpus exhausted: pad with unused tokens
        tokens.append(f"<unused{len(tokens)}>")
    tokens += SPECIALS
    assert len(set(tokens)) == len(tokens)
    types = [1] * (vocab_size - len(SPECIALS)) + [3] * len(SPECIALS)
    eos = tokens.index("<|im_end|>")
    return {
        "model": "gpt2",
        "pre": "gpt2",
        "tokens": tokens,
        "token_type": types,
        "merges": merges,
        "bos_token_id": tokens.index("<|endoftext|>"),
        "eos_token_id": eos,
        "add_bos_token": False,
        "add_space_prefix": False,
    }


def make_tiny_model(path, seed=0, tied=False, qkv_bias=False, rope_theta=10000.0, **overrides):
    """Write a random model to path; returns the config dict. overrides: any BASE field."""
    cfg = dict(BASE, **overrides)
    cfg["flags"] |= format.FLAG_TIED_OUTPUT if tied else 0
    cfg["flags"] |= format.FLAG_QKV_BIAS if qkv_bias else 0
    rng = np.random.default_rng(seed)
    hd = cfg["head_dim"]

    def normal(shape, std, mean=0.0):
        return (mean + std * rng.standard_normal(shape)).astype(np.float16)

    arrays = {}
    for name, shape, _ in format.tensor_layout(cfg):
        short = name.split(".")[-1]
        if short == "rope_freqs":
            a = 1.0 / rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
            a = a.astype(np.float32)
        elif short in ("attn_norm", "ffn_norm", "output_norm"):
            a = normal(shape, 0.1, 1.0)
        elif short == "attn_qkv_bias":
            a = normal(shape, 0.2)
        elif short == "tok_embd":
            a = normal(shape, 0.35)  # also the tied output head: logits ~ 0.35 * sqrt(dim) * N(0,1)
        elif short == "output":
            a = normal(shape, 0.35)
        elif short == "attn_qkv":
            a = normal(shape, 1.5 / np.sqrt(shape[1]))  # sharper attention than uniform
        else:
            a = normal(shape, 1.0 / np.sqrt(shape[1]))
        arrays[name] = a
    specs = {
        n: format.TensorSpec(n, s, dt, load=lambda a=arrays[n]: a)
        for n, s, dt in format.tensor_layout(cfg)
    }
    meta = {
        "config": {"arch": "llama", "rope_theta": rope_theta, "name": f"tiny-{seed}"},
        "tokenizer": tiny_tokenizer(cfg["vocab_size"]),
        "chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
        "source": {"kind": "random", "seed": seed},
    }
    format.write(path, cfg, meta, specs)
    return cfg
