"""The pure parts of benchmarks/lookup_llamacpp.py (llama.cpp itself is not installed in CI)."""

import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))

import lookup_llamacpp as llc  # noqa: E402


def test_decode_rate_counts_from_the_first_token():
    assert llc.decode_rate([10.0, 10.5, 11.0]) == pytest.approx(2.0)
    assert math.isnan(llc.decode_rate([10.0]))
    assert math.isnan(llc.decode_rate([]))


def test_leading_equal():
    assert llc.leading_equal("abcd", "abxd") == 2
    assert llc.leading_equal("abc", "abc") == 3
    assert llc.leading_equal("", "abc") == 0


def rates(pyllm_plain, pyllm_lookup, llama_plain, hl_plain, hl_lookup):
    values = (pyllm_plain, pyllm_lookup, llama_plain, hl_plain, hl_lookup)
    return {mode: [v, v * 3, v / 3] for mode, v in zip(llc.MODES, values)}  # median: v


def texts(pyllm="same text", llama="same txt"):
    return {
        "pyllm plain": pyllm,
        "pyllm lookup": pyllm,
        "llama.cpp plain": llama,
        "llama.cpp hl plain": llama,
        "llama.cpp hl lookup": llama,
    }


def test_row_ratios_and_summary():
    copy = llc.row({"name": "edit", "kind": "copy"}, rates(100, 200, 80, 60, 90), texts())
    assert copy["pyllm_speedup"] == pytest.approx(2.0)
    assert copy["pyllm_lookup_over_llamacpp_plain"] == pytest.approx(2.5)
    assert copy["llamacpp_speedup"] == pytest.approx(1.5)
    assert copy["leading_equal_to_pyllm"] == 6 and copy["chars"] == 9
    other = llc.row({"name": "sum", "kind": "copy"}, rates(100, 800, 80, 60, 60), texts())
    chat = llc.row({"name": "chat", "kind": "open"}, rates(100, 95, 80, 60, 30), texts())
    s = llc.summary([copy, other, chat])
    assert s["copy"]["pyllm_speedup"] == pytest.approx(4.0)  # sqrt(2 * 8)
    assert s["open"]["llamacpp_speedup"] == pytest.approx(0.5)


def test_a_lookup_text_that_differs_fails():
    t = texts()
    t["pyllm lookup"] = "other"
    with pytest.raises(SystemExit, match="differs"):
        llc.row({"name": "edit", "kind": "copy"}, rates(1, 1, 1, 1, 1), t)


def test_arguments():
    a = llc.parse_args(["m.bin", "-t", "1,2", "-n", "5"])
    assert a.gguf == "m.gguf" and a.threads == [1, 2] and a.n_predict == 5
    with pytest.raises(SystemExit):
        llc.parse_args(["m.bin", "-r", "0"])


def test_an_unknown_task_is_one_line_and_exit_1(capsys):
    assert llc.main(["m.bin", "--only", "nope"]) == 1
    err = capsys.readouterr().err
    assert err == "lookup_llamacpp: no task named nope\n"
