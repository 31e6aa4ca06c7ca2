"""One-token decode steps of a transformers Llama decoder, written against its own modules' weights.

Why: a call of ``LlamaModel.forward`` for one token spends most of its time outside the matmuls at
action-decoding sizes (building the 4D mask from the 2D one, output-capture hooks, cache bookkeeping,
rotary tables): measured here on the CPU it is the bulk of a decode step of the tiny models, and on a GPU
it is launch overhead between small kernels. Decoding 7 action tokens needs none of that machinery:
positions are known up front (the rotary tables for all 6 steps are computed once), the mask is the
prompt mask plus ones, and the keys/values go straight into the ``StaticCache`` that the prefill (run by
``LlamaModel.forward`` itself) filled.

The arithmetic is ``LlamaDecoderLayer``'s, op for op (RMSNorm in fp32, RoPE by rotate-half, SDPA, SiLU
MLP, biases when the config has them). The readable reference is the same step through
``decoder(...)`` (``decode.decode_actions(impl="static")``); ``tests/test_decode.py`` compares the two.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import LlamaModel, StaticCache


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
    """Decode steps after a prefill of ``prompt_len`` columns into ``cache``.

    ``mask``: [B, prompt_len + steps] (prompt mask, then ones); ``positions``: [B, steps], the position ids
    of the fed-back tokens."""

    def __init__(self, decoder: LlamaModel, cache: StaticCache, mask: torch.Tensor, positions: torch.Tensor,
                 prompt_len: int, dtype: torch.dtype):
        if not supports(decoder):
            raise TypeError(f"LlamaStepper drives transformers' LlamaModel, not {type(decoder).__name__}")
        self.decoder = decoder
        self.prompt_len = prompt_len
        probe = torch.empty(0, device=positions.device, dtype=dtype)
        cos, sin = decoder.rotary_emb(probe, positions)              # [B, steps, head_dim]
        self.cos, self.sin = cos[:, None], sin[:, None]               # [B, 1, steps, head_dim]
        self.allowed = mask.bool()[:, None, None, :]                  # [B, 1, 1, L]
        self.kv = [(layer, cache.layers[i].keys, cache.layers[i].values)
                   for i, layer in enumerate(decoder.layers[: decoder.config.num_hidden_layers])]

    def step(self, x: torch.Tensor, k: int, capture_layer: int | None = None):
        """Embedding of the k-th fed-back token [B, 1, H] -> final hidden state [B, H] (and, with
        ``capture_layer``, that layer's input [B, 1, H])."""
        B = x.shape[0]
        t = self.prompt_len + k
        cos, sin = self.cos[:, :, k:k + 1], self.sin[:, :, k:k + 1]
        mask = self.allowed[..., :t + 1]
        captured = None
        for i, (layer, K, V) in enumerate(self.kv):
            if i == capture_layer:
                captured = x
            a = layer.self_attn
            h = _rms(x, layer.input_layernorm)
            q = _linear(h, a.q_proj).view(B, 1, -1, a.head_dim).transpose(1, 2)
            kk = _linear(h, a.k_proj).view(B, 1, -1, a.head_dim).transpose(1, 2)
            v = _linear(h, a.v_proj).view(B, 1, -1, a.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            kk = kk * cos + _rotate_half(kk) * sin
            K[:, :, t:t + 1] = kk
            V[:, :, t:t + 1] = v
            o = F.scaled_dot_product_attention(q, K[:, :, :t + 1], V[:, :, :t + 1], attn_mask=mask,
                                               scale=a.scaling, enable_gqa=a.num_key_value_groups > 1)
            x = x + _linear(o.transpose(1, 2).reshape(B, 1, -1), a.o_proj)
            h = _rms(x, layer.post_attention_layernorm)
            m = layer.mlp
            x = x + _linear(m.act_fn(_linear(h, m.gate_proj)) * _linear(h, m.up_proj), m.down_proj)
        out = _rms(x, self.decoder.norm)[:, -1]
        return out if capture_layer is None else (out, captured)
