"""OpenVLA checkpoints: the 7B name/shape mapping, tiny checkpoints written in OpenVLA's directory format,
the vision features against a timm-semantics reference computed from the checkpoint's own tensors,
preprocessing, the prompt, and the errors bad inputs get."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from vlarl_fast.policy import CheckpointError
from vlarl_fast.policy.openvla import (ImageProcessor, OpenVLACheckpointError, OpenVLAConfig, OpenVLAModel,
                                       build_llama_tokenizer, is_openvla_checkpoint, load_openvla, prompt_ids,
                                       save_openvla)
from vlarl_fast.policy.openvla.names import from_openvla, to_openvla

FIXTURE = Path(__file__).parent / "fixtures" / "openvla_7b_params.json"
INSTR = ["pick up the black bowl and place it on the plate", "open the top drawer"]


def _stats(lo, hi):
    return {"action": {"q01": [lo] * 7, "q99": [hi] * 7, "mask": [True] * 6 + [False],
                       "mean": [0.0] * 7, "std": [1.0] * 7}}


STATS = {"libero_spatial": _stats(-0.5, 0.5), "libero_object": _stats(-0.25, 0.75)}


def test_7b_mapping_gives_openvla_7b_names_and_shapes():
    fixture = json.loads(FIXTURE.read_text())
    want = {n: tuple(s) for n, s in fixture["parameters"]}
    config = OpenVLAConfig.openvla_7b()
    with torch.device("meta"):
        model = OpenVLAModel(config)
    got = {n: tuple(t.shape) for n, t in to_openvla(model.state_dict(), config).items()}
    assert sorted(set(want) - set(got)) == [] and sorted(set(got) - set(want)) == []
    assert {n: s for n, s in got.items() if want[n] != s} == {}
    assert sum(int(np.prod(s)) for s in got.values()) == fixture["num_parameters"] == 7_541_237_184
    # and back: the checkpoint's tensors fill every module tensor, each with its module shape
    shapes = {n: t.shape for n, t in model.state_dict().items()}
    state = from_openvla({n: torch.empty(s, device="meta") for n, s in want.items()}, config, shapes)
    assert {n: tuple(t.shape) for n, t in state.items()} == {n: tuple(s) for n, s in shapes.items()}
    assert config.action_vocab_size == 32000 and config.num_image_tokens == 256 and config.vision_dim == 2176


def _random_model(seed=0) -> OpenVLAModel:
    """Tiny OpenVLA with every tensor random (layer scales, registers and cls positions included), so that a
    mapping that dropped or mis-ordered any of them changes the outputs."""
    torch.manual_seed(seed)
    model = OpenVLAModel(OpenVLAConfig.tiny())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("mask_token"):
                p.normal_(0.0, 0.2 if p.dim() > 1 else 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    model = _random_model()
    tok = build_llama_tokenizer(INSTR)
    path = tmp_path_factory.mktemp("ckpt") / "openvla-tiny"
    # small shards: the multi-shard index path is the one OpenVLA-7B takes
    save_openvla(model, tok, path, norm_stats=STATS, max_shard_bytes=64 * 1024)
    return model, tok, path


def _inputs(tok, processor, B=2, seed=0, size=28):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (B, size, size, 3), dtype=np.uint8)
    ids = torch.tensor([prompt_ids(tok, INSTR[0])] * B)
    return processor(images), ids


def test_directory_has_openvla_layout(written):
    _, _, path = written
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "openvla" and cfg["architectures"] == ["OpenVLAForActionPrediction"]
    assert cfg["timm_model_ids"] == ["vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"]
    assert cfg["text_config"]["vocab_size"] == 704 and cfg["pad_to_multiple_of"] == 64
    assert cfg["norm_stats"] == STATS == json.loads((path / "dataset_statistics.json").read_text())
    index = json.loads((path / "model.safetensors.index.json").read_text())
    names = set(index["weight_map"])
    assert {"vision_backbone.featurizer.blocks.1.ls2.scale_factor", "vision_backbone.featurizer.reg_token",
            "vision_backbone.fused_featurizer.attn_pool.kv.weight", "projector.fc3.bias",
            "language_model.lm_head.weight"} <= names
    assert not any("mask_token" in n or "q_proj.bias" in n for n in names)
    assert len(set(index["weight_map"].values())) > 1
    assert is_openvla_checkpoint(path)


def test_tiny_checkpoint_loads_with_the_same_logits(written, tmp_path):
    model, tok, path = written
    bundle = load_openvla(path, unnorm_key="libero_object")
    assert bundle.unnorm_key == "libero_object" and bundle.norm_stats.q99 == [0.75] * 7
    assert bundle.norm_stats.mask == [True] * 6 + [False]
    assert bundle.tokenizer.pad_token_id == 640 and len(bundle.tokenizer) == 641
    pixel_values, ids = _inputs(bundle.tokenizer, bundle.image_processor)
    assert ids.tolist() == torch.tensor([prompt_ids(tok, INSTR[0])] * 2).tolist()
    with torch.no_grad():
        want = model(ids, torch.ones_like(ids), pixel_values=pixel_values).logits
        got = bundle.model(ids, torch.ones_like(ids), pixel_values=pixel_values).logits
    assert got.shape == (2, ids.shape[1] + 4, 704)  # 4 image tokens after BOS
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert bundle.model.vocab_start == 640 - 256

    # rewritten from the loaded model (atomic overwrite in place), it reads back the same again
    save_openvla(bundle.model, bundle.tokenizer, tmp_path / "again", norm_stats={"x": bundle.norm_stats})
    again = load_openvla(tmp_path / "again")
    with torch.no_grad():
        torch.testing.assert_close(again.model(ids, pixel_values=pixel_values).logits, want, rtol=0, atol=1e-6)
    assert again.unnorm_key == "x" and again.norm_stats.q01 == [-0.25] * 7


def test_bf16_load_keeps_float32_buffers(written):
    bundle = load_openvla(written[2], unnorm_key="libero_spatial", dtype=torch.bfloat16)
    dtypes = {p.dtype for p in bundle.model.parameters()}
    assert dtypes == {torch.bfloat16}
    assert bundle.model.language_model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert not any(t.is_meta for t in list(bundle.model.parameters()) + list(bundle.model.buffers()))


def _timm_vit(sd, prefix, x, *, layers, heads, patch, prefix_tokens, layer_scale):
    """timm's VisionTransformer.get_intermediate_layers(n={depth - 2}), written from timm's block definition,
    on the checkpoint's own tensors (fused qkv, no_embed_class position embedding, ls*.scale_factor)."""
    def p(n):
        return sd[f"{prefix}.{n}"]

    x = F.conv2d(x, p("patch_embed.proj.weight"), p("patch_embed.proj.bias"), stride=patch).flatten(2).transpose(1, 2)
    x = x + p("pos_embed")
    B, _, D = x.shape
    if prefix_tokens:
        x = torch.cat([p("cls_token").expand(B, -1, -1), p("reg_token").expand(B, -1, -1), x], 1)
    for i in range(layers - 1):
        b = f"blocks.{i}."
        h = F.layer_norm(x, (D,), p(b + "norm1.weight"), p(b + "norm1.bias"), eps=1e-6)
        qkv = F.linear(h, p(b + "attn.qkv.weight"), p(b + "attn.qkv.bias"))
        q, k, v = qkv.reshape(B, -1, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, -1, D)
        a = F.linear(a, p(b + "attn.proj.weight"), p(b + "attn.proj.bias"))
        x = x + (a * p(b + "ls1.scale_factor") if layer_scale else a)
        h = F.layer_norm(x, (D,), p(b + "norm2.weight"), p(b + "norm2.bias"), eps=1e-6)
        h = F.linear(F.gelu(F.linear(h, p(b + "mlp.fc1.weight"), p(b + "mlp.fc1.bias"))),
                     p(b + "mlp.fc2.weight"), p(b + "mlp.fc2.bias"))
        x = x + (h * p(b + "ls2.scale_factor") if layer_scale else h)
    return x[:, prefix_tokens:]


def test_features_and_logits_match_a_reference_on_the_checkpoint_tensors(written):
    model, tok, path = written
    sd = {}
    for f in path.glob("model-*.safetensors"):
        sd.update(load_file(str(f)))
    cfg = model.config
    pixel_values, ids = _inputs(tok, ImageProcessor.from_config(cfg), seed=3)
    dino, sig = cfg.towers
    ref = torch.cat([
        _timm_vit(sd, "vision_backbone.featurizer", pixel_values[:, :3], layers=dino.num_layers,
                  heads=dino.num_heads, patch=dino.patch_size, prefix_tokens=1 + dino.num_register_tokens,
                  layer_scale=True),
        _timm_vit(sd, "vision_backbone.fused_featurizer", pixel_values[:, 3:], layers=sig.num_layers,
                  heads=sig.num_heads, patch=sig.patch_size, prefix_tokens=0, layer_scale=False)], -1)
    with torch.no_grad():
        feats = model.encode_images(pixel_values)
        torch.testing.assert_close(feats, ref, rtol=1e-5, atol=1e-5)
        proj = ref
        for i, k in enumerate(("fc1", "fc2", "fc3")):
            proj = F.linear(proj, sd[f"projector.{k}.weight"], sd[f"projector.{k}.bias"])
            proj = F.gelu(proj) if i < 2 else proj
        emb = F.embedding(ids, sd["language_model.model.embed_tokens.weight"])
        embeds = torch.cat([emb[:, :1], proj, emb[:, 1:]], 1)  # OpenVLA: patches right after BOS
        want = model.language_model(inputs_embeds=embeds).logits
        torch.testing.assert_close(model(ids, pixel_values=pixel_values).logits, want, rtol=1e-5, atol=1e-5)


def test_tower_blocks_get_only_the_hidden_states_positionally():
    """transformers 5.0-5.17's DINOv2 block is ``forward(hidden_states)`` and SigLIP's requires
    ``attention_mask`` by name: here every block gets exactly that signature, keyword extras only."""
    model = _random_model(seed=4)
    pv = torch.randn(2, 6, 28, 28)
    with torch.no_grad():
        want = model.encode_images(pv)
    backbone = model.vision_backbone
    for tower in (backbone.featurizer.encoder.layer, backbone.fused_featurizer.encoder.layers):
        for layer in tower:
            layer.forward = (lambda f: lambda hidden_states, **kwargs: f(hidden_states, **kwargs))(layer.forward)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_images(pv), want, rtol=0, atol=0)


def test_image_processor_normalises_each_tower_and_explains_bad_images():
    proc = ImageProcessor.from_config(OpenVLAConfig.tiny(image_size=28))
    img = np.random.default_rng(1).integers(0, 256, (3, 28, 28, 3), dtype=np.uint8)
    pv = proc(img)
    assert pv.shape == (3, 6, 28, 28) and pv.dtype == torch.float32
    x = torch.from_numpy(img).permute(0, 3, 1, 2).float() / 255
    mean_in = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std_in = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(pv[:, :3], (x - mean_in) / std_in)
    torch.testing.assert_close(pv[:, 3:], (x - 0.5) / 0.5)
    assert proc(np.zeros((2, 40, 64, 3), np.uint8)).shape == (2, 6, 28, 28)  # resize-naive ignores aspect
    boxed = ImageProcessor(28, proc.means, proc.stds, "letterbox")(np.zeros((1, 14, 28, 3), np.uint8))
    fill = (torch.tensor([int(m * 255) for m in (0.485, 0.456, 0.406)]) / 255 - mean_in.view(3)) / std_in.view(3)
    torch.testing.assert_close(boxed[0, :3, 0, 0], fill)  # padded with the tower's mean colour, as OpenVLA
    torch.testing.assert_close(boxed[0, 3:, 20, 5], torch.full((3,), -1.0))  # the black image itself
    with pytest.raises(ValueError, match="uint8"):
        proc(img.astype(np.float32) / 255)
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        proc(np.zeros((2, 3, 28, 28), np.uint8))


def test_prompt_is_openvlas():
    tok = build_llama_tokenizer(INSTR)
    ids = prompt_ids(tok, "Pick up the Black Bowl")
    assert ids[0] == tok.bos_token_id and tok.convert_ids_to_tokens(ids[-1]) == "\u2581"
    assert tok.decode(ids, skip_special_tokens=True).strip() == \
        "In: What action should the robot take to pick up the black bowl?\nOut:"


# ---- bad input ------------------------------------------------------------------------------------
def _copy(written, tmp_path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(written[2], dst)
    return dst


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(OpenVLACheckpointError, match="not a directory"):
        load_openvla(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_openvla(tmp_path / "empty")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(OpenVLACheckpointError, match="model_type 'llama', not 'openvla'"):
        load_openvla(tmp_path / "other")
    assert not is_openvla_checkpoint(tmp_path / "other")


def test_unnorm_key_errors_list_the_datasets(written):
    with pytest.raises(OpenVLACheckpointError, match="no action statistics for unnorm_key 'bridge_orig'.*"
                                                     "available: libero_object, libero_spatial"):
        load_openvla(written[2], unnorm_key="bridge_orig")
    with pytest.raises(OpenVLACheckpointError, match="2 datasets; choose one with unnorm_key, one of: "
                                                     "libero_object, libero_spatial"):
        load_openvla(written[2])


def test_missing_files_are_named(written, tmp_path):
    path = _copy(written, tmp_path)
    shard = sorted(path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(OpenVLACheckpointError, match=f"missing: {shard.name}"):
        load_openvla(path, unnorm_key="libero_spatial")
    (path / "model.safetensors.index.json").unlink()
    with pytest.raises(OpenVLACheckpointError, match="has no weights"):
        load_openvla(path, unnorm_key="libero_spatial")
    path = _copy(written, tmp_path / "b")
    (path / "tokenizer.json").unlink()
    with pytest.raises(OpenVLACheckpointError, match="has no tokenizer"):
        load_openvla(path, unnorm_key="libero_spatial")


def test_shape_mismatch_names_the_parameter(written, tmp_path):
    path = _copy(written, tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["text_config"]["intermediate_size"] = 96
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(OpenVLACheckpointError,
                       match=r"'language_model\.model\.layers\.0\.mlp\.gate_proj\.weight' has shape \[128, 64\] "
                             r"but config\.json implies \[96, 64\]"):
        load_openvla(path, unnorm_key="libero_spatial")
