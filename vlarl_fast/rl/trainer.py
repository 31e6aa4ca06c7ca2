"""Trajectory-level PPO for a token-emitting VLA (VLA-RL's formulation).

Where this departs from textbook PPO, on purpose:
- an action is 7 tokens; its log-prob is the sum of the token log-probs, so there is one ratio,
  one value and one reward per environment step (an episode is a multi-turn conversation);
- the old log-probs are those of the policy that sampled the rollout, taken before the first epoch:
  the rollout pass's own, or (``--ppo.recompute-logprobs``; on by default for a bfloat16 model) the
  update's forward run over the rollout once without gradients, so that the ratio compares the
  update's arithmetic with itself and starts at 1 (the rollout decoder's differ in bfloat16);
- a time-limit truncation bootstraps from V(final observation) instead of counting as failure;
- the first ``critic_warmup`` iterations update only the critic (value head);
- the clip range may be asymmetric (clip_low, clip_high);
- with ``freeze_vision`` the vision tower is fixed during RL, so its rollout features are
  reused by the update instead of re-encoding every image.

``--algo grpo|rloo`` replace the critic and GAE by group-relative, episode-level advantages (groups.py): the
rollout runs groups of K episodes from one (task, initial state) to their ends, and every action of an episode
gets its episode's advantage under the same clipped ratio. ``--ppo.kl-coef`` adds a k3 KL penalty towards the
policy RL started from (reference.py), for every algorithm.

Bad steps never stop a run: a non-finite loss, log-prob, advantage or gradient skips that update (counted in
``skipped_updates``), and a step that a worker restart cut short leaves the update instead of being
bootstrapped from the fresh episode the restart began.
"""
from __future__ import annotations

import contextlib
import functools
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..config import PPOConfig
from ..dist.comm import SINGLE, Comm
from ..dist.fsdp import full_tensor, gathered, shard_policy, sync_buffers
from ..envs import VectorEnv
from ..kernels import NonFiniteError, gae
from ..policy import VLAPolicy
from ..policy.precision import check_float32_optimizer, float32_training, rollout_matches_update
from ..policy.protocol import update_mode
from .buffer import RolloutBuffer
from .curriculum import Curriculum
from .groups import GROUP_ALGOS, group_advantages, informative
from .online_data import SuccessfulEpisodes
from .ppo import explained_variance, normalize_advantages, normalize_advantages_grouped, ppo_losses
from .reference import ReferencePolicy, k3_kl

# a group rollout keeps starting groups until the informative ones fill the batch, but stops after this many
# batches' worth of env steps, so a policy that solves (or fails) everything cannot stall an iteration
MAX_SAMPLE_FACTOR = 4

if TYPE_CHECKING:
    from ..prm.shaping import PRMShaping


@dataclass
class IterationStats:
    iteration: int
    env_steps: int
    sps: float
    episodes: int
    success: float
    episode_return: float
    pg_loss: float
    v_loss: float
    entropy: float
    approx_kl: float
    clipfrac: float
    explained_variance: float
    critic_only: bool
    skipped_updates: int
    # the first minibatch of the first epoch, before any step: its ratio should be 1 (docs/precision.md)
    first_ratio_error: float = math.nan   # max |ratio - 1|
    first_approx_kl: float = math.nan
    first_clipfrac: float = math.nan
    rollout_logp_gap: float = math.nan    # mean |rollout log-prob - recomputed log-prob| per action
    prm_seconds: float = math.nan         # time the reward model spent scoring this iteration's steps
    kl_ref: float = math.nan              # mean k3 KL to the reference policy (--ppo.kl-coef > 0)
    groups_kept: int = 0                  # group algorithms: complete groups the update learnt from,
    groups_dropped: int = 0               # and groups dynamic sampling left out (all succeeded or all failed)
    lost_steps: int = 0                   # steps that env worker restarts cut short (left out of the update)
    rollout_seconds: float = math.nan     # wall time of the rollout (decoding, env steps, reward shaping)
    update_seconds: float = math.nan      # and of the update


def freeze_below_top_layers(model, k: int) -> None:
    """Train only the top ``k`` decoder layers, the final norm and the LM head (iRe-VLA's RL stage
    keeps the backbone frozen). Adam turns the noise of a policy gradient into full-size steps on
    every parameter it touches, and a freshly fitted SFT policy loses its skill to that drift; fewer
    trainable parameters keep the drift small. The value head stays trainable."""
    layers = model.decoder.layers
    if not 0 < k <= len(layers):
        raise ValueError(f"--ppo.train-layers must be in [0, {len(layers)}] (0 trains every layer); got {k}")
    keep = {id(p) for layer in layers[len(layers) - k:] for p in layer.parameters()}
    keep |= {id(p) for p in model.decoder.norm.parameters()}
    keep |= {id(model.lm_head_weight)}
    keep |= {id(p) for p in model.value_head.parameters()}
    for p in model.parameters():
        if id(p) not in keep:
            p.requires_grad_(False)


def train_lora_only(model, cfg: PPOConfig) -> None:
    """LoRA adapters on the language model (added unless the checkpoint brought them) and the value head are
    all that learn."""
    from ..policy.lora import add_lora, has_lora
    if not has_lora(model):
        add_lora(model, rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                 targets=tuple(cfg.lora_targets))
    value_ids = {id(p) for p in model.value_head.parameters()}
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name or id(p) in value_ids)


def resolve_recompute_logprobs(name: str, model) -> bool:
    """--ppo.recompute-logprobs: 'auto' recomputes unless the rollout and the update agree in float32."""
    if name not in ("auto", "on", "off"):
        raise ValueError(f"unknown --ppo.recompute-logprobs {name!r}; use auto, on or off")
    return name == "on" or (name == "auto" and not rollout_matches_update(model))


def frozen_layer_cache(policy: VLAPolicy, cfg: PPOConfig) -> int | None:
    """The first trainable decoder layer when the update may start there (``--ppo.cache-frozen-layers``):
    the rollout keeps that layer's inputs, and the update runs only the layers above instead of the whole
    model. It needs everything below frozen (top layers trained, no LoRA, vision frozen), the shared critic
    and a Llama-style decoder: 'auto' (the default) starts there where those hold, 'on' (or True) requires
    them; None when off."""
    mode = {True: "on", False: "off"}.get(cfg.cache_frozen_layers, cfg.cache_frozen_layers)
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"unknown --ppo.cache-frozen-layers {mode!r}; use auto, on or off")
    if mode == "off":
        return None
    dec = policy.model.decoder
    why = ("--ppo.train-layers > 0" if cfg.train_layers <= 0 else "no LoRA" if cfg.lora_rank > 0 else
           "--ppo.freeze-vision True" if not cfg.freeze_vision else
           "--ppo.critic shared" if cfg.critic != "shared" else
           f"a Llama-style decoder ({type(dec).__name__} is not one)"
           if not all(hasattr(dec, a) for a in ("layers", "rotary_emb", "norm")) else None)
    if why is None:
        return len(dec.layers) - cfg.train_layers
    if mode == "auto":
        return None
    raise ValueError(f"--ppo.cache-frozen-layers needs {why} (everything below the trained layers frozen)")


def pipelined(rollout: str, envs) -> bool:
    """--ppo.rollout: 'auto' pipelines where the envs step in worker processes, which can step one half while
    this process decodes for the other; in-process envs would only step after the decoding anyway."""
    if rollout not in ("auto", "sync", "pipelined"):
        raise ValueError(f"unknown --ppo.rollout {rollout!r}; use auto, sync or pipelined")
    if envs.num_envs < 2:
        return False
    return rollout == "pipelined" or (rollout == "auto" and getattr(envs, "backend", "") == "process")


def pipeline_halves(envs) -> list[np.ndarray]:
    """The two halves of a pipelined rollout: with worker processes, the envs of one half of the workers and
    those of the other, so that while the policy decodes for one half only the other half's workers step and
    each side has cores of its own; in-process, the first and the second half of the envs."""
    owner = getattr(envs, "env_workers", None)
    n = envs.num_envs
    if owner is not None and getattr(envs, "num_workers", 1) >= 2:
        first = owner < envs.num_workers // 2
        if first.any() and not first.all():
            return [np.flatnonzero(first), np.flatnonzero(~first)]
    return [np.arange(n // 2), np.arange(n // 2, n)]


@contextlib.contextmanager
def decode_threads(envs, device):
    """On the CPU, a pipelined rollout decodes while half of the workers step: the policy takes the cores those
    workers leave (at least one thread), not all of them."""
    before = torch.get_num_threads()
    workers = getattr(envs, "num_workers", 0)
    if torch.device(device).type == "cpu" and workers:
        torch.set_num_threads(max(1, before - (workers + 1) // 2))
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _Scorer(torch.nn.Module):
    """The update's forward as one module, so that DistributedDataParallel can wrap it: its parameters are the
    policy's and the critic's, its forward ``PPOTrainer._score``."""

    def __init__(self, trainer: PPOTrainer):
        super().__init__()
        self.model = trainer.policy.model
        if trainer.policy.critic is not None:
            self.critic = trainer.policy.critic
        object.__setattr__(self, "_score", trainer._score)   # a method, not a submodule

    def forward(self, data, idx, tokens, critic_only):
        return self._score(data, idx, tokens, critic_only)


class PPOTrainer:
    """PPO (VLA-RL's), GRPO or RLOO over a vector env, by ``cfg.algo``. ``comm``: this rank of a data-parallel
    run (docs/distributed.md): ``envs`` are its share, gradients are averaged over the ranks by
    DistributedDataParallel, advantages are normalised over every rank's batch, and every decision to skip or stop
    is taken by all ranks together."""

    def __init__(self, policy: VLAPolicy, envs: VectorEnv, cfg: PPOConfig, seed: int = 0,
                 curriculum: Curriculum | None = None, recorder: SuccessfulEpisodes | None = None,
                 shaping: PRMShaping | None = None, comm: Comm = SINGLE, shard: bool = False):
        self.policy, self.envs, self.cfg, self.comm = policy, envs, cfg, comm
        self.groups = cfg.algo in GROUP_ALGOS
        self.shaping = shaping     # the process reward model's potential-based term (prm/shaping.py)
        self.curriculum = curriculum
        self.recorder = recorder   # keeps successful episodes for iRe-VLA's supervised stage
        model = policy.model
        policy.set_critic(cfg.critic, cfg.value_pooling)
        if cfg.freeze_vision:
            for p in model.vision_tower.parameters():
                p.requires_grad_(False)
        if cfg.lora_rank > 0:
            train_lora_only(model, cfg)
        elif cfg.train_layers > 0:
            freeze_below_top_layers(model, cfg.train_layers)
        # from the dtypes the model computes in, before sharding makes every weight a float32 shard
        self.recompute_logprobs = resolve_recompute_logprobs(cfg.recompute_logprobs, model)
        # --dist.shard full: FSDP2 over the ranks (dist/fsdp.py), before the optimiser sees the parameters
        self.root = None
        if shard:
            self.root = shard_policy(policy, comm)
        value_params = policy.value_parameters()
        value_ids = {id(p) for p in value_params} | {id(p) for p in model.value_head.parameters()}
        policy_params = [p for p in model.parameters() if p.requires_grad and id(p) not in value_ids]
        self.masters = float32_training(policy, policy_params + value_params)
        self.optimizer = torch.optim.Adam([
            {"params": self.masters.of(policy_params), "lr": cfg.learning_rate},
            {"params": self.masters.of(value_params), "lr": cfg.critic_learning_rate}], eps=1e-5)
        check_float32_optimizer(self.optimizer)
        self.reference = ReferencePolicy(policy) if cfg.kl_coef > 0 else None
        self.generator = torch.Generator(device=policy.device).manual_seed(seed + 1_000_003 * comm.rank)
        # GAE reads the buffer's rewards, values and flags where they live: on the policy's device
        self.buffer = RolloutBuffer(cfg.num_steps, envs.num_envs, device=policy.device)
        self.first_layer = frozen_layer_cache(policy, cfg)
        pipelined(cfg.rollout, envs)   # a bad --ppo.rollout fails here, not at the first rollout
        self.obs, _ = envs.reset(seed=seed + comm.rank * envs.num_envs)   # env i of the run: seed + i
        if shaping is not None:
            shaping.reset(self.obs, envs.instructions)
        self.episode_adv = np.zeros(0, dtype=np.float32)   # group algorithms: advantage of each rollout episode
        self.greedy = False   # deterministic rollouts (tests compare the synchronous and the pipelined loop)
        # each env's actions since its episode began: with its initial state, what a resumed run replays
        self._actions: list[list[np.ndarray]] = [[] for _ in range(envs.num_envs)]
        self.iteration = 0
        self.global_step = 0   # this rank's env steps
        # the update's forward: through the FSDP root where the model is sharded (where its gradients are
        # reduce-scattered), else directly, or wrapped in DDP below
        self.forward = self._score if self.root is None else self._sharded_score
        self.score = self.forward
        if comm.world > 1:
            if self.root is None:
                self._wrap_ddp()
            names = sorted(set(x for r in comm.all_gather(list(envs.instructions)) for x in r))
            self.task_index = {s: i for i, s in enumerate(names)}   # the same on every rank

    def _wrap_ddp(self) -> None:
        from torch.nn.parallel import DistributedDataParallel
        self.score = self.forward   # the old wrapper's reducer goes first
        # unused parameters: the critic warm-up's updates leave the policy's out
        self.score = DistributedDataParallel(_Scorer(self), find_unused_parameters=True)

    def share_stage_weights(self) -> None:
        """After iRe-VLA's supervised stage ran on rank 0 alone: its weights (and buffers) to every rank. DDP is
        wrapped afresh, which sends them: a backward outside DDP (the stage's) marks every parameter it reaches
        as used in DDP's next step, and one that PPO's forward then leaves unused (with every layer trained, the
        vision side's) would fail that step. A sharded model runs the stage on every rank: nothing to send."""
        if self.comm.world > 1 and self.root is None:
            self._wrap_ddp()

    def close(self) -> None:
        """Drop the DistributedDataParallel wrapper now, while the process group is alive (a reducer that
        outlives it tears the group down with the GIL held, which can hang gloo's thread)."""
        self.score = self.forward

    def _sharded_score(self, *args):
        # the arguments reach the root's forward inside a closure: FSDP2 would move tensor arguments (the whole
        # rollout buffer) to the device
        return self.root(functools.partial(self._score, *args))

    def whole_weights(self):
        """Context in which the policy's weights are whole on this rank: the rollout's and the evaluation's
        decoding read them directly (a collective where the model is sharded)."""
        return gathered(self.root)

    # ---- rollout ---------------------------------------------------------------------------
    @torch.no_grad()
    def _step(self, t: int, ids: np.ndarray, stats: dict, episode: np.ndarray | None = None) -> dict:
        """One vector step of envs ``ids``: act, step the envs, observe the outcome. Every env steps (PPO) or
        only those whose group still runs (the group algorithms)."""
        actions, instructions = self._act(t, ids, episode)
        full = len(ids) == self.envs.num_envs
        result = self.envs.step(actions) if full else self.envs.step_envs(actions, ids)
        return self._observe(t, ids, instructions, result, stats)

    @torch.no_grad()
    def _act(self, t: int, ids: np.ndarray, episode: np.ndarray | None = None) -> tuple[np.ndarray, list[str]]:
        """The policy's actions for envs ``ids`` at step t, stored in the buffer (and the iRe-VLA recorder);
        returns them with the instructions they were chosen for."""
        cfg, buf, pol = self.cfg, self.buffer, self.policy
        full = len(ids) == self.envs.num_envs
        every = self.envs.instructions
        instructions = every if full else [every[i] for i in ids]
        images, states = (self.obs["image"], self.obs["state"]) if full else \
            (self.obs["image"][ids], self.obs["state"][ids])
        out = pol.act(images, states, instructions, temperature=cfg.temperature, greedy=self.greedy,
                      generator=self.generator, capture_layer=self.first_layer)
        obs_store = out.vision_feats.cpu() if cfg.freeze_vision else torch.as_tensor(images)
        tokens = out.tokens.cpu()
        buf.add(t, obs_store, torch.as_tensor(states), tokens, out.logprobs.cpu(), out.values, instructions,
                None if out.frozen is None else out.frozen.to("cpu"), ids=None if full else ids, episode=episode)
        if self.recorder is not None:
            self.recorder.record(images, states, tokens.numpy(), instructions, slots=None if full else ids)
        for j, i in enumerate(ids):
            self._actions[i].append(np.array(out.actions[j]))
        return out.actions, instructions

    @torch.no_grad()
    def _observe(self, t: int, ids: np.ndarray, instructions: list[str], result: tuple, stats: dict) -> dict:
        """What step t of envs ``ids`` gave: the (shaped) rewards and flags into the buffer, bootstrap values at
        time-limit cuts, episode ends to the curriculum, the recorder and the statistics."""
        buf, pol = self.buffer, self.policy
        full = len(ids) == self.envs.num_envs
        next_obs, reward, term, trunc, info = result
        if not np.isfinite(reward).all():
            raise FloatingPointError("non-finite reward from the environment")
        lost = np.asarray(info.get("worker_restarted", np.zeros(len(ids), dtype=bool)), dtype=bool)
        if self.shaping is not None:
            after = self.envs.instructions
            reward = self.shaping(reward, next_obs, after if full else [after[i] for i in ids], instructions,
                                  term, trunc, info, ids=None if full else ids)
        buf.record(t, reward, term, trunc, lost, ids=None if full else ids)
        # bootstrap value of the final observation at time-limit truncations (the critic's; groups have none)
        cut = np.flatnonzero(trunc & ~term & ~lost)
        if len(cut) and not self.groups:
            fo = info["final_obs"]
            buf.bootstrap(t, ids[cut], pol.value(fo["image"][cut], fo["state"][cut], [instructions[j] for j in cut]))
        ended = np.asarray(info["done"], dtype=bool) | lost
        for j in np.flatnonzero(ended):
            i = int(ids[j])
            self._actions[i] = []
            ok = bool(info["success"][j]) and not lost[j]
            if self.recorder is not None:
                self.recorder.end(i, ok)
            if lost[j]:
                stats["lost_steps"] += 1
                continue   # a lost episode says nothing about its initial state
            stats["successes"].append(ok)
            stats["returns"].append(float(info["episode_return"][j]))
            if self.curriculum is not None:
                self.curriculum.update(info["final_task_id"][j], int(info["final_init_state"][j]), ok)
        if full:
            self.obs = next_obs
        else:
            for k in self.obs:
                self.obs[k][ids] = next_obs[k]
        self.global_step += len(ids)
        return {"reward": np.asarray(reward, dtype=np.float32), "ended": ended, "lost": lost,
                "success": np.asarray(info["success"], dtype=bool) & ~lost}

    # ---- what a resumed run needs of the envs -------------------------------------------------
    def env_replay(self) -> dict:
        """Each env's episode in progress: its initial state and the actions taken since."""
        return {"init_states": np.asarray(self.envs.init_states).copy(),
                "actions": [np.stack(a) if a else np.zeros((0, 7), np.float32) for a in self._actions]}

    def replay_envs(self, saved: dict) -> None:
        """Rebuild the episodes ``env_replay`` described: reset every env to its initial state and step it
        through its actions again (the simulator is deterministic), so the run goes on from the same scenes."""
        N = self.envs.num_envs
        actions = saved["actions"]
        if len(actions) != N:
            raise ValueError(f"the checkpoint holds {len(actions)} envs; this run has {N}")
        obs, _ = self.envs.reset(options={"per_env": [{"init_state": int(k)} for k in saved["init_states"]]})
        obs = {k: np.array(v) for k, v in obs.items()}
        for k in range(max((len(a) for a in actions), default=0)):
            ids = np.array([i for i in range(N) if len(actions[i]) > k])
            o, _, term, trunc, _ = self.envs.step_envs(np.stack([actions[i][k] for i in ids]), ids)
            if (term | trunc).any():
                raise RuntimeError("replaying an episode in progress ended it: the env did not repeat itself, so "
                                   "the run cannot resume exactly")
            for key in obs:
                obs[key][ids] = o[key]
        self.obs = obs
        self._actions = [[np.array(x) for x in a] for a in actions]

    def _new_stats(self) -> dict:
        return {"successes": [], "returns": [], "lost_steps": 0,
                "prm_start": self.shaping.seconds if self.shaping is not None else 0.0}

    def _finish_stats(self, stats: dict) -> dict:
        stats["prm_seconds"] = self.shaping.seconds - stats.pop("prm_start") if self.shaping is not None else math.nan
        return stats

    @torch.no_grad()
    def collect(self) -> dict:
        """PPO's rollout: ``num_steps`` steps of every env; episodes run on across rollouts."""
        with self.whole_weights():
            return self.collect_groups() if self.groups else self._collect()

    def _collect(self) -> dict:
        cfg, buf, pol = self.cfg, self.buffer, self.policy
        pol.model.eval()
        stats = self._new_stats()
        buf.start(cfg.num_steps)
        N = self.envs.num_envs
        if pipelined(cfg.rollout, self.envs):
            self._collect_pipelined(stats)
        else:
            ids = np.arange(N)
            for t in range(cfg.num_steps):
                self._step(t, ids, stats)
        buf.finish(pol.value(self.obs["image"], self.obs["state"], self.envs.instructions))
        return self._finish_stats(stats)

    def _collect_pipelined(self, stats: dict) -> None:
        """The rollout with the envs in two halves that alternate: while one half steps in the env workers, the
        policy decodes for the other (EnvPool's send/recv). Each env gets the actions the synchronous loop would
        give it (the same ones when decoding is deterministic); step t of the first half is received before step
        t of the second."""
        T = self.cfg.num_steps
        halves = pipeline_halves(self.envs)
        self.obs = {k: np.array(v) for k, v in self.obs.items()}   # rows are replaced half by half
        with decode_threads(self.envs, self.policy.device):
            chosen = []
            for h in halves:
                actions, instructions = self._act(0, h)
                self.envs.send(actions, h)
                chosen.append(instructions)
            for t in range(T):
                for k, h in enumerate(halves):
                    self._observe(t, h, chosen[k], self.envs.recv_envs(h), stats)
                    if t + 1 < T:
                        actions, chosen[k] = self._act(t + 1, h)
                        self.envs.send(actions, h)

    @torch.no_grad()
    def collect_groups(self) -> dict:
        """The group algorithms' rollout: every group runs its K episodes (one task, one initial state) to their
        ends; a complete group starts its next episodes at once until the informative groups hold
        ``num_steps x num_envs`` steps (or MAX_SAMPLE_FACTOR times that many steps were taken). Sets
        ``self.episode_adv`` and leaves dropped and lost episodes out of the buffer's valid rows."""
        cfg, buf, pol = self.cfg, self.buffer, self.policy
        pol.model.eval()
        N, K = self.envs.num_envs, cfg.group_size
        stats = self._new_stats()
        buf.start(0)
        self.obs = {k: np.array(v) for k, v in self.obs.items()}   # rows are replaced env by env
        target, cap = cfg.num_steps * N, MAX_SAMPLE_FACTOR * cfg.num_steps * N
        ep_of = np.full(N, -1, dtype=np.int64)
        returns, success, length, lost = [], [], [], []   # per episode; episode e belongs to group e // K
        members: dict[int, list[int]] = {}   # running group (slot group g) -> its episodes
        active = np.zeros(N, dtype=bool)

        def start(g: int) -> None:
            episodes = list(range(len(returns), len(returns) + K))
            for _ in episodes:
                returns.append(0.0), success.append(False), length.append(0), lost.append(False)
            ep_of[g * K:(g + 1) * K] = episodes
            active[g * K:(g + 1) * K] = True
            members[g] = episodes

        for g in range(N // K):
            start(g)
        steps = kept_steps = 0
        kept_groups, dropped = [], []
        t = 0
        while active.any():
            ids = np.flatnonzero(active)
            buf.reserve(t)
            res = self._step(t, ids, stats, episode=ep_of[ids])
            for j, i in enumerate(ids):
                e = int(ep_of[i])
                returns[e] += float(res["reward"][j])
                length[e] += 1
                if res["ended"][j]:
                    success[e], lost[e] = bool(res["success"][j]), bool(res["lost"][j])
                    active[i] = False
            steps += len(ids)
            t += 1
            for g in sorted({int(i) // K for i in ids[res["ended"]]}):
                if active[g * K:(g + 1) * K].any():
                    continue
                eps = members.pop(g)
                ok = [e for e in eps if not lost[e]]
                if len(ok) >= 2 and (not cfg.filter_groups or informative([success[e] for e in ok])):
                    kept_groups.append(eps)
                    kept_steps += sum(length[e] for e in ok)
                else:
                    dropped.append(eps)
                if kept_steps < target and steps < cap:
                    start(g)
        self.episode_adv = np.zeros(len(returns), dtype=np.float32)
        learn = np.asarray([e for eps in kept_groups for e in eps if not lost[e]], dtype=np.int64)
        if len(learn):
            self.episode_adv[learn] = group_advantages(np.asarray(returns)[learn], learn // K, cfg.algo)
        buf.drop_episodes([e for eps in dropped for e in eps] + [e for e in range(len(lost)) if lost[e]])
        stats.update(groups_kept=len(kept_groups), groups_dropped=len(dropped))
        return self._finish_stats(stats)

    # ---- update ----------------------------------------------------------------------------
    def _advantages(self, data: dict, rows: torch.Tensor):
        """(advantages, returns) of the rows the update learns from; returns is None for the group algorithms,
        which have no critic. Raises NonFiniteError on NaN/inf in the rollout's values or rewards."""
        cfg, buf = self.cfg, self.buffer
        if self.groups:
            adv = torch.as_tensor(self.episode_adv)[data["episode"][rows]]
            if not torch.isfinite(adv).all():
                raise NonFiniteError("non-finite group advantages")
            return adv.to(self.policy.device), None
        T = buf.T
        advantages, returns = gae(buf.rewards[:T], buf.values[:T], buf.next_values[:T], buf.terminated[:T],
                                  buf.episode_end[:T], cfg.gamma, cfg.lam)
        d = rows.to(advantages.device)
        adv, ret = advantages.reshape(-1)[d], returns.reshape(-1)[d]
        if cfg.norm_adv_per_task:
            instructions = [data["instructions"][i] for i in rows.tolist()]
            if self.comm.world == 1:
                names = {s: i for i, s in enumerate(sorted(set(instructions)))}
                adv = normalize_advantages_grouped(adv, torch.tensor([names[s] for s in instructions],
                                                                     device=adv.device))
            else:   # each task's statistics over every rank's batch
                groups = torch.tensor([self.task_index[s] for s in instructions], dtype=torch.long, device=adv.device)
                adv = normalize_advantages_grouped(adv, groups, reduce_sum=self.comm.sum,
                                                   num_groups=len(self.task_index))
        return adv, ret

    def update(self, critic_only: bool) -> dict:
        cfg, buf, pol, comm = self.cfg, self.buffer, self.policy, self.comm
        data = buf.flat()
        rows_np = buf.valid_rows()
        stats = {"pg_loss": [], "v_loss": [], "entropy": [], "approx_kl": [], "clipfrac": [], "kl_ref": []}
        out: dict = {"skipped_updates": 0, "explained_variance": math.nan}

        def finish() -> dict:
            out.update({k: (float(np.mean(v)) if v else math.nan) for k, v in stats.items()})
            return out

        # a rank with nothing to learn from still takes part in the others' steps, with a loss of weight 0
        empty = not len(rows_np)
        if not comm.any(not empty):
            return finish()   # nothing to learn from (every group dropped, or every step lost)
        if empty:
            rows_np = np.zeros(1, dtype=np.int64)
        rows = torch.as_tensor(rows_np)
        adv_flat = ret_flat = None
        try:
            adv_flat, ret_flat = self._advantages(data, rows)
        except NonFiniteError:
            pass
        if comm.any(adv_flat is None):
            out["skipped_updates"] = 1   # a diverged critic or reward: no target to learn from this rollout
            return finish()
        if empty:
            adv_flat = torch.zeros_like(adv_flat)
        old_logp = data["logprobs"][rows].sum(-1)
        model = pol.model
        for m in (model, pol.critic):
            if m is not None:
                update_mode(m)   # no dropout: the update scores exactly the policy that sampled the rollout
        check_float32_optimizer(self.optimizer)
        self.masters.refresh()   # weights a supervised stage changed since the last update are the truth
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        rng = np.random.default_rng(self.iteration)
        B = len(rows_np)
        mb = min(math.ceil(cfg.minibatch_size / comm.world), B)   # the ranks' minibatches make one of minibatch_size
        perms = [rng.permutation(B) for _ in range(cfg.update_epochs)]
        skipped = 0
        if not critic_only and self.recompute_logprobs:
            recomputed = None
            try:
                recomputed = self._behaviour_logprobs(data, rows_np, perms[0], mb)
            except NonFiniteError:
                pass
            if comm.any(recomputed is None):
                out["skipped_updates"] = 1
                self._restore_modes()
                return finish()
            out["rollout_logp_gap"] = float((recomputed - old_logp.to(recomputed.device)).abs().mean())
            old_logp = recomputed
        stop = False
        for epoch, perm in enumerate(perms):
            for k, pos in enumerate(self._minibatches(perm, mb)):
                weight = 0.0 if empty or not len(pos) else 1.0
                pos = pos if len(pos) else perm[:1]
                idx = rows_np[pos]
                tokens = data["tokens"][idx].to(pol.device)
                loss = None
                try:
                    loss, parts = self._loss(data, idx, pos, tokens, adv_flat, ret_flat, old_logp, critic_only,
                                             first=epoch == 0 and k == 0)
                    out.update(parts.pop("first", {}))
                except NonFiniteError:
                    pass
                if comm.any(loss is None or not torch.isfinite(loss)):
                    skipped += 1
                    continue
                self.optimizer.zero_grad(set_to_none=True)
                (loss * weight if weight != 1.0 else loss).backward()   # DDP averages the ranks' gradients here
                self.masters.grads_to_masters()
                grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
                if not torch.isfinite(grad_norm):   # the same on every rank: DDP gave them one averaged gradient
                    skipped += 1
                    self.optimizer.zero_grad(set_to_none=True)
                    continue
                self.optimizer.step()
                self.masters.masters_to_model()
                if weight:
                    for key in stats:
                        if key in parts:
                            stats[key].append(float(parts[key]))
                if not critic_only and cfg.target_kl is not None:
                    kl_sum, weights = comm.sum([float(parts["approx_kl"]) * weight, weight])
                    if kl_sum / weights > cfg.target_kl:
                        stop = True
                        break
            if stop:
                break
        self._restore_modes()
        if ret_flat is not None and not empty:
            out["explained_variance"] = explained_variance(buf.values[:buf.T].reshape(-1)[rows.to(ret_flat.device)],
                                                           ret_flat)
        out["skipped_updates"] = skipped
        return finish()

    def _minibatches(self, perm: np.ndarray, mb: int) -> list[np.ndarray]:
        """The positions of each minibatch: runs of ``mb``; with several ranks, as many on every rank (the most
        any rank needs, some then smaller or empty), since every step is a collective."""
        if self.comm.world == 1:
            return [perm[start:start + mb] for start in range(0, len(perm), mb)]
        n = int(self.comm.max([math.ceil(len(perm) / mb)])[0])
        return np.array_split(perm, n)

    def _restore_modes(self) -> None:
        self.policy.model.eval()
        if self.policy.critic is not None:
            self.policy.critic.eval()

    def _loss(self, data, idx, pos, tokens, adv_flat, ret_flat, old_logp, critic_only: bool, first: bool = False):
        """The loss of one minibatch (flat buffer rows ``idx``, positions ``pos`` among the learnt rows) and its
        parts for the log; ``first``: the first minibatch of the first epoch, before any step, whose ratio should
        be 1 (docs/precision.md)."""
        cfg, dev = self.cfg, self.policy.device
        logp, ent_tok, values = self.score(data, idx, tokens, critic_only)
        if critic_only:
            v_loss = 0.5 * ((values - ret_flat[pos]) ** 2).mean()
            return cfg.vf_coef * v_loss, {"v_loss": v_loss.detach()}
        mb_adv = adv_flat[pos].to(dev)
        if cfg.norm_adv and not cfg.norm_adv_per_task and not self.groups:
            mb_adv = normalize_advantages(mb_adv)
        new = logp.sum(-1)
        targets = values.detach() if ret_flat is None else ret_flat[pos].to(dev)
        pg_loss, v_loss, kl, cf = ppo_losses(new, old_logp[pos].to(dev), mb_adv, values, targets,
                                             clip_low=cfg.clip_low, clip_high=cfg.clip_high)
        ent = ent_tok.mean()
        loss = pg_loss - cfg.ent_coef * ent
        parts = {"pg_loss": pg_loss.detach(), "entropy": ent.detach(), "approx_kl": kl, "clipfrac": cf}
        if ret_flat is not None:
            loss = loss + cfg.vf_coef * v_loss
            parts["v_loss"] = v_loss.detach()
        if self.reference is not None:
            with torch.no_grad(), self.reference.active():
                ref_logp, _, _ = self._score(data, idx, tokens, False)
            kl_ref = k3_kl(logp, ref_logp).mean()
            loss = loss + cfg.kl_coef * kl_ref
            parts["kl_ref"] = kl_ref.detach()
        if first:
            ratio = (new.detach() - old_logp[pos].to(dev)).exp()
            parts["first"] = {"first_ratio_error": float((ratio - 1).abs().max()), "first_approx_kl": float(kl),
                              "first_clipfrac": float(cf)}
        return loss, parts

    @torch.no_grad()
    def _behaviour_logprobs(self, data: dict, rows: np.ndarray, perm: np.ndarray, mb: int) -> torch.Tensor:
        """Action log-probs [B] of the learnt rows by the update's own forward (``_score``), in the first
        epoch's minibatches: the same rows padded together and the same shapes as the first epoch, so the
        first minibatch's ratio is taken between two runs of one computation."""
        out = torch.empty(len(perm), device=self.policy.device)
        for pos in self._minibatches(perm, mb):   # as many on every rank: a sharded forward is a collective
            idx = rows[pos if len(pos) else perm[:1]]
            logp, _, _ = self.forward(data, idx, data["tokens"][idx].to(self.policy.device), False)
            if len(pos):
                out[torch.as_tensor(pos, device=out.device)] = logp.sum(-1).float()
        return out

    def _score(self, data: dict, idx: np.ndarray, tokens: torch.Tensor, critic_only: bool):
        """(log-probs, entropies, values) of rollout rows ``idx`` under the current policy; ``critic_only``:
        (None, None, values) with gradients only into the critic."""
        pol, cfg = self.policy, self.cfg
        if self.first_layer is not None:
            return pol.evaluate_frozen(self.buffer.frozen_rows(idx).to(pol.device), tokens, self.first_layer,
                                       temperature=cfg.temperature, critic_only=critic_only)
        text_ids, text_mask = pol.encode_prompts([data["instructions"][i] for i in idx])
        states = data["states"][idx].to(pol.device)
        obs = data["obs"][idx].to(pol.device)
        feats = obs if cfg.freeze_vision else pol.model.encode_images(pol.model.preprocess_images(obs))
        if critic_only:
            return None, None, pol.evaluate_values(feats, states, text_ids, text_mask)
        return pol.evaluate_actions(feats, states, text_ids, text_mask, tokens, temperature=cfg.temperature)

    def train_iteration(self) -> IterationStats:
        t0 = time.perf_counter()
        steps0 = self.global_step
        roll = self.collect()
        t1 = time.perf_counter()
        critic_only = not self.groups and self.iteration < self.cfg.critic_warmup
        upd = self.update(critic_only)
        sync_buffers(self.root, self.comm)
        dt = time.perf_counter() - t0
        self.iteration += 1
        n = len(roll["successes"])
        return IterationStats(
            iteration=self.iteration, env_steps=self.global_step, sps=(self.global_step - steps0) / dt,
            episodes=n, success=float(np.mean(roll["successes"])) if n else math.nan,
            episode_return=float(np.mean(roll["returns"])) if n else math.nan,
            pg_loss=upd["pg_loss"], v_loss=upd["v_loss"], entropy=upd["entropy"], approx_kl=upd["approx_kl"],
            clipfrac=upd["clipfrac"], explained_variance=upd["explained_variance"], critic_only=critic_only,
            skipped_updates=upd["skipped_updates"], prm_seconds=roll["prm_seconds"], kl_ref=upd["kl_ref"],
            groups_kept=roll.get("groups_kept", 0), groups_dropped=roll.get("groups_dropped", 0),
            lost_steps=roll["lost_steps"], rollout_seconds=t1 - t0, update_seconds=t0 + dt - t1,
            **{k: upd[k] for k in ("first_ratio_error", "first_approx_kl", "first_clipfrac", "rollout_logp_gap")
               if k in upd})
