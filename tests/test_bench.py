"""`pyllm bench` on a tiny random model: the table and the JSON parse, and every figure is
positive. No timing assertions: performance is never checked in a test."""

import json
import math
import os
import re
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from pyllm import bench, cli, format  # noqa: E402
from tiny import make_tiny_model  # noqa: E402

LLAMA_BENCH_FIELDS = (
    "model_filename",
    "model_type",
    "model_size",
    "model_n_params",
    "n_threads",
    "n_prompt",
    "n_gen",
    "n_depth",
    "avg_ns",
    "stddev_ns",
    "avg_ts",
    "stddev_ts",
    "samples_ns",
    "samples_ts",
)
OURS = ("load_s", "peak_rss_bytes", "bandwidth_gbs", "roofline_fraction")


@pytest.fixture(scope="module", params=["untied", "tied"])
def model(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("bench") / f"tiny-{request.param}.bin")
    make_tiny_model(path, seed=3, tied=request.param == "tied")
    return path


def run(capsys, *argv):
    rc = cli.main(["bench", *argv])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out


def test_markdown_table(model, capsys):
    out = run(capsys, model, "-p", "16", "-n", "4", "-r", "2", "-t", "1,2", "-d", "0,8")
    lines = out.splitlines()
    assert lines[0] == "| model | size | params | threads | type_k | type_v | test | t/s |"
    rows = [ln for ln in lines[2:] if ln.startswith("| llama")]
    assert [r.split("|")[7].strip() for r in rows] == ["pp16", "tg4", "pp16 @ d8", "tg4 @ d8"] * 2
    assert [int(r.split("|")[4]) for r in rows] == [1] * 4 + [2] * 4
    assert {(r.split("|")[5].strip(), r.split("|")[6].strip()) for r in rows} == {("f16", "f16")}
    for r in rows:
        cells = [c.strip() for c in r.strip("|").split("|")]
        assert re.fullmatch(r"[\d.]+ MiB", cells[1]) and re.fullmatch(r"[\d.]+ M", cells[2])
        mean, sd = re.fullmatch(r"([\d.]+) ± ([\d.]+)", cells[7]).groups()
        assert float(mean) > 0 and float(sd) >= 0
    assert "load (open + first touch)" in out and "peak RSS" in out


def test_json_fields(model, capsys):
    out = run(
        capsys,
        model,
        "-p",
        "16",
        "-n",
        "4",
        "-r",
        "2",
        "-t",
        "1",
        "-o",
        "json",
        "--roofline",
        "--bw-mib",
        "8",
    )
    res = json.loads(out)
    assert isinstance(res, list) and len(res) == 2
    pp, tg = res
    for r in res:
        for k in LLAMA_BENCH_FIELDS + OURS:
            assert k in r, k
        assert r["model_filename"] == model and r["n_threads"] == 1 and r["n_depth"] == 0
        assert (r["type_k"], r["type_v"]) == ("f16", "f16")
        assert r["model_size"] == sum(t_bytes(t) for t in format.read(model, False).meta["tensors"])
        for k in ("model_size", "model_n_params", "avg_ns", "avg_ts", "load_s", "peak_rss_bytes"):
            assert r[k] > 0, k
        assert len(r["samples_ns"]) == len(r["samples_ts"]) == 2
        assert all(s > 0 for s in r["samples_ns"] + r["samples_ts"])
        n = r["n_prompt"] + r["n_gen"]
        assert math.isclose(
            r["avg_ts"], sum(n * 1e9 / s for s in r["samples_ns"]) / 2, rel_tol=1e-9
        )
    assert (pp["n_prompt"], pp["n_gen"], tg["n_prompt"], tg["n_gen"]) == (16, 0, 0, 4)
    assert pp["bandwidth_gbs"] is None and tg["bandwidth_gbs"] > 0
    # the roofline: tg against the read ceiling, pp against the FMA ceiling; a fraction is in
    # (0, 1], or absent with a warning (a tiny model's weights stay in the caches)
    assert (pp["roofline_bound"], tg["roofline_bound"]) == ("compute", "read")
    for r in res:
        assert r["read_bandwidth_gbs"] > 0 and r["fma_gflops"] > 0 and r["roofline_ts"] > 0
        assert r["read_pattern"] and r["flops_per_token"] > 0
        assert (
            r["read_patterns"][r["read_pattern"]]
            == r["read_bandwidth_gbs"]
            == max(r["read_patterns"].values())
        )
        assert len(r["read_patterns"]) == len(bench.READ_STREAMS) * len(bench.PAGES)
        if r["roofline_fraction"] is None:
            assert "probe read low" in r["roofline_warning"]
        else:
            assert 0 < r["roofline_fraction"] <= 1 and r["roofline_warning"] is None
            assert math.isclose(r["roofline_fraction"], r["avg_ts"] / r["roofline_ts"])
    cfg = format.read(model, map_tensors=False).config
    assert math.isclose(pp["flops_per_token"] * 16, bench.test_flops(cfg, bench.Test("pp", 16)))
    # the weights a token reads: every matrix, plus the embedding when it is the output head
    mf = format.read(model, map_tensors=False)
    mats = sum(
        2 * t["shape"][0] * t["shape"][1]
        for t in mf.meta["tensors"]
        if len(t["shape"]) == 2 and t["name"] != "tok_embd"
    )
    tied = mf.config["flags"] & format.FLAG_TIED_OUTPUT
    embd = 2 * mf.config["vocab_size"] * mf.config["dim"]
    assert tg["weight_bytes_per_token"] == mats + (embd if tied else 0)
    assert math.isclose(tg["bandwidth_gbs"], tg["weight_bytes_per_token"] * tg["avg_ts"] / 1e9)


def test_roofline_markdown(model, capsys):
    out = run(
        capsys, model, "-p", "16", "-n", "4", "-r", "1", "-t", "1,2", "--roofline", "--bw-mib", "8"
    )
    head = "| threads | test | t/s | bound by | ceiling | roofline t/s | fraction |"
    lines = out.splitlines()
    rows = lines[lines.index(head) + 2 :][:4]
    assert [
        (r.split("|")[1].strip(), r.split("|")[2].strip(), r.split("|")[4].strip()) for r in rows
    ] == [
        ("1", "pp16", "compute"),
        ("1", "tg4", "read"),
        ("2", "pp16", "compute"),
        ("2", "tg4", "read"),
    ]
    for r in rows:
        frac = r.split("|")[7].strip()
        assert frac == "probe low" or 0 <= int(frac.rstrip("%")) <= 100, frac
    assert out.count("warning: ") == sum("probe low" in r for r in rows)


def test_flops_counted_from_the_config():
    """Matmuls: 2 FLOPs a weight of every layer; the head once a pp and every tg token;
    attention: 4 * heads * head_dim per position seen, per layer (closed form = the sum)."""
    cfg = dict(
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        hidden_dim=96,
        vocab_size=300,
        sliding_window=0,
    )
    per_layer = 64 * (64 + 2 * 32) + 64 * 64 + 3 * 96 * 64
    assert bench.matmul_flops_per_token(cfg) == 2 * 2 * per_layer
    att = sum(4 * 2 * 4 * 16 * (p + 1) for p in range(10, 18))
    assert (
        bench.test_flops(cfg, bench.Test("pp", 8, 10)) == 8 * 2 * 2 * per_layer + att + 2 * 300 * 64
    )
    assert (
        bench.test_flops(cfg, bench.Test("tg", 8, 10))
        == 8 * 2 * 2 * per_layer + att + 8 * 2 * 300 * 64
    )
    window = dict(cfg, sliding_window=4)
    assert bench.attention_flops(window, 100) == 4 * 2 * 4 * 16 * 4
    assert bench.kv_bytes_read(cfg, bench.Test("tg", 2, 3)) == 2 * 2 * 2 * 16 * 2 * (4 + 5)


def test_fraction_over_one_is_a_warning():
    cfg = dict(
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        hidden_dim=96,
        vocab_size=300,
        sliding_window=0,
    )
    info = bench.ModelInfo("m", cfg, 0, 0, True, 10**6)
    ceil = {"read_gbs": 1.0, "read_pattern": "1 stream/thread, 4 KiB pages", "fma_gflops": 1.0}
    fast = bench.apply_roofline(
        {"n_prompt": 0, "n_gen": 4, "n_depth": 0, "n_threads": 1, "avg_ts": 1e6}, cfg, info, ceil
    )
    assert fast["roofline_fraction"] is None and "probe read low" in fast["roofline_warning"]
    slow = bench.apply_roofline(
        {"n_prompt": 16, "n_gen": 0, "n_depth": 0, "n_threads": 1, "avg_ts": 1.0}, cfg, info, ceil
    )
    assert 0 < slow["roofline_fraction"] < 1 and slow["roofline_warning"] is None


def t_bytes(t):
    n = 1
    for s in t["shape"]:
        n *= s
    return n * (2 if t["dtype"] == "f16" else 4)


def test_peak_rss_units(monkeypatch):
    """Without /proc (macOS), ru_maxrss: kB on Linux, bytes on macOS."""

    class R:
        ru_maxrss = 1000

    def no_proc(path, *a, **k):
        raise FileNotFoundError(path)

    monkeypatch.setattr(bench, "open", no_proc, raising=False)
    monkeypatch.setattr(bench.resource, "getrusage", lambda who: R)
    monkeypatch.setattr(bench.sys, "platform", "linux")
    assert bench.peak_rss_bytes() == 1000 * 1024  # kB on Linux
    monkeypatch.setattr(bench.sys, "platform", "darwin")
    assert bench.peak_rss_bytes() == 1000  # bytes on macOS


def test_lists_and_names():
    assert bench.int_list("512", "-p") == [512]
    assert bench.int_list("1,2", "-t", lo=1) == [1, 2]
    with pytest.raises(ValueError):
        bench.int_list("1,x", "-t")
    with pytest.raises(ValueError):
        bench.int_list("0", "-t", lo=1)
    tests = bench.make_tests([512], [128, 0], [0, 512])
    assert [t.name for t in tests] == ["pp512", "tg128", "pp512 @ d512", "tg128 @ d512"]


def test_errors(model, capsys):
    assert cli.main(["bench", model, "-p", "0", "-n", "0"]) == 1
    assert "nothing to run" in capsys.readouterr().err
    assert cli.main(["bench", model, "-p", "16", "-n", "0", "-d", "100000"]) == 1
    assert "context" in capsys.readouterr().err


def test_peak_rss_is_the_process_own():
    """A worker started by a big process (compare.py's coordinator after writing a GGUF)
    reports its own peak, not its parent's: ru_maxrss survives exec on Linux."""
    import subprocess

    import numpy as np

    big = np.ones((400 << 20) // 8)  # 400 MiB resident in this process
    code = "from pyllm.bench import peak_rss_bytes; print(peak_rss_bytes())"
    child = int(
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout
    )
    assert 0 < child < big.nbytes // 2


def test_probes_count_what_they_did(model):
    """pyllm_read returns the bytes it read (whole steps of each thread's streams), pyllm_fma the
    FLOPs it did; both refuse bad arguments with -1."""
    import mmap

    from pyllm._pyllm import ffi, lib
    from pyllm.model import _native_open

    m = _native_open(model, 2, 16)
    buf = mmap.mmap(-1, 4 << 20)
    try:
        with ffi.from_buffer(buf) as p:
            for streams in (1, 3, 8):
                n = lib.pyllm_read(m, p, 4 << 20, 2, streams)
                assert 0 < n <= 2 * (4 << 20) and n % (2 * 64 * 4 * streams) == 0, (streams, n)
            for bad in (
                (p, 4 << 20, 1, 0),
                (p, 4 << 20, 1, 9),
                (p, 4 << 20, 0, 1),
                (p, 1 << 10, 1, 1),
                (p + 8, 4 << 20, 1, 1),
            ):
                assert lib.pyllm_read(m, *bad) == -1, bad
        total = ffi.new("float *")
        flops = lib.pyllm_fma(m, 1000, total)
        assert flops > 0 and flops % 1000 == 0 and math.isfinite(total[0]) and total[0] > 0
        assert lib.pyllm_fma(m, 0, ffi.NULL) == -1
    finally:
        ffi.release(m)
        buf.close()


def test_cache_types(model, capsys):
    """-ctk/-ctv lists run every (keys, values) pair, named in the JSON and the table."""
    argv = (
        model,
        "-p",
        "0",
        "-n",
        "2",
        "-r",
        "1",
        "-t",
        "1",
        "-d",
        "8",
        "-ctk",
        "f16,f32",
        "-ctv",
        "f16,f32",
    )
    res = json.loads(run(capsys, *argv, "-o", "json"))
    assert [(r["type_k"], r["type_v"]) for r in res] == [
        ("f16", "f16"),
        ("f16", "f32"),
        ("f32", "f16"),
        ("f32", "f32"),
    ]
    rows = [ln for ln in run(capsys, *argv).splitlines() if ln.startswith("| llama")]
    assert [tuple(c.strip() for c in r.split("|")[5:7]) for r in rows] == [
        ("f16", "f16"),
        ("f16", "f32"),
        ("f32", "f16"),
        ("f32", "f32"),
    ]
    assert bench.kv_bytes_read(
        format.read(model, False).config, bench.Test("tg", 1, 0), 4, 4
    ) == 2 * bench.kv_bytes_read(format.read(model, False).config, bench.Test("tg", 1, 0))
    assert cli.main(["bench", model, "-n", "2", "-ctk", "q8_0"]) == 1
    assert "-ctk: q8_0 is not a cache type (f16, f32)" in capsys.readouterr().err


def test_small_batch_costs(model, capsys):
    """--batch: verify-pass timings at --batch-depth, cost(T)/cost(1) in the table and the JSON."""
    out = run(
        capsys,
        model,
        "-p",
        "0",
        "-n",
        "0",
        "-r",
        "2",
        "-t",
        "1,2",
        "--batch",
        "2,4,16",
        "--batch-depth",
        "64",
    )
    rows = [ln for ln in out.splitlines() if ln.startswith("| llama")]
    names = ["batch1 @ d64", "batch2 @ d64", "batch4 @ d64", "batch16 @ d64"]
    assert [r.split("|")[7].strip() for r in rows] == names * 2
    assert "small-batch cost" in out and "| 1 | 64 | 1.00 |" in out and "| 2 | 64 | 1.00 |" in out
    res = json.loads(
        run(
            capsys,
            model,
            "-p",
            "0",
            "-n",
            "0",
            "-r",
            "2",
            "-t",
            "1",
            "--batch",
            "1,8",
            "--batch-depth",
            "32",
            "-o",
            "json",
        )
    )
    got = [(r["n_batch"], r["n_depth"], r["n_prompt"], r["n_gen"]) for r in res]
    assert got == [(1, 32, 0, 0), (8, 32, 0, 0)]
    assert res[0]["batch_cost"] == 1.0 and res[1]["batch_cost"] > 0
    assert math.isclose(res[1]["batch_cost"], res[1]["avg_ns"] / res[0]["avg_ns"])
    argv = ["bench", model, "-p", "0", "-n", "0", "--batch", "4", "--batch-depth", "600"]
    assert cli.main(argv) == 1
    assert "context" in capsys.readouterr().err
    assert cli.main(["bench", model, "-p", "0", "-n", "0", "--batch", "x"]) == 1
    assert "--batch" in capsys.readouterr().err
