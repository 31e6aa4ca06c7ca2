import numpy as np
import pytest

from vlarl_fast.envs import VectorEnv, make_env


def _venv(n=3, **kw):
    return VectorEnv([lambda i=i: make_env("tabletop/reach_red", max_episode_steps=2) for i in range(n)], **kw)


def test_vector_api_and_same_step_autoreset():
    with _venv() as venv:
        assert venv.single_action_space.shape == (7,)
        assert venv.single_observation_space["image"].shape == (64, 64, 3)
        obs, info = venv.reset(seed=1)
        assert obs["image"].shape == (3, 64, 64, 3) and len(info["instruction"]) == 3
        up = np.tile(np.array([0, 0, 1, 0, 0, 0, -1], np.float32), (3, 1))
        venv.step(up)
        obs2, rew, term, trunc, info = venv.step(up)
        assert trunc.all() and not term.any()
        assert "final_obs" in info and info["episode_length"].tolist() == [2, 2, 2]
        # the returned obs is the new episode's first; final_obs is the old episode's last
        assert not np.array_equal(obs2["state"], info["final_obs"]["state"])


def test_reset_seeds_are_deterministic():
    with _venv() as a, _venv() as b:
        oa, ia = a.reset(seed=5)
        ob, ib = b.reset(seed=5)
        np.testing.assert_array_equal(oa["image"], ob["image"])
        assert list(ia["init_state"]) == list(ib["init_state"])


def test_send_recv_subsets():
    with _venv() as venv:
        venv.reset(seed=0)
        venv.send(np.zeros((2, 7), np.float32), [0, 2])
        obs, rew, term, trunc, info = venv.recv()
        assert obs["image"].shape[0] == 2 and list(info["env_id"]) == [0, 2]
        with pytest.raises(RuntimeError, match="send"):
            venv.recv()


def test_wrong_action_shape():
    with _venv() as venv:
        venv.reset(seed=0)
        with pytest.raises(ValueError, match=r"\(3, 7\)"):
            venv.step(np.zeros((3, 6), np.float32))
