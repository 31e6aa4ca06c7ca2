"""The policy object the trainer talks to: model + tokenizers + normalisation statistics.

``act`` is the rollout path: one batched prefill of every environment's prompt, a KV cache,
then exactly 7 decode steps constrained to the 256 action ids, sampled with temperature (or
greedy). It returns the tokens, their per-token log-probs from that same pass (these are the
PPO "old" log-probs, never recomputed), and the value.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers import DynamicCache

from ..kernels import action_logprobs
from .action_tokenizer import ACTION_DIM, ActionTokenizer, NormStats
from .model import TinyVLA, VLAConfig
from .text_tokenizer import prompt_text


@dataclass
class ActOutput:
    tokens: torch.Tensor        # [B, 7] int64 action token ids
    logprobs: torch.Tensor      # [B, 7] float32 per-token log-probs under the sampling temperature
    values: torch.Tensor        # [B] float32
    actions: np.ndarray         # [B, 7] float32, un-normalised, ready for env.step
    vision_feats: torch.Tensor  # [B, tokens, C] cached for the update when the vision tower is frozen


class VLAPolicy:
    def __init__(self, model: TinyVLA, tokenizer, norm_stats: NormStats | None, device="cpu"):
        self.model = model.to(device)
        self.tokenizer = tokenizer
        self.norm_stats = norm_stats
        self.device = torch.device(device)
        self.action_tokenizer = ActionTokenizer(model.config.vocab_size)
        self._prompt_cache: dict[str, list[int]] = {}

    @property
    def config(self) -> VLAConfig:
        return self.model.config

    # ---- inputs ----------------------------------------------------------------------------
    def encode_prompts(self, instructions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded prompt ids and mask [B, L] (text only; <s> and image go in front)."""
        rows = []
        for ins in instructions:
            ids = self._prompt_cache.get(ins)
            if ids is None:
                ids = self.tokenizer(prompt_text(ins, self.config.prompt_style), add_special_tokens=False)["input_ids"]
                self._prompt_cache[ins] = ids
            rows.append(ids)
        L = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), L, dtype=torch.long)
        mask = torch.zeros(len(rows), L, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, L - len(r):] = torch.tensor(r)
            mask[i, L - len(r):] = 1
        return ids.to(self.device), mask.to(self.device)

    def to_tensor_obs(self, images: np.ndarray, states: np.ndarray | None):
        imgs = torch.as_tensor(np.ascontiguousarray(images), device=self.device)
        st = None if states is None else torch.as_tensor(np.asarray(states), dtype=torch.float32, device=self.device)
        if st is not None and not torch.isfinite(st).all():
            raise ValueError("non-finite values in the proprio state batch")
        return imgs, st

    # ---- rollout ---------------------------------------------------------------------------
    @torch.no_grad()
    def act(self, images, states, instructions, *, temperature: float = 1.0, greedy: bool = False,
            generator: torch.Generator | None = None) -> ActOutput:
        m = self.model
        imgs, st = self.to_tensor_obs(images, states)
        text_ids, text_mask = self.encode_prompts(list(instructions))
        feats = m.encode_images(imgs)
        embeds, mask, pos = m.prompt_embeds(feats, st, text_ids, text_mask)
        cache = DynamicCache(config=m.lm.config)
        out = m.lm.model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos,
                         past_key_values=cache, use_cache=True)
        h = out.last_hidden_state[:, -1]
        values = m.value_from_hidden(h)
        W = m.lm_head_weight
        vs = m.vocab_start
        B = h.shape[0]
        tokens = torch.empty(B, ACTION_DIM, dtype=torch.long, device=h.device)
        logps = torch.empty(B, ACTION_DIM, dtype=torch.float32, device=h.device)
        p = pos[:, -1:]
        for k in range(ACTION_DIM):
            logits = (h @ W[vs:].T).float()
            if greedy:
                local = logits.argmax(-1)
            else:
                probs = torch.softmax(logits / temperature, -1)
                local = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            tok = local + vs
            tokens[:, k] = tok
            logps[:, k] = action_logprobs(h, W, tok, temperature=temperature, vocab_start=vs)
            if k == ACTION_DIM - 1:
                break
            mask = torch.cat([mask, mask.new_ones(B, 1)], 1)
            p = p + 1
            out = m.lm.model(inputs_embeds=m.lm.model.embed_tokens(tok)[:, None], attention_mask=mask,
                             position_ids=p, past_key_values=out.past_key_values, use_cache=True)
            h = out.last_hidden_state[:, -1]
        norm = self.action_tokenizer.decode_torch(tokens)
        actions = self.norm_stats.unnormalize(norm) if self.norm_stats is not None else norm
        return ActOutput(tokens, logps, values.float(), actions.cpu().numpy().astype(np.float32), feats)

    @torch.no_grad()
    def value(self, images, states, instructions) -> torch.Tensor:
        """Value of observations (used to bootstrap at time-limit truncations)."""
        m = self.model
        imgs, st = self.to_tensor_obs(images, states)
        text_ids, text_mask = self.encode_prompts(list(instructions))
        embeds, mask, pos = m.prompt_embeds(m.encode_images(imgs), st, text_ids, text_mask)
        h = m.lm.model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).last_hidden_state[:, -1]
        return m.value_from_hidden(h).float()

    # ---- training forward ------------------------------------------------------------------
    def evaluate_actions(self, vision_feats, states, text_ids, text_mask, tokens, *, temperature=1.0):
        """Teacher-forced log-probs [B, 7], entropies [B, 7] and values [B] of given action tokens."""
        h, values = self.model.forward_actions(vision_feats, states, text_ids, text_mask, tokens)
        B = h.shape[0]
        flat = h.reshape(B * ACTION_DIM, -1)
        logp, ent = action_logprobs(flat, self.model.lm_head_weight, tokens.reshape(-1), temperature=temperature,
                                    vocab_start=self.model.vocab_start, return_entropy=True)
        return logp.view(B, ACTION_DIM), ent.view(B, ACTION_DIM), values

    def tokens_from_actions(self, actions: np.ndarray) -> torch.Tensor:
        """Env-unit actions -> action token ids (normalise with q01/q99, then bin)."""
        norm = self.norm_stats.normalize(actions) if self.norm_stats is not None else actions
        return torch.as_tensor(self.action_tokenizer.encode(norm), device=self.device)
