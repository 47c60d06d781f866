"""HF Qwen3-Next / Qwen3.5 / Qwen3.5-MoE (gated-delta-net hybrids) -> megatron GPTModel (one
process, fp32): logits and the output of every layer, linear or full, equal transformers'; the
checkpoint's MTP and vision tensors are never read; a TP rank's gated QKV is its slice, read
alone; the CPU gated-delta-rule and causal conv equal transformers' own torch path; decoding
without a KV cache (regeneration's batches, speculative verification) equals HF greedy
`generate`; unsupported fields fail up front naming the field. Layouts (TP, SP, PP, EP,
training): tests/distributed/test_qwen_hybrid_layouts.py."""

import pytest
import torch
from megatron.core.ssm.gated_delta_net import GatedDeltaNet
from megatron.core.transformer.moe.moe_layer import MoELayer
from transformers.models.qwen3_next import modeling_qwen3_next as hf_next

from tests.dflash_testing import (build_draft, edit_config, record_checkpoint_reads,
                                  save_fused_experts)
from tests.qwen_hybrid_testing import (HIDDEN, LINEAR_THEN_FULL, hf_taps, hybrid_config,
                                       hybrid_model, hybrid_target_dir, save_hybrid)
from megatron_dflash import cpu
from megatron_dflash.config import DFlashConfig, draft_transformer_config
from megatron_dflash.evaluate import SpeculativeDecoder
from megatron_dflash.generation import BatchGenerator
from megatron_dflash.generation.engine import NO_CACHE_NOTICE
from megatron_dflash.synthetic import VOCAB, randomize_
from megatron_dflash.targets import hf_import, hf_tensor
from megatron_dflash.targets.capture import FeatureCapture, target_forward
from megatron_dflash.targets.hf_checkpoint import HFCheckpoint
from megatron_dflash.targets.hf_import import (build_target, load_hf_config, load_hf_weights,
                                              target_family, target_transformer_config)
from megatron_dflash.targets.qwen_hybrid import read_gated_qkv

TOL = 1e-5
ALTERNATING = ["linear_attention", "full_attention"] * 2
VARIANTS = {  # two configs per family: layer patterns, head counts, tying, routers, RoPE
    "next_moe": ("qwen3_next", dict(mtp_num_hidden_layers=1)),
    "next_r1_tied_sparse_step": ("qwen3_next", dict(
        layer_types=["full_attention"] + LINEAR_THEN_FULL[:3], linear_num_value_heads=2,
        num_key_value_heads=1, mlp_only_layers=[], decoder_sparse_step=2, norm_topk_prob=False,
        tie_word_embeddings=True)),
    "qwen3_5": ("qwen3_5", {}),
    "qwen3_5_tied_half_rotary": ("qwen3_5", dict(
        layer_types=ALTERNATING, tie_word_embeddings=True, linear_num_value_heads=6,
        rope_parameters=dict(rope_type="default", rope_theta=1e7, partial_rotary_factor=0.5,
                             mrope_section=[1, 1, 2], mrope_interleaved=True))),
    "qwen3_5_moe": ("qwen3_5_moe", dict(mtp_num_hidden_layers=1)),
    "qwen3_5_moe_vl_tied_fused": ("qwen3_5_moe_vl", dict(layer_types=ALTERNATING,
                                                        tie_word_embeddings=True)),
}


def tokens(seed=1, batch=2, length=20):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=g)


def import_target(path):
    hf = load_hf_config(path)
    model = build_target(hf, target_transformer_config(hf))
    load_hf_weights(model, path)
    return model


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_import_matches_hf(variant, utils, tmp_path, monkeypatch, capsys):
    """Logits and every layer's output equal HF; GDN layers are megatron's GatedDeltaNet and MoE
    layers its MoELayer where HF has them; exactly the loaded elements are read (never `mtp.*`
    or `model.visual.*`), and what is skipped is said."""
    utils.initialize_model_parallel(1, 1)
    kind, kw = VARIANTS[variant]
    hf = hybrid_model(hybrid_config(kind, **kw))
    path = (save_fused_experts(hf, tmp_path) if variant.endswith("fused")
            else save_hybrid(hf, tmp_path))
    opened = record_checkpoint_reads(monkeypatch)
    model = import_target(path)
    assert opened[-1].elements_read == sum(
        t.numel() for t in hf_import.loaded_tensors(model).values())
    notice = capsys.readouterr().out
    if "mtp_num_hidden_layers" in kw:
        assert "skipping 1 multi-token-prediction layer(s) (mtp.*)" in notice
    if kind.endswith("_vl"):
        assert "skipping the vision encoder (model.visual.*)" in notice

    text = hf.config.get_text_config()
    family = target_family(hf.config)
    layers = model.decoder.layers
    assert [isinstance(layer.self_attention, GatedDeltaNet) for layer in layers] == \
        [t == "linear_attention" for t in text.layer_types]
    assert [isinstance(layer.mlp, MoELayer) for layer in layers] == \
        [bool(p) for p in family.moe_layer_pattern(text)]
    ref_logits, ref_taps = hf_taps(hf, ids := tokens())
    taps = list(range(len(layers)))
    with FeatureCapture(model, taps) as capture:
        logits, features = target_forward(model, ids, None, capture)
    assert (logits - ref_logits).abs().max() <= TOL
    for i, f in enumerate(features.split(HIDDEN, dim=-1)):
        assert (f.transpose(0, 1) - ref_taps[i]).abs().max() <= TOL, i


@pytest.mark.parametrize("groups,tp", [(2, 2), (1, 2), (2, 4)])
def test_gated_qkv_slices_are_megatron_shards(groups, tp):
    """Each TP rank's gated QKV (its query groups, or its piece of a shared group) is its even
    slice of the one-process tensor, [queries | gates | key | value] per group, read from only
    the rows of its group(s)."""
    hd, hidden, heads = 4, 8, 4
    g = torch.Generator().manual_seed(0)
    state = {"q": torch.randn(2 * heads * hd, hidden, generator=g),
             "k": torch.randn(groups * hd, hidden, generator=g),
             "v": torch.randn(groups * hd, hidden, generator=g)}
    with HFCheckpoint(state) as checkpoint:
        whole = read_gated_qkv(checkpoint, ("q", "k", "v"), groups, 0, 1)
    per_head = state["q"].view(heads, 2, hd, hidden)
    first = whole.view(groups, -1, hidden)[0]
    assert torch.equal(first[:hd], per_head[0, 0]) and torch.equal(first[hd:2 * hd], per_head[1, 0])
    assert torch.equal(first[heads // groups * hd:][:hd], per_head[0, 1])  # then the gates
    for rank in range(tp):
        with HFCheckpoint(state) as checkpoint:
            mine = read_gated_qkv(checkpoint, ("q", "k", "v"), groups, rank, tp)
            assert torch.equal(mine, whole.chunk(tp)[rank])
            assert checkpoint.elements_read == mine.numel() * max(1, tp // groups)


def test_cpu_gated_delta_rule_and_conv_equal_transformers():
    """The CPU kernels megatron's GatedDeltaNet calls (`megatron_dflash.cpu`: fla's signatures
    over transformers' chunked torch path) equal transformers' token-by-token recurrence and
    stepwise conv on random inputs (70 tokens: a chunk of 64 and a ragged one; two value heads
    per key head; l2-normalised outside the kernel, as megatron does)."""
    g = torch.Generator().manual_seed(0)
    b, s, hk, hv, dk, dv = 2, 70, 2, 4, 8, 16
    q, k = (torch.randn(b, s, hk, dk, generator=g) for _ in range(2))
    v = torch.randn(b, s, hv, dv, generator=g)
    decay = -torch.rand(b, s, hv, generator=g)
    beta = torch.rand(b, s, hv, generator=g)
    expected, _ = hf_next.torch_recurrent_gated_delta_rule.__wrapped__(
        q, k, v, g=decay, beta=beta, use_qk_l2norm_in_kernel=True)
    q, k = (cpu.l2norm(x).repeat_interleave(hv // hk, dim=2) for x in (q, k))
    out, _ = cpu.chunk_gated_delta_rule(q, k, v, g=decay, beta=beta)
    assert (out - expected).abs().max() <= TOL

    x, weight = torch.randn(b, s, 12, generator=g), torch.randn(12, 4, generator=g)
    conv, _ = cpu.causal_conv1d(x, weight, activation="silu")
    state = torch.zeros(b, 12, 3)
    steps = [hf_next.causal_conv1d_update.__wrapped__(x[:, t, :, None], state, weight, None,
                                                       "silu") for t in range(s)]
    assert (conv - torch.cat(steps, dim=-1).transpose(1, 2)).abs().max() <= TOL
    # Packed sequences run each segment from a zero state (test_packing.py): no state passed in.
    with pytest.raises(NotImplementedError, match="takes no initial_state"):
        cpu.chunk_gated_delta_rule(q, k, v, g=decay, beta=beta, cu_seqlens=torch.tensor([0, s]),
                                   initial_state=torch.zeros(b, hv, dk, dv))


def test_config_draft_and_final_norm(tmp_path):
    """megatron's fields for the hybrid (gated attention, zero-centred norms, the GDN pattern,
    partial rotary, a gated shared expert, a renormalising Qwen3.5-MoE router); the draft keeps
    none of them (a Qwen3-style draft) and its final norm starts at the target's 1 + w."""
    path = hybrid_target_dir(tmp_path, "qwen3_5_moe")
    hf = load_hf_config(path)
    config = target_transformer_config(hf)
    family = target_family(hf)
    assert config.attention_output_gate and config.layernorm_zero_centered_gamma
    assert config.experimental_attention_variant == "gated_delta_net"
    assert config.linear_attention_freq == [1, 1, 1, 0] and config.qk_layernorm
    assert (config.linear_num_key_heads, config.linear_num_value_heads) == (2, 4)
    assert config.moe_shared_expert_gate and config.moe_shared_expert_intermediate_size == 24
    assert not config.moe_router_pre_softmax and config.moe_layer_freq == [1] * 4
    assert config.ffn_hidden_size == 2 * 16 + 24  # no dense FFN: top-k experts + shared
    assert family.gpt_model_kwargs(hf)["rotary_percent"] == 0.25
    cfg = DFlashConfig(num_draft_layers=1, mask_token_id=3).resolve(
        config, vocab_size=VOCAB, target_rope_theta=1e7)
    draft = draft_transformer_config(cfg, config)
    assert not (draft.attention_output_gate or draft.layernorm_zero_centered_gamma)
    assert draft.experimental_attention_variant is None and draft.linear_attention_freq is None
    assert torch.equal(family.final_norm_weight(path), hf_tensor(path, "model.norm.weight") + 1)


@pytest.mark.parametrize("changes,layout,message", [
    (dict(layer_types=["linear_attention", "sliding_attention"] * 2), {},
     "layer_types=['linear_attention', 'sliding_attention', "),
    (dict(rope_parameters=dict(rope_type="yarn", rope_theta=1e7, factor=4.0,
                               original_max_position_embeddings=32, partial_rotary_factor=0.25)),
     {}, "partial_rotary_factor=0.25 with rope_type 'yarn'"),
    (dict(num_experts_per_tok=1), {}, "num_experts_per_tok=1 with a renormalising router"),
    ({}, dict(tensor_parallel_size=4), "linear_num_key_heads=2 is not divisible by the "
                                       "tensor-parallel size 4"),
])
def test_unsupported_fields_fail_up_front(tmp_path, changes, layout, message):
    path = hybrid_target_dir(tmp_path, "qwen3_5_moe")
    edit_config(path, **changes)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        target_transformer_config(load_hf_config(path), **layout)


def _hf_greedy(model, prompt, new):
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                         dtype=torch.long), do_sample=False, max_new_tokens=new, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_decoding_without_a_cache_equals_hf_generate(utils, tmp_path, capsys):
    """Regeneration's batched greedy decoding (prompts of different lengths, left-padded, taps
    captured) and speculative decoding with a random draft (verify blocks, rejected tokens)
    equal HF greedy `generate` token for token; the taps equal HF's hidden states; the engine
    says once that it decodes without a KV cache."""
    utils.initialize_model_parallel(1, 1)
    hf = hybrid_model(hybrid_config("qwen3_5_moe"), seed=3)
    model = import_target(save_hybrid(hf, tmp_path))
    prompts, new = [tokens(4, 1, 5)[0].tolist(), tokens(5, 1, 9)[0].tolist()], 8
    expected = [_hf_greedy(hf, p, new) for p in prompts]

    generated = BatchGenerator(model, [], layer_ids=[0, 3]).generate(prompts, new)
    assert capsys.readouterr().out.count(NO_CACHE_NOTICE) == 1
    assert [g.tokens for g in generated] == expected
    for prompt, g in zip(prompts, generated):
        _, ref_taps = hf_taps(hf, torch.tensor([prompt + g.tokens]))
        taps = g.features.split(HIDDEN, dim=-1)
        assert (taps[0] - ref_taps[0][0]).abs().max() <= TOL
        assert (taps[1] - ref_taps[3][0]).abs().max() <= TOL

    config = target_transformer_config(load_hf_config(tmp_path))
    cfg = DFlashConfig(num_draft_layers=1, mask_token_id=3, block_size=4,
                       target_layer_ids=[0, 3]).resolve(config, vocab_size=VOCAB,
                                                        target_rope_theta=1e7)
    draft = build_draft(config, cfg, model)
    randomize_(draft, seed=5)
    decoder = SpeculativeDecoder(model, draft)
    for prompt, tokens_ in zip(prompts, expected):
        spec = decoder.generate(prompt, new)
        assert spec.tokens == tokens_ and len(spec.acceptance_lengths) > 1
        assert decoder.generate(prompt, new, block_size=1).tokens == tokens_
