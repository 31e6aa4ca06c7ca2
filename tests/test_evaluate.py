import numpy as np
import pytest

from vlarl_fast.envs.tabletop.tasks import TASKS
from vlarl_fast.rl.evaluate import count_episodes, states_per_task


def test_zero_init_states_means_the_whole_fixed_set():
    tasks = list(TASKS)[:2]
    n = {t: TASKS[t].num_init_states for t in tasks}
    assert states_per_task(tasks, 0) == n
    assert count_episodes(tasks, 0, 3) == 3 * sum(n.values())
    assert count_episodes(tasks, 4, 2) == 2 * 4 * len(tasks)


def test_more_init_states_than_the_task_has_names_the_limit():
    t = list(TASKS)[0]
    too_many = TASKS[t].num_init_states + 1
    with pytest.raises(ValueError, match=r"--eval.init-states .* 0 evaluates all"):
        states_per_task([t], too_many)


@pytest.mark.parametrize("backend", ["inprocess", "auto"])
def test_evaluation_steps_busy_slots_through_the_public_step_envs(backend, monkeypatch):
    """Task A's 3 episodes go to slots 0 and 2 (two and one), task B's 3 to slot 1: once slot 2 is done,
    only the busy slots step, through VectorEnv.step_envs on either backend."""
    from vlarl_fast.envs import VectorEnv, choose_backend
    from vlarl_fast.policy import make_policy
    from vlarl_fast.rl.evaluate import evaluate
    tasks = ["tabletop/reach_red", "tabletop/place_two"]
    calls = []
    real = VectorEnv.step_envs

    def spy(self, actions, env_ids):
        calls.append((self.backend, list(env_ids)))
        return real(self, actions, env_ids)

    monkeypatch.setattr(VectorEnv, "step_envs", spy)
    pol = make_policy("tiny", instructions=[TASKS[t].instruction for t in tasks], image_size=16, seed=0,
                      hidden_size=32, num_layers=1)
    res = evaluate(pol, tasks, init_states=1, episodes_per_state=1, episodes_per_task=3, num_envs=3, image_size=16,
                   seed=0, greedy=True, temperature=1.0, env_options={"max_episode_steps": 2}, backend=backend)
    assert res["episodes"] == 6 and res["env_steps"] == sum(len(ids) for _, ids in calls)
    assert calls[0][1] == [0, 1, 2]
    assert any(len(ids) < 3 for _, ids in calls)   # a finished slot was left out
    assert {b for b, _ in calls} == {choose_backend(3, backend)[0]}


def test_heldout_split_counts_its_own_layouts_and_libero_has_none():
    from vlarl_fast.envs.tabletop.tasks import HELDOUT_LAYOUTS
    tasks = list(TASKS)[:2]
    assert states_per_task(tasks, 0, "heldout") == {t: HELDOUT_LAYOUTS for t in tasks}
    assert count_episodes(tasks, 0, 1, split="heldout") == 2 * HELDOUT_LAYOUTS
    with pytest.raises(ValueError, match=r"outside \[0, 100\] .* 100 heldout layouts"):
        states_per_task(tasks, HELDOUT_LAYOUTS + 1, "heldout")
    with pytest.raises(ValueError, match="libero_spatial/0 has no 'heldout' split.*split 'fixed'"):
        states_per_task(["libero_spatial/0"], 0, "heldout")


def test_open_stream_evaluation_names_its_length():
    tasks = list(TASKS)[:2]
    assert count_episodes(tasks, 5, 1, split="open") == 10
    with pytest.raises(ValueError, match="open stream of training layouts has no end.*--init-states N"):
        states_per_task(tasks, 0, "open")


def test_heldout_evaluation_deals_episodes_over_heldout_layouts(monkeypatch):
    from vlarl_fast.envs.tabletop import TabletopEnv
    from vlarl_fast.envs.tabletop.scene import CUBES
    from vlarl_fast.envs.tabletop.tasks import heldout_layouts
    from vlarl_fast.policy import make_policy
    from vlarl_fast.rl.evaluate import evaluate
    t = "tabletop/reach_red"
    held = heldout_layouts(TASKS[t])
    resets = []
    real = TabletopEnv.reset

    def spy(self, **kw):
        obs, info = real(self, **kw)
        cubes = [self._cube_pos(c)[:2] for c in CUBES]
        resets.append((info["split"], info["init_state"], cubes))
        return obs, info

    monkeypatch.setattr(TabletopEnv, "reset", spy)
    pol = make_policy("tiny", instructions=[TASKS[t].instruction], image_size=16, seed=0, hidden_size=32,
                      num_layers=1)
    res = evaluate(pol, [t], init_states=3, episodes_per_state=1, num_envs=2, image_size=16, seed=0, greedy=True,
                   temperature=1.0, env_options={"max_episode_steps": 2}, split="heldout")
    assert res["split"] == "heldout" and res["episodes"] == 3 and len(res["per_state"][t]) == 3
    dealt = [(s, k) for s, k, _ in resets[-3:]]   # after the resets the envs' construction made
    assert sorted(dealt) == [("heldout", 0), ("heldout", 1), ("heldout", 2)]
    for split, k, cubes in resets:
        assert split == "heldout"
        np.testing.assert_allclose(cubes, [held[k]["cubes"][c] for c in CUBES], atol=1e-9)
