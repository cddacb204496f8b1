"""The C kernel against pyllm/reference.py on tiny random models, and its handling of bad input.

Tolerances: the kernel keeps K (after RoPE) and V in an f16 cache and the reference rounds
them the same way, but the two compute the pre-rounding f32 values in different orders, so
now and then an element rounds to the neighbouring f16 value. Each such flip moves logits
by up to ~1e-3, hence max |diff| < 5e-3 plus a mean that only a faithful kernel meets
(an f32 cache instead of f16 is ~1e-2 max, ~1e-3 mean away from the reference).
"""

import os
import struct

import numpy as np
import pytest

import pyllm
from pyllm import format
from pyllm.reference import reference_logits
from tiny import VARIANTS, make_tiny_model

# max: a last-bit difference in a key or value can flip its f16 rounding in the cache; on
# the 700-token case below the numpy f32 reference itself is 7.6e-3 from a float64 one
MAX_TOL, MEAN_TOL = 1e-2, 3e-4
N_TOKENS = 300  # more than the kernel's 128-token block: several blocks per forward pass


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    paths = {}
    for i, (name, overrides) in enumerate(VARIANTS.items()):
        paths[name] = str(d / f"{name}.bin")
        make_tiny_model(paths[name], seed=100 + i, **overrides)
    return paths


def random_ids(path, n=N_TOKENS, seed=0):
    vocab = format.read(path, map_tensors=False).config["vocab_size"]
    return np.random.default_rng(seed).integers(0, vocab, n).tolist()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_reference(tiny_paths, variant):
    path = tiny_paths[variant]
    ids = random_ids(path)
    got = pyllm.load(path, threads=2).logits(ids)
    want = reference_logits(format.read(path), ids)
    assert got.dtype == np.float32 and got.shape == want.shape
    diff = np.abs(got - want)
    assert diff.max() < MAX_TOL and diff.mean() < MEAN_TOL, (
        f"{variant}: max |kernel - reference| {diff.max():.2e}, mean {diff.mean():.2e}"
    )
    assert (got.argmax(1) == want.argmax(1)).mean() > 0.95


def test_kv_cache_is_f16(tiny_paths):
    """The kernel is much closer to the reference with an f16 K/V cache than with an f32 one."""
    path = tiny_paths["base"]
    ids = random_ids(path, seed=1)
    got = pyllm.load(path, threads=2).logits(ids)
    mf = format.read(path)
    d16 = np.abs(got - reference_logits(mf, ids, cache_type="f16")).mean()
    d32 = np.abs(got - reference_logits(mf, ids, cache_type="f32")).mean()
    assert d16 < 0.3 * d32, (d16, d32)


def test_sliding_window_matters(tiny_paths):
    """The window variant really differs from full attention past the window (so the test
    above checks the window), and equals it inside the window."""
    path = tiny_paths["window"]
    mf = format.read(path)
    ids = random_ids(path, n=20)
    got = pyllm.load(path, threads=2).logits(ids)
    mf.config["sliding_window"] = 0
    full = reference_logits(mf, ids)
    w = VARIANTS["window"]["sliding_window"]
    assert np.abs(got[:w] - full[:w]).max() < MAX_TOL
    assert np.abs(got[w:] - full[w:]).max() > 0.1


@pytest.mark.parametrize("cache", ["f16", "f32"])
@pytest.mark.parametrize("variant", ["base", "odd", "window_bias_gqa4"])
def test_threads_bit_exact(tiny_paths, variant, cache):
    path = tiny_paths[variant]
    ids = random_ids(path, seed=2)
    outs = {t: pyllm.load(path, threads=t, cache_type=cache).logits(ids) for t in (1, 2, 4)}
    assert np.array_equal(outs[1], outs[2]) and np.array_equal(outs[1], outs[4])


@pytest.mark.parametrize("cache", ["f16", "f32"])
@pytest.mark.parametrize("variant", ["base", "odd", "window", "window_bias_gqa4"])
def test_incremental_equals_block(tiny_paths, variant, cache):
    path = tiny_paths[variant]
    ids = random_ids(path, seed=3)
    m = pyllm.load(path, threads=2, cache_type=cache)
    block = m.logits(ids)
    m.reset()
    one_by_one = np.stack([m.eval([t]) for t in ids])
    assert np.array_equal(
        one_by_one, block
    )  # the kernel sums each score the same way at any position
    # uneven chunks, crossing the kernel's block boundaries
    m.reset()
    pos = 0
    for size in (5, 1, 133, 2, 29, 130):
        last = m.eval(ids[pos : pos + size])
        pos += size
        assert np.array_equal(last, block[pos - 1]), f"chunk ending at {pos}"
    assert pos == len(ids)
    # after reset the cache starts over
    m.reset()
    assert np.array_equal(m.eval(ids[:10]), block[9])
    assert np.array_equal(m.logits(ids), block)


def test_bad_input(tiny_paths):
    path = tiny_paths["base"]
    m = pyllm.load(path, threads=1, n_ctx=16)
    vocab = m.config["vocab_size"]
    for ids in ([vocab], [-1], [1, 2, 10**9], []):
        with pytest.raises(pyllm.PyllmError):
            m.logits(ids)
    with pytest.raises(pyllm.PyllmError, match="context"):
        m.logits(list(range(17)))
    assert m.logits(list(range(16))).shape == (16, vocab)  # still usable after the errors
    with pytest.raises(pyllm.PyllmError):
        pyllm.load(path, n_ctx=10**6)


def test_kernel_refuses_bad_forward_arguments(tiny_paths):
    """The kernel checks its own arguments (Python checks first; this is the backstop)."""
    from pyllm._pyllm import ffi, lib

    vocab = pyllm.load(tiny_paths["base"], n_ctx=16).config["vocab_size"]
    m = pyllm._native_open(str(tiny_paths["base"]), 1, 16)
    out = np.zeros((17, vocab), np.float32)
    logits = ffi.cast("float *", ffi.from_buffer(out))

    def fwd(ids, pos=0):
        return lib.pyllm_forward(m, ffi.new("int[]", ids or [0]), len(ids), pos, logits, 1)

    assert fwd([vocab]) == fwd([1, -1]) == lib.PYLLM_E_TOKEN
    assert fwd(list(range(17))) == fwd([1], pos=16) == lib.PYLLM_E_CONTEXT
    assert fwd([]) == fwd([1], pos=-1) == lib.PYLLM_E_ARG
    assert fwd([1, 2]) == 0 and np.isfinite(out[:2]).all()
    assert str(pyllm.model.forward_error(lib.PYLLM_E_CONTEXT)).startswith("context full")


def test_generate_greedy_and_seeded(tiny_paths):
    path = tiny_paths["base"]
    m = pyllm.load(path, threads=2)
    prompt = random_ids(path, n=12, seed=4)
    mf = format.read(path)
    ids = list(prompt)
    for _ in range(8):  # greedy continuation by the reference
        ids.append(int(reference_logits(mf, ids)[-1].argmax()))
    text = "".join(m.generate(prompt, 8, temperature=0.0, stop_ids=[]))
    assert text == m.tokenizer.decode(ids[len(prompt) :])
    a = "".join(m.generate(prompt, 16, temperature=1.0, top_k=0, top_p=1.0, seed=7, stop_ids=[]))
    b = "".join(m.generate(prompt, 16, temperature=1.0, top_k=0, top_p=1.0, seed=7, stop_ids=[]))
    assert a == b


# --- bad files: rejected by pyllm.load (Python checks first) and by the C side alone ---


def _patched(src, dst, fn):
    data = bytearray(open(src, "rb").read())
    data = fn(data)
    open(dst, "wb").write(bytes(data))
    return str(dst)


# n_tensors sits after the magic, 12 u32 fields, f32 norm_eps and a u32 reserved field
_N_TENSORS_AT = 8 + 12 * 4 + 4 + 4


def _move_last_tensor(data, new_offset):
    """Point the last tensor's table entry at new_offset(old_offset, file_size)."""
    n = struct.unpack_from("<Q", data, _N_TENSORS_AT)[0]
    at = format.HEADER_SIZE + 16 * (n - 1)
    old = struct.unpack_from("<Q", data, at)[0]
    struct.pack_into("<Q", data, at, new_offset(old, len(data)))
    return data


BAD_FILES = {  # name: (patch of the file's bytes, what the message must say)
    "truncated": (lambda d: d[: len(d) // 2], r"truncated"),
    "shorter than a header": (lambda d: d[:60], r"truncated|too short"),
    "empty": (lambda d: d[:0], r"magic|too short"),
    "wrong magic": (lambda d: b"GGUF" + d[4:], r"magic"),
    "wrong version": (lambda d: d[:8] + struct.pack("<I", 7) + d[12:], r"version"),
    "offset past end": (lambda d: _move_last_tensor(d, lambda old, size: size + 4096), r"offset"),
    "tensor runs past end": (
        lambda d: _move_last_tensor(d, lambda old, size: size - 64),
        r"offset",
    ),
    "misaligned offset": (lambda d: _move_last_tensor(d, lambda old, size: old + 2), r"offset"),
}


def test_header_offsets_match_format(tiny_paths):
    """The hand-written header offset above agrees with format.py's struct."""
    data = open(tiny_paths["base"], "rb").read()
    fields = format._HEADER.unpack_from(data)
    assert struct.unpack_from("<Q", data, _N_TENSORS_AT)[0] == fields[15]
    assert fields[15] == len(format.tensor_layout(format.read(tiny_paths["base"]).config))
    assert len(data) % 64 == 0  # so that size - 64 and size + 4096 are aligned offsets


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_file(tiny_paths, tmp_path, case):
    patch, pattern = BAD_FILES[case]
    path = _patched(tiny_paths["base"], tmp_path / "bad.bin", patch)
    for open_it in (lambda: pyllm.load(path), lambda: pyllm._native_open(path, 1, 0)):
        with pytest.raises(pyllm.PyllmError, match=pattern) as e:
            open_it()
        msg = str(e.value)
        assert msg and "\n" not in msg and len(msg) < 400, msg


def test_missing_file(tmp_path):
    for open_it in (pyllm.load, lambda p: pyllm._native_open(p, 1, 0)):
        with pytest.raises(pyllm.PyllmError, match="No such file"):
            open_it(str(tmp_path / "nope.bin"))


@pytest.mark.parametrize("window", [0, 300])
def test_long_context_across_attention_segments(tmp_path, window):
    """Attention is split into segments of 512 positions (merged per row afterwards): 700
    tokens span two, with and without a sliding window that crosses them."""
    path = str(tmp_path / "long.bin")
    make_tiny_model(path, seed=7, max_seq_len=1024, sliding_window=window, n_kv_heads=1)
    ids = random_ids(path, n=700, seed=3)
    block = pyllm.load(path, threads=2).logits(ids)
    want = reference_logits(format.read(path), ids)
    diff = np.abs(block - want)
    assert diff.max() < MAX_TOL and diff.mean() < MEAN_TOL, (
        f"max {diff.max():.2e}, mean {diff.mean():.2e}"
    )
    m = pyllm.load(path, threads=3)
    m.eval(ids[:680])
    tail = np.stack([m.eval([t]) for t in ids[680:]])
    assert np.array_equal(tail, block[680:])  # decode = prefill, and 3 threads = 2


@pytest.mark.parametrize("window", [0, 8, 300])
def test_segments_straddled_and_out_of_window(tmp_path, window):
    """A block that straddles a segment boundary (rows before the last segment see none of it),
    and segments wholly before the window: empty ranges in attend."""
    path = str(tmp_path / "long.bin")
    make_tiny_model(path, seed=7, max_seq_len=1024, sliding_window=window, n_kv_heads=1)
    ids = random_ids(path, n=900, seed=3)
    want = reference_logits(format.read(path), ids)
    for threads in (1, 2):
        m = pyllm.load(path, threads=threads)
        got = np.stack(
            [
                m.eval(ids[:500]),
                m.eval(ids[500:600]),
                m.eval(ids[600:601]),
                m.eval(ids[601:602]),
                m.eval(ids[602:900]),
            ]
        )
        diff = np.abs(got - want[[499, 599, 600, 601, 899]])
        assert diff.max() < MAX_TOL, f"threads {threads}: max {diff.max():.2e}"
        del m


# --- byte identity: the logits of fixed inputs hash as the fixture says for this path ---


def test_logits_hash_as_stored(tmp_path):
    """Every case of tests/make_logit_hashes.py, at 1 and 2 threads, hashes as stored for the
    compiled path (a path without stored hashes fails: generate them from a trusted build)."""
    import make_logit_hashes as mlh

    from pyllm._pyllm import ffi, lib

    simd = ffi.string(lib.pyllm_simd()).decode()
    stored = mlh.load_fixture().get(simd)
    assert stored, f"no stored logit hashes for the {simd} path in {mlh.FIXTURE}"
    got = mlh.compute(mlh.run_python, str(tmp_path))
    if os.path.exists(mlh.DEFAULT_MODEL):
        assert "smollm2/decode@t1" in got
    missing = sorted(set(got) - set(stored))
    assert not missing, f"{simd}: no stored hash for {missing}"
    differ = sorted(k for k in got if got[k] != stored[k])
    assert not differ, f"{simd}: logits changed in {differ}"


# --- the f32 KV cache: keys and values kept exact ---

# only the order of the f32 sums differs from the reference (measured: max 3.5e-5, mean 3e-6)
F32_MAX_TOL, F32_MEAN_TOL = 2e-4, 1e-5


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_f32_cache_matches_reference(tiny_paths, variant):
    path = tiny_paths[variant]
    ids = random_ids(path)
    m = pyllm.load(path, threads=2, cache_type="f32")
    assert m.cache_types == ("f32", "f32")
    diff = np.abs(m.logits(ids) - reference_logits(format.read(path), ids, cache_type="f32"))
    assert diff.max() < F32_MAX_TOL and diff.mean() < F32_MEAN_TOL, (
        f"max {diff.max():.2e}, mean {diff.mean():.2e}"
    )


@pytest.mark.parametrize("k, v", [("f32", "f16"), ("f16", "f32")])
def test_mixed_cache_types(tiny_paths, k, v):
    """Keys and values each in their own type: the reference rounds only the f16 one."""
    path = tiny_paths["window_bias_gqa4"]
    ids = random_ids(path, seed=5)
    m = pyllm.load(path, threads=2, cache_type="f16", cache_type_k=k, cache_type_v=v)
    assert m.cache_types == (k, v)
    want = reference_logits(format.read(path), ids, cache_type_k=k, cache_type_v=v)
    diff = np.abs(m.logits(ids) - want)
    assert diff.max() < MAX_TOL and diff.mean() < MEAN_TOL, (
        f"max {diff.max():.2e}, mean {diff.mean():.2e}"
    )


@pytest.mark.parametrize("window", [0, 300])
def test_f32_cache_across_segments(tmp_path, window):
    path = str(tmp_path / "long.bin")
    make_tiny_model(path, seed=7, max_seq_len=1024, sliding_window=window, n_kv_heads=1)
    ids = random_ids(path, n=700, seed=3)
    block = pyllm.load(path, threads=2, cache_type="f32").logits(ids)
    diff = np.abs(block - reference_logits(format.read(path), ids, cache_type="f32"))
    assert diff.max() < F32_MAX_TOL and diff.mean() < F32_MEAN_TOL, (
        f"max {diff.max():.2e}, mean {diff.mean():.2e}"
    )
    m = pyllm.load(path, threads=1, cache_type="f32")
    m.eval(ids[:600])
    tail = np.stack([m.eval([t]) for t in ids[600:]])
    assert np.array_equal(tail, block[600:])  # decode = prefill, and 1 thread = 2


def test_cache_bytes(tmp_path):
    """The cache's one mapping: segments of 512 positions, per layer and KV head a padded
    head_dim by 512 matrix each of keys and values, 2 or 4 bytes an element."""
    from pyllm._pyllm import lib

    path = str(tmp_path / "long.bin")
    cfg = make_tiny_model(path, max_seq_len=1024, dim=72, head_dim=24, n_heads=3, n_kv_heads=1)
    elements = 2 * cfg["n_layers"] * cfg["n_kv_heads"] * 32 * 512  # n_ctx 600; head_dim 24 -> 32
    for k, v in [("f16", "f16"), ("f32", "f16"), ("f16", "f32"), ("f32", "f32")]:
        m = pyllm.load(path, n_ctx=600, cache_type_k=k, cache_type_v=v)
        assert lib.pyllm_cache_bytes(m._m) == elements * (int(k[1:]) // 8 + int(v[1:]) // 8)


def test_bad_cache_type(tiny_paths):
    from pyllm._pyllm import ffi, lib

    for kwargs in ({"cache_type": "q8_0"}, {"cache_type_k": "F32"}, {"cache_type_v": 32}):
        with pytest.raises(pyllm.PyllmError, match="cache type") as e:
            pyllm.load(tiny_paths["base"], **kwargs)
        assert "\n" not in str(e.value)
    err = ffi.new("char[]", 512)
    assert lib.pyllm_open(tiny_paths["base"].encode(), 1, 0, 0, 7, err, 512) == ffi.NULL
    assert "cache type" in ffi.string(err).decode()


def test_kernel_refuses_what_is_not_a_regular_file(tmp_path):
    """The C API on its own (no Python pre-check): a FIFO or a directory is refused at once,
    with a one-line message, never opened blocking."""
    from pyllm._pyllm import ffi, lib

    os.mkfifo(tmp_path / "fifo")
    for path in (tmp_path / "fifo", tmp_path):
        err = ffi.new("char[]", 512)
        m = lib.pyllm_open(os.fsencode(str(path)), 1, 16, 0, 0, err, 512)
        assert m == ffi.NULL
        assert ffi.string(err).decode().endswith("not a regular file"), ffi.string(err)
