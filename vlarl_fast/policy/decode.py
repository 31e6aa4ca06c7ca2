"""Batched action decoding over any ``protocol.VLAModel``, and the teacher-forced forward it must agree with.

``decode_actions``: one prefill of every left-padded prompt, then exactly 6 single-token steps (the 7th
token needs no forward), each step's logits only over the 256 action rows of the LM head. Against
transformers' ``generate`` on the same model this skips the full-vocabulary head, the logits-processor
and stopping-criteria machinery and the per-step input preparation; ``tests/test_decode.py`` checks that
greedy tokens equal ``generate``'s exactly, with padding.

Implementations (``impl``), each the reference of the one before:

- ``"fast"`` (default) where the decoder is a Llama: the prefill and the 6 steps through ``llama_step``
  (``LlamaDecoderLayer``'s arithmetic without transformers' per-call machinery: mask building, output
  hooks, cache bookkeeping) on key/value buffers sized to prompt + 6; other decoders as "static";
- ``"compiled"``: "fast" through ``torch.compile`` (``llama_step``: every step has the same shapes, so one
  graph serves all 6; the first call for a new batch or prompt length compiles, seconds to a minute);
  worth it where decoding is a large share of the time, the CPU benchmark's ``compiled`` row says how much;
- ``"static"``: a ``StaticCache`` sized to prompt + 6, the prefill and every step through the decoder's
  forward;
- ``"dynamic"``: transformers' growing ``DynamicCache``, the plainest form.

Left padding works with the static cache because the cache index of a column is its column in the
padded batch: the 2D attention mask covers the whole cache (prompt mask, then ones for the 6 action
slots) and causality hides the slots not yet written, so one mask serves every step and shapes never
change (what torch.compile / CUDA graphs need on a GPU).

``action_hidden`` is the training forward: prompt + the first 6 action tokens in one pass; its hidden
states give the log-probs that the PPO ratio compares with the rollout's, so both read the LM head
through the same ``action_logprobs``.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList, StaticCache
from transformers.masking_utils import create_causal_mask

from ..kernels import action_logprobs
from . import llama_step
from .action_tokenizer import ACTION_DIM

IMPLS = ("fast", "compiled", "static", "dynamic")
# transformers renamed create_causal_mask's past_key_values to cache (the old name goes in 5.40)
_MASK_CACHE_ARG = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


def _with_cache(decoder, kv) -> dict:
    """The decoder's keyword for its KV cache: ``cache`` from transformers 5.25 on (``past_key_values``, the
    older name, is removed in 5.40), ``past_key_values`` before."""
    params = inspect.signature(type(decoder).forward).parameters
    return {"cache" if "cache" in params else "past_key_values": kv}


@dataclass
class Decoded:
    tokens: torch.Tensor         # [B, 7] int64 action ids
    logprobs: torch.Tensor       # [B, 7] float32, under the sampling temperature
    prompt_hidden: torch.Tensor  # [B, S, H] hidden states of the prompt (the critic pools them)
    frozen_hidden: torch.Tensor | None = None  # [B, S + 6, H] inputs of layer ``capture_layer``, when asked


def _sample(logits: torch.Tensor, temperature: float, greedy: bool, generator) -> torch.Tensor:
    if greedy:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, -1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def decode_actions(model, embeds: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, *,
                   temperature: float = 1.0, greedy: bool = False, generator: torch.Generator | None = None,
                   impl: str = "fast", capture_layer: int | None = None) -> Decoded:
    """embeds/mask/pos: left-padded prompts from ``model.prompt_embeds``. Returns the 7 action tokens, their
    log-probs from this pass (PPO's 'old' log-probs in float32; see ``--ppo.recompute-logprobs``) and the
    prompt's hidden states.

    ``impl``: "fast" (prefill and steps by ``llama_step`` where the decoder is a Llama, else as "static"),
    "compiled" ("fast" through torch.compile),
    "static" (a StaticCache, prefill and every step through ``decoder(...)``) or "dynamic" (transformers'
    DynamicCache, the plainest form).

    ``capture_layer``: also return the inputs of that decoder layer at the prompt and the 6 fed-back token
    columns (``frozen_hidden``): while the layers below it are frozen, the PPO update runs only the layers
    from there up (``top_layers_hidden``) instead of the whole decoder."""
    if impl not in IMPLS:
        raise ValueError(f"unknown decoding implementation {impl!r}; use one of {IMPLS}")
    if not greedy and not temperature > 0:
        raise ValueError(f"sampling temperature must be > 0 (got {temperature}); use greedy=True for argmax")
    dec, W, vs, ve = model.decoder, model.lm_head_weight, model.vocab_start, model.vocab_end
    B, S = mask.shape
    steps = ACTION_DIM - 1
    full_mask = torch.cat([mask, mask.new_ones(B, steps)], 1)
    capture = capture_layer is not None
    positions = pos[:, -1:] + torch.arange(1, ACTION_DIM, device=pos.device)[None]  # [B, 6]
    stepper = None
    if impl in ("fast", "compiled") and llama_step.supports(dec):
        stepper = llama_step.LlamaStepper(dec, full_mask, pos, positions, S, embeds.dtype, compiled=impl == "compiled")
        out = stepper.prefill(embeds, capture_layer=capture_layer)
        prompt_hidden, frozen = (out[0], [out[1]]) if capture else (out, None)
    else:
        if impl == "dynamic":
            kv = DynamicCache(config=dec.config)
            masks = [full_mask[:, :S + k] for k in range(ACTION_DIM)]
        else:
            kv = StaticCache(config=dec.config, max_cache_len=S + steps)
            # the unwritten slots are in every query's future, so causality hides them: one mask for all steps
            masks = [full_mask] * ACTION_DIM
        out = dec(inputs_embeds=embeds, attention_mask=masks[0], position_ids=pos, **_with_cache(dec, kv),
                  use_cache=True, output_hidden_states=capture)
        prompt_hidden = out.last_hidden_state
        frozen = [out.hidden_states[capture_layer]] if capture else None
    h = prompt_hidden[:, -1]
    W_act = W[vs:ve]
    tokens = torch.empty(B, ACTION_DIM, dtype=torch.long, device=h.device)
    hidden = h.new_empty(B, ACTION_DIM, h.shape[-1])
    for k in range(ACTION_DIM):
        hidden[:, k] = h
        tok = _sample((h @ W_act.T).float(), temperature, greedy, generator) + vs
        tokens[:, k] = tok
        if k == steps:
            break
        x = model.embed_tokens(tok)[:, None].to(embeds.dtype)
        if stepper is not None:
            h = stepper.step(x, k, capture_layer=capture_layer)
            if capture:
                h, layer_input = h
                frozen.append(layer_input)
        else:
            o = dec(inputs_embeds=x, attention_mask=masks[k + 1], position_ids=positions[:, k:k + 1],
                    **_with_cache(dec, kv), use_cache=True, output_hidden_states=capture)
            h = o.last_hidden_state[:, -1]
            if capture:
                frozen.append(o.hidden_states[capture_layer])
    # one call for all 7 columns: the same function the training forward scores them with
    logps = action_logprobs_of(model, hidden, tokens, temperature=temperature)
    return Decoded(tokens, logps, prompt_hidden, torch.cat(frozen, 1) if capture else None)


def teacher_forced_hidden(model, embeds: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor,
                          tokens: torch.Tensor) -> torch.Tensor:
    """Hidden states [B, S + 6, H] of the prompt followed by the first 6 of the given action tokens."""
    if tokens.shape != (embeds.shape[0], ACTION_DIM):
        raise ValueError(f"action tokens must be [B={embeds.shape[0]}, {ACTION_DIM}]; got {tuple(tokens.shape)}")
    B = embeds.shape[0]
    embeds = torch.cat([embeds, model.embed_tokens(tokens[:, :ACTION_DIM - 1]).to(embeds.dtype)], 1)
    mask = torch.cat([mask, mask.new_ones(B, ACTION_DIM - 1)], 1)
    pos = torch.cat([pos, pos[:, -1:] + torch.arange(1, ACTION_DIM, device=pos.device)[None]], 1)
    return model.decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state


def top_layers_hidden(decoder, hidden: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor,
                      first_layer: int) -> torch.Tensor:
    """The decoder from layer ``first_layer`` up, on that layer's inputs [B, L, H] (left-padded mask and
    positions [B, L]) -> final hidden states [B, L, H]: the same arithmetic as ``decoder.forward`` (its mask,
    its rotary tables, its layers, its norm), minus the layers below."""
    return decoder.norm(_run_layers(decoder, hidden, mask, pos, first_layer, decoder.config.num_hidden_layers))


def _run_layers(decoder, hidden, mask, pos, start: int, stop: int) -> torch.Tensor:
    if start >= stop:
        return hidden
    causal = create_causal_mask(config=decoder.config, inputs_embeds=hidden, attention_mask=mask,
                                position_ids=pos, **{_MASK_CACHE_ARG: None})
    rope = decoder.rotary_emb(hidden, position_ids=pos)
    for layer in decoder.layers[start:stop]:
        hidden = layer(hidden, attention_mask=causal, position_embeddings=rope, position_ids=pos)
    return hidden


def top_layers_tail(decoder, hidden: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, first_layer: int,
                    keep: int) -> torch.Tensor:
    """``top_layers_hidden(...)[:, -keep:]``, its readable reference, with the top layer run for those columns
    only. Nothing above the top layer reads its other columns, so of them it needs only the keys and values:
    for the update of the default tiny VLA (one trained layer, the 7 action columns of ~60) that skips most of
    the layer's work, forward and backward (tests/test_frozen_cache.py compares the two)."""
    n = decoder.config.num_hidden_layers
    if not llama_step.supports(decoder) or first_layer >= n:
        return top_layers_hidden(decoder, hidden, mask, pos, first_layer)[:, -keep:]
    hidden = _run_layers(decoder, hidden, mask, pos, first_layer, n - 1)
    return decoder.norm(llama_step.layer_tail(decoder, decoder.layers[n - 1], hidden, mask, pos, keep))


def action_hidden(model, embeds: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor,
                  tokens: torch.Tensor) -> torch.Tensor:
    """Teacher-forced: hidden states [B, 7, H] that predict each of the 7 given action tokens (column k
    predicts token k; column 0 is the last prompt column)."""
    return teacher_forced_hidden(model, embeds, mask, pos, tokens)[:, embeds.shape[1] - 1:]


def action_logprobs_of(model, hidden: torch.Tensor, tokens: torch.Tensor, *, temperature: float = 1.0,
                       return_entropy: bool = False):
    """[B, 7, H] hidden + [B, 7] tokens -> log-probs [B, 7] (and entropies) over the action ids only."""
    B = hidden.shape[0]
    out = action_logprobs(hidden.reshape(B * ACTION_DIM, -1), model.lm_head_weight, tokens.reshape(-1),
                          temperature=temperature, vocab_start=model.vocab_start, vocab_end=model.vocab_end,
                          return_entropy=return_entropy)
    if return_entropy:
        return out[0].view(B, ACTION_DIM), out[1].view(B, ACTION_DIM)
    return out.view(B, ACTION_DIM)


class _ActionIdsOnly(LogitsProcessor):
    """generate's way of constraining to the action ids: every other id gets -inf before the argmax/sampling."""

    def __init__(self, vocab_start: int, vocab_end: int):
        self.vocab_start, self.vocab_end = vocab_start, vocab_end

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        out = torch.full_like(scores, -float("inf"))
        out[:, self.vocab_start:self.vocab_end] = scores[:, self.vocab_start:self.vocab_end]
        return out


@torch.no_grad()
def generate_actions(causal_lm, embeds: torch.Tensor, mask: torch.Tensor, vocab_start: int, vocab_end: int,
                     pad_token_id: int) -> torch.Tensor:
    """The baseline and reference: transformers' ``generate`` (greedy, 7 new tokens, constrained to the action
    ids) on the same left-padded prompt embeddings -> [B, 7] action ids."""
    return causal_lm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=ACTION_DIM,
                              min_new_tokens=ACTION_DIM, do_sample=False, pad_token_id=pad_token_id,
                              logits_processor=LogitsProcessorList([_ActionIdsOnly(vocab_start, vocab_end)]))
