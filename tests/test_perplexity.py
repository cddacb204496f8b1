"""`pyllm perplexity`: llama-perplexity's rule, checked against transformers on the same weights.

The default model (weights/smollm2-135m-instruct.f16.bin) is loaded back into transformers'
LlamaForCausalLM by tests/make_fixtures.py's loader (the very f16 weights the kernel runs); the
chunked, second-half perplexity is recomputed here with torch in float32 and must agree with
ours within 0.1%. A fake model pins down the chunking and BOS rule exactly; the command line's
output format and its errors are checked on the real model.
"""

import math
import re

import numpy as np
import pytest
import torch

import pyllm
from pyllm import format
from pyllm import perplexity as P
from pyllm.cli import build_parser, main

CTX = 256

# ~1200 SmolLM2 tokens of varied English: narrative, dialogue, science, programming, economics,
# a recipe, history, astronomy
TEXT = """\
The lighthouse on the northern cape was built in 1871, after a winter storm drove three cargo ships onto the rocks within a single week. For most of its history it was tended by one family, the Halvorsens, who kept a logbook of every ship that passed, every change in the weather and every repair to the great lamp. The entries are short and practical: "Fog from the east, horn sounded at four. Replaced the cracked pane on the seaward side. Mrs. Halvorsen ill with fever." Read together, however, they tell the story of a century of isolation, patience and small victories against the sea.

In the kitchen of a busy restaurant, timing matters more than talent. A cook who can make a perfect sauce but cannot have it ready at the same moment as the fish and the vegetables is of little use during the dinner rush. Experienced chefs therefore plan their work backwards from the moment the plate leaves the pass. They know that the potatoes need twenty-five minutes, the fish six, and the sauce only two, so they start the potatoes first and leave the sauce for last. When an order is changed at the last second, the whole sequence has to be rearranged in the head, without stopping.

Photosynthesis is the process by which green plants, algae and some bacteria turn light into chemical energy. Inside the chloroplasts, pigments such as chlorophyll absorb mostly red and blue light and reflect green, which is why leaves look green to us. The absorbed energy splits water molecules, releasing oxygen as a by-product, and the resulting energy carriers are used to fix carbon dioxide from the air into sugars. Almost every food chain on the planet depends on this reaction, and the oxygen in the atmosphere is largely its accumulated waste.

When Maria moved to the city, she did not know anyone, and the first months were harder than she had expected. She worked long hours at a small design studio, ate dinner alone in front of her laptop and spent the weekends walking through neighborhoods she could not pronounce. Things changed when she joined a community choir that met on Tuesday evenings in the basement of an old library. She could barely read music, but nobody seemed to mind. Within a year, the choir had become the center of her social life, and two of its members were her closest friends.

Good software is rarely written in one pass. Programmers usually start with a rough version that works for the simplest case, then add tests, handle errors, and rewrite the parts that turned out to be confusing. A function that reads a configuration file, for example, must cope with a missing file, a file that is not valid text, and values that are out of range. Each of these cases deserves a clear message that tells the user what went wrong and how to fix it, rather than a long trace of internal calls that only the author can understand.

The history of the bicycle is a history of small improvements. The earliest machines, around 1817, had no pedals at all: riders pushed themselves along with their feet. Pedals attached directly to the front wheel came in the 1860s, and because a larger wheel meant more distance per turn, front wheels grew until riders sat five feet above the ground. The so-called safety bicycle of the 1880s, with two wheels of equal size and a chain driving the rear one, solved the problem so well that its basic shape has hardly changed since. Pneumatic tires, gears and lighter frames followed, each making cycling faster and more comfortable.

On a clear night far from city lights, a person with good eyesight can see perhaps two or three thousand stars. Most of them are within a few hundred light years of the Sun, which is a tiny neighborhood compared with the size of our galaxy. The faint band of the Milky Way is the combined glow of billions of more distant stars, too dim to be seen one by one. Astronomers estimate that the galaxy contains between one hundred and four hundred billion stars, and that there are more galaxies in the observable universe than there are grains of sand on all the beaches of the Earth.
"Are you sure this is the right road?" asked Tom, squinting at the map. "The sign back there said the village was to the left." His sister did not look up from the steering wheel. "The sign also said the bridge was open, and we both saw how that turned out," she replied. They drove on in silence for a while, past empty fields and a farmhouse with a red door, until the road curved down toward a river and the church tower of the village appeared between the trees. Tom folded the map and said nothing, which, for him, was as close to an apology as he ever came.

Interest rates influence almost every part of an economy. When a central bank raises its rates, borrowing becomes more expensive for households and businesses, so people tend to buy fewer houses and cars, and companies postpone new investments. Lower spending slows the growth of prices, which is usually the goal. The effect is not immediate, though: economists often say that a change in rates takes between one and two years to work its way through the system, which means that policy makers must act on forecasts rather than on what they can see today.

To make a simple loaf of bread, mix five hundred grams of flour with ten grams of salt, seven grams of dried yeast and about three hundred and fifty milliliters of warm water. Knead the dough for ten minutes, until it is smooth and springs back when pressed, then cover it and leave it somewhere warm for an hour. Shape it into a loaf, let it rise again for forty minutes, and bake it in a hot oven for about half an hour. The bread is ready when it sounds hollow as you tap the bottom.
"""


# --- the rule, on a fake model whose logits we know ----------------------------------------
class FakeTokenizer:
    def __init__(self, add_bos, bos_id=7):
        self.add_bos, self.bos_id = add_bos, bos_id

    def encode(self, text, add_bos=None):
        ids = [3 + ord(c) % 20 for c in text]
        return ([self.bos_id] if add_bos else []) + ids


class FakeModel:
    """logits(ids): a fresh random (len, vocab) array each call; records what it was given."""

    def __init__(self, add_bos, n_ctx=64, vocab=23):
        self.tokenizer = FakeTokenizer(add_bos)
        self.n_ctx, self.vocab = n_ctx, vocab
        self.calls, self.outs = [], []
        self.rng = np.random.default_rng(0)

    def logits(self, ids):
        self.calls.append(list(ids))
        out = (3 * self.rng.standard_normal((len(ids), self.vocab))).astype(np.float32)
        self.outs.append(out)
        return out


@pytest.mark.parametrize("add_bos", [False, True])
def test_chunks_second_half_and_bos(add_bos):
    m = FakeModel(add_bos)
    tokens = P.tokenize(m, "x" * 10 + "the quick brown fox jumps over the lazy dog " * 3)
    assert len(tokens) == 10 + 132 + add_bos
    seen = []
    r = P.perplexity(m, tokens, n_ctx=16, on_chunk=lambda i, ppl, s: seen.append((i, ppl)))
    n = len(tokens) // 16  # the tail is dropped
    assert r["n_chunks"] == n and len(m.calls) == n and r["count"] == n * 7
    want = []
    for i, (ids, out) in enumerate(zip(m.calls, m.outs)):
        chunk = tokens[16 * i : 16 * (i + 1)]
        assert ids == (
            [m.tokenizer.bos_id] + chunk[1:] if add_bos else chunk
        )  # BOS replaces the first
        x = out[8:15].astype(np.float64)  # positions n_ctx/2 .. n_ctx-2 predict tokens 9 .. 15
        lp = x - np.log(np.exp(x).sum(1, keepdims=True))
        want.append(-lp[np.arange(7), chunk[9:16]])
    want = np.concatenate(want)
    np.testing.assert_allclose(r["nll"], want, rtol=1e-12)
    assert r["ppl"] == pytest.approx(math.exp(want.mean()), rel=1e-12)
    # llama.cpp's uncertainty: ppl * sqrt((E[nll^2] - E[nll]^2) / (count - 1))
    assert r["ppl_err"] == pytest.approx(
        r["ppl"] * math.sqrt(want.var() / (len(want) - 1)), rel=1e-9
    )
    assert [i for i, _ in seen] == list(range(1, n + 1)) and seen[-1][1] == r["ppl"]
    assert seen[0][1] == pytest.approx(math.exp(want[:7].mean()), rel=1e-12)  # running value
    assert P.perplexity(FakeModel(add_bos), tokens, n_ctx=16, n_chunks=2)["count"] == 14
    with pytest.raises(pyllm.PyllmError, match="at least 32 tokens"):
        P.perplexity(FakeModel(add_bos), tokens[:31], n_ctx=16)


def test_log_softmax_is_float64():
    """Logits of magnitude 1e4 differing by 1e-3: float32 would lose the difference."""
    x = np.array([[10000.0, 10000.001, 9999.0]], dtype=np.float32)
    got = P.token_nll(x, [1])[0]
    xd = x.astype(np.float64)
    assert got == pytest.approx(
        np.log(np.exp(xd - xd.max()).sum()) - (xd[0, 1] - xd.max()), rel=1e-12
    )


# --- the real model against transformers -------------------------------------------------------
@torch.no_grad()
def torch_perplexity(model, tokens, n_ctx, bos=None):
    """The same rule, independently, in torch float32: chunks of n_ctx, scoring positions
    n_ctx/2 .. n_ctx-2."""
    first, nll = n_ctx // 2, []
    for i in range(len(tokens) // n_ctx):
        chunk = list(tokens[i * n_ctx : (i + 1) * n_ctx])
        if bos is not None:
            chunk[0] = bos
        logits = model(torch.tensor([chunk]), use_cache=False).logits[0].float()
        lp = torch.log_softmax(logits[first : n_ctx - 1], dim=-1)
        nll.append(-lp.gather(1, torch.tensor(chunk[first + 1 :])[:, None])[:, 0])
    nll = torch.cat(nll)
    ppl = float(torch.exp(nll.mean()))
    return ppl, ppl * float(torch.sqrt(nll.var(unbiased=False) / (len(nll) - 1))), nll.numpy()


def test_matches_transformers(default_model):
    from make_fixtures import (
        hf_model,
        hf_tokenizer,
    )  # the fixtures' loader: our file -> LlamaForCausalLM

    m = pyllm.load(default_model, threads=2, n_ctx=CTX)
    tokens = P.tokenize(m, TEXT)
    assert 1100 < len(tokens) < 1400 and not m.tokenizer.add_bos
    mf = format.read(default_model)
    assert hf_tokenizer(mf.meta["tokenizer"]).encode(TEXT).ids == tokens
    ours = P.perplexity(m, tokens, n_ctx=CTX)
    del m

    torch.set_num_threads(2)
    hf = hf_model(mf)
    ppl, err, nll = torch_perplexity(hf, tokens, CTX)
    rel = abs(ours["ppl"] - ppl) / ppl
    print(
        f"\nPPL (-c {CTX}, {ours['n_chunks']} chunks, {ours['count']} scored tokens): "
        f"pyllm {ours['ppl']:.4f} +/- {ours['ppl_err']:.5f}, transformers {ppl:.4f} +/- {err:.5f}, "
        f"relative difference {rel:.2e}; max |nll diff| {np.abs(ours['nll'] - nll).max():.2e}"
    )
    assert ours["n_chunks"] == len(tokens) // CTX == 4 and ours["count"] == 4 * (CTX // 2 - 1)
    assert rel < 1e-3
    assert ours["ppl_err"] == pytest.approx(err, rel=1e-2)
    assert np.abs(ours["nll"] - nll).max() < 2e-2  # per token, too (f16 K/V vs f32)
    assert 5 < ours["ppl"] < 100  # a sane value for fluent English on a 135M model


# --- the command line --------------------------------------------------------------------------
def test_cli_output(default_model, tmp_path, capsys):
    path = tmp_path / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    assert (
        build_parser().parse_args(["perplexity", default_model, str(path)]).ctx_size
        == P.DEFAULT_CTX
        == 512
    )
    assert (
        main(["perplexity", default_model, str(path), "-c", "128", "--chunks", "3", "-t", "2"]) == 0
    )
    out, err = capsys.readouterr()
    mt = re.fullmatch(
        r"\[1\](\d+\.\d{4}),\[2\](\d+\.\d{4}),\[3\](\d+\.\d{4}),\n"
        r"Final estimate: PPL = (\d+\.\d{4}) \+/- (\d+\.\d{5})\n",
        out,
    )
    assert mt, out
    assert mt.group(3) == mt.group(4)
    assert "calculating perplexity over 3 chunks, n_ctx=128" in err
    m = pyllm.load(default_model, threads=2, n_ctx=128)
    r = P.perplexity(m, P.tokenize(m, TEXT), n_ctx=128, n_chunks=3)
    assert mt.group(4) == f"{r['ppl']:.4f}" and mt.group(5) == f"{r['ppl_err']:.5f}"
    assert [f"{x:.4f}" for x in r["chunk_ppl"]] == [mt.group(i) for i in (1, 2, 3)]


def test_cli_errors(default_model, tmp_path, capsys):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(TEXT.encode() + "caf\xe9".encode("latin-1"))
    short = tmp_path / "short.txt"
    short.write_text(TEXT[:2000], encoding="utf-8")
    cases = [
        ([str(tmp_path / "nope.txt")], "No such file"),
        ([str(bad)], "not valid UTF-8"),
        ([str(short)], "needs at least 1024"),
        ([str(short), "-c", "3"], "at least 4"),
        ([str(short), "--chunks", "0"], "--chunks 0"),
    ]
    for args, words in cases:
        assert main(["perplexity", default_model, *args]) == 1, args
        err = capsys.readouterr().err.strip()
        assert err.startswith("pyllm: error: ") and words in err and len(err.splitlines()) == 1, (
            args,
            err,
        )
