"""Plots of benchmarks/compare.py's JSON (matplotlib, PNG).

  python benchmarks/plot.py [benchmarks/out/compare.json] [-o benchmarks/out]

speed.png   tok/s per test (depth 0) and thread count, one bar per engine (± stddev)
depth.png   decode (tg) tok/s against the depth already in the KV cache, one line per
            engine and thread count
"""

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {
    "pyllm": "#d62728",
    "llama.cpp": "#1f77b4",
    "llama.cpp-norepack": "#17becf",
    "hf-f32": "#2ca02c",
    "hf-bf16": "#9467bd",
}


def engines_of(doc):
    seen = []
    for r in doc["results"]:
        if r["engine"] not in seen:
            seen.append(r["engine"])
    return seen


def title(doc):
    m = doc["machine"]
    return f"{doc['model']['type']}: {m['cpu']}, {m['cores']} cores, {doc['date'][:10]}"


def plot_speed(doc, path):
    engines = engines_of(doc)
    rows = [r for r in doc["results"] if r["n_depth"] == 0]
    groups = []  # (test, threads), in run order
    for r in rows:
        g = (r["test"], r["n_threads"])
        if g not in groups:
            groups.append(g)
    groups.sort(key=lambda g: (not g[0].startswith("pp"), g[0], g[1]))
    by = {(r["test"], r["n_threads"], r["engine"]): r for r in rows}
    kinds = sorted({g[0] for g in groups}, key=lambda t: (not t.startswith("pp"), t))
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4.2), squeeze=False)
    width = 0.8 / max(1, len(engines))
    for ax, kind in zip(axes[0], kinds):
        gs = [g for g in groups if g[0] == kind]
        for k, e in enumerate(engines):
            xs, ys, es = [], [], []
            for i, g in enumerate(gs):
                r = by.get((g[0], g[1], e))
                if r:
                    xs.append(i + (k - (len(engines) - 1) / 2) * width)
                    ys.append(r["avg_ts"])
                    es.append(r["stddev_ts"])
            bars = ax.bar(xs, ys, width, yerr=es, capsize=2, label=e, color=COLORS.get(e))
            ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
        ax.set_xticks(range(len(gs)), [f"{g[1]} thread{'s' if g[1] > 1 else ''}" for g in gs])
        ax.set_title(kind)
        ax.set_ylabel("tokens/s")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title(doc), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_depth(doc, path):
    rows = [r for r in doc["results"] if r["n_gen"]]
    if len({r["n_depth"] for r in rows}) < 2:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = ["-", "--", ":", "-."]
    threads = sorted({r["n_threads"] for r in rows})
    for e in engines_of(doc):
        for j, t in enumerate(threads):
            pts = sorted(
                (r["n_depth"], r["avg_ts"], r["stddev_ts"])
                for r in rows
                if r["engine"] == e and r["n_threads"] == t
            )
            if not pts:
                continue
            d, y, s = zip(*pts)
            ax.errorbar(
                d,
                y,
                yerr=s,
                marker="o",
                ms=4,
                capsize=2,
                ls=styles[j % len(styles)],
                color=COLORS.get(e),
                label=f"{e}, {t} thread{'s' if t > 1 else ''}",
            )
    n_gen = rows[0]["n_gen"]
    ax.set_xlabel("depth: tokens already in the KV cache")
    ax.set_ylabel(f"decode tokens/s (tg{n_gen})")
    ax.set_xticks(sorted({r["n_depth"] for r in rows}))
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(title(doc), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None):
    ap = argparse.ArgumentParser(description="plot benchmarks/compare.py's JSON")
    ap.add_argument("json", nargs="?", default=os.path.join(HERE, "out", "compare.json"))
    ap.add_argument(
        "-o", "--out-dir", default=None, help="where the PNGs go (default: next to the JSON)"
    )
    a = ap.parse_args(argv)
    with open(a.json) as f:
        doc = json.load(f)
    out = a.out_dir or os.path.dirname(os.path.abspath(a.json))
    os.makedirs(out, exist_ok=True)
    speed = os.path.join(out, "speed.png")
    plot_speed(doc, speed)
    print(f"wrote {speed}")
    depth = os.path.join(out, "depth.png")
    if plot_depth(doc, depth):
        print(f"wrote {depth}")
    else:
        print("no tg tests at more than one depth: no depth.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
