"""Lookup drafting (pyllm/lookup.py, Model.generate, Sampler.verify): the n-gram index, the
cost model and policy, and that drafting never changes the output: greedy text identical,
sampled text identical for a seed, and the sampled distribution checked by a chi-square test
that also rejects deliberately wrong acceptance rules."""

import math
import os

import numpy as np
import pytest

import pyllm
from pyllm import cli, format
from pyllm.chat import Template
from pyllm.lookup import PRIOR_COST, BatchCost, DraftPolicy, NgramIndex
from pyllm.sample import Sampler
from tiny import make_tiny_model

# batches that cost next to nothing: the policy drafts at every chance
FREE = {1: 1.0, **{T: 0.01 for T in range(2, 300)}}


# ---------- the index ----------
def test_index_proposes_the_longest_latest_match():
    idx = NgramIndex([1, 2, 3, 4, 9, 2, 3, 5, 7, 1, 2, 3])
    # suffix (1, 2, 3) occurred at 0..2, followed by 4, 9, 2, ...
    assert idx.propose(3) == (3, [4, 9, 2])
    idx.append(8)  # suffix 8: never seen before -> no match at any order
    assert idx.propose(4) == (0, [])
    idx = NgramIndex([5, 6, 0, 6, 1, 6])
    assert idx.propose(2) == (1, [1, 6])  # the latest earlier 6 is followed by 1
    idx = NgramIndex([7, 7, 7])
    assert idx.propose(5) == (
        2,
        [7],
    )  # (7, 7) occurred at 0..1, followed by the last 7; never itself
    assert NgramIndex([]).propose(3) == (0, []) and NgramIndex([4]).propose(3) == (0, [])
    assert idx.propose(0) == (0, [])


def test_index_incremental_equals_a_rescan():
    rng = np.random.default_rng(0)
    toks = rng.integers(0, 6, 400).tolist()  # a small alphabet: many repeats
    idx = NgramIndex()
    for i, t in enumerate(toks):
        idx.append(t)
        ctx = toks[: i + 1]
        want = (0, [])
        for n in (3, 2, 1):  # brute force: the latest start j < len - n with the same n tokens
            if len(ctx) <= n:
                continue
            js = [j for j in range(len(ctx) - n) if ctx[j : j + n] == ctx[-n:]]
            if js:
                want = (n, ctx[js[-1] + n : js[-1] + n + 4])
                break
        assert idx.propose(4) == want, i


# ---------- the cost model and policy ----------
def test_batch_cost_prior_learning_and_outliers():
    c = BatchCost()
    assert c.ratio(1) == 1.0 and c.ratio(2) == PRIOR_COST[2]
    assert c.ratio(3) == pytest.approx((PRIOR_COST[2] + PRIOR_COST[4]) / 2)
    assert c.ratio(20) > c.ratio(16) > c.ratio(8)
    c.observe(1, 0.010)
    c.observe(9, 0.012)
    assert c.ratio(9) == pytest.approx(1.2) and c.calibrated()
    c.observe(3, 0.014)
    assert c.ratio(5) == pytest.approx(1.4 - 0.2 * 2 / 6)  # between measured sizes
    prior12 = PRIOR_COST[8] + (PRIOR_COST[16] - PRIOR_COST[8]) / 2
    prior9 = PRIOR_COST[8] + (PRIOR_COST[16] - PRIOR_COST[8]) / 8
    assert c.ratio(12) == pytest.approx(1 + (prior12 - 1) * 0.2 / (prior9 - 1))
    c.observe(9, 10.0)  # a descheduled run moves the estimate by at most a step towards 2x
    assert c.ratio(9) < 1.6
    assert not BatchCost().calibrated()
    fixed = BatchCost({1: 2.0, 4: 3.0}, learn=False)
    fixed.observe(1, 1.0)
    assert fixed.ratio(4) == 1.5 and fixed.ratio(2) == pytest.approx(1 + 0.5 / 3)
    with pytest.raises(ValueError):
        BatchCost({0: 1.0})


def test_policy_drafts_only_when_it_pays():
    # today's costs: a ~50% acceptance never pays, a ~95% one does
    p = DraftPolicy(BatchCost(learn=False), draft_max=16)
    assert p.choose(3, 16) == 0
    for _ in range(40):
        p.shadow(3, True)
    assert p.choose(3, 16) > 4
    assert p.choose(3, 0) == 0 and p.choose(0, 16) == 0
    for _ in range(40):
        p.observe(3, 4, 0)  # rejected every time: back to plain
    assert p.choose(3, 16) == 0
    # free batches: draft everything; draft_min drops short proposals; draft_max caps
    p = DraftPolicy(BatchCost(FREE, learn=False), draft_max=6, draft_min=3)
    assert p.choose(1, 10) == 6 and p.choose(1, 3) == 3 and p.choose(1, 2) == 0


# a kernel on which small batches cost nearly what they do separately (as pyllm's did before
# its small-batch path): the exploring and calibrating logic, whatever the shipped prior says
SLOW_BATCHES = {1: 1.0, 2: 2.7, 4: 2.95, 8: 3.2, 16: 5.3}


def test_policy_calibrates_the_cost_once():
    c = BatchCost(SLOW_BATCHES)
    p = DraftPolicy(c, draft_max=8)
    p.hits[2], p.trials[2] = 0.5, 1.0  # 50%: under the prior no size pays
    assert p.choose(2, 8) == 0  # no time of one token yet: nothing to compare a batch with
    c.observe(1, 0.01)
    k = p.choose(2, 8)
    assert 1 <= k <= 4  # would pay on an ideal kernel: one pass measures it
    c.observe(k + 1, 0.01 * c.ratio(k + 1))  # as expensive as the prior said
    assert c.calibrated() and [p.choose(2, n) for n in (8, 4, 2)] == [0, 0, 0]  # no more exploring
    p = DraftPolicy(c, draft_max=8)
    assert p.choose(2, 8) == 0  # a new reply keeps the calibration
    c = BatchCost(SLOW_BATCHES)
    p = DraftPolicy(c, draft_max=8)
    p.hits[2], p.trials[2] = 0.5, 1.0
    c.observe(1, 0.01)
    k = p.choose(2, 8)
    c.observe(k + 1, 0.01 * (1 + 0.05 * k))  # the kernel is cheaper than the prior: drafting pays
    assert p.choose(2, 8) >= 2
    p.hits[2], p.trials[2] = 0.05, 1.0  # unless drafts are never right
    assert p.choose(2, 8) == 0
    fixed = BatchCost(SLOW_BATCHES, learn=False)
    assert DraftPolicy(fixed).choose(2, 8) == 0  # a fixed table: never explores


# ---------- on a tiny model ----------
def make_nearly_markov_model(path, seed, attention=0.05, **overrides):
    """A tiny random model whose attention output is scaled down: its next token depends
    mostly on the current one, so its text repeats and drafts are often right (a plain
    random model's are almost never), while the cache still matters."""
    make_tiny_model(path, seed=seed, **overrides)
    spans = [
        (t["offset"], 2 * int(np.prod(t["shape"])))
        for t in format.read(path).meta["tensors"]
        if t["name"].endswith("attn_out")
    ]
    raw = np.memmap(path, dtype=np.uint8, mode="r+")
    for off, nbytes in spans:  # elementwise, so the stored block layout does not matter
        raw[off : off + nbytes].view(np.float16)[:] *= np.float16(attention)
    raw.flush()
    del raw


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("lookup") / "tiny.bin")
    make_nearly_markov_model(path, seed=5)
    return path


def run(m, prompt, **kw):
    text = "".join(m.generate(prompt, **kw))
    return text, dict(m.stats)


PROMPTS = [
    "the cat sat on the mat. the cat sat on the mat. the dog",
    "hello world! hello world! hello",
    "def main():\n    return 1 + 2\ndef main():\n",
    "12345 12345 1234",
    "The capital of France is",
]


def test_batch_logits_equal_one_at_a_time_after_rewinds(tiny):
    """What exactness rests on: a verify pass's logits at every position are bit-identical to
    evaluating those tokens one by one, at any depth, over a cache whose later positions hold
    the rejected tokens of an earlier pass."""
    m = pyllm.load(tiny, threads=2)
    rng = np.random.default_rng(1)
    ctx = rng.integers(0, m.vocab_size, 120).tolist()
    fresh = m.logits(ctx)
    for depth, T in ((0, 5), (40, 17), (89, 2), (60, 9), (100, 1)):
        m.reset()
        m.eval(
            ctx[:depth] + rng.integers(0, m.vocab_size, 20).tolist()
        )  # stale positions past depth
        m.rewind(depth)
        block = m._forward(ctx[depth : depth + T], True)
        m.rewind(depth)
        one = np.stack([m.eval([t]) for t in ctx[depth : depth + T]])
        assert np.array_equal(block, one) and np.array_equal(block, fresh[depth : depth + T]), (
            depth,
            T,
        )


@pytest.mark.parametrize("threads", [1, 2])
def test_greedy_identical_with_and_without_drafting(tiny, threads):
    m = pyllm.load(tiny, threads=threads)
    drafted = 0
    for prompt in PROMPTS:
        for cost in (BatchCost(FREE, learn=False), BatchCost()):
            m.batch_cost = cost
            plain, s0 = run(m, prompt, max_tokens=200, temperature=0, draft_max=0, stop_ids=[])
            text, s1 = run(m, prompt, max_tokens=200, temperature=0, draft_max=8, stop_ids=[])
            assert text == plain, prompt
            assert (s1["gen_tokens"], s1["stop"], s1["last_token"]) == (
                s0["gen_tokens"],
                s0["stop"],
                s0["last_token"],
            )
            assert s0["draft_tokens"] == 0 and s1["draft_accepted"] <= s1["draft_tokens"]
            drafted += s1["draft_accepted"]
    assert drafted > 300  # drafts were really accepted


@pytest.mark.parametrize(
    "kw",
    [
        dict(temperature=0.8),
        dict(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0),
        dict(temperature=0.7, top_k=5, top_p=0.9, repeat_penalty=1.3, repeat_last_n=8),
        dict(temperature=1.0, min_p=0.2, repeat_penalty=1.1, repeat_last_n=-1),
    ],
)
def test_sampled_text_identical_for_a_seed(tiny, kw):
    m = pyllm.load(tiny, threads=1)
    m.batch_cost = BatchCost(FREE, learn=False)
    accepted = 0
    for seed in range(6):
        for prompt in PROMPTS[:3]:
            plain, s0 = run(m, prompt, max_tokens=60, seed=seed, draft_max=0, **kw)
            text, s1 = run(m, prompt, max_tokens=60, seed=seed, draft_max=6, **kw)
            assert text == plain, (seed, prompt)
            assert s1["gen_tokens"] == s0["gen_tokens"] and s1["stop"] == s0["stop"]
            accepted += s1["draft_accepted"]
    assert accepted > 0


def agreed_drafts(monkeypatch):
    """Record the draft tokens the model agreed with (Sampler.verify accepted)."""
    agreed = []
    real_verify = Sampler.verify

    def logged(self, logits, history, draft):
        tok, ok = real_verify(self, logits, history, draft)
        if ok:
            agreed.append(draft)
        return tok, ok

    monkeypatch.setattr(Sampler, "verify", logged)
    return agreed


def test_stops_limits_and_context_as_without_drafting(tiny, monkeypatch):
    """A stop token inside an accepted draft ends the text there; stop tokens, max_tokens and a
    full context cut the text where plain decoding does."""
    m = pyllm.load(tiny, threads=1, n_ctx=96)
    m.batch_cost = BatchCost(FREE, learn=False)
    prompt = m.tokenizer.encode(PROMPTS[0])
    run(m, prompt, max_tokens=20, temperature=0, draft_max=0, stop_ids=[])
    prompt = list(m.tokens) + [
        m.stats["last_token"]
    ]  # the model's own text: its continuation repeats it
    run(m, prompt, max_tokens=40, temperature=0, draft_max=0, stop_ids=[])
    gen = m.tokens[len(prompt) :]
    agreed = agreed_drafts(monkeypatch)
    inside = 0
    for stop in sorted(set(gen) & set(prompt)):
        plain, s0 = run(m, prompt, max_tokens=40, temperature=0, draft_max=0, stop_ids=[stop])
        agreed.clear()
        text, s1 = run(m, prompt, max_tokens=40, temperature=0, draft_max=8, stop_ids=[stop])
        assert (
            text == plain and s1["stop"] == s0["stop"] and s1["gen_tokens"] == s0["gen_tokens"]
        ), stop
        inside += stop in agreed
    assert inside > 0
    for n in (0, 1, 2, 3, 7, 13):
        plain, s0 = run(m, prompt, max_tokens=n, temperature=0, draft_max=0, stop_ids=[])
        text, s1 = run(m, prompt, max_tokens=n, temperature=0, draft_max=8, stop_ids=[])
        assert (
            text == plain and s1["gen_tokens"] == s0["gen_tokens"] == n and s1["stop"] == "length"
        ), n
    plain, s0 = run(m, prompt, max_tokens=1000, temperature=0, draft_max=0, stop_ids=[])
    text, s1 = run(m, prompt, max_tokens=1000, temperature=0, draft_max=16, stop_ids=[])
    assert s0["stop"] == s1["stop"] == "context" and text == plain and len(m.tokens) == m.n_ctx
    assert s1["verify_steps"] > 0


def test_generator_closed_mid_draft_leaves_a_usable_cache(tiny):
    m = pyllm.load(tiny, threads=1)
    m.batch_cost = BatchCost(FREE, learn=False)
    want, _ = run(m, PROMPTS[1], max_tokens=50, temperature=0, draft_max=0)
    g = m.generate(PROMPTS[1], max_tokens=50, temperature=0, draft_max=8)
    next(g), next(g)
    g.close()
    again, _ = run(m, PROMPTS[1], max_tokens=50, temperature=0, draft_max=8)
    assert again == want


def test_bad_draft_arguments(tiny):
    m = pyllm.load(tiny, threads=1)
    for kw in (
        dict(draft_max=-1),
        dict(draft_min=-2),
        dict(draft_max=1000),
        dict(draft_max=2, draft_min=5),
        dict(draft_max=2.5),
        dict(draft_max="4"),
    ):
        with pytest.raises(pyllm.PyllmError, match="draft"):
            m.generate("hi", **kw)
    assert "".join(
        m.generate("hi", max_tokens=3, draft_max=0, draft_min=5, temperature=0)
    )  # off: min is moot


def test_cli_flags(tiny, capsys):
    rc = cli.main(
        [
            "generate",
            tiny,
            "hello world! hello world! hello",
            "-n",
            "20",
            "--temp",
            "0",
            "--draft-max",
            "4",
            "--draft-min",
            "1",
            "--timings",
        ]
    )
    out, err = capsys.readouterr()
    assert rc == 0 and out.strip()
    assert "drafted" in err and "accepted" in err
    rc = cli.main(
        [
            "generate",
            tiny,
            "hello world! hello world! hello",
            "-n",
            "20",
            "--temp",
            "0",
            "--draft-max",
            "0",
        ]
    )
    out0, _ = capsys.readouterr()
    assert rc == 0 and out0 == out
    for bad in (["--draft-max", "-3"], ["--draft-max", "2", "--draft-min", "3"]):
        rc = cli.main(["generate", tiny, "hi", *bad])
        _, err = capsys.readouterr()
        assert rc == 1 and err.count("\n") == 1 and "draft" in err


# ---------- the sampled distribution: chi-square against plain sampling ----------
SETTINGS = dict(
    temperature=1.2, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.2, repeat_last_n=16
)
N_RUNS = 3000


def chain_prompt(m, n=150):
    """A text the model itself samples: its continuations often occur in it, so about half
    the runs draft at token 2, with acceptance probabilities spread out."""
    ids = m.tokenizer.encode("the cat sat on the")
    s = Sampler(**SETTINGS, seed=1)
    for _ in range(n):
        ids.append(s(m.logits(ids)[-1], ids))
    return ids


def tokens_2_and_3(m, prompt, seeds, draft_max):
    """(token 1, token 2, token 3) of each run; token 1 comes from the prefill, never drafted."""
    out, verified = [], [0, 0]
    for seed in seeds:
        g = m.generate(
            prompt, max_tokens=3, seed=seed, stop_ids=[], draft_max=draft_max, **SETTINGS
        )
        list(g)
        out.append(tuple(m.tokens[len(prompt) :]) + (m.stats["last_token"],))
        verified[0] += m.stats["draft_tokens"]
        verified[1] += m.stats["draft_accepted"]
    m.verified = verified
    return [t[:3] for t in out]


def agreement(prompt, samples):
    """Per run: whether token 2 is what lookup proposes after the prompt and token 1 ("yes"),
    something else ("no"), or there is no proposal ("none"). A rule that accepts drafts too
    often or too rarely moves these frequencies most."""
    out = []
    for t1, t2, _ in samples:
        _, draft = NgramIndex(prompt + [t1]).propose(1)
        out.append("none" if not draft else "yes" if draft[0] == t2 else "no")
    return out


def chi_square_p_upper(stat, df):
    """P(chi2_df >= stat), via the regularised upper incomplete gamma function."""
    a, x = df / 2, stat / 2
    if x <= 0:
        return 1.0
    if x < a + 1:  # series for the lower function
        term = s = 1.0 / a
        k = a
        while abs(term) > 1e-14 * abs(s):
            k += 1
            term *= x / k
            s += term
        return max(0.0, 1.0 - s * math.exp(-x + a * math.log(x) - math.lgamma(a)))
    b, c, d = x + 1 - a, 1e300, 1 / (x + 1 - a)  # continued fraction for the upper one
    h = d
    for i in range(1, 500):
        an = -i * (i - a)
        b += 2
        d = 1 / (an * d + b)
        c = b + an / c
        h *= d * c
        if abs(d * c - 1) < 1e-14:
            break
    return math.exp(-x + a * math.log(x) - math.lgamma(a)) * h


def homogeneity_p(a, b, min_expected=5):
    """Two-sample chi-square test of equal distributions; sparse categories pooled."""
    cats = sorted(set(a) | set(b))
    ca = np.array([a.count(c) for c in cats], float)
    cb = np.array([b.count(c) for c in cats], float)
    tot = ca + cb
    big = tot * min(len(a), len(b)) / (len(a) + len(b)) >= min_expected
    ca = np.append(ca[big], ca[~big].sum())
    cb = np.append(cb[big], cb[~big].sum())
    keep = (ca + cb) > 0
    ca, cb = ca[keep], cb[keep]
    na, nb = ca.sum(), cb.sum()
    ea, eb = (ca + cb) * na / (na + nb), (ca + cb) * nb / (na + nb)
    stat = ((ca - ea) ** 2 / ea).sum() + ((cb - eb) ** 2 / eb).sum()
    return chi_square_p_upper(stat, len(ca) - 1), len(ca) - 1


def test_chi_square_helper_is_calibrated():
    assert chi_square_p_upper(3.841, 1) == pytest.approx(0.05, abs=1e-3)
    assert chi_square_p_upper(18.307, 10) == pytest.approx(0.05, abs=1e-3)
    assert chi_square_p_upper(124.342, 100) == pytest.approx(0.05, abs=1e-3)
    assert chi_square_p_upper(0.0, 5) == pytest.approx(1.0)


def always_accept(self, logits, history, draft):
    self(logits, history)
    return draft, True


def resample_with_the_draft(self, logits, history, draft):
    """A classic mistake: accept with p(x), but on rejection sample from p with x left in."""
    ids, p = self.distribution(logits, history)
    px = float(p[ids == draft].sum())
    if self.rng.random() < px:
        return draft, True
    tok = self(logits, history)
    return tok, tok == draft


@pytest.fixture(scope="module")
def plain_and_drafted(tiny):
    m = pyllm.load(tiny, threads=1)
    m.batch_cost = BatchCost(FREE, learn=False)
    prompt = chain_prompt(m)
    plain = tokens_2_and_3(m, prompt, range(N_RUNS), 0)
    drafted = tokens_2_and_3(m, prompt, range(N_RUNS, 2 * N_RUNS), 4)
    return m, prompt, plain, drafted, m.verified


def test_sampled_distribution_unchanged_by_drafting(plain_and_drafted):
    m, prompt, plain, drafted, (n_drafted, n_accepted) = plain_and_drafted
    assert (
        n_drafted > N_RUNS / 4 and n_accepted > N_RUNS / 50
    )  # drafts at token 2 and 3, some accepted
    for pick in (lambda t: t[1], lambda t: t[2], lambda t: t[1:]):  # token 2, token 3, and the pair
        p, df = homogeneity_p([pick(t) for t in plain], [pick(t) for t in drafted])
        assert df >= 8 and p > 1e-3, (p, df)
    p, df = homogeneity_p(agreement(prompt, plain), agreement(prompt, drafted))
    assert df == 2 and p > 1e-3, p


@pytest.mark.parametrize("wrong", [always_accept, resample_with_the_draft])
def test_chi_square_detects_a_wrong_rule(plain_and_drafted, monkeypatch, wrong):
    m, prompt, plain, _, _ = plain_and_drafted
    monkeypatch.setattr(Sampler, "verify", wrong)
    bad = tokens_2_and_3(m, prompt, range(N_RUNS, 2 * N_RUNS), 4)
    p = min(
        homogeneity_p([t[1] for t in plain], [t[1] for t in bad])[0],
        homogeneity_p([t[1:] for t in plain], [t[1:] for t in bad])[0],
        homogeneity_p(agreement(prompt, plain), agreement(prompt, bad))[0],
    )
    assert p < 1e-4, p  # the right rule passes at p > 1e-3


# ---------- the default model ----------
TASKS = [
    (
        "Summarise in two sentences:\n\nThe Python Software Foundation is the organisation "
        "behind Python. It holds the intellectual property rights behind the language, runs "
        "the PyPI package index, "
        "organises PyCon US and supports the community with grants.",
        60,
    ),
    ("Copy this line exactly, then stop: `for i in range(10): print(i * i)`", 30),
    (
        "Rename the function add to plus:\n\ndef add(a, b):\n    return a + b\n\nprint(add(1, 2))",
        50,
    ),
    ("Tell me a short story about a lighthouse.", 50),
]


def test_default_model_stop_inside_an_accepted_draft(default_model, monkeypatch):
    """The real model copies, so drafts are accepted: a stop token the model agrees with inside
    a draft ends the reply there, as without drafting."""
    m = pyllm.load(default_model, threads=2, n_ctx=512)
    m.batch_cost = BatchCost(FREE, learn=False)
    ids = m.tokenizer.encode(
        Template(m.chat_template).render([{"role": "user", "content": TASKS[1][0]}])
    )
    base, _ = run(m, ids, max_tokens=30, temperature=0, draft_max=0)
    gen = m.tokenizer.encode(base)
    agreed = agreed_drafts(monkeypatch)
    inside = 0
    for stop in gen[6:16:2]:
        agreed.clear()
        plain, s0 = run(m, ids, max_tokens=30, temperature=0, draft_max=0, stop_ids=[stop])
        text, s1 = run(m, ids, max_tokens=30, temperature=0, draft_max=8, stop_ids=[stop])
        assert (
            text == plain
            and s1["stop"] == s0["stop"] == "eos"
            and s1["gen_tokens"] == s0["gen_tokens"]
        )
        inside += stop in agreed
    assert inside > 0


def test_default_model_greedy_identical(default_model):
    m = pyllm.load(default_model, threads=2, n_ctx=1024)
    template = Template(m.chat_template)
    accepted = 0
    for text, n in TASKS:
        ids = m.tokenizer.encode(template.render([{"role": "user", "content": text}]))
        m.batch_cost = BatchCost(FREE, learn=False)  # draft at every chance: the hardest case
        plain, _ = run(m, ids, max_tokens=n, temperature=0, draft_max=0)
        forced, s1 = run(m, ids, max_tokens=n, temperature=0, draft_max=8)
        m.batch_cost = BatchCost()
        learnt, s2 = run(m, ids, max_tokens=n, temperature=0)  # the defaults
        assert forced == plain and learnt == plain, text
        accepted += s1["draft_accepted"]
        assert s1["verify_steps"] > 0 and s1["draft_accepted"] <= s1["draft_tokens"]
    assert accepted > 20
    assert os.path.exists(default_model)


def test_lookup_benchmark_runs_and_checks_identity(tmp_path, capsys):
    """benchmarks/lookup.py on the shipped tasks (a tiny model: a smoke test, no timing checked)."""
    import json

    tiny = str(tmp_path / "long.bin")
    make_nearly_markov_model(tiny, seed=5, max_seq_len=4096)
    import sys

    sys.path.insert(
        0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
    )
    import lookup as lookup_bench

    out = tmp_path / "r.json"
    assert lookup_bench.main([tiny, "-t", "1", "-n", "12", "-r", "2", "--json-out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "copy tasks, geometric mean" in text and "identical" in text
    res = json.loads(out.read_text())
    assert [r["task"] for r in res] == ["summarise", "answer", "edit", "chat"]
    for r in res:
        assert (
            r["identical"] and r["plain_ts"] > 0 and r["lookup_ts"] > 0 and r["prompt_tokens"] > 20
        )
    tasks = lookup_bench.load_tasks(lookup_bench.TASKS)
    assert all(t["provenance"] for t in tasks) and sum(t["kind"] == "copy" for t in tasks) == 3


def test_chat_passes_draft_settings_and_reports_them(tiny):
    from pyllm.chat import Chat

    m = pyllm.load(tiny, threads=1)
    m.batch_cost = BatchCost(FREE, learn=False)
    devnull = open(os.devnull, "w")
    on = Chat(m, sampling={"temperature": 0, "draft_max": 8}, max_tokens=40, out=devnull)
    reply = on.ask(PROMPTS[1])
    assert m.stats["verify_steps"] > 0
    assert "drafted" in on.stats_line() and "accepted" in on.stats_line()
    off = Chat(m, sampling={"temperature": 0, "draft_max": 0}, max_tokens=40, out=devnull)
    assert off.ask(PROMPTS[1]) == reply and m.stats["verify_steps"] == 0
    assert "drafted 0, accepted 0 in 0 verify passes" in off.stats_line()


def test_policy_on_unrepeated_text_stays_plain():
    """Drafts that are right 10% of the time are never worth a pass at today's costs: after
    at most the one calibrating pass the policy decodes plainly (open chat is not slower)."""
    rng = np.random.default_rng(0)
    c = BatchCost()
    p = DraftPolicy(c)
    passes = 0
    for _ in range(500):
        n = int(rng.integers(1, 4))
        k = p.choose(n, 16)
        hit = rng.random() < 0.1
        if k:
            passes += 1
            c.observe(k + 1, 0.01 * PRIOR_COST[8])
            p.observe(n, k, int(hit))
        else:
            c.observe(1, 0.01)
            p.shadow(n, hit)
    assert passes <= 1


def test_interleaved_drafting_generators_keep_their_own_text(tiny):
    """Two drafting generations on one model, stepped in turn (each moves the cache under the
    other): each yields the text it yields alone."""
    m = pyllm.load(tiny, threads=1)
    m.batch_cost = BatchCost(FREE, learn=False)
    kw = dict(max_tokens=60, temperature=0, draft_max=8, stop_ids=[])
    alone = [run(m, p, **kw)[0] for p in PROMPTS[:2]]
    gens = [m.generate(p, **kw) for p in PROMPTS[:2]]
    out = ["", ""]
    live = [True, True]
    while any(live):
        for j, g in enumerate(gens):
            if live[j]:
                try:
                    out[j] += next(g)
                except StopIteration:
                    live[j] = False
    assert out == alone
