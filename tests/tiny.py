"""The tiny random model variants the kernel tests run; the builder is pyllm/tiny.py."""

from pyllm.tiny import BASE, make_tiny_model, tiny_tokenizer  # noqa: F401

# the variants test_kernel.py runs (name -> overrides of BASE)
VARIANTS = {
    "base": {},
    "tied": {"tied": True},
    "qkv_bias": {"qkv_bias": True},
    "mha": {"n_kv_heads": 4},  # GQA ratio 1
    "gqa4": {"n_kv_heads": 1},  # GQA ratio 4
    "odd": {
        "dim": 72,
        "head_dim": 24,
        "n_heads": 3,
        "n_kv_heads": 1,
        "hidden_dim": 100,
        "vocab_size": 301,
        "n_layers": 3,
        "tied": True,
        "qkv_bias": True,
    },
    # q_dim 240 > dim, hidden
    "wide_heads": {"n_heads": 6, "head_dim": 40, "n_kv_heads": 3, "hidden_dim": 80},
    "window": {"sliding_window": 8},
    "window_bias_gqa4": {"sliding_window": 5, "n_kv_heads": 1, "qkv_bias": True, "tied": True},
}
