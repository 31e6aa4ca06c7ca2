"""OpenVLA's configuration, read from and written to its own config.json keys.

OpenVLA's remote code (written for transformers 4.40.1) derives the architecture from names:
``timm_model_ids`` pick the two vision towers, ``text_config`` holds only the Llama keys that
differ from transformers 4.40's ``LlamaConfig`` defaults. Both are resolved here into explicit
numbers, so nothing depends on timm or on the defaults of the installed transformers (5.x moved
some of them). A checkpoint may carry the extra key ``vlarl_vision_towers`` with explicit tower
dimensions; tiny test checkpoints use it, OpenVLA's own code ignores it.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, replace

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

EXTRA_TOWERS_KEY = "vlarl_vision_towers"
MODEL_TYPE = "openvla"


@dataclass(frozen=True)
class ViTSpec:
    """One vision tower, as timm builds it for OpenVLA."""

    kind: str                      # "dinov2" (cls + register tokens, layer scale) | "siglip" (no cls, MAP head)
    hidden_size: int
    num_layers: int
    num_heads: int
    mlp_dim: int
    patch_size: int
    image_size: int
    num_register_tokens: int = 0   # dinov2 only
    hidden_act: str = "gelu"       # timm 0.9's nn.GELU (exact erf) for both towers; OpenVLA overrides none
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def validate(self) -> None:
        if self.kind not in ("dinov2", "siglip"):
            raise ValueError(f"unknown vision tower kind {self.kind!r}; OpenVLA's towers are 'dinov2' and 'siglip'")
        if self.image_size % self.patch_size:
            raise ValueError(f"image size {self.image_size} is not a multiple of the patch size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"tower width {self.hidden_size} is not divisible by {self.num_heads} heads")
        if self.num_layers < 2:
            raise ValueError("OpenVLA reads the second-to-last layer: a tower needs at least 2 layers")

    @classmethod
    def from_dict(cls, d: dict) -> "ViTSpec":
        d = dict(d)
        for k in ("mean", "std"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


def _dinov2_vit_l(image_size: int) -> ViTSpec:
    return ViTSpec("dinov2", 1024, 24, 16, 4096, 14, image_size, num_register_tokens=4)


def _siglip_so400m(image_size: int) -> ViTSpec:
    # timm: mlp_ratio 3.7362 -> int(1152 * 3.7362) = 4304
    return ViTSpec("siglip", 1152, 27, 16, 4304, 14, image_size, mean=SIGLIP_MEAN, std=SIGLIP_STD)


# timm model ids (without the ".pretrained_tag" suffix) that OpenVLA's fused backbones use.
TIMM_TOWERS = {
    "vit_large_patch14_reg4_dinov2": _dinov2_vit_l,
    "vit_so400m_patch14_siglip_224": _siglip_so400m,
    "vit_so400m_patch14_siglip_384": _siglip_so400m,
}

# transformers 4.40.1's LlamaConfig defaults: OpenVLA's text_config omits every key equal to these.
LLAMA_440_DEFAULTS = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=None, hidden_act="silu", max_position_embeddings=2048, initializer_range=0.02,
    rms_norm_eps=1e-6, pad_token_id=None, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    rope_theta=10000.0, rope_scaling=None, attention_bias=False, mlp_bias=False,
)
# Keys of a 4.40 text_config that carry no architecture (kept out of the resolved config).
_TEXT_IGNORED = {
    "model_type", "torch_dtype", "dtype", "_name_or_path", "architectures", "transformers_version", "use_cache",
    "pretraining_tp", "attention_dropout", "output_attentions", "output_hidden_states", "return_dict",
}


def resolve_text_config(text_config: dict | None) -> dict:
    """OpenVLA's (diff-only) text_config -> every Llama architecture key, explicitly."""
    text_config = dict(text_config or {})
    model_type = text_config.get("model_type", "llama")
    if model_type != "llama":
        raise ValueError(f"text_config.model_type is {model_type!r}; this loader builds Llama-2 backbones only")
    out = dict(LLAMA_440_DEFAULTS)
    for k, v in text_config.items():
        if k in _TEXT_IGNORED:
            continue
        if k not in out:
            raise ValueError(f"text_config key {k!r} is not supported by this loader (known: {sorted(out)})")
        out[k] = v
    if out["rope_scaling"] is not None:
        raise ValueError(f"text_config.rope_scaling={out['rope_scaling']!r} is not supported (Llama-2 uses none)")
    if out["num_key_value_heads"] is None:
        out["num_key_value_heads"] = out["num_attention_heads"]
    return out


@dataclass
class OpenVLAConfig:
    """An OpenVLA checkpoint's architecture and metadata (config.json, OpenVLA's key names)."""

    vision_backbone_id: str = "dinosiglip-vit-so-224px"
    llm_backbone_id: str = "llama2-7b-pure"
    arch_specifier: str = "no-align+fused-gelu-mlp"
    use_fused_vision_backbone: bool = True
    image_resize_strategy: str = "resize-naive"
    image_sizes: list[int] = field(default_factory=lambda: [224, 224])
    timm_model_ids: list[str] = field(
        default_factory=lambda: ["vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"])
    timm_override_act_layers: list[str | None] = field(default_factory=lambda: [None, None])
    hf_llm_id: str = "meta-llama/Llama-2-7b-hf"
    llm_max_length: int = 2048
    pad_token_id: int = 32000
    pad_to_multiple_of: int = 64
    n_action_bins: int = 256
    output_projector_states: bool = False
    text: dict = field(default_factory=lambda: resolve_text_config({"vocab_size": 32064, "pad_token_id": 32000}))
    norm_stats: dict | None = None
    towers: list[ViTSpec] = field(default_factory=list)

    def __post_init__(self):
        if not self.towers:
            self.towers = towers_from_timm_ids(self.timm_model_ids, self.image_sizes, self.timm_override_act_layers)
        self.validate()

    # ---- derived sizes ----------------------------------------------------------------------
    @property
    def vision_dim(self) -> int:
        return sum(t.hidden_size for t in self.towers)

    @property
    def llm_dim(self) -> int:
        return self.text["hidden_size"]

    @property
    def num_image_tokens(self) -> int:
        return self.towers[0].num_patches

    @property
    def image_size(self) -> int:
        return self.towers[0].image_size

    @property
    def action_vocab_size(self) -> int:
        """The vocabulary the action bins count back from (OpenVLA: 32064 - 64 = 32000); action ids are
        ``[action_vocab_size - n_action_bins, action_vocab_size)``, not the last ids of the padded LM head."""
        return self.text["vocab_size"] - self.pad_to_multiple_of

    def validate(self) -> None:
        if not self.use_fused_vision_backbone or len(self.towers) != 2:
            raise ValueError(f"vision backbone {self.vision_backbone_id!r}: only OpenVLA's fused two-tower "
                             "backbones (dinosiglip) are supported")
        if "fused-gelu-mlp" not in self.arch_specifier:
            raise ValueError(f"arch_specifier {self.arch_specifier!r}: the fused backbone needs the 3-layer "
                             "'fused-gelu-mlp' projector")
        for t in self.towers:
            t.validate()
        if len({t.num_patches for t in self.towers}) != 1 or len({t.image_size for t in self.towers}) != 1:
            raise ValueError("both towers must see the same image size and give the same number of patches "
                             f"(got {[(t.image_size, t.patch_size) for t in self.towers]})")
        if self.action_vocab_size < self.n_action_bins:
            raise ValueError(f"text_config.vocab_size {self.text['vocab_size']} minus pad_to_multiple_of "
                             f"{self.pad_to_multiple_of} leaves fewer ids than {self.n_action_bins} action bins")

    # ---- config.json ------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict) -> "OpenVLAConfig":
        d = dict(d)
        mt = d.get("model_type")
        if mt != MODEL_TYPE:
            raise ValueError(f"config.json has model_type {mt!r}, not {MODEL_TYPE!r}: not an OpenVLA checkpoint")
        kw = {}
        for f in ("vision_backbone_id", "llm_backbone_id", "arch_specifier", "use_fused_vision_backbone",
                  "image_resize_strategy", "image_sizes", "timm_model_ids", "timm_override_act_layers",
                  "hf_llm_id", "llm_max_length", "pad_token_id", "pad_to_multiple_of", "n_action_bins",
                  "output_projector_states", "norm_stats"):
            if f in d:
                kw[f] = d[f]
        if kw.get("use_fused_vision_backbone") is None:
            # OpenVLA's PrismaticConfig derives it from the backbone id when absent
            kw["use_fused_vision_backbone"] = any(
                kw.get("vision_backbone_id", cls.vision_backbone_id).startswith(p) for p in ("dinoclip", "dinosiglip"))
        kw["text"] = resolve_text_config(d.get("text_config"))
        if EXTRA_TOWERS_KEY in d:
            kw["towers"] = [ViTSpec.from_dict(t) for t in d[EXTRA_TOWERS_KEY]]
        return cls(**kw)

    def to_dict(self) -> dict:
        """config.json in OpenVLA's layout (what its remote code and vLLM's port read)."""
        text = {"model_type": "llama", "torch_dtype": "bfloat16"}
        for k, v in self.text.items():
            default = LLAMA_440_DEFAULTS[k]
            if k == "num_key_value_heads":
                default = self.text["num_attention_heads"]
            if v != default:
                text[k] = v
        d = {
            "architectures": ["OpenVLAForActionPrediction"],
            "model_type": MODEL_TYPE,
            "arch_specifier": self.arch_specifier,
            "hf_llm_id": self.hf_llm_id,
            "image_resize_strategy": self.image_resize_strategy,
            "image_sizes": list(self.image_sizes),
            "llm_backbone_id": self.llm_backbone_id,
            "llm_max_length": self.llm_max_length,
            "n_action_bins": self.n_action_bins,
            "norm_stats": copy.deepcopy(self.norm_stats),
            "output_projector_states": self.output_projector_states,
            "pad_to_multiple_of": self.pad_to_multiple_of,
            "pad_token_id": self.pad_token_id,
            "text_config": text,
            "timm_model_ids": list(self.timm_model_ids),
            "timm_override_act_layers": list(self.timm_override_act_layers),
            "torch_dtype": "bfloat16",
            "use_fused_vision_backbone": self.use_fused_vision_backbone,
            "vision_backbone_id": self.vision_backbone_id,
        }
        try:
            named = towers_from_timm_ids(self.timm_model_ids, self.image_sizes, self.timm_override_act_layers)
        except ValueError:
            named = None
        if named != self.towers:
            d[EXTRA_TOWERS_KEY] = [asdict(t) for t in self.towers]
        return d

    # ---- presets ----------------------------------------------------------------------------
    @classmethod
    def openvla_7b(cls) -> "OpenVLAConfig":
        """openvla/openvla-7b: DINOv2 ViT-L/14 (reg4) + SigLIP So400M/14 at 224 px, Llama-2-7B, vocab 32000 + <PAD>
        padded to 32064."""
        return cls()

    @classmethod
    def tiny(cls, *, image_size: int = 28, patch_size: int = 14, vision_width: int = 32, vision_layers: int = 2,
             hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4, intermediate_size: int = 128,
             text_vocab_size: int = 640) -> "OpenVLAConfig":
        """An OpenVLA-shaped model small enough for CPU tests (random weights; towers given explicitly).

        ``text_vocab_size`` is the tokenizer's base vocabulary (Llama-2: 32000); <PAD> follows it and the LM
        vocabulary is padded to the next multiple of 64, so the action ids end at ``text_vocab_size`` as in
        OpenVLA when it is a multiple of 64."""
        if text_vocab_size % 64:
            raise ValueError("text_vocab_size must be a multiple of 64 so that OpenVLA's 'vocab_size - 64' rule "
                             "recovers it")
        base = cls()
        towers = [replace(t, hidden_size=vision_width, num_layers=vision_layers, num_heads=2,
                          mlp_dim=2 * vision_width, patch_size=patch_size, image_size=image_size)
                  for t in base.towers]
        lm_vocab = text_vocab_size + 64
        text = resolve_text_config(dict(
            vocab_size=lm_vocab, hidden_size=hidden_size, intermediate_size=intermediate_size,
            num_hidden_layers=num_layers, num_attention_heads=num_heads, max_position_embeddings=512,
            pad_token_id=text_vocab_size))
        return cls(image_sizes=[image_size, image_size], pad_token_id=text_vocab_size, llm_max_length=512,
                   text=text, towers=towers)


def towers_from_timm_ids(timm_ids: list[str], image_sizes: list[int],
                         act_overrides: list[str | None] | None = None) -> list[ViTSpec]:
    if len(timm_ids) != len(image_sizes):
        raise ValueError(f"timm_model_ids {timm_ids} and image_sizes {image_sizes} differ in length")
    towers = []
    for i, (tid, size) in enumerate(zip(timm_ids, image_sizes)):
        arch = tid.split(".", 1)[0]
        if arch not in TIMM_TOWERS:
            raise ValueError(f"vision tower {tid!r} is not one this loader can build (known: {sorted(TIMM_TOWERS)}); "
                             f"give its dimensions under the config key {EXTRA_TOWERS_KEY!r}")
        spec = TIMM_TOWERS[arch](size)
        act = (act_overrides or [None] * len(timm_ids))[i]
        if act is not None:  # timm activation names -> transformers' ACT2FN names
            spec = replace(spec, hidden_act={"gelu_tanh": "gelu_pytorch_tanh"}.get(act, act))
        towers.append(spec)
    return towers
