"""The chat loop driven as a user would: a pseudo-terminal, keystrokes, the screen."""

import json
import os
import subprocess
import sys
import time

import pexpect
import pytest

from pyllm import format
from pyllm.chat import Chat, ChatError, Template
from tiny import make_tiny_model

PY = sys.executable
PROMPT = "\n> "


def spawn(*args, timeout=120):
    env = dict(os.environ, TERM="dumb", PYTHONUNBUFFERED="1")
    child = pexpect.spawn(
        PY,
        ["-m", "pyllm", "chat", *args],
        env=env,
        encoding="utf-8",
        timeout=timeout,
        dimensions=(50, 200),
    )
    child.expect("/help for commands")
    child.expect("> ")
    return child


def say(child, text):
    child.sendline(text)
    child.expect_exact(text)  # the terminal's echo
    child.expect(PROMPT)  # the reply, then a fresh prompt
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
    story = "Write a very long story about a dragon and a knight."
    c.sendline(story)
    c.expect_exact(story + "\r\n")  # the echo, newline included: readline has the line
    c.expect(r"\w+ \w+ \w+ \w+")  # words after the echo: the reply is streaming
    c.sendintr()
    c.expect_exact("(reply stopped)", timeout=30)  # the reply was cut, not the chat
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
    for q in (
        "Tell me about Paris.",
        "Tell me about London.",
        "Tell me about Rome.",
        "And Berlin?",
    ):
        notes += say(c, q)
    assert "context full" in notes
    assert c.isalive()
    c.sendline("/stats")
    c.expect(r"context (\d+)/96 tokens")
    assert int(c.match.group(1)) <= 96
    c.sendcontrol("d")
    c.expect(pexpect.EOF)


def test_piped_stdin_answers_once(model):
    r = subprocess.run(
        [PY, "-m", "pyllm", "chat", model, "--temp", "0"],
        input="What is the capital of France?\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    r = subprocess.run(
        [PY, "-m", "pyllm", "chat", model, "--temp", "0", "-p", "What is the capital of France?"],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 0 and "Paris" in r.stdout
    r = subprocess.run(
        [PY, "-m", "pyllm", "chat", model], input=b"\xff\xfe bad", capture_output=True, timeout=60
    )
    assert r.returncode == 1 and b"not valid UTF-8" in r.stderr and b"Traceback" not in r.stderr


def with_template(src, dst, template):
    mf = format.read(src)
    cfg = {k: mf.config[k] for k in format.HEADER_INTS}
    cfg["norm_eps"] = mf.config["norm_eps"]
    meta = {k: v for k, v in mf.meta.items() if k != "tensors"}
    meta["chat_template"] = template
    specs = {
        n: format.TensorSpec(n, s, dt, load=lambda n=n: mf.matrix(n))
        for n, s, dt in format.tensor_layout(cfg)
    }
    format.write(dst, cfg, meta, specs)


@pytest.mark.parametrize(
    "template, message",
    [
        ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "unsafe"),
        ("{{ self.__init__.__globals__ }}", "unsafe"),
        ("{{ messages.pop() }}", "unsafe"),
        ("{% for m in messages %}{{ m.__class__ }}{% endfor %}", "no text"),
        (
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            "took over",
        ),
        ("{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}", "exceeds 1 MiB"),
        ("{{ raise_exception('no system role') }}", "no system role"),
        ("{% for %}", "rejected"),
    ],
)
def test_hostile_or_broken_templates_are_rejected(tmp_path, template, message):
    make_tiny_model(tmp_path / "tiny.bin")
    with_template(tmp_path / "tiny.bin", tmp_path / "bad.bin", template)
    r = subprocess.run(
        [PY, "-m", "pyllm", "chat", str(tmp_path / "bad.bin"), "-p", "hi"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1
    assert "chat template rejected" in r.stderr and message in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) <= 2


def test_named_templates_render_each_family():
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    from pyllm.chat import TEMPLATES

    want = {
        "chatml": "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"
        "<|im_start|>assistant\n",
        "llama2": "<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nU [/INST]",
        "llama3": "<s><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nU<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "zephyr": "<|system|>\nS</s>\n<|user|>\nU</s>\n<|assistant|>\n",
        "gemma": "<s><start_of_turn>user\nS\n\nU<end_of_turn>\n<start_of_turn>model\n",
    }
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


# --- issue 18, class 2: templates are bounded while compiling, not only while rendering ----------
@pytest.mark.parametrize(
    "template, message",
    [
        ("{{ 9 ** (9 ** 9) }}", "bits"),
        ("{{ 'x' * 2000000000 }}", "exceeds"),
        ("{{ ['x'] * 2000000000 }}", "exceeds"),
        ("{{ 'x' | center(2000000000) }}", "too large"),
        ("{{ 'x'.ljust(2000000000) }}", "too large"),
        ("{{ '%2000000000s' % 'x' }}", "width"),
        ("{{ '{:>2000000000}'.format(1) }}", "rejected"),
        (
            "{% set ns = namespace(s='x') %}{% for i in range(64) %}"
            "{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
            "exceeds",
        ),
        (
            "{% set ns = namespace(s='x') %}{% for i in range(64) %}"
            "{% set ns.s = ns.s + ns.s %}{% endfor %}",
            "exceeds",
        ),
        ("{{ 'ab' | replace('a', 'x' * 1000000) | replace('x', 'y' * 1000000) }}", "rejected"),
        ("{{ (2 ** 4000) * (2 ** 4000) }}", "bits"),
        ("{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}", "nested deeper"),
        ("{{ " + "[" * 500 + "]" * 500 + " }}", "nested deeper"),
        ("{% if 1 %}" * 300 + "{% endif %}" * 300, "nested deeper"),
        ("{{ " + "-" * 3000 + "1 }}", "RecursionError"),
        ("{{ " + "not " * 3000 + "1 }}", "RecursionError"),
        ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "RecursionError"),
        ("x" * (200 << 10), "characters, over"),
        (5, "not text"),
        (["a"], "not text"),
    ],
)
def test_templates_bounded_while_compiling(template, message):
    with pytest.raises(ChatError) as e:
        Template(template).render([{"role": "user", "content": "hi"}])
    text = str(e.value)
    assert text.startswith("chat template rejected: ") and message in text and "\n" not in text, (
        text
    )


@pytest.mark.parametrize(
    "template",
    [
        "{{ 9 ** (9 ** 9) }}",
        "{{ 'x' * 2000000000 }}",
        "{% for x in y %}" * 2000,
        "{{ 'a' ~ 'b' " + "~ 'b' " * 200000 + "}}",
    ],
)
def test_chat_refuses_compile_bombs_in_one_line(tmp_path, template):
    make_tiny_model(tmp_path / "tiny.bin")
    with_template(tmp_path / "tiny.bin", tmp_path / "bad.bin", template)
    r = subprocess.run(
        [PY, "-m", "pyllm", "chat", str(tmp_path / "bad.bin"), "-p", "hi"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 1 and len(lines) == 1 and "chat template rejected" in lines[0], r.stderr


def test_ordinary_templates_still_render():
    t = Template(
        "{{ bos_token }}{% for m in messages %}{{ m.role | upper }}: {{ m.content | trim }}"
        "{{ '\\n' * 2 }}{% endfor %}{{ (messages | length) ** 2 }} {{ '%d-%s' % (3, 'x') }} "
        "{{ '{}!'.format('hi') }} {{ ', '.join(['a', 'b']) }} {{ 'ab' ~ 'cd' }} "
        "{{ range(3) | list }}",
        "<s>",
    )
    assert (
        t.render([{"role": "user", "content": " a "}])
        == "<s>USER: a\n\n1 3-x hi! a, b abcd [0, 1, 2]"
    )


# --- class 8: chat state --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import pyllm

    p = tmp_path_factory.mktemp("tiny") / "tiny.bin"
    make_tiny_model(p, max_seq_len=512)
    return pyllm.load(str(p), threads=1, n_ctx=256)


def test_lone_surrogates_never_lose_the_conversation(tmp_path, tiny):
    chat = Chat(tiny, sampling={"temperature": 0}, max_tokens=2, out=open(os.devnull, "w"))
    chat.messages = [{"role": "user", "content": "kept"}, {"role": "assistant", "content": "yes"}]
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps(
            {
                "format": "pyllm-chat",
                "version": 1,
                "system": None,
                "messages": [{"role": "user", "content": "a\ud800b"}],
            }
        )
    )
    with pytest.raises(ChatError, match="lone surrogate"):
        chat.load(str(bad))
    assert chat.messages[0]["content"] == "kept"
    chat.messages.append(
        {"role": "user", "content": "typed \udcff"}
    )  # e.g. surrogateescape from a terminal
    chat.save(str(tmp_path / "s.json"))
    saved = json.loads((tmp_path / "s.json").read_text())
    assert saved["messages"][-1]["content"] == "typed \udcff"
    assert sorted(os.listdir(tmp_path)) == ["bad.json", "s.json"]


def test_save_and_load_refuse_what_is_not_a_file(tmp_path, tiny):
    chat = Chat(tiny, sampling={"temperature": 0}, max_tokens=2, out=open(os.devnull, "w"))
    chat.messages = [{"role": "user", "content": "kept"}]
    os.mkfifo(tmp_path / "fifo")
    for path in (str(tmp_path / "fifo"), "/dev/null", "/dev/zero", str(tmp_path)):
        with pytest.raises(ChatError):
            chat.load(path)
    for path in (str(tmp_path / "fifo"), "/dev/null", str(tmp_path), tiny.path):
        with pytest.raises(ChatError):
            chat.save(path)
    assert chat.messages == [{"role": "user", "content": "kept"}]
    assert sorted(os.listdir(tmp_path)) == ["fifo"]


def _fit_reference(chat):
    """The old _fit: re-render after each dropped turn (quadratic, but obviously right)."""
    reserve = min(max(chat.m.n_ctx // 4, 16), 512) if chat.max_tokens < 0 else chat.max_tokens
    msgs = list(chat.messages)
    while True:
        ids = chat._encode(msgs)
        if len(ids) + reserve <= chat.m.n_ctx:
            return msgs
        first = 1 if msgs and msgs[0]["role"] == "system" else 0
        if len(msgs) - first <= 1:
            return msgs
        del msgs[first]
        if msgs[first:] and msgs[first]["role"] == "assistant":
            del msgs[first]


def test_fit_renders_a_long_conversation_a_few_times(tiny, monkeypatch):
    chat = Chat(
        tiny,
        system="be brief",
        sampling={"temperature": 0},
        max_tokens=4,
        out=open(os.devnull, "w"),
    )
    for n in (3, 8, 41):  # the same turns dropped as the one-at-a-time loop
        chat.reset()
        for i in range(n):
            chat.messages += [
                {"role": "user", "content": f"question {i} the cat"},
                {"role": "assistant", "content": f"answer {i} on the mat"},
            ]
        chat.messages.append({"role": "user", "content": "last"})
        want = _fit_reference(chat)
        chat._fit()
        assert chat.messages == want
    chat.reset()
    for _ in range(5000):
        chat.messages += [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    calls = []
    real = Template.render
    monkeypatch.setattr(
        Template, "render", lambda self, *a, **k: calls.append(1) or real(self, *a, **k)
    )
    reply = chat.ask("what now?")
    assert isinstance(reply, str) and len(calls) <= 2 * 14 + 4, len(calls)
    assert chat.messages[0]["role"] == "system" and chat.messages[-2]["content"] == "what now?"
    assert any("dropped" in n for n in chat.notes)


def test_message_longer_than_the_context_is_named_as_such(tiny):
    chat = Chat(tiny, sampling={"temperature": 0}, max_tokens=4, out=open(os.devnull, "w"))
    for text in ("the cat " * 400, "x" * (2 << 20)):
        with pytest.raises(ChatError) as e:
            chat.ask(text)
        assert str(e.value).startswith("this message is") and "template" not in str(e.value)
        assert chat.messages == []


def test_unknown_commands_are_not_sent(tmp_path):
    make_tiny_model(tmp_path / "tiny.bin")
    os.mkfifo(tmp_path / "fifo")
    c = spawn(str(tmp_path / "tiny.bin"), "--temp", "0", "-n", "4")
    for cmd in ("/sav3 x", "/", "/123", "/save"):
        c.sendline(cmd)
        c.expect("unknown command" if cmd != "/save" else "usage: /save FILE")
        c.expect("> ")  # readline may flush what is typed before it starts
    c.sendline(f"/load {tmp_path / 'fifo'}")
    c.expect("not a regular file", timeout=10)
    c.expect("> ")
    c.sendline("/stats")
    c.expect("no reply yet")  # nothing above reached the model
    c.expect("> ")
    c.sendline(f"/save {tmp_path / 'c.json'}")
    c.expect("saved to")
    c.expect("> ")
    c.sendcontrol("d")
    c.expect(pexpect.EOF)
    c.close()
    assert c.exitstatus == 0
    assert json.loads((tmp_path / "c.json").read_text())["messages"] == []


def test_ctrl_c_during_load_keeps_the_chat(tmp_path):
    make_tiny_model(tmp_path / "tiny.bin")
    big = tmp_path / "big.json"  # about 50 MB: parsing and checking it takes a moment
    msgs = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i} " * 8}
        for i in range(400000)
    ]
    big.write_text(
        json.dumps({"format": "pyllm-chat", "version": 1, "system": None, "messages": msgs})
    )
    c = spawn(str(tmp_path / "tiny.bin"), "--temp", "0", "-n", "4")
    c.sendline(f"/load {big}")
    c.expect_exact(f"/load {big}\r\n")  # the echo, newline included: readline has the line
    time.sleep(0.3)  # nothing is printed while loading: let input() return (parsing takes longer)
    c.sendintr()
    c.expect(r"\(load cancelled|\(loaded", timeout=60)
    c.expect("> ")
    c.sendline("/stats")
    c.expect("no reply yet")  # still the same chat, not quit
    c.expect("> ")
    c.sendcontrol("d")
    c.expect(pexpect.EOF)
    c.close()
    assert c.exitstatus == 0


def test_template_rendering_a_lone_surrogate_is_refused(tiny):
    chat = Chat(tiny, sampling={"temperature": 0}, max_tokens=2, out=open(os.devnull, "w"))
    chat.template = Template("{{ '\ud800' }}{% for m in messages %}{{ m.content }}{% endfor %}")
    with pytest.raises(ChatError, match="not valid Unicode"):
        chat.ask("hi")


def test_text_from_the_file_reaches_the_terminal_escaped(tmp_path):
    """A template's own error text and the model's name are the file's: printed escaped."""
    make_tiny_model(tmp_path / "tiny.bin")
    bad = tmp_path / "t\x1b[2J.bin"
    with_template(tmp_path / "tiny.bin", bad, "{{ raise_exception('\x1b]0;pwned\x07') }}")
    r = subprocess.run(
        [PY, "-m", "pyllm", "chat", str(bad), "-p", "hi"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1 and "\\x1b]0;pwned\\x07" in r.stderr, r.stderr
    assert "\x1b" not in r.stderr and "\x07" not in r.stderr
    c = pexpect.spawn(
        PY,
        ["-m", "pyllm", "chat", str(bad)],
        encoding="utf-8",
        timeout=60,
        env=dict(os.environ, TERM="dumb"),
    )
    c.expect("/help for commands")  # the banner names the file
    assert "pyllm chat: t\\x1b[2J.bin, " in c.before and "\x1b[2J" not in c.before, c.before
    c.expect("> ")
    c.sendcontrol("d")
    c.expect(pexpect.EOF)
