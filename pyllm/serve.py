"""The OpenAI-compatible HTTP API and the browser chat page, over the same Model.generate.

One model, one generation at a time: requests wait in a bounded queue (a single model
thread), a client that goes away stops its generation at the next token, and the KV cache
is kept between requests so a resent conversation prefills only its new tokens.

starlette and uvicorn are imported only when a server is built, so that the other
subcommands, which import this module for its arguments, do not pay for them.
"""

import asyncio
import base64
import concurrent.futures
import hashlib
import hmac
import ipaddress
import json
import math
import os
import re
import secrets
import socket
import sys
import threading
import time

from .args import DEFAULT_MODEL, UsageError, add_model, add_sampling, model_kwargs, sampling_kwargs
from .chat import TEMPLATES, ChatError, add_template, encode_rendered, load_template
from .model import PyllmError
from .safeio import printable
from .sample import Sampler

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
PREFILL_CHUNK = 256  # tokens per forward in prefill: a disconnect is noticed between chunks
SEND_TIMEOUT_S = 30  # a client that reads nothing for this long is dropped
HEARTBEAT_S = 10  # a stream waiting this long for the model gets an SSE comment line
PUBLIC_PATHS = ("/", "/health")  # everything else needs the API key when one is set
SAMPLER_ARGS = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n", "seed")
ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
}


class Limits:
    """What one request may ask for; beyond it the answer is 400, 408 or 413."""

    body_bytes = 2 << 20
    messages = 512
    message_chars = 256 << 10
    stop_strings = 16
    stop_chars = 256
    read_s = 30.0  # headers and body must arrive within this
    request_s = 600.0  # a generation stops (finish_reason "length") after this


class ApiError(Exception):
    """An error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self, status, message, type="invalid_request_error", code=None, param=None, **extra
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = (
            status,
            message,
            type,
            code,
            param,
        )
        self.extra = extra

    def body(self):
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
                **self.extra,
            }
        }

    def response(self, headers=None):
        return json_response(self.body(), self.status, headers)


def _bad(message, param=None, code=None):
    return ApiError(400, message, param=param, code=code)


# --- request fields ---
def _number(body, name, lo=None, hi=None):
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _bad(f"'{name}' must be a number", name)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise _bad(f"'{name}' is {v}; it must be within [{lo}, {hi}]", name)
    return float(v)


def _integer(body, name, lo=None, hi=None):
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(f"'{name}' must be an integer", name)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise _bad(f"'{name}' is {v}; it must be within [{lo}, {hi}]", name)
    return v


def _flag(body, name, default=False):
    v = body.get(name, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _bad(f"'{name}' must be true or false", name)
    return v


def parse_options(body, defaults, limits):
    """Sampling, length, stop strings and streaming from a request; defaults are the
    server's (its command line), in Model.generate's names."""
    sampling = dict(defaults["sampling"])
    for name, key, lo, hi in (
        ("temperature", "temperature", 0, None),
        ("top_p", "top_p", 0, 1),
        ("min_p", "min_p", 0, 1),
        ("repeat_penalty", "repeat_penalty", 0, None),
    ):
        v = _number(body, name, lo, hi)
        if v is not None:
            sampling[key] = v
    for name in ("top_k", "repeat_last_n"):
        v = _integer(body, name, -1)
        if v is not None:
            sampling[name] = v
    seed = _integer(body, "seed")
    if seed is not None:  # any integer, as OpenAI's; -1 is llama-server's "random"
        sampling["seed"] = None if seed == -1 else seed & (2**64 - 1)
    try:  # the sampler's own checks (top_p = 0, repeat_penalty = 0 ...), as in pyllm generate
        Sampler(**{k: v for k, v in sampling.items() if k in SAMPLER_ARGS})
    except ValueError as e:
        raise _bad(str(e).replace("--temp 0", "temperature 0")) from None
    max_tokens = defaults["max_tokens"]
    for name in ("max_tokens", "max_completion_tokens", "n_predict"):
        v = _integer(body, name, -1)
        if v is not None:
            max_tokens = v
            break
    n = _integer(body, "n")
    if n not in (None, 1):
        raise _bad("only n=1 is supported", "n")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise _bad("'stop' must be a string or a list of strings", "stop")
    if len(stop) > limits.stop_strings or any(len(s) > limits.stop_chars for s in stop):
        raise _bad(
            f"at most {limits.stop_strings} stop strings of at most {limits.stop_chars} characters",
            "stop",
        )
    stream = _flag(body, "stream")
    so = body.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise _bad("'stream_options' must be an object", "stream_options")
    include_usage = _flag(so or {}, "include_usage")
    return {
        "sampling": sampling,
        "max_tokens": max_tokens,
        "stop": [s for s in stop if s],
        "stream": stream,
        "include_usage": include_usage,
    }


def parse_messages(body, limits):
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("'messages' must be a non-empty list", "messages")
    if len(msgs) > limits.messages:
        raise _bad(f"{len(msgs)} messages; at most {limits.messages} are accepted", "messages")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(f"{where} must be an object", where)
        role = m.get("role")
        if role not in ROLES:
            raise _bad(f"{where}.role must be one of {', '.join(ROLES)}", f"{where}.role")
        content = m.get("content")
        if content is None:
            content = ""
        elif isinstance(content, list):  # content parts: text only
            texts = []
            for part in content:
                if not (
                    isinstance(part, dict)
                    and part.get("type") == "text"
                    and isinstance(part.get("text"), str)
                ):
                    raise _bad(
                        f'{where}.content: only text parts ({{"type": "text", "text": ...}}) '
                        "are supported",
                        f"{where}.content",
                    )
                texts.append(part["text"])
            content = "".join(texts)
        elif not isinstance(content, str):
            raise _bad(
                f"{where}.content must be a string or a list of text parts", f"{where}.content"
            )
        if len(content) > limits.message_chars:
            raise _bad(
                f"{where} is {len(content)} characters; "
                f"at most {limits.message_chars} are accepted",
                f"{where}.content",
            )
        out.append({"role": ROLES[role], "content": content})
    return out


class StopText:
    """Cuts generated text where the first stop string to be completed starts (the longest,
    if several complete at once), as generation would stop there, however the text is split
    into pieces: the tail that could begin a stop string is held back until the next piece
    decides."""

    def __init__(self, stops):
        self.stops = [s for s in stops if s]
        self.held = ""
        self.hit = False

    def push(self, piece):
        if not self.stops:
            return piece
        text = self.held + piece
        found = [
            (i + len(s), -len(s)) for s, i in ((s, text.find(s)) for s in self.stops) if i >= 0
        ]
        if found:
            end, minus_len = min(found)
            self.hit, self.held = True, ""
            return text[: end + minus_len]
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), keep, -1):
                if text.endswith(s[:k]):
                    keep = k
                    break
        self.held = text[len(text) - keep :]
        return text[: len(text) - keep]

    def flush(self):
        out, self.held = self.held, ""
        return out


# --- the model thread ---
class Job:
    """One generation request; its events go from the model thread to the request's loop."""

    def __init__(self, ids, options, deadline):
        self.ids, self.options, self.deadline = ids, options, deadline
        self.loop = asyncio.get_running_loop()
        self.events = asyncio.Queue()
        self.stop = threading.Event()
        self.future = None

    def emit(self, *event):  # model thread
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening
            self.stop.set()

    def cancel(self):  # loop thread
        self.stop.set()
        if self.future is not None:
            self.future.cancel()  # takes it off the queue if it has not started

    def abandon(self):
        self.cancel()
        self.events.put_nowait(("gone",))

    async def stream(self, heartbeat=None):
        """The job's events up to its last; with heartbeat, ("ping",) after that many
        seconds without one (while it waits in the queue, say)."""
        while True:
            try:
                event = await (
                    _within(heartbeat, self.events.get()) if heartbeat else self.events.get()
                )
            except asyncio.TimeoutError:
                yield ("ping",)
                continue
            yield event
            if event[0] not in ("text", "ping"):
                return


class Engine:
    """Owns the model: one generation at a time on one thread, at most queue_size waiting."""

    def __init__(self, model, queue_size=8, generate_options=None, log=None):
        self.model = model
        self.queue_size = queue_size
        self.generate_options = dict(
            generate_options or {}
        )  # extra Model.generate kwargs, e.g. drafting
        self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pyllm-model")
        self.pending = 0  # admitted and not finished, the running one included (loop thread)
        self.jobs = set()  # the same jobs, to stop them all at shutdown
        self.running = None  # the Job on the model thread
        self.log = log or (lambda line: None)

    def submit(self, job):
        if self.pending > self.queue_size:
            raise ApiError(
                503,
                f"the server is busy: {self.pending} requests are ahead; try again shortly",
                type="server_error",
                code="queue_full",
            )
        self.pending += 1
        self.jobs.add(job)
        job.future = self.executor.submit(self._run, job)
        job.future.add_done_callback(
            lambda _: self._call_in_loop(job.loop, lambda: self._finished(job))
        )
        return job

    @staticmethod
    def _call_in_loop(loop, fn):
        try:
            loop.call_soon_threadsafe(fn)
        except RuntimeError:
            pass

    def _finished(self, job):
        self.pending -= 1
        self.jobs.discard(job)

    def stop_all(self):
        """Ends every request: their generations stop, their streams close (loop thread)."""
        for job in list(self.jobs):
            job.cancel()
            job.events.put_nowait(
                (
                    "error",
                    ApiError(
                        503,
                        "the server is shutting down",
                        type="server_error",
                        code="shutting_down",
                    ),
                )
            )

    def _run(self, job):
        if job.stop.is_set():
            return
        self.running = job
        try:
            s = self._generate(job)
            job.emit("done", s)
            rate = s["completion_tokens"] / s["predicted_s"] if s["predicted_s"] else 0.0
            self.log(
                f"{len(job.ids)} prompt tokens ({s['cached_tokens']} reused), "
                f"{s['completion_tokens']} generated at {rate:.1f} tok/s, {s['finish_reason']}"
            )
        except PyllmError as e:
            job.emit("error", ApiError(500, str(e), type="server_error"))
        except Exception as e:  # a bug: the request fails, the server goes on
            self.log(f"internal error: {type(e).__name__}: {e}")
            job.emit(
                "error", ApiError(500, f"internal error: {type(e).__name__}", type="server_error")
            )
        finally:
            self.running = None

    def _generate(self, job):
        m, ids, opt = self.model, job.ids, job.options
        t0 = time.perf_counter()
        kept = m.keep_prefix(ids)
        finish = None
        # all but the last chunk here, a stop checked between chunks; the last one (with the
        # prompt's last token, at most PREFILL_CHUNK) in generate's own prefill, so a short
        # prompt takes one forward as in pyllm chat, not two
        for i in range(kept, len(ids) - PREFILL_CHUNK, PREFILL_CHUNK):
            if job.stop.is_set() or time.monotonic() > job.deadline:
                finish = "cancelled" if job.stop.is_set() else "length"
                break
            m.eval(ids[i : i + PREFILL_CHUNK])
        prefill_s = time.perf_counter() - t0
        stats = {}
        if finish is None:
            max_tokens = opt["max_tokens"] if opt["max_tokens"] >= 0 else m.n_ctx
            gen = m.generate(ids, max_tokens=max_tokens, **opt["sampling"], **self.generate_options)
            stop = StopText(opt["stop"])
            try:
                for piece in gen:
                    text = stop.push(piece)
                    if text:
                        job.emit("text", text)
                    if stop.hit:
                        finish = "stop"
                        break
                    if job.stop.is_set():
                        finish = "cancelled"
                        break
                    if time.monotonic() > job.deadline:
                        finish = "length"
                        break
            finally:
                gen.close()
                stats = dict(m.stats)
            if finish is None:
                tail = stop.flush()
                if tail:
                    job.emit("text", tail)
                finish = "stop" if stats.get("stop") == "eos" else "length"
        return {
            "finish_reason": finish,
            "prompt_tokens": len(ids),
            "cached_tokens": kept,
            "completion_tokens": stats.get("gen_tokens", 0),
            "prompt_s": prefill_s + stats.get("prefill_s", 0.0),
            "predicted_s": stats.get("decode_s", 0.0),
        }

    def close(self):
        job = self.running
        if job is not None:
            job.stop.set()
        self.executor.shutdown(wait=True, cancel_futures=True)


def usage(r):
    return {
        "prompt_tokens": r["prompt_tokens"],
        "completion_tokens": r["completion_tokens"],
        "total_tokens": r["prompt_tokens"] + r["completion_tokens"],
        "prompt_tokens_details": {"cached_tokens": r["cached_tokens"]},
    }


def timings(r):
    """llama-server's timings object: what was prefilled, what was reused, how fast."""
    pn, gn = r["prompt_tokens"] - r["cached_tokens"], r["completion_tokens"]
    pms, gms = r["prompt_s"] * 1000, r["predicted_s"] * 1000
    return {
        "cache_n": r["cached_tokens"],
        "prompt_n": pn,
        "prompt_ms": round(pms, 3),
        "prompt_per_second": round(pn / r["prompt_s"], 2) if r["prompt_s"] else 0.0,
        "predicted_n": gn,
        "predicted_ms": round(gms, 3),
        "predicted_per_second": round(gn / r["predicted_s"], 2) if r["predicted_s"] else 0.0,
    }


SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # the only way JSON can spell one


def _valid_unicode(v):
    """No string in v holds a lone surrogate (which JSON's \\u escapes can write)."""
    if isinstance(v, str):
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(v, dict):
        return all(_valid_unicode(k) and _valid_unicode(x) for k, x in v.items())
    if isinstance(v, list):
        return all(_valid_unicode(x) for x in v)
    return True


def _no_constant(name):
    raise ValueError(f"{name} is not JSON")


# --- responses ---
def _json_bytes(obj):
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def json_response(obj, status=200, headers=None):
    from starlette.responses import Response

    return Response(_json_bytes(obj), status, headers, "application/json")


async def _in_thread(fn, *args):
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


async def _within(seconds, coro):
    """await coro, or asyncio.TimeoutError after seconds (asyncio.timeout, where there is
    one, costs no task per call: this runs once per streamed token)."""
    if hasattr(asyncio, "timeout"):
        async with asyncio.timeout(seconds):
            return await coro
    return await asyncio.wait_for(coro, seconds)


async def _until_disconnect(receive):
    while (await receive())["type"] != "http.disconnect":
        pass


async def _watch(receive, job):
    await _until_disconnect(receive)
    job.abandon()


class EventStream:
    """Server-sent events from a Job; a client that disconnects, or reads nothing for
    SEND_TIMEOUT_S, cancels the job at once (even while it waits in the queue)."""

    def __init__(self, job, chunks):
        self.job, self.chunks = job, chunks
        self.headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
        ]

    async def __call__(self, scope, receive, send):
        watcher = asyncio.ensure_future(_watch(receive, self.job))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.headers})
            async for data in self.chunks:
                await _within(
                    SEND_TIMEOUT_S,
                    send({"type": "http.response.body", "body": data, "more_body": True}),
                )
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except (asyncio.TimeoutError, OSError):
            pass
        finally:
            watcher.cancel()
            self.job.cancel()


def _sse(obj):
    return b"data: " + (obj if isinstance(obj, bytes) else _json_bytes(obj)) + b"\n\n"


class Server:
    """The HTTP side: requests parsed and checked, jobs given to the Engine, answers shaped."""

    def __init__(
        self,
        model,
        template=None,
        sampling=None,
        max_tokens=-1,
        queue_size=8,
        limits=None,
        generate_options=None,
        log=None,
    ):
        self.model = model
        self.model_id = os.path.basename(model.path)
        self.created = int(os.path.getmtime(model.path))
        self.limits = limits or Limits()
        self.log = log or (
            lambda line: print(f"pyllm serve: {printable(line)}", file=sys.stderr, flush=True)
        )
        self.template, self.template_error, self.template_source = None, None, None
        try:
            self.template = load_template(model, template)
            self.template_source = TEMPLATES[template] if template else model.chat_template
        except ChatError as e:  # completions still work; chat requests get this message
            self.template_error = str(e)
        self.defaults = {"sampling": dict(sampling or {}), "max_tokens": max_tokens}
        self.engine = Engine(model, queue_size, generate_options, self.log)
        self.page, self.page_csp = _load_page()

    # --- endpoints ---
    async def index(self, request):
        from starlette.responses import Response

        return Response(
            self.page,
            media_type="text/html; charset=utf-8",
            headers={
                "Content-Security-Policy": self.page_csp,
                "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer",
                "X-Frame-Options": "DENY",
                "Cache-Control": "no-cache",
            },
        )

    async def health(self, request):
        e = self.engine
        busy = e.running is not None
        return json_response(
            {
                "status": "ok",
                "slots_idle": 0 if busy else 1,
                "slots_processing": int(busy),
                "queued": max(0, e.pending - int(busy)),
            }
        )

    def _model_card(self):
        return {
            "id": self.model_id,
            "object": "model",
            "created": self.created,
            "owned_by": "pyllm",
        }

    async def models(self, request):
        return json_response({"object": "list", "data": [self._model_card()]})

    async def retrieve_model(self, request):
        if request.path_params["model_id"] != self.model_id:
            raise ApiError(
                404,
                f"the model '{request.path_params['model_id']}' does not exist",
                code="model_not_found",
                param="model",
            )
        return json_response(self._model_card())

    async def props(self, request):
        m = self.model
        return json_response(
            {
                "model": self.model_id,
                "model_path": self.model_id,
                "n_ctx": m.n_ctx,
                "total_slots": 1,
                "default_generation_settings": {
                    "n_ctx": m.n_ctx,
                    "params": {
                        **self.defaults["sampling"],
                        "max_tokens": self.defaults["max_tokens"],
                    },
                },
                "chat_template": self.template_source,
                "n_threads": m.threads,
                "vocab_size": m.vocab_size,
                "queue_size": self.engine.queue_size,
                "limits": {
                    k: getattr(self.limits, k)
                    for k in ("body_bytes", "messages", "message_chars", "request_s")
                },
            }
        )

    async def tokenize(self, request):
        body = await self._body(request)
        content = body.get("content")
        if not isinstance(content, str):
            raise _bad("'content' must be a string", "content")
        if len(content) > self.limits.message_chars:
            raise _bad(
                f"'content' is {len(content)} characters; at most {self.limits.message_chars}"
            )
        add_special = _flag(body, "add_special")
        pieces = _flag(body, "with_pieces")
        tok = self.model.tokenizer
        ids = await _in_thread(tok.encode, content, add_special)
        if pieces:
            return json_response({"tokens": [{"id": i, "piece": tok.decode([i])} for i in ids]})
        return json_response({"tokens": ids})

    async def detokenize(self, request):
        body = await self._body(request)
        ids = body.get("tokens")
        n = self.model.vocab_size
        if not (
            isinstance(ids, list)
            and all(isinstance(i, int) and not isinstance(i, bool) for i in ids)
        ):
            raise _bad("'tokens' must be a list of integers", "tokens")
        bad = [i for i in ids if not 0 <= i < n]
        if bad:
            raise _bad(f"token id {bad[0]} is outside the vocabulary (0..{n - 1})", "tokens")
        return json_response({"content": self.model.tokenizer.decode(ids)})

    async def chat_completions(self, request):
        body = await self._body(request)
        messages = parse_messages(body, self.limits)
        opt = parse_options(body, self.defaults, self.limits)
        if self.template is None:
            raise _bad(f"{self.template_error} (start the server with --template NAME)")
        # rendered on the loop's thread: under `pyllm serve` the main one, where the template's
        # time bound (an alarm signal) works; the tokenizer runs off the loop
        try:
            text = self.template.render(messages)
            ids = await _in_thread(encode_rendered, self.model, self.template, text)
        except ChatError as e:
            raise _bad(str(e), "messages") from None
        return await self._answer(request, ids, opt, chat=True)

    async def completions(self, request):
        body = await self._body(request)
        opt = parse_options(body, self.defaults, self.limits)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        tok = self.model.tokenizer
        if isinstance(prompt, str):
            if len(prompt) > self.limits.message_chars:
                raise _bad(
                    f"the prompt is {len(prompt)} characters; at most {self.limits.message_chars} "
                    "are accepted",
                    "prompt",
                )
            ids = await _in_thread(tok.encode, prompt)
        elif isinstance(prompt, list) and all(
            isinstance(i, int) and not isinstance(i, bool) for i in prompt
        ):
            ids = prompt
            bad = [i for i in ids if not 0 <= i < self.model.vocab_size]
            if bad:
                raise _bad(
                    f"token id {bad[0]} is outside the vocabulary (0..{self.model.vocab_size - 1})",
                    "prompt",
                )
        else:
            raise _bad(
                "'prompt' must be a string or a list of token ids (one prompt per request)",
                "prompt",
            )
        if not ids:
            raise _bad("the prompt is empty", "prompt")
        return await self._answer(request, ids, opt, chat=False)

    # --- shared ---
    async def _body(self, request):
        """The request's JSON object, read within the size and time limits."""
        lim = self.limits
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > lim.body_bytes):
            raise ApiError(
                413, f"the request body is over {lim.body_bytes} bytes", code="body_too_large"
            )

        async def read():
            data = bytearray()
            async for chunk in request.stream():
                data += chunk
                if len(data) > lim.body_bytes:
                    raise ApiError(
                        413,
                        f"the request body is over {lim.body_bytes} bytes",
                        code="body_too_large",
                    )
            return bytes(data)

        try:
            data = await asyncio.wait_for(read(), lim.read_s)
        except asyncio.TimeoutError:
            raise ApiError(
                408,
                f"the request body did not arrive within {lim.read_s:g} s",
                code="request_timeout",
            ) from None
        try:
            body = json.loads(data, parse_constant=_no_constant)
        except (ValueError, RecursionError) as e:
            raise _bad(f"the request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise _bad("the request body must be a JSON object", code="invalid_json")
        if SURROGATE_ESCAPE.search(data) and not _valid_unicode(body):
            raise _bad(
                "the request body holds a lone surrogate (\\ud800-\\udfff): not text",
                code="invalid_json",
            )
        return body

    async def _answer(self, request, ids, opt, chat):
        n_ctx = self.model.n_ctx
        if len(ids) >= n_ctx:
            what = "messages" if chat else "prompt"
            raise ApiError(
                400,
                f"the {what} take {len(ids)} tokens; the context holds {n_ctx} (and needs "
                "room for at least one token of reply)",
                code="context_length_exceeded",
                param=what,
                n_prompt_tokens=len(ids),
                n_ctx=n_ctx,
            )
        job = self.engine.submit(Job(ids, opt, time.monotonic() + self.limits.request_s))
        kind = "chatcmpl" if chat else "cmpl"
        head = {
            "id": f"{kind}-{secrets.token_hex(12)}",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": self.model_id,
            "system_fingerprint": "pyllm",
        }
        if opt["stream"]:
            return EventStream(job, self._chunks(job, head, chat, opt["include_usage"]))
        watcher = asyncio.ensure_future(_watch(request.receive, job))
        try:
            parts = []
            async for event in job.stream():
                if event[0] == "text":
                    parts.append(event[1])
                elif event[0] == "error":
                    raise event[1]
                elif event[0] == "gone":
                    return json_response({}, 499)  # nobody will read it
                else:
                    r = event[1]
        finally:
            watcher.cancel()
            job.cancel()
        text = "".join(parts)
        choice = (
            {"index": 0, "message": {"role": "assistant", "content": text}}
            if chat
            else {"index": 0, "text": text}
        )
        choice.update(logprobs=None, finish_reason=r["finish_reason"])
        return json_response(
            {**head, "choices": [choice], "usage": usage(r), "timings": timings(r)}
        )

    async def _chunks(self, job, head, chat, include_usage):
        head = dict(head, object="chat.completion.chunk" if chat else "text_completion")
        if include_usage:
            head["usage"] = None

        def chunk(text, finish=None, role=False):
            if chat:
                delta = {} if text is None else {"content": text}
                if role:
                    delta["role"] = "assistant"
                c = {"index": 0, "delta": delta}
            else:
                c = {"index": 0, "text": text or ""}
            c.update(logprobs=None, finish_reason=finish)
            return {**head, "choices": [c]}

        if chat:
            yield _sse(chunk("", role=True))
        async for event in job.stream(HEARTBEAT_S):
            if event[0] == "text":
                yield _sse(chunk(event[1]))
            elif event[0] == "ping":  # an SSE comment: keeps proxies and idle timeouts at bay
                yield b": waiting for the model\n\n"
            elif event[0] == "done":
                r = event[1]
                yield _sse(dict(chunk(None, r["finish_reason"]), timings=timings(r)))
                if include_usage:
                    yield _sse(dict(head, choices=[], usage=usage(r)))
                yield _sse(b"[DONE]")
            elif event[0] == "error":
                yield _sse(event[1].body())


def _load_page():
    """The chat page, and a Content-Security-Policy that allows its own inline script and
    style (by hash) and nothing else: no other origin, no eval, no inline handlers."""
    with open(os.path.join(STATIC, "index.html"), encoding="utf-8") as f:
        page = f.read()

    def hashes(tag):
        return " ".join(
            f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'"
            for s in re.findall(rf"<{tag}>(.*?)</{tag}>", page, re.S)
        )

    csp = (
        f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
        "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )
    return page.encode("utf-8"), csp


# --- the guard: Host, Origin, API key ---
def _host_name(value):
    """The host part of a Host header or an origin's netloc, lowercased, without the port."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        return value[1:end] if end > 0 else None
    name, _, port = value.rpartition(":") if value.count(":") == 1 else (value, "", "")
    if port and not port.isdigit():
        return None
    return name or None


def _is_ip(name):
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def is_loopback(host):
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Guard:
    """Refuses, before anything else runs: a Host header that is not the bound address or
    localhost (DNS rebinding), a browser Origin that is neither the page's own nor one of
    --cors-origin (another site's page), and a missing or wrong API key."""

    def __init__(self, app, bind_host, api_key=None, cors_origins=(), allowed_hosts=()):
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.cors = {o.rstrip("/").lower() for o in cors_origins}
        bind = bind_host.strip("[]").lower()
        self.hosts = {"localhost", "127.0.0.1", "::1", bind} | {h.lower() for h in allowed_hosts}
        self.any_ip = bind in ("0.0.0.0", "::", "")
        if self.any_ip:
            # every address of the machine: any IP literal (rebinding needs a name), and its name
            name = socket.gethostname().lower()
            self.hosts |= {name, name + ".local"}

    def host_ok(self, name):
        return name is not None and (name in self.hosts or (self.any_ip and _is_ip(name)))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "")
        if not self.host_ok(_host_name(host)):
            return await _send_error(
                send,
                ApiError(
                    400,
                    "the Host header names neither this server nor localhost",
                    code="invalid_host",
                ),
            )
        origin = headers.get("origin")
        cross = None
        if origin is not None:
            o = origin.rstrip("/").lower()
            scheme, _, netloc = o.partition("://")
            if not (scheme in ("http", "https") and netloc == host.lower()):  # not the page's own
                if o not in self.cors and "*" not in self.cors:
                    return await _send_error(
                        send,
                        ApiError(
                            403,
                            f"requests from the origin {origin!r} are not allowed "
                            "(see --cors-origin)",
                            code="origin_not_allowed",
                        ),
                    )
                cross = origin
        preflight = scope["method"] == "OPTIONS" and "access-control-request-method" in headers
        if self.api_key and not preflight and scope["path"] not in PUBLIC_PATHS:
            auth = headers.get("authorization", "")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode("latin-1"),
                self.api_key,  # the header's bytes
            ):
                extra = [(b"www-authenticate", b"Bearer")]
                if cross:
                    extra += [
                        (b"access-control-allow-origin", cross.encode("latin-1")),
                        (b"vary", b"Origin"),
                    ]
                return await _send_error(
                    send,
                    ApiError(
                        401,
                        "invalid or missing API key (Authorization: Bearer KEY)",
                        code="invalid_api_key",
                    ),
                    extra,
                )
        return await self.app(scope, receive, send)


async def _send_error(send, err, headers=()):
    body = _json_bytes(err.body())
    await send(
        {
            "type": "http.response.start",
            "status": err.status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _api_error(request, exc):
    return exc.response()


async def _http_error(request, exc):
    msg = {
        404: f"no such endpoint: {request.method} {request.url.path}",
        405: f"{request.method} is not allowed on {request.url.path}",
    }.get(exc.status_code, str(exc.detail))
    return ApiError(exc.status_code, msg).response(getattr(exc, "headers", None))


async def _internal_error(request, exc):
    print(
        f"pyllm serve: internal error: {type(exc).__name__}: {printable(exc)}",
        file=sys.stderr,
        flush=True,
    )
    return ApiError(500, f"internal error: {type(exc).__name__}", type="server_error").response()


def build_app(server, bind_host="127.0.0.1", api_key=None, cors_origins=(), allowed_hosts=()):
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware.cors import CORSMiddleware
    from starlette.routing import Route

    s = server
    routes = [
        Route("/", s.index),
        Route("/health", s.health),
        Route("/props", s.props),
        Route("/tokenize", s.tokenize, methods=["POST"]),
        Route("/detokenize", s.detokenize, methods=["POST"]),
    ]
    for prefix in ("/v1", ""):  # some clients are given the base URL without /v1
        routes += [
            Route(f"{prefix}/models", s.models),
            Route(f"{prefix}/models/{{model_id:path}}", s.retrieve_model),
            Route(f"{prefix}/chat/completions", s.chat_completions, methods=["POST"]),
            Route(f"{prefix}/completions", s.completions, methods=["POST"]),
        ]
    app = Starlette(
        routes=routes,
        exception_handlers={
            ApiError: _api_error,
            HTTPException: _http_error,
            Exception: _internal_error,
        },
    )
    if cors_origins:
        app = CORSMiddleware(
            app,
            allow_origins=list(cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
            max_age=600,
        )
    return Guard(app, bind_host, api_key, cors_origins, allowed_hosts)


def _protocol(read_s):
    """uvicorn's h11 protocol with a deadline for a request's headers: a connection that
    opens and then sends nothing (or a byte a minute) is closed after read_s."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm(None)

        def on_response_complete(self):
            done = self.scope
            super().on_response_complete()
            self._arm(done)

        def _arm(self, scope):
            self.loop.call_later(read_s, self._expire, scope)

        def _expire(self, scope):
            if self.scope is scope and not self.transport.is_closing():  # no request began since
                self.transport.close()

    return Protocol


def add_arguments(p):
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"default {DEFAULT_MODEL}")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1; 0.0.0.0 opens it to the network)",
    )
    p.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 picks a free one)")
    p.add_argument(
        "--api-key",
        default=os.environ.get("PYLLM_API_KEY"),
        help="require 'Authorization: Bearer KEY' (default $PYLLM_API_KEY; none: any token)",
    )
    p.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="let pages from ORIGIN (e.g. http://localhost:3000) call the API; repeatable",
    )
    p.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="also accept this Host header (a name the server is reached by); repeatable",
    )
    p.add_argument(
        "--queue", type=int, default=8, help="requests that may wait for the model (default 8)"
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=Limits.request_s,
        help=f"seconds one request may generate (default {Limits.request_s:g})",
    )
    p.add_argument(
        "--read-timeout",
        type=float,
        default=Limits.read_s,
        help=f"seconds a client has to send its request (default {Limits.read_s:g})",
    )
    add_template(p)
    add_model(p)
    add_sampling(
        p,
        n_predict=-1,
        n_predict_help="most tokens per reply when a request does not say "
        "(default -1: until it ends or fills the context)",
    )


def _listen(host, port):
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise OSError(f"cannot listen on {host}: {e.strerror}") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.set_inheritable(True)
    return sock


def main(a):
    import uvicorn

    from .model import load

    if not 0 <= a.port <= 65535:
        raise UsageError(f"--port {a.port} is outside 0..65535")
    if a.queue < 0:
        raise UsageError(f"--queue {a.queue} is negative")
    for name, v in (("--timeout", a.timeout), ("--read-timeout", a.read_timeout)):
        if not v > 0:
            raise UsageError(f"{name} {v} must be positive")
    if not os.path.exists(a.model):
        raise UsageError(f"{a.model}: no such file (make weights converts the default model)")
    for o in a.cors_origin:
        if o != "*" and not re.fullmatch(r"https?://[^/\s]+", o.rstrip("/")):
            raise UsageError(f"--cors-origin {o!r} is not an origin such as http://localhost:3000")
    sampling = sampling_kwargs(a)
    try:
        Sampler(**{k: v for k, v in sampling.items() if k in SAMPLER_ARGS})
    except ValueError as e:
        raise UsageError(str(e)) from None
    m = load(a.model, **model_kwargs(a))
    limits = Limits()
    limits.request_s, limits.read_s = a.timeout, a.read_timeout
    server = Server(m, a.template, sampling, a.n_predict, a.queue, limits)
    if server.template_error:
        print(
            f"pyllm serve: warning: {printable(server.template_error)}; "
            "/v1/chat/completions will refuse requests",
            file=sys.stderr,
        )
    sock = _listen(a.host, a.port)
    host, port = sock.getsockname()[:2]
    if not is_loopback(a.host):
        print(
            f"pyllm serve: warning: listening on {a.host}, reachable from other machines"
            + ("" if a.api_key else "; anyone who can reach it can use it (set --api-key)"),
            file=sys.stderr,
        )
    shown = f"[{host}]" if ":" in host else host
    if a.host in ("0.0.0.0", "::"):
        shown = "localhost"
    app = build_app(server, a.host, a.api_key, a.cors_origin, a.allowed_host)
    print(
        f"pyllm serve: {printable(server.model_id)} ({m.n_ctx} tokens of context, "
        f"{m.threads} threads) on "
        f"http://{shown}:{port}/ (chat page) and http://{shown}:{port}/v1 (API)",
        file=sys.stderr,
        flush=True,
    )
    config = uvicorn.Config(
        app,
        http=_protocol(limits.read_s),
        log_level="warning",
        access_log=False,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=3,
        limit_concurrency=64 + a.queue,
    )

    class Uvicorn(uvicorn.Server):
        async def shutdown(self, sockets=None):
            server.engine.stop_all()  # else open streams would hold the shutdown up
            await super().shutdown(sockets)

    try:
        Uvicorn(config).run(sockets=[sock])
    except KeyboardInterrupt:  # Ctrl-C is how a server is stopped: not an error
        pass
    finally:
        server.engine.close()
        m.close()
    return 0
