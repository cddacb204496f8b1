"""`pyllm perplexity MODEL TEXTFILE`: a text's perplexity, as llama.cpp's llama-perplexity has it.

    pyllm perplexity MODEL TEXTFILE [-c 512] [--chunks N] [-t THREADS]

llama.cpp's rule (tools/perplexity/perplexity.cpp, perplexity()):
  * the whole file is tokenized once, with BOS at the start when the tokenizer adds one
    (never EOS);
  * it is cut into floor(n_tokens / n_ctx) chunks of n_ctx tokens (the tail is dropped;
    --chunks N keeps the first N); at least 2 * n_ctx tokens are required;
  * each chunk is evaluated in a fresh context; when the tokenizer adds BOS, the chunk's
    first token is replaced by BOS for the evaluation;
  * only the second half is scored: the logits at positions first .. n_ctx-2, first =
    n_ctx // 2, predict the chunk's tokens first+1 .. n_ctx-1, so n_ctx - first - 1
    tokens per chunk;
  * after each chunk the running perplexity exp(mean NLL) is printed as `[i]x.xxxx,`;
    at the end `Final estimate: PPL = x.xxxx +/- y.yyyyy`, where the uncertainty is
    ppl * sqrt((mean(NLL^2) - mean(NLL)^2) / (count - 1)) (the standard error of the mean
    NLL carried through exp to first order).

The log-softmax is computed in float64 from the kernel's float32 logits.
"""

import math
import sys
import time

import numpy as np

from .args import UsageError, add_model, model_kwargs
from .model import PyllmError

DEFAULT_CTX = 512  # llama-perplexity's default context

__all__ = [
    "DEFAULT_CTX",
    "read_text",
    "tokenize",
    "token_nll",
    "perplexity",
    "add_arguments",
    "main",
]


def read_text(path):
    """The file's text; one-line PyllmError if it is missing, unreadable or not UTF-8."""
    from .safeio import error_line, open_regular

    try:
        with open_regular(path, "text file") as f:  # a FIFO or /dev/zero would block or never end
            data = f.read()
    except OSError as e:
        raise PyllmError(error_line(path, e)) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PyllmError(
            f"{path}: not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})"
        ) from None


def tokenize(m, text):
    """The ids llama-perplexity evaluates: BOS first if the tokenizer adds one, never EOS."""
    tok = m.tokenizer
    return tok.encode(text, add_bos=bool(tok.add_bos))


def token_nll(logits, targets):
    """-log softmax(logits[i])[targets[i]] for each row, in float64."""
    x = np.asarray(logits, dtype=np.float64)
    mx = x.max(axis=1, keepdims=True)
    lse = mx[:, 0] + np.log(np.exp(x - mx).sum(axis=1))
    return lse - x[np.arange(len(targets)), np.asarray(targets)]


def perplexity(m, tokens, n_ctx=DEFAULT_CTX, n_chunks=None, on_chunk=None):
    """llama-perplexity's estimate over tokens with model m (m.n_ctx >= n_ctx).

    n_chunks: None or negative = every whole chunk, else at most that many.
    on_chunk(i, running_ppl, seconds): called after each chunk (i from 1).
    Returns {"ppl", "ppl_err", "nll_mean", "count", "n_chunks", "n_ctx", "chunk_ppl"
    (the running perplexity after each chunk), "nll" (float64, every scored token)}.
    """
    n_ctx = int(n_ctx)
    if n_ctx < 4:
        raise PyllmError(f"context size {n_ctx} is too small for perplexity (at least 4)")
    if n_ctx > m.n_ctx:
        raise PyllmError(f"context size {n_ctx} exceeds the model's open context of {m.n_ctx}")
    tokens = [int(t) for t in tokens]
    if len(tokens) < 2 * n_ctx:
        raise PyllmError(
            f"you need at least {2 * n_ctx} tokens to evaluate perplexity with a context of "
            f"{n_ctx}; the text tokenizes to only {len(tokens)} tokens"
        )
    n_max = len(tokens) // n_ctx
    n = n_max if n_chunks is None or n_chunks < 0 else min(int(n_chunks), n_max)
    if n == 0:
        raise PyllmError("--chunks 0: nothing to evaluate")
    tok = m.tokenizer
    bos = tok.bos_id if tok.add_bos else None
    first = n_ctx // 2
    nll, chunk_ppl = [], []
    total = total2 = 0.0
    count = 0
    for i in range(n):
        t0 = time.perf_counter()
        chunk = tokens[i * n_ctx : (i + 1) * n_ctx]
        if bos is not None:
            chunk[0] = bos
        logits = m.logits(chunk)[first : n_ctx - 1]
        v = token_nll(logits, chunk[first + 1 :])
        del logits
        nll.append(v)
        total += float(v.sum())
        total2 += float((v * v).sum())
        count += len(v)
        chunk_ppl.append(math.exp(total / count))
        if on_chunk:
            on_chunk(i + 1, chunk_ppl[-1], time.perf_counter() - t0)
    mean = total / count
    ppl = math.exp(mean)
    var = total2 / count - mean * mean
    err = ppl * math.sqrt(var / (count - 1)) if var > 0 and count > 1 else 0.0
    return {
        "ppl": ppl,
        "ppl_err": err,
        "nll_mean": mean,
        "count": count,
        "n_chunks": n,
        "n_ctx": n_ctx,
        "chunk_ppl": chunk_ppl,
        "nll": np.concatenate(nll),
    }


def add_arguments(p):
    p.add_argument("model", help="the pyllm parameters file")
    p.add_argument("textfile", help="the UTF-8 text to score (e.g. wikitext-2's wiki.test.raw)")
    # llama-perplexity's context default, not the generation one
    add_model(
        p,
        ctx_size=DEFAULT_CTX,
        ctx_help=f"tokens per chunk; the second half of each is scored (default {DEFAULT_CTX})",
    )
    p.add_argument(
        "--chunks",
        type=int,
        default=-1,
        help="evaluate at most this many chunks (default -1: every whole chunk)",
    )


def main(a):
    from .model import load

    if a.ctx_size < 4:
        raise UsageError(f"-c {a.ctx_size}: the context must be at least 4 tokens")
    if a.chunks == 0:
        raise UsageError("--chunks 0: nothing to evaluate (-1 = every chunk)")
    text = read_text(a.textfile)
    m = load(a.model, **model_kwargs(a))
    err = sys.stderr
    t0 = time.perf_counter()
    tokens = tokenize(m, text)
    t_tok = time.perf_counter() - t0
    if len(tokens) < 2 * a.ctx_size:  # before any other output: the error is the only line
        raise PyllmError(
            f"{a.textfile} tokenizes to only {len(tokens)} tokens; perplexity with a context of "
            f"{a.ctx_size} needs at least {2 * a.ctx_size}"
        )
    n_max = len(tokens) // a.ctx_size
    n = n_max if a.chunks < 0 else min(a.chunks, n_max)
    print(
        f"perplexity: tokenized {len(text)} characters into {len(tokens)} tokens "
        f"in {1e3 * t_tok:.1f} ms",
        file=err,
    )
    print(
        f"perplexity: calculating perplexity over {n} chunks, n_ctx={a.ctx_size}, "
        f"{m.threads} threads",
        file=err,
    )

    def on_chunk(i, ppl, seconds):
        if i == 1:
            print(
                f"perplexity: {seconds:.2f} seconds per pass - ETA {seconds * n / 60:.2f} minutes",
                file=err,
                flush=True,
            )
        sys.stdout.write(f"[{i}]{ppl:.4f},")
        sys.stdout.flush()

    r = perplexity(m, tokens, a.ctx_size, n, on_chunk=on_chunk)
    sys.stdout.write("\n")
    print(f"Final estimate: PPL = {r['ppl']:.4f} +/- {r['ppl_err']:.5f}")
    return 0
