"""The prompt prefill and one-token decode steps of a transformers Llama decoder, written against its own
modules' weights.

Why: a call of ``LlamaModel.forward`` spends most of its time outside the matmuls at action-decoding
sizes (building the 4D mask from the 2D one, output-capture hooks, cache bookkeeping, rotary tables):
measured here on the CPU it is the bulk of a prefill and of a decode step of the tiny models, and on a
GPU it is launch overhead between small kernels. Decoding 7 action tokens needs none of that
machinery: positions are known up front (the rotary tables for all 6 steps are computed once), the mask
is the prompt mask plus ones, and the keys/values go into plain buffers sized prompt + 6.

The arithmetic is ``LlamaDecoderLayer``'s, op for op (RMSNorm in fp32, RoPE by rotate-half, SDPA, SiLU
MLP, biases when the config has them). The readable reference is the same prefill and steps through
``decoder(...)`` (``decode.decode_actions(impl="static")``); ``tests/test_decode.py`` compares the two.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import LlamaModel


def supports(decoder) -> bool:
    """Only Llama decoders (the tiny VLA's and OpenVLA's); other decoders take the reference path."""
    return type(decoder) is LlamaModel


def _rms(x: torch.Tensor, norm) -> torch.Tensor:
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * x32.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _linear(x: torch.Tensor, layer) -> torch.Tensor:
    return F.linear(x, layer.weight, layer.bias)


class LlamaStepper:
    """The prompt prefill and the decode steps of a Llama decoder on its own key/value buffers.

    ``prefill`` runs the prompt [B, S, H] (left padded: ``mask`` [B, S + steps] is the prompt mask, then
    ones; ``pos`` [B, S]) through every layer into buffers sized S + steps; ``step`` then feeds the
    action tokens back one at a time (``positions`` [B, steps])."""

    def __init__(self, decoder: LlamaModel, mask: torch.Tensor, pos: torch.Tensor, positions: torch.Tensor,
                 prompt_len: int, dtype: torch.dtype):
        if not supports(decoder):
            raise TypeError(f"LlamaStepper drives transformers' LlamaModel, not {type(decoder).__name__}")
        self.decoder = decoder
        self.prompt_len = prompt_len
        self.pos = pos
        probe = torch.empty(0, device=positions.device, dtype=dtype)
        cos, sin = decoder.rotary_emb(probe, positions)              # [B, steps, head_dim]
        self.cos, self.sin = cos[:, None], sin[:, None]               # [B, 1, steps, head_dim]
        self.allowed = mask.bool()[:, None, None, :]                  # [B, 1, 1, L]
        B, L = mask.shape
        cfg = decoder.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        shape = (B, cfg.num_key_value_heads, L, head_dim)
        self.layers = list(decoder.layers[: cfg.num_hidden_layers])
        self.kv = [(layer, torch.empty(shape, dtype=dtype, device=mask.device),
                    torch.empty(shape, dtype=dtype, device=mask.device)) for layer in self.layers]

    def prefill(self, x: torch.Tensor, capture_layer: int | None = None):
        """Prompt embeddings [B, S, H] -> final hidden states [B, S, H] (and, with ``capture_layer``, that
        layer's input [B, S, H]); fills the key/value buffers' first S columns."""
        B, S, _ = x.shape
        cos, sin = self.decoder.rotary_emb(x, self.pos)
        cos, sin = cos[:, None], sin[:, None]                         # [B, 1, S, head_dim]
        keys = self.allowed[:, :, 0, :S]                              # [B, 1, S]
        causal = torch.ones(S, S, dtype=torch.bool, device=x.device).tril()
        # a padding row may see only itself: an all-masked row would give NaN, which the softmax's zero
        # weights do not cancel once it reaches a value vector
        allowed = (causal & keys) | torch.eye(S, dtype=torch.bool, device=x.device)
        allowed = allowed[:, None]                                    # [B, 1, S, S]
        captured = None
        for i, (layer, K, V) in enumerate(self.kv):
            if i == capture_layer:
                captured = x
            x = self._layer(layer, x, K, V, cos, sin, allowed, 0, S)
        out = _rms(x, self.decoder.norm)
        return out if capture_layer is None else (out, captured)

    def step(self, x: torch.Tensor, k: int, capture_layer: int | None = None):
        """Embedding of the k-th fed-back token [B, 1, H] -> final hidden state [B, H] (and, with
        ``capture_layer``, that layer's input [B, 1, H])."""
        t = self.prompt_len + k
        cos, sin = self.cos[:, :, k:k + 1], self.sin[:, :, k:k + 1]
        mask = self.allowed[..., :t + 1]
        captured = None
        for i, (layer, K, V) in enumerate(self.kv):
            if i == capture_layer:
                captured = x
            x = self._layer(layer, x, K, V, cos, sin, mask, t, t + 1)
        out = _rms(x, self.decoder.norm)[:, -1]
        return out if capture_layer is None else (out, captured)

    @staticmethod
    def _layer(layer, x, K, V, cos, sin, mask, start: int, end: int) -> torch.Tensor:
        """``LlamaDecoderLayer`` for the columns [start, end): their keys/values go into K/V, their queries
        attend over K/V[:end] under ``mask``."""
        B, n, _ = x.shape
        a = layer.self_attn
        h = _rms(x, layer.input_layernorm)
        q = _linear(h, a.q_proj).view(B, n, -1, a.head_dim).transpose(1, 2)
        kk = _linear(h, a.k_proj).view(B, n, -1, a.head_dim).transpose(1, 2)
        v = _linear(h, a.v_proj).view(B, n, -1, a.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        kk = kk * cos + _rotate_half(kk) * sin
        K[:, :, start:end] = kk
        V[:, :, start:end] = v
        o = F.scaled_dot_product_attention(q, K[:, :, :end], V[:, :, :end], attn_mask=mask, scale=a.scaling,
                                           enable_gqa=a.num_key_value_groups > 1)
        x = x + _linear(o.transpose(1, 2).reshape(B, n, -1), a.o_proj)
        h = _rms(x, layer.post_attention_layernorm)
        m = layer.mlp
        return x + _linear(m.act_fn(_linear(h, m.gate_proj)) * _linear(h, m.up_proj), m.down_proj)
