"""A fuzzer for the file loader: real headers and tensor tables, mutated.

Both loaders (C and Python) must accept a file or refuse it with PyllmError/FormatError;
when the C loader accepts one, a forward pass over it must stay inside the file (run
under AddressSanitizer by `make test-asan`). Inputs that ever crashed live in
tests/fuzz_cases/ and are replayed first.
"""
import glob
import os
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pyllm
from pyllm import format
from tiny import make_tiny_model

EXAMPLES = int(os.environ.get("PYLLM_FUZZ_EXAMPLES", "300"))
CASES = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "fuzz_cases", "*.bin")))


@pytest.fixture(scope="module")
def seed_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "seed.bin"
    make_tiny_model(path, n_layers=1, vocab_size=260, qkv_bias=True)
    return path


def try_file(path):
    try:
        m = pyllm._native_open(str(path), 1, 16)
    except pyllm.PyllmError as e:
        assert str(e) and "\n" not in str(e)
    else:
        from pyllm._pyllm import ffi, lib
        vocab = struct.unpack_from("<I", open(path, "rb").read(48), 40)[0]
        out = np.zeros(vocab, np.float32)
        ids = [0, vocab - 1][:lib.pyllm_n_ctx(m)]
        rc = lib.pyllm_forward(m, ffi.new("int[]", ids), len(ids), 0, ffi.cast("float *", ffi.from_buffer(out)), 0)
        assert rc == 0
    try:
        format.read(str(path))
    except format.FormatError as e:
        assert str(e)


def mutate(data, edits, cut):
    b = bytearray(data)
    meta_end = struct.unpack_from("<Q", b, 80)[0] + struct.unpack_from("<Q", b, 88)[0]
    for pos, value, width in edits:
        pos %= max(1, min(len(b), meta_end) - width)
        b[pos:pos + width] = value.to_bytes(8, "little")[:width]
    return bytes(b[:cut]) if cut is not None else bytes(b)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(edits=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, (1 << 64) - 1), st.sampled_from([1, 4, 8])),
                      min_size=1, max_size=4),
       cut=st.one_of(st.none(), st.integers(0, 4096)))
def test_mutated_files_are_refused_or_safe(seed_file, tmp_path_factory, edits, cut):
    path = tmp_path_factory.mktemp("case") / "m.bin"
    path.write_bytes(mutate(seed_file.read_bytes(), edits, cut))
    try_file(path)


@settings(max_examples=EXAMPLES // 3, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(field=st.integers(0, 18), value=st.sampled_from([0, 1, 2, 3, 63, 64, 65, 4095, 1 << 19, (1 << 20) - 1, 1 << 20,
                                                        (1 << 31) - 1, (1 << 32) - 1]))
def test_each_header_field_at_its_edges(seed_file, tmp_path_factory, field, value):
    # header words after the magic: 12 u32, norm_eps, reserved, then 5 u64
    b = bytearray(seed_file.read_bytes())
    if field < 14:
        struct.pack_into("<I", b, 8 + 4 * field, value)
    else:
        struct.pack_into("<Q", b, 64 + 8 * (field - 14), value)
    path = tmp_path_factory.mktemp("edge") / "m.bin"
    path.write_bytes(bytes(b))
    try_file(path)


@pytest.mark.parametrize("case", CASES or ["<none recorded>"])
def test_recorded_crashers(case):
    # The fuzzer has found no crasher yet; this replays any that get recorded.
    if case != "<none recorded>":
        try_file(case)
    assert os.path.isdir(os.path.join(os.path.dirname(__file__), "fuzz_cases"))


@pytest.mark.parametrize("n_heads, head_dim", [(1 << 19, 1 << 13), (1 << 12, 1 << 10), (1 << 17, 2)])
def test_head_product_out_of_range_is_refused(seed_file, tmp_path, n_heads, head_dim):
    # each field alone is in range; the product (an int in the kernel) is not: 2^32 wrapped to 0;
    # or, head_dim padded to 16 as the KV cache stores it, the cache size would overflow
    b = bytearray(open(seed_file, "rb").read())
    struct.pack_into("<III", b, 24, n_heads, 1, head_dim)  # n_heads, n_kv_heads, head_dim
    path = tmp_path / "heads.bin"
    path.write_bytes(bytes(b))
    with pytest.raises(pyllm.PyllmError, match="inconsistent header"):
        pyllm._native_open(str(path), 1, 16)
    with pytest.raises(format.FormatError, match="n_heads \\* head_dim"):
        format.read(str(path))
