"""Hostile and careless inputs to `pyllm convert` (issue 18, classes 3-5): broken Hugging Face
configs, lying safetensors headers, odd tokenizer.json entries, truncated or boastful GGUF
files, and output paths that must not be written. Every case must end in one line naming
the file (and the key), a non-zero exit, no traceback, and nothing left behind."""

import json
import os
import signal
import stat
import struct
import subprocess
import sys
import time

import gguf
import numpy as np
import pytest
from safetensors.numpy import save_file

import pyllm
from pyllm import format, outfile
from pyllm.convert import HF_NAMES, ConvertError, convert
from tiny import tiny_tokenizer

PY = sys.executable
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CFG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 48,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "vocab_size": 300,
}
TOK = tiny_tokenizer(300)


def weights(cfg=CFG, seed=0):
    """{canonical key, layer: array} in Hugging Face shapes."""
    rng = np.random.default_rng(seed)
    d, L, h, kv, hid = (
        cfg[k]
        for k in (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "intermediate_size",
        )
    )
    hd = d // h
    shapes = {
        "tok_embd": (300, d),
        "output_norm": (d,),
        "output": (300, d),
        "attn_norm": (d,),
        "attn_q": (h * hd, d),
        "attn_k": (kv * hd, d),
        "attn_v": (kv * hd, d),
        "attn_out": (d, h * hd),
        "ffn_norm": (d,),
        "ffn_gate": (hid, d),
        "ffn_up": (hid, d),
        "ffn_down": (d, hid),
    }
    out = {}
    for key, shape in shapes.items():
        for i in range(L) if key.startswith(("attn", "ffn")) else (None,):
            out[key, i] = (rng.standard_normal(shape) * 0.1 + (1 if "norm" in key else 0)).astype(
                np.float32
            )
    return out


def tokenizer_json():
    tokens, merges = TOK["tokens"], TOK["merges"]
    n = len(tokens) - 3
    return {
        "model": {
            "type": "BPE",
            "vocab": {t: i for i, t in enumerate(tokens[:n])},
            "merges": merges,
        },
        "added_tokens": [
            {"id": n + k, "content": t, "special": True} for k, t in enumerate(tokens[n:])
        ],
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
    }


def write_hf(d, config=None, tok=None, tok_config=None, tensors=None):
    os.makedirs(d, exist_ok=True)
    cfg = dict(CFG, **(config or {}))
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    with open(os.path.join(d, "tokenizer.json"), "w") as f:
        json.dump(tokenizer_json() if tok is None else tok, f)
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump(
            {"chat_template": CHATML, "eos_token": "<|im_end|>"}
            if tok_config is None
            else tok_config,
            f,
        )
    if tensors is None:
        tensors = {HF_NAMES[k].format(i=i): a for (k, i), a in weights().items()}
    save_file(tensors, os.path.join(d, "model.safetensors"))
    return d


def write_gguf(path, block_count=2, tokens=None, merges=True, extra=None):
    w = gguf.GGUFWriter(path, "llama")
    c = CFG
    w.add_name("hostile test model")
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_block_count(block_count)
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(c["num_attention_heads"])
    w.add_head_count_kv(c["num_key_value_heads"])
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_rope_freq_base(c["rope_theta"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(TOK["tokens"] if tokens is None else tokens)
    w.add_token_types(TOK["token_type"])
    if merges:
        w.add_token_merges(TOK["merges"])
    w.add_eos_token_id(TOK["eos_token_id"])
    w.add_chat_template(CHATML)
    for fn in extra or ():
        fn(w)
    names = {
        "tok_embd": "token_embd.weight",
        "output_norm": "output_norm.weight",
        "output": "output.weight",
        "attn_norm": "blk.{i}.attn_norm.weight",
        "attn_q": "blk.{i}.attn_q.weight",
        "attn_k": "blk.{i}.attn_k.weight",
        "attn_v": "blk.{i}.attn_v.weight",
        "attn_out": "blk.{i}.attn_output.weight",
        "ffn_norm": "blk.{i}.ffn_norm.weight",
        "ffn_gate": "blk.{i}.ffn_gate.weight",
        "ffn_up": "blk.{i}.ffn_up.weight",
        "ffn_down": "blk.{i}.ffn_down.weight",
    }
    for (k, i), a in weights().items():
        w.add_tensor(names[k].format(i=i), a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def refused(src, out, match=None):
    """convert() refuses with one line; nothing is left next to OUT."""
    before = sorted(os.listdir(os.path.dirname(out)))
    with pytest.raises(ConvertError) as e:
        convert(src, out, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 400, msg
    if match:
        assert match in msg, msg
    assert sorted(os.listdir(os.path.dirname(out))) == before
    return msg


def cli(*args, timeout=60):
    r = subprocess.run([PY, "-m", "pyllm", *args], capture_output=True, text=True, timeout=timeout)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    return r, lines


# --- the good sources convert and load --------------------------------------------------------
def test_sources_used_here_convert_and_load(tmp_path):
    for src in (write_hf(str(tmp_path / "hf")), write_gguf(str(tmp_path / "m.gguf"))):
        out = str(tmp_path / "out.bin")
        convert(src, out, progress=False)
        m = pyllm.load(out, threads=1)
        assert np.isfinite(m.logits(m.tokenizer.encode("hello"))).all()
        assert oct(os.stat(out).st_mode & 0o777) == oct(0o666 & ~outfile._umask())
        m.close() if hasattr(m, "close") else None
        os.unlink(out)


# --- class 4 (and 3): config.json ------------------------------------------------------------
@pytest.mark.parametrize(
    "change, key",
    [
        ({"num_attention_heads": 0}, "num_attention_heads"),
        ({"hidden_size": [64]}, "hidden_size"),
        ({"hidden_size": "32"}, "hidden_size"),
        ({"hidden_size": True}, "hidden_size"),
        ({"rope_scaling": "linear"}, "rope_scaling"),
        ({"rope_scaling": {"rope_type": "linear", "factor": "two"}}, "rope_scaling.factor"),
        ({"rope_parameters": [1, 2]}, "rope_parameters"),
        ({"num_hidden_layers": 10**9}, "num_hidden_layers"),
        ({"num_hidden_layers": 1000}, "1000 layers"),
        ({"intermediate_size": 2**40}, "intermediate_size"),
        ({"max_position_embeddings": -1}, "max_position_embeddings"),
        ({"rms_norm_eps": -1}, "rms_norm_eps"),
        ({"rms_norm_eps": float("nan")}, "rms_norm_eps"),
        ({"rope_theta": float("inf")}, "rope_theta"),
        ({"tie_word_embeddings": "yes"}, "tie_word_embeddings"),
        ({"head_dim": 3}, "head_dim"),
        ({"num_key_value_heads": 3}, "n_kv_heads"),
        ({"architectures": "LlamaForCausalLM"}, "unsupported architecture"),
        ({"architectures": [{"x": 1}]}, "unsupported architecture"),
        ({"partial_rotary_factor": "half"}, "partial_rotary_factor"),
        ({"use_sliding_window": 1, "architectures": ["Qwen2ForCausalLM"]}, "use_sliding_window"),
    ],
)
def test_broken_config_values(tmp_path, change, key):
    d = write_hf(str(tmp_path / "hf"), config=change)
    msg = refused(d, str(tmp_path / "o.bin"), key)
    assert "config.json" in msg or "unsupported" in msg or "hf" in msg


def test_config_not_an_object_or_too_deep(tmp_path):
    d = write_hf(str(tmp_path / "hf"))
    for text in ("[1, 2]", "5", "[" * 100000 + "]" * 100000, "{bad json", "\xff"):
        with open(os.path.join(d, "config.json"), "w", encoding="latin-1") as f:
            f.write(text)
        refused(d, str(tmp_path / "o.bin"), "config.json")


# --- safetensors headers ---------------------------------------------------------------------
def rewrite_header(path, edit=None, raw=None, length=None):
    data = open(path, "rb").read()
    (n,) = struct.unpack_from("<Q", data)
    head, body = json.loads(data[8 : 8 + n]), data[8 + n :]
    if edit:
        edit(head)
    hb = raw if raw is not None else json.dumps(head).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb) if length is None else length) + hb + body)


def first_tensor(head):
    return next(k for k in head if k != "__metadata__")


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda h: h[first_tensor(h)].update(data_offsets=[0, 10**12]), "past the end"),
        (lambda h: h[first_tensor(h)].update(data_offsets=[100, 50]), "past the end"),
        (lambda h: h[first_tensor(h)].update(shape=[3, 3]), "do not hold"),
        (lambda h: h[first_tensor(h)].update(dtype="F16"), "do not hold"),
        (lambda h: h[first_tensor(h)].update(dtype="Q4"), "unknown safetensors dtype"),
        (lambda h: h[first_tensor(h)].update(shape=["a"]), "header entry"),
        (lambda h: h[first_tensor(h)].pop("shape"), "header entry"),
        (lambda h: h.update({first_tensor(h): [1, 2]}), "header entry"),
        (lambda h: h[first_tensor(h)].update(data_offsets=[-8, 0]), "header entry"),
        (
            lambda h: [
                v.update(data_offsets=[0, v["data_offsets"][1] - v["data_offsets"][0]])
                for k, v in h.items()
                if k != "__metadata__"
            ],
            "overlap",
        ),
    ],
)
def test_lying_safetensors_headers(tmp_path, edit, match):
    d = write_hf(str(tmp_path / "hf"))
    rewrite_header(os.path.join(d, "model.safetensors"), edit)
    msg = refused(d, str(tmp_path / "o.bin"), match)
    assert "model.safetensors" in msg


@pytest.mark.parametrize(
    "raw, length",
    [(b"[1,2,3]", None), (b"[" * 50000 + b"]" * 50000, None), (b"{}", 2**63), (b"not json", None)],
)
def test_safetensors_header_not_an_object_or_huge(tmp_path, raw, length):
    d = write_hf(str(tmp_path / "hf"))
    rewrite_header(os.path.join(d, "model.safetensors"), raw=raw, length=length)
    assert "model.safetensors" in refused(d, str(tmp_path / "o.bin"))


def test_index_names_files_outside_the_directory(tmp_path):
    d = write_hf(str(tmp_path / "hf"))
    for wm in ({"x": "../../etc/passwd"}, {"x": 5}, [1]):
        with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
            json.dump({"weight_map": wm}, f)
        assert "model.safetensors.index.json" in refused(d, str(tmp_path / "o.bin"))


# --- tokenizer.json ----------------------------------------------------------------------------
def edited_tokenizer(fn):
    tj = tokenizer_json()
    fn(tj)
    return tj


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda tj: tj["model"]["vocab"].update({"neg": -1}), "model.vocab"),
        (lambda tj: tj["model"]["vocab"].update({"dup": 5}), "both"),
        (lambda tj: tj["model"]["vocab"].update({"far": 10**12}), "model.vocab"),
        (lambda tj: tj["model"]["vocab"].update({"f": 1.5}), "model.vocab"),
        (
            lambda tj: tj["added_tokens"].append({"id": 3, "content": "other", "special": True}),
            "added_tokens[3]",
        ),
        (
            lambda tj: tj["added_tokens"].append({"id": 400, "content": 5}),
            "added_tokens[3].content",
        ),
        (lambda tj: tj["added_tokens"].append({"id": -5, "content": "x"}), "added_tokens[3].id"),
        (lambda tj: tj["added_tokens"].append("x"), "added_tokens"),
        (lambda tj: tj["model"].update(merges=["nospace"]), "model.merges[0]"),
        (lambda tj: tj["model"].update(merges=[[1, 2]]), "model.merges[0]"),
        (lambda tj: tj["model"].update(merges="a b"), "model.merges"),
        (lambda tj: tj["model"].update(vocab=[1, 2]), "model.vocab"),
        (lambda tj: tj.update(model="BPE"), "tokenizer model type"),
        (lambda tj: tj.update(pre_tokenizer=[1]), "pre-tokenizer"),
        (
            lambda tj: tj.update(pre_tokenizer={"type": "Sequence", "pretokenizers": 7}),
            "pre-tokenizer",
        ),
    ],
)
def test_odd_tokenizer_entries(tmp_path, edit, match):
    d = write_hf(str(tmp_path / "hf"), tok=edited_tokenizer(edit))
    refused(d, str(tmp_path / "o.bin"), match)


def test_vocabulary_larger_than_the_embedding(tmp_path):
    tj = tokenizer_json()
    tj["added_tokens"].append({"id": 299 + 5, "content": "<extra>", "special": True})
    refused(
        write_hf(str(tmp_path / "hf"), tok=tj), str(tmp_path / "o.bin"), "embedding only 300 rows"
    )


@pytest.mark.parametrize(
    "tok_config, match",
    [
        ({"chat_template": "{{ 9 ** (9 ** 9) }}" + "{% for %}"}, "chat template rejected"),
        ({"chat_template": "{% if 1 %}" * 500}, "nested deeper"),
        ({"chat_template": "x" * (1 << 20)}, "over"),
        ({"chat_template": 5}, "chat_template is not a string"),
        ({"chat_template": "{{ '\ud800' }}"}, "lone surrogate"),
    ],
)
def test_templates_checked_before_writing(tmp_path, tok_config, match):
    d = write_hf(str(tmp_path / "hf"), tok_config=tok_config)
    t0 = time.time()
    refused(d, str(tmp_path / "o.bin"), match)
    assert time.time() - t0 < 30


# --- GGUF -------------------------------------------------------------------------------------
def test_truncated_gguf_anywhere(tmp_path):
    g = write_gguf(str(tmp_path / "m.gguf"))
    data = open(g, "rb").read()
    t = str(tmp_path / "t.gguf")
    header_end = data.index(b"token_embd.weight") + 200
    cuts = sorted(
        set(
            list(range(4, header_end, max(1, header_end // 150)))
            + list(range(header_end, len(data), max(1, len(data) // 40)))
            + [len(data) - 1]
        )
    )
    for n in cuts:
        with open(t, "wb") as f:
            f.write(data[:n])
        msg = refused(t, str(tmp_path / "o.bin"))
        assert "t.gguf" in msg and "out of bounds" not in msg, (n, msg)


def patch_after(data, key, fmt, value, skip=0):
    """data with the value that follows KEY (after SKIP bytes) replaced."""
    at = data.index(key) + len(key) + skip
    return data[:at] + struct.pack(fmt, value) + data[at + struct.calcsize(fmt) :]


@pytest.mark.parametrize(
    "patch, match",
    [
        (lambda b: b[:8] + struct.pack("<Q", 2**40) + b[16:], "tensor infos"),
        (lambda b: b[:16] + struct.pack("<Q", 2**40) + b[24:], "key-value pairs"),
        (lambda b: b[:16] + struct.pack("<Q", 2**63) + b[24:], "key-value pairs"),
        (
            lambda b: patch_after(b, b"tokenizer.ggml.tokens", "<Q", 2**40, skip=8),
            "tokenizer.ggml.tokens",
        ),
        (lambda b: patch_after(b, b"tokenizer.ggml.token_type", "<Q", 2**40, skip=8), "token_type"),
        (lambda b: patch_after(b, b"llama.block_count", "<I", 2**32 - 1, skip=4), "block_count"),
        (lambda b: patch_after(b, b"llama.block_count", "<I", 1000, skip=4), "1000 layers"),
        (lambda b: patch_after(b, b"llama.embedding_length", "<I", 0, skip=4), "embedding_length"),
        (
            lambda b: patch_after(b, b"general.architecture", "<Q", 2**62, skip=4),
            "general.architecture",
        ),
        (lambda b: patch_after(b, b"token_embd.weight", "<I", 7), "dimensions"),
        (lambda b: patch_after(b, b"token_embd.weight", "<Q", 2**40, skip=4), "token_embd.weight"),
        (lambda b: patch_after(b, b"token_embd.weight", "<I", 99, skip=20), "unknown tensor type"),
        (lambda b: b[:4] + struct.pack("<I", 7) + b[8:], "version"),
    ],
)
def test_gguf_claims_bigger_than_the_file(tmp_path, patch, match):
    g = write_gguf(str(tmp_path / "m.gguf"))
    with open(g, "r+b") as f:
        data = patch(f.read())
        f.seek(0)
        f.write(data)
    t0 = time.time()
    msg = refused(g, str(tmp_path / "o.bin"), match)
    assert "m.gguf" in msg and time.time() - t0 < 20


def test_gguf_tokenizer_oddities(tmp_path):
    g = write_gguf(str(tmp_path / "nomerges.gguf"), merges=False)
    refused(g, str(tmp_path / "o.bin"), "tokenizer would not load")
    g = write_gguf(str(tmp_path / "bos.gguf"), extra=[lambda w: w.add_bos_token_id(10**6)])
    refused(g, str(tmp_path / "o.bin"), "bos_token_id")
    g = write_gguf(str(tmp_path / "few.gguf"), block_count=1)
    refused(g, str(tmp_path / "o.bin"), "unsupported tensor")


# --- class 5: output files ---------------------------------------------------------------------
def test_outputs_that_are_not_files_or_are_inputs(tmp_path):
    d = write_hf(str(tmp_path / "hf"))
    index = os.path.join(d, "model.safetensors.index.json")
    with open(index, "w") as f:
        json.dump({"weight_map": {"model.embed_tokens.weight": "model.safetensors"}}, f)
    before = {p: open(os.path.join(d, p), "rb").read() for p in os.listdir(d)}
    for p in before:
        refused(d, os.path.join(d, p), "refusing")
    os.link(os.path.join(d, "tokenizer.json"), tmp_path / "hardlink.json")
    refused(d, str(tmp_path / "hardlink.json"), "refusing")
    assert {p: open(os.path.join(d, p), "rb").read() for p in os.listdir(d)} == before
    os.mkfifo(tmp_path / "fifo")
    refused(d, str(tmp_path / "fifo"), "not a regular file")
    r, lines = cli("convert", "-q", d, "/dev/null")
    assert r.returncode == 1 and len(lines) == 1 and "not a regular file" in lines[0], r.stderr
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    g = write_gguf(str(tmp_path / "m.gguf"))
    os.symlink(g, tmp_path / "link.bin")
    refused(g, str(tmp_path / "link.bin"), "refusing")


def test_planted_links_are_not_followed(tmp_path):
    g = write_gguf(str(tmp_path / "m.gguf"))
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    out = tmp_path / "out" / "m.bin"
    out.parent.mkdir()
    os.symlink(victim, out)  # an output that is a link: the link is replaced, not its target
    convert(g, str(out), progress=False)
    assert victim.read_bytes() == b"precious" and not os.path.islink(out)
    assert sorted(os.listdir(out.parent)) == ["m.bin"]
    # the temporary file's name is unpredictable and opened with O_EXCL: two writers never share one
    names = set()
    real_mkstemp = outfile.tempfile.mkstemp

    def spy(*a, **k):
        fd, name = real_mkstemp(*a, **k)
        names.add(name)
        assert stat.S_IMODE(os.fstat(fd).st_mode) == 0o600
        return fd, name

    outfile.tempfile.mkstemp = spy
    try:
        for _ in range(2):
            convert(g, str(out), progress=False)
    finally:
        outfile.tempfile.mkstemp = real_mkstemp
    assert len(names) == 2 and all(os.path.dirname(n) == str(out.parent) for n in names)


def test_umask_decides_the_mode(tmp_path):
    g = write_gguf(str(tmp_path / "m.gguf"))
    r = subprocess.run(
        ["sh", "-c", f"umask 077 && {PY} -m pyllm convert -q {g} {tmp_path / 'o.bin'}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(os.stat(tmp_path / "o.bin").st_mode) == 0o600


def big_gguf(path):
    """A GGUF large enough that its conversion takes a noticeable moment."""
    w = gguf.GGUFWriter(path, "llama")
    d, L, hid = 512, 6, 1536
    for fn, v in (
        (w.add_context_length, 64),
        (w.add_embedding_length, d),
        (w.add_block_count, L),
        (w.add_feed_forward_length, hid),
        (w.add_head_count, 8),
        (w.add_head_count_kv, 8),
        (w.add_layer_norm_rms_eps, 1e-5),
    ):
        fn(v)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(TOK["tokens"])
    w.add_token_merges(TOK["merges"])
    rng = np.random.default_rng(0)

    def m(*s):
        return rng.standard_normal(s).astype(np.float32) * 0.05

    w.add_tensor("token_embd.weight", m(300, d))
    w.add_tensor("output_norm.weight", m(d) + 1)
    for i in range(L):
        for n, s in (
            ("attn_norm", (d,)),
            ("attn_q", (d, d)),
            ("attn_k", (d, d)),
            ("attn_v", (d, d)),
            ("attn_output", (d, d)),
            ("ffn_norm", (d,)),
            ("ffn_gate", (hid, d)),
            ("ffn_up", (hid, d)),
            ("ffn_down", (d, hid)),
        ):
            w.add_tensor(f"blk.{i}.{n}.weight", m(*s))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_signal_during_conversion_leaves_nothing(tmp_path, sig):
    g = big_gguf(str(tmp_path / "big.gguf"))
    out = tmp_path / "out"
    out.mkdir()
    p = subprocess.Popen(
        [PY, "-m", "pyllm", "convert", "-q", g, str(out / "m.bin")],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 60
    while not os.listdir(out) and time.time() < deadline and p.poll() is None:
        time.sleep(0.005)
    assert os.listdir(out) and not os.path.exists(out / "m.bin"), (
        "the conversion finished before the signal"
    )
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    lines = [x for x in err.splitlines() if x.strip()]
    assert p.returncode != 0 and len(lines) == 1 and "Traceback" not in err, err
    if "(it is complete)" in err:  # on a busy machine the rename may win the race: then it is whole
        pyllm.load(str(out / "m.bin"), threads=1)
    else:
        assert os.listdir(out) == []


def test_full_disk_leaves_nothing(tmp_path, monkeypatch):
    g = write_gguf(str(tmp_path / "m.gguf"))
    out = tmp_path / "out"
    out.mkdir()
    import errno

    def full(*a):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(outfile.os, "fsync", full)
    with pytest.raises(ConvertError, match="No space left"):
        convert(g, str(out / "m.bin"), progress=False)
    assert os.listdir(out) == []


# --- the CLI: one line, no traceback, nothing left ------------------------------------------------
def test_cli_one_line_for_each_kind(tmp_path):
    hf = write_hf(str(tmp_path / "hf"), config={"num_hidden_layers": 10**9})
    g = write_gguf(str(tmp_path / "m.gguf"))
    data = open(g, "rb").read()
    (tmp_path / "t.gguf").write_bytes(data[: len(data) // 3])
    (tmp_path / "huge.gguf").write_bytes(
        patch_after(data, b"tokenizer.ggml.tokens", "<Q", 2**40, skip=8)
    )
    os.mkfifo(tmp_path / "fifo")
    out = tmp_path / "out"
    out.mkdir()
    for src in (hf, str(tmp_path / "t.gguf"), str(tmp_path / "huge.gguf"), str(tmp_path / "fifo")):
        r, lines = cli("convert", "-q", src, str(out / "o.bin"), timeout=30)
        assert r.returncode == 1 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
        assert os.listdir(out) == []


def test_format_write_also_uses_the_safe_temporary_file(tmp_path):
    cfg = dict(
        dim=16,
        n_layers=1,
        n_heads=2,
        n_kv_heads=1,
        head_dim=8,
        hidden_dim=16,
        vocab_size=8,
        max_seq_len=8,
        flags=format.FLAG_TIED_OUTPUT,
        sliding_window=0,
        norm_eps=1e-5,
    )
    specs = {
        n: format.TensorSpec(n, s, dt, load=lambda s=s: np.zeros(s))
        for n, s, dt in format.tensor_layout(cfg)
    }
    # metadata format.read accepts (format.write refuses to write a file it would refuse)
    meta = {"tokenizer": {"model": "gpt2", "tokens": [f"t{i}" for i in range(8)], "merges": []}}
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(outfile.OutputError, match="not a regular file"):
        format.write(str(tmp_path / "fifo"), cfg, meta, specs)
    format.write(str(tmp_path / "ok.bin"), cfg, meta, specs)
    assert sorted(os.listdir(tmp_path)) == ["fifo", "ok.bin"]


@pytest.mark.parametrize("delay", [0.3, 0.8, 1.5])
def test_signal_at_any_moment_leaves_nothing_or_a_whole_file(tmp_path, delay):
    g = big_gguf(str(tmp_path / "big.gguf"))
    out = tmp_path / "out"
    out.mkdir()
    p = subprocess.Popen(
        [PY, "-m", "pyllm", "convert", "-q", g, str(out / "m.bin")],
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(delay)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) <= 1 and "Traceback" not in err, err
    if p.returncode == 0 or "(it is complete)" in err:  # it finished first: the file is whole
        pyllm.load(str(out / "m.bin"), threads=1)
    else:
        assert p.returncode != 0 and os.listdir(out) == []


@pytest.mark.parametrize(
    "name", ["config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"]
)
def test_inputs_that_are_not_files(tmp_path, name):
    d = write_hf(str(tmp_path / "hf"))
    os.unlink(os.path.join(d, name))
    os.mkfifo(os.path.join(d, name))
    if name == "model.safetensors":  # listed by an index: named; else not a weights file at all
        with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
            json.dump({"weight_map": {"model.norm.weight": name}}, f)
    msg = refused(d, str(tmp_path / "o.bin"), "not a regular file")
    assert name in msg
    r, lines = cli("convert", "-q", d, str(tmp_path / "o.bin"), timeout=30)
    assert r.returncode == 1 and len(lines) == 1, r.stderr
