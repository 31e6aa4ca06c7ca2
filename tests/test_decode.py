"""Batched action decoding: greedy tokens equal transformers' ``generate`` (and each prompt decoded alone) with
left padding; the fast Llama steps equal the decoder-forward reference; rollout log-probs and values equal the
training forward's. On a tiny OpenVLA-shaped model with random weights, the built-in tiny VLA, and a plain
Llama with grouped-query attention and biases (paths the two VLAs do not take)."""
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from vlarl_fast.policy import VLAPolicy, make_policy
from vlarl_fast.policy.decode import IMPLS, action_hidden, action_logprobs_of, decode_actions, generate_actions
from vlarl_fast.policy.openvla import build_llama_tokenizer, random_tiny_openvla
from vlarl_fast.policy.protocol import left_pad

# "compiled" has its own test (compiling takes a while)
EAGER_IMPLS = tuple(i for i in IMPLS if i != "compiled")
INSTR = ["pick up the black bowl and place it on the plate", "open the top drawer",
         "turn on the stove and put the moka pot on it"]


@pytest.fixture(scope="module")
def openvla():
    return VLAPolicy(random_tiny_openvla(seed=0), build_llama_tokenizer(INSTR), None)


@pytest.fixture(scope="module")
def tiny():
    return make_policy("tiny", instructions=INSTR, seed=0, hidden_size=32, num_layers=2)


def _obs(policy, B, seed=0):
    rng = np.random.default_rng(seed)
    s = policy.config.image_size
    return rng.integers(0, 256, (B, s, s, 3), dtype=np.uint8), rng.normal(size=(B, 8)).astype(np.float32)


def _causal_lm(policy):
    m = policy.model
    return m.language_model if hasattr(m, "language_model") else m.lm


@pytest.mark.parametrize("kind", ["openvla", "tiny"])
def test_greedy_batched_decoding_equals_generate(kind, request):
    policy = request.getfixturevalue(kind)
    m = policy.model
    B = 5
    imgs, st = _obs(policy, B)
    instr = [INSTR[i % 3] for i in range(B)]
    _, (embeds, mask, pos) = policy._prompt(imgs, st, instr)
    assert len(set(mask.sum(1).tolist())) > 1  # prompts of different lengths: rows are left padded
    want = generate_actions(_causal_lm(policy), embeds, mask, m.vocab_start, m.vocab_end, policy.tokenizer.pad_token_id)
    assert want.shape == (B, 7)
    for impl in EAGER_IMPLS:
        got = decode_actions(m, embeds, mask, pos, greedy=True, impl=impl)
        assert torch.equal(got.tokens, want), impl
    # and each prompt decoded alone (no padding at all) gives its row of the batch
    out = policy.act(imgs, st, instr, greedy=True)
    for i in range(B):
        assert torch.equal(policy.act(imgs[i:i + 1], st[i:i + 1], instr[i:i + 1], greedy=True).tokens[0], out.tokens[i])
    assert torch.equal(out.tokens, want)


@pytest.mark.parametrize("kind", ["openvla", "tiny"])
def test_rollout_logprobs_equal_training_forward(kind, request):
    policy = request.getfixturevalue(kind)
    imgs, st = _obs(policy, 6, seed=1)
    instr = [INSTR[(i * 2) % 3] for i in range(6)]
    out = policy.act(imgs, st, instr, temperature=1.7, generator=torch.Generator().manual_seed(3))
    ids, mask = policy.encode_prompts(instr)
    with torch.no_grad():
        lp, ent, v = policy.evaluate_actions(out.vision_feats, torch.as_tensor(st), ids, mask, out.tokens,
                                             temperature=1.7)
    assert out.logprobs.dtype == torch.float32
    torch.testing.assert_close(lp, out.logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(v, out.values, atol=1e-5, rtol=0)
    assert (ent > 0).all() and out.tokens.min() >= policy.model.vocab_start
    assert out.tokens.max() < policy.model.vocab_end


def test_fast_steps_equal_the_decoder_forward_reference_when_sampling(openvla):
    m = openvla.model
    imgs, _ = _obs(openvla, 7, seed=2)
    _, (embeds, mask, pos) = openvla._prompt(imgs, None, [INSTR[i % 3] for i in range(7)])
    runs = {impl: decode_actions(m, embeds, mask, pos, temperature=1.3, generator=torch.Generator().manual_seed(5),
                                 impl=impl) for impl in EAGER_IMPLS}
    for impl in ("static", "dynamic"):
        assert torch.equal(runs["fast"].tokens, runs[impl].tokens), impl
        torch.testing.assert_close(runs["fast"].logprobs, runs[impl].logprobs, atol=1e-5, rtol=0)
        real = mask.bool()   # padding columns hold states no output reads
        torch.testing.assert_close(runs["fast"].prompt_hidden[real], runs[impl].prompt_hidden[real], atol=1e-5, rtol=0)
    assert (mask == 0).any()   # the batch really is padded


def test_compiled_decoding_equals_the_eager_fast_path(openvla):
    # torch.compile of the same steps (one graph for all 6, the whole buffer attended under a per-step
    # mask); a padded batch greedy, then another batch size sampling (shapes become dynamic)
    m = openvla.model
    for B, greedy in ((5, True), (3, False)):
        imgs, _ = _obs(openvla, B, seed=B)
        _, (embeds, mask, pos) = openvla._prompt(imgs, None, [INSTR[(i + B) % 3] for i in range(B)])
        runs = [decode_actions(m, embeds, mask, pos, greedy=greedy, temperature=1.3, impl=impl,
                               generator=torch.Generator().manual_seed(B)) for impl in ("compiled", "fast")]
        assert torch.equal(runs[0].tokens, runs[1].tokens)
        torch.testing.assert_close(runs[0].logprobs, runs[1].logprobs, atol=1e-5, rtol=0)
        real = mask.bool()
        torch.testing.assert_close(runs[0].prompt_hidden[real], runs[1].prompt_hidden[real], atol=1e-5, rtol=0)
        assert (mask == 0).any()
    # the compiled graphs read the current weights: an in-place update (an optimizer step) reaches them
    w = m.decoder.layers[0].self_attn.q_proj.weight
    before = decode_actions(m, embeds, mask, pos, greedy=True, impl="compiled").prompt_hidden
    try:
        with torch.no_grad():
            w.mul_(3.0)
        after = [decode_actions(m, embeds, mask, pos, greedy=True, impl=impl) for impl in ("compiled", "fast")]
    finally:
        with torch.no_grad():
            w.div_(3.0)
    assert not torch.allclose(after[0].prompt_hidden, before)
    torch.testing.assert_close(after[0].prompt_hidden[real], after[1].prompt_hidden[real], atol=1e-5, rtol=0)


class _PlainLlama:
    """A real Llama LM seen through the decoding API: its last 256 ids are the action ids."""

    def __init__(self, lm: LlamaForCausalLM):
        self.lm, self.decoder = lm, lm.model
        self.lm_head_weight = lm.lm_head.weight
        self.vocab_end = lm.config.vocab_size
        self.vocab_start = self.vocab_end - 256

    def embed_tokens(self, ids):
        return self.decoder.embed_tokens(ids)


def test_fast_steps_with_grouped_query_attention_and_biases():
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=6, num_key_value_heads=2, attention_bias=True,
                                      mlp_bias=True, pad_token_id=0)).eval()
    with torch.no_grad():
        for p in lm.parameters():
            p.normal_(0.0, 0.3 if p.dim() > 1 else 0.5)
    model = _PlainLlama(lm)
    rng = np.random.default_rng(0)
    ids, mask = left_pad([rng.integers(3, 64, n).tolist() for n in (9, 4, 12, 7)])
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    embeds = model.embed_tokens(ids)
    fast = decode_actions(model, embeds, mask, pos, greedy=True)
    ref = decode_actions(model, embeds, mask, pos, greedy=True, impl="static")
    assert torch.equal(fast.tokens, ref.tokens)
    torch.testing.assert_close(fast.logprobs, ref.logprobs, atol=1e-5, rtol=0)
    assert torch.equal(fast.tokens, generate_actions(lm, embeds, mask, model.vocab_start, model.vocab_end, 0))
    h = action_hidden(model, embeds, mask, pos, fast.tokens)
    torch.testing.assert_close(action_logprobs_of(model, h, fast.tokens), fast.logprobs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("fuse", [True, False])
def test_fast_steps_follow_weight_updates_fused_or_not(fuse, monkeypatch):
    # the fused q/k/v and gate/up copies are cached: an in-place update of the originals (an optimizer step)
    # or a replaced weight must reach the next decode; and the unfused path (large models) must agree too
    from vlarl_fast.policy import llama_step
    monkeypatch.setattr(llama_step, "FUSE_MAX_BYTES", llama_step.FUSE_MAX_BYTES if fuse else 0)
    policy = VLAPolicy(random_tiny_openvla(seed=1), build_llama_tokenizer(INSTR), None)
    m = policy.model
    imgs, _ = _obs(policy, 5, seed=4)
    _, (embeds, mask, pos) = policy._prompt(imgs, None, [INSTR[i % 3] for i in range(5)])

    def check():
        fast = decode_actions(m, embeds, mask, pos, greedy=True)
        ref = decode_actions(m, embeds, mask, pos, greedy=True, impl="static")
        assert torch.equal(fast.tokens, ref.tokens)
        torch.testing.assert_close(fast.logprobs, ref.logprobs, atol=1e-5, rtol=0)
        return fast.tokens

    before = check()
    layer = m.decoder.layers[0]
    assert (layer in llama_step._fused) == fuse
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for lin in (layer.self_attn.k_proj, layer.mlp.up_proj):
            lin.weight.add_(torch.randn(lin.weight.shape, generator=g))
    after = check()
    layer.self_attn.v_proj.weight = torch.nn.Parameter(torch.randn(layer.self_attn.v_proj.weight.shape, generator=g))
    assert not torch.equal(before, after) and not torch.equal(after, check())


def test_bad_decoding_arguments_are_explained(openvla):
    imgs, _ = _obs(openvla, 2)
    _, (embeds, mask, pos) = openvla._prompt(imgs, None, INSTR[:2])
    with pytest.raises(ValueError, match="unknown decoding implementation 'vllm'"):
        decode_actions(openvla.model, embeds, mask, pos, impl="vllm")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        decode_actions(openvla.model, embeds, mask, pos, temperature=0.0)
    with pytest.raises(ValueError, match="action tokens must be"):
        action_hidden(openvla.model, embeds, mask, pos, torch.zeros(2, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="2 observations but 1 instructions"):
        openvla.act(imgs, None, INSTR[:1])


def test_decoding_uses_the_installed_transformers_cache_keyword(openvla):
    """transformers 5.25 renamed the decoder's ``past_key_values`` to ``cache`` and removes the old name in
    5.40: the reference decoders pass whichever the installed release takes, without a deprecation."""
    import warnings
    m = openvla.model
    _, (embeds, mask, pos) = openvla._prompt(*_obs(openvla, 2), INSTR[:2])
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        for impl in ("static", "dynamic"):
            assert decode_actions(m, embeds, mask, pos, greedy=True, impl=impl).tokens.shape == (2, 7)
