"""pyllm serve driven as its users do: real servers on free loopback ports, the official
openai client, raw HTTP for the errors, and the chat page in headless Chromium."""

import http.client
import io
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time

import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_chat import with_template

import pyllm
from pyllm import serve
from pyllm.chat import Chat
from tiny import make_tiny_model

PY = sys.executable
STORY = "Write a very long story about a dragon and a knight, with many chapters."
QUESTION = "What is the capital of France?"


class Srv:
    """`pyllm serve` in a subprocess on a port the OS picks; its log in a file."""

    def __init__(self, model, *args):
        self.logfile = tempfile.NamedTemporaryFile(
            "w+", prefix="pyllm-serve-", suffix=".log", delete=False
        )
        self.proc = subprocess.Popen(
            [PY, "-m", "pyllm", "serve", model, "--port", "0", *args],
            stdout=subprocess.DEVNULL,
            stderr=self.logfile,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 120
        while True:
            m = re.search(r"on http://127\.0\.0\.1:(\d+)/ ", self.log())
            if m:
                self.port = int(m.group(1))
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise AssertionError(f"the server did not start:\n{self.log()}")
            time.sleep(0.05)
        self.base = f"http://127.0.0.1:{self.port}"

    def log(self):
        with open(self.logfile.name, encoding="utf-8", errors="replace") as f:
            return f.read()

    def client(self, key="none", **kw):
        return openai.OpenAI(
            base_url=self.base + "/v1", api_key=key, max_retries=0, timeout=120, **kw
        )

    def request(self, method, path, body=None, headers=None, timeout=60):
        """(status, headers, parsed JSON or raw bytes) of one raw HTTP request."""
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
        try:
            c.request(method, path, body=body, headers=headers or {})
            r = c.getresponse()
            data = r.read()
            hdrs = {k.lower(): v for k, v in r.getheaders()}
        finally:
            c.close()
        if hdrs.get("content-type", "").startswith("application/json"):
            data = json.loads(data)
        return r.status, hdrs, data

    def health(self):
        return self.request("GET", "/health")[2]

    def wait_idle(self, seconds=20):
        """Seconds until the model is free and nothing waits; fails after `seconds`."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            h = self.health()
            if h["slots_processing"] == 0 and h["queued"] == 0:
                return time.monotonic() - t0
            time.sleep(0.02)
        raise AssertionError(f"the server is still busy after {seconds} s: {self.health()}")

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.logfile.close()
        os.unlink(self.logfile.name)


class Stream:
    """A raw streaming request on its own socket, read event by event; close() hangs up."""

    def __init__(self, srv, path, body, headers=None):
        self.conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=120)
        self.conn.request(
            "POST",
            path,
            json.dumps(dict(body, stream=True)),
            {"Content-Type": "application/json", **(headers or {})},
        )
        self.sock = self.conn.sock
        self.resp = self.conn.getresponse()
        self.status = self.resp.status

    def events(self):
        while True:
            line = self.resp.readline()
            if not line:
                return
            line = line.decode().strip()
            if line.startswith("data: "):
                yield line[6:]

    def close(self):
        self.sock.shutdown(socket.SHUT_RDWR)
        self.resp.close()
        self.conn.close()


def user(text):
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def srv(default_model):
    s = Srv(default_model, "-c", "2048")
    yield s
    s.close()


@pytest.fixture(scope="module")
def strict(default_model):
    """API key, one CORS origin, a queue of one, short time limits."""
    s = Srv(
        default_model,
        "-c",
        "4096",
        "--api-key",
        "sekret",
        "--cors-origin",
        "http://app.example",
        "--queue",
        "1",
        "--timeout",
        "6",
        "--read-timeout",
        "1",
    )
    yield s
    s.close()


@pytest.fixture(scope="module")
def local(default_model):
    m = pyllm.load(default_model, n_ctx=2048)
    yield m
    m.close()


def local_chat(model, text):
    """pyllm chat's reply at temperature 0, and its stats."""
    chat = Chat(model, sampling={"temperature": 0}, out=io.StringIO())
    return chat.ask(text), chat.last


# --- the API through the openai client ---
def test_models_list_names_the_file(srv, default_model):
    models = srv.client().models.list().data
    assert [m.id for m in models] == [os.path.basename(default_model)]
    assert models[0].object == "model" and models[0].owned_by == "pyllm" and models[0].created > 0
    assert srv.client().models.retrieve(models[0].id).id == models[0].id


def test_chat_equals_pyllm_chat_at_temperature_0(srv, local):
    r = srv.client().chat.completions.create(model="x", messages=user(QUESTION), temperature=0)
    want, stats = local_chat(local, QUESTION)
    assert "Paris" in want
    assert r.choices[0].message.content == want
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason == "stop"
    assert r.object == "chat.completion" and r.model == "smollm2-135m-instruct.f16.bin"
    u = r.usage
    assert u.prompt_tokens == len(Chat(local)._encode(user(QUESTION)))
    assert (
        u.completion_tokens == stats["gen_tokens"]
        and u.total_tokens == u.prompt_tokens + u.completion_tokens
    )


def test_streaming_carries_the_same_text_then_usage(srv):
    c = srv.client()
    whole = c.chat.completions.create(model="x", messages=user(QUESTION), temperature=0)
    chunks = list(
        c.chat.completions.create(
            model="x",
            messages=user(QUESTION),
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    assert (
        sum(1 for ch in chunks if ch.choices and ch.choices[0].delta.content) > 3
    )  # piece by piece
    finals = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "stop"
    assert (
        chunks[-1].choices == []
        and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    )
    assert all(ch.usage is None for ch in chunks[:-1])
    # without include_usage there is no usage chunk; the stream ends with [DONE]
    s = Stream(srv, "/v1/chat/completions", {"messages": user(QUESTION), "temperature": 0})
    events = list(s.events())
    s.close()
    assert events[-1] == "[DONE]" and all("usage" not in json.loads(e) for e in events[:-1])


def test_max_tokens_and_max_completion_tokens(srv):
    c = srv.client()
    r = c.chat.completions.create(model="x", messages=user(STORY), temperature=0, max_tokens=5)
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"
    r = c.chat.completions.create(
        model="x", messages=user(STORY), temperature=0, max_completion_tokens=3
    )
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"
    chunks = list(
        c.chat.completions.create(
            model="x",
            messages=user(STORY),
            temperature=0,
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage.completion_tokens == 4
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"


def test_stop_strings_cut_exactly_also_across_streamed_pieces(srv):
    c = srv.client()
    ask = dict(
        model="x",
        messages=user("Describe the sea in three sentences."),
        temperature=0,
        max_tokens=60,
    )
    pieces = [
        ch.choices[0].delta.content
        for ch in c.chat.completions.create(stream=True, **ask)
        if ch.choices and ch.choices[0].delta.content
    ]
    full = "".join(pieces)
    assert len(pieces) > 10
    # a stop string made of the end of one piece and the start of the next
    k = next(
        i for i in range(5, len(pieces) - 1) if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 2
    )
    stop = pieces[k][-2:] + pieces[k + 1][:2]
    want = full[: full.index(stop)]
    for form in (stop, [stop, "never-appears-here"], ["never-appears-here", stop]):
        r = c.chat.completions.create(stop=form, **ask)
        assert r.choices[0].message.content == want and r.choices[0].finish_reason == "stop"
        got = list(c.chat.completions.create(stop=form, stream=True, **ask))
        assert "".join(ch.choices[0].delta.content or "" for ch in got if ch.choices) == want
        assert [ch.choices[0].finish_reason for ch in got if ch.choices][-1] == "stop"
    r = c.chat.completions.create(stop=["never-appears-here"], **ask)
    assert r.choices[0].message.content == full


def test_seed_reproduces_sampled_text(srv):
    c = srv.client()
    ask = dict(
        model="x",
        messages=user("Tell me a short poem."),
        temperature=1.0,
        top_p=1.0,
        max_tokens=24,
        extra_body={"top_k": 0, "min_p": 0},
    )
    a = c.chat.completions.create(seed=123, **ask).choices[0].message.content
    c.chat.completions.create(
        model="x", messages=user("Something else entirely."), max_tokens=3
    )  # other cache
    b = c.chat.completions.create(seed=123, **ask).choices[0].message.content
    s = "".join(
        ch.choices[0].delta.content or ""
        for ch in c.chat.completions.create(seed=123, stream=True, **ask)
        if ch.choices
    )
    assert a == b == s and len(a) > 10
    others = {
        c.chat.completions.create(seed=seed, **ask).choices[0].message.content for seed in (1, 2, 3)
    }
    assert others - {a}, "three other seeds all gave the same text as seed 123"


def test_completions_equal_pyllm_generate(srv, local):
    prompt = "The capital of France is"
    want = "".join(local.generate(prompt, 12, temperature=0))
    c = srv.client()
    r = c.completions.create(model="x", prompt=prompt, max_tokens=12, temperature=0)
    assert r.choices[0].text == want and r.object == "text_completion"
    assert (
        r.usage.prompt_tokens == len(local.tokenizer.encode(prompt))
        and r.usage.completion_tokens == 12
    )
    got = list(
        c.completions.create(model="x", prompt=prompt, max_tokens=12, temperature=0, stream=True)
    )
    assert "".join(ch.choices[0].text for ch in got) == want
    assert got[-1].choices[0].finish_reason == "length"
    ids = local.tokenizer.encode(prompt)
    r = c.completions.create(model="x", prompt=ids, max_tokens=12, temperature=0)
    assert r.choices[0].text == want


def test_long_prompts_prefill_in_chunks_to_the_same_text(srv, local):
    prompt = (
        "The cat sat on the mat. " * 120 + "The capital of France is"
    )  # ~800 tokens: several chunks
    n = len(local.tokenizer.encode(prompt))
    assert n > 3 * serve.PREFILL_CHUNK
    want = "".join(local.generate(prompt, 10, temperature=0))
    status, _, r = srv.request(
        "POST", "/v1/completions", {"prompt": prompt, "max_tokens": 10, "temperature": 0}
    )
    assert r["choices"][0]["text"] == want and r["usage"]["prompt_tokens"] == n
    status, _, r = srv.request(
        "POST", "/v1/completions", {"prompt": prompt + " a city", "max_tokens": 3}
    )
    assert r["usage"]["prompt_tokens_details"]["cached_tokens"] >= n - 1


def test_resent_conversation_prefills_only_new_tokens(srv):
    c = srv.client()
    first = user("Name a colour.")
    r1 = c.chat.completions.create(model="x", messages=first, temperature=0, max_tokens=20)
    second = first + [
        {"role": "assistant", "content": r1.choices[0].message.content},
        {"role": "user", "content": "Name another one."},
    ]
    status, _, r2 = srv.request(
        "POST", "/v1/chat/completions", {"messages": second, "temperature": 0, "max_tokens": 20}
    )
    assert status == 200
    cached = r2["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= r1.usage.prompt_tokens
    assert r2["timings"]["cache_n"] == cached
    assert r2["timings"]["prompt_n"] == r2["usage"]["prompt_tokens"] - cached < 20
    assert r2["timings"]["predicted_n"] == r2["usage"]["completion_tokens"]


def test_two_concurrent_clients_each_get_their_own_answer(srv):
    asks = [("What is the capital of France?", False), ("Write a haiku about rain.", True)]

    def run(text, stream):
        c = srv.client()
        kw = dict(model="x", messages=user(text), temperature=0, max_tokens=40)
        if stream:
            return "".join(
                ch.choices[0].delta.content or ""
                for ch in c.chat.completions.create(stream=True, **kw)
                if ch.choices
            )
        return c.chat.completions.create(**kw).choices[0].message.content

    serial = [run(*a) for a in asks]
    assert serial[0] != serial[1]
    results = [None, None]
    barrier = threading.Barrier(2)

    def worker(i):
        barrier.wait()
        results[i] = run(*asks[i])

    for _ in range(2):
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert results == serial


def test_a_client_that_hangs_up_frees_the_model_at_once(srv):
    s = Stream(
        srv, "/v1/chat/completions", {"messages": user(STORY), "temperature": 0, "max_tokens": 1500}
    )
    assert s.status == 200
    got = 0
    for e in s.events():
        if json.loads(e)["choices"][0]["delta"].get("content"):
            got += 1
            if got == 5:
                break
    assert srv.health()["slots_processing"] == 1
    s.close()
    srv.wait_idle(20)
    t0 = time.monotonic()
    r = srv.client().chat.completions.create(
        model="x", messages=user(QUESTION), temperature=0, max_tokens=4
    )
    assert r.usage.completion_tokens == 4 and time.monotonic() - t0 < 20
    # it stopped within a token or two of the hang-up, not after 1500
    assert cancelled_counts(srv)[-1] < 5 + 20


def cancelled_counts(srv):
    """How many tokens each cancelled generation had made, from the server's log."""
    return [int(n) for n in re.findall(r"(\d+) generated at [\d.]+ tok/s, cancelled", srv.log())]


def test_a_non_streaming_client_that_hangs_up_stops_its_generation(srv):
    n = len(cancelled_counts(srv))
    with socket.create_connection(("127.0.0.1", srv.port), timeout=20) as s:
        body = json.dumps({"messages": user(STORY), "temperature": 0, "max_tokens": 1500}).encode()
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        deadline = time.monotonic() + 20
        while srv.health()["slots_processing"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(0.5)
    srv.wait_idle(20)
    counts = cancelled_counts(srv)
    assert len(counts) == n + 1 and counts[-1] < 200  # 1500 were asked for


def test_a_client_that_hangs_up_while_queued_leaves_the_queue(srv):
    a = Stream(
        srv, "/v1/chat/completions", {"messages": user(STORY), "temperature": 0, "max_tokens": 1500}
    )
    next(e for e in a.events() if json.loads(e)["choices"][0]["delta"].get("content"))
    b = Stream(srv, "/v1/chat/completions", {"messages": user(QUESTION), "max_tokens": 1500})
    deadline = time.monotonic() + 10
    while srv.health()["queued"] != 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    b.close()
    deadline = time.monotonic() + 10
    while srv.health()["queued"] != 0:
        assert time.monotonic() < deadline, srv.health()
        time.sleep(0.02)
    assert srv.health()["slots_processing"] == 1  # a goes on
    a.close()
    srv.wait_idle()


# --- errors, raw ---
def err(srv, body, path="/v1/chat/completions", status=400, headers=None, method="POST"):
    got, hdrs, data = srv.request(method, path, body, headers)
    assert got == status, data
    assert set(data) == {"error"} and {"message", "type", "code"} <= set(data["error"])
    assert isinstance(data["error"]["message"], str) and data["error"]["message"]
    return data["error"], hdrs


BAD = [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    ({}, "'messages'"),
    ({"messages": []}, "'messages'"),
    ({"messages": "hi"}, "'messages'"),
    ({"messages": [1]}, "messages[0]"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "role"),
    ({"messages": [{"role": "user", "content": 5}]}, "content"),
    (
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
            ]
        },
        "text parts",
    ),
    ({"messages": user("hi"), "temperature": "hot"}, "temperature"),
    ({"messages": user("hi"), "temperature": -1}, "temperature"),
    ({"messages": user("hi"), "top_p": 0}, "top_p"),
    ({"messages": user("hi"), "top_p": 1.5}, "top_p"),
    ({"messages": user("hi"), "min_p": 2}, "min_p"),
    ({"messages": user("hi"), "repeat_penalty": 0}, "repeat_penalty"),
    ({"messages": user("hi"), "top_k": "many"}, "top_k"),
    ({"messages": user("hi"), "max_tokens": 1.5}, "max_tokens"),
    ({"messages": user("hi"), "max_tokens": "5"}, "max_tokens"),
    ({"messages": user("hi"), "max_tokens": True}, "max_tokens"),
    ({"messages": user("hi"), "max_tokens": -2}, "max_tokens"),
    ({"messages": user("hi"), "seed": "x"}, "seed"),
    ({"messages": user("hi"), "stop": 5}, "stop"),
    ({"messages": user("hi"), "stop": ["a", 1]}, "stop"),
    ({"messages": user("hi"), "stop": ["s"] * 17}, "stop"),
    ({"messages": user("hi"), "stream": "yes"}, "stream"),
    ({"messages": user("hi"), "n": 2}, "n=1"),
    ({"messages": user("hi"), "stream_options": 3}, "stream_options"),
    ('{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "not valid JSON"),
    ('{"messages": [{"role": "user", "content": "\\ud800"}]}', "lone surrogate"),
    ('{"messages": [{"role": "user", "content": "a\\udc00b"}]}', "lone surrogate"),
]


@pytest.mark.parametrize("body,says", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_malformed_requests_are_400_in_openai_shape(srv, body, says):
    e, _ = err(srv, body)
    assert e["type"] == "invalid_request_error" and says in e["message"]


def test_completion_and_tokenizer_errors(srv):
    for body in ({}, {"prompt": 5}, {"prompt": ["a", "b"]}, {"prompt": [1, 10**9]}, {"prompt": ""}):
        err(srv, body, "/v1/completions")
    for body in ({}, {"content": 5}):
        err(srv, body, "/tokenize")
    for body in ({"tokens": "abc"}, {"tokens": [1, -1]}, {"tokens": [True]}):
        err(srv, body, "/detokenize")


def test_limits_on_size_count_and_length(srv):
    e, _ = err(srv, {"messages": user("hi " * 3000)})  # ~3000 tokens, the context holds 2048
    assert e["code"] == "context_length_exceeded" and "2048" in e["message"]
    assert (
        e["n_ctx"] == 2048
        and e["n_prompt_tokens"] > 2048
        and str(e["n_prompt_tokens"]) in e["message"]
    )
    e, _ = err(srv, {"prompt": "hi " * 3000}, "/v1/completions")
    assert e["code"] == "context_length_exceeded"
    e, _ = err(srv, {"messages": user("x") * 513})
    assert "513 messages" in e["message"]
    e, _ = err(srv, {"messages": user("x" * (256 * 1024 + 1))})
    assert "characters" in e["message"]
    srv.wait_idle()


def read_reply(s):
    """One HTTP reply off a socket: its head and as much body as it says it has."""
    data = b""
    while True:
        head, sep, body = data.partition(b"\r\n\r\n")
        m = re.search(rb"content-length: (\d+)", head, re.I)
        if sep and m and len(body) >= int(m.group(1)):
            return data
        chunk = s.recv(65536)
        if not chunk:
            return data
        data += chunk


def raw(port, head, body=b"", more=()):
    """Send a request by hand (perhaps never finishing it); the reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(head + body)
        try:
            for chunk in more:
                s.sendall(chunk)
        except OSError:  # the server answered and closed before the body was all sent
            pass
        return read_reply(s)


def test_bodies_over_the_limit_are_413(srv):
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\n"
    )
    reply = raw(srv.port, head + b"Content-Length: %d\r\n\r\n" % (3 << 20), b"{" + b" " * 1000)
    assert reply.startswith(b"HTTP/1.1 413") and b"body_too_large" in reply
    chunk = b"10000\r\n" + b" " * 0x10000 + b"\r\n"  # no length given: counted as it arrives
    reply = raw(srv.port, head + b"Transfer-Encoding: chunked\r\n\r\n", more=[chunk] * 48)
    assert reply.startswith(b"HTTP/1.1 413") and b"body_too_large" in reply


def test_unknown_fields_are_ignored_and_the_model_field_is_only_a_name(srv):
    status, _, r = srv.request(
        "POST",
        "/v1/chat/completions",
        {
            "model": "/etc/passwd",
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
            ],
            "max_tokens": 3,
            "frequency_penalty": 0,
            "logit_bias": {},
            "user": "me",
            "some_future_field": [1],
        },
    )
    assert status == 200 and r["model"] == "smollm2-135m-instruct.f16.bin"
    assert r["usage"]["completion_tokens"] <= 3


def test_unknown_paths_and_methods(srv):
    e, _ = err(srv, None, "/v1/nothing", 404, method="GET")
    assert "/v1/nothing" in e["message"]
    err(srv, None, "/../../etc/passwd", 404, method="GET")
    err(srv, None, "/static/../serve.py", 404, method="GET")
    err(srv, None, "/v1/chat/completions", 405, method="GET")
    err(srv, None, "/v1/models/other-model", 404, method="GET")


def test_tokenize_detokenize_props_health(srv, local):
    status, _, r = srv.request("POST", "/tokenize", {"content": "Hello world"})
    assert status == 200 and r["tokens"] == local.tokenizer.encode("Hello world", add_bos=False)
    status, _, r2 = srv.request(
        "POST", "/tokenize", {"content": "Hello world", "with_pieces": True}
    )
    assert [p["id"] for p in r2["tokens"]] == r["tokens"] and "".join(
        p["piece"] for p in r2["tokens"]
    ) == "Hello world"
    status, _, e = srv.request("POST", "/tokenize", '{"content": "\\ud83d\\ude00"}')  # a pair: fine
    assert status == 200 and local.tokenizer.decode(e["tokens"]) == "\U0001f600"
    status, _, d = srv.request("POST", "/detokenize", {"tokens": r["tokens"]})
    assert d == {"content": "Hello world"}
    status, _, p = srv.request("GET", "/props")
    assert (
        p["n_ctx"] == 2048
        and p["default_generation_settings"]["n_ctx"] == 2048
        and p["total_slots"] == 1
    )
    assert srv.health()["status"] == "ok"


# --- security defaults ---
def test_host_header_must_name_this_server(srv):
    for host in (
        "evil.example",
        f"evil.example:{srv.port}",
        "localhost.evil.example",
        "127.0.0.1.nip.io",
        "",
    ):
        e, _ = err(srv, None, "/v1/models", 400, {"Host": host}, "GET")
        assert e["code"] == "invalid_host"
    for host in (
        f"127.0.0.1:{srv.port}",
        f"localhost:{srv.port}",
        "LOCALHOST",
        f"[::1]:{srv.port}",
    ):
        assert srv.request("GET", "/v1/models", headers={"Host": host})[0] == 200
    with socket.create_connection(
        ("127.0.0.1", srv.port), timeout=10
    ) as s:  # HTTP/1.0, no Host at all
        s.sendall(b"GET /v1/models HTTP/1.0\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 400")


def test_no_cors_unless_asked_and_other_sites_are_refused(srv):
    e, hdrs = err(
        srv,
        {"messages": user("hi")},
        status=403,
        headers={"Origin": "http://evil.example", "Content-Type": "text/plain"},
    )
    assert e["code"] == "origin_not_allowed" and "access-control-allow-origin" not in hdrs
    e, hdrs = err(
        srv,
        None,
        "/v1/chat/completions",
        403,
        {"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
        "OPTIONS",
    )
    assert "access-control-allow-origin" not in hdrs
    err(srv, None, "/v1/models", 403, {"Origin": "null"}, "GET")
    # the page's own origin is fine
    status, hdrs, _ = srv.request("GET", "/v1/models", headers={"Origin": srv.base})
    assert status == 200 and "access-control-allow-origin" not in hdrs


def test_cors_for_the_named_origin_only(strict):
    pre = {
        "Origin": "http://app.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    status, hdrs, _ = strict.request("OPTIONS", "/v1/chat/completions", headers=pre)
    assert status == 200 and hdrs["access-control-allow-origin"] == "http://app.example"
    assert "authorization" in hdrs["access-control-allow-headers"].lower()
    status, hdrs, _ = strict.request(
        "GET",
        "/v1/models",
        headers={"Origin": "http://app.example", "Authorization": "Bearer sekret"},
    )
    assert status == 200 and hdrs["access-control-allow-origin"] == "http://app.example"
    err(
        strict,
        None,
        "/v1/models",
        403,
        {"Origin": "http://app.example.evil", "Authorization": "Bearer sekret"},
        "GET",
    )
    # a 401 to the named origin is readable there
    _, hdrs = err(strict, None, "/v1/models", 401, {"Origin": "http://app.example"}, "GET")
    assert hdrs["access-control-allow-origin"] == "http://app.example"


def test_api_key(strict):
    with pytest.raises(openai.AuthenticationError):
        strict.client("wrong").models.list()
    assert strict.client("sekret").models.list().data
    r = strict.client("sekret").chat.completions.create(
        model="x", messages=user("Hi"), max_tokens=2
    )
    assert r.usage.completion_tokens <= 2
    for headers in (
        {},
        {"Authorization": "sekret"},
        {"Authorization": "Bearer sekre"},
        {"Authorization": "Basic sekret"},
    ):
        for path, method in (
            ("/v1/models", "GET"),
            ("/props", "GET"),
            ("/tokenize", "POST"),
            ("/v1/completions", "POST"),
        ):
            e, hdrs = err(strict, {"prompt": "x"}, path, 401, headers, method)
            assert e["code"] == "invalid_api_key" and hdrs["www-authenticate"] == "Bearer"
    assert strict.request("GET", "/health")[0] == 200
    assert strict.request("GET", "/")[0] == 200  # the page itself asks for the key


def test_full_queue_is_503_and_waiting_requests_are_served(strict):
    key = {"Authorization": "Bearer sekret"}
    a = Stream(strict, "/v1/chat/completions", {"messages": user(STORY), "max_tokens": 1500}, key)
    next(e for e in a.events() if json.loads(e)["choices"][0]["delta"].get("content"))
    result = {}

    def waiting():
        result["b"] = strict.request(
            "POST", "/v1/chat/completions", {"messages": user(QUESTION), "max_tokens": 3}, key
        )

    t = threading.Thread(target=waiting)
    t.start()
    deadline = time.monotonic() + 5
    while strict.health()["queued"] != 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    e, hdrs = err(strict, {"messages": user(QUESTION)}, status=503, headers=key)
    assert e["code"] == "queue_full" and e["type"] == "server_error"
    a.close()
    t.join(60)
    assert result["b"][0] == 200 and result["b"][2]["usage"]["completion_tokens"] <= 3


def test_time_limit_ends_a_long_generation(strict):
    t0 = time.monotonic()
    # greedy: SmolLM2 never ends this story's turn (a sampled reply may, and with lookup
    # drafting 1000 tokens take under 6 s), so only the time limit or the 4096-token context
    # (over 15 s away here) can end it
    r = strict.client("sekret").chat.completions.create(
        model="x", messages=user(STORY), max_tokens=100000, temperature=0
    )
    assert r.choices[0].finish_reason == "length" and 0 < r.usage.completion_tokens
    assert time.monotonic() - t0 < 30  # --timeout 6; 100000 tokens would be hours


def test_slow_clients_are_dropped(strict):
    with socket.create_connection(
        ("127.0.0.1", strict.port), timeout=10
    ) as s:  # headers that never end
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        t0 = time.monotonic()
        assert s.recv(100) == b"" and time.monotonic() - t0 < 8
    with socket.create_connection(
        ("127.0.0.1", strict.port), timeout=10
    ) as s:  # a body that never ends
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Authorization: Bearer sekret\r\n"
            b'Content-Length: 100\r\n\r\n{"messa'
        )
        reply = read_reply(s)
        assert reply.startswith(b"HTTP/1.1 408") and b"request_timeout" in reply


def test_page_is_self_contained_and_locked_down(srv):
    status, hdrs, page = srv.request("GET", "/")
    assert status == 200 and hdrs["content-type"].startswith("text/html")
    text = page.decode()
    assert not re.search(r"https?://", text), "the page must fetch nothing from another origin"
    assert "innerHTML" not in text and "insertAdjacentHTML" not in text and "eval(" not in text
    csp = hdrs["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "unsafe" not in csp
    assert re.search(r"script-src 'sha256-[A-Za-z0-9+/=]+'", csp)


def test_a_random_tiny_model_streams_what_it_returns(tmp_path):
    """Random weights emit arbitrary bytes (split characters, control codes, no end of
    turn): the stream still carries exactly the non-streamed text, as valid JSON."""
    path = str(tmp_path / "tiny.bin")
    make_tiny_model(path, seed=3)
    s = Srv(path, "--template", "chatml")
    try:
        c = s.client()
        ask = dict(model="x", messages=user("hello world"), temperature=0, max_tokens=80)
        whole = c.chat.completions.create(**ask)
        assert whole.usage.completion_tokens == 80 and whole.choices[0].finish_reason == "length"
        got = "".join(
            ch.choices[0].delta.content or ""
            for ch in c.chat.completions.create(stream=True, **ask)
            if ch.choices
        )
        assert got == whole.choices[0].message.content
        status, _, p = s.request("GET", "/props")
        assert p["n_ctx"] == 512 and "<|im_start|>" in p["chat_template"]
    finally:
        s.close()


@pytest.mark.parametrize(
    "template, says",
    [
        (None, "no chat template"),
        ("{{ raise_exception('roles must alternate') }}", "roles must alternate"),
        (
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            "took over",
        ),
        ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "unsafe"),
    ],
    ids=["none", "raises", "endless", "escape"],
)
def test_a_bad_template_is_a_400_and_the_server_goes_on(tmp_path, template, says):
    """The file's template is rendered sandboxed and time-bounded, as in pyllm chat."""
    make_tiny_model(str(tmp_path / "tiny.bin"), seed=1)
    path = str(tmp_path / "bad.bin")
    with_template(str(tmp_path / "tiny.bin"), path, template)
    s = Srv(path)
    try:
        e, _ = err(s, {"messages": user("hi")})
        assert says in e["message"]
        r = s.client().completions.create(
            model="x", prompt="hello", max_tokens=3, temperature=0
        )  # greedy: a sampled end of turn would stop it short
        assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"
        if template is None:
            assert "no chat template" in s.log()
    finally:
        s.close()


def test_the_log_prints_the_model_name_escaped(tmp_path):
    """The file's name is the file's: the start line shows its control characters escaped."""
    path = tmp_path / "t\x1b]0;x\x07.bin"
    make_tiny_model(str(path), seed=1)
    s = Srv(str(path))
    try:
        log = s.log()
        assert "pyllm serve: t\\x1b]0;x\\x07.bin (" in log and "\x1b" not in log, log
    finally:
        s.close()


def test_ctrl_c_ends_open_streams_and_exits_0(default_model):
    s = Srv(default_model, "-c", "512")
    try:
        st_ = Stream(s, "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 400})
        events = st_.events()
        next(events)
        s.proc.send_signal(2)
        rest = list(events)
        assert json.loads(rest[-1])["error"]["code"] == "shutting_down"
        assert s.proc.wait(20) == 0
        assert "Traceback" not in s.log()
    finally:
        s.close()


# --- the pieces, directly ---
@settings(max_examples=300, deadline=None)
@given(
    st.text("abc\n", max_size=40),
    st.lists(st.text("abc\n", min_size=1, max_size=4), max_size=3),
    st.lists(st.integers(1, 5), max_size=40),
)
def test_stop_text_cuts_at_the_first_stop_however_the_text_is_split(text, stops, cuts):
    pieces, i = [], 0
    for n in cuts:
        if i >= len(text):
            break
        pieces.append(text[i : i + n])
        i += n
    pieces.append(text[i:])
    # where generation would stop: the first end of a stop string; the longest one ending there
    ends = [
        (e, max(len(s) for s in stops if text[:e].endswith(s)))
        for e in range(1, len(text) + 1)
        if any(text[:e].endswith(s) for s in stops if s)
    ]
    found = ends[:1]
    want = text[: ends[0][0] - ends[0][1]] if ends else text
    st_ = serve.StopText(stops)
    out = []
    for p in pieces:
        out.append(st_.push(p))
        if st_.hit:
            break
    if not st_.hit:
        out.append(st_.flush())
    assert "".join(out) == want and st_.hit == bool(found)


def test_a_waiting_stream_gets_heartbeats_then_its_events():
    import asyncio

    async def run():
        job = serve.Job([1, 2], {}, time.monotonic() + 60)
        job.loop.call_later(0.35, job.events.put_nowait, ("text", "hi"))
        job.loop.call_later(0.4, job.events.put_nowait, ("done", {}))
        return [e async for e in job.stream(heartbeat=0.1)]

    events = asyncio.run(run())
    assert events[-2:] == [("text", "hi"), ("done", {})]
    assert len(events) > 2 and set(events[:-2]) == {("ping",)}  # pings while it waited


def test_host_parsing_and_wildcard_binds():
    assert serve._host_name("LocalHost:8080") == "localhost"
    assert serve._host_name("[::1]:80") == "::1" and serve._host_name("[::1]") == "::1"
    assert serve._host_name("a:b") is None and serve._host_name("") is None
    g = serve.Guard(None, "127.0.0.1")
    assert g.host_ok("localhost") and g.host_ok("127.0.0.1") and not g.host_ok("192.168.1.5")
    g = serve.Guard(None, "0.0.0.0", allowed_hosts=["box.lan"])
    assert g.host_ok("192.168.1.5") and g.host_ok("box.lan") and g.host_ok("fe80::1")
    assert not g.host_ok("evil.example")
    assert (
        serve.is_loopback("127.0.0.2")
        and serve.is_loopback("::1")
        and not serve.is_loopback("0.0.0.0")
    )


def test_cli_errors_are_one_line(default_model, tmp_path):
    def run(*args):
        p = subprocess.run(
            [PY, "-m", "pyllm", "serve", *args], capture_output=True, text=True, timeout=120
        )
        return p.returncode, p.stderr.strip()

    rc, e = run(str(tmp_path / "missing.bin"))
    assert rc == 1 and e.startswith("pyllm: error:") and "no such file" in e and "\n" not in e
    rc, e = run(default_model, "--port", "70000")
    assert rc == 1 and "70000" in e and "\n" not in e
    rc, e = run(default_model, "--top-p", "0")
    assert rc == 1 and "top_p" in e
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        rc, e = run(default_model, "--port", str(s.getsockname()[1]))
    assert rc == 1 and "cannot listen" in e and "\n" not in e


# --- the page in a real browser ---
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,860",
]


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary = next(
        (p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if os.path.exists(p)), None
    )
    driver_path = "/usr/bin/chromedriver"
    if binary is None or not os.path.exists(driver_path):
        pytest.fail("Debian's chromium and chromium-driver are needed: make chromium installs them")
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for f in CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path / 'profile'}"]:
        opts.add_argument(f)
    d = webdriver.Chrome(service=Service(driver_path), options=opts)
    yield d
    d.quit()


def wait_for(fn, seconds=60, what="the page"):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        v = fn()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_page_streams_stops_and_remembers(srv, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    d = browser
    d.get(srv.base + "/")
    find = d.find_element
    wait_for(
        lambda: find(By.ID, "model").text == "smollm2-135m-instruct.f16.bin", what="the model name"
    )
    find(By.ID, "settings-button").click()
    for field, value in (("temperature", "0"), ("max_tokens", "1500")):
        box = find(By.ID, field)
        box.clear()
        box.send_keys(value, Keys.TAB)
    find(By.ID, "settings-close").click()
    cancelled_before = len(cancelled_counts(srv))
    find(By.ID, "input").send_keys(STORY, Keys.ENTER)
    reply = wait_for(
        lambda: d.find_elements(By.CSS_SELECTOR, ".msg.assistant .content"), what="a reply"
    )[-1]
    lengths = set()
    wait_for(
        lambda: lengths.add(len(reply.text)) or len([n for n in lengths if n > 0]) >= 3,
        what="the reply to stream in",
    )
    assert find(By.ID, "stop").is_displayed() and not find(By.ID, "send").is_displayed()
    find(By.ID, "stop").click()
    wait_for(lambda: find(By.ID, "send").is_displayed(), what="the send button after stop")
    find(By.ID, "settings-button").click()
    box = find(By.ID, "max_tokens")
    box.clear()
    box.send_keys("60", Keys.TAB)
    find(By.ID, "settings-close").click()
    srv.wait_idle(20)  # the abort reached the server: its generation stopped there
    assert len(cancelled_counts(srv)) == cancelled_before + 1
    stopped = d.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]
    assert (
        "(stopped)" in stopped.text
        and len(stopped.find_element(By.CSS_SELECTOR, ".content").text) > 10
    )
    partial = stopped.find_element(By.CSS_SELECTOR, ".content").text
    # a second turn runs to its end and shows its speed and the context used
    find(By.ID, "input").send_keys("Thanks. What is 2 + 2?", Keys.ENTER)
    stats = wait_for(
        lambda: [e for e in d.find_elements(By.CSS_SELECTOR, ".msg.assistant .stats") if e.text],
        120,
        "the reply's stats",
    )[-1].text
    assert re.search(
        r"\d+ tokens · [\d.]+ tok/s · prompt \d+ tokens \(\d+ reused\) · context \d+/2048", stats
    ), stats
    d.save_screenshot(str(tmp_path / "page.png"))
    # the conversation is still there after a reload
    d.refresh()
    wait_for(lambda: find(By.ID, "model").text.startswith("smollm2"), what="the reloaded page")
    items = d.find_elements(By.CSS_SELECTOR, "#conversations li")
    assert len(items) == 1 and items[0].text.startswith("Write a very long story")
    texts = [e.text for e in d.find_elements(By.CSS_SELECTOR, ".msg .content")]
    assert texts[0] == STORY and texts[1] == partial and texts[2] == "Thanks. What is 2 + 2?"
    # a new chat, then back to the old one from the list
    find(By.ID, "new-chat").click()
    assert not d.find_elements(By.CSS_SELECTOR, ".msg")
    d.find_elements(By.CSS_SELECTOR, "#conversations li")[0].click()
    assert len(d.find_elements(By.CSS_SELECTOR, ".msg")) == 4


def test_page_shows_model_text_as_text_and_code_as_code(srv, browser):
    from selenium.webdriver.common.by import By

    d = browser
    d.get(srv.base + "/")
    hostile = "<img src=x id=pwned onerror=\"document.title='pwned'\"><b>bold</b>"
    reply = (
        "Here:\n```python\nprint('<b>hi</b>')\n```\n"
        "and `x = 1` <script>document.title='pwned'</script>"
    )
    convo = {
        "c1": {
            "id": "c1",
            "title": hostile,
            "updated": 1,
            "messages": [
                {"role": "user", "content": hostile},
                {"role": "assistant", "content": reply},
            ],
        }
    }
    d.execute_script(
        "localStorage.setItem('pyllm.conversations', arguments[0]);"
        "localStorage.setItem('pyllm.current', 'c1');",
        json.dumps(convo),
    )
    d.refresh()
    wait_for(
        lambda: d.find_elements(By.CSS_SELECTOR, ".msg.assistant"), what="the stored conversation"
    )
    assert not d.find_elements(By.ID, "pwned") and not d.find_elements(
        By.CSS_SELECTOR, "#messages b"
    )
    assert not d.find_elements(By.CSS_SELECTOR, "#messages script") and d.title != "pwned"
    assert d.find_element(By.CSS_SELECTOR, ".msg.user .content").text == hostile
    code = d.find_element(By.CSS_SELECTOR, ".codeblock pre code")
    assert code.text == "print('<b>hi</b>')"
    assert d.find_element(By.CSS_SELECTOR, ".codeblock .bar span").text == "python"
    assert d.find_element(By.CSS_SELECTOR, "code.inline").text == "x = 1"
    assert (
        "<script>document.title='pwned'</script>"
        in d.find_element(By.CSS_SELECTOR, ".msg.assistant .content").text
    )
