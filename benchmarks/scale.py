"""How cost grows with the model: pyllm and llama.cpp side by side on 135M, 1B and 3B.

    python benchmarks/scale.py [--models 135m,1b,3b] [-t 2] [-r 2] [-p 512] [-n 128] [--depth 4096]
    (or: make bench-scale)

135m is the real SmolLM2-135M file; 1b and 3b are random-weight files shaped like
Llama-3.2-1B and Llama-3.2-3B (their configs; random f16 values: speed does not depend on
the values), built under weights/ when missing (never committed), one tensor at a time
through pyllm/format.py's writer. For each model:
  1. its F16 GGUF (compare.py's streaming export), then `pyllm convert` of that GGUF back,
     in a child process whose peak RSS is recorded (conversion must stream: well below the
     file's size), and the round trip's tensors checked equal to the source's;
  2. benchmarks/compare.py with the engines pyllm and llama.cpp: pp512, tg128, tg128 at
     --depth, load time, peak RSS, and the same-weights logits check;
  3. the ceilings (pyllm.bench.ceilings, once per thread count, on the model's pool) and
     pyllm's fraction of them: pp of the f32 FMA ceiling, tg of the read ceiling.
Writes benchmarks/out/scale.json, prints a table, and plots benchmarks/out/scale.png.
"""

import argparse
import functools
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.append(ROOT)
sys.path.append(HERE)

import compare  # noqa: E402
from pyllm import bench, format  # noqa: E402
from pyllm.bench import Test  # noqa: E402

WEIGHTS = os.path.join(ROOT, "weights")
SMOLLM = os.path.join(WEIGHTS, "smollm2-135m-instruct.f16.bin")
# Llama-3.2's shapes (config.json of meta-llama/Llama-3.2-1B and -3B): tied embeddings, GQA 8 KV
# heads
SHAPES = {
    "1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64, hidden_dim=8192),
    "3b": dict(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, head_dim=128, hidden_dim=8192),
}
VOCAB, CONTEXT, THETA = 128256, 8192, 500000.0


def model_path(name):
    return SMOLLM if name == "135m" else os.path.join(WEIGHTS, f"random-llama-{name}.f16.bin")


def random_f16(shape, rng, scale_exp):
    """Random f16 values of magnitude 2^scale_exp .. 2^(scale_exp+1), either sign, straight from
    random bits (fast, and never inf, NaN or subnormal)."""
    bits = rng.integers(0, 1 << 16, size=shape, dtype=np.uint16)
    return ((bits & np.uint16(0x83FF)) | np.uint16((scale_exp + 15) << 10)).view(np.float16)


def make_random_model(path, name, seed=0):
    """A pyllm file of Llama-3.2's shape with random weights and SmolLM2's tokenizer, padded with
    reserved tokens to the 128256-token vocabulary (so llama.cpp loads the GGUF export too)."""
    src = format.read(SMOLLM, map_tensors=False)
    tok = dict(src.meta["tokenizer"])
    extra = VOCAB - len(tok["tokens"])
    tok["tokens"] = tok["tokens"] + [f"<|reserved_{i}|>" for i in range(extra)]
    tok["token_type"] = tok["token_type"] + [3] * extra  # control tokens: never produced by text
    shape = SHAPES[name]
    cfg = dict(
        shape,
        vocab_size=VOCAB,
        max_seq_len=CONTEXT,
        flags=format.FLAG_TIED_OUTPUT,
        sliding_window=0,
        norm_eps=1e-5,
    )
    name = f"random weights, Llama-3.2-{name.upper()}'s shape"
    meta = {
        "config": {
            "architecture": "llama",
            "name": name,
            "rope_theta": THETA,
            "context_length": CONTEXT,
        },
        "tokenizer": tok,
        "provenance": {"source": "benchmarks/scale.py (random weights)", "seed": seed},
    }
    rng = np.random.default_rng(seed)
    hd = shape["head_dim"]
    freqs = (1.0 / THETA ** (np.arange(0, hd, 2, dtype=np.float64) / hd)).astype(np.float32)
    exp = -int(np.ceil(np.log2(shape["dim"]) / 2)) - 1  # |w| ~ 1/sqrt(dim): activations stay O(1)
    specs = {}
    for tname, tshape, dtype in format.tensor_layout(cfg):
        if tname == "rope_freqs":
            load = freqs.copy
        elif len(tshape) == 1:  # norms: ones
            load = functools.partial(np.ones, tshape, np.float16)
        else:
            load = functools.partial(random_f16, tshape, rng, exp)
        specs[tname] = format.TensorSpec(tname, tshape, dtype, load)
    print(f"writing {path} ({name}) ...", file=sys.stderr, flush=True)
    format.write(path, cfg, meta, specs)


def convert_round_trip(src, gguf_path):
    """`pyllm convert` of the GGUF in a child process: its peak RSS and time, and whether every
    tensor of the result equals the source's. The round trip's file is removed after."""
    out = os.path.splitext(src)[0] + ".roundtrip.bin"
    code = (
        "import sys; from pyllm import cli, bench; "
        "rc = cli.main(['convert', sys.argv[1], sys.argv[2]]); "
        "print(bench.peak_rss_bytes()); sys.exit(rc)"
    )
    t0 = time.perf_counter()
    p = subprocess.run(
        [sys.executable, "-c", code, gguf_path, out], capture_output=True, text=True, cwd=ROOT
    )
    seconds = time.perf_counter() - t0
    if p.returncode:
        raise SystemExit(f"scale: pyllm convert {gguf_path} failed: {p.stderr.strip()[-500:]}")
    rss = int(p.stdout.strip().splitlines()[-1])
    try:
        a, b = format.read(src), format.read(out)
        same = a.tensors.keys() == b.tensors.keys() and all(
            np.array_equal(a.tensors[k].view(np.uint8), b.tensors[k].view(np.uint8))
            for k in a.tensors
        )
    finally:
        os.unlink(out)
    return {
        "convert_s": seconds,
        "convert_peak_rss_bytes": rss,
        "gguf_bytes": os.path.getsize(gguf_path),
        "round_trip_identical": bool(same),
    }


def run_model(name, a, ceil):
    path = model_path(name)
    if name != "135m" and not os.path.exists(path):
        make_random_model(path, name)
    gguf_path = os.path.splitext(path)[0] + ".gguf"
    compare.ensure_gguf(path, gguf_path)
    conv = (
        convert_round_trip(path, gguf_path)
        if a.convert
        else {
            "convert_s": None,
            "convert_peak_rss_bytes": None,
            "gguf_bytes": os.path.getsize(gguf_path),
            "round_trip_identical": None,
        }
    )
    if a.convert:
        print(
            f"{name}: pyllm convert of the {conv['gguf_bytes'] / 1e9:.2f} GB GGUF: peak RSS "
            f"{conv['convert_peak_rss_bytes'] / 2**20:.0f} MiB, {conv['convert_s']:.1f} s, "
            "round trip "
            f"{'identical' if conv['round_trip_identical'] else 'DIFFERS'}",
            flush=True,
        )
    out = os.path.join(a.out_dir, f"scale-{name}.json")
    argv = [
        path,
        "--gguf",
        gguf_path,
        "-p",
        str(a.n_prompt),
        "-n",
        str(a.n_gen),
        "--decode-depths",
        str(a.depth),
        "-t",
        a.threads,
        "-r",
        str(a.repetitions),
        "--engines",
        "pyllm,llama.cpp",
        "--max-other-load",
        str(a.max_other_load),
        "--no-roofline",
        "--json-out",
        out,
    ]
    compare.main(argv)
    with open(out) as f:
        doc = json.load(f)
    info = bench.model_info(path)
    rows = []
    for r in doc["results"]:
        test = Test("pp" if r["n_prompt"] else "tg", r["n_prompt"] or r["n_gen"], r["n_depth"])
        row = dict(r)
        if r["engine"] == "pyllm":
            res = bench.apply_roofline(
                {
                    "n_prompt": r["n_prompt"],
                    "n_gen": r["n_gen"],
                    "n_depth": r["n_depth"],
                    "n_threads": r["n_threads"],
                    "avg_ts": r["avg_ts"],
                },
                info.config,
                info,
                ceil[r["n_threads"]],
            )
            row.update(
                {
                    k: res[k]
                    for k in (
                        "roofline_bound",
                        "roofline_ts",
                        "roofline_fraction",
                        "roofline_warning",
                    )
                }
            )
            if res["roofline_warning"]:
                print("warning: " + res["roofline_warning"], file=sys.stderr)
        row["test"] = test.name
        rows.append(row)
    return {
        "model": name,
        "file": path,
        "type": info.desc,
        "n_params": info.n_params,
        "size": info.size,
        "weight_bytes_per_token": info.bytes_per_token,
        **conv,
        "loads": doc["loads"],
        "check": doc["check"],
        "results": rows,
    }


def table(doc):
    """One row per model, thread count and test: both engines' t/s, the ratio, pyllm's fraction."""
    lines = [
        "| model | params | threads | test | pyllm t/s | llama.cpp t/s | pyllm/llama.cpp "
        "| pyllm of ceiling |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for m in doc["models"]:
        by = {}
        for r in m["results"]:
            by.setdefault((r["n_threads"], r["test"]), {})[r["engine"]] = r
        for (nt, test), e in by.items():
            p, q = e.get("pyllm"), e.get("llama.cpp")
            frac = (
                ""
                if not p
                else (
                    f"{100 * p['roofline_fraction']:.0f}% {p['roofline_bound']}"
                    if p.get("roofline_fraction") is not None
                    else "probe low"
                )
            )
            ts = [f"{x['avg_ts']:.2f}" if x else "" for x in (p, q)]
            ratio = f"{p['avg_ts'] / q['avg_ts']:.2f}" if p and q else ""
            lines.append(
                f"| {m['model']} | {m['n_params'] / 1e9:.2f} B | {nt} | {test} | {ts[0]} | {ts[1]} "
                f"| {ratio} | {frac} |"
            )
    lines += [
        "",
        "| model | file GB | engine | threads | load s | peak RSS MiB |",
        "| --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for m in doc["models"]:
        for ld in m["loads"]:
            rss = f"{ld['peak_rss_bytes'] / 2**20:.0f}" if ld["peak_rss_bytes"] else "?"
            lines.append(
                f"| {m['model']} | {m['size'] / 1e9:.2f} | {ld['engine']} | {ld['n_threads']} "
                f"| {ld['load_s']:.2f} | {rss} |"
            )
    converted = [m for m in doc["models"] if m["convert_s"] is not None]
    if converted:
        lines += [
            "",
            "| model | GGUF GB | `pyllm convert` peak RSS MiB | convert s | round trip |",
            "| --- | ---: | ---: | ---: | --- |",
        ]
    for m in converted:
        lines.append(
            f"| {m['model']} | {m['gguf_bytes'] / 1e9:.2f} "
            f"| {m['convert_peak_rss_bytes'] / 2**20:.0f} "
            f"| {m['convert_s']:.1f} | {'identical' if m['round_trip_identical'] else 'DIFFERS'} |"
        )
    c = doc["ceilings"]
    lines += [
        "",
        "ceilings (on the model's pool): "
        + "; ".join(
            f"{nt} threads: read {v['read_gbs']:.1f} GB/s ({v['read_pattern']}), "
            f"FMA {v['fma_gflops']:.0f} GFLOP/s"
            for nt, v in c.items()
        ),
    ]
    return "\n".join(lines)


def plot(doc, path):
    try:
        import matplotlib
    except ImportError:
        print("scale: no matplotlib, no plot (make bench-scale installs it)", file=sys.stderr)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401 (matplotlib.ticker below)

    tests = list(dict.fromkeys(r["test"] for m in doc["models"] for r in m["results"]))
    threads = sorted({r["n_threads"] for m in doc["models"] for r in m["results"]})
    fig, axes = plt.subplots(1, len(tests), figsize=(5.2 * len(tests), 4.2), squeeze=False)
    for ax, test in zip(axes[0], tests):
        for engine, style in (("pyllm", "-o"), ("llama.cpp", "--s")):
            for nt in threads:
                pts = [
                    (m["n_params"] / 1e9, r["avg_ts"])
                    for m in doc["models"]
                    for r in m["results"]
                    if r["test"] == test and r["engine"] == engine and r["n_threads"] == nt
                ]
                if pts:
                    x, y = zip(*pts)
                    ax.plot(x, y, style, label=f"{engine}, {nt} thread{'s' if nt > 1 else ''}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        sizes = [m["n_params"] / 1e9 for m in doc["models"]]
        ax.set_xticks(sizes, [m["model"] for m in doc["models"]])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("model (log of parameters)")
        ax.set_ylabel("tokens/s")
        ax.set_title(test)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"pyllm vs llama.cpp (F16) by model size; {doc['machine']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="135m,1b,3b", help="comma list of 135m, 1b, 3b")
    ap.add_argument(
        "-t",
        "--threads",
        default=str(bench.default_threads()),
        help="thread counts (default: all cores)",
    )
    ap.add_argument("-r", "--repetitions", type=int, default=2)
    ap.add_argument(
        "-p", "--n-prompt", type=int, default=512, help="the prompt test, ppN (default 512)"
    )
    ap.add_argument(
        "-n", "--n-gen", type=int, default=128, help="the generation tests, tgN (default 128)"
    )
    ap.add_argument(
        "--depth",
        type=int,
        default=4096,
        help="the depth of the third test, tgN @ dD (default 4096)",
    )
    ap.add_argument("--max-other-load", type=float, default=0.1, help="as compare.py's (1 = off)")
    ap.add_argument("--out-dir", default=os.path.join(HERE, "out"))
    ap.add_argument(
        "--no-convert",
        dest="convert",
        action="store_false",
        help="skip the `pyllm convert` round trip (its peak RSS and check)",
    )
    a = ap.parse_args(argv)
    models = [m.strip() for m in a.models.split(",") if m.strip()]
    bad = [m for m in models if m != "135m" and m not in SHAPES]
    if bad or not models:
        raise SystemExit(
            f"scale: unknown model {bad[0] if bad else a.models!r} (choose from 135m, 1b, 3b)"
        )
    try:
        threads = bench.int_list(a.threads, "-t", lo=1)
    except ValueError as e:
        raise SystemExit(f"scale: {e}") from None
    os.makedirs(a.out_dir, exist_ok=True)
    t0 = time.perf_counter()
    ceil = {nt: bench.ceilings(SMOLLM, nt) for nt in threads}  # the machine's, not the model's
    doc = {
        "machine": f"{bench.cpu_info()}, {bench.default_threads()} cores",
        "ceilings": ceil,
        "models": [],
    }
    for name in models:
        doc["models"].append(run_model(name, a, ceil))
    doc["seconds"] = time.perf_counter() - t0
    path = os.path.join(a.out_dir, "scale.json")
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    print("\n" + table(doc))
    print(f"\n{doc['seconds'] / 60:.1f} minutes; wrote {path}")
    if plot(doc, os.path.join(a.out_dir, "scale.png")):
        print(f"wrote {os.path.join(a.out_dir, 'scale.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
