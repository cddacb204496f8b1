"""Lookup drafting on a task set: greedy decode speed with and without drafting, side by side.

    python benchmarks/lookup.py [MODEL] [-t 1,2] [-n 200] [-r 3] [--draft-max 16] [--warm]
                                [--tasks benchmarks/lookup_tasks] [-o md|json] [--json-out FILE]

Each task (benchmarks/lookup_tasks/tasks.json) is one user message rendered with the model's
chat template, as `pyllm chat` sends it. Per thread count and task, -r rounds of one plain
run (draft_max=0) and one drafted run, their order alternating (ABBA), all greedy, each
generating up to -n tokens; t/s is decode only (generated tokens / decode seconds, the
prompt's prefill excluded: it is cached after the first run). The figures are medians and
the speedup the ratio of the medians; "in CPU time" is the same ratio over the process's CPU
seconds, which at 1 thread is what the wall clock shows on a quiet machine (a busy one
stretches the wall clock, not the CPU time; at 2 threads it also counts the pool's
spinning). Every drafted run's text must equal the plain run's, token for token, or the
benchmark fails.

By default each drafted run starts with a fresh cost model (lookup.BatchCost), as a one-shot
`pyllm generate` does; --warm keeps what the model learnt across runs, as a chat session does.
"""

import argparse
import json
import math
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.append(ROOT)

from pyllm import bench, load  # noqa: E402
from pyllm.chat import Chat  # noqa: E402
from pyllm.lookup import DRAFT_MAX, DRAFT_MIN, BatchCost  # noqa: E402

DEFAULT_MODEL = os.path.join(ROOT, "weights", "smollm2-135m-instruct.f16.bin")
TASKS = os.path.join(ROOT, "benchmarks", "lookup_tasks")


class Mismatch(Exception):
    pass


def load_tasks(folder):
    with open(os.path.join(folder, "tasks.json"), encoding="utf-8") as f:
        spec = json.load(f)
    tasks = []
    for t in spec["tasks"]:
        doc = ""
        if t.get("document"):
            with open(os.path.join(folder, t["document"]), encoding="utf-8") as f:
                doc = f.read()
        parts = (
            [doc.rstrip(), t["instruction"]]
            if t.get("document_first")
            else [t["instruction"], doc.rstrip()]
        )
        tasks.append(
            dict(
                name=t["name"],
                kind=t["kind"],
                provenance=t.get("provenance"),
                message="\n\n".join(p for p in parts if p),
            )
        )
    return tasks


def prompt_ids(m, task):
    chat = Chat(m, out=open(os.devnull, "w"))
    return chat._encode([{"role": "user", "content": task["message"]}])


def run_once(m, ids, n, draft_max, draft_min):
    cpu = time.process_time()
    text = "".join(
        m.generate(ids, max_tokens=n, temperature=0, draft_max=draft_max, draft_min=draft_min)
    )
    s = dict(m.stats)
    s["cpu_s"] = (
        time.process_time() - cpu
    )  # this process's threads: robust to others' load at 1 thread
    return text, s


def bench_task(m, task, n, reps, draft_max, draft_min, warm):
    ids = prompt_ids(m, task)
    run_once(m, ids, 8, 0, 0)  # warmup: the prompt is prefilled and cached
    plain, drafted, stats, want = [], [], [], None
    cpu = {"plain": [], "lookup": []}
    for r in range(reps):
        for mode in ("plain", "lookup") if r % 2 == 0 else ("lookup", "plain"):
            if mode == "lookup" and not warm:
                m.batch_cost = BatchCost()
            text, s = run_once(m, ids, n, draft_max if mode == "lookup" else 0, draft_min)
            if want is None:
                want = text
            elif text != want:
                raise Mismatch(
                    f"task {task['name']}: the {mode} run's text differs from the first run's"
                )
            ts = s["gen_tokens"] / s["decode_s"]
            (drafted if mode == "lookup" else plain).append(ts)
            cpu[mode].append(s["gen_tokens"] / s["cpu_s"])
            if mode == "lookup":
                stats.append(s)
    last = stats[-1]
    drafted_tokens = sum(s["draft_tokens"] for s in stats)
    accepted = sum(s["draft_accepted"] for s in stats)
    passes = sum(s["verify_steps"] for s in stats)
    return {
        "task": task["name"],
        "kind": task["kind"],
        "prompt_tokens": len(ids),
        "gen_tokens": last["gen_tokens"],
        "stop": last["stop"],
        "plain_ts": statistics.median(plain),
        "lookup_ts": statistics.median(drafted),
        "plain_samples_ts": plain,
        "lookup_samples_ts": drafted,
        "speedup": statistics.median(drafted) / statistics.median(plain),
        "plain_cpu_ts": statistics.median(cpu["plain"]),
        "lookup_cpu_ts": statistics.median(cpu["lookup"]),
        "cpu_speedup": statistics.median(cpu["lookup"]) / statistics.median(cpu["plain"]),
        "draft_tokens": drafted_tokens // reps,
        "draft_accepted": accepted // reps,
        "verify_steps": passes // reps,
        "acceptance": accepted / drafted_tokens if drafted_tokens else 0.0,
        "tokens_per_pass": (accepted + passes) / passes if passes else 0.0,
        "drafted_fraction": accepted / (reps * last["gen_tokens"]) if last["gen_tokens"] else 0.0,
        "identical": True,
        "text": want,
    }


def geomean(xs):
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    p.add_argument(
        "-t", "--threads", default=None, help="thread counts, comma-separated (default 1,all cores)"
    )
    p.add_argument(
        "-n", "--n-predict", type=int, default=200, help="tokens per reply (default 200)"
    )
    p.add_argument(
        "-r", "--repetitions", type=int, default=3, help="rounds of plain + lookup (default 3)"
    )
    p.add_argument("--draft-max", type=int, default=DRAFT_MAX)
    p.add_argument("--draft-min", type=int, default=DRAFT_MIN)
    p.add_argument("--warm", action="store_true", help="keep the learnt cost model across runs")
    p.add_argument("--tasks", default=TASKS, help="a folder with tasks.json")
    p.add_argument(
        "--only",
        action="append",
        default=None,
        metavar="NAME",
        help="run only this task (repeatable)",
    )
    p.add_argument("-o", "--output", choices=("md", "json"), default="md")
    p.add_argument("--json-out", default=None, help="also write the results as JSON here")
    a = p.parse_args(argv)
    threads = (
        bench.int_list(a.threads, "-t", lo=1) if a.threads else sorted({1, bench.default_threads()})
    )
    if a.repetitions < 1 or a.n_predict < 1 or a.draft_max < 1:
        p.error("-r, -n and --draft-max must be at least 1")
    tasks = load_tasks(a.tasks)
    if a.only:
        unknown = set(a.only) - {t["name"] for t in tasks}
        if unknown:
            p.error(f"--only: no task {sorted(unknown)[0]!r}")
        tasks = [t for t in tasks if t["name"] in a.only]
    results = []
    md = a.output == "md"
    if md:
        print(
            f"{os.path.basename(a.model)}; {bench.cpu_info()}; greedy, -n {a.n_predict}, "
            f"-r {a.repetitions}, "
            f"--draft-max {a.draft_max}, cost model {'warm' if a.warm else 'fresh per run'}; "
            f"build {bench.build_info()['build_commit']}"
        )
        print()
        print(
            "| threads | task | kind | tokens | plain t/s | lookup t/s | speedup "
            "| speedup in CPU time | drafted "
            "| accepted | acceptance | tokens/pass |"
        )
        print(
            "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            flush=True,
        )
    try:
        for nt in threads:
            m = load(a.model, threads=nt)
            costs = None
            try:
                for task in tasks:
                    res = bench_task(
                        m, task, a.n_predict, a.repetitions, a.draft_max, a.draft_min, a.warm
                    )
                    res["n_threads"] = m.threads
                    res["batch_cost_learnt"] = m.batch_cost.table((2, 3, 5, 9, 17))
                    costs = res["batch_cost_learnt"]
                    results.append(res)
                    if md:
                        print(
                            f"| {m.threads} | {res['task']} | {res['kind']} | {res['gen_tokens']} "
                            f"| {res['plain_ts']:.1f} | {res['lookup_ts']:.1f} "
                            f"| {res['speedup']:.2f}x "
                            f"| {res['cpu_speedup']:.2f}x "
                            f"| {res['draft_tokens']} | {res['draft_accepted']} "
                            f"| {100 * res['acceptance']:.0f}% "
                            f"| {res['tokens_per_pass']:.2f} |",
                            flush=True,
                        )
            finally:
                m.close()
            if md:
                mine = [r for r in results if r["n_threads"] == nt]
                for kind, label in (("copy", "copy tasks"), ("open", "open tasks")):
                    rows = [r for r in mine if r["kind"] == kind]
                    if rows:
                        print(
                            f"| {nt} | **{label}, geometric mean** | | | | | "
                            f"{geomean([r['speedup'] for r in rows]):.2f}x | "
                            f"{geomean([r['cpu_speedup'] for r in rows]):.2f}x | | | | |"
                        )
                print(
                    "|  | (cost(T)/cost(1) as the last run learnt it: "
                    + ", ".join(f"T={T} {c:.2f}" for T, c in costs.items())
                    + ") | | | | | | | | | | |",
                    flush=True,
                )
    except Mismatch as e:
        print(f"lookup.py: error: {e}", file=sys.stderr)
        return 1
    if md:
        print("\nGreedy text identical with and without drafting: every task, every run.")
    else:
        print(json.dumps(results, indent=2))
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
