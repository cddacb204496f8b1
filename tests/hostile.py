"""The hostile corpus: inputs a hostile file author or a careless user would try, one case
each, and how to run them. tests/test_hostile.py runs every case (so `make test` does);
`python tests/hostile.py [NAME...]` runs them by hand and prints each verdict.

Each case builds its inputs in a fresh directory and names a `python -m pyllm` command.
The command runs in that directory, in a child limited to LIMIT_AS bytes of address space
(RLIMIT_AS), with a TIMEOUT. A case that expects an error passes when the command
  - exits non-zero, having written exactly one line to stderr (no traceback, no bare
    MemoryError: "out of memory" is the CLI's last resort, not a clean message),
  - within TIMEOUT seconds (a hang is a failure, not a slow pass),
  - leaves the directory exactly as it found it (no partial or temporary file),
  - and the line holds each of the case's words.
A case built with ok=True expects exit 0 instead, and its check(stdout, stderr) decides.
Nothing from a file may reach the terminal raw: no case's output may hold an ESC byte.

Adding a case (any class): write a builder that takes the directory (a pathlib.Path),
creates what it needs there and returns the argv after `python -m pyllm`; register it
with the decorator:

    @case(4, "config.json", "hidden_size")          # class, then words the error must hold
    def hf_hidden_size_is_a_list(d):
        src = hf_dir(d, hidden_size=[1])            # your own helpers
        return ["convert", str(src), str(d / "out.bin")]

The name of the function is the case's name. Helpers here build parameters files:
tiny_file(d) a valid one, with_meta(d, fn) one whose metadata JSON fn rewrote (any JSON,
or raw bytes; the tensors' offsets move with the metadata), with_header(d, **fields) one
whose header fields are overwritten, with_table(d, fn) one whose tensor table fn rewrote;
fifo(d) and unix_socket(d) make what is not a file. Other modules' cases may live in their
own files: import this one and call case(); tests/test_hostile.py runs CASES, so import
those files there. The verdict's rules are the same for every case.
"""

import json
import os
import resource
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

LIMIT_AS = 2 << 30
TIMEOUT = 30
CASES = {}

# header words after the magic: version, header_size, dim, n_layers, n_heads, n_kv_heads,
# head_dim, hidden_dim, vocab_size, max_seq_len, flags, sliding_window (u32), norm_eps (f32),
# reserved (u32), n_tensors, table_offset, meta_offset, meta_size, file_size (u64)
HEADER = struct.Struct("<8s12IfIQQQQQ")
FIELDS = (
    "magic",
    "version",
    "header_size",
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
    "norm_eps",
    "reserved",
    "n_tensors",
    "table_offset",
    "meta_offset",
    "meta_size",
    "file_size",
)


@dataclass
class Case:
    name: str
    cls: int
    build: Callable
    words: tuple = ()
    ok: bool = False
    check: Callable = None
    stdin: bytes = b""
    env: dict = field(default_factory=dict)


def case(cls, *words, ok=False, check=None, stdin=b"", env=None):
    """Register the decorated builder as a case of class cls (see the module docstring)."""

    def register(fn):
        assert fn.__name__ not in CASES, fn.__name__
        CASES[fn.__name__] = Case(fn.__name__, cls, fn, words, ok, check, stdin, env or {})
        return fn

    return register


# ---- building parameters files ----
_SEED = {}


def seed_bytes(**overrides):
    """A valid tiny parameters file's bytes (cached per set of overrides)."""
    key = tuple(sorted(overrides.items()))
    if key not in _SEED:
        from tiny import make_tiny_model

        with tempfile.TemporaryDirectory() as t:
            make_tiny_model(
                os.path.join(t, "seed.bin"),
                **dict(dict(n_layers=1, vocab_size=260, max_seq_len=64), **overrides),
            )
            _SEED[key] = Path(t, "seed.bin").read_bytes()
    return _SEED[key]


def header(data):
    return dict(zip(FIELDS, HEADER.unpack_from(data)))


def tiny_file(d, name="model.bin", **overrides):
    p = Path(d) / name
    p.write_bytes(seed_bytes(**overrides))
    return p


def relayout(data, meta_bytes):
    """The file with its metadata replaced by meta_bytes, tensors moved after it."""
    h = header(data)
    n, m_off = h["n_tensors"], h["meta_offset"]
    table = list(struct.iter_unpack("<QQ", data[128 : 128 + 16 * n]))
    first = table[0][0]
    new_first = -(-(m_off + len(meta_bytes)) // 64) * 64
    shift = new_first - first
    blob = data[first:]
    h.update(meta_size=len(meta_bytes), file_size=new_first + len(blob))
    out = bytearray(HEADER.pack(*(h[f] for f in FIELDS)).ljust(128, b"\0"))
    for off, nb in table:
        out += struct.pack("<QQ", off + shift, nb)
    out += meta_bytes
    out += b"\0" * (new_first - len(out))
    return bytes(out + blob)


def meta_of(data):
    h = header(data)
    return json.loads(data[h["meta_offset"] : h["meta_offset"] + h["meta_size"]])


def with_meta(d, fn, name="model.bin", **overrides):
    """A file whose metadata is fn(meta): a JSON-able value or raw bytes. The tensors move
    to make room; the offsets in meta["tensors"] move with them (a lie stays the same lie)."""
    data = seed_bytes(**overrides)
    meta = fn(meta_of(data))
    if isinstance(meta, bytes):
        out = relayout(data, meta)
    else:
        ts = meta.get("tensors") if isinstance(meta, dict) else None
        ts = (
            [t for t in ts if isinstance(t, dict) and type(t.get("offset")) is int]
            if isinstance(ts, list)
            else []
        )
        orig, shift = [t["offset"] for t in ts], 0
        first = struct.unpack_from("<Q", data, 128)[0]
        for _ in range(8):  # the offsets' digits change the metadata's size and back
            for t, o in zip(ts, orig):
                t["offset"] = o + shift
            b = json.dumps(meta).encode()  # ASCII: a lone surrogate stays a valid \ud800 escape
            out = relayout(data, b)
            new_shift = struct.unpack_from("<Q", out, 128)[0] - first
            if new_shift == shift:
                break
            shift = new_shift
    p = Path(d) / name
    p.write_bytes(out)
    return p


def with_header(d, name="model.bin", **fields):
    """A file whose header fields are overwritten (file_size kept true unless given)."""
    data = bytearray(seed_bytes())
    h = header(data)
    h.update(fields)
    data[: HEADER.size] = HEADER.pack(*(h[f] for f in FIELDS))
    p = Path(d) / name
    p.write_bytes(bytes(data))
    return p


def with_table(d, fn, name="model.bin"):
    """A file whose tensor table [(offset, nbytes)] is fn(table)."""
    data = bytearray(seed_bytes())
    n = header(data)["n_tensors"]
    table = fn(list(struct.iter_unpack("<QQ", data[128 : 128 + 16 * n])))
    data[128 : 128 + 16 * n] = b"".join(struct.pack("<QQ", o, nb) for o, nb in table)
    p = Path(d) / name
    p.write_bytes(bytes(data))
    return p


def fifo(d, name="fifo"):
    p = Path(d) / name
    os.mkfifo(p)
    return p


def unix_socket(d, name="sock"):
    p = Path(d) / name
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(p))
    s.close()
    return p


# ---- running ----
def _limits():
    resource.setrlimit(resource.RLIMIT_AS, (LIMIT_AS, LIMIT_AS))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _listing(d):
    return sorted(str(p.relative_to(d)) for p in Path(d).rglob("*"))


@dataclass
class Result:
    argv: list
    returncode: int
    stdout: bytes
    stderr: bytes
    before: list
    after: list


def run_case(c, d):
    """Build case c in directory d and run its command; a Result (TimeoutExpired on a hang)."""
    d = Path(d)
    argv = [str(a) for a in c.build(d)]
    before = _listing(d)
    env = dict(os.environ, PYTHONPATH=str(ROOT), **c.env)
    p = subprocess.run(
        [sys.executable, "-m", "pyllm", *argv],
        cwd=d,
        input=c.stdin,
        capture_output=True,
        timeout=TIMEOUT,
        env=env,
        preexec_fn=_limits,
    )
    return Result(argv, p.returncode, p.stdout, p.stderr, before, _listing(d))


def verdict(c, r):
    """None if the result is what case c expects, else why not."""
    err = r.stderr.decode("utf-8", "replace")
    lines = err.strip("\n").splitlines()
    if b"\x1b" in r.stdout or b"\x1b" in r.stderr:
        return "an ESC byte reached the terminal"
    if "Traceback" in err:
        return "a traceback:\n" + err[-2000:]
    if r.after != r.before:
        return f"files changed: before {r.before}, after {r.after}"
    if c.ok:
        if r.returncode != 0:
            return f"exit {r.returncode}, expected 0: {err[-500:]}"
        return c.check(r.stdout.decode("utf-8", "replace"), err) if c.check else None
    if r.returncode <= 0:
        return f"exit {r.returncode}, expected an error (signal if negative)"
    if len(lines) != 1:
        return f"{len(lines)} lines on stderr, expected one:\n{err[-2000:]}"
    if lines[0] == "pyllm: error: out of memory":
        return "a MemoryError reached the CLI: memory grew before a check refused it"
    missing = [w for w in c.words if w not in lines[0]]
    if missing:
        return f"the error lacks {missing}: {lines[0]}"
    return None


# ======================================================================================
# class 1: metadata types: every field read is type- and range-checked, the key named
def _set(path, value):
    def fn(meta):
        obj = meta
        for k in path[:-1]:
            obj = obj[k]
        obj[path[-1]] = value
        return meta

    return fn


def _drop(path):
    def fn(meta):
        obj = meta
        for k in path[:-1]:
            obj = obj[k]
        del obj[path[-1]]
        return meta

    return fn


_META_CASES = {  # name: (edit, words)
    "meta_is_a_list": (lambda m: [1, 2], ("metadata", "top level", "a list")),
    "meta_is_a_number": (lambda m: 5, ("metadata", "top level")),
    "config_is_a_number": (_set(["config"], 5), ("config", "an object")),
    "config_name_is_a_list": (_set(["config", "name"], ["x"]), ("config.name",)),
    "config_architecture_is_a_dict": (
        _set(["config", "architecture"], {"a": 1}),
        ("config.architecture",),
    ),
    "tokenizer_missing": (_drop(["tokenizer"]), ("tokenizer", "null")),
    "tokenizer_is_a_string": (_set(["tokenizer"], "gpt2"), ("tokenizer", "a string")),
    "tokenizer_model_is_a_number": (_set(["tokenizer", "model"], 5), ("tokenizer.model",)),
    "tokenizer_pre_is_a_list": (_set(["tokenizer", "pre"], []), ("tokenizer.pre",)),
    "tokens_is_a_dict": (_set(["tokenizer", "tokens"], {"a": 0}), ("tokenizer.tokens",)),
    "tokens_too_few": (
        lambda m: _set(["tokenizer", "tokens"], m["tokenizer"]["tokens"][:-1])(m),
        ("tokenizer.tokens", "260"),
    ),
    "token_is_a_number": (
        lambda m: (m["tokenizer"]["tokens"].__setitem__(7, 7), m)[1],
        ("tokenizer.tokens[7]",),
    ),
    "token_type_holds_a_string": (
        lambda m: (m["tokenizer"]["token_type"].__setitem__(3, "x"), m)[1],
        ("tokenizer.token_type[3]",),
    ),
    "token_type_out_of_range": (
        lambda m: (m["tokenizer"]["token_type"].__setitem__(3, 1 << 40), m)[1],
        ("tokenizer.token_type[3]", "0..6"),
    ),
    "scores_hold_a_list": (_set(["tokenizer", "scores"], [[1]] * 260), ("tokenizer.scores[0]",)),
    "scores_wrong_length": (_set(["tokenizer", "scores"], [0.0] * 3), ("tokenizer.scores", "260")),
    "merges_is_a_number": (_set(["tokenizer", "merges"], 5), ("tokenizer.merges",)),
    "merge_is_a_triple": (
        _set(["tokenizer", "merges"], [["a", "b", "c"]]),
        ("tokenizer.merges[0]",),
    ),
    "merges_missing_for_gpt2": (_drop(["tokenizer", "merges"]), ("tokenizer.merges",)),
    "eot_token_id_is_a_list": (
        _set(["tokenizer", "eot_token_id"], [2]),
        ("tokenizer.eot_token_id", "a list"),
    ),
    "eos_token_id_negative": (
        _set(["tokenizer", "eos_token_id"], -1),
        ("tokenizer.eos_token_id", "0..259"),
    ),
    "bos_token_id_huge": (_set(["tokenizer", "bos_token_id"], 10**12), ("tokenizer.bos_token_id",)),
    "bos_token_id_is_true": (
        _set(["tokenizer", "bos_token_id"], True),
        ("tokenizer.bos_token_id", "true"),
    ),
    "pad_token_id_is_a_float": (
        _set(["tokenizer", "padding_token_id"], 2.0),
        ("tokenizer.padding_token_id",),
    ),
    "add_bos_token_is_a_string": (
        _set(["tokenizer", "add_bos_token"], "yes"),
        ("tokenizer.add_bos_token",),
    ),
    "chat_template_is_a_number": (_set(["chat_template"], 5), ("chat_template",)),
    "chat_template_is_a_list": (_set(["chat_template"], [{"name": "x"}]), ("chat_template",)),
    "provenance_is_a_string": (_set(["provenance"], "me"), ("provenance",)),
    "tensors_missing": (_drop(["tensors"]), ("tensors",)),
    "tensors_is_a_dict": (_set(["tensors"], {}), ("tensors",)),
    "tensor_without_shape": (lambda m: (m["tensors"][0].pop("shape"), m)[1], ("tensors[0].shape",)),
    "tensor_shape_holds_strings": (
        lambda m: (m["tensors"][0].__setitem__("shape", ["260", "64"]), m)[1],
        ("tensors[0].shape",),
    ),
    "tensor_shape_lies": (
        lambda m: (m["tensors"][2].__setitem__("shape", [10**9, 10**9]), m)[1],
        ("tensors[2].shape",),
    ),
    "tensor_entry_is_a_number": (lambda m: (m["tensors"].__setitem__(1, 1), m)[1], ("tensors[1]",)),
    "tensor_name_wrong": (
        lambda m: (m["tensors"][1].__setitem__("name", "evil"), m)[1],
        ("tensors[1].name",),
    ),
    "tensor_offset_lies": (
        lambda m: (m["tensors"][1].__setitem__("offset", 0), m)[1],
        ("tensors[1].offset",),
    ),
    "tensor_offset_is_a_float": (
        lambda m: (m["tensors"][1].__setitem__("offset", float(m["tensors"][1]["offset"])), m)[1],
        ("tensors[1].offset",),
    ),
    "deep_nesting_100k": (
        lambda m: b'{"config": ' + b"[" * 100000 + b"]" * 100000 + b"}",
        ("nests deeper",),
    ),
    "deep_nesting_in_config": (
        _set(["config", "rope_scaling"], json.loads("[" * 200 + "]" * 200)),
        ("nests deeper",),
    ),
    "a_number_of_5000_digits": (
        lambda m: b'{"config": {"x": ' + b"9" * 5000 + b"}}",
        ("corrupt metadata",),
    ),
    "meta_not_utf8": (lambda m: b'{"config": "\xff\xfe"}', ("corrupt metadata",)),
    "meta_not_json": (lambda m: b"{config: 1", ("corrupt metadata",)),
    "meta_empty": (lambda m: b"", ("corrupt metadata",)),
    "meta_nan_score": (
        lambda m: dict(
            m, tokenizer=dict(m["tokenizer"], model="llama", scores=[float("nan")] * 260)
        ),
        ("tokenizer.scores[0]", "NaN"),
    ),
}


def _meta_case(name, edit, words, cmd):
    def build(d):
        p = with_meta(d, edit)
        return [cmd, p.name] + (["hi", "-n", "1"] if cmd == "generate" else [])

    build.__name__ = name
    case(1, "metadata", *words)(build)


for _name, (_edit, _words) in _META_CASES.items():
    _meta_case(f"info_{_name}", _edit, _words, "info")
for _name in (
    "eot_token_id_is_a_list",
    "tokens_too_few",
    "chat_template_is_a_number",
    "deep_nesting_100k",
    "config_is_a_number",
    "tensor_without_shape",
):
    _meta_case(f"generate_{_name}", *_META_CASES[_name], "generate")


for _name in ("chat_template_is_a_number", "eot_token_id_is_a_list", "tokenizer_is_a_string"):
    _meta_case(f"chat_{_name}", *_META_CASES[_name], "chat")


@case(1, "metadata", "tokenizer.eot_token_id")
def bench_eot_token_id_is_a_list(d):
    p = with_meta(d, _set(["tokenizer", "eot_token_id"], [2]))
    return ["bench", p.name, "-p", "1", "-n", "1", "-r", "1"]


@case(1, "metadata", "32 MiB")
def info_metadata_over_the_cap(d):
    p = with_meta(d, lambda m: dict(m, config=dict(m["config"], pad="x" * (33 << 20))))
    return ["info", p.name]


# ======================================================================================
# class 3: sizes claimed by the file, checked against what it holds before allocating
@case(3, "tensor table has")
def claims_a_million_layers(d):
    return ["info", with_header(d, n_layers=(1 << 20) - 1).name]


@case(3, "tensor table has")
def claims_a_million_layers_generate(d):
    return ["generate", with_header(d, n_layers=(1 << 20) - 1).name, "hi"]


@case(3, "out of bounds")
def claims_a_million_layers_and_their_table(d):
    n = 3 + 6 * ((1 << 20) - 1) + 1
    return ["info", with_header(d, n_layers=(1 << 20) - 1, n_tensors=n).name]


@case(3)
def claims_a_huge_vocabulary(d):
    return ["info", with_header(d, vocab_size=(1 << 20) - 1).name]


@case(3)
def claims_a_huge_head_dim(d):
    return ["info", with_header(d, head_dim=1 << 16, n_heads=1, n_kv_heads=1).name]


@case(3, "metadata out of bounds")
def claims_metadata_past_the_end(d):
    return ["info", with_header(d, meta_size=1 << 62).name]


@case(3)
def claims_a_huge_file(d):
    return ["info", with_header(d, file_size=1 << 62).name]


def _wide_heads(d):
    # a valid file whose single 65536-wide head makes every cached position cost 256 KiB
    return tiny_file(
        d,
        "wide.bin",
        dim=16,
        n_heads=1,
        n_kv_heads=1,
        head_dim=1 << 16,
        hidden_dim=16,
        max_seq_len=(1 << 20) - 1,
    )


@case(3, "KV cache", "fits (-c")
def huge_head_dim_and_context(d):
    return ["generate", _wide_heads(d).name, "hi", "-n", "1", "-c", str((1 << 20) - 1)]


@case(3, "KV cache", "fits (-c")
def huge_head_dim_default_context_perplexity(d):
    text = d / "text.txt"
    text.write_text("the cat sat on the mat. " * 400)
    return ["perplexity", _wide_heads(d).name, text.name, "-c", "200000"]


# ======================================================================================
# class 6: files that are not files: one line, at once, before anything blocks
_NOT_FILES = {
    "fifo": lambda d: fifo(d),
    "dev_zero": lambda d: Path("/dev/zero"),
    "directory": lambda d: Path(d),
    "socket": lambda d: unix_socket(d),
    "symlink_to_fifo": lambda d: (os.symlink(fifo(d), Path(d) / "link.bin"), Path(d) / "link.bin")[
        1
    ],
    "dev_stdin_pipe": lambda d: Path("/dev/stdin"),
}
_WORDS = {
    "fifo": "a FIFO",
    "dev_zero": "a character device",
    "directory": "a directory",
    "socket": "a socket",
    "symlink_to_fifo": "a FIFO",
    "dev_stdin_pipe": "a FIFO",
}


def _not_file_case(kind, cmd):
    def build(d):
        p = _NOT_FILES[kind](d)
        if cmd == "generate":
            return ["generate", str(p), "hi"]
        if cmd == "bench":
            return ["bench", str(p), "-p", "1", "-n", "1", "-r", "1"]
        if cmd == "perplexity":
            return ["perplexity", str(tiny_file(d)), str(p)]
        if cmd == "perplexity_model":
            text = Path(d) / "text.txt"
            text.write_text("the cat sat on the mat. " * 100)
            return ["perplexity", str(p), text.name]
        return [cmd, str(p)]

    build.__name__ = f"{cmd}_{kind}"
    case(6, "not a regular", _WORDS[kind])(build)


for _kind in _NOT_FILES:
    for _cmd in ("info", "generate", "bench", "perplexity", "perplexity_model", "chat"):
        _not_file_case(_kind, _cmd)


# ======================================================================================
# class 9: what the kernel refuses, Python refuses (and the reverse: tests/test_fuzz.py)
@case(9, "header size 64")
def header_size_64(d):
    return ["info", with_header(d, header_size=64).name]


@case(9, "tensor 3")
def table_out_of_order(d):
    # blk.0.attn_norm and blk.0.ffn_norm (the same size) swap places: no overlap, not in order
    return [
        "info",
        with_table(
            d, lambda t: t[:2] + [(t[5][0], t[2][1]), t[3], t[4], (t[2][0], t[5][1])] + t[6:]
        ).name,
    ]


@case(9, "tensor 1")
def table_overlapping(d):
    return ["info", with_table(d, lambda t: [t[0], (t[0][0], t[1][1])] + t[2:]).name]


@case(9, "norm_eps")
def norm_eps_infinite(d):
    return ["info", with_header(d, norm_eps=float("inf")).name]


@case(9, "norm_eps")
def norm_eps_nan(d):
    return ["info", with_header(d, norm_eps=float("nan")).name]


@case(9, "unknown bits")
def unknown_flag_bit(d):
    return ["info", with_header(d, flags=4).name]


@case(9, "unknown bits")
def unknown_flag_bit_generate(d):
    return ["generate", with_header(d, flags=1 << 31).name, "hi"]


# ======================================================================================
# class 10: nothing from a file reaches the terminal raw
EVIL = "\x1b]0;pwned\x07\x1b[2J\x9b31m\u202e\r\nfake line"


def _no_raw_controls(out, err):
    bad = [c for c in out + err if c in "\x07\x9b\u202e\r" or c == "\x1b"]
    if bad:
        return f"raw control characters reached the terminal: {bad!r}"
    if "fake line" in out and "\nfake line" in out:
        return "a newline from the file started a line of its own"
    return None


def _evil_meta(meta):
    meta["config"]["name"] = EVIL
    meta["config"][EVIL] = EVIL
    meta["provenance"] = {"source": EVIL, EVIL: [EVIL], "lone": "\ud800"}
    meta["tokenizer"]["pre"] = "gpt2"
    meta["tokenizer"]["tokens"][5] = EVIL
    meta["tokenizer"]["bos_token_id"] = 5
    meta["chat_template"] = EVIL + "{{ messages }}"
    return meta


@case(10, ok=True, check=_no_raw_controls)
def info_escapes_everything(d):
    return ["info", with_meta(d, _evil_meta).name]


@case(
    10,
    ok=True,
    check=lambda out, err: (
        _no_raw_controls(out, err)
        or (None if json.loads(out)["config"]["name"] == EVIL else "--json changed the value")
    ),
)
def info_json_escapes_everything(d):
    return ["info", "--json", with_meta(d, _evil_meta).name]


@case(10, "unsupported tokenizer model")
def error_message_quoting_the_file(d):
    return ["generate", with_meta(d, _set(["tokenizer", "model"], EVIL)).name, "hi"]


@case(10, "unsupported pre-tokenizer")
def error_message_with_a_newline(d):
    return ["generate", with_meta(d, _set(["tokenizer", "pre"], "x\nfake line")).name, "hi"]


def main(names):
    failed = 0
    for name in names or CASES:
        c = CASES[name]
        d = tempfile.mkdtemp(prefix="hostile-")
        try:
            why = verdict(c, run_case(c, d))
        except subprocess.TimeoutExpired:
            why = f"no answer in {TIMEOUT} s"
        finally:
            shutil.rmtree(d, ignore_errors=True)
        failed += why is not None
        print(
            f"{'ok  ' if why is None else 'FAIL'} class {c.cls:2} {name}"
            + (f": {why}" if why else "")
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # this tree's pyllm builds the files too, not an installed one
    sys.exit(main(sys.argv[1:]))
