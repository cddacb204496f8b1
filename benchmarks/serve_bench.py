"""pyllm serve against the terminal, alternating, in one sitting:

- decode throughput of a streamed /v1/completions vs `pyllm generate --timings` on the same
  prompt and length (target: the API at >= 95%);
- first streamed token of /v1/chat/completions vs pyllm chat's, both with nothing of the
  prompt in the KV cache (target: within 20 ms). pyllm chat's is its Chat.ask in this
  process on a warm model, the same state as the server's; `pyllm chat --timings` in a
  fresh process (its first turn pays for mapping the weights) is shown beside it.

    .venv/bin/python benchmarks/serve_bench.py [MODEL] [--rounds 5] [-n 128] [-t THREADS]

Throughput through the API is measured by the client: (tokens - 1) / (last piece - first
piece), the first token's prefill left out as `pyllm generate` leaves it out of its decode
rate; the server's own figure (its timings) is shown beside it. Each round pairs the API with
`pyllm generate` in a process of its own and with the same Model.generate in this process
(no process start, the finer alternation), each pair one after the other.
"""

import argparse
import http.client
import io
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
PROMPT = (
    "Here is a long story about a dragon who learns to read, told in many short chapters."
    "\n\nChapter 1\n\n"
)
QUESTION = "What is the capital of France?"
sys.path.insert(0, ROOT)
import pyllm  # noqa: E402
from pyllm.chat import Chat  # noqa: E402


def run_pyllm(*args):
    p = subprocess.run(
        [PY, "-m", "pyllm", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    if p.returncode:
        sys.exit(f"pyllm {' '.join(args[:1])} failed: {p.stderr.strip()}")
    return p.stderr


class Server:
    def __init__(self, model, threads):
        self.proc = subprocess.Popen(
            [PY, "-m", "pyllm", "serve", model, "--port", "0", *threads],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stderr.readline()
        m = re.search(r"on http://127\.0\.0\.1:(\d+)/ ", line)
        if not m:
            self.proc.kill()
            sys.exit(f"the server did not start: {line}{self.proc.stderr.read()}")
        self.port = int(m.group(1))
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()  # its log, unread

    def stream(self, path, body):
        """(seconds to each content piece from the request, the final usage, timings)."""
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        t0 = time.perf_counter()
        c.request(
            "POST",
            path,
            json.dumps(dict(body, stream=True, stream_options={"include_usage": True})),
            {"Content-Type": "application/json"},
        )
        r = c.getresponse()
        times, usage, timings = [], None, None
        while True:
            line = r.readline()
            if not line:
                break
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk.get("timings"):
                timings = chunk["timings"]
            for ch in chunk["choices"]:
                if ch.get("text") or (ch.get("delta") or {}).get("content"):
                    times.append(time.perf_counter() - t0)
        c.close()
        return times, usage, timings

    def close(self):
        self.proc.terminate()
        self.proc.wait(30)


def first_tokens(model, srv, pairs=3):
    """Medians of pairs of first-token times (ms), alternating: Chat.ask here, then the API,
    each with nothing of the prompt in its KV cache."""
    chat_ms, api_ms = [], []
    for _ in range(pairs):
        model.reset()
        chat = Chat(model, sampling={"temperature": 0}, max_tokens=1, out=io.StringIO())
        chat.ask(QUESTION)
        chat_ms.append(chat.last["first_token_s"] * 1000)
        srv.stream("/v1/completions", {"prompt": "Hello", "max_tokens": 1})  # now shares nothing
        messages = [{"role": "user", "content": QUESTION}]
        times, usage, _ = srv.stream(
            "/v1/chat/completions", {"messages": messages, "temperature": 0, "max_tokens": 1}
        )
        assert usage["prompt_tokens_details"]["cached_tokens"] == 0, usage
        api_ms.append(times[0] * 1000)
    return statistics.median(chat_ms), statistics.median(api_ms)


def local_rate(model, n):
    """pyllm generate's decode rate, its own code (Model.generate) run in this process."""
    model.reset()
    for _ in model.generate(PROMPT, n, temperature=0):
        pass
    return model.stats["gen_tokens"] / model.stats["decode_s"]


def api_rate(srv, n):
    """The API's decode rate as its client sees it, and the server's own figure."""
    times, usage, timings = srv.stream(
        "/v1/completions", {"prompt": PROMPT, "max_tokens": n, "temperature": 0}
    )
    return (usage["completion_tokens"] - 1) / (times[-1] - times[0]), timings[
        "predicted_per_second"
    ]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "model", nargs="?", default=os.path.join(ROOT, "weights", "smollm2-135m-instruct.f16.bin")
    )
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("-n", type=int, default=128, help="tokens to generate for the throughput runs")
    ap.add_argument("-t", "--threads", type=int, default=None)
    a = ap.parse_args()
    threads = ["-t", str(a.threads)] if a.threads else []
    srv = Server(a.model, threads)
    vs_cli, vs_local, chat_ft, api_ft, cli_ft = [], [], [], [], []
    model = pyllm.load(a.model, threads=a.threads)
    model.logits(model.tokenizer.encode("Hello there"))  # weights mapped in, as the server's are
    try:
        srv.stream("/v1/completions", {"prompt": "Hello", "max_tokens": 2})  # warm up
        for r in range(a.rounds):
            err = run_pyllm(
                "generate", a.model, PROMPT, "-n", str(a.n), "--temp", "0", "--timings", *threads
            )
            cli = float(re.search(r"generated \d+ tokens ([\d.]+) tok/s", err).group(1))
            api1, server1 = api_rate(srv, a.n)
            local = local_rate(model, a.n)
            api2, server2 = api_rate(srv, a.n)
            err = run_pyllm("chat", a.model, "-p", QUESTION, "--temp", "0", "--timings", *threads)
            ft_cli = float(re.search(r"first token (\d+) ms", err).group(1))
            ft_chat, ft_api = first_tokens(model, srv)
            vs_cli.append(api1 / cli)
            vs_local.append(api2 / local)
            chat_ft.append(ft_chat)
            api_ft.append(ft_api)
            cli_ft.append(ft_cli)
            print(
                f"round {r + 1}: tok/s generate CLI {cli:.1f}, "
                f"API {api1:.1f} (server {server1:.1f}), "
                f"generate in-process {local:.1f}, API {api2:.1f} (server {server2:.1f}) | "
                f"first token ms: chat {ft_chat:.1f}, API {ft_api:.1f}, chat CLI {ft_cli:.0f}",
                flush=True,
            )
    finally:
        srv.close()
    med = statistics.median
    diffs = [x - y for x, y in zip(api_ft, chat_ft)]
    for what, ratios in (("pyllm generate", vs_cli), ("pyllm generate's code here", vs_local)):
        print(
            f"throughput, API / {what}: median {med(ratios):.3f} "
            f"(range {min(ratios):.3f}-{max(ratios):.3f}; target >= 0.95)"
        )
    print(
        f"first token, API - pyllm chat: median {med(diffs):+.1f} ms "
        f"(range {min(diffs):+.1f} to {max(diffs):+.1f}; chat median {med(chat_ft):.0f} ms; "
        f"target <= +20 ms; the chat CLI's first turn: median {med(cli_ft):.0f} ms)"
    )


if __name__ == "__main__":
    main()
