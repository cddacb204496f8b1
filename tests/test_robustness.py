"""Bad input from the command line, interruptions, and memory: a clear line, never a traceback."""

import os
import signal
import subprocess
import sys

import pytest

import pyllm
from tiny import make_tiny_model

PY = sys.executable


def run(*args, input=None, timeout=120):
    return subprocess.run(
        [PY, "-m", "pyllm", *args],
        capture_output=True,
        timeout=timeout,
        input=input if input is not None else b"",
    )


def one_error_line(r, *words):
    err = r.stderr.decode(errors="replace").strip()
    assert r.returncode == 1, (r.returncode, err)
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, err
    return err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.bin"
    make_tiny_model(path, max_seq_len=64)
    return str(path)


def test_missing_foreign_and_truncated_files(tiny, tmp_path, default_gguf):
    one_error_line(run("generate", str(tmp_path / "nope.bin"), "hi"), "No such file")
    one_error_line(run("generate", default_gguf, "hi"), "bad magic")  # a GGUF is converted first
    data = open(tiny, "rb").read()
    (tmp_path / "cut.bin").write_bytes(data[: len(data) // 2])
    one_error_line(run("generate", str(tmp_path / "cut.bin"), "hi"), "truncated")
    (tmp_path / "empty.bin").write_bytes(b"")
    one_error_line(run("info", str(tmp_path / "empty.bin")))
    one_error_line(run("convert", str(tmp_path / "empty.bin"), str(tmp_path / "out.bin")))
    assert not (tmp_path / "out.bin").exists()
    (tmp_path / "v1.bin").write_bytes(
        data[:8] + (1).to_bytes(4, "little") + data[12:]
    )  # row-major matrices
    one_error_line(
        run("generate", str(tmp_path / "v1.bin"), "hi"),
        "format version 1",
        "convert the model again",
    )


def test_prompt_and_limits(tiny):
    one_error_line(run("generate", tiny, "the cat " * 200), "context")
    one_error_line(run("generate", tiny, "hi", "-c", "100000"), "context size")
    one_error_line(run("generate", tiny, "hi", "--top-p", "-1"), "top_p")
    one_error_line(run("generate", tiny, "hi", "--repeat-penalty", "0"), "repeat_penalty")
    one_error_line(run("generate", tiny, "hi", "-t", "0"), "threads")
    one_error_line(run("generate", tiny, b"caf\xe9".decode("utf-8", "surrogateescape")), "UTF-8")
    # more tokens asked than the context holds: generation stops at the context's end
    m = pyllm.load(tiny, threads=1)
    text = "".join(m.generate("the cat", max_tokens=1000, temperature=0, stop_ids=[]))
    assert m.stats["stop"] == "context" and len(m.tokens) == m.n_ctx and text
    with pytest.raises(pyllm.PyllmError, match="outside the vocabulary"):
        m.logits([0, m.vocab_size])


def test_ctrl_c_during_generation_exits_quietly(default_model):
    p = subprocess.Popen(
        [
            PY,
            "-m",
            "pyllm",
            "generate",
            default_model,
            "Once upon a time",
            "-n",
            "100000",
            "--temp",
            "0.8",
            "-c",
            "8192",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert p.stdout.read(20)  # it is streaming
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130
    assert b"Traceback" not in err and b"interrupted" in err


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))


def test_weights_are_mapped_not_copied_and_shared(default_model):
    """Resident memory ~ the file's pages plus the KV cache; two processes share the pages."""
    code = (
        "import sys, pyllm; m = pyllm.load(sys.argv[1], threads=1, n_ctx=4096); "
        "m.logits(list(range(64)));"
        "print('ready', flush=True); sys.stdin.read()"
    )
    procs = [
        subprocess.Popen(
            [PY, "-c", code, default_model], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        for _ in range(2)
    ]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == b"ready"
        size_kib = os.path.getsize(default_model) // 1024
        for p in procs:
            shared = private = 0
            with open(f"/proc/{p.pid}/smaps") as f:
                in_model = False
                for line in f:
                    if "-" in line.split()[0]:
                        in_model = line.rstrip().endswith(os.path.basename(default_model))
                    elif in_model and line.startswith("Shared_Clean"):
                        shared += int(line.split()[1])
                    elif in_model and line.startswith(("Private_Dirty", "Private_Clean")):
                        private += int(line.split()[1])
            assert shared > 0.9 * size_kib, (
                shared,
                size_kib,
            )  # the other process maps the same pages
            assert private < 0.05 * size_kib
            # python + numpy + the touched file pages + a KV cache of 64 positions; never a
            # second copy
            assert rss_kib(p.pid) < size_kib + 150 * 1024
    finally:
        for p in procs:
            p.kill()
            p.wait()
