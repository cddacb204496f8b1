"""The arm64 NEON path, cross-compiled and run under qemu-aarch64 (make test-neon): `pyllm
check`'s comparisons on its tiny models (pyllm/check.py, check_model with the same
tolerances), the kernel driven by tests/kernel_main.c since no Python runs there."""
import os
import shutil
import subprocess

import numpy as np

from pyllm import check, format

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CC = os.environ.get("PYLLM_CROSS_CC", "aarch64-linux-gnu-gcc")


def qemu_kernel(exe):
    """check.kernel_logits' contract, run by the cross-compiled kernel under qemu."""
    def run(path, ids, threads, cache_type):
        vocab = format.read(str(path), map_tensors=False).config["vocab_size"]
        args = ["qemu-aarch64", str(exe), str(path), cache_type, str(threads), str(check.DECODE_TOKENS), str(vocab)]
        out = subprocess.run(args + [str(i) for i in ids], capture_output=True, text=True, check=True).stdout.split()
        assert out[0] == "neon", out[0]
        steps, whole = np.array(out[1:], dtype=np.float32).reshape(2, len(ids), vocab)
        return threads, steps, whole
    return run


def test_neon_path_passes_check(tmp_path):
    assert shutil.which(CC) and shutil.which("qemu-aarch64"), "make test-neon installs the cross toolchain"
    exe = tmp_path / "kernel"
    subprocess.run([CC, "-std=c11", "-O2", "-march=armv8.2-a", "-static", "-pthread", "-I", f"{ROOT}/csrc",
                    f"{ROOT}/csrc/pyllm.c", f"{ROOT}/tests/kernel_main.c", "-lm", "-o", str(exe)], check=True)
    lines = []
    for name, path, ids in check.tiny_models(str(tmp_path)):
        check.check_model(path, ids, 2, lambda text, ok: lines.append((f"{name}: {text}", ok)), kernel=qemu_kernel(exe))
    assert len(lines) == len(check.TINY_MODELS) * len(check.CACHE_TYPES) * 3  # 1 thread, 2, bit-identical
    failed = [text for text, ok in lines if not ok]
    assert not failed, failed
