"""The (task, initial state) curriculum: favours pairs solved about half the time, never starves one."""
import numpy as np
import pytest

from vlarl_fast.rl.curriculum import Curriculum


def test_uniform_before_any_outcome():
    cur = Curriculum({"a": 4})
    np.testing.assert_allclose(cur.probabilities("a"), 0.25)


def test_prefers_uncertain_pairs_and_keeps_a_floor():
    cur = Curriculum({"a": 3}, temperature=0.1, ema=1.0, uniform_mix=0.2)
    cur.update("a", 0, True)    # always solved
    cur.update("a", 1, False)   # never solved
    # pair 2 stays at 0.5: the most informative
    p = cur.probabilities("a")
    assert p[2] > 0.8 and p[0] == pytest.approx(p[1])
    assert p.min() >= 0.2 / 3 - 1e-12
    assert p.sum() == pytest.approx(1.0)


def test_ema_update_and_sampling_is_seeded():
    cur = Curriculum({"a": 2}, ema=0.5)
    cur.update("a", 1, True)
    assert cur.success["a"][1] == pytest.approx(0.75) and cur.visits["a"][1] == 1
    cur.update("b", 0, True)    # unknown pairs are ignored, not an error mid-rollout
    cur.update("a", -1, True)
    draws = [Curriculum({"a": 5}, seed=3).sample("a") for _ in range(2)]
    assert draws[0] == draws[1]


@pytest.mark.parametrize("kw", [{"temperature": 0}, {"ema": 0}, {"uniform_mix": 1.5}])
def test_bad_settings(kw):
    with pytest.raises(ValueError):
        Curriculum({"a": 2}, **kw)
