"""memory: the kernel's allocations estimated in Python, and a context that does not fit refused."""

import os

import pytest

import pyllm
from pyllm import format, memory


def _vm_size():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))


@pytest.mark.parametrize("n_ctx", [1, 512, 513, 4096])
def test_estimate_bounds_what_the_kernel_maps(default_model, n_ctx):
    """The estimate is at least the address space pyllm_open takes (beyond the file's map),
    and not far above it (the tile sizes are the largest path's)."""
    cfg = format.read(default_model, map_tensors=False).config
    before = _vm_size()
    m = pyllm._native_open(default_model, 1, n_ctx)
    grew = _vm_size() - before - os.path.getsize(default_model)
    del m
    est = sum(memory.kernel_bytes(cfg, n_ctx, 1))
    assert grew <= est <= 1.1 * grew + (4 << 20), (grew, est)


def test_kv_cache_grows_by_segments_and_with_cache_bytes():
    cfg = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=24, hidden_dim=96)
    kv1, _ = memory.kernel_bytes(cfg, 1, 1)
    assert (
        kv1 == 2 * 2 * 2 * 32 * 512 * 2
    )  # K and V, layers, KV heads, head_dim in rows of 16, a segment, f16
    assert (
        memory.kernel_bytes(cfg, 512, 1)[0] == kv1
        and memory.kernel_bytes(cfg, 513, 1)[0] == 2 * kv1
    )
    assert memory.kernel_bytes(cfg, 1, 1, cache_bytes=4)[0] == 2 * kv1


def test_a_context_that_does_not_fit_names_one_that_does(default_model):
    cfg = format.read(default_model, map_tensors=False).config
    need = sum(memory.kernel_bytes(cfg, 2048, 1))
    with pytest.raises(ValueError, match=r"a context of at most (\d+) tokens fits \(-c \1\)") as e:
        memory.check_context(cfg, 8192, 1, available=(need, "test memory"))
    fits = int(e.value.args[0].rsplit("-c ", 1)[1].rstrip(")"))
    assert 2048 <= fits < 2560  # whole segments of 512
    memory.check_context(cfg, fits, 1, available=(need, "test memory"))
    with pytest.raises(ValueError, match="not even a context of 1 token"):
        memory.check_context(cfg, 8192, 1, available=(1000, "test memory"))
    assert memory.available_bytes()[0] > 0
