"""`pyllm check`: it passes on this build (make test-paths and test-neon run it on the other
vector paths), and it fails, with a clear line, on builds with one constant flipped."""

import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from pyllm import check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pyllm_check(*args, cwd=ROOT):
    """`python -m pyllm check ARGS` in cwd (whose pyllm/ package is the one imported)."""
    r = subprocess.run(
        [sys.executable, "-m", "pyllm", "check", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return r.returncode, r.stdout, r.stderr


def test_passes_on_this_build(default_model):
    rc, out, err = pyllm_check(default_model, "-t", "2")
    assert rc == 0, out + err
    lines = out.splitlines()
    from pyllm._pyllm import ffi, lib

    assert lines[0].startswith(f"pyllm check: kernel {ffi.string(lib.pyllm_simd()).decode()} ")
    verdicts = [ln for ln in lines if re.search(r" (PASS|FAIL)$", ln)]
    # per model and cache type: 1 thread, 2 threads, bit-identical
    assert len(verdicts) == (len(check.TINY_MODELS) + 1) * len(check.CACHE_TYPES) * 3, out
    assert all(ln.endswith("PASS") for ln in verdicts), out
    assert lines[-1].startswith(f"PASS: all {len(verdicts)} checks")
    assert any(os.path.basename(default_model) in ln for ln in lines)
    for ln in verdicts:  # every comparison shows its figure and tolerance
        m = re.search(r"max \|dlogit\| (\S+)  tolerance (\S+)", ln)
        if "bit-identical" not in ln:
            assert m and float(m[1]) <= float(m[2]), ln


# one constant of the kernel flipped: what -> (pattern, replacement), matching once in csrc/*.c
BREAKS = {
    "exp polynomial": (
        r"5\.0000001201e-1f",
        "5.5000001201e-1f",
    ),  # exp's r^2/2 term: the softmax and silu
    "rope sign": (r"(v\[i \+ half\] = a \* s )\+( b \* c)", r"\1-\2"),
}


@pytest.mark.parametrize("what", list(BREAKS))
def test_fails_on_a_broken_build(tmp_path, what):
    pattern, replacement = BREAKS[what]
    for d in ("pyllm", "csrc"):
        shutil.copytree(
            os.path.join(ROOT, d),
            tmp_path / d,
            ignore=shutil.ignore_patterns("_pyllm*.so", "*.o", "__pycache__"),
        )
    found = 0
    for src in (tmp_path / "csrc").glob("*.c"):
        text, n = re.subn(pattern, replacement, src.read_text())
        found += n
        src.write_text(text)
    assert found == 1, f"{what}: {pattern!r} matches {found} times in csrc/*.c"
    build = subprocess.run(
        [sys.executable, "pyllm/_build.py"], cwd=tmp_path, capture_output=True, text=True
    )
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    rc, out, err = pyllm_check("-t", "2", cwd=tmp_path)  # no MODEL there: the tiny models
    assert str(tmp_path) in out.splitlines()[0], out  # the broken build is the one checked
    assert rc == 1, out + err
    failed = [ln for ln in out.splitlines() if ln.endswith(" FAIL")]
    assert failed and all(
        re.search(r"max \|dlogit\| \S+  tolerance \S+ +FAIL$", ln)
        for ln in failed
        if "bit-identical" not in ln
    ), out
    assert out.splitlines()[-1].startswith("FAIL: "), out
    assert "Traceback" not in err


def test_compare():
    want = np.zeros((3, 5), np.float32)
    for cache_type, tol in check.TOLERANCE.items():
        assert check.compare(want + tol / 2, want, cache_type) == (
            pytest.approx(tol / 2),
            tol,
            True,
        )
        assert check.compare(want + 2 * tol, want, cache_type)[2] is False
        bad = want.copy()
        bad[1, 2] = np.nan
        assert check.compare(bad, want, cache_type) == (float("inf"), tol, False)
        assert check.compare(want[:2], want, cache_type)[2] is False  # a row short


@pytest.mark.parametrize(
    "args, message",
    [
        (["nope.bin"], r"nope\.bin: No such file"),
        (["README.md"], r"README\.md: .*(magic|too short)"),
        (["-t", "0"], r"-t 0: threads are 1 to 64"),
    ],
)
def test_bad_arguments(args, message):
    rc, out, err = pyllm_check(*args)
    assert rc != 0 and out == ""
    assert len(err.strip().splitlines()) == 1 and re.search(message, err), err
