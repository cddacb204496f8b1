"""`pyllm bench`: prompt-processing (pp) and generation (tg) speed with llama-bench's conventions.

    pyllm bench MODEL [-p 512] [-n 128] [-d 0] [-t 1,2] [-ctk f16,f32] [-ctv f16,f32] [-r 5]
                      [-o md|json] [--roofline] [--batch 1,2,4,8,16] [--batch-depth 512]

Each test is timed on token ids straight through the kernel (Model.forward_at): no tokenizer,
no sampler.
  ppN  one forward of N random tokens at position depth, logits of the last token only
  tgN  N single-token forwards at positions depth, depth+1, ... (logits every step)
  batchT @ dD  one forward of T tokens at position D with every position's logits, as a
       lookup-drafting verify pass; reported also as cost(T)/cost(1), its time over batch1's
`@ dD` (-d D): D tokens are already in the KV cache before the test (filled, untimed).
-ctk/-ctv: the KV cache's type for keys and values, f16 (default) or f32; lists run every pair.
Like llama-bench: one warmup run per test (pp: the same pp; tg: one token), then -r timed
repetitions; t/s is the mean ± sample stddev of the per-repetition tokens/s.

Also reported: load time (open + first touch: pyllm.load and a one-token forward, which
reads every weight page once), peak RSS, and for tg the weight bytes read per token x t/s
(effective GB/s). --roofline times the machine's two ceilings on the model's own pool, per
thread count (ceilings(): the best of several read patterns, and the f32 FMA peak), and reports
tg as a fraction of the read ceiling (weights and KV cache per token) and pp as a fraction of
the compute ceiling (FLOPs per token counted from the config, attention at the test's depth).
A fraction over 100% is not reported: a warning says the probe read low.
"""

import datetime
import json
import mmap
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass

import numpy as np

from . import format
from .args import CACHE_TYPES
from .safeio import printable

MIB = 1 << 20
GIB = 1 << 30


# ---------- what to run ----------
@dataclass(frozen=True)
class Test:
    kind: str  # "pp", "tg" or "batch"
    n: int
    depth: int = 0

    @property
    def name(self):
        return f"{self.kind}{self.n}" + (f" @ d{self.depth}" if self.depth else "")

    @property
    def n_batch(self):
        return self.n if self.kind == "batch" else 0

    @property
    def n_prompt(self):
        return self.n if self.kind == "pp" else 0

    @property
    def n_gen(self):
        return self.n if self.kind == "tg" else 0


def int_list(s, what, lo=0):
    """'512' or '128,512' -> [512] / [128, 512]; every value >= lo."""
    try:
        vals = [int(v) for v in str(s).split(",") if v.strip() != ""]
    except ValueError:
        raise ValueError(
            f"{what}: expected a comma-separated list of integers, got {s!r}"
        ) from None
    if not vals:
        raise ValueError(f"{what}: empty list")
    bad = [v for v in vals if v < lo]
    if bad:
        raise ValueError(f"{what}: {bad[0]} is below {lo}")
    return vals


def cache_type_list(s, what):
    """'f16' or 'f16,f32' -> ['f16'] / ['f16', 'f32']."""
    vals = [v.strip() for v in str(s).split(",") if v.strip()]
    bad = [v for v in vals if v not in CACHE_TYPES]
    if bad or not vals:
        shown = printable(bad[0]) if bad else repr(s)
        raise ValueError(f"{what}: {shown} is not a cache type ({', '.join(CACHE_TYPES)})")
    return list(dict.fromkeys(vals))


def make_tests(n_prompt, n_gen, depths):
    """llama-bench's order: for each depth, the pp tests, then the tg tests (0 = none)."""
    tests = []
    for d in depths:
        tests += [Test("pp", n, d) for n in n_prompt if n > 0]
        tests += [Test("tg", n, d) for n in n_gen if n > 0]
    return tests


def default_threads():
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# ---------- what the machine and the file say ----------
def peak_rss_bytes():
    """The process's peak resident set. Linux: VmHWM, this program's own peak (ru_maxrss also
    keeps the peak of the process it was exec'd from: a big parent inflates a child's);
    elsewhere ru_maxrss (bytes on macOS)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) if sys.platform == "darwin" else int(r) * 1024


def cpu_info():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_info():
    """Which kernel ran: the loaded extension's sha256 and, in a git checkout, the commit
    (llama-bench's build_commit; '-dirty' when csrc/ or pyllm/ differ from it)."""
    import hashlib
    import subprocess

    from . import _pyllm

    so = _pyllm.__file__
    with open(so, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()[:16]
    commit = "unknown"
    src = os.path.dirname(os.path.dirname(os.path.abspath(so)))
    try:
        git = ["git", "-C", src]
        commit = subprocess.run(
            git + ["rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        if subprocess.run(
            git + ["diff", "--quiet", "HEAD", "--", "csrc", "pyllm"], timeout=10
        ).returncode:
            commit += "-dirty"
    except (OSError, subprocess.SubprocessError):
        pass
    return {"build_commit": commit, "kernel_sha256": sha, "kernel_path": so}


@dataclass
class ModelInfo:
    path: str
    config: dict
    size: int  # bytes of all tensors (llama-bench's model_size)
    n_params: int
    tied: bool
    bytes_per_token: int  # weights read per generated token

    @property
    def desc(self):
        """llama-bench's model_type, e.g. 'llama 135M F16'."""
        arch = self.config.get("arch") or self.config.get("architecture") or "llama"
        n = self.n_params
        label = (
            f"{n / 1e9:.0f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"
        )
        return f"{arch} {label} F16"


def model_info(path):
    mf = format.read(path, map_tensors=False)
    sizes = {}
    for t in mf.meta["tensors"]:
        n = int(np.prod(t["shape"]))
        sizes[t["name"]] = (n, n * (2 if t["dtype"] == "f16" else 4), len(t["shape"]))
    tied = bool(mf.config["flags"] & format.FLAG_TIED_OUTPUT)
    # a generated token reads every matrix once; the embedding only as the (tied) output head
    per_token = sum(nb for name, (_, nb, nd) in sizes.items() if nd == 2 and name != "tok_embd")
    if tied:
        per_token += sizes["tok_embd"][1]
    return ModelInfo(
        path,
        mf.config,
        sum(nb for _, nb, _ in sizes.values()),
        sum(n for n, _, _ in sizes.values()),
        tied,
        per_token,
    )


# ---------- the timed runs ----------
class Runner:
    """One opened model at one thread count; runs tests on raw token ids (Model.forward_at).
    Between tests the model's cache holds a prefix of depth_ids: the tests' own ids are
    rewound after each run."""

    def __init__(self, path, threads, n_ctx, max_depth, seed=1234, cache_types=("f16", "f16")):
        from .model import load

        t0 = time.perf_counter()
        self.model = load(
            path,
            threads=threads,
            n_ctx=n_ctx,
            cache_type_k=cache_types[0],
            cache_type_v=cache_types[1],
        )
        self.vocab = self.model.vocab_size
        self.out = np.empty(self.vocab, dtype=np.float32)  # every run's logits land here
        rng = np.random.default_rng(seed)
        # first touch: a one-token forward reads every weight page once
        self.model.forward_at([int(rng.integers(self.vocab))], 0, self.out)
        self.model.reset()
        self.load_s = time.perf_counter() - t0
        self.threads = self.model.threads
        # the depth context (the same for every test) and the ids the tests feed
        self.depth_ids = rng.integers(0, self.vocab, max(max_depth, 1)).tolist()
        self.rng = rng

    def _fill(self, depth):
        """Make the cache hold depth_ids[:depth] (untimed), keeping what it already holds."""
        m = self.model
        m.rewind(depth)
        have = len(m.tokens)
        if have < depth:
            m.forward_at(self.depth_ids[have:depth], have, self.out)

    def run(self, test, n=None):
        """Nanoseconds for one run of test (n overrides its token count, for warmups)."""
        n = test.n if n is None else n
        self._fill(test.depth)
        ids = self.rng.integers(0, self.vocab, n).tolist()
        forward, out, pos = self.model.forward_at, self.out, test.depth
        if test.kind == "pp":
            t0 = time.perf_counter_ns()
            forward(ids, pos, out)
            dt = time.perf_counter_ns() - t0
        elif test.kind == "batch":  # a verify pass: logits at every position
            rows = np.empty((n, self.vocab), dtype=np.float32)
            t0 = time.perf_counter_ns()
            forward(ids, pos, rows)
            dt = time.perf_counter_ns() - t0
        else:
            t0 = time.perf_counter_ns()
            for i, t in enumerate(ids):
                forward([t], pos + i, out)
            dt = time.perf_counter_ns() - t0
        self.model.rewind(test.depth)
        return dt

    def logits(self, ids):
        """The last id's logits (a copy) of ids evaluated from position 0; the depth
        context is forgotten (the next run fills it again)."""
        out = self.model.forward_at(ids, 0, self.out).copy()
        self.model.reset()
        return out

    def close(self):
        self.model.close()


def summarize(samples_ns, n_tokens):
    """llama-bench's statistics: mean and sample stddev of ns and of tokens/s."""
    ts = [n_tokens * 1e9 / s for s in samples_ns]
    sd = statistics.stdev if len(samples_ns) > 1 else (lambda v: 0.0)
    return {
        "avg_ns": int(statistics.mean(samples_ns)),
        "stddev_ns": int(sd(samples_ns)),
        "avg_ts": statistics.mean(ts),
        "stddev_ts": sd(ts),
        "samples_ns": [int(s) for s in samples_ns],
        "samples_ts": ts,
    }


READ_STREAMS = (1, 2, 4, 8)  # per thread: the read ceiling is the best of these, on both page sizes
PAGES = ("4 KiB", "2 MiB")


def _anon_buffer(nbytes, pages):
    """A touched anonymous mapping of nbytes; '2 MiB' asks for transparent huge pages."""
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if pages == "2 MiB" and hasattr(buf, "madvise") and hasattr(mmap, "MADV_HUGEPAGE"):
        buf.madvise(mmap.MADV_HUGEPAGE)
    np.frombuffer(buf, np.uint64)[:] = 1  # touched, so every page is really there
    return buf


def ceilings(path, threads, nbytes=512 * MIB, tries=3, fma_seconds=0.1, progress=None):
    """The machine's two ceilings, each timed on the model's own thread pool (lib.pyllm_read,
    lib.pyllm_fma in csrc/bandwidth.c):
      read_gbs     the best of READ_STREAMS streams per thread x 4 KiB / 2 MiB pages, each
                   pattern the best of `tries` (the patterns alternate between tries)
      fma_gflops   the f32 FMA peak (independent chains for the ISA), best of `tries`
    and every pattern's figure (read_patterns), so a reader sees what was tried."""
    from ._pyllm import ffi, lib
    from .model import PyllmError, _native_open

    m = _native_open(path, threads, 16)
    patterns = {}
    try:
        for pages in PAGES:  # one buffer at a time: the probe's memory stays nbytes
            if progress:
                progress(f"threads {threads}: read ceiling ({nbytes / MIB:.0f} MiB, {pages} pages)")
            buf = _anon_buffer(nbytes, pages)
            try:
                with ffi.from_buffer(buf) as p:
                    reps = max(1, int(64 * MIB // nbytes))  # a timing of at least 64 MiB read
                    for _ in range(tries):
                        for s in READ_STREAMS:
                            t0 = time.perf_counter()
                            n = lib.pyllm_read(m, p, nbytes, reps, s)
                            dt = time.perf_counter() - t0
                            if n < 0:
                                raise PyllmError(f"pyllm_read refused {nbytes} bytes")
                            key = f"{s} stream{'s' if s > 1 else ''}/thread, {pages} pages"
                            patterns[key] = max(patterns.get(key, 0.0), n / dt / 1e9)
            finally:
                buf.close()
        if progress:
            progress(f"threads {threads}: compute ceiling (f32 FMA)")
        iters, fma = 1 << 16, 0.0
        while True:  # grow the run until it lasts about fma_seconds, then time the best of tries
            t0 = time.perf_counter()
            lib.pyllm_fma(m, iters, ffi.NULL)
            if time.perf_counter() - t0 > fma_seconds / 4 or iters > 1 << 40:
                break
            iters *= 4
        for _ in range(tries):
            t0 = time.perf_counter()
            flops = lib.pyllm_fma(m, iters, ffi.NULL)
            fma = max(fma, flops / (time.perf_counter() - t0) / 1e9)
    finally:
        ffi.release(m)
    best = max(patterns, key=patterns.get)
    return {
        "read_gbs": patterns[best],
        "read_pattern": best,
        "read_patterns": patterns,
        "fma_gflops": fma,
    }


def matmul_flops_per_token(cfg):
    """FLOPs of one token through every layer's matrices (2 per weight: a multiply and an add),
    from the config's own sizes (no padding), the output head excluded."""
    d, hd, hid = cfg["dim"], cfg["head_dim"], cfg["hidden_dim"]
    q, kv = cfg["n_heads"] * hd, cfg["n_kv_heads"] * hd
    per_layer = d * (q + 2 * kv) + q * d + 2 * hid * d + hid * d  # qkv, output, gate and up, down
    return 2 * cfg["n_layers"] * per_layer


def attention_flops(cfg, pos):
    """FLOPs of one token's attention at position pos (it sees pos + 1 positions, or the sliding
    window): scores q.k and the weighted sum of v, 2 FLOPs per product, every head and layer."""
    seen = pos + 1 if not cfg.get("sliding_window") else min(pos + 1, cfg["sliding_window"])
    return 2 * 2 * cfg["n_layers"] * cfg["n_heads"] * cfg["head_dim"] * seen


def test_flops(cfg, test):
    """FLOPs of one run of test: every token's matmuls and attention at its position, and the
    output head for the tokens whose logits are computed (pp: the last; tg: every one)."""
    n = test.n
    head = 2 * cfg["vocab_size"] * cfg["dim"]
    first, last = (
        test.depth,
        test.depth + n - 1,
    )  # attention: the sum over the positions, closed form
    if cfg.get("sliding_window"):
        att = sum(attention_flops(cfg, p) for p in range(first, last + 1))
    else:
        att = (
            2 * 2 * cfg["n_layers"] * cfg["n_heads"] * cfg["head_dim"] * (first + last + 2) * n // 2
        )
    return n * matmul_flops_per_token(cfg) + att + head * (1 if test.kind == "pp" else n)


def kv_bytes_read(cfg, test, k_bytes=2, v_bytes=2):
    """Bytes of KV cache a tg run reads, summed over its tokens (K and V of every position seen)."""
    per_pos = cfg["n_layers"] * cfg["n_kv_heads"] * cfg["head_dim"] * (k_bytes + v_bytes)
    sw = cfg.get("sliding_window")
    return sum(
        per_pos * (min(p + 1, sw) if sw else p + 1) for p in range(test.depth, test.depth + test.n)
    )


def apply_roofline(res, cfg, info, ceil):
    """Adds the ceilings and the test's fraction of its own: tg of the read ceiling (weights and
    the KV cache read per token), pp of the compute ceiling (FLOPs counted from the config). A
    fraction over 100% is no result: the probe read low (or the data stayed in the caches), and
    a warning says so instead."""
    test = Test("pp" if res["n_prompt"] else "tg", res["n_prompt"] or res["n_gen"], res["n_depth"])
    flops = test_flops(cfg, test) / test.n
    res.update(
        {
            "read_bandwidth_gbs": ceil["read_gbs"],
            "read_pattern": ceil["read_pattern"],
            "read_patterns": ceil.get("read_patterns"),
            "fma_gflops": ceil["fma_gflops"],
            "flops_per_token": flops,
        }
    )
    if test.kind == "tg":
        elem = {"f16": 2, "f32": 4}
        kv = kv_bytes_read(
            cfg, test, elem[res.get("type_k", "f16")], elem[res.get("type_v", "f16")]
        )
        per_token = info.bytes_per_token + kv / test.n
        res["bytes_per_token"] = per_token
        res["roofline_bound"] = "read"
        res["roofline_ts"] = ceil["read_gbs"] * 1e9 / per_token
        what = (
            f"decode reads {per_token * res['avg_ts'] / 1e9:.1f} GB/s, "
            f"the read ceiling {ceil['read_gbs']:.1f} GB/s"
        )
    else:
        res["roofline_bound"] = "compute"
        res["roofline_ts"] = ceil["fma_gflops"] * 1e9 / flops
        what = (
            f"prefill computes {flops * res['avg_ts'] / 1e9:.1f} GFLOP/s, "
            f"the FMA ceiling {ceil['fma_gflops']:.1f} GFLOP/s"
        )
    fraction = res["avg_ts"] / res["roofline_ts"]
    res["roofline_fraction"], res["roofline_warning"] = fraction, None
    if fraction > 1:
        res["roofline_fraction"] = None
        res["roofline_warning"] = (
            f"{test.name} at {res['n_threads']} threads: {what}: the probe read low "
            "(or the data stayed in the caches); no fraction reported"
        )
    return res


def bench(
    path,
    tests,
    threads_list,
    reps=5,
    warmup=True,
    roofline=False,
    bw_bytes=512 * MIB,
    on_result=None,
    progress=None,
    cache_types=(("f16", "f16"),),
):
    """Run every test at every thread count and (keys, values) cache type pair; a list of
    llama-bench-style result dicts."""
    info = model_info(path)
    need = max(t.depth + t.n for t in tests)
    max_ctx = info.config["max_seq_len"]
    if need > max_ctx:
        raise ValueError(f"the tests need a context of {need} tokens; the model's is {max_ctx}")
    from ._pyllm import ffi, lib

    simd = ffi.string(lib.pyllm_simd()).decode()
    build = build_info()
    results = []
    for nt, types in [(nt, types) for nt in threads_list for types in cache_types]:
        r = Runner(path, nt, need, max(t.depth for t in tests), cache_types=types)
        try:
            for test in tests:
                if progress:
                    progress(f"threads {nt}, cache {types[0]}/{types[1]}: {test.name}")
                if warmup:
                    r.run(test, n=1 if test.kind == "tg" else None)
                samples = [r.run(test) for _ in range(reps)]
                res = {
                    "model_filename": path,
                    "model_type": info.desc,
                    "model_size": info.size,
                    "model_n_params": info.n_params,
                    "cpu_info": cpu_info(),
                    "simd": simd,
                    "build_commit": build["build_commit"],
                    "kernel_sha256": build["kernel_sha256"],
                    "n_threads": r.threads,
                    "type_k": types[0],
                    "type_v": types[1],
                    "n_prompt": test.n_prompt,
                    "n_gen": test.n_gen,
                    "n_batch": test.n_batch,
                    "n_depth": test.depth,
                    "test_time": datetime.datetime.now(datetime.timezone.utc).strftime(
                        "%Y-%m-%dT%H:%M:%SZ"
                    ),
                }
                res.update(summarize(samples, test.n))
                res.update(
                    {
                        "load_s": r.load_s,
                        "peak_rss_bytes": peak_rss_bytes(),
                        "weight_bytes_per_token": info.bytes_per_token
                        if test.kind == "tg"
                        else None,
                        "bandwidth_gbs": info.bytes_per_token * res["avg_ts"] / 1e9
                        if test.kind == "tg"
                        else None,
                        "read_bandwidth_gbs": None,
                        "fma_gflops": None,
                        "roofline_ts": None,
                        "roofline_fraction": None,
                        "roofline_warning": None,
                        "batch_cost": None,
                    }
                )
                results.append(res)
                if on_result:
                    on_result(res)
        finally:
            r.close()
    batch_costs(results)
    if roofline:  # last: its buffer must not count in the models' peak RSS
        ceil = {
            nt: ceilings(path, nt, bw_bytes, progress=progress)
            for nt in sorted({res["n_threads"] for res in results})
        }
        for res in results:
            if not res.get("n_batch"):  # a verify pass has no single ceiling
                apply_roofline(res, info.config, info, ceil[res["n_threads"]])
    return results


def batch_costs(results):
    """cost(T)/cost(1) for the batch rows: their time over batch1's at the same threads and
    depth."""

    def key(r):
        return r["n_threads"], r["n_depth"], r.get("type_k"), r.get("type_v")

    one = {key(r): r["avg_ns"] for r in results if r.get("n_batch") == 1}
    for r in results:
        base = one.get(key(r))
        if r.get("n_batch") and base:
            r["batch_cost"] = r["avg_ns"] / base


# ---------- output ----------
def test_name(res):
    kind, n = ("pp", res["n_prompt"]) if res["n_prompt"] else ("tg", res["n_gen"])
    if res.get("n_batch"):
        kind, n = "batch", res["n_batch"]
    return Test(kind, n, res["n_depth"]).name


def fmt_size(b):
    return f"{b / GIB:.2f} GiB" if b >= GIB else f"{b / MIB:.2f} MiB"


def fmt_params(n):
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


MD_HEADER = (
    "| model | size | params | threads | type_k | type_v | test | t/s |\n"
    "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
)


def md_row(res):
    return (
        f"| {printable(res['model_type'])} | {fmt_size(res['model_size'])} "
        f"| {fmt_params(res['model_n_params'])} | {res['n_threads']} | {res['type_k']} "
        f"| {res['type_v']} "
        f"| {test_name(res)} | {res['avg_ts']:.2f} ± {res['stddev_ts']:.2f} |"
    )


def footer_name(res):
    """The test's name in the footer tables, with its cache types unless both are f16."""
    types = (res.get("type_k", "f16"), res.get("type_v", "f16"))
    return test_name(res) + ("" if types == ("f16", "f16") else f" ({types[0]}/{types[1]} cache)")


def md_footer(results):
    lines = []
    tg = [r for r in results if r["n_gen"]]
    if tg:
        lines.append("")
        lines.append(
            f"weights read per generated token: {tg[0]['weight_bytes_per_token'] / 1e6:.1f} MB"
        )
        lines.append("| threads | test | weights GB/s |")
        lines.append("| ---: | ---: | ---: |")
        for r in tg:
            lines.append(f"| {r['n_threads']} | {footer_name(r)} | {r['bandwidth_gbs']:.2f} |")
    if any(r.get("roofline_bound") for r in results):
        lines.append("")
        lines.append(
            "roofline: decode (tg) against the read ceiling (weights and KV cache read per token), "
            "prefill (pp) against the f32 FMA ceiling (FLOPs per token from the config); "
            "ceilings timed on the model's own thread pool"
        )
        lines.append("| threads | test | t/s | bound by | ceiling | roofline t/s | fraction |")
        lines.append("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for r in results:
            if not r.get("roofline_bound"):
                continue
            ceiling = (
                f"{r['read_bandwidth_gbs']:.1f} GB/s ({r['read_pattern']})"
                if r["roofline_bound"] == "read"
                else f"{r['fma_gflops']:.1f} GFLOP/s"
            )
            frac = (
                f"{100 * r['roofline_fraction']:.0f}%"
                if r["roofline_fraction"] is not None
                else "probe low"
            )
            lines.append(
                f"| {r['n_threads']} | {footer_name(r)} | {r['avg_ts']:.2f} "
                f"| {r['roofline_bound']} "
                f"| {ceiling} | {r['roofline_ts']:.1f} | {frac} |"
            )
        for r in results:
            if r.get("roofline_warning"):
                lines.append(f"warning: {r['roofline_warning']}")
    batch = [r for r in results if r.get("n_batch") and r["batch_cost"] is not None]
    if batch:
        sizes = sorted({r["n_batch"] for r in batch})
        lines.append("")
        lines.append(
            "small-batch cost: one forward over T new tokens with every position's logits "
            "(a lookup-drafting verify pass), relative to T = 1"
        )
        lines.append("| threads | depth | " + " | ".join(f"T={T}" for T in sizes) + " |")
        lines.append("| ---: | ---: | " + " | ".join("---:" for _ in sizes) + " |")
        for key in sorted(
            {(r["n_threads"], r["n_depth"], r["type_k"], r["type_v"]) for r in batch}
        ):
            cost = {
                r["n_batch"]: r["batch_cost"]
                for r in batch
                if (r["n_threads"], r["n_depth"], r["type_k"], r["type_v"]) == key
            }
            cache = "" if key[2:] == ("f16", "f16") else f" ({key[2]}/{key[3]} cache)"
            lines.append(
                f"| {key[0]} | {key[1]}{cache} | "
                + " | ".join(f"{cost[T]:.2f}" if T in cost else "-" for T in sizes)
                + " |"
            )
    loads = {}
    for r in results:
        loads.setdefault(r["n_threads"], r["load_s"])
    lines.append("")
    lines.append(
        "load (open + first touch): "
        + ", ".join(f"{v:.3f} s ({k} threads)" for k, v in loads.items())
        + f"; peak RSS {max(r['peak_rss_bytes'] for r in results) / MIB:.1f} MiB"
        + f"; kernel {results[0]['simd']} (build {results[0]['build_commit']}, "
        f"{results[0]['kernel_sha256']}); {results[0]['cpu_info']}"
    )
    return "\n".join(lines)


# ---------- the command ----------
def add_arguments(p):
    p.add_argument("model", help="a pyllm parameters file")
    p.add_argument(
        "-p",
        "--n-prompt",
        default="512",
        help="prompt lengths, comma-separated (default 512; 0 = none)",
    )
    p.add_argument(
        "-n",
        "--n-gen",
        default="128",
        help="tokens to generate, comma-separated (default 128; 0 = none)",
    )
    p.add_argument(
        "-d",
        "--n-depth",
        default="0",
        help="tokens already in the KV cache before each test, comma-separated (default 0)",
    )
    p.add_argument(
        "-t", "--threads", default=None, help="thread counts, comma-separated (default: all cores)"
    )
    p.add_argument(
        "-ctk",
        "--cache-type-k",
        default="f16",
        help="KV cache types for keys, comma-separated: f16 (default), f32",
    )
    p.add_argument(
        "-ctv",
        "--cache-type-v",
        default="f16",
        help="KV cache types for values, comma-separated: f16 (default), f32",
    )
    p.add_argument(
        "-r", "--repetitions", type=int, default=5, help="timed runs per test (default 5)"
    )
    p.add_argument(
        "-o", "--output", choices=("md", "json"), default="md", help="output format (default md)"
    )
    p.add_argument(
        "--batch",
        default="0",
        metavar="T,..",
        help="also time small batches of T tokens as lookup-drafting verify passes "
        "and report cost(T)/cost(1), e.g. 1,2,4,8,16 (default 0 = none)",
    )
    p.add_argument(
        "--batch-depth",
        type=int,
        default=512,
        help="tokens in the KV cache before each small-batch pass (default 512)",
    )
    p.add_argument(
        "--roofline",
        action="store_true",
        help="measure the machine's read and f32 FMA ceilings; "
        "report tg and pp as fractions of them",
    )
    p.add_argument(
        "--bw-mib",
        type=int,
        default=512,
        help="buffer of the read ceiling in MiB "
        "(default 512; many times the last-level cache, or it reads the cache)",
    )
    p.add_argument("--no-warmup", action="store_true", help="skip the warmup run of each test")
    p.add_argument(
        "--progress", action="store_true", help="print each test as it starts, to stderr"
    )


def main(a):
    n_prompt = int_list(a.n_prompt, "-p")
    n_gen = int_list(a.n_gen, "-n")
    depths = int_list(a.n_depth, "-d")
    threads = int_list(a.threads, "-t", lo=1) if a.threads is not None else [default_threads()]
    if a.repetitions < 1:
        raise ValueError(f"-r: {a.repetitions} repetitions; at least 1")
    if not 1 <= a.bw_mib < 16384:
        raise ValueError(f"--bw-mib: {a.bw_mib}; 1 to 16383")
    types_k, types_v = (
        cache_type_list(a.cache_type_k, "-ctk"),
        cache_type_list(a.cache_type_v, "-ctv"),
    )
    batch = [T for T in int_list(a.batch, "--batch") if T > 0]
    if a.batch_depth < 0:
        raise ValueError(f"--batch-depth: {a.batch_depth} is below 0")
    tests = make_tests(n_prompt, n_gen, depths)
    if batch:  # batch1 first: the others are reported relative to it
        tests += [Test("batch", T, a.batch_depth) for T in sorted(set(batch) | {1})]
    if not tests:
        raise ValueError("nothing to run: every -p, -n and --batch is 0")
    md = a.output == "md"
    if md:
        print(MD_HEADER, flush=True)
    progress = (lambda s: print(s, file=sys.stderr, flush=True)) if a.progress else None
    results = bench(
        a.model,
        tests,
        threads,
        reps=a.repetitions,
        warmup=not a.no_warmup,
        roofline=a.roofline,
        bw_bytes=a.bw_mib * MIB,
        cache_types=[(k, v) for k in types_k for v in types_v],
        on_result=(lambda r: print(md_row(r), flush=True)) if md else None,
        progress=progress,
    )
    if md:
        print(md_footer(results))
    else:
        print(json.dumps(results, indent=2))
    return 0
