"""Sampling: llama.cpp's default chain and names (penalties, top-k, top-p, min-p, temperature).

temperature <= 0 is greedy (argmax after penalties). top_k <= 0 or top_p >= 1 or
min_p <= 0 turn that filter off. The same seed gives the same tokens.
"""

import numpy as np


class Sampler:
    def __init__(
        self,
        temperature=0.8,
        top_k=40,
        top_p=0.95,
        min_p=0.05,
        repeat_penalty=1.0,
        repeat_last_n=64,
        seed=None,
    ):
        for name, v, lo, hi in (("top_p", top_p, 0.0, 1.0), ("min_p", min_p, 0.0, 1.0)):
            if not lo <= v <= hi:
                raise ValueError(f"{name}={v} is outside [{lo}, {hi}]")
        if top_p == 0:
            raise ValueError("top_p=0 keeps no token; use --temp 0 for greedy decoding")
        if not repeat_penalty > 0:
            raise ValueError(f"repeat_penalty={repeat_penalty} must be positive (1.0 is off)")
        if repeat_last_n < -1:
            raise ValueError(f"repeat_last_n={repeat_last_n} must be -1 (all), 0 (off) or positive")
        self.temperature, self.top_k, self.top_p, self.min_p = temperature, top_k, top_p, min_p
        self.repeat_penalty, self.repeat_last_n = repeat_penalty, repeat_last_n
        self.rng = np.random.default_rng(seed)

    def distribution(self, logits, history=()):
        """(ids, p): the tokens the whole chain keeps and their probabilities, for the logits at a
        position whose preceding tokens are history. Greedy: the argmax, p = [1]."""
        logits = np.asarray(logits, dtype=np.float32)
        if self.repeat_penalty != 1.0 and self.repeat_last_n != 0 and len(history):
            recent = history if self.repeat_last_n == -1 else history[-self.repeat_last_n :]
            ids = np.unique(np.asarray(recent, dtype=np.int64))
            logits = logits.copy()
            v = logits[ids]
            logits[ids] = np.where(v > 0, v / self.repeat_penalty, v * self.repeat_penalty)
        if self.temperature <= 0:
            return np.array([int(np.argmax(logits))]), np.ones(1)
        ids = np.arange(len(logits))
        if 0 < self.top_k < len(logits):
            ids = np.argpartition(-logits, self.top_k - 1)[: self.top_k]
        ids = ids[np.argsort(-logits[ids], kind="stable")]
        z = logits[ids].astype(np.float64)
        if self.top_p < 1.0:
            p = np.exp(z - z[0])
            p /= p.sum()
            keep = int(np.searchsorted(np.cumsum(p), self.top_p)) + 1
            ids, z = ids[:keep], z[:keep]
        if self.min_p > 0:
            keep = z >= z[0] + np.log(self.min_p)
            ids, z = ids[keep], z[keep]
        p = np.exp((z - z[0]) / self.temperature)
        p /= p.sum()
        return ids, p

    def __call__(self, logits, history=()):
        ids, p = self.distribution(logits, history)
        if self.temperature <= 0:
            return int(ids[0])
        return int(ids[self.rng.choice(len(ids), p=p)])  # one uniform draw per sampled token

    def verify(self, logits, history, draft):
        """The exact rule for a deterministic draft token: (token, accepted).

        Accepting the draft x with probability p(x) under the whole chain, and on rejection
        sampling from p with x removed and renormalised, gives exactly p; drawing token ~ p and
        accepting iff token == x is that rule (P(accept) = p(x); a rejected draw is p given
        not x). Done this way it spends the one random draw plain sampling spends at this
        position, so with a seed, drafting changes neither the distribution nor the text."""
        tok = self(logits, history)
        return tok, tok == draft
