"""What the kernel allocates for a context, and whether that fits in memory.

kernel_bytes() mirrors the sizes pyllm_open allocates (csrc/pyllm.c, start()): the KV
cache (K and V, per SEGMENT positions, head_dim rounded up to BLOCK_ROWS) and nine
activation buffers of floats. Constants that depend on the vector path (PANEL_BLOCKS,
TILE_TOKENS) take their largest value (AVX-512's), so the estimate is an upper bound on
every path; tests/test_memory.py compares it with what the kernel maps. check_context() refuses a
context that would not fit before the kernel is asked for it, saying which context would.
"""

import os
import resource
import sys

SEGMENT, PASS_TOKENS, ATTN_ROWS, BLOCK_ROWS = 512, 128, 4, 16  # the kernel's enum
PANEL_BLOCKS, TILE_TOKENS = 3, 8  # the largest of its per-ISA tile sizes (AVX-512)
MAX_THREADS = 64
CACHE_BYTES = 2  # f16 keys and values


def _rows16(r):
    return -(-r // BLOCK_ROWS) * BLOCK_ROWS


def kernel_threads(threads):
    """The thread count pyllm_open uses for a request (0 or None: one per online CPU)."""
    if not threads or threads <= 0:
        try:
            threads = os.sysconf("SC_NPROCESSORS_ONLN")
        except (ValueError, OSError, AttributeError):
            threads = os.cpu_count() or 1
    return min(max(threads, 1), MAX_THREADS)


def kernel_bytes(cfg, n_ctx, threads, cache_bytes=CACHE_BYTES):
    """Bytes pyllm_open allocates beyond the mapped file for a context of n_ctx tokens:
    (KV cache, activation buffers). cfg: the header fields; cache_bytes: per cached element."""
    d, hid, hd = cfg["dim"], cfg["hidden_dim"], cfg["head_dim"]
    n_heads, n_kv = cfg["n_heads"], cfg["n_kv_heads"]
    nseg = -(-n_ctx // SEGMENT)
    kv = 2 * nseg * cfg["n_layers"] * n_kv * _rows16(hd) * SEGMENT * cache_bytes
    q_dim, kv_dim = n_heads * hd, n_kv * hd
    n_in = max(d, hid, q_dim)
    scratch = max(PANEL_BLOCKS * BLOCK_ROWS * n_in, ATTN_ROWS * (SEGMENT + 16 + hd))
    tiles = -(-(PASS_TOKENS * (n_heads // n_kv)) // ATTN_ROWS)
    rows = PASS_TOKENS + TILE_TOKENS
    floats = (
        rows * (2 * d + q_dim + 2 * kv_dim + q_dim + 2 * hid + hd)
        + kernel_threads(threads) * scratch
        + n_kv * tiles * nseg * ATTN_ROWS * (hd + 2)
    )
    return kv, 4 * floats


def _meminfo_available():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def _cgroup_room():
    """Room left under this process's cgroup v2 memory limit, if it has one."""
    try:
        with open("/proc/self/cgroup") as f:
            rel = next(
                (line.split(":", 2)[2].strip() for line in f if line.startswith("0::")), None
            )
        if rel is None:
            return None
        base = os.path.join("/sys/fs/cgroup", rel.lstrip("/"))
        with open(os.path.join(base, "memory.max")) as f:
            limit = f.read().strip()
        if limit == "max":
            return None
        with open(os.path.join(base, "memory.current")) as f:
            return max(int(limit) - int(f.read()), 0)
    except (OSError, ValueError, IndexError):
        return None


def _address_space_room(map_bytes, threads):
    """Room left under RLIMIT_AS (ulimit -v), if set, once the kernel has mapped the file
    (map_bytes) and started its threads (a stack each): its allocations are address space."""
    soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        with open("/proc/self/status") as f:
            used = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    except (OSError, StopIteration, ValueError):
        return None
    stack = resource.getrlimit(resource.RLIMIT_STACK)[0]
    stack = 8 << 20 if stack == resource.RLIM_INFINITY else stack  # glibc's thread stacks
    return max(soft - used - map_bytes - (kernel_threads(threads) - 1) * stack, 0)


def available_bytes(map_bytes=0, threads=None):
    """(bytes, where the figure comes from): memory the process can still take, or (None, None).
    Linux: MemAvailable, less if a cgroup limit or RLIMIT_AS leaves less room; macOS and
    other systems: the physical memory (sysctl hw.memsize through sysconf)."""
    found = []
    if sys.platform.startswith("linux"):
        try:
            found.append((_meminfo_available(), "available memory"))
        except OSError:
            pass
        found.append((_cgroup_room(), "room under the cgroup's memory limit"))
    else:
        try:
            found.append(
                (os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "physical memory")
            )
        except (ValueError, OSError, AttributeError):
            pass
    found.append(
        (_address_space_room(map_bytes, threads), "room under the address-space limit (ulimit -v)")
    )
    found = [(b, w) for b, w in found if b is not None]
    return min(found) if found else (None, None)


def _gib(n):
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def check_context(cfg, n_ctx, threads, cache_bytes=CACHE_BYTES, map_bytes=0, available=None):
    """Raise ValueError if the kernel's allocations for a context of n_ctx tokens would not
    fit: the message says what it needs and the largest context that fits. map_bytes: the
    file the kernel maps; available: (bytes, what) instead of available_bytes()."""
    avail, where = available if available is not None else available_bytes(map_bytes, threads)
    if avail is None:
        return

    def need(n):
        return sum(kernel_bytes(cfg, n, threads, cache_bytes))

    if need(n_ctx) <= avail:
        return
    lo, hi = 0, n_ctx  # the largest n with need(n) <= avail: need grows with n
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if need(mid) <= avail:
            lo = mid
        else:
            hi = mid - 1
    kv, bufs = kernel_bytes(cfg, n_ctx, threads, cache_bytes)
    head = (
        f"a context of {n_ctx} tokens needs {_gib(kv)} for the KV cache and {_gib(bufs)} "
        f"for buffers, more than the {_gib(avail)} of {where}"
    )
    if lo == 0:
        raise ValueError(f"{head}; not even a context of 1 token fits ({_gib(need(1))})")
    raise ValueError(f"{head}; a context of at most {lo} tokens fits (-c {lo})")
