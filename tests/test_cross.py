"""The arm64 NEON path, cross-compiled and run under qemu-aarch64 (make test-neon): `pyllm
check`'s comparisons (pyllm/check.py's check_model, its tiny models and tolerances) with the
kernel driven by tests/kernel_main.c, as no Python runs there; and the logits' hashes."""

import shutil

import make_logit_hashes as mlh

from pyllm import check


def qemu_kernel(exe):
    """check.kernel_logits' contract, run by the cross-compiled kernel under qemu."""

    def run(path, ids, threads, cache_type):
        split = len(ids) - check.DECODE_TOKENS
        steps = mlh.run_neon(
            exe, path, ids, (split,) + (1,) * check.DECODE_TOKENS, threads, cache_type
        )
        whole = mlh.run_neon(exe, path, ids, (len(ids),), threads, cache_type)
        return threads, steps, whole

    return run


def test_neon_path_passes_check(tmp_path):
    assert shutil.which(mlh.CROSS_CC) and shutil.which("qemu-aarch64"), (
        "make test-neon installs the cross toolchain"
    )
    exe = mlh.neon_exe(str(tmp_path))
    lines = []
    for name, path, ids in check.tiny_models(str(tmp_path)):

        def report(text, ok, name=name):
            lines.append((f"{name}: {text}", ok))

        check.check_model(path, ids, 2, report, kernel=qemu_kernel(exe))
    # per model and cache type: 1 thread, 2 threads, bit-identical
    assert len(lines) == len(check.TINY_MODELS) * len(check.CACHE_TYPES) * 3
    failed = [text for text, ok in lines if not ok]
    assert not failed, failed


def test_neon_logits_hash_as_stored(tmp_path):
    """The byte-identity check of test_kernel.py, for the NEON path (the default model is
    left out: too slow under qemu)."""
    exe = mlh.neon_exe(str(tmp_path))
    stored = mlh.load_fixture().get("neon")
    assert stored, f"no stored logit hashes for the neon path in {mlh.FIXTURE}"
    got = mlh.compute(
        lambda *a: mlh.run_neon(exe, *a), str(tmp_path), only=lambda n: not n.startswith("smollm2")
    )
    missing = sorted(set(got) - set(stored))
    assert not missing, f"neon: no stored hash for {missing}"
    differ = sorted(k for k in got if got[k] != stored[k])
    assert not differ, f"neon: logits changed in {differ}"
