"""benchmarks/compare.py's driver: the plan, the table and the JSON, on fake workers (exact
figures) and on a real pyllm worker over a tiny model (the worker protocol end to end). No
timing assertions: performance is never checked in a test."""

import json
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "benchmarks"))

import compare  # noqa: E402
from pyllm import bench  # noqa: E402
from tiny import make_tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("compare") / "tiny.bin")
    make_tiny_model(path, seed=3)
    return path


def args(*argv):
    return compare.parse_args(list(argv))


def test_plan_tests_by_depth():
    a = args("m.bin", "-p", "16", "-n", "4,0", "-d", "8,0", "--decode-depths", "32,8")
    names = [t.name for t in compare.plan_tests(a)]
    # every -p/-n at each -d, tg at the extra depths not already in -d, ordered by depth
    assert names == ["pp16", "tg4", "pp16 @ d8", "tg4 @ d8", "tg4 @ d32"]
    assert [t.name for t in compare.plan_tests(args("m.bin", "--decode-depths", ""))] == [
        "pp512",
        "tg128",
    ]


def test_bad_lists_are_one_line_errors():
    with pytest.raises(SystemExit, match="compare: -t: 0 is below 1"):
        compare.plan(args("m.bin", "-t", "0"))
    with pytest.raises(SystemExit, match="compare: -p: expected"):
        compare.plan(args("m.bin", "-p", "x"))
    with pytest.raises(SystemExit, match="unknown engine 'vllm'"):
        compare.select_engines("pyllm,vllm")


class FakeWorker:
    """A worker whose runs take a fixed time per token: ns_per_token[engine]."""

    def __init__(self, engine, ns_per_token):
        self.engine, self.ns, self.load_s, self.runs = engine, ns_per_token, 0.5, []

    def run(self, test, n=None):
        n = test.n if n is None else n
        self.runs.append((test.name, n))
        return self.ns * n

    def close(self):
        return 100 << 20


def test_table_and_results_on_fake_workers(monkeypatch, tmp_path):
    monkeypatch.setattr(compare, "timed_run", lambda w, test, cores: (w.run(test), 0.05))
    a = args("m.bin", "-r", "3", "--gap", "0", "--max-other-load", "1")
    engines = ["pyllm", "llama.cpp", "hf-f32"]
    tests = [bench.Test("pp", 16), bench.Test("tg", 4, 8)]
    run = compare.Run(a, 2, [1], tests, engines, info=None, doc={"results": [], "loads": []})
    assert (
        run.peers == ["llama.cpp", "hf-f32"]
        and run.n_ctx == compare.CHECK_TOKENS
        and run.max_depth == 8
    )
    workers = [FakeWorker("pyllm", 1000), FakeWorker("llama.cpp", 2000), FakeWorker("hf-f32", 4000)]

    header = compare.table_header(engines, run.peers).splitlines()
    assert header[0] == (
        "| threads | test | pyllm t/s | llama.cpp t/s | hf-f32 t/s | pyllm/llama.cpp "
        "| pyllm/hf-f32 | other load |"
    )
    assert header[1] == "|" + " ---: |" * 8
    row = compare.time_test(run, workers, 1, tests[1])
    assert row == (
        "| 1 | tg4 @ d8 | 1000000.00 ± 0.00 | 500000.00 ± 0.00 | 250000.00 ± 0.00 "
        "| 2.00 | 4.00 | 5% |"
    )
    # a warmup of one token, then -r rounds, the first engine rotating
    assert [w.runs for w in workers][0] == [("tg4 @ d8", 1)] + [("tg4 @ d8", 4)] * 3
    res = run.doc["results"]
    assert [r["engine"] for r in res] == engines
    assert all(
        r["n_gen"] == 4
        and r["n_depth"] == 8
        and r["test"] == "tg4 @ d8"
        and r["n_threads"] == 1
        and r["samples_ns"] == [r["avg_ns"]] * 3
        and r["other_load"] == 0.05
        for r in res
    )
    compare.close_workers(run, workers, 1)
    assert run.doc["loads"][0] == {
        "engine": "pyllm",
        "n_threads": 1,
        "load_s": 0.5,
        "peak_rss_bytes": 100 << 20,
    }


def test_a_disturbed_run_is_redone(monkeypatch):
    busy = iter([0.9, 0.9, 0.0])
    monkeypatch.setattr(compare, "timed_run", lambda w, test, cores: (w.run(test), next(busy)))
    a = args("m.bin", "--max-other-load", "1", "--retries", "3")
    a.max_other_load = 0.5  # checked after the run only: wait_quiet is skipped at 1
    monkeypatch.setattr(compare, "wait_quiet", lambda *x: None)
    w = FakeWorker("pyllm", 10)
    assert compare.quiet_run(w, bench.Test("pp", 2), a, 2) == (20, 0.0)
    assert len(w.runs) == 3


def test_pyllm_only_end_to_end(tiny, tmp_path, capsys):
    out = tmp_path / "compare.json"
    rc = compare.main(
        [
            tiny,
            "-p",
            "8",
            "-n",
            "2",
            "-t",
            "1",
            "-r",
            "1",
            "--decode-depths",
            "4",
            "--engines",
            "pyllm",
            "--gap",
            "0",
            "--max-other-load",
            "1",
            "--json-out",
            str(out),
        ]
    )
    assert rc == 0
    lines = capsys.readouterr().out.splitlines()
    speed = lines.index("| threads | test | pyllm t/s | other load |")
    roof = lines.index("| threads | test | bound by | pyllm of its ceiling |")
    rows = [ln for ln in lines[speed:roof] if ln.startswith("| 1 |")]
    assert [r.split("|")[2].strip() for r in rows] == ["pp8", "tg2", "tg2 @ d4"]
    # after the runs: the ceilings, and pyllm's fraction of them (or "probe low" with a warning)
    fracs = [ln.split("|")[3:5] for ln in lines[roof + 2 : roof + 5]]
    assert [b.strip() for b, _ in fracs] == ["compute", "read", "read"]
    assert all(f.strip() == "probe low" or 0 <= int(f.strip().rstrip("%")) <= 100 for _, f in fracs)
    doc = json.loads(out.read_text())
    assert [r["test"] for r in doc["roofline"]["pyllm"]] == ["pp8", "tg2", "tg2 @ d4"]
    assert (
        doc["roofline"]["ceilings"]["1"]["read_gbs"] > 0
        and doc["roofline"]["ceilings"]["1"]["fma_gflops"] > 0
    )
    assert [r["test"] for r in doc["results"]] == ["pp8", "tg2", "tg2 @ d4"]
    assert all(r["engine"] == "pyllm" and r["avg_ts"] > 0 for r in doc["results"])
    assert doc["model"]["file"] == tiny and doc["model"]["gguf"] is None
    assert doc["check"] == {"n_tokens": 32, "vs_pyllm": {}}
    assert doc["loads"][0]["engine"] == "pyllm" and doc["loads"][0]["peak_rss_bytes"] > 0
    assert doc["engines"]["pyllm"]["simd"]
