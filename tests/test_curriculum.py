"""The (task, initial state) curriculum: unvisited pairs first, then pairs solved about half the
time, a floor for every pair, statistics that survive a resume; and its form over the open stream
of layouts: fresh layouts in stream order, replays by the same weights from a bounded pool."""
import numpy as np
import pytest

from vlarl_fast.rl.curriculum import FILENAME, Curriculum, OpenCurriculum, replay_probabilities


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
    with pytest.raises(ValueError):
        OpenCurriculum(["a"], **kw)
    with pytest.raises(ValueError, match="fresh share"):
        OpenCurriculum(["a"], fresh=0)
    with pytest.raises(ValueError, match="pool"):
        OpenCurriculum(["a"], pool=0)


def test_open_stream_hands_out_fresh_layouts_in_order_until_one_is_scored():
    cur = OpenCurriculum(["a", "b"], fresh=0.5, seed=0)
    # nothing tried yet: every draw is fresh, in stream order, per task
    assert [cur.sample("a") for _ in range(3)] + [cur.sample("b")] == [0, 1, 2, 0]
    cur.update("a", 1, True)
    cur.update("a", 7, True)    # never handed out: ignored
    cur.update("c", 0, True)    # not a task of this run: ignored
    assert list(cur.pool["a"]) == [1] and cur.pool["b"] == {}
    draws = [cur.sample("a") for _ in range(400)]
    fresh = [d for d in draws if d != 1]
    # about half replay layout 1, the rest continue the stream without repeating
    assert 150 < len(fresh) < 250 and fresh == list(range(3, 3 + len(fresh)))


def test_open_stream_replays_by_the_curriculum_weights():
    T, floor = 0.1, 0.2
    cur = OpenCurriculum(["a"], fresh=0.25, window=4, temperature=T, floor=floor, seed=1)
    for _ in range(4):
        cur.sample("a")
    _play(cur, "a", {0: [True] * 4, 1: [False] * 4, 2: [True, False, True, False], 3: [True, True, True, False]})
    s = np.array([4.5 / 5, 0.5 / 5, 2.5 / 5, 3.5 / 5])
    np.testing.assert_allclose(cur.success("a"), s)
    p = replay_probabilities(s, T, floor)
    n = 40_000
    draws = np.array([cur.sample("a") for _ in range(n)])
    replays = draws[draws < 4]
    assert abs(len(replays) / n - 0.75) < 4 * np.sqrt(0.75 * 0.25 / n)
    freq = np.bincount(replays, minlength=4) / len(replays)
    assert np.all(np.abs(freq - p) < 4 * np.sqrt(p * (1 - p) / len(replays))), (freq, p)


def test_open_stream_pool_evicts_the_layout_that_teaches_least():
    cur = OpenCurriculum(["a"], pool=3, window=2, seed=0)
    for _ in range(4):
        cur.sample("a")
    _play(cur, "a", {0: [True, False], 1: [True, True], 2: [False, True]})
    _play(cur, "a", {3: [False]})     # the pool is full: layout 1 (always solved) leaves
    assert list(cur.pool["a"]) == [0, 2, 3]


def test_open_stream_resume_and_kind_checks(tmp_path):
    cur = OpenCurriculum(["a", "b"], pool=4, seed=0)
    for _ in range(6):
        k = cur.sample("a")
        cur.update("a", k, k % 2 == 0)
    cur.save(tmp_path)
    again = OpenCurriculum(["a", "b", "c"], pool=4, seed=0)
    assert sorted(again.load(tmp_path)) == ["a", "b"]
    assert again.next_fresh == {"a": cur.next_fresh["a"], "b": 0, "c": 0}
    np.testing.assert_allclose(again.success("a"), cur.success("a"))
    assert list(again.pool["a"]) == list(cur.pool["a"])
    summary = again.summary()
    assert summary["fresh_layouts"] == cur.next_fresh["a"] and 0 < summary["pool_fill"] <= 1
    # a curriculum over fixed states and one over the open stream never load each other's statistics
    with pytest.raises(ValueError, match="open stream of layouts.*--ppo.layouts open"):
        Curriculum({"a": 3}).load(tmp_path)
    fixed = tmp_path / "fixed"
    fixed.mkdir()
    Curriculum({"a": 3}).save(fixed)
    with pytest.raises(ValueError, match="fixed initial states.*delete curriculum.json"):
        OpenCurriculum(["a"]).load(fixed)
