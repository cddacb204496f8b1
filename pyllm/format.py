"""The pyllm parameters file: layout, writer and reader, in one place.

Layout (little-endian; docs/FORMAT.md is the spec):
  header (128 bytes)  magic, version, hyper-parameters, where the rest is
  tensor table        n_tensors x {u64 offset, u64 nbytes}, in canonical order
  metadata            UTF-8 JSON: config, tokenizer, chat template, provenance,
                      and the tensor list (name, dtype, shape, offset)
  tensors             each aligned to ALIGN bytes, f16 (rope_freqs: f32); matrices
                      in blocks of ROW_BLOCK rows, input-major inside (to_blocks)

The C kernel reads only the header and the table; Python reads the JSON.
"""

import json
import math
import os
import struct
from dataclasses import dataclass
from typing import Callable

import numpy as np

from . import metadata, outfile, safeio

MAGIC = b"PYLLM\0\0\0"
VERSION = 2  # 2: matrices stored in row blocks
ALIGN = 64
HEADER_SIZE = 128
FLAG_TIED_OUTPUT = 1
FLAG_QKV_BIAS = 2
KNOWN_FLAGS = FLAG_TIED_OUTPUT | FLAG_QKV_BIAS
ROW_BLOCK = 16

# magic, version, header_size, dim, n_layers, n_heads, n_kv_heads, head_dim,
# hidden_dim, vocab_size, max_seq_len, flags, sliding_window, norm_eps, reserved,
# n_tensors, table_offset, meta_offset, meta_size, file_size
_HEADER = struct.Struct("<8s12IfIQQQQQ")
assert _HEADER.size <= HEADER_SIZE
HEADER_INTS = (
    "dim",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "head_dim",
    "hidden_dim",
    "vocab_size",
    "max_seq_len",
    "flags",
    "sliding_window",
)
LIMIT = 1 << 20  # no hyper-parameter of a sane model is this large


class FormatError(ValueError):
    """The file is not a valid pyllm parameters file."""


class MetadataError(FormatError):
    """Its header and tensor table are valid, its metadata JSON is not (pyllm/metadata.py)."""


@dataclass
class TensorSpec:
    name: str
    shape: tuple
    dtype: str  # "f16" or "f32"
    load: Callable[[], np.ndarray] = None  # produces the data, called once while writing

    @property
    def nbytes(self):
        return int(np.prod(stored_shape(self.name, self.shape))) * (2 if self.dtype == "f16" else 4)


def _parts(name):
    return 2 if name.endswith("ffn_gate_up") else 1  # gate and up are blocked apart


def stored_shape(name, shape):
    """A matrix (rows, n) is stored as (blocks, n, ROW_BLOCK); anything else as it is."""
    if len(shape) != 2:
        return tuple(shape)
    parts = _parts(name)
    return (parts * -(-shape[0] // parts // ROW_BLOCK), shape[1], ROW_BLOCK)


def to_blocks(name, a):
    """Matrix (rows, n) -> stored (blocks, n, ROW_BLOCK): each block holds ROW_BLOCK rows
    side by side, so the kernel loads ROW_BLOCK rows' weights at one input index as one
    vector. Rows are padded with zeros to whole blocks (each part of a fused matrix apart)."""
    out = []
    for p in np.split(a, _parts(name)):
        pad = -p.shape[0] % ROW_BLOCK
        p = np.concatenate([p, np.zeros((pad, p.shape[1]), p.dtype)]) if pad else p
        out.append(p.reshape(-1, ROW_BLOCK, p.shape[1]).transpose(0, 2, 1))
    return np.ascontiguousarray(
        out[0] if len(out) == 1 else np.concatenate(out)
    )  # one copy for one part


def from_blocks(name, stored, rows):
    """Stored (blocks, n, ROW_BLOCK) -> the matrix (rows, n), a copy."""
    parts = _parts(name)
    return np.concatenate(
        [
            b.transpose(0, 2, 1).reshape(-1, stored.shape[1])[: rows // parts]
            for b in np.split(np.asarray(stored), parts)
        ]
    )


def tensor_layout(cfg):
    """Canonical tensor order, names, shapes and dtypes for a config dict.

    Q, K and V are one matrix (rows: n_heads*head_dim of Q, then K, then V), gate and
    up are one matrix (hidden_dim rows of gate, then up), so each is one matmul.
    Q/K rows use the Hugging Face (rotate-half) RoPE layout.
    """
    return list(tensor_layout_lazy(cfg))


def tensor_layout_lazy(cfg):
    """tensor_layout(cfg), one entry at a time."""
    d, hd, hid = cfg["dim"], cfg["head_dim"], cfg["hidden_dim"]
    qkv = (cfg["n_heads"] + 2 * cfg["n_kv_heads"]) * hd
    yield from [("tok_embd", (cfg["vocab_size"], d), "f16"), ("rope_freqs", (hd // 2,), "f32")]
    for i in range(cfg["n_layers"]):
        p = f"blk.{i}."
        yield from [(p + "attn_norm", (d,), "f16"), (p + "attn_qkv", (qkv, d), "f16")]
        if cfg["flags"] & FLAG_QKV_BIAS:
            yield p + "attn_qkv_bias", (qkv,), "f16"
        yield from [
            (p + "attn_out", (d, cfg["n_heads"] * hd), "f16"),
            (p + "ffn_norm", (d,), "f16"),
            (p + "ffn_gate_up", (2 * hid, d), "f16"),
            (p + "ffn_down", (d, hid), "f16"),
        ]
    yield "output_norm", (d,), "f16"
    if not cfg["flags"] & FLAG_TIED_OUTPUT:
        yield "output", (cfg["vocab_size"], d), "f16"


def check_config(cfg):
    for k in HEADER_INTS:
        v = cfg.get(k)
        if not isinstance(v, int) or v < 0 or (v >= LIMIT and k != "flags"):  # flags: below
            raise FormatError(f"config field {k}={v!r} is out of range")
    for k in (
        "dim",
        "n_layers",
        "n_heads",
        "n_kv_heads",
        "head_dim",
        "hidden_dim",
        "vocab_size",
        "max_seq_len",
    ):
        if cfg[k] == 0:
            raise FormatError(f"config field {k} is 0")
    if cfg["n_heads"] % cfg["n_kv_heads"]:
        raise FormatError(
            f"n_heads={cfg['n_heads']} is not a multiple of n_kv_heads={cfg['n_kv_heads']}"
        )
    if cfg["head_dim"] % 2:
        raise FormatError(f"head_dim={cfg['head_dim']} is odd")
    padded = (
        -(-cfg["head_dim"] // ROW_BLOCK) * ROW_BLOCK
    )  # the KV cache stores head_dim in row blocks
    if cfg["n_heads"] * padded >= LIMIT:
        raise FormatError(
            f"n_heads * head_dim = {cfg['n_heads'] * cfg['head_dim']} is out of range "
            f"(with head_dim padded to {ROW_BLOCK}: {cfg['n_heads'] * padded})"
        )
    if not (0 < cfg["norm_eps"] < math.inf):  # NaN fails both
        raise FormatError(f"norm_eps={cfg['norm_eps']!r} must be positive and finite")
    if cfg["flags"] & ~KNOWN_FLAGS:
        raise FormatError(
            f"flags={cfg['flags']:#x} has unknown bits (known: tied output 1, QKV bias 2)"
        )


def _align(n):
    return (n + ALIGN - 1) // ALIGN * ALIGN


def write(path, cfg, meta, tensors, progress=None, inputs=()):
    """Write a parameters file atomically (outfile.atomic_output: a temporary file, renamed
    over PATH; PATH must not be one of INPUTS).

    cfg: the header fields (HEADER_INTS and norm_eps); meta: JSON-able dict;
    tensors: {name: TensorSpec} holding every name tensor_layout(cfg) lists.
    On any failure (disk full, Ctrl-C, SIGTERM) the temporary file is removed.
    """
    check_config(cfg)
    layout = tensor_layout(cfg)
    specs = []
    for name, shape, dtype in layout:
        if name not in tensors:
            raise FormatError(f"missing tensor {name}")
        s = tensors[name]
        if tuple(s.shape) != tuple(shape) or s.dtype != dtype:
            raise FormatError(f"tensor {name}: {s.dtype}{tuple(s.shape)}, expected {dtype}{shape}")
        specs.append(s)
    table_off = HEADER_SIZE
    meta_off = table_off + 16 * len(specs)
    offsets, pos, entries = [], 0, []
    # metadata size depends on offsets and vice versa: lay tensors out relative to the
    # metadata end, then fix up with the final metadata size.
    for s in specs:
        offsets.append(pos)
        pos = _align(pos + s.nbytes)
    meta = dict(meta)
    data_off = -1
    while True:  # the metadata lists the offsets, which depend on the metadata's size
        meta["tensors"] = [
            {"name": s.name, "dtype": s.dtype, "shape": list(s.shape), "offset": data_off + o}
            for s, o in zip(specs, offsets)
        ]
        meta_bytes = json.dumps(meta, ensure_ascii=False, separators=(",", ":")).encode()
        if meta_off + len(meta_bytes) <= data_off:
            break
        data_off = _align(meta_off + len(meta_bytes) + 256)
    entries = meta["tensors"]
    try:  # what read would refuse is never written
        metadata.validate(
            metadata.parse(meta_bytes),
            cfg["vocab_size"],
            layout,
            [(e["offset"], s.nbytes) for e, s in zip(entries, specs)],
        )
    except metadata.MetadataError as e:
        raise FormatError(f"refusing to write {path}: {e}") from None
    file_size = data_off + pos
    header = _HEADER.pack(
        MAGIC,
        VERSION,
        HEADER_SIZE,
        *(cfg[k] for k in HEADER_INTS),
        float(cfg["norm_eps"]),
        0,
        len(specs),
        table_off,
        meta_off,
        len(meta_bytes),
        file_size,
    )
    table = b"".join(struct.pack("<QQ", e["offset"], s.nbytes) for e, s in zip(entries, specs))

    with outfile.atomic_output(path, inputs) as f:
        f.write(header.ljust(HEADER_SIZE, b"\0") + table + meta_bytes)
        for e, s in zip(entries, specs):
            f.write(b"\0" * (e["offset"] - f.tell()))
            a = np.ascontiguousarray(s.load(), dtype=np.float16 if s.dtype == "f16" else np.float32)
            if a.shape != tuple(s.shape):
                raise FormatError(
                    f"tensor {s.name}: loader gave shape {a.shape}, expected {s.shape}"
                )
            if a.ndim == 2:
                a = to_blocks(s.name, a)
            if a.dtype.byteorder == ">":
                a = a.byteswap().view(a.dtype.newbyteorder("<"))
            f.write(memoryview(a).cast("B"))
            if progress:
                progress(s)
        f.write(b"\0" * (file_size - f.tell()))
    return file_size


@dataclass
class ModelFile:
    path: str
    config: dict  # header fields plus meta["config"]
    meta: dict
    tensors: dict  # name -> read-only numpy memmap, as stored (matrices in row blocks)

    def matrix(self, name):
        """A tensor as its logical array (matrices out of their row blocks: a copy)."""
        t = self.tensors[name]
        if t.ndim != 3:
            return t
        rows = next(s[0] for n, s, _ in tensor_layout(self.config) if n == name)
        return from_blocks(name, t, rows)


def tensor_count(cfg):
    """len(tensor_layout(cfg)), without building it (the header is not yet trusted)."""
    per_layer = 6 + bool(cfg["flags"] & FLAG_QKV_BIAS)
    return 3 + cfg["n_layers"] * per_layer + (not cfg["flags"] & FLAG_TIED_OUTPUT)


def _walk_table(f, path, cfg, n_t, end, size):
    """The table's (offset, nbytes) pairs, checked as the kernel's bind_tensors checks them:
    in canonical order, each 64-aligned, of its shape's exact size, after the previous one
    (the first after the metadata), inside the file. Read in chunks: a lying count costs
    no memory before it is caught."""
    table, layout = [], iter(tensor_layout_lazy(cfg))
    f.seek(HEADER_SIZE)
    for start in range(0, n_t, 4096):
        chunk = f.read(16 * min(4096, n_t - start))
        for i, (off, nbytes) in enumerate(struct.iter_unpack("<QQ", chunk), start):
            name, shape, dtype = next(layout)
            want = math.prod(stored_shape(name, shape)) * (2 if dtype == "f16" else 4)
            if nbytes != want or off % ALIGN or off < end or off > size or nbytes > size - off:
                raise FormatError(
                    f"{path}: tensor {i} ({name}): offset {off} size {nbytes} is outside the "
                    f"file or wrong (expected {want} bytes, 64-aligned, from {end})"
                )
            end = off + nbytes
            table.append((off, nbytes))
    return table


def read(path, map_tensors=True):
    """Read and validate a parameters file; tensors are memory-mapped, never copied.

    The header and the tensor table are checked by the same rules as the kernel's
    pyllm_open (a file one refuses, the other refuses: tests/test_fuzz.py), all before
    the metadata, whose errors are MetadataError (pyllm/metadata.py)."""
    try:
        with safeio.open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(HEADER_SIZE)
            if len(head) < 8 or head[:8] != MAGIC:
                raise FormatError(f"{path}: not a pyllm parameters file (bad magic)")
            if len(head) < HEADER_SIZE:
                raise FormatError(f"{path}: truncated header")
            (_, version, hsize, *rest) = _HEADER.unpack_from(head)
            if version != VERSION:
                raise FormatError(
                    f"{path}: format version {version}, this pyllm reads version {VERSION} "
                    "(convert the model again with `pyllm convert`)"
                )
            ints, (eps, _r, n_t, t_off, m_off, m_size, f_size) = rest[:10], rest[10:]
            cfg = dict(zip(HEADER_INTS, ints), norm_eps=eps)
            if f_size != size:
                raise FormatError(
                    f"{path}: file is {size} bytes, header says {f_size} (truncated?)"
                )
            try:
                check_config(cfg)
            except FormatError as e:
                raise FormatError(f"{path}: header: {e}") from None
            if hsize != HEADER_SIZE:
                raise FormatError(f"{path}: header size {hsize}, expected {HEADER_SIZE}")
            if (
                t_off != HEADER_SIZE
                or t_off + 16 * n_t > m_off
                or m_off > size
                or m_size > size - m_off
            ):
                raise FormatError(f"{path}: tensor table or metadata out of bounds")
            if n_t != tensor_count(cfg):
                raise FormatError(
                    f"{path}: tensor table has {n_t} entries, "
                    f"the header implies {tensor_count(cfg)}"
                )
            table = _walk_table(f, path, cfg, n_t, m_off + m_size, size)
            if m_size > metadata.MAX_BYTES:
                raise MetadataError(
                    f"{path}: metadata is {m_size} bytes, more than the "
                    f"{metadata.MAX_BYTES >> 20} MiB pyllm reads"
                )
            f.seek(m_off)
            data = f.read(m_size)
            tensors = {}
            if map_tensors:  # one map of the open file, views into it
                raw = np.memmap(f, dtype=np.uint8, mode="r", shape=(size,))
                for (name, shape, dtype), (off, nbytes) in zip(tensor_layout(cfg), table):
                    view = raw[off : off + nbytes].view("<f2" if dtype == "f16" else "<f4")
                    tensors[name] = view.reshape(stored_shape(name, shape))
    except OSError as e:
        raise FormatError(safeio.error_line(path, e)) from None
    try:
        meta = metadata.validate(metadata.parse(data), cfg["vocab_size"], tensor_layout(cfg), table)
    except metadata.MetadataError as e:
        raise MetadataError(f"{path}: {e}") from None
    config = dict(meta.get("config", {}))
    config.update(cfg)
    return ModelFile(path, config, meta, tensors)
