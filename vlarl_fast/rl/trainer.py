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
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..config import PPOConfig
from ..envs import VectorEnv
from ..kernels import gae
from ..policy import VLAPolicy
from ..policy.precision import check_float32_optimizer, float32_training, rollout_matches_update
from ..policy.protocol import update_mode
from .buffer import RolloutBuffer
from .curriculum import Curriculum
from .online_data import SuccessfulEpisodes
from .ppo import explained_variance, normalize_advantages, normalize_advantages_grouped, ppo_losses

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
    model. It needs everything below frozen (top layers trained, no LoRA, vision frozen) and the shared
    critic; None when off."""
    if not cfg.cache_frozen_layers:
        return None
    why = ("--ppo.train-layers > 0" if cfg.train_layers <= 0 else "no LoRA" if cfg.lora_rank > 0 else
           "--ppo.freeze-vision True" if not cfg.freeze_vision else
           "--ppo.critic shared" if cfg.critic != "shared" else None)
    if why is not None:
        raise ValueError(f"--ppo.cache-frozen-layers needs {why} (everything below the trained layers frozen)")
    dec = policy.model.decoder
    if not all(hasattr(dec, a) for a in ("layers", "rotary_emb", "norm")):
        raise ValueError(f"--ppo.cache-frozen-layers drives Llama-style decoders; {type(dec).__name__} is not one")
    return len(dec.layers) - cfg.train_layers


class PPOTrainer:
    def __init__(self, policy: VLAPolicy, envs: VectorEnv, cfg: PPOConfig, seed: int = 0,
                 curriculum: Curriculum | None = None, recorder: SuccessfulEpisodes | None = None,
                 shaping: PRMShaping | None = None):
        self.policy, self.envs, self.cfg = policy, envs, cfg
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
        value_params = policy.value_parameters()
        value_ids = {id(p) for p in value_params} | {id(p) for p in model.value_head.parameters()}
        policy_params = [p for p in model.parameters() if p.requires_grad and id(p) not in value_ids]
        self.masters = float32_training(policy, policy_params + value_params)
        self.optimizer = torch.optim.Adam([
            {"params": self.masters.of(policy_params), "lr": cfg.learning_rate},
            {"params": self.masters.of(value_params), "lr": cfg.critic_learning_rate}], eps=1e-5)
        check_float32_optimizer(self.optimizer)
        self.recompute_logprobs = resolve_recompute_logprobs(cfg.recompute_logprobs, model)
        self.generator = torch.Generator(device=policy.device).manual_seed(seed)
        # GAE reads the buffer's rewards, values and flags where they live: on the policy's device
        self.buffer = RolloutBuffer(cfg.num_steps, envs.num_envs, device=policy.device)
        self.first_layer = frozen_layer_cache(policy, cfg)
        self.obs, _ = envs.reset(seed=seed)
        if shaping is not None:
            shaping.reset(self.obs, envs.instructions)
        self.iteration = 0
        self.global_step = 0

    # ---- rollout ---------------------------------------------------------------------------
    @torch.no_grad()
    def collect(self) -> dict:
        cfg, buf, pol = self.cfg, self.buffer, self.policy
        pol.model.eval()
        successes, returns = [], []
        prm_start = self.shaping.seconds if self.shaping is not None else 0.0
        for t in range(cfg.num_steps):
            instructions = self.envs.instructions
            out = pol.act(self.obs["image"], self.obs["state"], instructions, temperature=cfg.temperature,
                          generator=self.generator, capture_layer=self.first_layer)
            obs_store = out.vision_feats.cpu() if cfg.freeze_vision else torch.as_tensor(self.obs["image"])
            buf.add(t, obs_store, torch.as_tensor(self.obs["state"]), out.tokens.cpu(), out.logprobs.cpu(),
                    out.values, instructions, None if out.frozen is None else out.frozen.to("cpu"))
            if self.recorder is not None:
                self.recorder.record(self.obs["image"], self.obs["state"], out.tokens.cpu().numpy(), instructions)
            next_obs, reward, term, trunc, info = self.envs.step(out.actions)
            if not np.isfinite(reward).all():
                raise FloatingPointError("non-finite reward from the environment")
            if self.shaping is not None:
                reward = self.shaping(reward, next_obs, self.envs.instructions, instructions, term, trunc, info)
            buf.rewards[t] = torch.as_tensor(reward)
            buf.terminated[t] = torch.as_tensor(term, dtype=torch.float32)
            buf.episode_end[t] = torch.as_tensor(term | trunc, dtype=torch.float32)
            # bootstrap value of the final observation at time-limit truncations
            trunc_ids = np.flatnonzero(trunc & ~term)
            if len(trunc_ids):
                fo = info["final_obs"]
                buf.next_values[t, trunc_ids] = pol.value(fo["image"][trunc_ids], fo["state"][trunc_ids],
                                                          [instructions[i] for i in trunc_ids])
            for j in np.flatnonzero(info["done"]):
                successes.append(bool(info["success"][j]))
                if self.recorder is not None:
                    self.recorder.end(int(j), bool(info["success"][j]))
                if self.curriculum is not None:
                    self.curriculum.update(info["final_task_id"][j], int(info["final_init_state"][j]),
                                           bool(info["success"][j]))
                returns.append(float(info["episode_return"][j]))
            self.obs = next_obs
            self.global_step += self.envs.num_envs
        last_values = pol.value(self.obs["image"], self.obs["state"], self.envs.instructions)
        # next_values_t = V(s_{t+1}) for steps that did not end an episode
        following = torch.cat([buf.values[1:], last_values[None]], 0)
        ended = buf.episode_end.bool()
        buf.next_values = torch.where(ended, buf.next_values, following)
        buf.next_values[buf.terminated.bool()] = 0.0
        prm = self.shaping.seconds - prm_start if self.shaping is not None else math.nan
        return {"successes": successes, "returns": returns, "prm_seconds": prm}

    # ---- update ----------------------------------------------------------------------------
    def update(self, critic_only: bool) -> dict:
        cfg, buf, pol = self.cfg, self.buffer, self.policy
        advantages, returns = gae(buf.rewards, buf.values, buf.next_values, buf.terminated, buf.episode_end,
                                  cfg.gamma, cfg.lam)
        data = buf.flat()
        B = buf.T * buf.N
        adv_flat, ret_flat = advantages.reshape(B), returns.reshape(B)
        if cfg.norm_adv_per_task:
            names = {s: i for i, s in enumerate(sorted(set(data["instructions"])))}
            groups = torch.tensor([names[s] for s in data["instructions"]], device=adv_flat.device)
            adv_flat = normalize_advantages_grouped(adv_flat, groups)
        old_logp = data["logprobs"].sum(-1)
        model = pol.model
        for m in (model, pol.critic):
            if m is not None:
                update_mode(m)   # no dropout: the update scores exactly the policy that sampled the rollout
        check_float32_optimizer(self.optimizer)
        self.masters.refresh()   # weights a supervised stage changed since the last update are the truth
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        rng = np.random.default_rng(self.iteration)
        stats = {"pg_loss": [], "v_loss": [], "entropy": [], "approx_kl": [], "clipfrac": []}
        skipped = 0
        mb = min(cfg.minibatch_size, B)
        perms = [rng.permutation(B) for _ in range(cfg.update_epochs)]
        out = {}
        if not critic_only and self.recompute_logprobs:
            recomputed = self._behaviour_logprobs(data, perms[0], mb)
            out["rollout_logp_gap"] = float((recomputed - old_logp.to(recomputed.device)).abs().mean())
            old_logp = recomputed
        stop = False
        for epoch, perm in enumerate(perms):
            for start in range(0, B, mb):
                idx = perm[start:start + mb]
                tokens = data["tokens"][idx].to(pol.device)
                logp, ent_tok, values = self._score(data, idx, tokens, critic_only)
                if critic_only:
                    v_loss = 0.5 * ((values - ret_flat[idx]) ** 2).mean()
                    loss = cfg.vf_coef * v_loss
                    pg_loss = ent = kl = cf = torch.zeros(())
                else:
                    mb_adv = adv_flat[idx].to(pol.device)
                    if cfg.norm_adv and not cfg.norm_adv_per_task:
                        mb_adv = normalize_advantages(mb_adv)
                    pg_loss, v_loss, kl, cf = ppo_losses(logp.sum(-1), old_logp[idx].to(pol.device), mb_adv,
                                                         values, ret_flat[idx].to(pol.device),
                                                         clip_low=cfg.clip_low, clip_high=cfg.clip_high)
                    ent = ent_tok.mean()
                    loss = pg_loss + cfg.vf_coef * v_loss - cfg.ent_coef * ent
                    if epoch == 0 and start == 0:
                        ratio = (logp.detach().sum(-1) - old_logp[idx].to(pol.device)).exp()
                        out.update(first_ratio_error=float((ratio - 1).abs().max()), first_approx_kl=float(kl),
                                   first_clipfrac=float(cf))
                if not torch.isfinite(loss):
                    skipped += 1
                    continue
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.masters.grads_to_masters()
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                if not torch.isfinite(grad_norm):
                    skipped += 1
                    self.optimizer.zero_grad(set_to_none=True)
                    continue
                self.optimizer.step()
                self.masters.masters_to_model()
                for k, v in (("pg_loss", pg_loss), ("v_loss", v_loss), ("entropy", ent), ("approx_kl", kl),
                             ("clipfrac", cf)):
                    stats[k].append(float(v.detach()))
                if not critic_only and cfg.target_kl is not None and float(kl) > cfg.target_kl:
                    stop = True
                    break
            if stop:
                break
        model.eval()
        if pol.critic is not None:
            pol.critic.eval()
        out.update({k: (float(np.mean(v)) if v else math.nan) for k, v in stats.items()})
        out["explained_variance"] = explained_variance(buf.values.reshape(-1), ret_flat)
        out["skipped_updates"] = skipped
        return out

    @torch.no_grad()
    def _behaviour_logprobs(self, data: dict, perm: np.ndarray, mb: int) -> torch.Tensor:
        """Action log-probs [B] of the whole rollout by the update's own forward (``_score``), in the first
        epoch's minibatches: the same rows padded together and the same shapes as the first epoch, so the
        first minibatch's ratio is taken between two runs of one computation."""
        out = torch.empty(len(perm), device=self.policy.device)
        for start in range(0, len(perm), mb):
            idx = perm[start:start + mb]
            logp, _, _ = self._score(data, idx, data["tokens"][idx].to(self.policy.device), False)
            out[torch.as_tensor(idx, device=out.device)] = logp.sum(-1).float()
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
        roll = self.collect()
        critic_only = self.iteration < self.cfg.critic_warmup
        upd = self.update(critic_only)
        dt = time.perf_counter() - t0
        self.iteration += 1
        n = len(roll["successes"])
        return IterationStats(
            iteration=self.iteration, env_steps=self.global_step, sps=self.cfg.num_steps * self.envs.num_envs / dt,
            episodes=n, success=float(np.mean(roll["successes"])) if n else math.nan,
            episode_return=float(np.mean(roll["returns"])) if n else math.nan,
            pg_loss=upd["pg_loss"], v_loss=upd["v_loss"], entropy=upd["entropy"], approx_kl=upd["approx_kl"],
            clipfrac=upd["clipfrac"], explained_variance=upd["explained_variance"], critic_only=critic_only,
            skipped_updates=upd["skipped_updates"], prm_seconds=roll["prm_seconds"],
            **{k: upd[k] for k in ("first_ratio_error", "first_approx_kl", "first_clipfrac", "rollout_logp_gap")
               if k in upd})
