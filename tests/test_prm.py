"""The robotic process reward model: segmentation, pseudo labels, metrics, the model, its RL shaping, the CLI."""
import itertools
import json

import numpy as np
import pytest
import torch

from vlarl_fast.prm.episodes import check_episode, load_episodes, save_episodes
from vlarl_fast.prm.fit import classification_metrics, roc_auc, split_episodes
from vlarl_fast.prm.labels import IGNORE, NEGATIVE, POSITIVE, LabelConfig, pseudo_labels
from vlarl_fast.prm.segment import SegmentConfig, gripper_events, keyframes, merge_close, rest_onsets


def _path(*legs):
    """End-effector positions along straight legs: (steps, per-step displacement) pieces."""
    pos, out = np.zeros(3), [np.zeros(3)]
    for n, d in legs:
        for _ in range(n):
            pos = pos + np.asarray(d, dtype=np.float64)
            out.append(pos.copy())
    return np.array(out)


# ---- segmentation ------------------------------------------------------------------------------
def test_gripper_events_mark_the_first_frame_that_shows_the_change():
    g = np.array([-1, -1, -1, 1, 1, 1, 1, -1, -1, -1.0])
    # action 3 closes, action 7 opens: frames 4 and 8 are the first to show it
    assert gripper_events(g).tolist() == [4, 8]
    assert gripper_events(np.full(6, -1.0)).tolist() == []
    # an event on the last action is clipped to the last frame
    assert gripper_events(np.array([-1, -1, 1.0])).tolist() == [2]


def test_rest_onsets_find_where_the_arm_stops_after_moving():
    # move 5 steps, rest 3, move 4, rest 2: motion of action t is ee[t+1] - ee[t]
    ee = _path((5, [0.02, 0, 0]), (3, [0, 0, 0]), (4, [0, 0.02, 0]), (2, [0, 0, 0.0001]))
    assert rest_onsets(ee, 0.15).tolist() == [5, 12]
    assert rest_onsets(np.zeros((6, 3)), 0.15).tolist() == []          # never moves
    assert rest_onsets(_path((8, [0.01, 0, 0])), 0.15).tolist() == []  # never stops


def test_keyframes_merge_events_closer_than_min_gap():
    assert merge_close(np.array([9, 3, 4, 12, 4]), 3).tolist() == [3, 9, 12]
    ee = _path((5, [0.02, 0, 0]), (3, [0, 0, 0]), (6, [0, 0.02, 0]))
    g = np.r_[np.full(7, -1.0), np.full(8, 1.0)]   # closes with action 7, while at rest (onset at frame 5)
    assert keyframes(g, ee, SegmentConfig(min_gap=1)).tolist() == [5, 8]
    assert keyframes(g, ee, SegmentConfig(min_gap=4)).tolist() == [5]
    with pytest.raises(ValueError, match="one per frame"):
        keyframes(g[:-1], ee)
    with pytest.raises(ValueError, match="velocity-threshold"):
        keyframes(g, ee, SegmentConfig(velocity_threshold=1.5))


def test_the_experts_grasp_is_a_keyframe():
    """On lift_green, the gripper event the segmentation finds is the first frame whose proprio says the cube
    is held, and the expert's stop above the cube (before it closes) is a rest onset."""
    from vlarl_fast.envs.tabletop.expert import collect_demos
    ep = collect_demos(["tabletop/lift_green"], 1, noise=0.0, seed=0, image_size=16)[0]
    held = np.flatnonzero(ep["states"][:, 6] > 0.5)
    keys = keyframes(ep["actions"][:, 6], ep["states"][:, :3], SegmentConfig(min_gap=1))
    assert ep["success"] and len(held) and held[0] in keys
    onsets = rest_onsets(ep["states"][:, :3], SegmentConfig().velocity_threshold)
    assert any(0 < held[0] - k <= 3 for k in onsets)


# ---- pseudo labels -----------------------------------------------------------------------------
def test_labels_of_successes_and_failures():
    lab = pseudo_labels(12, np.array([3, 7]), True, LabelConfig(window=1, final_frames=2))
    want = [IGNORE, IGNORE, POSITIVE, POSITIVE, POSITIVE, IGNORE, POSITIVE, POSITIVE, POSITIVE, IGNORE,
            POSITIVE, POSITIVE]
    assert lab.tolist() == want
    lab = pseudo_labels(12, np.array([3, 7]), True, LabelConfig(window=0, final_frames=1, rest="negative"))
    assert np.flatnonzero(lab == POSITIVE).tolist() == [3, 7, 11] and (lab != IGNORE).all()
    assert (pseudo_labels(12, np.array([3, 7]), False) == NEGATIVE).all()
    with pytest.raises(ValueError, match="final-frames"):
        pseudo_labels(5, np.array([]), True, LabelConfig(final_frames=0))


# ---- metrics and the split ---------------------------------------------------------------------
@pytest.mark.parametrize("n,seed", [(2, 0), (7, 1), (50, 2), (33, 3)])
def test_roc_auc_equals_the_pairwise_definition(n, seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 5, n) / 4.0   # many ties
    labels = rng.random(n) < 0.4
    labels[0], labels[-1] = True, False
    pairs = [(1.0 if p > q else 0.5 if p == q else 0.0)
             for p, q in itertools.product(scores[labels], scores[~labels])]
    assert roc_auc(scores, labels) == pytest.approx(np.mean(pairs))
    assert np.isnan(roc_auc(scores, np.ones(n, bool)))


def test_classification_metrics():
    m = classification_metrics(np.array([0.9, 0.8, 0.3, 0.1, 0.6]), np.array([1, 1, 0, 0, 0]))
    assert m["accuracy"] == pytest.approx(0.8) and m["auc"] == 1.0
    assert m["balanced_accuracy"] == pytest.approx((1.0 + 2 / 3) / 2) and m["positives"] == 2


def test_split_holds_successes_and_failures_on_both_sides():
    succ = [True] * 5 + [False] * 3
    train, val = split_episodes(succ, 0.2, seed=0)
    assert sorted(train.tolist() + val.tolist()) == list(range(8))
    assert {succ[i] for i in val} == {True, False} and {succ[i] for i in train} == {True, False}
    assert split_episodes(succ, 0.0, 0)[1].tolist() == []
    with pytest.raises(ValueError, match="val-fraction"):
        split_episodes(succ, 1.0, 0)


# ---- episode files -----------------------------------------------------------------------------
def _episode(T=6, success=True, seed=0, size=16):
    rng = np.random.default_rng(seed)
    return {"images": rng.integers(0, 256, (T, size, size, 3), dtype=np.uint8),
            "states": rng.normal(size=(T, 8)).astype(np.float32), "actions": rng.uniform(-1, 1, (T, 7)),
            "instruction": "move the gripper to the red cube", "success": success, "task_id": "tabletop/reach_red"}


def test_episode_files_round_trip_and_bad_ones_are_explained(tmp_path):
    eps = [_episode(5, True, 0), _episode(7, False, 1)]
    save_episodes(tmp_path / "eps", eps)
    back = load_episodes(tmp_path / "eps")
    assert [len(e["images"]) for e in back] == [5, 7] and [e["success"] for e in back] == [True, False]
    np.testing.assert_array_equal(back[1]["images"], eps[1]["images"])
    np.testing.assert_array_equal(back[0]["ee_pos"], eps[0]["states"][:, :3])
    assert back[0]["instruction"] == eps[0]["instruction"] and back[0]["task_id"] == "tabletop/reach_red"
    bad = dict(_episode())
    del bad["success"]
    with pytest.raises(ValueError, match="missing success"):
        check_episode(bad)
    with pytest.raises(ValueError, match=r"actions must be \[6, 7\]"):
        check_episode(dict(_episode(), actions=np.zeros((5, 7))))
    with pytest.raises(FileNotFoundError, match="holds no"):
        load_episodes(tmp_path)


# ---- the model ---------------------------------------------------------------------------------
def _tiny_rm(seed=0, size=16):
    from vlarl_fast.policy import make_policy
    from vlarl_fast.prm.model import RewardModel, question_text
    pol = make_policy("tiny", instructions=[question_text("move the gripper to the red cube")], image_size=size,
                      seed=seed, hidden_size=32, num_layers=1)
    return RewardModel(pol)


def test_question_is_framed_as_each_model_frames_a_prompt(tmp_path):
    from vlarl_fast.policy import make_policy
    from vlarl_fast.policy.openvla import build_llama_tokenizer, random_tiny_openvla, save_openvla
    from vlarl_fast.prm.model import RewardModel, question_text
    rm = _tiny_rm()
    ids, mask = rm.question_ids(["Move the gripper to the red cube."])
    text = rm.policy.tokenizer.decode(ids[0][mask[0].bool()])
    assert text.strip() == question_text("move the gripper to the red cube") == \
        "The task is move the gripper to the red cube, is it completed?"
    # OpenVLA lays a prompt out as BOS, image patches, text: the question starts with BOS too
    path = tmp_path / "openvla"
    save_openvla(random_tiny_openvla(seed=1, value_hidden=None), build_llama_tokenizer(["open the drawer"]), path)
    rm = RewardModel(make_policy(str(path)))
    ids, _ = rm.question_ids(["open the drawer"])
    assert ids[0, 0] == rm.policy.tokenizer.bos_token_id
    p = rm.score(np.zeros((2, 28, 28, 3), np.uint8), None, ["open the drawer"] * 2)
    assert p.shape == (2,) and np.all((p > 0) & (p < 1))


def test_reward_model_learns_a_visual_concept_and_round_trips(tmp_path):
    """Frames with a bright square are 'completed', frames without are not: a few hundred steps separate them
    on frames it never saw, and the saved model scores exactly as the trained one."""
    from vlarl_fast.prm.fit import evaluate_frames, fit
    from vlarl_fast.prm.model import RewardModel
    torch.manual_seed(0)
    rng = np.random.default_rng(0)

    def frames(n):
        imgs = rng.integers(0, 60, (n, 16, 16, 3), dtype=np.uint8)
        y = rng.random(n) < 0.3
        for i in np.flatnonzero(y):
            r, c = rng.integers(0, 10, 2)
            imgs[i, r:r + 6, c:c + 6] = 250
        return {"images": imgs, "states": np.zeros((n, 8), np.float32), "labels": y.astype(np.int8),
                "instructions": ["move the gripper to the red cube"] * n}

    rm = _tiny_rm()
    losses = fit(rm, frames(512), epochs=3, batch_size=32, lr=2e-3, weight_decay=0.0, seed=0, warmup_steps=10)
    assert losses[-1] < losses[0]
    metrics, probs = evaluate_frames(rm, frames(128))
    assert metrics["auc"] > 0.95, metrics
    rm.meta = {"val": metrics}
    rm.save(tmp_path / "rm")
    back = RewardModel.load(tmp_path / "rm")
    test = frames(16)
    np.testing.assert_allclose(back.score(test["images"], test["states"], test["instructions"]),
                               rm.score(test["images"], test["states"], test["instructions"]), atol=1e-6)
    assert back.meta["val"]["auc"] == metrics["auc"]
    with pytest.raises(FileNotFoundError, match="is not a reward model"):
        RewardModel.load(tmp_path)
    with pytest.raises(ValueError, match="gave 0 positives"):
        fit(rm, dict(frames(8), labels=np.zeros(8, np.int8)), epochs=1, batch_size=4, lr=1e-3, weight_decay=0.0,
            seed=0)


# ---- shaping -----------------------------------------------------------------------------------
def test_shaping_is_a_potential_difference_that_telescopes():
    from vlarl_fast.prm.shaping import PRMShaping
    rm = _tiny_rm(seed=3)
    torch.nn.init.normal_(rm.policy.model.value_head[-1].weight, std=2.0)   # a head that varies across frames
    rng = np.random.default_rng(0)
    N, T, gamma, coef = 3, 6, 0.9, 0.5
    obs = [{"image": rng.integers(0, 256, (N, 16, 16, 3), dtype=np.uint8),
            "state": rng.normal(size=(N, 8)).astype(np.float32)} for _ in range(T + 1)]
    final = {"image": rng.integers(0, 256, (N, 16, 16, 3), dtype=np.uint8),
             "state": rng.normal(size=(N, 8)).astype(np.float32)}
    ins = ["move the gripper to the red cube"] * N
    phi = [rm.score(o["image"], o["state"], ins) for o in obs]
    phi_final = rm.score(final["image"], final["state"], ins)
    sh = PRMShaping(rm, coef, gamma)
    with pytest.raises(RuntimeError, match="reset"):
        sh(np.zeros(N), obs[1], ins, ins, np.zeros(N, bool), np.zeros(N, bool), {})
    sh.reset(obs[0], ins)
    total = np.zeros(N)
    for t in range(T):
        # env 0 terminates at the last step, env 1 is cut by the time limit there, env 2 goes on
        term = np.array([t == T - 1, False, False])
        trunc = np.array([False, t == T - 1, False])
        r = sh(np.zeros(N), obs[t + 1], ins, ins, term, trunc, {"final_obs": final})
        nxt = phi[t + 1].copy()
        if t == T - 1:
            nxt[0], nxt[1] = 0.0, phi_final[1]
        np.testing.assert_allclose(r, coef * (gamma * nxt - phi[t]), atol=1e-6)
        total += gamma ** t * r
    # the discounted sum along the episode is coef * (gamma^T Phi(last) - Phi(first)), Phi(terminal) = 0
    np.testing.assert_allclose(total[0], -coef * phi[0][0], atol=1e-5)
    np.testing.assert_allclose(total[1], coef * (gamma ** T * phi_final[1] - phi[0][1]), atol=1e-5)
    assert sh.steps == N * T and sh.seconds > 0


# ---- the command line --------------------------------------------------------------------------
def test_prm_smoke_writes_a_model_that_train_uses(tmp_path, usage_error):
    from vlarl_fast.cli import main
    d = tmp_path / "prm"
    assert main(["prm", "--preset", "smoke", "--output-dir", str(d), "--progress", "False"]) == 0
    summary = json.loads((d / "summary.json").read_text())
    labels = json.loads((d / "labels.json").read_text())
    assert summary["episodes"] == len(labels) == 6 + 3 and summary["positives"] > 0 and summary["negatives"] > 0
    assert summary["successes"] < summary["episodes"]          # failures are kept
    assert {lab["split"] for lab in labels} == {"train", "val"}
    assert len(list((d / "episodes").glob("*.npz"))) == 9 and len(list((d / "plots").glob("*.png"))) == 2
    assert (d / "reward_model" / "reward_model.json").is_file()
    run = tmp_path / "run"
    assert main(["train", "--preset", "smoke", "--output-dir", str(run), "--progress", "False",
                 "--env.reward", "sparse", "--reward.prm", str(d), "--reward.prm-coef", "0.5"]) == 0
    s = json.loads((run / "summary.json").read_text())
    assert s["prm"] == str(d) and s["prm_coef"] == 0.5 and 0 < s["prm_share"] < 1 and s["prm_ms_per_step"] > 0
    history = json.loads((run / "history.json").read_text())
    assert all(h["prm_seconds"] > 0 for h in history)
    # the saved episodes feed another run, and a wrong path is explained before anything trains
    assert main(["prm", "--preset", "smoke", "--output-dir", str(tmp_path / "again"), "--progress", "False",
                 "--data.expert-episodes", "0", "--data.policy-episodes", "0", "--data.episodes",
                 str(d / "episodes"), "--plots", "0"]) == 0
    assert json.loads((tmp_path / "again" / "summary.json").read_text())["episodes"] == 9
    usage_error("is not a reward model",
                ["train", "--preset", "smoke", "--output-dir", str(run), "--reward.prm", str(tmp_path)])
    usage_error("scores 64 px images but the envs render 32 px",
                ["train", "--preset", "smoke", "--output-dir", str(run), "--reward.prm", str(d), "--env.image-size", "32"])


def test_plotted_episodes_are_spread_over_the_tasks():
    from vlarl_fast.prm.run import spread
    assert spread(list(range(10)), 3) == [0, 4, 9]
    assert spread([5], 3) == [5] and spread([], 2) == [] and spread([1, 2], 0) == []
