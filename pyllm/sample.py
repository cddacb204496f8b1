"""Sampling: llama.cpp's default chain and names (penalties, top-k, top-p, min-p, temperature).

temperature <= 0 is greedy (argmax after penalties). top_k <= 0 or top_p >= 1 or
min_p <= 0 turn that filter off. The same seed gives the same tokens.
"""
import numpy as np


class Sampler:
    def __init__(self, temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.0,
                 repeat_last_n=64, seed=None):
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

    def __call__(self, logits, history=()):
        logits = np.asarray(logits, dtype=np.float32)
        if self.repeat_penalty != 1.0 and self.repeat_last_n != 0 and len(history):
            recent = history if self.repeat_last_n == -1 else history[-self.repeat_last_n:]
            ids = np.unique(np.asarray(recent, dtype=np.int64))
            logits = logits.copy()
            v = logits[ids]
            logits[ids] = np.where(v > 0, v / self.repeat_penalty, v * self.repeat_penalty)
        if self.temperature <= 0:
            return int(np.argmax(logits))
        ids = np.arange(len(logits))
        if 0 < self.top_k < len(logits):
            ids = np.argpartition(-logits, self.top_k - 1)[:self.top_k]
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
        return int(ids[self.rng.choice(len(ids), p=p)])
