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
