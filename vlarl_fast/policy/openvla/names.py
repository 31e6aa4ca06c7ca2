"""OpenVLA checkpoint names <-> this module's parameter names, with the tensor surgery between them.

OpenVLA's checkpoint names the vision towers the way timm does (``blocks.N.attn.qkv``, ``ls1``,
``attn_pool``...) with its LayerScale ``gamma`` renamed ``scale_factor``; the projector and the Llama
model use the same names here. The towers here are transformers' classes, so a few tensors change shape
on the way:

- fused ``attn.qkv`` [3D, D] <-> separate q/k/v projections (rows q, k, v in that order, as timm splits);
- DINOv2: timm's ``no_embed_class`` layout has no position for the cls token (its position embedding is
  folded into ``cls_token`` when timm converts DINOv2), transformers' has one: it is zero on load and
  folded back into ``cls_token`` on save; ``mask_token`` (masked pre-training only) has no checkpoint
  tensor and loads as zeros;
- SigLIP: ``pos_embed`` [1, N, D] <-> position-embedding table [N, D]; the MAP head's ``q`` + ``kv`` <->
  ``nn.MultiheadAttention.in_proj``.

``links(config)`` enumerates every correspondence; ``to_openvla`` / ``from_openvla`` apply them to a
state dict (real or meta tensors).
"""
from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from .config import OpenVLAConfig, ViTSpec

Tensors = list[torch.Tensor]


def _same(ts: Tensors) -> Tensors:
    return list(ts)


def _cat(ts: Tensors) -> Tensors:
    return [torch.cat(ts, 0)]


def _split(n: int) -> Callable[[Tensors], Tensors]:
    return lambda ts: list(torch.chunk(ts[0], n, 0))


def _split_q_kv(ts: Tensors) -> Tensors:
    q, k, v = torch.chunk(ts[0], 3, 0)
    return [q, torch.cat([k, v], 0)]


def _unsqueeze0(ts: Tensors) -> Tensors:
    return [ts[0].unsqueeze(0)]


def _squeeze0(ts: Tensors) -> Tensors:
    return [ts[0].squeeze(0)]


def _fold_cls_pos(ts: Tensors) -> Tensors:
    cls, pos = ts  # cls [1, 1, D], pos [1, 1 + N, D]
    return [cls + pos[:, :1], pos[:, 1:]]


def _unfold_cls_pos(ts: Tensors) -> Tensors:
    cls, pos = ts  # cls [1, 1, D], pos [1, N, D]
    return [cls, torch.cat([torch.zeros_like(pos[:, :1]), pos], 1)]


@dataclass(frozen=True)
class Link:
    """``ours`` (module names) <-> ``theirs`` (checkpoint names); ``save``: ours -> theirs, ``load``: back."""

    ours: tuple[str, ...]
    theirs: tuple[str, ...]
    save: Callable[[Tensors], Tensors] = _same
    load: Callable[[Tensors], Tensors] = _same


def _rename(ours: str, theirs: str) -> Link:
    return Link((ours,), (theirs,))


def _wb(ours: str, theirs: str, bias: bool = True) -> list[Link]:
    out = [_rename(f"{ours}.weight", f"{theirs}.weight")]
    if bias:
        out.append(_rename(f"{ours}.bias", f"{theirs}.bias"))
    return out


def _qkv(ours_prefix: str, names: tuple[str, str, str], theirs: str) -> list[Link]:
    return [Link(tuple(f"{ours_prefix}.{n}.{p}" for n in names), (f"{theirs}.{p}",), _cat, _split(3))
            for p in ("weight", "bias")]


@functools.cache
def dinov2_attention_names() -> tuple[tuple[str, str, str], str]:
    """The q/k/v and output projections inside a DINOv2 block's ``attention``, as this transformers release
    names them: ``attention.query`` .. ``output.dense`` up to 5.17 at least, ``q_proj`` .. ``o_proj`` in later
    releases. Read off a one-block model of width 4, so a third layout fails ``check_coverage`` by name; built
    on the meta device, so it neither allocates nor draws from the random generator."""
    from transformers import Dinov2WithRegistersConfig
    from transformers.models.dinov2_with_registers.modeling_dinov2_with_registers import Dinov2WithRegistersLayer
    cfg = Dinov2WithRegistersConfig(hidden_size=4, num_attention_heads=1, num_hidden_layers=1, qkv_bias=True)
    with torch.device("meta"):
        names = {n for n, _ in Dinov2WithRegistersLayer(cfg).attention.named_parameters()}
    if "attention.query.weight" in names:
        return ("attention.query", "attention.key", "attention.value"), "output.dense"
    return ("q_proj", "k_proj", "v_proj"), "o_proj"


def _dinov2_links(o: str, t: str, spec: ViTSpec) -> list[Link]:
    e = f"{o}.embeddings"
    qkv, out = dinov2_attention_names()
    links = [
        Link((f"{e}.cls_token", f"{e}.position_embeddings"), (f"{t}.cls_token", f"{t}.pos_embed"),
             _fold_cls_pos, _unfold_cls_pos),
        _rename(f"{e}.register_tokens", f"{t}.reg_token"),
        *_wb(f"{e}.patch_embeddings.projection", f"{t}.patch_embed.proj"),
        *_wb(f"{o}.layernorm", f"{t}.norm"),
    ]
    for i in range(spec.num_layers):
        a, b = f"{o}.encoder.layer.{i}", f"{t}.blocks.{i}"
        links += [
            *_wb(f"{a}.norm1", f"{b}.norm1"),
            *_qkv(f"{a}.attention", qkv, f"{b}.attn.qkv"),
            *_wb(f"{a}.attention.{out}", f"{b}.attn.proj"),
            _rename(f"{a}.layer_scale1.lambda1", f"{b}.ls1.scale_factor"),
            *_wb(f"{a}.norm2", f"{b}.norm2"),
            *_wb(f"{a}.mlp.fc1", f"{b}.mlp.fc1"),
            *_wb(f"{a}.mlp.fc2", f"{b}.mlp.fc2"),
            _rename(f"{a}.layer_scale2.lambda1", f"{b}.ls2.scale_factor"),
        ]
    return links


def _siglip_links(o: str, t: str, spec: ViTSpec) -> list[Link]:
    e, h, p = f"{o}.embeddings", f"{o}.head", f"{t}.attn_pool"
    links = [
        *_wb(f"{e}.patch_embedding", f"{t}.patch_embed.proj"),
        Link((f"{e}.position_embedding.weight",), (f"{t}.pos_embed",), _unsqueeze0, _squeeze0),
        *_wb(f"{o}.post_layernorm", f"{t}.norm"),
        _rename(f"{h}.probe", f"{p}.latent"),
        Link((f"{h}.attention.in_proj_weight",), (f"{p}.q.weight", f"{p}.kv.weight"), _split_q_kv, _cat),
        Link((f"{h}.attention.in_proj_bias",), (f"{p}.q.bias", f"{p}.kv.bias"), _split_q_kv, _cat),
        *_wb(f"{h}.attention.out_proj", f"{p}.proj"),
        *_wb(f"{h}.layernorm", f"{p}.norm"),
        *_wb(f"{h}.mlp.fc1", f"{p}.mlp.fc1"),
        *_wb(f"{h}.mlp.fc2", f"{p}.mlp.fc2"),
    ]
    for i in range(spec.num_layers):
        a, b = f"{o}.encoder.layers.{i}", f"{t}.blocks.{i}"
        links += [
            *_wb(f"{a}.layer_norm1", f"{b}.norm1"),
            *_qkv(f"{a}.self_attn", ("q_proj", "k_proj", "v_proj"), f"{b}.attn.qkv"),
            *_wb(f"{a}.self_attn.out_proj", f"{b}.attn.proj"),
            *_wb(f"{a}.layer_norm2", f"{b}.norm2"),
            *_wb(f"{a}.mlp.fc1", f"{b}.mlp.fc1"),
            *_wb(f"{a}.mlp.fc2", f"{b}.mlp.fc2"),
        ]
    return links


def _tower_links(o: str, spec: ViTSpec) -> list[Link]:
    return (_dinov2_links if spec.kind == "dinov2" else _siglip_links)(o, o, spec)


def _llama_links(n_layers: int) -> list[Link]:
    m = "language_model.model"
    links = [_rename(f"{m}.embed_tokens.weight", f"{m}.embed_tokens.weight"),
             _rename(f"{m}.norm.weight", f"{m}.norm.weight"),
             _rename("language_model.lm_head.weight", "language_model.lm_head.weight")]
    for i in range(n_layers):
        for sub in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm"):
            name = f"{m}.layers.{i}.{sub}.weight"
            links.append(_rename(name, name))
    return links


def links(config: OpenVLAConfig) -> list[Link]:
    out = _tower_links("vision_backbone.featurizer", config.towers[0])
    out += _tower_links("vision_backbone.fused_featurizer", config.towers[1])
    for k in ("fc1", "fc2", "fc3"):
        out += _wb(f"projector.{k}", f"projector.{k}")
    return out + _llama_links(config.text["num_hidden_layers"])


def module_only(config: OpenVLAConfig) -> tuple[str, ...]:
    """Module tensors with no checkpoint counterpart (zero-filled on load)."""
    return tuple(f"vision_backbone.{n}.embeddings.mask_token" for n, s in
                 zip(("featurizer", "fused_featurizer"), config.towers) if s.kind == "dinov2")


class MappingError(ValueError):
    pass


def check_coverage(module_names, config: OpenVLAConfig) -> None:
    """Every module tensor is linked once: a transformers release that renames a tensor fails here, loudly."""
    linked = Counter(n for lk in links(config) for n in lk.ours) + Counter(module_only(config))
    names = set(module_names)
    dup = {n for n, c in linked.items() if c > 1}
    unlinked = sorted(names - set(linked))
    dangling = sorted(set(linked) - names)
    if dup or unlinked or dangling:
        raise MappingError(f"the OpenVLA name mapping does not match this transformers version's modules: "
                           f"unmapped {unlinked[:5]}, mapped but absent {dangling[:5]}, duplicated {sorted(dup)[:5]}")


def to_openvla(state: Mapping[str, torch.Tensor], config: OpenVLAConfig) -> dict[str, torch.Tensor]:
    """Module state dict -> tensors under OpenVLA's checkpoint names."""
    check_coverage(state.keys(), config)
    out: dict[str, torch.Tensor] = {}
    for lk in links(config):
        for name, t in zip(lk.theirs, lk.save([state[n] for n in lk.ours])):
            out[name] = t.contiguous()
    return out


def expected_shapes(config: OpenVLAConfig, module_shapes: Mapping[str, torch.Size]) -> dict[str, tuple[int, ...]]:
    """Checkpoint name -> the shape the config implies (computed on the meta device, no memory)."""
    meta = {n: torch.empty(s, device="meta") for n, s in module_shapes.items()}
    return {n: tuple(t.shape) for n, t in to_openvla(meta, config).items()}


def from_openvla(tensors: Mapping[str, torch.Tensor], config: OpenVLAConfig,
                 module_shapes: Mapping[str, torch.Size], *, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """OpenVLA-named tensors -> module state dict, after checking every name and shape."""
    want = expected_shapes(config, module_shapes)
    missing = sorted(set(want) - set(tensors))
    unexpected = sorted(set(tensors) - set(want))
    if missing or unexpected:
        hint = ""
        if any(n.startswith("vision_backbone.") for n in missing + unexpected):
            hint = " (a vision tower of another size or depth than config.json's timm_model_ids / image_sizes?)"
        raise MappingError(f"{source} does not match its config: {len(missing)} missing tensors {missing[:5]}, "
                           f"{len(unexpected)} unexpected {unexpected[:5]}{hint}")
    for n, shape in want.items():
        got = tuple(tensors[n].shape)
        if got != shape:
            raise MappingError(f"{source}: parameter {n!r} has shape {list(got)} but config.json implies "
                               f"{list(shape)}: the weights and the config are from different models")
    out: dict[str, torch.Tensor] = {}
    for lk in links(config):
        for name, t in zip(lk.ours, lk.load([tensors[n] for n in lk.theirs])):
            out[name] = t.contiguous()
    for name in module_only(config):
        ref = next(t for t in tensors.values() if t.is_floating_point())
        out[name] = torch.zeros(module_shapes[name], dtype=ref.dtype, device=ref.device)
    return out
