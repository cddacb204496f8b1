"""The edges where untrusted data comes in and goes out: files that must be files, text
that must not drive the terminal.

stat_regular(path, what)  os.stat, refusing what is not a regular file (NotRegularFile)
open_regular(path, what)  opens a path for reading only if it is a regular file: a FIFO,
                          a device (/dev/zero), a directory or a socket is refused with
                          NotRegularFile, before any open that could block or never end
printable(s)              s with control characters escaped, for the terminal
"""

import errno
import os
import stat
import unicodedata

__all__ = [
    "NotRegularFile",
    "error_line",
    "open_regular",
    "printable",
    "printable_json",
    "stat_regular",
]

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


class NotRegularFile(OSError):
    """The path exists but is not a regular file; str() is the whole one-line message."""

    def __init__(self, path, st_mode, what="file"):
        kind = next((name for test, name in _KINDS if test(st_mode)), "something else")
        super().__init__(errno.EINVAL, f"is {kind}, not a regular {what}", os.fsdecode(path))

    def __str__(self):
        return f"{self.filename}: {self.strerror}"


def stat_regular(path, what="file"):
    """os.stat(path), if path is a regular file (links followed); else NotRegularFile."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise NotRegularFile(path, st.st_mode, what)
    return st


def error_line(path, e):
    """An OSError from opening path as one line: NotRegularFile's own, else path: reason."""
    return str(e) if isinstance(e, NotRegularFile) else f"{os.fsdecode(path)}: {e.strerror or e}"


def open_regular(path, what="file"):
    """A binary file object for reading path, a regular file (symbolic links followed).

    Checked with stat before opening (so nothing is opened that could block or have side
    effects), then opened non-blocking and checked again with fstat on the descriptor (the
    path may have been replaced in between). Raises NotRegularFile or the usual OSError."""
    stat_regular(path, what)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(path, st.st_mode, what)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


# bidirectional overrides and isolates reorder what the terminal shows ("Trojan source")
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _unsafe(c):
    return unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp") or c in _BIDI


def _escape(c):
    o = ord(c)
    return f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}"


def printable(s):
    """str(s) with every control character (C0, DEL, C1, line separators, bidi controls,
    lone surrogates) written as a Python-style escape: safe to print, and on one line."""
    s = s if isinstance(s, str) else str(s)
    if s.isprintable():
        return s  # the usual case: nothing to escape (isprintable is stricter than _unsafe)
    return "".join(_escape(c) if _unsafe(c) else c for c in s)


def printable_json(text):
    """A JSON document's text with the characters printable() escapes written as JSON
    \\u escapes (they can only occur inside strings): the same JSON value, safe to print."""
    if text.isprintable():
        return text
    out = []
    for c in text:
        if _unsafe(c) and c != "\n":  # all in the BMP: one \u escape each
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return "".join(out)
