"""The arm64 NEON path, cross-compiled and run under qemu-aarch64 (make test-neon)."""
import shutil

import numpy as np

import make_logit_hashes as mlh
from pyllm import format
from reference import reference_logits
from tiny import VARIANTS, make_tiny_model


def test_neon_path_matches_reference(tmp_path):
    assert shutil.which(mlh.CROSS_CC) and \
        shutil.which("qemu-aarch64"), "make test-neon installs the cross toolchain"
    exe = mlh.neon_exe(str(tmp_path))
    for name in ("base", "odd", "window_bias_gqa4"):
        path = tmp_path / f"{name}.bin"
        make_tiny_model(path, **{k: v for k, v in VARIANTS[name].items()})
        mf = format.read(str(path))
        ids = [int(i) for i in np.random.default_rng(1).integers(0, mf.config["vocab_size"], 40)]
        for cache, tol in (("f16", 5e-3), ("f32", 2e-4)):
            got = mlh.run_neon(exe, str(path), ids, (40,), 2, cache)
            want = reference_logits(mf, ids, f16_kv=cache == "f16")
            assert np.abs(got - want).max() < tol, (name, cache)


def test_neon_logits_hash_as_stored(tmp_path):
    """The byte-identity check of test_kernel.py, for the NEON path (the default model is
    left out: too slow under qemu)."""
    exe = mlh.neon_exe(str(tmp_path))
    stored = mlh.load_fixture().get("neon")
    assert stored, f"no stored logit hashes for the neon path in {mlh.FIXTURE}"
    got = mlh.compute(lambda *a: mlh.run_neon(exe, *a), str(tmp_path), only=lambda n: not n.startswith("smollm2"))
    missing = sorted(set(got) - set(stored))
    assert not missing, f"neon: no stored hash for {missing}"
    differ = sorted(k for k in got if got[k] != stored[k])
    assert not differ, f"neon: logits changed in {differ}"
