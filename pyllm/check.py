"""`pyllm check [MODEL]`: does this machine's build of the kernel compute the right thing?

The compiled kernel runs prompts through tiny random models that cover every feature it
has (GQA, q/k/v biases, a sliding window, tied and untied output heads, several 512-position
attention segments) and through MODEL's first tokens of a fixed text, with each KV cache
type, at 1 thread and at all of them. Each run's logits are compared with the numpy
reference forward pass (reference.py) computed with the same cache precision; a line per
run says its max |dlogit|, the tolerance and PASS or FAIL. Every run also has to give
bit-identical logits at any thread count and whether the prompt is fed whole or in chunks.

The tolerances (logit units: a difference d scales a probability by about 1 + d):
  f32 cache  1e-3, the exact mode's bound against transformers: kernel and reference differ
             only in the order of their float32 sums and in exp/sin/cos. Measured: 3e-5 and
             4e-5 on the tiny models, 1.5e-4 on SmolLM2-135M.
  f16 cache  2e-2: both round K and V to float16, but from float32 values summed in another
             order, so now and then an element rounds to the neighbouring f16 value, a
             one-ulp (1e-3 relative) change to one key or value. Measured: 5e-3 on the tiny
             models, 8e-3 on SmolLM2-135M; the cache rounding itself moves logits by 2e-2
             to 5e-2 from the f32 reference, so a wrong rounding fails too.
A broken kernel (a wrong constant, sign or index) is off by 8e-2 or more: the exp polynomial's
r^2 term 0.5 -> 0.55 gives 8e-2, the RoPE sign 15, a sliding window one position too wide 5.8.
"""

import os
import sys
import tempfile

import numpy as np

from . import format
from .args import DEFAULT_MODEL, UsageError
from .reference import CACHE_TYPES, reference_logits
from .tiny import make_tiny_model

TOLERANCE = {"f16": 2e-2, "f32": 1e-3}
DECODE_TOKENS = 4  # a run feeds the prompt but these last ids in one call, then these one by one
TEXT = (
    "The quick brown fox jumps over the lazy dog. In 1969, Apollo 11 landed on the Moon;\n"
    "def area(r):\n    return 3.14159 * r ** 2  # 12,345 cafés, naïve résumé\n"
)
N_TOKENS = 32  # MODEL's first tokens of TEXT
TINY_TOKENS = 1100  # three attention segments of 512 positions
# name -> make_tiny_model arguments; between them every feature of the kernel
TINY_MODELS = {
    "tiny-untied": dict(
        seed=1, n_heads=4, n_kv_heads=2, qkv_bias=True, sliding_window=300, max_seq_len=2048
    ),  # a window past segment 0: rows that see none of it
    "tiny-tied": dict(
        seed=2,
        dim=72,
        n_heads=6,
        n_kv_heads=2,
        head_dim=24,
        hidden_dim=100,
        vocab_size=301,
        n_layers=3,
        tied=True,
        max_seq_len=2048,
    ),  # head_dim and dims not multiples of 16
}


def compare(got, want, cache_type):
    """(max |got - want|, its tolerance, within it?); inf for a shape mismatch, NaN or Inf."""
    tol = TOLERANCE[cache_type]
    got, want = np.asarray(got, dtype=np.float32), np.asarray(want, dtype=np.float32)
    if got.shape != want.shape or not np.isfinite(got).all():
        return float("inf"), tol, False
    diff = float(np.abs(got - want).max())
    return diff, tol, diff <= tol


def tiny_models(directory):
    """Write the tiny models to directory: [(name, path, prompt ids)]."""
    out = []
    for name, kwargs in TINY_MODELS.items():
        path = os.path.join(directory, f"{name}.bin")
        cfg = make_tiny_model(path, **kwargs)
        ids = (
            np.random.default_rng(kwargs["seed"])
            .integers(0, cfg["vocab_size"], TINY_TOKENS)
            .tolist()
        )
        out.append((name, path, ids))
    return out


def describe(cfg, n_tokens):
    """What a run covers, e.g. '1100 tokens, 2 layers, GQA 4:2, head_dim 16, window 300, ...'."""
    parts = [
        f"{n_tokens} tokens",
        f"{cfg['n_layers']} layers",
        f"GQA {cfg['n_heads']}:{cfg['n_kv_heads']}",
        f"head_dim {cfg['head_dim']}",
    ]
    if cfg["flags"] & format.FLAG_QKV_BIAS:
        parts.append("q/k/v biases")
    if cfg["sliding_window"]:
        parts.append(f"window {cfg['sliding_window']}")
    parts.append("tied head" if cfg["flags"] & format.FLAG_TIED_OUTPUT else "untied head")
    segments = -(-n_tokens // 512)
    parts.append(f"{segments} attention segment{'s' * (segments > 1)}")
    return ", ".join(parts)


def kernel_logits(path, ids, threads, cache_type):
    """(threads used, logits of every position: all ids but the last DECODE_TOKENS in one
    call, then those one by one; and logits of every position with ids fed in one call)."""
    from .model import load

    split = len(ids) - DECODE_TOKENS
    with load(path, threads=threads, n_ctx=len(ids), cache_type=cache_type) as m:
        steps = [m.logits(ids[:split])] + [m.eval([t])[None] for t in ids[split:]]
        return m.threads, np.concatenate(steps), m.logits(ids)


def check_model(path, ids, threads, report, kernel=kernel_logits):
    """Every cache type at 1 and `threads` threads; report(text, ok) per line. kernel: how
    to run it (kernel_logits' arguments and results; tests/test_cross.py runs it under qemu)."""
    mf = format.read(path)
    for cache_type in CACHE_TYPES:
        want = reference_logits(mf, ids, cache_type)
        runs = []
        for nt in sorted({1, threads}):
            used, steps, whole = kernel(path, ids, nt, cache_type)
            diff, tol, ok = compare(steps, want, cache_type)
            threads_used = f"{used:2d} thread{'s' if used > 1 else ' '}"
            report(
                f"{cache_type} cache, {threads_used}  max |dlogit| {diff:.2e}  tolerance {tol:.0e}",
                ok,
            )
            runs += [steps, whole]
        same = all(r.shape == runs[0].shape and np.array_equal(r, runs[0]) for r in runs)
        counts = " and ".join(map(str, sorted({1, threads})))
        report(f"{cache_type} cache, bit-identical at {counts} threads, whole and in chunks", same)


def safe(s):
    """A path for printing: control characters escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(s))


def run(model=None, threads=None, out=print):
    """Check the tiny models and MODEL (if given); the number of failed lines."""
    from . import _pyllm
    from ._pyllm import ffi, lib
    from .bench import default_threads
    from .model import load

    threads = threads or default_threads()
    real = None
    if model is not None:  # read it first: a bad file is a one-line error before any work
        with load(model, threads=1, n_ctx=1) as m:
            ids = m.tokenizer.encode(TEXT, add_bos=bool(m.tokenizer.add_bos), special=False)
            ids = ids[: min(N_TOKENS, m.config["max_seq_len"])]
            cfg = m.config
        if len(ids) <= DECODE_TOKENS:
            raise ValueError(f"{model}: the check text tokenizes to only {len(ids)} tokens")
        real = (model, ids, cfg)
    out(
        f"pyllm check: kernel {ffi.string(lib.pyllm_simd()).decode()} ({safe(_pyllm.__file__)}), "
        f"1 and {threads} threads, KV cache {' and '.join(CACHE_TYPES)}"
    )
    results = []

    def report(text, ok):
        results.append(ok)
        out(f"  {text:66} {'PASS' if ok else 'FAIL'}")

    with tempfile.TemporaryDirectory(prefix="pyllm-check-") as d:
        for name, path, ids in tiny_models(d):
            out(f"{name} ({describe(format.read(path, map_tensors=False).config, len(ids))})")
            check_model(path, ids, threads, report)
    if real:
        path, ids, cfg = real
        name = safe(os.path.basename(path))
        out(f"{name} (first {len(ids)} tokens of a fixed text; {describe(cfg, len(ids))})")
        check_model(path, ids, threads, report)
    failed = results.count(False)
    if failed:
        out(
            f"FAIL: {failed} of {len(results)} checks failed: this build of the kernel does not "
            "compute what the reference does"
        )
    else:
        out(
            f"PASS: all {len(results)} checks agree with the reference"
            + ("" if real else " (tiny models only: give a MODEL to check it too)")
        )
    return failed


def add_arguments(p):
    p.add_argument(
        "model",
        nargs="?",
        default=None,
        help=f"also check this model's first tokens (default {DEFAULT_MODEL}, if it exists)",
    )
    p.add_argument(
        "-t",
        "--threads",
        type=int,
        default=None,
        help="the many-thread run's threads (default: all cores)",
    )


def main(a):
    if a.threads is not None and not 1 <= a.threads <= 64:
        raise UsageError(f"-t {a.threads}: threads are 1 to 64")
    model = a.model
    if model is None and os.path.exists(DEFAULT_MODEL):
        model = DEFAULT_MODEL
    if model is None:
        print(
            f"pyllm check: no MODEL given and {DEFAULT_MODEL} does not exist: tiny models only",
            file=sys.stderr,
        )
    return 1 if run(model, a.threads, out=lambda s: print(s, flush=True)) else 0
