import numpy as np
import pytest

from pyllm.sample import Sampler


def softmax(z):
    p = np.exp(z - z.max())
    return p / p.sum()


def test_greedy_is_argmax_and_ignores_seed():
    z = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    for seed in (None, 1, 2):
        assert Sampler(temperature=0, seed=seed)(z) == int(np.argmax(z))
    assert Sampler(temperature=-1)(z) == int(np.argmax(z))


def test_same_seed_same_tokens_and_different_seeds_differ():
    z = np.zeros(500, np.float32)
    runs = [
        [Sampler(temperature=1.0, top_k=0, top_p=1.0, min_p=0, seed=s)(z) for _ in range(50)]
        for s in (7, 7, 8)
    ]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_unfiltered_sampling_follows_the_softmax():
    z = np.array([2.0, 1.0, 0.0, -1.0], np.float32)
    s = Sampler(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=0)
    counts = np.bincount([s(z) for _ in range(20000)], minlength=4) / 20000
    np.testing.assert_allclose(counts, softmax(z), atol=0.015)
    s = Sampler(temperature=0.5, top_k=0, top_p=1.0, min_p=0.0, seed=0)
    counts = np.bincount([s(z) for _ in range(20000)], minlength=4) / 20000
    np.testing.assert_allclose(counts, softmax(z / 0.5), atol=0.015)


def test_filters_keep_only_what_they_should():
    z = np.array([3.0, 2.9, 0.0, -5.0, 2.95], np.float32)
    draws = lambda s: {s(z) for _ in range(300)}  # noqa: E731
    assert draws(Sampler(temperature=1, top_k=2, top_p=1, min_p=0, seed=1)) == {0, 4}
    assert draws(Sampler(temperature=1, top_k=1, top_p=1, min_p=0, seed=1)) == {0}
    # top-p 0.5: token 0 alone holds ~35%, with token 4 ~69%: the nucleus is {0, 4}
    assert draws(Sampler(temperature=1, top_k=0, top_p=0.5, min_p=0, seed=1)) == {0, 4}
    # min-p 0.5: keep p >= 0.5 * p_max, i.e. logits >= 3 + log 0.5
    assert draws(Sampler(temperature=1, top_k=0, top_p=1, min_p=0.5, seed=1)) == {0, 1, 4}


def test_repeat_penalty_llama_cpp_rule():
    z = np.array([2.0, 1.9, -1.0, -1.1], np.float32)
    s = Sampler(temperature=0, repeat_penalty=1.5, repeat_last_n=64)
    assert s(z, [0]) == 1  # 2.0 / 1.5 < 1.9
    assert s(z, []) == 0
    z = np.array([-1.0, -1.1], np.float32)
    assert s(z, [0]) == 1  # negative logits are multiplied: -1.5 < -1.1
    s = Sampler(temperature=0, repeat_penalty=1.5, repeat_last_n=1)
    assert s(np.array([2.0, 1.9, 0.0], np.float32), [0, 2]) == 0  # only the last token counts


@pytest.mark.parametrize(
    "kw",
    [
        dict(top_p=1.5),
        dict(top_p=0),
        dict(min_p=-0.1),
        dict(min_p=2),
        dict(repeat_penalty=0),
        dict(repeat_penalty=-1),
        dict(repeat_last_n=-2),
    ],
)
def test_bad_parameters_are_refused(kw):
    with pytest.raises(ValueError):
        Sampler(**kw)
