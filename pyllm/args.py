"""The command line's shared pieces: the model and sampling options, their defaults, UsageError.

`cli.py` and the command modules (`chat`, `perplexity`, ...) import this; it imports nothing of
pyllm but lookup's defaults (a leaf module), so the imports flow one way: cli -> commands -> args.
"""

import os

from . import lookup

DEFAULT_MODEL = os.path.join("weights", "smollm2-135m-instruct.f16.bin")
CACHE_TYPES = ("f16", "f32")  # the KV cache's element types (the kernel's PYLLM_CACHE_*)


class UsageError(Exception):
    """A bad command line or input text, with a one-line message for the user."""


def text_arg(s, what):
    """s itself if it can be encoded as UTF-8 (a lone surrogate from the shell cannot)."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"the {what} is not valid UTF-8") from None
    return s


def add_model(p, ctx_size=None, ctx_help="context size in tokens (default: min(model's, 4096))"):
    """-t, -c and the KV cache types (llama.cpp's names); a command with its own context
    default passes ctx_size and its help. model_kwargs(args) turns them into load's arguments."""
    p.add_argument("-t", "--threads", type=int, default=None, help="threads (default: all cores)")
    p.add_argument("-c", "--ctx-size", type=int, default=ctx_size, help=ctx_help)
    p.add_argument(
        "-ctk",
        "--cache-type-k",
        choices=CACHE_TYPES,
        default="f16",
        help="the KV cache's type for keys: f16 (default, as llama.cpp) or f32 (exact)",
    )
    p.add_argument(
        "-ctv",
        "--cache-type-v",
        choices=CACHE_TYPES,
        default="f16",
        help="the KV cache's type for values: f16 (default) or f32 (exact)",
    )


def model_kwargs(a):
    """add_model's options as pyllm.load's keyword arguments."""
    return dict(
        threads=a.threads,
        n_ctx=a.ctx_size,
        cache_type_k=a.cache_type_k,
        cache_type_v=a.cache_type_v,
    )


def add_sampling(p, temp=0.8, n_predict=256, n_predict_help="tokens to generate (default 256)"):
    """llama.cpp's sampling options and defaults (chat passes its own -n default)."""
    g = p.add_argument_group("sampling (llama.cpp names and defaults)")
    g.add_argument("-n", "--n-predict", type=int, default=n_predict, help=n_predict_help)
    g.add_argument(
        "--temp", type=float, default=temp, help=f"temperature, 0 = greedy (default {temp})"
    )
    g.add_argument("--top-k", type=int, default=40, help="0 = off (default 40)")
    g.add_argument("--top-p", type=float, default=0.95, help="1.0 = off (default 0.95)")
    g.add_argument("--min-p", type=float, default=0.05, help="0.0 = off (default 0.05)")
    g.add_argument("--repeat-penalty", type=float, default=1.0, help="1.0 = off (default 1.0)")
    g.add_argument("--repeat-last-n", type=int, default=64, help="-1 = whole context (default 64)")
    g.add_argument("--seed", type=int, default=None, help="same seed, same text (default random)")
    g.add_argument(
        "--draft-max",
        type=int,
        default=lookup.DRAFT_MAX,
        help="lookup drafting: most tokens drafted from the context per verify pass, "
        f"0 = off (default {lookup.DRAFT_MAX})",
    )
    g.add_argument(
        "--draft-min",
        type=int,
        default=lookup.DRAFT_MIN,
        help=f"fewest drafted tokens worth a verify pass (default {lookup.DRAFT_MIN})",
    )


def sampling_kwargs(a):
    """The parsed sampling options as Model.generate's keyword arguments (ValueError, one
    line, for unusable draft settings)."""
    lookup.check(a.draft_max, a.draft_min)
    return dict(
        temperature=a.temp,
        top_k=a.top_k,
        top_p=a.top_p,
        min_p=a.min_p,
        repeat_penalty=a.repeat_penalty,
        repeat_last_n=a.repeat_last_n,
        seed=a.seed,
        draft_max=a.draft_max,
        draft_min=a.draft_min,
    )
