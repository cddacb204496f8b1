"""The chat loop driven as a user would: a pseudo-terminal, keystrokes, the screen."""
import json
import os
import subprocess
import sys

import pexpect
import pytest

from pyllm import format
from pyllm.chat import Chat, ChatError, Template
from tiny import make_tiny_model

PY = sys.executable
PROMPT = "\n> "


def spawn(*args, timeout=120):
    env = dict(os.environ, TERM="dumb", PYTHONUNBUFFERED="1")
    child = pexpect.spawn(PY, ["-m", "pyllm", "chat", *args], env=env, encoding="utf-8",
                          timeout=timeout, dimensions=(50, 200))
    child.expect("/help for commands")
    child.expect("> ")
    return child


def say(child, text):
    child.sendline(text)
    child.expect_exact(text)  # the terminal's echo
    child.expect(PROMPT)      # the reply, then a fresh prompt
    return child.before


@pytest.fixture(scope="module")
def model(default_model):
    return default_model


def test_two_turns_remember_the_first(model):
    c = spawn(model, "--temp", "0", "-t", "2")
    first = say(c, "What is the capital of France?")
    assert "The capital of France is Paris." in first
    second = say(c, "What country is that city in?")
    assert "France" in second
    c.sendline("/stats")
    c.expect(r"context (\d+)/4096 tokens")
    assert int(c.match.group(1)) > 40  # both turns are in the cache
    c.sendcontrol("d")
    c.expect(pexpect.EOF)
    c.close()
    assert c.exitstatus == 0


def test_ctrl_c_stops_the_reply_and_the_chat_goes_on(model):
    c = spawn(model, "--temp", "0")
    c.sendline("Write a very long story about a dragon and a knight.")
    c.expect(r"\w+ \w+ \w+ \w+")  # the reply is streaming
    c.sendintr()
    c.expect(PROMPT, timeout=30)
    assert c.isalive()
    reply = say(c, "What is the capital of France?")
    assert "Paris" in reply
    c.sendcontrol("c")  # at the prompt: exit cleanly
    c.expect(pexpect.EOF)
    c.close()
    assert c.exitstatus == 0


def test_reset_system_save_load_and_help(model, tmp_path):
    c = spawn(model, "--temp", "0")
    say(c, "What is the capital of France?")
    path = tmp_path / "conv.json"
    c.sendline(f"/save {path}")
    c.expect("saved to")
    saved = json.loads(path.read_text())
    assert [m["role"] for m in saved["messages"]] == ["user", "assistant"]
    assert "Paris" in saved["messages"][1]["content"]
    c.sendline("/reset")
    c.expect("new conversation")
    c.sendline("/stats")
    c.expect("context")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    c.sendline(f"/load {bad}")
    c.expect("load failed")
    c.sendline(f"/load {path}")
    c.expect("loaded")
    c.sendline("/help")
    c.expect("/system TEXT")
    c.sendline("/nonsense")
    c.expect("unknown command")
    c.sendline("/exit")
    c.expect(pexpect.EOF)


def test_context_overflow_keeps_going(model):
    c = spawn(model, "--temp", "0", "-c", "96", "-n", "24")
    notes = ""
    for q in ("Tell me about Paris.", "Tell me about London.", "Tell me about Rome.", "And Berlin?"):
        notes += say(c, q)
    assert "context full" in notes
    assert c.isalive()
    c.sendline("/stats")
    c.expect(r"context (\d+)/96 tokens")
    assert int(c.match.group(1)) <= 96
    c.sendcontrol("d")
    c.expect(pexpect.EOF)


def test_piped_stdin_answers_once(model):
    r = subprocess.run([PY, "-m", "pyllm", "chat", model, "--temp", "0"], input="What is the capital of France?\n",
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    r = subprocess.run([PY, "-m", "pyllm", "chat", model, "--temp", "0", "-p", "What is the capital of France?"],
                       capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == 0 and "Paris" in r.stdout
    r = subprocess.run([PY, "-m", "pyllm", "chat", model], input=b"\xff\xfe bad", capture_output=True, timeout=60)
    assert r.returncode == 1 and b"not valid UTF-8" in r.stderr and b"Traceback" not in r.stderr


def with_template(src, dst, template):
    mf = format.read(src)
    cfg = {k: mf.config[k] for k in format.HEADER_INTS}
    cfg["norm_eps"] = mf.config["norm_eps"]
    meta = {k: v for k, v in mf.meta.items() if k != "tensors"}
    meta["chat_template"] = template
    specs = {n: format.TensorSpec(n, s, dt, load=lambda n=n: mf.matrix(n)) for n, s, dt in format.tensor_layout(cfg)}
    format.write(dst, cfg, meta, specs)


@pytest.mark.parametrize("template, message", [
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "unsafe"),
    ("{{ self.__init__.__globals__ }}", "unsafe"),
    ("{{ messages.pop() }}", "unsafe"),
    ("{% for m in messages %}{{ m.__class__ }}{% endfor %}", "no text"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "took over"),
    ("{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}", "exceeds 1 MiB"),
    ("{{ raise_exception('no system role') }}", "no system role"),
    ("{% for %}", "rejected"),
])
def test_hostile_or_broken_templates_are_rejected(tmp_path, template, message):
    make_tiny_model(tmp_path / "tiny.bin")
    with_template(tmp_path / "tiny.bin", tmp_path / "bad.bin", template)
    r = subprocess.run([PY, "-m", "pyllm", "chat", str(tmp_path / "bad.bin"), "-p", "hi"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1
    assert "chat template rejected" in r.stderr and message in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) <= 2


def test_named_templates_render_each_family():
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    from pyllm.chat import TEMPLATES
    want = {"chatml": "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n",
            "llama2": "<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nU [/INST]",
            "llama3": "<s><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|><|start_header_id|>user"
                      "<|end_header_id|>\n\nU<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
            "zephyr": "<|system|>\nS</s>\n<|user|>\nU</s>\n<|assistant|>\n",
            "gemma": "<s><start_of_turn>user\nS\n\nU<end_of_turn>\n<start_of_turn>model\n"}
    assert set(want) == set(TEMPLATES)
    for name, text in want.items():
        assert Template(TEMPLATES[name], "<s>", "</s>").render(msgs) == text, name


def test_chat_api_trims_old_turns_to_fit(tmp_path):
    import pyllm
    make_tiny_model(tmp_path / "tiny.bin", max_seq_len=128)
    m = pyllm.load(str(tmp_path / "tiny.bin"), threads=1, n_ctx=64)
    out = open(os.devnull, "w")
    chat = Chat(m, system="be brief", sampling={"temperature": 0}, max_tokens=8, out=out)
    for i in range(8):
        chat.ask(f"the cat sat on the mat {i}")
        assert len(m.tokens) <= 64
    assert chat.messages[0] == {"role": "system", "content": "be brief"}
    assert any("dropped" in n for n in chat.notes) or len(chat.messages) < 17
    with pytest.raises(ChatError):
        chat.ask("the cat " * 100)
