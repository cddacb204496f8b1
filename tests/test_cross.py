"""The arm64 NEON path, cross-compiled and run under qemu-aarch64 (make test-neon)."""
import os
import shutil
import subprocess

import numpy as np

from pyllm import format
from pyllm.reference import reference_logits
from tiny import VARIANTS, make_tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CC = os.environ.get("PYLLM_CROSS_CC", "aarch64-linux-gnu-gcc")


def test_neon_path_matches_reference(tmp_path):
    assert shutil.which(CC) and shutil.which("qemu-aarch64"), "make test-neon installs the cross toolchain"
    exe = tmp_path / "kernel"
    subprocess.run([CC, "-std=c11", "-O2", "-march=armv8.2-a", "-static", "-pthread", "-I", f"{ROOT}/csrc",
                    f"{ROOT}/csrc/pyllm.c", f"{ROOT}/tests/kernel_main.c", "-lm", "-o", str(exe)], check=True)
    for name in ("base", "odd", "window_bias_gqa4"):
        path = tmp_path / f"{name}.bin"
        make_tiny_model(path, **{k: v for k, v in VARIANTS[name].items()})
        mf = format.read(str(path))
        vocab = mf.config["vocab_size"]
        ids = [int(i) for i in np.random.default_rng(1).integers(0, vocab, 40)]
        out = subprocess.run(["qemu-aarch64", str(exe), str(path), str(vocab), *map(str, ids)],
                             capture_output=True, text=True, check=True).stdout.split()
        assert out[0] == "neon"
        got = np.array(out[1:], dtype=np.float32).reshape(len(ids), vocab)
        want = reference_logits(mf, ids)
        assert np.abs(got - want).max() < 5e-3, name
