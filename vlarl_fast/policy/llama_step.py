"""The prompt prefill and one-token decode steps of a transformers Llama decoder, written against its own
modules' weights.

Why: a call of ``LlamaModel.forward`` spends most of its time outside the matmuls at action-decoding
sizes (building the 4D mask from the 2D one, output-capture hooks, cache bookkeeping, rotary tables):
measured here on the CPU it is the bulk of a prefill and of a decode step of the tiny models, and on a
GPU it is launch overhead between small kernels. Decoding 7 action tokens needs none of that
machinery: positions are known up front (the rotary tables for all 6 steps are computed once), the mask
is the prompt mask plus ones, and the keys/values go into plain buffers sized prompt + 6.

What remains is the count of small ops, so each layer runs as few as it can: q/k/v as one matmul and
gate/up as another (over concatenated weights, cached until an optimizer step changes the originals;
only while the copies stay small, so never for a 7B model), one rotary pass over the queries and keys
together, ``F.rms_norm``, and on the CPU attention as two batched matmuls around a softmax (the fused
SDPA kernel costs more than that at these sizes; on a GPU SDPA stays). Projections that are not plain
``nn.Linear`` (LoRA adapters through peft) are called as modules, so their adapters apply.

The arithmetic is ``LlamaDecoderLayer``'s (RMSNorm in fp32, RoPE by rotate-half, softmax attention, SiLU
MLP, biases when the config has them), equal to float rounding. The readable reference is the same
prefill and steps through ``decoder(...)`` (``decode.decode_actions(impl="static")``);
``tests/test_decode.py`` compares the two.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaModel

# fused copies of q/k/v and gate/up weights are kept only while all of them together stay below this: they
# save a few small launches per layer, which matters for small models and not for large ones
FUSE_MAX_BYTES = 256 * 2**20
_fused: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def supports(decoder) -> bool:
    """Only Llama decoders (the tiny VLA's and OpenVLA's); other decoders take the reference path."""
    return type(decoder) is LlamaModel


def _rms(x: torch.Tensor, norm) -> torch.Tensor:
    dtype = x.dtype
    return norm.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=norm.variance_epsilon).to(dtype)


def _plain(*mods) -> bool:
    return all(type(m) is nn.Linear for m in mods)


def _concat(mods) -> tuple[torch.Tensor, torch.Tensor | None]:
    w = torch.cat([m.weight for m in mods])
    b = None if mods[0].bias is None else torch.cat([m.bias for m in mods])
    return w, b


def _fusion_bytes(decoder) -> int:
    n = 0
    for layer in decoder.layers:
        a, m = layer.self_attn, layer.mlp
        n += sum(p.weight.numel() * p.weight.element_size() for p in (a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj))
    return n


def _fused_weights(layer) -> tuple | None:
    """(qkv weight, qkv bias, gate-up weight, gate-up bias) of a layer whose projections are plain Linear;
    rebuilt when any source weight was replaced or changed in place (an optimizer step bumps _version)."""
    a, m = layer.self_attn, layer.mlp
    mods = (a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj)
    if not _plain(*mods):
        return None
    key = tuple((p.data_ptr(), p._version) for mod in mods for p in (mod.weight, mod.bias) if p is not None)
    hit = _fused.get(layer)
    if hit is None or hit[0] != key:
        hit = (key, *_concat(mods[:3]), *_concat(mods[3:]))
        _fused[layer] = hit
    return hit[1:]


def _proj(x: torch.Tensor, mod) -> torch.Tensor:
    return F.linear(x, mod.weight, mod.bias) if type(mod) is nn.Linear else mod(x)


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
        cfg = decoder.config
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.manual_attention = mask.device.type == "cpu"
        probe = torch.empty(0, device=positions.device, dtype=dtype)
        self.cos, self.sin = self._rope_tables(*decoder.rotary_emb(probe, positions))  # [B, 1, steps, d]
        self.allowed = mask.bool()[:, None, None, :]                  # [B, 1, 1, L]
        self.bias = self._bias(self.allowed, dtype)
        B, L = mask.shape
        shape = (B, self.kv_heads, L, self.head_dim)
        self.layers = list(decoder.layers[: cfg.num_hidden_layers])
        fuse = not torch.is_grad_enabled() and _fusion_bytes(decoder) <= FUSE_MAX_BYTES
        self.fused = [_fused_weights(layer) if fuse else None for layer in self.layers]
        self.kv = [(torch.empty(shape, dtype=dtype, device=mask.device),
                    torch.empty(shape, dtype=dtype, device=mask.device)) for _ in self.layers]

    def _rope_tables(self, cos: torch.Tensor, sin: torch.Tensor):
        # x * cos + rotate_half(x) * sin == x * cos + roll(x, d/2) * sin', with sin' = sin whose first half
        # is negated: one roll instead of two slices, a negation and a cat per call
        half = self.head_dim // 2
        sin = torch.cat([-sin[..., :half], sin[..., half:]], -1)
        return cos[:, None], sin[:, None]

    def _bias(self, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        if not self.manual_attention:
            return None
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))

    def prefill(self, x: torch.Tensor, capture_layer: int | None = None):
        """Prompt embeddings [B, S, H] -> final hidden states [B, S, H] (and, with ``capture_layer``, that
        layer's input [B, S, H]); fills the key/value buffers' first S columns."""
        B, S, _ = x.shape
        cos, sin = self._rope_tables(*self.decoder.rotary_emb(x, self.pos))  # [B, 1, S, head_dim]
        keys = self.allowed[:, :, 0, :S]                              # [B, 1, S]
        causal = torch.ones(S, S, dtype=torch.bool, device=x.device).tril()
        # a padding row may see only itself: an all-masked row would give NaN, which the softmax's zero
        # weights do not cancel once it reaches a value vector
        allowed = (causal & keys) | torch.eye(S, dtype=torch.bool, device=x.device)
        allowed = allowed[:, None]                                    # [B, 1, S, S]
        bias = self._bias(allowed, x.dtype)
        captured = None
        for i, layer in enumerate(self.layers):
            if i == capture_layer:
                captured = x
            x = self._layer(i, layer, x, cos, sin, allowed, bias, 0, S)
        out = _rms(x, self.decoder.norm)
        return out if capture_layer is None else (out, captured)

    def step(self, x: torch.Tensor, k: int, capture_layer: int | None = None):
        """Embedding of the k-th fed-back token [B, 1, H] -> final hidden state [B, H] (and, with
        ``capture_layer``, that layer's input [B, 1, H])."""
        t = self.prompt_len + k
        cos, sin = self.cos[:, :, k:k + 1], self.sin[:, :, k:k + 1]
        mask = self.allowed[..., :t + 1]
        bias = None if self.bias is None else self.bias[..., :t + 1]
        captured = None
        for i, layer in enumerate(self.layers):
            if i == capture_layer:
                captured = x
            x = self._layer(i, layer, x, cos, sin, mask, bias, t, t + 1)
        out = _rms(x, self.decoder.norm)[:, -1]
        return out if capture_layer is None else (out, captured)

    def _attend(self, q, K, V, mask, bias, scale: float) -> torch.Tensor:
        """Softmax attention of q [B, Hq, n, d] over K/V [B, Hkv, L, d] -> [B, Hq, n, d]."""
        if bias is None:
            return F.scaled_dot_product_attention(q, K, V, attn_mask=mask, scale=scale,
                                                  enable_gqa=self.heads != self.kv_heads)
        B, Hq, n, d = q.shape
        Hkv, L = K.shape[1], K.shape[2]
        g = Hq // Hkv
        # query heads j*g .. j*g+g-1 read key/value head j (transformers' repeat_kv order)
        qf = q.reshape(B * Hkv, g * n, d)
        bias = bias[:, :, None].expand(B, Hkv, g, n, L) if g > 1 and n > 1 else bias.expand(B, Hkv, g * n, L)
        s = torch.baddbmm(bias.reshape(B * Hkv, g * n, L), qf, K.reshape(B * Hkv, L, d).transpose(1, 2), alpha=scale)
        o = torch.bmm(torch.softmax(s, -1), V.reshape(B * Hkv, L, d))
        return o.view(B, Hq, n, d)

    def _layer(self, i: int, layer, x, cos, sin, mask, bias, start: int, end: int) -> torch.Tensor:
        """``LlamaDecoderLayer`` for the columns [start, end): their keys/values go into the layer's buffers,
        their queries attend over the buffers' first `end` columns."""
        B, n, _ = x.shape
        a, m = layer.self_attn, layer.mlp
        K, V = self.kv[i]
        Hq, Hkv, d = self.heads, self.kv_heads, self.head_dim
        fused = self.fused[i]
        h = _rms(x, layer.input_layernorm)
        if fused is not None:
            qkv = F.linear(h, fused[0], fused[1]).view(B, n, Hq + 2 * Hkv, d).transpose(1, 2)
            qk, v = qkv[:, :Hq + Hkv], qkv[:, Hq + Hkv:]
        else:
            qk = torch.cat([_proj(h, a.q_proj).view(B, n, Hq, d), _proj(h, a.k_proj).view(B, n, Hkv, d)], 2)
            qk, v = qk.transpose(1, 2), _proj(h, a.v_proj).view(B, n, Hkv, d).transpose(1, 2)
        qk = torch.addcmul(qk * cos, qk.roll(d // 2, -1), sin)       # RoPE on queries and keys at once
        K[:, :, start:end] = qk[:, Hq:]
        V[:, :, start:end] = v
        o = self._attend(qk[:, :Hq], K[:, :, :end], V[:, :, :end], mask, bias, a.scaling)
        x = x + _proj(o.transpose(1, 2).reshape(B, n, -1), a.o_proj)
        h = _rms(x, layer.post_attention_layernorm)
        if fused is not None:
            gate, up = F.linear(h, fused[2], fused[3]).chunk(2, -1)
        else:
            gate, up = _proj(h, m.gate_proj), _proj(h, m.up_proj)
        return x + _proj(m.act_fn(gate) * up, m.down_proj)
