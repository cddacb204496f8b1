"""safeio: only regular files are opened; nothing from a file reaches the terminal raw."""

import json
import os
import socket
import threading

import pytest

from pyllm.safeio import NotRegularFile, open_regular, printable, printable_json


def test_regular_files_and_links_to_them_open(tmp_path):
    (tmp_path / "f").write_bytes(b"abc")
    os.symlink(tmp_path / "f", tmp_path / "link")
    for p in ("f", "link"):
        with open_regular(tmp_path / p) as f:
            assert f.read() == b"abc"
    with pytest.raises(FileNotFoundError):
        open_regular(tmp_path / "missing")


def test_what_is_not_a_file_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(tmp_path / "sock"))
    s.close()
    cases = {
        tmp_path / "fifo": "a FIFO",
        "/dev/zero": "a character device",
        tmp_path: "a directory",
        tmp_path / "sock": "a socket",
    }
    for path, kind in cases.items():
        done = []
        t = threading.Thread(
            target=lambda done=done, path=path: done.append(
                pytest.raises(NotRegularFile, open_regular, path)
            )
        )
        t.start()
        t.join(10)
        assert not t.is_alive() and done, f"{path} blocked"
        e = done[0].value
        assert str(e) == f"{path}: is {kind}, not a regular file" and isinstance(e, OSError)


def test_printable_escapes_controls_only():
    assert printable("Llama 3 — 8B, ünïcödé 日本") == "Llama 3 — 8B, ünïcödé 日本"
    s = "a\x1b]0;x\x07b\x9bc\x7f\r\n\u202e\u2028\ud800\t"
    out = printable(s)
    assert out == "a\\x1b]0;x\\x07b\\x9bc\\x7f\\x0d\\x0a\\u202e\\u2028\\ud800\\x09"
    assert out.isprintable()
    out.encode("utf-8")  # no lone surrogate left
    assert printable(5) == "5" and printable({"k": "\x1b"}) == "{'k': '\\x1b'}"


def test_printable_json_is_the_same_json():
    value = {"name": "x\x1b\x9b\u202e\ud800\x7f", "n": [1, "\u2029"]}
    text = printable_json(json.dumps(value, indent=2, ensure_ascii=False))
    assert json.loads(text) == value
    assert text.isprintable() or set(c for c in text if not c.isprintable()) <= {"\n"}
