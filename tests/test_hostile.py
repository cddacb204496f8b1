"""The hostile corpus (tests/hostile.py): every case ends in one clear line and a non-zero
exit (or, for the cases that expect it, a clean success), in bounded time and memory,
leaving no file behind."""

import subprocess

import pytest

import hostile


@pytest.mark.parametrize("name", sorted(hostile.CASES))
def test_hostile_case(name, tmp_path):
    c = hostile.CASES[name]
    try:
        r = hostile.run_case(c, tmp_path)
    except subprocess.TimeoutExpired:
        pytest.fail(f"class {c.cls} case {name}: no answer in {hostile.TIMEOUT} s")
    why = hostile.verdict(c, r)
    assert why is None, f"class {c.cls} case {name} ({' '.join(r.argv)}): {why}"


def test_every_class_of_this_corpus_has_cases():
    # classes 2, 4, 5 and 8 (templates, HF/GGUF inputs, output files, chat state) add theirs
    assert {1, 3, 6, 9, 10} <= {c.cls for c in hostile.CASES.values()}


def test_the_verdict_catches_what_it_should(tmp_path):
    # the checker itself: a traceback, two lines, exit 0, a file left behind all fail
    c = hostile.Case("probe", 0, lambda d: [])
    ok = hostile.Result([], 1, b"", b"pyllm: error: x\n", [], [])
    assert hostile.verdict(c, ok) is None
    bad = [
        hostile.Result([], 1, b"", b"Traceback (most recent call last):\n  x\n", [], []),
        hostile.Result([], 1, b"", b"pyllm: error: a\nb\n", [], []),
        hostile.Result([], 0, b"", b"pyllm: error: x\n", [], []),
        hostile.Result([], -9, b"", b"", [], []),
        hostile.Result([], 1, b"", b"pyllm: error: x\n", [], ["out.bin.tmp"]),
        hostile.Result([], 1, b"\x1b]0;t\x07", b"pyllm: error: x\n", [], []),
        hostile.Result([], 1, b"", b"pyllm: error: out of memory\n", [], []),
    ]
    for r in bad:
        assert hostile.verdict(c, r) is not None, r
