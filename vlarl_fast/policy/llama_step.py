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

``compiled=True`` runs the prefill and the steps through ``torch.compile`` (inductor: on the CPU it fuses
each layer's elementwise work into a few C++ loops; the first call for a new shape compiles, which
takes seconds to a minute). Every step then has the same shapes: the fed-back token's keys and values
go into the buffers by an index tensor and its query attends over the whole buffer, the columns not
yet written hidden by the step's mask, so the 6 steps share one compiled graph.

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
from transformers.models.llama.modeling_llama import rotate_half

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


def forget_fused() -> None:
    """Drop every cached fused projection (weights gathered anew by FSDP2 may reuse an address and version)."""
    _fused.clear()


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
                 prompt_len: int, dtype: torch.dtype, compiled: bool = False):
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
        self.cos, self.sin = self._rope_tables(*decoder.rotary_emb(probe, position_ids=positions))  # [B, 1, steps, d]
        self.prompt_cos, self.prompt_sin = self._rope_tables(*decoder.rotary_emb(probe, position_ids=pos))  # [B, 1, S, d]
        self.allowed = mask.bool()[:, None, None, :]                  # [B, 1, 1, L]
        self.bias = self._bias(self.allowed, dtype)
        S = prompt_len
        keys = self.allowed[:, :, 0, :S]                              # [B, 1, S]
        causal = torch.ones(S, S, dtype=torch.bool, device=mask.device).tril()
        # a padding row may see only itself: an all-masked row would give NaN, which the softmax's zero
        # weights do not cancel once it reaches a value vector
        self.prompt_allowed = ((causal & keys) | torch.eye(S, dtype=torch.bool, device=mask.device))[:, None]
        self.prompt_bias = self._bias(self.prompt_allowed, dtype)    # [B, 1, S, S]
        B, L = mask.shape
        shape = (B, self.kv_heads, L, self.head_dim)
        self.layers = list(decoder.layers[: cfg.num_hidden_layers])
        fuse = not torch.is_grad_enabled() and _fusion_bytes(decoder) <= FUSE_MAX_BYTES
        self.fused = [_fused_weights(layer) if fuse else None for layer in self.layers]
        self.compiled = compiled
        # compiled steps attend over the whole buffer: the unwritten columns must hold numbers (their
        # softmax weight is 0, and 0 x NaN would not vanish)
        new = torch.zeros if compiled else torch.empty
        self.kv = [(new(shape, dtype=dtype, device=mask.device), new(shape, dtype=dtype, device=mask.device))
                   for _ in self.layers]
        if compiled:
            steps = L - S
            cols = torch.arange(L, device=mask.device)
            seen = self.allowed & (cols <= S + torch.arange(steps, device=mask.device)[:, None, None, None, None])
            self.step_allowed = seen                                  # [steps, B, 1, 1, L]
            self.step_bias = self._bias(seen, dtype)
            self.step_index = [torch.tensor([k], device=mask.device) for k in range(steps)]

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
        if self.compiled:
            return _compiled("_prefill")(self, x, capture_layer)
        return self._prefill(x, capture_layer)

    def _prefill(self, x: torch.Tensor, capture_layer: int | None):
        S = x.shape[1]
        captured = None
        for i, layer in enumerate(self.layers):
            if i == capture_layer:
                captured = x
            x = self._layer(i, layer, x, self.prompt_cos, self.prompt_sin, self.prompt_allowed, self.prompt_bias,
                            0, S)
        out = _rms(x, self.decoder.norm)
        return out if capture_layer is None else (out, captured)

    def step(self, x: torch.Tensor, k: int, capture_layer: int | None = None):
        """Embedding of the k-th fed-back token [B, 1, H] -> final hidden state [B, H] (and, with
        ``capture_layer``, that layer's input [B, 1, H])."""
        if self.compiled:
            return _compiled("_step_indexed")(self, x, self.step_index[k], capture_layer)
        t = self.prompt_len + k
        cos, sin = self.cos[:, :, k:k + 1], self.sin[:, :, k:k + 1]
        mask = self.allowed[..., :t + 1]
        bias = None if self.bias is None else self.bias[..., :t + 1]
        return self._step_layers(x, cos, sin, mask, bias, t, t + 1, capture_layer)

    def _step_indexed(self, x: torch.Tensor, k: torch.Tensor, capture_layer: int | None):
        # the same step with shapes that do not depend on k: one graph for all steps
        cos, sin = self.cos.index_select(2, k), self.sin.index_select(2, k)
        mask = self.step_allowed.index_select(0, k)[0]
        bias = None if self.step_bias is None else self.step_bias.index_select(0, k)[0]
        return self._step_layers(x, cos, sin, mask, bias, k + self.prompt_len, None, capture_layer)

    def _step_layers(self, x, cos, sin, mask, bias, start, end, capture_layer):
        captured = None
        for i, layer in enumerate(self.layers):
            if i == capture_layer:
                captured = x
            x = self._layer(i, layer, x, cos, sin, mask, bias, start, end)
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

    def _layer(self, i: int, layer, x, cos, sin, mask, bias, start, end: int | None) -> torch.Tensor:
        """``LlamaDecoderLayer`` for the columns [start, end): their keys/values go into the layer's buffers,
        their queries attend over the buffers' first `end` columns. With ``end`` None, ``start`` is a
        tensor of columns written by index, and the queries attend over the whole buffers."""
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
        if end is None:
            K.index_copy_(2, start, qk[:, Hq:])
            V.index_copy_(2, start, v)
        else:
            K[:, :, start:end] = qk[:, Hq:]
            V[:, :, start:end] = v
            K, V = K[:, :, :end], V[:, :, :end]
        o = self._attend(qk[:, :Hq], K, V, mask, bias, a.scaling)
        x = x + _proj(o.transpose(1, 2).reshape(B, n, -1), a.o_proj)
        h = _rms(x, layer.post_attention_layernorm)
        if fused is not None:
            gate, up = F.linear(h, fused[2], fused[3]).chunk(2, -1)
        else:
            gate, up = _proj(h, m.gate_proj), _proj(h, m.up_proj)
        return x + _proj(m.act_fn(gate) * up, m.down_proj)


def layer_tail(decoder: LlamaModel, layer, x: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor,
               keep: int) -> torch.Tensor:
    """``layer`` (a ``LlamaDecoderLayer`` of ``decoder``) on x [B, L, H] (left-padded mask and positions
    [B, L]) -> its output for the last ``keep`` columns [B, keep, H]: the keys and values of every column,
    the queries, attention output and MLP of those columns only. Written with the layer's own modules, so it
    trains them (gradients flow as through ``layer(...)``)."""
    cfg = decoder.config
    Hq, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // Hq
    B, L, _ = x.shape
    a = layer.self_attn
    cos, sin = decoder.rotary_emb(x, position_ids=pos)
    cos, sin = cos[:, None], sin[:, None]                             # [B, 1, L, d]

    def rope(t, c, s):
        return t * c + rotate_half(t) * s

    h = layer.input_layernorm(x)
    q = a.q_proj(h[:, -keep:]).view(B, keep, Hq, d).transpose(1, 2)
    k = a.k_proj(h).view(B, L, Hkv, d).transpose(1, 2)
    v = a.v_proj(h).view(B, L, Hkv, d).transpose(1, 2)
    q, k = rope(q, cos[:, :, -keep:], sin[:, :, -keep:]), rope(k, cos, sin)
    # query column L - keep + i sees the unpadded columns up to itself; a padding column only itself (a row
    # with no key would give NaN, which would reach the gradients)
    causal = torch.ones(keep, L, dtype=torch.bool, device=x.device).tril(L - keep)
    allowed = ((causal & mask.bool()[:, None, :]) | causal.triu(L - keep))[:, None]   # [B, 1, keep, L]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=a.scaling, enable_gqa=Hq != Hkv)
    out = x[:, -keep:] + a.o_proj(o.transpose(1, 2).reshape(B, keep, Hq * d))
    return out + layer.mlp(layer.post_attention_layernorm(out))


_COMPILED: dict[str, object] = {}


def _compiled(name: str):
    """torch.compile of a LlamaStepper method, made once per process (dynamo keeps one graph per shape
    and guard set: a new batch or prompt length compiles again, then shapes are treated as dynamic)."""
    fn = _COMPILED.get(name)
    if fn is None:
        fn = _COMPILED[name] = torch.compile(getattr(LlamaStepper, name))
    return fn
