"""The (task, initial state) curriculum: unvisited pairs first, then pairs solved about half the
time, a floor for every pair, statistics that survive a resume."""
import numpy as np
import pytest

from vlarl_fast.rl.curriculum import FILENAME, Curriculum


def _play(cur, task, outcomes: dict[int, list[bool]]):
    for k, outs in outcomes.items():
        for o in outs:
            cur.update(task, k, o)


def test_unvisited_pairs_are_drawn_first():
    cur = Curriculum({"a": 4})
    np.testing.assert_allclose(cur.probabilities("a"), 0.25)
    _play(cur, "a", {0: [True], 2: [False]})
    np.testing.assert_allclose(cur.probabilities("a"), [0, 0.5, 0, 0.5])
    assert {cur.sample("a") for _ in range(50)} == {1, 3}


def test_weights_match_the_rule_on_constructed_statistics():
    T, floor = 0.1, 0.2
    cur = Curriculum({"a": 4}, temperature=T, window=4, floor=floor)
    # older outcomes fall out of the window of 4: pair 0 ends at 4 successes of 4
    _play(cur, "a", {0: [False, False, True, True, True, True], 1: [False] * 4, 2: [True, False, True, False],
                     3: [True, True, True, False]})
    s = np.array([4.5 / 5, 0.5 / 5, 2.5 / 5, 3.5 / 5])
    np.testing.assert_allclose(cur.success("a"), s)
    w = np.exp((0.5 - np.abs(s - 0.5)) / T)
    expected = (1 - floor) * w / w.sum() + floor / 4
    np.testing.assert_allclose(cur.probabilities("a"), expected)
    assert cur.probabilities("a").argmax() == 2 and cur.probabilities("a").min() >= floor / 4


def test_sampling_frequencies_converge_to_the_weights():
    cur = Curriculum({"a": 5}, temperature=0.2, window=8, floor=0.1, seed=7)
    _play(cur, "a", {0: [True] * 8, 1: [False] * 8, 2: [True, False] * 4, 3: [True] * 6 + [False] * 2,
                     4: [False] * 7 + [True]})
    p = cur.probabilities("a")
    n = 40_000
    freq = np.bincount([cur.sample("a") for _ in range(n)], minlength=5) / n
    # four standard errors of a binomial frequency
    assert np.all(np.abs(freq - p) < 4 * np.sqrt(p * (1 - p) / n)), (freq, p)


def test_sampling_is_seeded_and_unknown_pairs_are_ignored():
    draws = [Curriculum({"a": 5}, seed=3).sample("a") for _ in range(2)]
    assert draws[0] == draws[1]
    cur = Curriculum({"a": 2})
    cur.update("b", 0, True)    # not an error mid-rollout
    cur.update("a", -1, True)
    assert cur.visits["a"].sum() == 0


def test_resume_restores_the_statistics(tmp_path):
    cur = Curriculum({"a": 3, "b": 2}, window=4, seed=0)
    _play(cur, "a", {0: [True, True], 1: [False], 2: [True, False, False]})
    _play(cur, "b", {1: [True]})
    cur.save(tmp_path)
    assert (tmp_path / FILENAME).is_file()
    fresh = Curriculum({"a": 3, "b": 2, "c": 1}, window=4, seed=0)
    assert sorted(fresh.load(tmp_path)) == ["a", "b"]
    for t in ("a", "b"):
        np.testing.assert_array_equal(fresh.visits[t], cur.visits[t])
        np.testing.assert_allclose(fresh.probabilities(t), cur.probabilities(t))
    assert fresh.visits["c"].sum() == 0
    assert Curriculum({"a": 3}).load(tmp_path / "nowhere") == []
    with pytest.raises(ValueError, match="cover 3 initial states"):
        Curriculum({"a": 5}).load(tmp_path)
    summary = fresh.summary()
    assert 0 < summary["visited"] < 1 and 0 < summary["top20_share"] <= 1


@pytest.mark.parametrize("kw", [{"temperature": 0}, {"window": 0}, {"floor": 1.5}])
def test_bad_settings(kw):
    with pytest.raises(ValueError):
        Curriculum({"a": 2}, **kw)
