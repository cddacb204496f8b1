"""pyllm's lookup decoding beside llama.cpp's plain and prompt-lookup decoding, in one run.

    python benchmarks/lookup_llamacpp.py [MODEL] [--gguf F16.gguf] [-t 1,2] [-n 200] [-r 3]
                                         [--only TASK] [--json-out FILE]

The tasks of benchmarks/lookup.py, the same prompt token ids fed to both engines (the F16
GGUF that compare.py writes from the same weights: same vocabulary, no tokenizer between),
the same threads. Each round runs five modes, their order reversed every other round:
  pyllm plain, pyllm lookup     Model.generate, greedy, draft_max 0 / the default
  llama.cpp plain               the low-level API, one llama_decode per token, argmax
  llama.cpp hl plain / lookup   llama-cpp-python's Llama.generate (temp 0) without and with
                                draft_model=LlamaPromptLookupDecoding(num_pred_tokens=10)
t/s is decode only: from the first generated token to the last (every engine keeps the
prompt cached between runs). The high-level Llama adds Python work per token, so its lookup
speedup is quoted against its own plain; pyllm's against pyllm's plain and llama.cpp's
low-level plain. Medians of -r rounds.
"""

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.append(ROOT)
sys.path.append(os.path.join(ROOT, "benchmarks"))

from lookup import TASKS, geomean, load_tasks, prompt_ids, run_once  # noqa: E402

from compare import LlamaCppEngine, ensure_gguf  # noqa: E402
from pyllm import bench, load  # noqa: E402
from pyllm.lookup import DRAFT_MAX, DRAFT_MIN, BatchCost  # noqa: E402

MODES = (
    "pyllm plain",
    "pyllm lookup",
    "llama.cpp plain",
    "llama.cpp hl plain",
    "llama.cpp hl lookup",
)
DEFAULT_MODEL = os.path.join(ROOT, "weights", "smollm2-135m-instruct.f16.bin")


def decode_rate(stamps):
    """Tokens per second from the first token's time stamp to the last's (prefill excluded)."""
    if len(stamps) < 2 or stamps[-1] <= stamps[0]:
        return float("nan")
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def leading_equal(a, b):
    return len(os.path.commonprefix([a, b]))


class LlamaCpp:
    """llama.cpp on the GGUF: a low-level context for plain greedy, a high-level Llama for its
    prompt lookup (draft_model switched on and off on the same object)."""

    def __init__(self, gguf, threads, n_ctx):
        import llama_cpp
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        ns = argparse.Namespace(gguf=gguf, n_ctx=n_ctx, threads=threads, max_depth=1)
        self.low = LlamaCppEngine(ns)
        self.draft = LlamaPromptLookupDecoding(num_pred_tokens=10)
        self.hl = llama_cpp.Llama(
            model_path=gguf,
            n_threads=threads,
            n_threads_batch=threads,
            n_ctx=n_ctx,
            n_batch=512,
            logits_all=True,
            draft_model=self.draft,
            verbose=False,
        )
        self.eos = self.hl.token_eos()
        self.prefilled = None

    def plain(self, ids, n):
        e, L = self.low, self.low.L
        if self.prefilled != ids:  # the prompt but its last token, once
            L.llama_memory_clear(e.mem, True)
            e._decode(ids[:-1])
            self.prefilled = list(ids)
        e._cut(len(ids) - 1)
        out, stamps, tok = [], [], ids[-1]
        while len(out) < n:
            e._decode([tok], n_batch=1)
            p = L.llama_get_logits_ith(e.ctx, -1)
            tok = int(np.ctypeslib.as_array(p, shape=(e.vocab,)).argmax())
            stamps.append(time.perf_counter())
            if tok == self.eos:
                break
            out.append(tok)
        return out, decode_rate(stamps)

    def high_level(self, ids, n, lookup):
        self.hl.draft_model = self.draft if lookup else None
        out, stamps = [], []
        for tok in self.hl.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0):
            stamps.append(time.perf_counter())
            if tok == self.eos or len(out) >= n:
                break
            out.append(tok)
        return out, decode_rate(stamps[: len(out)])

    def close(self):
        self.hl.close()


def run_mode(mode, m, lc, ids, n):
    """One run of a mode: (the generated text, decode t/s)."""
    if mode.startswith("pyllm"):
        lookup = mode == "pyllm lookup"
        if lookup:
            m.batch_cost = BatchCost()  # a fresh cost model, as a one-shot generate
        text, s = run_once(m, ids, n, DRAFT_MAX if lookup else 0, DRAFT_MIN)
        return text, s["gen_tokens"] / s["decode_s"]
    if mode == "llama.cpp plain":
        out, ts = lc.plain(ids, n)
    else:
        out, ts = lc.high_level(ids, n, lookup=mode.endswith("lookup"))
    return m.tokenizer.decode(out), ts


def bench_task(m, lc, task, n, reps):
    ids = prompt_ids(m, task)
    for mode in MODES:  # warm up: every engine's prompt prefilled and cached
        run_mode(mode, m, lc, ids, 4)
    rates = {mode: [] for mode in MODES}
    texts = {}
    for r in range(reps):
        for mode in MODES if r % 2 == 0 else MODES[::-1]:
            out, ts = run_mode(mode, m, lc, ids, n)
            rates[mode].append(ts)
            texts.setdefault(mode, out)
    return row(task, rates, texts)


def row(task, rates, texts):
    """The medians, the ratios the issue asks for, and how far the engines' texts agree."""
    med = {mode: statistics.median(v) for mode, v in rates.items()}
    mine = texts["pyllm plain"]
    if texts["pyllm lookup"] != mine:
        raise SystemExit(f"lookup_llamacpp: task {task['name']}: pyllm's lookup text differs")
    return {
        "task": task["name"],
        "kind": task["kind"],
        "chars": len(mine),
        "ts": med,
        "samples_ts": rates,
        "pyllm_speedup": med["pyllm lookup"] / med["pyllm plain"],
        "pyllm_lookup_over_llamacpp_plain": med["pyllm lookup"] / med["llama.cpp plain"],
        "llamacpp_speedup": med["llama.cpp hl lookup"] / med["llama.cpp hl plain"],
        "llamacpp_lookup_equal": texts["llama.cpp hl lookup"] == texts["llama.cpp hl plain"],
        "leading_equal_to_pyllm": leading_equal(mine, texts["llama.cpp plain"]),
    }


RATIOS = ("pyllm_speedup", "pyllm_lookup_over_llamacpp_plain", "llamacpp_speedup")


def summary(rows):
    """Geometric means of the ratios over the copy tasks and over the open ones."""
    out = {}
    for kind in ("copy", "open"):
        mine = [r for r in rows if r["kind"] == kind]
        if mine:
            out[kind] = {k: geomean([r[k] for r in mine]) for k in RATIOS}
    return out


def print_row(nt, r):
    ts = " | ".join(f"{r['ts'][mode]:.1f}" for mode in MODES)
    ratios = " | ".join(f"{r[k]:.2f}x" for k in RATIOS)
    same = f"{r['leading_equal_to_pyllm']}/{r['chars']}"
    print(f"| {nt} | {r['task']} | {r['kind']} | {ts} | {ratios} | {same} |", flush=True)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    p.add_argument("--gguf", default=None, help="the F16 GGUF (default: MODEL with .gguf)")
    p.add_argument("-t", "--threads", default="1,2", help="thread counts (default 1,2)")
    p.add_argument("-n", "--n-predict", type=int, default=200)
    p.add_argument("-r", "--repetitions", type=int, default=3)
    p.add_argument("--tasks", default=TASKS)
    p.add_argument("--only", action="append", default=None, metavar="NAME")
    p.add_argument("--json-out", default=None)
    a = p.parse_args(argv)
    if a.repetitions < 1 or a.n_predict < 1:
        p.error("-r and -n must be at least 1")
    a.gguf = a.gguf or os.path.splitext(a.model)[0] + ".gguf"
    a.threads = bench.int_list(a.threads, "-t", lo=1)
    return a


def main(argv=None):
    a = parse_args(argv)
    tasks = [t for t in load_tasks(a.tasks) if not a.only or t["name"] in a.only]
    if not tasks:
        print(f"lookup_llamacpp: no task named {', '.join(a.only)}", file=sys.stderr)
        return 1
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print(
            "lookup_llamacpp: llama-cpp-python is not installed (make compare installs it)",
            file=sys.stderr,
        )
        return 1
    ensure_gguf(a.model, a.gguf)
    print(
        f"{os.path.basename(a.model)}; {bench.cpu_info()}; greedy, -n {a.n_predict}, "
        f"-r {a.repetitions}; build {bench.build_info()['build_commit']}\n"
    )
    print(
        "| threads | task | kind | "
        + " | ".join(f"{m} t/s" for m in MODES)
        + " | pyllm lookup / plain | pyllm lookup / llama.cpp plain "
        "| llama.cpp lookup / hl plain | llama.cpp plain = pyllm (leading chars) |"
    )
    print("| ---: | --- | --- |" + " ---: |" * (len(MODES) + 4))
    results = []
    for nt in a.threads:
        m = load(a.model, threads=nt)
        # the longest prompt and its reply: llama-cpp-python's logits_all keeps n_ctx rows
        n_ctx = min(m.n_ctx, max(len(prompt_ids(m, t)) for t in tasks) + a.n_predict + 16)
        lc = LlamaCpp(a.gguf, nt, n_ctx)
        try:
            rows = [bench_task(m, lc, t, a.n_predict, a.repetitions) for t in tasks]
        finally:
            lc.close()
            m.close()
        for r in rows:
            print_row(nt, r)
        for kind, g in summary(rows).items():
            cells = " | ".join(f"**{g[k]:.2f}x**" for k in RATIOS)
            print(
                f"| {nt} | {kind} tasks, geometric mean |"
                + " |" * (len(MODES) + 1)
                + f" {cells} | |"
            )
        results.append({"n_threads": nt, "rows": rows, "summary": summary(rows)})
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
