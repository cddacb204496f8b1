"""Lookup drafting: propose the next tokens from the context itself, and decide how many to verify.

Model.generate verifies a draft with one forward pass over [last token] + draft and keeps the
accepted prefix plus the model's own next token (the exact rule is Sampler.verify). This module
holds the three pieces it needs, none of which touch the kernel:

  NgramIndex  where each recent 1..3-gram of the context last occurred, updated one token at a
              time; propose() drafts what followed the longest suffix match.
  BatchCost   cost(T)/cost(1): a forward over T new tokens relative to one. Starts from a prior
              table and learns from the model's own forward times (one batch is tried early
              to calibrate it), so drafting pays off as soon as the kernel makes small
              batches cheap.
  DraftPolicy the draft length: it drafts k tokens only when the expected tokens per pass,
              1 + a + ... + a^k (a: the recent acceptance rate for matches of that n-gram
              order), beat the pass's cost; otherwise it decodes plainly (and still scores the
              proposal against the token the model chose, so it notices when drafts start to
              be right again).
"""

MAX_N = 3  # longest n-gram matched
DRAFT_MAX, DRAFT_MIN = 16, 0  # llama.cpp's --draft-max / --draft-min defaults
# cost(T)/cost(1) of a verify pass (every position's logits) on the kernel of a8bef65, SmolLM2-135M
# at depth 512, 1 thread (`pyllm bench --batch`; 2 threads: 1.15, 1.19, 1.63, 2.89): the prior,
# until the model's own forward times say otherwise. Linear between these points, beyond 16 by
# the last slope.
PRIOR_COST = {1: 1.0, 2: 1.1, 4: 1.55, 8: 2.3, 16: 4.4}
# a pass is drafted only when it is expected to beat plain decode by this factor: the acceptance
# and cost estimates are noisy, and a wasted pass costs more than a skipped one loses
GAIN_MARGIN = 1.2
DECAY = 0.9  # weight of the previous acceptance estimate per observed draft token
TIME_EMA = 0.25  # weight of a new forward time in the running estimate
# Until a batch has been timed, one is tried when it would pay this much on an ideal small-batch
# kernel, cost(T)/cost(1) = 1 + EXPLORE_SLOPE (T - 1): its time then rescales the prior.
EXPLORE_GAIN, EXPLORE_SLOPE = 1.3, 0.1


class NgramIndex:
    """The context's tokens and, for n = 1..max_n, each n-gram's latest occurrence that has a
    known follower: appending a token makes the n-grams just before it point at it."""

    def __init__(self, tokens=(), max_n=MAX_N):
        self.max_n = max_n
        self.tokens = []
        self.follower = [None] + [
            {} for _ in range(max_n)
        ]  # follower[n][ngram] = index of the next token
        for t in tokens:
            self.append(t)

    def append(self, tok):
        t, i = self.tokens, len(self.tokens)
        for n in range(1, min(self.max_n, i) + 1):
            self.follower[n][tuple(t[i - n : i])] = i
        t.append(tok)

    def propose(self, k):
        """(n, draft): up to k tokens that followed the latest earlier occurrence of the longest
        suffix n-gram of the context (n = max_n down to 1); (0, []) when nothing matches."""
        t, size = self.tokens, len(self.tokens)
        if k <= 0:
            return 0, []
        for n in range(min(self.max_n, size), 0, -1):
            i = self.follower[n].get(tuple(t[size - n :]))
            if i is not None:
                return n, t[i : i + k]
        return 0, []


def _interpolate(points, T):
    """Piecewise-linear through points {T: cost}, extended past the last by its slope."""
    xs = sorted(points)
    if T in points:
        return points[T]
    if T < xs[0]:
        return points[xs[0]]
    for a, b in zip(xs, xs[1:]):
        if a < T < b:
            return points[a] + (points[b] - points[a]) * (T - a) / (b - a)
    a, b = (xs[-2], xs[-1]) if len(xs) > 1 else (xs[-1], xs[-1])
    slope = (points[b] - points[a]) / (b - a) if b > a else 0.0
    return points[b] + slope * (T - b)


class BatchCost:
    """cost(T)/cost(1), from the prior table (configured) and, with learn=True, from the seconds
    the model's own forwards take (observe): a size with measurements uses them; one without
    is interpolated between measured sizes, or outside them follows the prior's shape scaled
    to the nearest measured size."""

    def __init__(self, prior=None, learn=True):
        prior = dict(PRIOR_COST if prior is None else prior)
        if any(not (isinstance(T, int) and T >= 1 and c > 0) for T, c in prior.items()):
            raise ValueError(
                "batch costs: a table {T: cost(T)/cost(1)} with T >= 1 and positive costs"
            )
        prior.setdefault(1, 1.0)
        self.prior = {T: c / prior[1] for T, c in prior.items()}
        self._prior = [1.0] + [
            _interpolate(self.prior, T) for T in range(1, 258)
        ]  # T <= draft max + 1
        self.learn = learn
        self.seconds = {}  # T -> running estimate of one forward's seconds
        self._batch_version, self._cache = 0, None

    def observe(self, T, seconds):
        if not self.learn or seconds <= 0:
            return
        old = self.seconds.get(T)
        self._batch_version += T > 1
        if old is None:
            self.seconds[T] = seconds
        else:  # a descheduled run counts at most twice the estimate: one outlier cannot ban a size
            self.seconds[T] = old + TIME_EMA * (min(seconds, 2 * old) - old)

    def calibrated(self):
        """Whether a batch of more than one token has been timed (and one token, to compare)."""
        return 1 in self.seconds and any(x > 1 for x in self.seconds)

    def ratio(self, T):
        return self.ratios(T)[T]

    def ratios(self, n):
        """[cost(T)/cost(1) for T = 0..n] (T = 0 reads as 1); recomputed when a batch's time
        has changed or one token's by more than 1%, as a decode step asks every token."""
        t1 = self.seconds.get(1)
        c = self._cache
        if (
            c
            and c[0] == n
            and c[1] == self._batch_version
            and (t1 == c[2] or (t1 and c[2] and abs(t1 / c[2] - 1) < 0.01))
        ):
            return c[3]
        out = self._ratios(n, t1)
        self._cache = (n, self._batch_version, t1, out)
        return out

    def _ratios(self, n, t1):
        known = {x: s / t1 for x, s in self.seconds.items() if x > 1} if t1 and self.learn else {}
        xs = sorted(known)
        top = max([n] + xs)
        prior = (
            self._prior
            if top < len(self._prior)
            else [1.0] + [_interpolate(self.prior, T) for T in range(1, top + 1)]
        )
        out = [1.0] + prior[1 : n + 1]
        if not xs:
            return out
        for T in range(2, n + 1):
            if T in known:
                out[T] = known[T]
            elif xs[0] < T < xs[-1]:
                lo = max(x for x in xs if x < T)
                hi = min(x for x in xs if x > T)
                out[T] = known[lo] + (known[hi] - known[lo]) * (T - lo) / (hi - lo)
            else:  # outside the measured sizes: the prior's shape, its excess scaled to the nearest
                near = xs[-1] if T > xs[-1] else xs[0]
                scale = (known[near] - 1) / max(prior[near] - 1, 1e-9)
                out[T] = 1 + max(scale, 0.0) * (prior[T] - 1)
        return out

    def table(self, sizes=(1, 2, 4, 8, 16)):
        return {T: round(self.ratio(T), 3) for T in sizes}


class DraftPolicy:
    """How many drafted tokens to verify in the next pass; learns the acceptance rate per
    n-gram order from verify results and from plain steps scored against their proposal."""

    def __init__(self, cost, draft_max=DRAFT_MAX, draft_min=DRAFT_MIN, max_n=MAX_N):
        self.cost, self.draft_max, self.draft_min = cost, draft_max, draft_min
        self.hits = [0.3] * (max_n + 1)  # decayed accepted draft tokens, per match order n
        self.trials = [1.0] * (max_n + 1)  # decayed drafted tokens scored (a prior of a = 0.3)

    def rate(self, n):
        return self.hits[n] / self.trials[n]

    def _score(self, n, hit):
        self.hits[n] = DECAY * self.hits[n] + hit
        self.trials[n] = DECAY * self.trials[n] + 1.0

    def observe(self, n, drafted, accepted):
        """A verify pass of `drafted` tokens from an order-n match accepted the first `accepted`."""
        for _ in range(accepted):
            self._score(n, 1.0)
        if accepted < drafted:
            self._score(n, 0.0)

    def shadow(self, n, hit):
        """A plain step: did the model's token equal the proposal's first token?"""
        self._score(n, 1.0 if hit else 0.0)

    def choose(self, n, available):
        """Draft tokens to verify (0 = a plain step) for an order-n proposal of `available`
        tokens."""
        hi = min(self.draft_max, available)
        lo = max(self.draft_min, 1)
        if n <= 0 or hi < lo:
            return 0
        a = self.rate(n)
        ratio = self.cost.ratios(hi + 1)
        best_k, best = 0, GAIN_MARGIN  # plain decode: 1 token per cost(1), times the margin
        explore_k, explore = 0, EXPLORE_GAIN
        expected, power = 1.0, 1.0
        for k in range(1, hi + 1):
            power *= a
            expected += power  # 1 + a + ... + a^k tokens out of a pass over k + 1
            if k < lo:
                continue
            gain = expected / ratio[k + 1]
            if gain > best:
                best_k, best = k, gain
            ideal = expected / (1 + EXPLORE_SLOPE * k)
            if ideal > explore:
                explore_k, explore = k, ideal
        c = self.cost
        if best_k == 0 and explore_k and c.learn and 1 in c.seconds and not c.calibrated():
            return explore_k  # once, after a plain step: the measured time rescales the prior
        return best_k


def check(draft_max, draft_min):
    """ValueError with a one-line message unless the pair is usable."""
    for name, v in (("draft_max", draft_max), ("draft_min", draft_min)):
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 256:
            raise ValueError(f"{name}={v!r} is outside 0..256")
    if draft_max and draft_min > draft_max:
        raise ValueError(f"draft_min={draft_min} exceeds draft_max={draft_max}")


def stats_text(s):
    """The drafting part of a timings line, from Model.stats."""
    drafted, accepted = s.get("draft_tokens", 0), s.get("draft_accepted", 0)
    kept = f" ({100 * accepted / drafted:.0f}%)" if drafted else ""
    return (
        f"drafted {drafted}, accepted {accepted}{kept} in {s.get('verify_steps', 0)} verify passes"
    )
