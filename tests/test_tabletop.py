"""The built-in tabletop suite: experts, determinism, spaces, rewards, errors."""
import numpy as np
import pytest

from vlarl_fast.envs import UnknownTaskError, get_task, list_tasks, make_env
from vlarl_fast.envs.tabletop import STATE_DIM
from vlarl_fast.envs.tabletop.expert import ScriptedExpert, collect_demos

TASKS = list_tasks("tabletop")


def _run_expert(env, k, noise=0.0, seed=0):
    expert = ScriptedExpert(env, noise=noise, rng=np.random.default_rng(seed))
    obs, _ = env.reset(options={"init_state": k})
    for _ in range(env.unwrapped.max_episode_steps):
        obs, r, term, trunc, info = env.step(expert.act(obs))
        if term or trunc:
            return term, info
    raise AssertionError("episode neither terminated nor truncated at max_episode_steps")


def test_suite_has_graded_tasks_with_init_states():
    assert len(TASKS) >= 6
    specs = [get_task(t) for t in TASKS]
    assert len({s.difficulty for s in specs}) >= 3
    assert any(len(s.steps) >= 2 for s in specs)  # a two-step task
    assert all(s.num_init_states >= 20 and s.instruction for s in specs)


@pytest.mark.parametrize("task_id", TASKS)
def test_expert_succeeds_without_noise(task_id):
    env = make_env(task_id)
    n = 20
    wins = sum(_run_expert(env, k)[0] for k in range(n))
    assert wins / n >= 0.95


def test_same_seed_same_images_and_different_states_differ():
    def rollout(seed):
        env = make_env("tabletop/push_red_to_yellow")
        obs, _ = env.reset(seed=seed)
        rng = np.random.default_rng(0)
        frames = [obs["image"]]
        for _ in range(8):
            obs, *_ = env.step(rng.uniform(-1, 1, 7).astype(np.float32))
            frames.append(obs["image"])
        return np.stack(frames)

    a, b = rollout(3), rollout(3)
    np.testing.assert_array_equal(a, b)
    env = make_env("tabletop/reach_red")
    o0, _ = env.reset(options={"init_state": 0})
    o1, _ = env.reset(options={"init_state": 1})
    assert not np.array_equal(o0["image"], o1["image"])


def test_spaces_and_visible_cubes():
    env = make_env("tabletop/reach_red", image_size=64, wrist=True, seed=0)
    obs, info = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    assert obs["image"].dtype == np.uint8 and obs["image"].shape == (64, 64, 3)
    assert obs["state"].shape == (STATE_DIM,)
    assert "wrist_image" in obs
    assert info["instruction"] == "move the gripper to the red cube"
    img = obs["image"].astype(int)
    red = (img[..., 0] > 150) & (img[..., 1] < 80) & (img[..., 2] < 80)
    assert red.sum() >= 4, "the red cube should be visible at 64 px"


def test_rewards_termination_truncation():
    env = make_env("tabletop/reach_red", reward="sparse")
    term, info = _run_expert(env, 0)
    assert term and info["success"]
    env = make_env("tabletop/reach_red", reward="sparse", max_episode_steps=3)
    env.reset(options={"init_state": 0})
    rewards = []
    for _ in range(3):
        _, r, term, trunc, _ = env.step(np.array([0, 0, 1, 0, 0, 0, -1], np.float32))  # move away, upward
        rewards.append(r)
    assert trunc and not term and rewards == [0.0, 0.0, 0.0]
    dense = make_env("tabletop/reach_red", reward="dense")
    dense.reset(options={"init_state": 0})
    _, r_up, *_ = dense.step(np.array([0, 0, 1, 0, 0, 0, -1], np.float32))
    assert r_up <= 0.0   # moving away from the cube lowers the progress potential


def test_bad_inputs_are_explained():
    env = make_env("tabletop/reach_red")
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"shape \(7,\)"):
        env.step(np.zeros(6))
    with pytest.raises(ValueError, match="NaN"):
        env.step(np.full(7, np.nan))
    with pytest.raises(UnknownTaskError, match="reach_red"):
        make_env("tabletop/reach_rde")
    with pytest.raises(ValueError, match="available suites"):
        list_tasks("nope")
    with pytest.raises(ValueError, match="available suites: tabletop, libero_spatial"):
        list_tasks("libero_spatail")
    with pytest.raises(ValueError, match="image_size"):
        make_env("tabletop/reach_red", image_size=4)


def test_collect_demos_keeps_successes():
    eps = collect_demos(["tabletop/reach_blue"], 3, noise=0.1, seed=0)
    assert len(eps) == 3 and all(e["success"] for e in eps)
    e = eps[0]
    assert e["images"].shape[1:] == (64, 64, 3) and e["actions"].shape[1] == 7
    assert len(e["images"]) == len(e["actions"]) == len(e["states"])


def test_demos_can_cover_more_scenes_than_the_initial_states():
    from vlarl_fast.envs.tabletop.tasks import TASKS, init_states
    spec = TASKS["tabletop/reach_red"]
    n = spec.num_init_states
    wide = init_states(spec, n + 5)
    # the fixed initial states are the head of the wider stream
    assert len(wide) == n + 5 and all((a["hand"] == b["hand"]).all() for a, b in zip(init_states(spec), wide))
    # one demonstration on each scene of the stream in turn, the fixed initial states included
    eps = collect_demos(["tabletop/reach_red"], n + 5, noise=0.0, seed=0, layouts=n + 5, image_size=16)
    assert [e["init_state"] for e in eps] == list(range(n + 5)) and all(e["success"] for e in eps)
    # an ordinary env still offers only the fixed set
    with pytest.raises(ValueError, match="init_state must be in"):
        make_env("tabletop/reach_red").reset(options={"init_state": n})


def test_renderers_closed_after_the_display_is_gone_leave_nothing_to_free(monkeypatch):
    """At exit another library's eglTerminate may run first; the renderers and their contexts must then be
    dropped without a second attempt to free them (which prints 'Exception ignored' at interpreter exit)."""
    from vlarl_fast.envs.tabletop import env as tabletop_env

    class Context:
        _context = object()

    class Renderer:
        def __init__(self):
            self._gl_context = Context()

        def close(self):
            raise RuntimeError("EGL_NOT_INITIALIZED")

    r = Renderer()
    ctx = r._gl_context
    monkeypatch.setattr(tabletop_env, "_RENDERERS", {(8, 8): r})
    tabletop_env._close_renderers()
    assert r._gl_context is None and ctx._context is None and not tabletop_env._RENDERERS


# ---- held-out split ---------------------------------------------------------------------------
def _layout_digest(layouts) -> str:
    import hashlib
    h = hashlib.sha256()
    for lay in layouts:
        for part in ("zones", "cubes", "cube_yaw"):
            for name in sorted(lay[part]):
                h.update(np.asarray(lay[part][name], dtype=np.float64).tobytes())
        h.update(np.asarray(lay["hand"], dtype=np.float64).tobytes())
    return h.hexdigest()[:16]


# the first 50 layouts (fixed initial states, then demonstration layouts) the published results were made on
TRAINING_STREAM_DIGESTS = {
    "tabletop/reach_red": "298a8376eca43e35",
    "tabletop/reach_blue": "de3baaa2f548797b",
    "tabletop/lift_green": "91a07c6ab81b9215",
    "tabletop/push_red_to_yellow": "d962fc3b6faa59d6",
    "tabletop/place_blue_on_purple": "c95adb4ed8c36cb3",
    "tabletop/place_two": "0867af829ef3c61c",
}


def test_fixed_states_and_demo_layouts_are_bit_identical():
    from vlarl_fast.envs.tabletop.tasks import TASKS, init_states
    assert {t: _layout_digest(init_states(TASKS[t], 50)) for t in TASKS} == TRAINING_STREAM_DIGESTS


def _cube_xy(layouts) -> np.ndarray:
    from vlarl_fast.envs.tabletop.scene import CUBES
    return np.array([[lay["cubes"][c] for c in CUBES] for lay in layouts]).reshape(len(layouts), -1)


@pytest.mark.parametrize("task_id", TASKS)
def test_heldout_layouts_never_appear_in_the_training_stream(task_id):
    """Demonstrations, the fixed states, the curriculum and RL all draw from the head of the training stream:
    no held-out scene matches any of its first 10,000 layouts (all cubes within 1 mm)."""
    from vlarl_fast.envs.tabletop.tasks import HELDOUT_LAYOUTS, TASKS, heldout_layouts, layouts
    spec = TASKS[task_id]
    train = _cube_xy(layouts(spec, 10_000))
    held = _cube_xy(heldout_layouts(spec))
    assert len(held) == HELDOUT_LAYOUTS
    closest = np.array([np.abs(train - h).max(axis=1).min() for h in held])
    assert closest.min() > 1e-3
    # and the held-out layouts are distinct scenes among themselves
    assert len({tuple(np.round(h, 6)) for h in held}) == HELDOUT_LAYOUTS


def test_heldout_env_serves_only_heldout_layouts():
    from vlarl_fast.envs.tabletop.scene import CUBES
    from vlarl_fast.envs.tabletop.tasks import HELDOUT_LAYOUTS, TASKS, heldout_layouts
    spec = TASKS["tabletop/push_red_to_yellow"]
    held = heldout_layouts(spec)
    env = make_env(spec.task_id, image_size=16, split="heldout", seed=0)
    fixed = make_env(spec.task_id, image_size=16)
    assert env.observation_space == fixed.observation_space and env.action_space == fixed.action_space
    assert fixed.reset(seed=0)[1]["split"] == "fixed"

    def served(info):
        assert info["split"] == "heldout"
        pos = np.array([env.unwrapped._cube_pos(c)[:2] for c in CUBES])
        np.testing.assert_allclose(pos, [held[info["init_state"]]["cubes"][c] for c in CUBES], atol=1e-9)
        return info["init_state"]

    assert [served(env.reset(options={"init_state": k})[1]) for k in (0, 57, HELDOUT_LAYOUTS - 1)] == [0, 57, 99]
    drawn = {served(env.reset(seed=s)[1]) for s in range(8)}
    assert len(drawn) > 1 and drawn <= set(range(HELDOUT_LAYOUTS))
    with pytest.raises(ValueError, match=r"init_state must be in \[0, 100\)"):
        env.reset(options={"init_state": HELDOUT_LAYOUTS})
    with pytest.raises(ValueError, match="split must be one of 'fixed', 'open', 'heldout'"):
        make_env(spec.task_id, split="test")


def test_training_envs_cannot_be_built_on_the_heldout_split(monkeypatch):
    from vlarl_fast.envs import make_training_env, registry
    with pytest.raises(ValueError, match="demonstrations, which must not see held-out layouts.*split='fixed'"):
        make_env("tabletop/reach_red", split="heldout", demo_layouts=50)
    with pytest.raises(ValueError, match="'heldout' is reserved for evaluation"):
        make_training_env("tabletop/reach_red", split="heldout")
    # demonstrations are recorded through the guarded constructor, on the fixed stream
    built = []
    real = registry.make_env
    monkeypatch.setattr(registry, "make_env", lambda *a, **kw: built.append(real(*a, **kw)) or built[-1])
    eps = collect_demos(["tabletop/reach_red"], 2, image_size=16, layouts=25)
    assert len(eps) == 2 and [e.unwrapped.split for e in built] == ["fixed"]
    monkeypatch.setattr(registry, "TRAINING_SPLITS", ())
    with pytest.raises(ValueError, match="reserved for evaluation"):
        collect_demos(["tabletop/reach_red"], 1, image_size=16)


@pytest.mark.parametrize("task_id", TASKS)
def test_open_stream_is_random_access_reproducible_and_never_heldout(task_id):
    """RL on the open stream draws layouts by index: each index names one scene everywhere, indices give
    distinct scenes, and none of its first 4,000 is within 1 mm of a held-out scene."""
    from vlarl_fast.envs.tabletop.tasks import TASKS, heldout_layouts, layouts, open_layout
    spec = TASKS[task_id]
    opened = _cube_xy([open_layout(spec, k) for k in range(4_000)])
    held = _cube_xy(heldout_layouts(spec))
    closest = np.array([np.abs(opened - h).max(axis=1).min() for h in held])
    assert closest.min() > 1e-3
    assert len({tuple(np.round(o, 6)) for o in opened}) == 4_000
    np.testing.assert_array_equal(_cube_xy([open_layout(spec, 3_777)]), opened[3_777:3_778])
    # nor does it repeat the fixed states and demonstration layouts
    fixed = _cube_xy(layouts(spec, 50))
    assert min(np.abs(opened - f).max(axis=1).min() for f in fixed) > 1e-3


def test_an_open_layout_equal_to_a_heldout_one_is_redrawn(monkeypatch):
    from vlarl_fast.envs.tabletop import tasks as T
    spec = T.TASKS["tabletop/lift_green"]
    first, other = T.open_layout(spec, 3), T.open_layout(spec, 4)
    # pretend the open stream's layout 3 were a held-out scene: the stream must hand out another
    monkeypatch.setattr(T, "_heldout_keys", lambda task_id: frozenset({T.layout_key(first)}))
    assert T.layout_key(T.open_layout(spec, 3)) != T.layout_key(first)
    assert T.layout_key(T.open_layout(spec, 4)) == T.layout_key(other)


def test_open_env_serves_the_stream_by_index_and_fresh_scenes_at_random():
    from vlarl_fast.envs import make_training_env
    from vlarl_fast.envs.tabletop.scene import CUBES
    from vlarl_fast.envs.tabletop.tasks import OPEN_LAYOUTS, TASKS, open_layout
    spec = TASKS["tabletop/place_blue_on_purple"]
    env = make_training_env(spec.task_id, image_size=16, split="open", seed=0)

    def cubes():
        return np.array([env.unwrapped._cube_pos(c)[:2] for c in CUBES])

    for k in (0, 123_456, OPEN_LAYOUTS - 1):
        _, info = env.reset(options={"init_state": k})
        assert info["split"] == "open" and info["init_state"] == k
        np.testing.assert_allclose(cubes(), [open_layout(spec, k)["cubes"][c] for c in CUBES], atol=1e-9)
    drawn = {env.reset(seed=s)[1]["init_state"] for s in range(8)}
    assert len(drawn) == 8
    with pytest.raises(ValueError, match=r"init_state must be in \[0, 4611686018427387904\) on the open split"):
        env.reset(options={"init_state": -1})
    with pytest.raises(ValueError, match="demo_layouts widens the fixed split"):
        make_env(spec.task_id, split="open", demo_layouts=50)
