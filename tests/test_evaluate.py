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
