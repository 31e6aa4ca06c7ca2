import functools

import numpy as np
import pytest

from vlarl_fast import _ext
from vlarl_fast.envs import InProcessVectorEnv, VectorEnv, choose_backend, make_env

needs_ext = pytest.mark.skipif(not _ext.EXT_AVAILABLE, reason=f"extension not built: {_ext.EXT_ERROR}")


def _fns(n, size=64):
    return [lambda i=i: make_env("tabletop/reach_red", max_episode_steps=2, image_size=size) for i in range(n)]


def _venv(n=3, **kw):
    return VectorEnv(_fns(n), **kw)


# the default ('auto': worker processes where the extension is built) and the in-process loop
BOTH = pytest.mark.parametrize("backend", ["auto", "inprocess"])


@BOTH
def test_vector_api_and_same_step_autoreset(backend):
    with _venv(backend=backend) as venv:
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


@BOTH
def test_reset_seeds_are_deterministic(backend):
    with _venv(backend=backend) as a, _venv(backend=backend) as b:
        oa, ia = a.reset(seed=5)
        ob, ib = b.reset(seed=5)
        np.testing.assert_array_equal(oa["image"], ob["image"])
        assert list(ia["init_state"]) == list(ib["init_state"])


@BOTH
def test_send_recv_subsets(backend):
    with _venv(backend=backend) as venv:
        venv.reset(seed=0)
        venv.send(np.zeros((2, 7), np.float32), [0, 2])
        obs, rew, term, trunc, info = venv.recv()
        assert obs["image"].shape[0] == 2 and list(info["env_id"]) == [0, 2]
        with pytest.raises(RuntimeError, match="send"):
            venv.recv()


@BOTH
def test_wrong_action_shape(backend):
    with _venv(backend=backend) as venv:
        venv.reset(seed=0)
        with pytest.raises(ValueError, match=r"\(3, 7\)"):
            venv.step(np.zeros((3, 6), np.float32))


# ---- backend choice ------------------------------------------------------------------------
def test_auto_chooses_worker_processes_for_several_envs_with_the_extension(monkeypatch):
    monkeypatch.setattr(_ext, "EXT_AVAILABLE", True)
    assert choose_backend(8)[0] == choose_backend(2)[0] == "process"
    assert choose_backend(1)[0] == "inprocess" and "one env" in choose_backend(1)[1]
    assert choose_backend(8, "inprocess") == ("inprocess", "backend='inprocess' was asked for")
    monkeypatch.setattr(_ext, "EXT_AVAILABLE", False)
    monkeypatch.setattr(_ext, "EXT_ERROR", "disabled by VLARL_DISABLE_EXT=1")
    name, why = choose_backend(8)
    assert name == "inprocess" and "compiled extension is unavailable (disabled by VLARL_DISABLE_EXT=1)" in why
    with pytest.raises(ValueError, match="unknown VectorEnv backend 'threads'"):
        choose_backend(8, "threads")


@needs_ext
def test_default_vector_env_is_the_worker_process_one_for_several_envs():
    from vlarl_fast.envs.process_vector import ProcessVectorEnv
    with VectorEnv(_fns(2, size=16)) as v:
        assert type(v) is ProcessVectorEnv and v.backend == "process" and "2 envs" in v.backend_reason
        assert isinstance(v, VectorEnv)


def test_auto_stays_in_process_for_one_env_or_without_the_extension(monkeypatch):
    with VectorEnv(_fns(1, size=16)) as v:
        assert type(v) is InProcessVectorEnv and v.backend == "inprocess" and "one env" in v.backend_reason
    monkeypatch.setattr(_ext, "EXT_AVAILABLE", False)
    monkeypatch.setattr(_ext, "EXT_ERROR", "not built")
    with VectorEnv(_fns(3, size=16)) as v:
        assert type(v) is InProcessVectorEnv and v.backend == "inprocess"
        assert "extension is unavailable (not built)" in v.backend_reason


@pytest.mark.parametrize("backend", ["auto", "inprocess", pytest.param("process", marks=needs_ext)])
def test_every_backend_is_a_vector_env_built_once(backend, monkeypatch):
    classes = [InProcessVectorEnv]
    if _ext.EXT_AVAILABLE:
        from vlarl_fast.envs.process_vector import ProcessVectorEnv
        classes.append(ProcessVectorEnv)
    inits = []
    for cls in classes:
        @functools.wraps(cls.__init__)   # keeps the signature VectorEnv checks keywords against
        def counted(self, *a, _real=cls.__init__, _name=cls.__name__, **k):
            inits.append(_name)
            _real(self, *a, **k)
        monkeypatch.setattr(cls, "__init__", counted)
    with VectorEnv(_fns(2, size=16), backend=backend) as v:
        assert isinstance(v, VectorEnv)
        assert v.backend == (backend if backend != "auto" else choose_backend(2)[0])
        assert inits == [type(v).__name__]


def test_constructor_keywords_reach_the_in_process_backend():
    calls = []
    with VectorEnv(_fns(2, size=16), backend="inprocess", autoreset=False,
                   reset_options=lambda i: calls.append(i) or None) as v:
        assert v.autoreset is False
        v.reset(seed=0)
        assert calls == [0, 1]


@needs_ext
def test_constructor_keywords_reach_the_worker_process_backend():
    with VectorEnv(_fns(2, size=16), backend="process", autoreset=False, batch_size=1, num_workers=2,
                   step_timeout=30.0, rebalance=False, start_timeout=60.0) as v:
        assert (v.autoreset, v.batch_size, v.num_workers, v.step_timeout, v.rebalance, v.start_timeout) == \
            (False, 1, 2, 30.0, False, 60.0)


def test_keywords_a_backend_does_not_take_name_it(monkeypatch):
    with pytest.raises(TypeError, match=r"backend 'inprocess' does not take num_workers.*backend='process'"):
        VectorEnv(_fns(2, size=16), backend="inprocess", num_workers=2)
    # auto's choice is explained: one env stays in-process
    with pytest.raises(TypeError, match=r"backend 'inprocess' does not take batch_size(.|\n)*one env"):
        VectorEnv(_fns(1, size=16), batch_size=1)
    with pytest.raises(TypeError, match=r"backend 'inprocess' does not take colour; it takes reset_options, autoreset"):
        VectorEnv(_fns(2, size=16), backend="inprocess", colour="red")
    with pytest.raises(ValueError, match="InProcessVectorEnv is the 'inprocess' backend, not 'process'"):
        InProcessVectorEnv(_fns(1, size=16), backend="process")
    with pytest.raises(TypeError, match="sequence of env factories"):
        VectorEnv(f for f in _fns(2, size=16))


@needs_ext
def test_process_backend_names_itself_for_unknown_keywords():
    with pytest.raises(TypeError, match=r"backend 'process' does not take colour; it takes reset_options.*num_workers"):
        VectorEnv(_fns(2, size=16), backend="process", colour="red")


# ---- stepping a subset (what evaluation does) ----------------------------------------------
@BOTH
def test_step_envs_steps_only_the_given_envs(backend):
    with _venv(3, backend=backend, autoreset=False) as venv:
        venv.reset(seed=3)
        before = venv.observations([0, 1, 2])
        up = np.tile(np.array([0, 0, 1, 0, 0, 0, -1], np.float32), (2, 1))
        obs, rew, term, trunc, info = venv.step_envs(up, [2, 0])
        assert list(info["env_id"]) == [2, 0] and obs["state"].shape[0] == 2
        after = venv.observations([0, 1, 2])
        np.testing.assert_array_equal(after["state"][1], before["state"][1])   # env 1 did not move
        np.testing.assert_array_equal(after["state"][[2, 0]], obs["state"])
        assert not np.array_equal(after["state"][0], before["state"][0])
        with pytest.raises(ValueError, match=r"distinct ids in \[0, 3\)"):
            venv.step_envs(up, [1, 1])
        with pytest.raises(ValueError, match=r"distinct ids in \[0, 3\)"):
            venv.step_envs(up[:1], [3])
        with pytest.raises(TypeError, match="integer env indices"):
            venv.step_envs(up[:1], [0.5])
