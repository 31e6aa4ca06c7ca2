"""The policy object the trainer talks to: model + tokenizers + normalisation statistics.

``act`` is the rollout path: one batched prefill of every environment's prompt, a KV cache,
then exactly 7 decode steps constrained to the 256 action ids, sampled with temperature (or
greedy) (``decode.decode_actions``). It returns the tokens, their per-token log-probs from that
same pass (PPO's "old" log-probs; in bfloat16 the update recomputes them with its own forward,
docs/precision.md), and the value.

The model is anything that implements ``protocol.VLAModel`` (the built-in ``TinyVLA``, OpenVLA);
nothing here reads a model's own module names.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .action_convention import IDENTITY, check_convention, from_env, to_env
from .action_tokenizer import ACTION_DIM, ActionTokenizer, NormStats
from .critic import CRITICS, POOLINGS, SeparateCritic, pool_prompt
from .decode import (IMPLS, action_logprobs_of, decode_actions, teacher_forced_hidden, top_layers_hidden,
                     top_layers_tail)
from .protocol import check_model, left_pad


@dataclass
class ActOutput:
    tokens: torch.Tensor        # [B, 7] int64 action token ids
    logprobs: torch.Tensor      # [B, 7] float32 per-token log-probs under the sampling temperature
    values: torch.Tensor        # [B] float32
    actions: np.ndarray         # [B, 7] float32, un-normalised, ready for env.step
    vision_feats: torch.Tensor  # [B, tokens, C] cached for the update when the vision tower is frozen
    frozen: "FrozenInputs | None" = None  # the trainable layers' inputs, when ``act`` was asked for them


@dataclass
class FrozenInputs:
    """Inputs of the first trainable decoder layer over the prompt and the 6 fed-back action tokens, with the
    left-padded mask and positions of those columns: everything the update needs while the layers below,
    the vision tower and the embeddings are frozen."""
    hidden: torch.Tensor  # [B, S + 6, H]
    mask: torch.Tensor    # [B, S + 6]
    pos: torch.Tensor     # [B, S + 6]

    def to(self, device) -> "FrozenInputs":
        return FrozenInputs(self.hidden.to(device), self.mask.to(device), self.pos.to(device))


class VLAPolicy:
    def __init__(self, model, tokenizer, norm_stats: NormStats | None, device="cpu", *, decode_impl: str = "fast",
                 unnorm_key: str | None = None, action_convention: str = IDENTITY):
        check_model(model)
        if decode_impl not in IMPLS:
            raise ValueError(f"unknown decoding implementation {decode_impl!r}; use one of {IMPLS}")
        self.model = model.to(device)
        self.tokenizer = tokenizer
        self.norm_stats = norm_stats
        self.unnorm_key = unnorm_key  # the dataset norm_stats came from (OpenVLA); saved under that name
        # decoded actions -> env actions (action_convention.py): e.g. OpenVLA-LIBERO's gripper; saved with the policy
        self.action_convention = check_convention(action_convention)
        self.device = torch.device(device)
        self.decode_impl = decode_impl  # decode.decode_actions: "fast" | "static" | "dynamic" (references)
        # the bins count back from the end of the action slice (OpenVLA: 32000, below the padded LM head)
        self.action_tokenizer = ActionTokenizer(model.vocab_end)
        self._prompt_cache: dict[str, list[int]] = {}
        self.critic_kind, self.value_pooling = "shared", "last"
        self.critic: SeparateCritic | None = None   # VLA-RL's separate critic backbone, when chosen

    # ---- critic ----------------------------------------------------------------------------
    def set_critic(self, kind: str = "shared", pooling: str = "last") -> None:
        """Choose the critic (``critic.py``): 'shared' reads the policy's hidden states; 'separate' copies the
        language model as it is now. A separate critic already of this pooling (a loaded one) is kept."""
        if kind not in CRITICS:
            raise ValueError(f"unknown critic {kind!r}; use one of {CRITICS}")
        if pooling not in POOLINGS:
            raise ValueError(f"unknown value pooling {pooling!r}; use one of {POOLINGS}")
        if kind == "separate" and not (self.critic is not None and self.critic.pooling == pooling):
            head = self.model.value_head
            self.critic = SeparateCritic(self.model.decoder, self.model.lm_head_weight.shape[1],
                                         head[0].out_features, pooling).to(self.device)
        elif kind == "shared":
            self.critic = None
        self.critic_kind, self.value_pooling = kind, pooling

    def value_parameters(self) -> list[torch.nn.Parameter]:
        """What the value loss trains: the separate critic, or the shared value head."""
        return list((self.critic or self.model.value_head).parameters())

    def _values(self, embeds, mask, pos, prompt_hidden) -> torch.Tensor:
        """Values [B] (float32) of prompts whose policy hidden states [B, S, H] are ``prompt_hidden``
        (unused by a separate critic, which runs its own backbone on the prompt embeddings)."""
        if self.critic is not None:
            return self.critic(embeds, mask, pos)
        return self.model.value_from_hidden(pool_prompt(prompt_hidden, mask, self.value_pooling)).float()

    @property
    def config(self):
        return self.model.config

    # ---- inputs ----------------------------------------------------------------------------
    def encode_prompts(self, instructions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded prompt ids and mask [B, L] in the model's wording (``model.prompt_ids``)."""
        rows = []
        for ins in instructions:
            ids = self._prompt_cache.get(ins)
            if ids is None:
                ids = self._prompt_cache[ins] = list(self.model.prompt_ids(self.tokenizer, ins))
            rows.append(ids)
        if not rows:
            raise ValueError("no instructions: give one per observation")
        ids, mask = left_pad(rows, pad_id=self.tokenizer.pad_token_id or 0)
        return ids.to(self.device), mask.to(self.device)

    def to_tensor_obs(self, images: np.ndarray, states: np.ndarray | None):
        imgs = torch.as_tensor(np.ascontiguousarray(images), device=self.device)
        st = None if states is None else torch.as_tensor(np.asarray(states), dtype=torch.float32, device=self.device)
        if st is not None and not torch.isfinite(st).all():
            raise ValueError("non-finite values in the proprio state batch")
        return imgs, st

    def encode_images(self, images) -> torch.Tensor:
        """uint8 [B, H, W, 3] -> vision features (the model's own preprocessing first)."""
        imgs, _ = self.to_tensor_obs(images, None)
        return self.model.encode_images(self.model.preprocess_images(imgs))

    def _prompt(self, images, states, instructions):
        if len(instructions) != len(images):
            raise ValueError(f"{len(images)} observations but {len(instructions)} instructions: give one each")
        imgs, st = self.to_tensor_obs(images, states)
        text_ids, text_mask = self.encode_prompts(list(instructions))
        feats = self.model.encode_images(self.model.preprocess_images(imgs))
        return feats, self.model.prompt_embeds(feats, st, text_ids, text_mask)

    # ---- rollout ---------------------------------------------------------------------------
    @torch.no_grad()
    def act(self, images, states, instructions, *, temperature: float = 1.0, greedy: bool = False,
            generator: torch.Generator | None = None, capture_layer: int | None = None) -> ActOutput:
        """``capture_layer``: also return that decoder layer's inputs (``ActOutput.frozen``) for
        ``evaluate_frozen``."""
        feats, (embeds, mask, pos) = self._prompt(images, states, instructions)
        out = decode_actions(self.model, embeds, mask, pos, temperature=temperature, greedy=greedy,
                             generator=generator, impl=self.decode_impl, capture_layer=capture_layer)
        values = self._values(embeds, mask, pos, out.prompt_hidden)
        actions = self.actions_from_tokens(out.tokens)
        frozen = None
        if capture_layer is not None:
            steps = out.frozen_hidden.shape[1] - mask.shape[1]
            frozen = FrozenInputs(out.frozen_hidden, torch.cat([mask, mask.new_ones(mask.shape[0], steps)], 1),
                                  torch.cat([pos, pos[:, -1:] + torch.arange(1, steps + 1, device=pos.device)], 1))
        return ActOutput(out.tokens, out.logprobs, values.float(), actions.cpu().numpy().astype(np.float32), feats,
                         frozen)

    @torch.no_grad()
    def value(self, images, states, instructions) -> torch.Tensor:
        """Value of observations (used to bootstrap at time-limit truncations)."""
        _, (embeds, mask, pos) = self._prompt(images, states, instructions)
        return self._prompt_values(embeds, mask, pos)

    def _prompt_values(self, embeds, mask, pos) -> torch.Tensor:
        if self.critic is not None:
            return self.critic(embeds, mask, pos)
        with torch.no_grad():   # the policy's own states only feed the (shared) value head
            h = self.model.decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).last_hidden_state
        return self._values(embeds, mask, pos, h)

    # ---- training forward ------------------------------------------------------------------
    def evaluate_actions(self, vision_feats, states, text_ids, text_mask, tokens, *, temperature=1.0):
        """Teacher-forced log-probs [B, 7], entropies [B, 7] and values [B] of given action tokens."""
        embeds, mask, pos = self.model.prompt_embeds(vision_feats, states, text_ids, text_mask)
        hidden = teacher_forced_hidden(self.model, embeds, mask, pos, tokens)
        S = embeds.shape[1]
        logp, ent = action_logprobs_of(self.model, hidden[:, S - 1:], tokens, temperature=temperature,
                                       return_entropy=True)
        return logp, ent, self._values(embeds, mask, pos, hidden[:, :S])

    def evaluate_frozen(self, frozen: FrozenInputs, tokens, first_layer: int, *, temperature=1.0,
                        critic_only: bool = False):
        """``evaluate_actions`` from the inputs of decoder layer ``first_layer`` (``act(capture_layer=...)``):
        only the layers from there up run. Valid while everything below is frozen; the shared critic only.
        ``critic_only``: the policy's forward without gradients, values with them (the critic warm-up)."""
        if self.critic is not None:
            raise ValueError("the frozen-layer cache serves the shared critic; a separate critic needs the prompt "
                             "embeddings (use evaluate_actions)")
        with torch.set_grad_enabled(torch.is_grad_enabled() and not critic_only):
            if self.value_pooling == "last":   # the values and log-probs read only the last 7 columns
                hidden = top_layers_tail(self.model.decoder, frozen.hidden, frozen.mask, frozen.pos, first_layer,
                                         ACTION_DIM)
            else:
                hidden = top_layers_hidden(self.model.decoder, frozen.hidden, frozen.mask, frozen.pos, first_layer)
        S = hidden.shape[1] - (ACTION_DIM - 1)
        values = self._values(None, frozen.mask[:, -hidden.shape[1]:][:, :S], None, hidden[:, :S])
        if critic_only:
            return None, None, values
        logp, ent = action_logprobs_of(self.model, hidden[:, S - 1:], tokens, temperature=temperature,
                                       return_entropy=True)
        return logp, ent, values

    def evaluate_values(self, vision_feats, states, text_ids, text_mask) -> torch.Tensor:
        """Values [B] with gradients only into the critic (the policy's forward runs without them): the
        critic warm-up's update."""
        with torch.no_grad():
            embeds, mask, pos = self.model.prompt_embeds(vision_feats, states, text_ids, text_mask)
        return self._prompt_values(embeds, mask, pos)

    def actions_from_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Action token ids [B, 7] -> env actions (bin centres, q01/q99 un-normalisation, action convention)."""
        norm = self.action_tokenizer.decode_torch(tokens)
        actions = self.norm_stats.unnormalize(norm) if self.norm_stats is not None else norm
        return to_env(actions, self.action_convention)

    def tokens_from_actions(self, actions: np.ndarray) -> torch.Tensor:
        """Env actions -> action token ids: ``actions_from_tokens`` undone (convention, normalisation, bins)."""
        actions = from_env(actions, self.action_convention)
        norm = self.norm_stats.normalize(actions) if self.norm_stats is not None else actions
        return torch.as_tensor(self.action_tokenizer.encode(norm), device=self.device)
