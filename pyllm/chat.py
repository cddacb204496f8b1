"""Chat: sandboxed template rendering, the REPL, history, slash commands."""
import json
import os
import signal
import sys
import time
from datetime import datetime

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .args import DEFAULT_MODEL, UsageError, add_model, add_sampling, sampling_kwargs, text_arg

# Templates for files that carry none (--template NAME), in each family's own format.
TEMPLATES = {
    "chatml": ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
               "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
    "llama2": ("{% if messages and messages[0].role == 'system' %}"
               "{% set sys = messages[0].content %}"
               "{% set messages = messages[1:] %}{% endif %}{% for m in messages %}"
               "{% if m.role == 'user' %}{{ bos_token }}[INST] "
               "{% if loop.first and sys %}<<SYS>>\n{{ sys }}\n<</SYS>>\n\n"
               "{% endif %}{{ m.content | trim }} [/INST]"
               "{% else %} {{ m.content | trim }} {{ eos_token }}{% endif %}"
               "{% endfor %}"),
    "llama3": ("{{ bos_token }}{% for m in messages %}"
               "<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
               "{{ m.content | trim }}<|eot_id|>{% endfor %}"
               "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
               "{% endif %}"),
    "zephyr": ("{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}{{ eos_token }}\n"
               "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"),
    "gemma": ("{{ bos_token }}{% set sys = '' %}{% if messages and messages[0].role == 'system' %}"
              "{% set sys = messages[0].content + '\\n\\n' %}{% set messages = messages[1:] %}"
              "{% endif %}{% for m in messages %}"
              "<start_of_turn>{{ 'model' if m.role == 'assistant' else 'user' }}\n"
              "{{ (sys if loop.first else '') + (m.content | trim) }}<end_of_turn>\n{% endfor %}"
              "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"),
}
MAX_TEMPLATE_OUTPUT = 1 << 20  # characters
TEMPLATE_SECONDS = 2
HELP = """commands:
  /reset          start a new conversation (keeps the system prompt)
  /system TEXT    set the system prompt and start a new conversation
  /save FILE      save the conversation as JSON
  /load FILE      load a conversation saved with /save
  /stats          tokens in context and the last reply's speed
  /help           this text
  /exit           quit (also Ctrl-D; Ctrl-C stops a reply)
A line ending in \\ continues on the next line."""


class ChatError(Exception):
    pass


class Template:
    """A chat template from a weights file: untrusted, so sandboxed, bounded in time and size."""

    def __init__(self, source, bos_token="", eos_token=""):
        def raise_exception(msg):
            raise TemplateError(msg)
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals.update(raise_exception=raise_exception,
                           strftime_now=lambda fmt: datetime.now().strftime(fmt))
        env.filters["tojson"] = lambda v, indent=None: json.dumps(v, ensure_ascii=False, indent=indent)
        try:
            self.t = env.from_string(source)
        except TemplateError as e:
            raise ChatError(f"chat template rejected: {e}") from None
        self.bos, self.eos = bos_token, eos_token

    def render(self, messages, add_generation_prompt=True):
        def timeout(*_):
            raise TimeoutError
        try:  # SIGALRM bounds the time (Unix, main thread); the size is bounded below
            old = signal.signal(signal.SIGALRM, timeout)
        except (AttributeError, ValueError):
            old = None
        if old is not None:
            signal.alarm(TEMPLATE_SECONDS)
        out, n = [], 0
        try:
            for chunk in self.t.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos, eos_token=self.eos):
                n += len(chunk)
                if n > MAX_TEMPLATE_OUTPUT:
                    raise ChatError("chat template rejected: its output exceeds 1 MiB")
                out.append(chunk)
        except TimeoutError:
            raise ChatError(f"chat template rejected: rendering took over {TEMPLATE_SECONDS} s") from None
        except ChatError:
            raise
        except Exception as e:  # SecurityError, TemplateError, errors inside the template's own code
            raise ChatError(f"chat template rejected: {type(e).__name__}: {e}") from None
        finally:
            if old is not None:
                signal.alarm(0)
                signal.signal(signal.SIGALRM, old)
        return "".join(out)


class Chat:
    """A conversation over a Model: messages in, streamed reply out; the KV cache is reused
    across turns (only new tokens are prefilled)."""

    def __init__(self, model, template=None, system=None, sampling=None, max_tokens=-1, out=None):
        self.m = model
        tok = model.tokenizer
        names = model.meta["tokenizer"]["tokens"]
        bos = names[tok.bos_id] if tok.bos_id is not None else ""
        eos = names[tok.eos_id] if tok.eos_id is not None else ""
        source = TEMPLATES[template] if template else model.chat_template
        if not source:
            raise ChatError("this file has no chat template: choose one with --template "
                            + "|".join(TEMPLATES))
        self.template = Template(source, bos, eos)
        self.system = system
        self.sampling = sampling or {}
        self.max_tokens = max_tokens
        self.out = out or sys.stdout
        self.messages = []
        self.notes = []  # one-line notices for the user (context trimmed, reply cut)
        self.last = {}
        self.reset()

    def reset(self):
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def _encode(self, messages):
        text = self.template.render(messages)
        tok = self.m.tokenizer
        bos = self.template.bos
        add_bos = bool(self.m.meta["tokenizer"].get("add_bos_token")) and not (bos and text.startswith(bos))
        ids = tok.encode(text, add_bos=add_bos)
        if not ids:
            raise ChatError("chat template rejected: it rendered no text for this conversation")
        return ids

    def _fit(self):
        """Token ids of the conversation, dropping the oldest turns (never the system prompt
        or the newest user message) until they leave room for a reply."""
        reserve = min(max(self.m.n_ctx // 4, 16), 512) if self.max_tokens < 0 else self.max_tokens
        dropped = 0
        while True:
            ids = self._encode(self.messages)
            if len(ids) + reserve <= self.m.n_ctx:
                break
            first = 1 if self.messages and self.messages[0]["role"] == "system" else 0
            if len(self.messages) - first <= 1:
                if len(ids) < self.m.n_ctx:
                    break
                self.messages.pop()
                raise ChatError(f"this message is {len(ids)} tokens; the context holds {self.m.n_ctx} (-c)")
            del self.messages[first]
            dropped += 1
            if self.messages[first:] and self.messages[first]["role"] == "assistant":
                del self.messages[first]
                dropped += 1
        if dropped:
            self.notes.append(f"context full: dropped the {dropped} oldest messages")
        return ids

    def ask(self, text):
        """Add a user message and stream the reply to self.out; returns the reply.
        Ctrl-C stops the reply; what was said so far stays in the history."""
        t0 = time.perf_counter()  # first_token_s: from Enter, template and tokenizer included
        self.notes = []
        self.messages.append({"role": "user", "content": text})
        ids = self._fit()
        reply, first = [], None
        gen = self.m.generate(ids, max_tokens=self.max_tokens if self.max_tokens >= 0 else self.m.n_ctx,
                              **self.sampling)
        try:
            for piece in gen:
                if first is None:
                    first = time.perf_counter() - t0
                reply.append(piece)
                self.out.write(piece)
                self.out.flush()
        except KeyboardInterrupt:
            gen.close()
            self.notes.append("reply stopped")
        finally:
            self.messages.append({"role": "assistant", "content": "".join(reply)})
            s = dict(self.m.stats)
            s.update(first_token_s=first, context_tokens=len(self.m.tokens), n_ctx=self.m.n_ctx)
            self.last = s
        if s.get("stop") == "context":
            self.notes.append("context full: reply cut short")
        return "".join(reply)

    def stats_line(self):
        s = self.last
        if not s:
            return "no reply yet"
        pp = s["prefill_tokens"] / s["prefill_s"] if s["prefill_s"] else 0
        tg = s["gen_tokens"] / s["decode_s"] if s["decode_s"] else 0
        ft = f"{s['first_token_s'] * 1000:.0f} ms" if s.get("first_token_s") is not None else "-"
        from .lookup import stats_text
        return (f"context {s['context_tokens']}/{s['n_ctx']} tokens "
                f"| prefill {s['prefill_tokens']} tokens {pp:.1f} tok/s "
                f"| reply {s['gen_tokens']} tokens {tg:.1f} tok/s | first token {ft} "
                f"| {stats_text(s)}")

    def save(self, path):
        data = json.dumps({"format": "pyllm-chat", "version": 1, "system": self.system,
                           "messages": self.messages}, ensure_ascii=False, indent=1)
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def load(self, path):
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            msgs = data["messages"]
            ok = isinstance(msgs, list) and all(
                isinstance(x, dict) and x.get("role") in ("system", "user", "assistant")
                and isinstance(x.get("content"), str) for x in msgs)
            if data.get("format") != "pyllm-chat" or not ok:
                raise ValueError("not a pyllm conversation")
        except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise ChatError(f"cannot load {path}: {e}") from None
        self.system = data.get("system") if isinstance(data.get("system"), str) else None
        self.messages = msgs


def add_arguments(p):
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"default {DEFAULT_MODEL}")
    add_model(p)
    add_sampling(p, n_predict=-1,
                 n_predict_help="most tokens per reply (default -1: until it ends or fills the context)")
    p.add_argument("-sys", "--system", default=None, help="system prompt")
    p.add_argument("-p", "--prompt", default=None, help="ask this once, print the reply, exit")
    p.add_argument("--template", choices=sorted(TEMPLATES), default=None,
                   help="use this chat template instead of the file's")
    p.add_argument("--timings", action="store_true", help="a dim line of speed after each reply")


def _read_message(prompt="> "):
    lines = []
    while True:
        line = input(prompt if not lines else "... ")
        if line.endswith("\\"):
            lines.append(line[:-1])
            continue
        lines.append(line)
        return "\n".join(lines)


def main(a):
    from .model import load
    for s, what in ((a.system, "system prompt"), (a.prompt, "prompt")):
        if s is not None:
            text_arg(s, what)
    interactive = a.prompt is None and sys.stdin.isatty()
    if not interactive and a.prompt is None:
        data = sys.stdin.buffer.read()
        try:
            a.prompt = data.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise UsageError("standard input is not valid UTF-8") from None
    if not os.path.exists(a.model):
        raise UsageError(f"{a.model}: no such file (make weights converts the default model)")
    m = load(a.model, threads=a.threads, n_ctx=a.ctx_size)
    try:
        chat = Chat(m, a.template, a.system, sampling_kwargs(a), a.n_predict)
    except ChatError as e:
        raise UsageError(str(e)) from None
    dim = (lambda s: f"\x1b[2m{s}\x1b[0m") if sys.stderr.isatty() else (lambda s: s)

    def reply(text):
        try:
            chat.ask(text)
        except ChatError as e:
            print(f"\n{e}", file=sys.stderr)
            return False
        except KeyboardInterrupt:
            print(dim("\n(stopped)"), file=sys.stderr)
            return False
        print()
        for n in chat.notes:
            print(dim(f"({n})"), file=sys.stderr)
        if a.timings:
            print(dim(chat.stats_line()), file=sys.stderr)
        return True

    if not interactive:
        if not a.prompt:
            raise UsageError("nothing to answer: the prompt is empty")
        return 0 if reply(a.prompt) else 1
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    print(dim(f"pyllm chat: {os.path.basename(a.model)}, {m.n_ctx} tokens of context, "
              f"{m.threads} threads. /help for commands, Ctrl-D to quit."), file=sys.stderr)
    while True:
        try:
            text = _read_message()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        cmd, _, arg = text.strip().partition(" ")
        if not text.strip():
            continue
        if cmd == "/exit" or cmd == "/quit":
            return 0
        if cmd == "/help":
            print(HELP)
        elif cmd == "/reset":
            chat.reset()
            print(dim("(new conversation)"), file=sys.stderr)
        elif cmd == "/system":
            chat.system = arg.strip() or None
            chat.reset()
            print(dim("(system prompt set; new conversation)"), file=sys.stderr)
        elif cmd == "/stats":
            print(dim(chat.stats_line()), file=sys.stderr)
        elif cmd in ("/save", "/load"):
            if not arg.strip():
                print(f"usage: {cmd} FILE", file=sys.stderr)
                continue
            try:
                (chat.save if cmd == "/save" else chat.load)(arg.strip())
                print(dim(f"({'saved to' if cmd == '/save' else 'loaded'} {arg.strip()})"), file=sys.stderr)
            except (ChatError, OSError) as e:
                print(f"{cmd[1:]} failed: {e}", file=sys.stderr)
        elif cmd.startswith("/") and " " not in cmd and len(cmd) > 1 and cmd[1:].isalpha():
            print(f"unknown command {cmd}; /help lists them", file=sys.stderr)
        else:
            reply(text)
