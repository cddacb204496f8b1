"""Chat: sandboxed template rendering, the REPL, history, slash commands."""

import contextlib
import json
import os
import re
import signal
import sys
import time
from datetime import datetime

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from . import outfile
from .args import (
    DEFAULT_MODEL,
    UsageError,
    add_model,
    add_sampling,
    model_kwargs,
    sampling_kwargs,
    text_arg,
)
from .safeio import printable

# Templates for files that carry none (--template NAME), in each family's own format.
TEMPLATES = {
    "chatml": (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    "llama2": (
        "{% if messages and messages[0].role == 'system' %}"
        "{% set sys = messages[0].content %}"
        "{% set messages = messages[1:] %}{% endif %}{% for m in messages %}"
        "{% if m.role == 'user' %}{{ bos_token }}[INST] "
        "{% if loop.first and sys %}<<SYS>>\n{{ sys }}\n<</SYS>>\n\n"
        "{% endif %}{{ m.content | trim }} [/INST]"
        "{% else %} {{ m.content | trim }} {{ eos_token }}{% endif %}"
        "{% endfor %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for m in messages %}"
        "<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
        "{{ m.content | trim }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
        "{% endif %}"
    ),
    "zephyr": (
        "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}{{ eos_token }}\n"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    ),
    "gemma": (
        "{{ bos_token }}{% set sys = '' %}{% if messages and messages[0].role == 'system' %}"
        "{% set sys = messages[0].content + '\\n\\n' %}{% set messages = messages[1:] %}"
        "{% endif %}{% for m in messages %}"
        "<start_of_turn>{{ 'model' if m.role == 'assistant' else 'user' }}\n"
        "{{ (sys if loop.first else '') + (m.content | trim) }}<end_of_turn>\n{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    ),
}
MAX_TEMPLATE_OUTPUT = 1 << 20  # characters
MAX_TEMPLATE_SOURCE = 128 << 10  # characters; real chat templates are a few KB
MAX_TEMPLATE_NESTING = 64  # brackets and blocks inside each other
MAX_TEMPLATE_VALUE = (
    1 << 20
)  # characters or items of one string or list a template builds (= the output cap)
MAX_TEMPLATE_INT_BITS = 4096  # no template needs a larger number
TEMPLATE_SECONDS = 2
COMPILE_SECONDS = 5  # a template at the size limit compiles in about 2 s
TEMPLATE_MEMORY = 512 << 20  # bytes of address space compiling or rendering may add (Linux)
HELP = """commands:
  /reset          start a new conversation (keeps the system prompt)
  /system TEXT    set the system prompt and start a new conversation
  /save FILE      save the conversation as JSON
  /load FILE      load a conversation saved with /save
  /stats          tokens in context and the last reply's speed
  /help           this text
  /exit           quit (also Ctrl-D; Ctrl-C stops a reply)
A line ending in \\ continues on the next line; start a message with // to send one
beginning with /."""
COMMANDS = ("/reset", "/system", "/save", "/load", "/stats", "/help", "/exit", "/quit")
MAX_CONVERSATION_FILE = 64 << 20  # bytes


class ChatError(Exception):
    pass


class TemplateTooLarge(ChatError):
    """The rendered text (or a value on the way to it) is over the size limit."""


def _too_large(what):
    return TemplateTooLarge(
        f"chat template rejected: {what} exceeds {MAX_TEMPLATE_VALUE} characters or items"
    )


def _size(v):
    return len(v) if isinstance(v, (str, list, tuple)) else 0


def _check_value(v):
    if _size(v) > MAX_TEMPLATE_VALUE:
        raise _too_large("a value")
    if isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > MAX_TEMPLATE_INT_BITS:
        raise TemplateError(f"a number over {MAX_TEMPLATE_INT_BITS} bits")
    return v


_PRINTF_WIDTH = re.compile(r"%[-#0 +]*(\*|\d{7,})|%[-#0 +]*\d*\.(\*|\d{7,})")


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with every operator and call that can build a large value in
    one step checked before it runs (a single huge allocation or power is one C call that no
    timer interrupts)."""

    intercepted_binops = frozenset(["+", "-", "*", "/", "//", "%", "**"])

    def call_binop(self, context, operator, left, right):
        ints = all(isinstance(x, int) and not isinstance(x, bool) for x in (left, right))
        if (
            operator == "**"
            and ints
            and right > 0
            and abs(left) > 1
            and right * abs(left).bit_length() > MAX_TEMPLATE_INT_BITS
        ):
            raise TemplateError(f"{left} ** {right} is over {MAX_TEMPLATE_INT_BITS} bits")
        if operator == "*":
            if ints and left.bit_length() + right.bit_length() > MAX_TEMPLATE_INT_BITS:
                raise TemplateError(f"a product over {MAX_TEMPLATE_INT_BITS} bits")
            for seq, n in ((left, right), (right, left)):
                if isinstance(n, int) and _size(seq) * max(n, 0) > MAX_TEMPLATE_VALUE:
                    raise _too_large(f"{type(seq).__name__} * {n}")
        if operator == "+" and _size(left) + _size(right) > MAX_TEMPLATE_VALUE:
            raise _too_large("a concatenation")
        if operator == "%" and isinstance(left, str) and _PRINTF_WIDTH.search(left):
            raise TemplateError("a %-format with a huge or computed width")
        return _check_value(super().call_binop(context, operator, left, right))

    def call(self, context, obj, /, *args, **kwargs):
        for v in (*args, *kwargs.values()):
            if isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_TEMPLATE_VALUE:
                raise TemplateError(f"an argument of {v} is too large")
        name = getattr(obj, "__name__", "")
        if (
            name in ("format", "format_map")
            and isinstance(getattr(obj, "__self__", None), str)
            and re.search(r"\d{7,}", obj.__self__)
        ):
            raise TemplateError("a format with a huge width")
        if (
            name == "join"
            and isinstance(getattr(obj, "__self__", None), str)
            and args
            and isinstance(args[0], (list, tuple))
            and sum(map(_size, args[0])) + len(obj.__self__) * len(args[0]) > MAX_TEMPLATE_VALUE
        ):
            raise _too_large("a join")
        if (
            name == "replace"
            and isinstance(getattr(obj, "__self__", None), str)
            and len(args) >= 2
            and all(isinstance(x, str) for x in args[:2])
            and args[0]
            and len(obj.__self__) + obj.__self__.count(args[0]) * len(args[1]) > MAX_TEMPLATE_VALUE
        ):
            raise _too_large("a replace")
        return _check_value(super().call(context, obj, *args, **kwargs))


def _bounded_filter(f):
    """A filter whose numeric arguments are bounded and whose result is checked."""

    def bounded(*args, **kwargs):
        for v in (*args[1:], *kwargs.values()):
            if isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_TEMPLATE_VALUE:
                raise TemplateError(f"a filter argument of {v} is too large")
        return _check_value(f(*args, **kwargs))

    for attr in ("jinja_pass_arg",):  # pass_context / pass_environment markers
        if hasattr(f, attr):
            setattr(bounded, attr, getattr(f, attr))
    return bounded


def _bounded_join(join):
    def bounded(seq):
        seq = list(seq)
        if sum(_size(x) if isinstance(x, str) else 0 for x in seq) > MAX_TEMPLATE_VALUE:
            raise _too_large("a ~ concatenation")
        return join(seq)

    return bounded


def _check_nesting(env, source):
    """Refuse templates nested deeper than MAX_TEMPLATE_NESTING before the recursive parser
    and Python's compiler see them."""
    blocks = ("for", "if", "macro", "call", "filter", "block", "with", "autoescape")
    depth, after_block = 0, False
    for _, kind, value in env.lex(source):
        if kind == "whitespace":
            continue
        block = after_block and kind == "name"
        if (kind == "operator" and value in "([{") or (block and value in blocks):
            depth += 1
            if depth > MAX_TEMPLATE_NESTING:
                raise ChatError(
                    f"chat template rejected: nested deeper than {MAX_TEMPLATE_NESTING} levels"
                )
        elif (kind == "operator" and value in ")]}") or (block and value.startswith("end")):
            depth = max(depth - 1, 0)
        after_block = kind == "block_begin"


@contextlib.contextmanager
def _bounded(what, seconds=TEMPLATE_SECONDS):
    """At most SECONDS (SIGALRM: Unix, main thread) and TEMPLATE_MEMORY more address
    space (RLIMIT_AS: Linux) for the block; every failure becomes a one-line ChatError."""

    def timeout(*_):
        raise TimeoutError

    try:
        old = signal.signal(signal.SIGALRM, timeout)
        signal.alarm(seconds)
    except (AttributeError, ValueError):  # no SIGALRM, or not the main thread
        old = None
    limit = None
    try:
        import resource

        with open("/proc/self/statm") as f:
            used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        limit = resource.getrlimit(resource.RLIMIT_AS)
        cap = used + TEMPLATE_MEMORY
        if limit[0] == resource.RLIM_INFINITY or cap < limit[0]:
            resource.setrlimit(resource.RLIMIT_AS, (cap, limit[1]))
        else:
            limit = None
    except (ImportError, OSError, ValueError):
        limit = None
    try:
        yield
    except TimeoutError:
        raise ChatError(f"chat template rejected: {what} took over {seconds} s") from None
    except MemoryError:
        raise ChatError(
            f"chat template rejected: {what} needs over {TEMPLATE_MEMORY >> 20} MiB"
        ) from None
    except ChatError:
        raise
    except (
        Exception,
        RecursionError,
    ) as e:  # SecurityError, TemplateError, SyntaxError, the template's own
        msg = " ".join(str(e).split())[:200]
        raise ChatError(f"chat template rejected: {type(e).__name__}: {msg}") from None
    finally:
        if limit is not None:
            import resource

            resource.setrlimit(resource.RLIMIT_AS, limit)
        if old is not None:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)


class Template:
    """A chat template from a weights file: untrusted, so sandboxed, and bounded in size,
    time and memory both while it is compiled and while it renders."""

    def __init__(self, source, bos_token="", eos_token=""):
        if not isinstance(source, str):
            raise ChatError(f"chat template rejected: not text but {type(source).__name__}")
        if len(source) > MAX_TEMPLATE_SOURCE:
            raise ChatError(
                f"chat template rejected: {len(source)} characters, over {MAX_TEMPLATE_SOURCE}"
            )

        def raise_exception(msg):
            raise TemplateError(msg)

        # optimized=False: no constant folding while compiling ({{ 9 ** 9 ** 9 }} would run there)
        env = _BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, optimized=False)
        env.globals.update(
            raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt)
        )
        env.filters["tojson"] = lambda v, indent=None: json.dumps(
            v, ensure_ascii=False, indent=indent
        )
        env.filters = {k: _bounded_filter(f) for k, f in env.filters.items()}
        with _bounded("compiling it", COMPILE_SECONDS):
            _check_nesting(env, source)
            self.t = env.from_string(source)
            g = self.t.root_render_func.__globals__  # the compiled module's: `~` joins with these
            for k in ("str_join", "markup_join"):
                if k in g:
                    g[k] = _bounded_join(g[k])
        self.bos, self.eos = bos_token, eos_token

    def render(self, messages, add_generation_prompt=True):
        out, n = [], 0
        with _bounded("rendering"):
            for chunk in self.t.generate(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos,
                eos_token=self.eos,
            ):
                n += len(chunk)
                if n > MAX_TEMPLATE_OUTPUT:
                    raise TemplateTooLarge("chat template rejected: its output exceeds 1 MiB")
                out.append(chunk)
        return "".join(out)


def load_template(model, name=None):
    """The Template for model: TEMPLATES[name] if a name is given, else the file's own."""
    tok = model.tokenizer
    names = model.meta["tokenizer"]["tokens"]
    bos = names[tok.bos_id] if tok.bos_id is not None else ""
    eos = names[tok.eos_id] if tok.eos_id is not None else ""
    source = TEMPLATES[name] if name else model.chat_template
    if not source:
        raise ChatError(
            "this file has no chat template: choose one with --template " + "|".join(TEMPLATES)
        )
    return Template(source, bos, eos)


def encode_messages(model, template, messages):
    """Token ids of messages rendered with template, ending with the assistant's prompt."""
    return encode_rendered(model, template, template.render(messages))


def encode_rendered(model, template, text):
    """Token ids of text that template rendered; BOS is added as the file says unless the
    template wrote it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ChatError(
            "chat template rejected: it rendered text that is not valid Unicode (a lone surrogate)"
        ) from None
    add_bos = bool(model.meta["tokenizer"].get("add_bos_token")) and not (
        template.bos and text.startswith(template.bos)
    )
    ids = model.tokenizer.encode(text, add_bos=add_bos)
    if not ids:
        raise ChatError("chat template rejected: it rendered no text for this conversation")
    return ids


class Chat:
    """A conversation over a Model: messages in, streamed reply out; the KV cache is reused
    across turns (only new tokens are prefilled)."""

    def __init__(self, model, template=None, system=None, sampling=None, max_tokens=-1, out=None):
        self.m = model
        self.template = load_template(model, template)
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
        return encode_messages(self.m, self.template, messages)

    def _fit(self):
        """Token ids of the conversation, dropping the oldest turns (never the system prompt
        or the newest user message) until they leave room for a reply. The number dropped is
        found by binary search, so a long conversation is rendered O(log n) times, not n."""
        reserve = min(max(self.m.n_ctx // 4, 16), 512) if self.max_tokens < 0 else self.max_tokens
        msgs = self.messages
        first = 1 if msgs and msgs[0]["role"] == "system" else 0
        cuts, k = [0], 0  # the drop counts the turn structure allows: a user turn with its reply
        while len(msgs) - first - k > 1:
            k += 1
            if first + k < len(msgs) - 1 and msgs[first + k]["role"] == "assistant":
                k += 1
            cuts.append(k)

        rendered, errors = {}, {}

        def encode(cut):
            if cut not in rendered:
                try:
                    rendered[cut] = self._encode(msgs[:first] + msgs[first + cut :])
                except TemplateTooLarge as e:
                    rendered[cut] = None  # longer than any context: drop more
                    errors[cut] = e
            return rendered[cut]

        def fits(cut):
            ids = encode(cut)
            return ids is not None and len(ids) + reserve <= self.m.n_ctx

        if fits(0):
            return encode(0)
        best = len(cuts) - 1  # only the newest message left
        if fits(cuts[best]):
            lo, hi = 0, best  # cuts[lo] does not fit, cuts[hi] does
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if fits(cuts[mid]) else (mid, hi)
            best = hi
        else:
            ids = encode(cuts[best])
            if ids is None or len(ids) >= self.m.n_ctx:  # it does not fit even without a reply
                chars = sum(len(x["content"]) for x in msgs[:first] + msgs[first + cuts[best] :])
                if ids is None and chars <= MAX_TEMPLATE_OUTPUT // 2:
                    msgs.pop()
                    raise errors[cuts[best]]  # the template, not the message, makes it this long
                text = msgs.pop()["content"]
                size = f"{len(ids)} tokens" if ids is not None else f"{len(text)} characters"
                raise ChatError(
                    f"this message is {size}; the context holds {self.m.n_ctx} tokens (-c)"
                )
        del msgs[first : first + cuts[best]]
        if cuts[best]:
            self.notes.append(f"context full: dropped the {cuts[best]} oldest messages")
        return rendered[cuts[best]]

    def ask(self, text):
        """Add a user message and stream the reply to self.out; returns the reply.
        Ctrl-C stops the reply; what was said so far stays in the history."""
        t0 = time.perf_counter()  # first_token_s: from Enter, template and tokenizer included
        self.notes = []
        self.messages.append({"role": "user", "content": text})
        ids = self._fit()
        reply, first = [], None
        gen = self.m.generate(
            ids,
            max_tokens=self.max_tokens if self.max_tokens >= 0 else self.m.n_ctx,
            **self.sampling,
        )
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

        return (
            f"context {s['context_tokens']}/{s['n_ctx']} tokens "
            f"| prefill {s['prefill_tokens']} tokens {pp:.1f} tok/s "
            f"| reply {s['gen_tokens']} tokens {tg:.1f} tok/s | first token {ft} "
            f"| {stats_text(s)}"
        )

    def save(self, path):
        """Write the conversation as JSON, atomically (outfile.atomic_output). Text that is
        not valid Unicode (a lone surrogate) is written \\u-escaped, so nothing is lost."""
        doc = {
            "format": "pyllm-chat",
            "version": 1,
            "system": self.system,
            "messages": self.messages,
        }
        try:
            data = json.dumps(doc, ensure_ascii=False, indent=1).encode("utf-8")
        except UnicodeEncodeError:
            data = json.dumps(doc, ensure_ascii=True, indent=1).encode("ascii")
        inputs = [self.m.path] if getattr(self.m, "path", None) else []
        try:
            with outfile.atomic_output(path, inputs) as f:
                f.write(data)
        except outfile.OutputError as e:
            raise ChatError(str(e)) from None
        except outfile.Interrupted as e:  # SIGTERM/SIGHUP: end the chat, but in one line
            done = "was saved" if outfile.committed(path) else "was not written"
            raise SystemExit(f"pyllm: {e}; {path} {done}") from None

    def load(self, path):
        """Replace the conversation with one saved by save(); the whole file is checked first,
        so a bad file leaves the conversation as it was."""
        try:
            data = json.loads(
                outfile.read_regular(path, MAX_CONVERSATION_FILE, "conversation").decode("utf-8")
            )
            if not isinstance(data, dict) or data.get("format") != "pyllm-chat":
                raise ValueError("not a pyllm conversation")
            msgs, system = data.get("messages"), data.get("system")
            if not isinstance(msgs, list) or not all(
                isinstance(x, dict)
                and x.get("role") in ("system", "user", "assistant")
                and isinstance(x.get("content"), str)
                for x in msgs
            ):
                raise ValueError("not a pyllm conversation (messages)")
            if system is not None and not isinstance(system, str):
                raise ValueError("not a pyllm conversation (system)")
            for i, x in enumerate(msgs):
                try:
                    x["content"].encode("utf-8")
                except UnicodeEncodeError:
                    raise ValueError(
                        f"message {i + 1} is not valid Unicode (a lone surrogate)"
                    ) from None
            msgs = [{"role": x["role"], "content": x["content"]} for x in msgs]
        except outfile.OutputError as e:
            raise ChatError(f"cannot load: {e}") from None
        except (ValueError, RecursionError) as e:  # JSON, UTF-8, nesting, the checks above
            raise ChatError(f"cannot load {path}: {' '.join(str(e).split())[:200]}") from None
        try:
            (system or "").encode("utf-8")
        except UnicodeEncodeError:
            raise ChatError(f"cannot load {path}: the system prompt is not valid Unicode") from None
        self.system = system
        self.messages = msgs


def add_template(p):
    """--template NAME, shared with pyllm serve."""
    p.add_argument(
        "--template",
        choices=sorted(TEMPLATES),
        default=None,
        help="use this chat template instead of the file's",
    )


def add_arguments(p):
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"default {DEFAULT_MODEL}")
    add_model(p)
    add_sampling(
        p,
        n_predict=-1,
        n_predict_help="most tokens per reply (default -1: until it ends or fills the context)",
    )
    p.add_argument("-sys", "--system", default=None, help="system prompt")
    p.add_argument("-p", "--prompt", default=None, help="ask this once, print the reply, exit")
    add_template(p)
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
    m = load(a.model, **model_kwargs(a))
    try:
        chat = Chat(m, a.template, a.system, sampling_kwargs(a), a.n_predict)
    except ChatError as e:
        raise UsageError(str(e)) from None
    dim = (lambda s: f"\x1b[2m{s}\x1b[0m") if sys.stderr.isatty() else (lambda s: s)

    def reply(text):
        try:
            chat.ask(text)
        except ChatError as e:
            print(f"\n{printable(e)}", file=sys.stderr)  # a template error may quote the file
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
    print(
        dim(
            f"pyllm chat: {printable(os.path.basename(a.model))}, {m.n_ctx} tokens of context, "
            f"{m.threads} threads. /help for commands, Ctrl-D to quit."
        ),
        file=sys.stderr,
    )
    while True:
        try:
            text = _read_message()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if not text.strip():
            continue
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            print("the message is not valid UTF-8; not sent", file=sys.stderr)
            continue
        if text.startswith("//"):  # a message that begins with /
            reply(text[1:])
            continue
        if not text.startswith("/"):
            reply(text)
            continue
        cmd, _, arg = text.strip().partition(" ")
        if cmd in ("/exit", "/quit"):
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
                print(
                    dim(f"({'saved to' if cmd == '/save' else 'loaded'} {printable(arg.strip())})"),
                    file=sys.stderr,
                )
            except (ChatError, OSError) as e:
                print(f"{cmd[1:]} failed: {printable(e)}", file=sys.stderr)
            except KeyboardInterrupt:
                print(
                    dim(f"\n({cmd[1:]} cancelled; the conversation is as it was)"), file=sys.stderr
                )
        else:
            print(
                f"unknown command {cmd[:40]!r}; /help lists them (start with // to send it)",
                file=sys.stderr,
            )
