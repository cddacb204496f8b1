"""pyllm's command line: argparse subcommands that call the modules, nothing more."""

import argparse
import json
import math
import os
import sys

from . import bench, chat, check, lookup, perplexity, serve
from .args import UsageError, add_model, add_sampling, model_kwargs, sampling_kwargs, text_arg
from .convert import ConvertError
from .safeio import printable, printable_json


def cmd_convert(a):
    from .convert import convert

    s = convert(a.src, a.out, progress=not a.quiet, tokenizer=a.tokenizer)
    print(
        f"wrote {a.out}: {s['tensors']} tensors, {s['parameters'] / 1e6:.1f} M parameters, "
        f"{s['file_size'] / 2**20:.1f} MiB in {s['seconds']:.1f} s",
        file=sys.stderr,
    )


def cmd_generate(a):
    from .model import load

    prompt = text_arg(a.prompt if a.prompt != "-" else sys.stdin.read(), "prompt")
    m = load(a.model, **model_kwargs(a))
    for piece in m.generate(prompt, max_tokens=a.n_predict, **sampling_kwargs(a)):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if a.timings:
        print(timings_line(m.stats), file=sys.stderr)


def timings_line(s):
    pp = s["prefill_tokens"] / s["prefill_s"] if s["prefill_s"] else 0.0
    tg = s["gen_tokens"] / s["decode_s"] if s["decode_s"] else 0.0
    return (
        f"prompt {s['prefill_tokens']} tokens {pp:.1f} tok/s, "
        f"generated {s['gen_tokens']} tokens {tg:.1f} tok/s, " + lookup.stats_text(s)
    )


def cmd_info(a):
    from . import format

    mf = format.read(
        a.model, map_tensors=False
    )  # validated: the types below are as metadata.py says
    tok, meta = mf.meta["tokenizer"], mf.meta
    names = tok["tokens"]
    special = {
        k: (v, names[v] if v is not None else None)
        for k, v in tok.items()
        if k.endswith("_token_id")
    }
    info = {
        "file": a.model,
        "size_bytes": os.path.getsize(a.model),
        "config": mf.config,
        "parameters": sum(math.prod(t["shape"]) for t in meta["tensors"]),
        "tokenizer": {
            "model": tok["model"],
            "pre": tok.get("pre"),
            "vocab": len(names),
            "merges": len(tok.get("merges") or []),
            "special_tokens": special,
            "add_bos_token": tok.get("add_bos_token"),
        },
        "chat_template": meta.get("chat_template"),
        "provenance": meta.get("provenance"),
    }
    if a.json:  # control characters inside strings become \u escapes: the same JSON, safe to print
        print(printable_json(json.dumps(info, indent=2, ensure_ascii=False)))
        return
    sys.stdout.reconfigure(errors="backslashreplace")  # a terminal that cannot show a character
    p = printable  # everything below comes from the file
    print(
        f"file        {p(info['file'])} ({info['size_bytes'] / 2**20:.1f} MiB, "
        f"{info['parameters'] / 1e6:.1f} M parameters)"
    )
    for k, v in info["config"].items():
        print(f"  {p(k):22} {p(v)}")
    t = info["tokenizer"]
    print(
        f"tokenizer   {p(t['model'])} (pre {p(t['pre'])}), {t['vocab']} tokens, "
        f"{t['merges']} merges, add_bos {t['add_bos_token']}"
    )
    for k, (i, s) in special.items():
        print(f"  {p(k):22} {i} {p(repr(s))}")
    tmpl = info["chat_template"]
    print(
        "template    " + ("(none)" if not tmpl else f"{len(tmpl)} chars: {p(repr(tmpl[:160]))}...")
    )
    for k, v in (info["provenance"] or {}).items():
        print(f"  {p(k):22} {p(v)}")


def build_parser():
    p = argparse.ArgumentParser(prog="pyllm", description="A minimal offline LLM runtime.")
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser(
        "convert",
        help="convert a GGUF file, Hugging Face directory or llama2.c checkpoint to a pyllm file",
    )
    c.add_argument("src")
    c.add_argument("out")
    c.add_argument(
        "--tokenizer",
        metavar="PATH",
        help="llama2.c checkpoints: their tokenizer.bin (default: next to SRC)",
    )
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    c.set_defaults(fn=cmd_convert)

    g = sub.add_parser("generate", help="continue a prompt, printing tokens as they come")
    g.add_argument("model")
    g.add_argument("prompt", help="the prompt text, or - to read it from stdin")
    add_model(g)
    add_sampling(g)
    g.add_argument("--timings", action="store_true", help="print prefill/decode speed to stderr")
    g.set_defaults(fn=cmd_generate)

    i = sub.add_parser("info", help="print a file's config, tokenizer, template and provenance")
    i.add_argument("model")
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=cmd_info)

    ch = sub.add_parser("chat", help="chat with a model in the terminal")
    chat.add_arguments(ch)
    ch.set_defaults(fn=chat.main)

    sv = sub.add_parser("serve", help="an OpenAI-compatible API and a chat page in the browser")
    serve.add_arguments(sv)
    sv.set_defaults(fn=serve.main)

    b = sub.add_parser("bench", help="prompt-processing and generation speed, llama-bench style")
    bench.add_arguments(b)
    b.set_defaults(fn=bench.main)

    pp = sub.add_parser("perplexity", help="perplexity of a text file, llama-perplexity style")
    perplexity.add_arguments(pp)
    pp.set_defaults(fn=perplexity.main)

    k = sub.add_parser("check", help="check this build of the kernel against the numpy reference")
    check.add_arguments(k)
    k.set_defaults(fn=check.main)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    from .format import FormatError
    from .model import PyllmError

    errors = (PyllmError, FormatError, UsageError, ValueError, OSError)
    errors += (ConvertError,)
    try:
        return args.fn(args) or 0
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        sys.stderr.close()  # the reader went away (e.g. `| head`): not an error worth a word
        return 0
    except errors as e:  # the message may quote a file: escaped, and so on one line
        print(f"pyllm: error: {printable(e)}", file=sys.stderr)
        return 1
    except MemoryError:  # the checks before each allocation should make this unreachable
        print("pyllm: error: out of memory", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
