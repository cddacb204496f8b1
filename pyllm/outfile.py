"""Files pyllm writes or reads for the user: atomic outputs and regular-file inputs.

    with atomic_output(path, inputs=[...]) as f:   # f: a binary file in path's directory
        f.write(...)                                # renamed over path only on success

The temporary file is created exclusively (O_EXCL, O_NOFOLLOW: a link planted at its
unpredictable name is never followed), mode 0600 while it is written, then given the mode
the umask allows, fsynced and renamed over the output. On any failure, Ctrl-C included,
and on SIGTERM or SIGHUP while it exists, it is removed. The output must be a regular file
(or not exist yet) and none of the inputs.
"""

import contextlib
import os
import signal
import stat
import tempfile
import threading

from . import safeio

__all__ = [
    "Interrupted",
    "OutputError",
    "atomic_output",
    "check_output",
    "committed",
    "read_regular",
    "signals_raise",
]

_SIGNALS = tuple(getattr(signal, s) for s in ("SIGTERM", "SIGHUP") if hasattr(signal, s))


class OutputError(Exception):
    """The output or input path is not acceptable; the message is one line naming it."""


class Interrupted(BaseException):
    """A termination signal arrived while an output was being written (a BaseException, like
    KeyboardInterrupt, so that no `except Exception` swallows it)."""

    def __init__(self, signum):
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


_committed = set()  # outputs atomic_output has put in place


def committed(path):
    """Whether atomic_output has put PATH in place (e.g. before a late signal arrived)."""
    return os.path.abspath(os.fspath(path)) in _committed


def _same(a, b):
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def check_output(path, inputs=()):
    """Refuse an output that exists but is not a regular file (a device, a FIFO, a
    directory), that lies in no directory, or that is one of the inputs (also through links)."""
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise OutputError(f"{path}: {e.strerror or e}") from None
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise OutputError(f"{path}: is a directory (give the output file's name)")
        if not stat.S_ISREG(st.st_mode):
            raise OutputError(f"{path}: not a regular file; refusing to replace it")
        for p in inputs:
            if _same(path, p):
                raise OutputError(f"refusing to write onto the input file {p}")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise OutputError(f"{parent}: no such directory")


def _umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def signals_raise():
    """While the block runs, SIGTERM and SIGHUP raise Interrupted (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame):
        raise Interrupted(signum)

    old = {s: signal.signal(s, handler) for s in _SIGNALS}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def _signals_blocked():
    """No signal handler runs inside the block (so a cleanup is not cut short)."""
    mask = set(_SIGNALS) | {signal.SIGINT}
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, mask)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextlib.contextmanager
def atomic_output(path, inputs=(), mode="wb", encoding=None):
    """A new file that replaces PATH when the block ends without an exception."""
    path = os.fspath(path)
    check_output(path, inputs)
    _committed.discard(os.path.abspath(path))
    d, base = os.path.split(os.path.abspath(path))
    with signals_raise():
        tmp = None
        try:
            # blocked: a signal between mkstemp's open and the assignment would leave the file
            # behind; one that arrives meanwhile is handled once tmp is known
            with _signals_blocked():
                fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".tmp", dir=d)  # O_EXCL
            with open(fd, mode, encoding=encoding) as f:
                yield f
                f.flush()
                os.fchmod(f.fileno(), 0o666 & ~_umask())
                os.fsync(f.fileno())
            check_output(path, inputs)  # it may have changed while we wrote
            with _signals_blocked():  # a signal now is handled after the rename, and knows of it
                os.replace(tmp, path)
                _committed.add(os.path.abspath(path))
        except BaseException:
            with _signals_blocked():
                try:
                    if tmp is not None:
                        os.unlink(tmp)
                except FileNotFoundError:
                    pass
            raise


def read_regular(path, limit, what="file"):
    """The bytes of PATH if it is a regular file of at most LIMIT bytes. A FIFO or device is
    refused without blocking (safeio.open_regular); the file may grow while it is read."""
    path = os.fspath(path)
    try:
        with safeio.open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            if size > limit:
                raise OutputError(f"{path}: {size} bytes, more than a {what} may hold ({limit})")
            chunks, n = [], 0
            while n <= limit:  # in chunks: read(limit + 1) would allocate all of it up front
                b = f.read(min(1 << 20, limit + 1 - n))
                if not b:
                    break
                chunks.append(b)
                n += len(b)
    except OSError as e:
        raise OutputError(safeio.error_line(path, e)) from None
    if n > limit:
        raise OutputError(f"{path}: more than a {what} may hold ({limit} bytes)")
    return b"".join(chunks)
