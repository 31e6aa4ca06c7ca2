"""LIBERO adapter: suites, observations against LIBERO's own env, success, set-up without prompts, errors.

Tests that build environments need LIBERO (the `libero` extra) and its assets: ``VLARL_LIBERO_ASSETS``
(a folder holding ``assets/``, or the assets folder itself), or ``VLARL_LIBERO_ARCHIVE``, the path of an
archive such as the shared ``libero-assets.tar.gz`` (extracted once per session into a temp folder).
Without them those tests skip and say why. The image transforms and the error paths run without assets.
"""
import importlib.util
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

HAS_LIBERO = importlib.util.find_spec("libero") is not None
needs_libero = pytest.mark.skipif(not HAS_LIBERO, reason="LIBERO is not installed (pip install -c constraints.txt "
                                                         "'vlarl-fast[libero]')")
GOAL = "libero_goal/0"       # open the middle drawer of the cabinet
SPATIAL = "libero_spatial/0"  # the black bowl between the plate and the ramekin onto the plate
SUITE_FIRST = {"libero_spatial": 10, "libero_object": 10, "libero_goal": 10, "libero_10": 10, "libero_90": 90}


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> str:
    if not HAS_LIBERO:
        pytest.skip("LIBERO is not installed (pip install -c constraints.txt 'vlarl-fast[libero]')")
    given = os.environ.get("VLARL_LIBERO_ASSETS")
    if given:
        return given
    archive = os.environ.get("VLARL_LIBERO_ARCHIVE")
    if not archive:
        pytest.skip("no LIBERO assets: set VLARL_LIBERO_ASSETS to an assets folder or VLARL_LIBERO_ARCHIVE to an "
                    "archive of one (e.g. libero-assets.tar.gz)")
    if not os.path.isfile(archive):
        pytest.fail(f"VLARL_LIBERO_ARCHIVE={archive} is not a file")
    dest = tmp_path_factory.mktemp("libero-assets")
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    return str(dest)


@pytest.fixture(scope="module")
def envs(assets):
    """Envs built once per module and shared (building one costs seconds): envs(task_id, **options)."""
    from vlarl_fast.envs import make_env
    built = {}

    def get(task_id, **options):
        key = (task_id, tuple(sorted(options.items())))
        if key not in built:
            built[key] = make_env(task_id, assets=assets, **options)
        return built[key]

    yield get
    for env in built.values():
        env.close()


NOOP = np.array([0, 0, 0, 0, 0, 0, -1.0])


# ---- the documented transforms, written out independently of the adapter ---------------------------
def expected_image(frame: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image
    upright = np.ascontiguousarray(frame[::-1, ::-1])
    if upright.shape[:2] == (size, size):
        return upright
    return np.asarray(Image.fromarray(upright).resize((size, size), Image.Resampling.LANCZOS))


def expected_state(raw: dict) -> np.ndarray:
    x, y, z, w = raw["robot0_eef_quat"]
    w = float(np.clip(w, -1, 1))
    angle = 2 * np.arccos(w)
    s = np.sqrt(1 - w * w)
    axis_angle = np.zeros(3) if np.isclose(s, 0) else np.array([x, y, z]) / s * angle
    return np.concatenate([raw["robot0_eef_pos"], axis_angle, raw["robot0_gripper_qpos"]]).astype(np.float32)


# ---- no LIBERO needed ----------------------------------------------------------------------------------
def test_policy_image_transforms():
    from vlarl_fast.envs.libero.images import crop_box, to_policy_image
    frame = np.zeros((256, 256, 3), np.uint8)
    frame[:8, :8] = 255                      # top-left as rendered ...
    out = to_policy_image(frame, 256)
    assert out.shape == (256, 256, 3) and out.flags.c_contiguous
    assert out[-8:, -8:].min() == 255 and out[:8, :8].max() == 0  # ... bottom-right once turned 180 degrees
    small = to_policy_image(frame, 224)
    assert small.shape == (224, 224, 3) and small[-4:, -4:].min() > 200 and small[:100, :100].max() == 0
    assert crop_box(256, 256, 0.9) == (6, 6, 249, 249)   # sqrt(0.9) * 256 = 242.9 -> 243 px, centred
    cropped = to_policy_image(frame, 243, center_crop=0.9)
    assert cropped[-1, -1].max() == 255 and cropped[-2, -2].max() == 0   # 1 of the 8 lit px survives the crop
    jpeg = to_policy_image(frame, 224, jpeg_quality=95)
    assert jpeg.shape == (224, 224, 3) and np.abs(jpeg.astype(int) - small).mean() < 2
    with pytest.raises(ValueError, match="center_crop"):
        to_policy_image(frame, 224, center_crop=1.5)
    with pytest.raises(ValueError, match="uint8"):
        to_policy_image(frame.astype(np.float32), 224)


def test_missing_assets_error_says_how_to_get_them(tmp_path, monkeypatch):
    from vlarl_fast.envs.libero import LiberoAssetsError, find_assets
    empty = tmp_path / "nothing"
    empty.mkdir()
    monkeypatch.setenv("VLARL_LIBERO_ASSETS", str(empty))
    with pytest.raises(LiberoAssetsError, match=r"VLARL_LIBERO_ASSETS=.*nothing holds no LIBERO assets.*export "
                                                r"VLARL_LIBERO_ASSETS="):
        find_assets()
    # unset: only LIBERO's own no-download places count, and the message names the setting
    monkeypatch.delenv("VLARL_LIBERO_ASSETS")
    monkeypatch.setenv("HOME", str(tmp_path))
    if HAS_LIBERO:
        from vlarl_fast.envs.libero.bootstrap import package_dir
        if (package_dir() / "assets").is_dir():
            pytest.skip("this LIBERO install carries its own assets")
    with pytest.raises(LiberoAssetsError, match=r"VLARL_LIBERO_ASSETS is not set.*lerobot/libero-assets"):
        find_assets()
    # both layouts of a real folder are accepted: the assets folder itself, or its parent
    fake = tmp_path / "parent" / "assets"
    for m in ("scenes", "articulated_objects", "stable_scanned_objects", "stable_hope_objects", "turbosquid_objects"):
        (fake / m).mkdir(parents=True)
    assert find_assets(tmp_path / "parent") == fake.resolve() == find_assets(fake)


def test_libero_ids_without_libero_name_the_install():
    if HAS_LIBERO:
        pytest.skip("LIBERO is installed")
    from vlarl_fast.envs import list_tasks
    from vlarl_fast.envs.libero import LiberoNotInstalledError
    with pytest.raises(LiberoNotInstalledError, match=r"vlarl-fast\[libero\]"):
        list_tasks("libero_spatial")


def test_info_explains_a_cuda_torchvision_beside_cpu_torch(tmp_path, monkeypatch):
    """The case LIBERO's install creates (robomimic -> torchvision from PyPI, a CUDA build): versions that
    match on paper (0.28 with 2.13), an import that fails; `vlarl-fast info` names it and the fix."""
    import vlarl_fast.info as vi
    broken = tmp_path / "torchvision"
    broken.mkdir()
    # what PyPI's torchvision raises at import next to the CPU torch (seen here with 0.28.0 and 2.13.0+cpu)
    (broken / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "torchvision", raising=False)
    monkeypatch.setattr(vi, "_version", lambda dist: {"torchvision": "0.28.0"}.get(dist))
    msg = vi._torchvision("2.13.0+cpu")
    assert "torchvision::nms does not exist" in msg and "a CUDA torchvision beside a CPU torch" in msg
    assert "pip uninstall -y torchvision" in msg


@needs_libero
def test_info_reports_libero(tmp_path, monkeypatch):
    import vlarl_fast.info as vi
    monkeypatch.setenv("VLARL_LIBERO_ASSETS", str(tmp_path))
    lib = vi._libero()
    assert lib["suites"] == SUITE_FIRST and lib["assets"] is None
    problems = vi._libero_problems({"mujoco": "3.10.0"}, lib)
    assert any("VLARL_LIBERO_ASSETS" in p for p in problems)
    assert any("MuJoCo 3.8 and 3.9 only" in p for p in problems)
    assert not vi._libero_problems({"mujoco": "3.9.0"}, {**lib, "assets_error": None})


# ---- LIBERO installed, no assets needed ------------------------------------------------------------
@needs_libero
def test_suites_and_task_ids():
    from vlarl_fast.envs import get_task, list_tasks, make_env
    from vlarl_fast.envs.libero import MAX_EPISODE_STEPS, get_task as libero_task
    for suite, n in SUITE_FIRST.items():
        ids = list_tasks(suite)
        assert ids == [f"{suite}/{i}" for i in range(n)]
        t = get_task(ids[-1])
        assert t.max_episode_steps == MAX_EPISODE_STEPS[suite] and t.num_init_states == 50 and t.instruction
        assert Path(t.bddl_file).is_file() and Path(t.init_states_file).is_file()
        assert get_task(f"{suite}/{t.name}") is t and get_task(t.name) is t
    assert [MAX_EPISODE_STEPS[s] for s in SUITE_FIRST] == [220, 280, 300, 520, 400]
    assert get_task(GOAL).instruction == "open the middle drawer of the cabinet"
    with pytest.raises(ValueError, match="tasks 0..9"):
        get_task("libero_goal/10")
    with pytest.raises(ValueError, match="Did you mean open_the_middle_drawer_of_the_cabinet"):
        get_task("libero_goal/open_the_middle_drawer_of_the_cabinett")
    with pytest.raises(ValueError, match="Did you mean libero_spatial"):
        libero_task("libero_spatail/0")
    with pytest.raises(ValueError, match="unknown suite 'libero_spatail'.*libero_90"):
        list_tasks("libero_spatail")
    with pytest.raises(ValueError, match="only the sparse success reward"):
        make_env(GOAL, reward="dense")


@needs_libero
def test_import_asks_nothing_without_a_terminal(tmp_path):
    """LIBERO's own import asks on stdin for a config; ours writes one and asks nothing, with stdin closed."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("LIBERO_CONFIG_PATH", "XDG_CONFIG_HOME")}
    env["HOME"] = str(home)

    def run(code: str, **extra):
        # `exec 0<&-`: no stdin at all, as under a scheduler or CI; cwd outside the checkout so the
        # installed package is imported
        return subprocess.run(["bash", "-c", 'exec 0<&-; exec "$0" -c "$1"', sys.executable, code],
                              cwd=tmp_path, env={**env, **extra}, capture_output=True, text=True, timeout=300)

    control = run("import libero.libero")
    assert control.returncode != 0 and "lost sys.stdin" in control.stderr, "LIBERO no longer prompts at import?"

    ours = run("from vlarl_fast.envs import list_tasks; print(len(list_tasks('libero_10')))")
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout.strip().splitlines()[-1] == "10" and "Do you want" not in ours.stdout + ours.stderr
    assert (home / ".config" / "vlarl-fast" / "libero" / "config.yaml").is_file()

    chosen = tmp_path / "chosen"  # a LIBERO_CONFIG_PATH without a config gets LIBERO's defaults, unasked
    chosen.mkdir()
    ours = run("import vlarl_fast.envs.libero as L; L.import_libero(); print('ok')", LIBERO_CONFIG_PATH=str(chosen))
    assert ours.returncode == 0 and ours.stdout.strip().endswith("ok"), ours.stderr
    assert "bddl_files" in (chosen / "config.yaml").read_text()


# ---- LIBERO and its assets ---------------------------------------------------------------------------
@pytest.mark.slow  # about 2 s a suite once LIBERO is loaded; CI runs it (.ci/run)
@pytest.mark.parametrize("suite", list(SUITE_FIRST))
def test_every_suite_builds_and_steps(suite, assets, monkeypatch):
    from vlarl_fast.envs import list_tasks, make_env
    monkeypatch.setenv("VLARL_LIBERO_ASSETS", assets)  # the setting itself, not the assets= option
    task_id = list_tasks(suite)[-1]
    env = make_env(task_id, image_size=128, render_size=128, settle_steps=2)
    try:
        assert env.observation_space["image"].shape == (128, 128, 3) and env.action_space.shape == (7,)
        obs, info = env.reset(seed=3)
        assert info["task_id"] == task_id and info["instruction"] == env.instruction
        assert 0 <= info["init_state"] < 50
        assert env.observation_space.contains(obs)
        rng = np.random.default_rng(0)
        for _ in range(3):
            obs, r, term, trunc, step_info = env.step(rng.uniform(-1, 1, 7))
            assert env.observation_space.contains(obs) and r == 0.0 and not term and not trunc
            assert step_info == {"success": False}
        assert obs["image"].std() > 5  # a rendered scene, not a blank frame
    finally:
        env.close()


@pytest.mark.slow  # about 20 s on 2 busy cores (two sims, two hard resets at 256 px); CI runs it (.ci/run)
def test_observations_equal_libero_offscreen_env(envs):
    """Same initial state, same actions: the adapter's observations are LIBERO's own, turned 180 degrees
    and resized to 224 (images), and eef pos + axis-angle + finger qpos (state), on the first episode (the
    fresh sim) and the next (a hard reset), and the adapter leaves numpy's global generator alone."""
    from libero.libero.envs import OffScreenRenderEnv

    from vlarl_fast.envs.libero import load_init_states
    env = envs(GOAL, wrist=True, settle_steps=3)
    task, k = env.task, 7
    actions = np.random.default_rng(1).uniform(-1, 1, (3, 7))
    ref = OffScreenRenderEnv(bddl_file_name=task.bddl_file, camera_heights=256, camera_widths=256)
    try:
        for episode in range(2):
            state = np.random.get_state()
            obs, info = env.reset(options={"init_state": k})
            assert info["init_state"] == k
            assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), state))
            np.random.seed(k)  # LIBERO places fixtures from the global generator; the adapter seeds it so
            ref.reset()
            raw = ref.set_init_state(load_init_states(task.suite, task.name)[k])
            for _ in range(env.settle_steps):
                raw, *_ = ref.step(NOOP)
            for t in range(len(actions) + 1):
                np.testing.assert_array_equal(obs["image"], expected_image(raw["agentview_image"], 224))
                np.testing.assert_array_equal(obs["wrist_image"], expected_image(raw["robot0_eye_in_hand_image"], 224))
                np.testing.assert_allclose(obs["state"], expected_state(raw), rtol=0, atol=1e-6)
                if t == len(actions):
                    break
                obs, r, term, _, _ = env.step(actions[t])
                raw, r_ref, done_ref, _ = ref.step(actions[t])
                assert (r, term) == (r_ref, done_ref)
            np.testing.assert_array_equal(env.render(), raw["agentview_image"][::-1, ::-1])
    finally:
        ref.close()


def test_success_fires_on_a_goal_state(envs):
    """Known-good states: the drawer set open (libero_goal/0), the bowl set on the plate (libero_spatial/0,
    a contact predicate, after the physics settles); reward 1 and terminated on that step, not before."""
    env = envs(GOAL, wrist=True, settle_steps=3)
    env.reset(options={"init_state": 0})
    inner = env.libero_env.env
    _, r, term, _, _ = env.step(NOOP)
    assert (r, term) == (0.0, False)
    drawer = inner.object_states_dict["wooden_cabinet_1_middle_region"]
    drawer.set_joint(-0.15)  # LIBERO's "open" range for this cabinet is [-0.16, -0.14]
    inner.sim.forward()
    _, r, term, trunc, info = env.step(NOOP)
    assert (r, term, trunc, info) == (1.0, True, False, {"success": True})

    env = envs(SPATIAL, image_size=128, render_size=128)
    env.reset(options={"init_state": 0})
    inner = env.libero_env.env
    (pred, obj, target), = inner.parsed_problem["goal_state"]
    assert (pred, obj, target) == ("on", "akita_black_bowl_1", "plate_1")
    sim, joint = inner.sim, inner.objects_dict[obj].joints[0]
    q = sim.data.get_joint_qpos(joint).copy()
    q[:3] = sim.data.body_xpos[inner.obj_body_id[target]] + [0, 0, 0.03]  # just above the plate's centre
    sim.data.set_joint_qpos(joint, q)
    sim.data.set_joint_qvel(joint, np.zeros(6))
    sim.forward()
    for _ in range(10):
        _, r, term, _, _ = env.step(NOOP)
        if term:
            break
    assert (r, term) == (1.0, True)


def test_truncation_and_bad_input(envs):
    from vlarl_fast.envs import make_env
    env = envs(SPATIAL, image_size=128, render_size=128)
    env.max_episode_steps = 2  # the suite's limit (220) is a constructor default; a short one is cheaper to reach
    try:
        env.reset(options={"init_state": 1})
        assert env.step(np.zeros(7))[3] is False
        _, _, term, trunc, _ = env.step(np.zeros(7))
        assert (term, trunc) == (False, True)
        with pytest.raises(ValueError, match=r"shape \(7,\)"):
            env.step(np.zeros(6))
        with pytest.raises(ValueError, match="NaN"):
            env.step(np.full(7, np.nan))
        with pytest.raises(ValueError, match=r"init_state must be in \[0, 50\)"):
            env.reset(options={"init_state": 50})
    finally:
        env.max_episode_steps = 220
    with pytest.raises(ValueError, match="center_crop"):
        make_env(SPATIAL, center_crop=0.0)


@pytest.mark.slow
def test_through_the_vectorised_manager(assets):
    """Two LIBERO tasks in worker processes (spawned), stepped as one batch."""
    from vlarl_fast.envs import VectorEnv, make_env
    fns = [(lambda t=t: make_env(t, image_size=128, render_size=128, settle_steps=2, assets=assets))
           for t in (SPATIAL, GOAL)]
    with VectorEnv(fns, backend="process") as venv:
        obs, info = venv.reset(seed=0, options={"per_env": [{"init_state": 4}] * 2})
        assert obs["image"].shape == (2, 128, 128, 3) and obs["state"].shape == (2, 8)
        assert venv.task_ids == [SPATIAL, GOAL] and list(venv.init_states) == [4, 4]
        assert venv.instructions[1] == "open the middle drawer of the cabinet"
        for _ in range(2):
            obs, r, term, trunc, info = venv.step(np.zeros((2, 7), np.float32))
        assert obs["image"].shape == (2, 128, 128, 3) and not term.any() and not trunc.any()


@pytest.mark.slow  # 2 tasks x 2 full episodes of libero_spatial (230 steps each at 256 px); CI runs it (.ci/run)
def test_eval_cli_on_libero_writes_results_and_chart(assets, tmp_path, monkeypatch):
    import json

    from vlarl_fast.cli import main
    monkeypatch.setenv("VLARL_LIBERO_ASSETS", assets)
    out = tmp_path / "eval"
    assert main(["eval", "--env", "libero", "--suite", "libero_spatial", "--policy", "tiny", "--num-tasks", "2",
                 "--episodes-per-task", "2", "--videos", "1", "--output-dir", str(out), "--progress", "False"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert list(res["per_task"]) == ["libero_spatial/0", "libero_spatial/1"]
    assert res["episodes"] == 4 and res["suite"] == "libero_spatial"
    # a random policy never succeeds, so every episode runs to the suite's limit
    assert res["env_steps"] == 4 * 220 and res["success"] == 0.0
    assert (out / "success.png").stat().st_size > 1000 and len(res["videos"]) == 2


@pytest.mark.slow  # a few dozen LIBERO steps at 256 px and two tiny PPO iterations; CI runs it (.ci/run)
def test_train_cli_on_libero_runs_and_logs(assets, tmp_path, monkeypatch, capsys):
    import json

    from vlarl_fast.cli import main
    monkeypatch.setenv("VLARL_LIBERO_ASSETS", assets)
    out = tmp_path / "run"
    assert main(["train", "--env", "libero", "--suite", "libero_spatial", "--policy", "tiny", "--skip-sft", "True",
                 "--env.tasks", "libero_spatial/0", "libero_spatial/1", "--env.num-envs", "2",
                 "--env.max-episode-steps", "6", "--policy.hidden-size", "32", "--policy.num-layers", "1",
                 "--ppo.iterations", "2", "--ppo.num-steps", "4", "--ppo.minibatch-size", "4", "--ppo.critic-warmup", "1",
                 "--ire.every", "1", "--ire.steps", "1", "--ire.batch-size", "2",
                 "--eval.init-states", "1", "--eval.episodes-per-state", "1",
                 "--output-dir", str(out), "--progress", "False"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["env_steps"] == 2 * 4 * 2 and summary["eval_episodes"] == 2 and summary["reward"] == "sparse"
    text = capsys.readouterr().out
    assert "iter   2" in text and "no action statistics" in text
    assert (out / "checkpoints" / "final" / "curriculum.json").is_file()
    assert json.loads((out / "config.json").read_text())["env"]["image_size"] == 224


@pytest.mark.slow  # a few dozen LIBERO steps at 128 px, a tiny reward model and two PPO iterations; CI runs it
def test_prm_on_libero_from_policy_rollouts_and_saved_episodes(assets, tmp_path, monkeypatch):
    """`vlarl-fast prm --env libero --policy tiny` rolls the policy out (a random one: failures only) and adds a
    saved episode file; the success in it comes from this test (the arm closes its gripper in place), since a
    random policy never succeeds. Then `train --reward.prm` scores LIBERO's frames with what it wrote."""
    import json

    from vlarl_fast.cli import main
    from vlarl_fast.envs import make_env
    from vlarl_fast.prm.episodes import save_episodes
    monkeypatch.setenv("VLARL_LIBERO_ASSETS", assets)
    env = make_env(SPATIAL, assets=assets, image_size=128)
    obs, info = env.reset(seed=0, options={"init_state": 0})
    frames, states, actions = [], [], []
    for t in range(8):
        a = np.zeros(7, np.float32)
        a[6] = 1.0 if t >= 4 else -1.0
        frames.append(obs["image"])
        states.append(obs["state"])
        actions.append(a)
        obs, *_ = env.step(a)
    env.close()
    save_episodes(tmp_path / "saved", [{"images": np.stack(frames), "states": np.stack(states),
                                        "actions": np.stack(actions), "instruction": info["instruction"],
                                        "success": True, "task_id": SPATIAL}])
    out = tmp_path / "prm"
    assert main(["prm", "--env", "libero", "--policy", "tiny", "--env.tasks", SPATIAL, "--env.image-size", "128",
                 "--env.num-envs", "2", "--env.max-episode-steps", "6", "--data.policy-episodes", "2",
                 "--data.episodes", str(tmp_path / "saved"), "--data.val-fraction", "0", "--segment.min-gap", "1",
                 "--model.hidden-size", "32", "--model.num-layers", "1", "--train.epochs", "1",
                 "--output-dir", str(out), "--progress", "False"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    labels = json.loads((out / "labels.json").read_text())
    assert summary["episodes"] == 3 and summary["successes"] == 1
    rollouts = [lab for lab in labels if not lab["success"]]
    assert len(rollouts) == 2 and all(lab["frames"] == 6 and set(lab["labels"]) == {0} for lab in rollouts)
    saved = next(lab for lab in labels if lab["success"])
    assert 5 in saved["keyframes"]              # action 4 closes the gripper: frame 5 shows it
    run = tmp_path / "run"
    assert main(["train", "--env", "libero", "--policy", "tiny", "--skip-sft", "True", "--env.tasks", SPATIAL,
                 "--env.image-size", "128", "--env.num-envs", "2", "--env.max-episode-steps", "6",
                 "--policy.hidden-size", "32", "--policy.num-layers", "1", "--ppo.iterations", "2",
                 "--ppo.num-steps", "4", "--ppo.minibatch-size", "4", "--ppo.critic-warmup", "1", "--ire.every", "0",
                 "--eval.init-states", "1", "--eval.episodes-per-state", "1", "--reward.prm", str(out),
                 "--output-dir", str(run), "--progress", "False"]) == 0
    s = json.loads((run / "summary.json").read_text())
    assert s["reward"] == "sparse" and s["prm"] == str(out) and s["prm_ms_per_step"] > 0
