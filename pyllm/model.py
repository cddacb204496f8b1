"""The binding: load a parameters file, run the C kernel, generate text. Owns the KV position."""

import os
import sys
import threading
import time

import numpy as np

from . import format, memory, safeio
from ._pyllm import ffi, lib
from .lookup import DRAFT_MAX, DRAFT_MIN, BatchCost, DraftPolicy, NgramIndex
from .lookup import check as check_drafting
from .sample import Sampler
from .tokenizer import StreamDecoder, Tokenizer

DEFAULT_CTX = 4096
# end-of-turn markers of the common chat families, besides the file's eos/eot ids
END_OF_TURN = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|end_of_text|>",
    "<|eom_id|>",
)


class PyllmError(Exception):
    """A bad file or bad input, with a one-line message for the user."""


_FORWARD_ERRORS = {
    lib.PYLLM_E_ARG: "invalid argument",
    lib.PYLLM_E_TOKEN: "token id out of range",
    lib.PYLLM_E_CONTEXT: "context full: positions past the context size",
}


def forward_error(rc):
    """The PyllmError for a non-zero code of lib.pyllm_forward."""
    return PyllmError(_FORWARD_ERRORS.get(rc, f"pyllm_forward: error {rc}"))


# the KV cache's element types, for keys and for values (llama.cpp's names), and their sizes
CACHE_TYPES = {"f16": lib.PYLLM_CACHE_F16, "f32": lib.PYLLM_CACHE_F32}
CACHE_TYPE_BYTES = {"f16": 2, "f32": 4}


def _cache_code(cache_type, what):
    if cache_type not in CACHE_TYPES:
        raise PyllmError(f"{what} cache type {cache_type!r} is not one of {', '.join(CACHE_TYPES)}")
    return CACHE_TYPES[cache_type]


def _native_open(path, threads=1, n_ctx=0, cache_type_k="f16", cache_type_v="f16"):
    codes = _cache_code(cache_type_k, "key"), _cache_code(cache_type_v, "value")
    try:  # the OS's own words for a missing or unreadable file (the kernel refuses a FIFO too)
        safeio.open_regular(path).close()
    except OSError as e:
        raise PyllmError(safeio.error_line(path, e)) from None
    err = ffi.new("char[]", 512)
    m = lib.pyllm_open(os.fsencode(path), threads, n_ctx, *codes, err, 512)
    if m == ffi.NULL:
        raise PyllmError(ffi.string(err).decode(errors="replace"))
    return ffi.gc(m, lib.pyllm_close)


class Model:
    """A model and its KV cache. Safe to share between threads: the methods that use the
    cache run one at a time (a lock), close() waits for the one running, and any use after
    close() raises PyllmError. generate() takes the lock for each step only, so two
    generations (or a generation and logits) may interleave: each step re-prefills what
    the other displaced, and each gets the text it would get alone."""

    def __init__(
        self, path, threads=None, n_ctx=None, cache_type="f16", cache_type_k=None, cache_type_v=None
    ):
        # the cache's element types (keys, values): f16 as llama.cpp's default, or f32 (exact)
        self.cache_types = (cache_type_k or cache_type, cache_type_v or cache_type)
        _cache_code(self.cache_types[0], "key")
        _cache_code(self.cache_types[1], "value")
        self._lock = threading.RLock()
        self._m = None
        self._cache_owner = None  # the generation that made the cache, if it is one
        try:
            mf = format.read(path)
        except format.FormatError as e:
            raise PyllmError(str(e)) from None
        self.path = path
        self.config = mf.config
        self.meta = mf.meta
        try:
            self.tokenizer = Tokenizer(mf.meta["tokenizer"])
        except (KeyError, TypeError, ValueError) as e:
            raise PyllmError(f"{path}: bad tokenizer metadata ({e})") from None
        self.chat_template = mf.meta.get("chat_template")
        max_ctx = self.config["max_seq_len"]
        if n_ctx is not None and not 0 < n_ctx <= max_ctx:
            raise PyllmError(
                f"context size {n_ctx} is outside 1..{max_ctx} (the model's context length)"
            )
        if threads is not None and not 0 < threads <= 64:
            raise PyllmError(f"threads={threads} is outside 1..64")
        n_ctx = n_ctx or min(max_ctx, DEFAULT_CTX)
        try:  # before the kernel allocates: the cache of a lying header grows without bound
            element = (
                sum(CACHE_TYPE_BYTES[t] for t in self.cache_types) // 2
            )  # keys' and values' mean
            memory.check_context(
                self.config, n_ctx, threads, cache_bytes=element, map_bytes=os.path.getsize(path)
            )
        except ValueError as e:
            raise PyllmError(f"{path}: {e}") from None
        self._m = _native_open(path, threads or 0, n_ctx, *self.cache_types)
        for name, t in mf.tensors.items():  # a few KB: worth a look (once the file has loaded)
            if name.endswith("norm") and not np.isfinite(t).all():
                print(
                    f"pyllm: warning: {path}: tensor {name} holds NaN or Inf values",
                    file=sys.stderr,
                )
        self.n_ctx = lib.pyllm_n_ctx(self._m)
        self.threads = lib.pyllm_n_threads(self._m)
        self.vocab_size = self.config["vocab_size"]
        self.tokens = []  # the ids whose keys and values the cache holds, in order
        self.stop_ids = self._stop_ids()
        self.stats = {}

    def _stop_ids(self):
        tok = self.meta["tokenizer"]
        ids = {tok.get(k) for k in ("eos_token_id", "eot_token_id", "eom_token_id")}
        index = {t: i for i, t in enumerate(tok["tokens"]) if t in END_OF_TURN}
        return {
            i for i in ids | set(index.values()) if isinstance(i, int) and 0 <= i < self.vocab_size
        }

    def close(self):
        """Free the kernel's model, once any running forward pass has finished."""
        with self._lock:
            m, self._m = self._m, None
            if m is not None:
                ffi.release(m)  # runs pyllm_close now rather than at garbage collection

    def _native(self):
        """The open kernel model; the caller holds self._lock."""
        if self._m is None:
            raise PyllmError("the model is closed")
        return self._m

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- the KV cache ---
    def reset(self):
        with self._lock:
            self.tokens = []
            self._cache_owner = None

    def rewind(self, n):
        """Forget all but the first n tokens of the cache."""
        with self._lock:
            del self.tokens[n:]
            self._cache_owner = None

    def _forward(self, ids, all_positions):
        ids = [int(i) for i in ids]
        if not ids:
            raise PyllmError("no tokens to evaluate")
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise PyllmError(
                f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})"
            )
        with self._lock:
            m = self._native()
            pos = len(self.tokens)
            if pos + len(ids) > self.n_ctx:
                raise PyllmError(f"{pos + len(ids)} tokens do not fit the context of {self.n_ctx}")
            out = np.empty((len(ids) if all_positions else 1, self.vocab_size), dtype=np.float32)
            rc = lib.pyllm_forward(
                m,
                ffi.new("int[]", ids),
                len(ids),
                pos,
                ffi.cast("float *", ffi.from_buffer(out)),
                int(all_positions),
            )
            if rc:
                raise forward_error(rc)
            self.tokens += ids
            self._cache_owner = None
            return out

    def eval(self, ids):
        """Append ids to the cache; the logits of the last one."""
        return self._forward(ids, False)[0]

    def logits(self, ids):
        """Logits at every position of ids, in a fresh context: shape (len(ids), vocab)."""
        with self._lock:
            self.reset()
            return self._forward(ids, True)

    def keep_prefix(self, ids):
        """Rewind the cache to the longest prefix it shares with ids[:-1] (the last id is
        always left to evaluate); how many tokens it keeps."""
        with self._lock:
            keep = 0
            for a, b in zip(self.tokens, ids[:-1]):
                if a != b:
                    break
                keep += 1
            self.rewind(keep)
            return keep

    def prefill(self, ids):
        """Make the cache hold ids, reusing the longest prefix it already holds (at least
        the last id is evaluated); the logits of the last id."""
        with self._lock:
            return self.eval(ids[self.keep_prefix(ids) :])

    def forward_at(self, ids, pos, out=None):
        """Run the kernel once over ids (a list of ints) at cache positions pos, pos + 1, ...;
        the logits of the last id, written into out (a C-contiguous float32 array of
        vocab_size) when given, or of every id when out has shape (len(ids), vocab_size), as a
        lookup verify pass needs. No conversions and no checks beyond the kernel's own (bad
        ids or positions raise PyllmError, and nothing is run): for a caller that picks its
        positions and times each call, as `pyllm bench` does. self.tokens follows the cache:
        its first pos ids, then ids (if pos is past its end, it keeps what it holds)."""
        if out is None:
            out = np.empty(self.vocab_size, dtype=np.float32)
        elif (
            out.dtype != np.float32
            or out.shape not in ((self.vocab_size,), (len(ids), self.vocab_size))
            or not (out.flags.c_contiguous and out.flags.writeable)
        ):
            raise ValueError(
                f"out must be a writable contiguous float32 array of {self.vocab_size}"
                f" or ({len(ids)}, {self.vocab_size})"
            )
        with self._lock:
            rc = lib.pyllm_forward(
                self._native(),
                ffi.new("int[]", ids),
                len(ids),
                pos,
                ffi.cast("float *", ffi.from_buffer(out)),
                int(out.ndim == 2),
            )
            if rc:
                raise forward_error(rc)
            if pos <= len(self.tokens):
                self.tokens[pos:] = ids
            self._cache_owner = None
        return out

    # --- text ---
    def generate(
        self,
        prompt,
        max_tokens=128,
        temperature=0.8,
        top_k=40,
        top_p=0.95,
        min_p=0.05,
        repeat_penalty=1.0,
        repeat_last_n=64,
        seed=None,
        stop_ids=None,
        draft_max=DRAFT_MAX,
        draft_min=DRAFT_MIN,
    ):
        """Yield text pieces as they are produced. Stops at an end-of-turn token, after
        max_tokens, or when the context is full (self.stats["stop"] says which).

        draft_max > 0 turns on lookup drafting (pyllm/lookup.py): up to draft_max tokens that
        followed an earlier occurrence of the context's last 1..3 tokens are checked in one
        forward pass, when the policy expects that to pay; drafts shorter than draft_min are
        not checked. The text is the same with and without it, for a given seed too."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
        if len(ids) >= self.n_ctx:
            raise PyllmError(f"the prompt is {len(ids)} tokens; the context holds {self.n_ctx}")
        if max_tokens < 0:
            raise PyllmError(f"max_tokens={max_tokens} is negative")
        try:
            check_drafting(draft_max, draft_min)
        except ValueError as e:
            raise PyllmError(str(e)) from None
        sampler = Sampler(
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repeat_penalty=repeat_penalty,
            repeat_last_n=repeat_last_n,
            seed=seed,
        )
        stops = self.stop_ids if stop_ids is None else set(stop_ids)
        return self._generate(ids, max_tokens, sampler, stops, draft_max, draft_min)

    @property
    def batch_cost(self):
        """cost(T)/cost(1) of this model's forwards (lookup.BatchCost), learnt across generate
        calls; assign a BatchCost to configure it."""
        if "_batch_cost" not in self.__dict__:
            self._batch_cost = BatchCost()
        return self._batch_cost

    @batch_cost.setter
    def batch_cost(self, cost):
        self._batch_cost = cost

    def _generate(self, ids, max_tokens, sampler, stops, draft_max=0, draft_min=0):
        # The lock is held for one step at a time, never across a yield: a consumer that
        # stops iterating (or iterates from another thread) cannot block anyone. A step whose
        # cache another user of the model moved re-prefills the history first.
        t0 = time.perf_counter()
        with self._lock:
            kept = len(self.tokens)
            logits = self.prefill(ids)
            prefilled = len(self.tokens) - min(kept, len(ids))
            me = self._cache_owner = object()  # this generation, until another use of the cache
        t1 = time.perf_counter()
        stats = self.stats = {
            "prompt_tokens": len(ids),
            "prefill_tokens": prefilled,
            "prefill_s": t1 - t0,
            "gen_tokens": 0,
            "decode_s": 0.0,
            "stop": "length",
            "draft_tokens": 0,
            "draft_accepted": 0,
            "verify_steps": 0,
        }
        dec = StreamDecoder(self.tokenizer)
        history = list(ids)
        index = NgramIndex(history) if draft_max > 0 else None
        policy = DraftPolicy(self.batch_cost, draft_max, draft_min) if index else None
        cost = self.batch_cost
        # rows[i]: the logits after the pass's input i = ([last token] + draft)[i]; the cache
        # holds every input, and input i + 1 is worth keeping only if draft[i] is what row i
        # yields. `start`: the cache length before the pass.
        rows, draft, order, shadow, start = logits[None], [], 0, None, len(ids) - 1
        n = 0
        try:
            while True:
                done, accepted = False, 0
                for i, row in enumerate(rows):
                    if n >= max_tokens:
                        done = True
                        break
                    if i < len(draft):
                        tok, ok = sampler.verify(row, history, draft[i])
                        accepted += ok
                    else:
                        tok, ok = sampler(row, history), False
                    if shadow is not None:
                        policy.shadow(order, tok == shadow)
                    if tok in stops:
                        stats["stop"] = "eos"
                        done = True
                        break
                    history.append(tok)
                    n += 1
                    stats["gen_tokens"] = n
                    if index is not None:
                        index.append(tok)
                    piece = dec.push(tok)
                    if piece:
                        yield piece
                    if not ok:
                        break
                with self._lock:  # forget the rejected drafts: the inputs past row i
                    if self._cache_owner is me and len(self.tokens) == start + len(rows):
                        self.rewind(start + i + 1)
                        self._cache_owner = me
                if draft:
                    policy.observe(order, len(draft), accepted)
                    stats["draft_accepted"] += accepted
                if done or n >= max_tokens:  # the last token needs no forward: no one reads it
                    break
                if len(history) > self.n_ctx:  # the cache is full
                    stats["stop"] = "context"
                    break
                draft, shadow = [], None
                if index is not None:
                    room = min(draft_max, self.n_ctx - len(history), max_tokens - n - 1)
                    order, proposal = index.propose(room)
                    draft = proposal[: policy.choose(order, len(proposal))]
                    if proposal and not draft:
                        shadow = proposal[0]
                    if draft:
                        stats["draft_tokens"] += len(draft)
                        stats["verify_steps"] += 1
                with self._lock:
                    if not (self._cache_owner is me and len(self.tokens) == len(history) - 1):
                        self.prefill(history[:-1])  # another user moved the cache: hold ours again
                    start = len(self.tokens)
                    ts = time.perf_counter()
                    rows = self._forward([history[-1]] + draft, bool(draft))
                    cost.observe(len(rows), time.perf_counter() - ts)
                    self._cache_owner = me
            tail = dec.flush()
            if tail:
                yield tail
        finally:
            stats["decode_s"] = time.perf_counter() - t1
            stats["last_token"] = history[-1]


def load(path, threads=None, n_ctx=None, cache_type="f16", cache_type_k=None, cache_type_v=None):
    """Open a pyllm parameters file: m.config, m.tokenizer, m.logits(ids), m.generate(...).
    cache_type: the KV cache's element type, "f16" or "f32"; cache_type_k/_v set keys' or
    values'."""
    return Model(
        path,
        threads=threads,
        n_ctx=n_ctx,
        cache_type=cache_type,
        cache_type_k=cache_type_k,
        cache_type_v=cache_type_v,
    )
