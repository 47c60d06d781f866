"""HF DeepSeek-V3 -> megatron GPTModel with megatron's own multi-latent attention and MoE layer (one
process): logits and captured features equal transformers' `DeepseekV3ForCausalLM` (YaRN with
mscale, group-limited sigmoid routing with the score-correction bias, shared experts, a dense
first layer); the checkpoint's multi-token-prediction layer is skipped and never read; the draft
stays dense GQA; greedy decoding with megatron's static KV cache equals full forwards; configs
megatron cannot reproduce fail up front naming the field. Expert-parallel layouts:
tests/distributed/test_moe_ep.py."""
import json
import types

import pytest
import torch
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.multi_latent_attention import MLASelfAttention
from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

from tests.dflash_testing import (DEEPSEEK_YARN, build_draft, record_checkpoint_reads,
                                  save_deepseek_checkpoint, tiny_deepseek_config,
                                  tiny_deepseek_model)
from megatron_dflash.config import DFlashConfig, draft_transformer_config
from megatron_dflash.evaluate import SpeculativeDecoder
from megatron_dflash.synthetic import randomize_
from megatron_dflash.targets import hf_import
from megatron_dflash.targets.capture import FeatureCapture, target_forward
from megatron_dflash.targets.families import deepseek_v3
from megatron_dflash.targets.hf_import import (build_target, load_hf_config, load_hf_weights,
                                              target_family, target_transformer_config)

VOCAB, HIDDEN, LAYERS, SEQ, BATCH = 256, 64, 3, 16, 2
TOL = 1e-5
YARN = DEEPSEEK_YARN


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """(checkpoint dir, HF model) of the default tiny DeepSeek-V3."""
    model = tiny_deepseek_model()
    return save_deepseek_checkpoint(model, tmp_path_factory.mktemp("deepseek")), model


def tokens(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=g), torch.arange(SEQ).expand(BATCH, SEQ)


def import_target(path):
    hf = load_hf_config(path)
    model = build_target(hf, target_transformer_config(hf))
    load_hf_weights(model, path)
    return model


def assert_matches_hf(model, hf_model, taps):
    """Logits, and each tap's output (HF hidden_states[i+1]; the last layer's before the final
    norm, from a hook), equal transformers' within TOL."""
    ids, pos = tokens()
    with FeatureCapture(model, taps) as capture:
        logits, features = target_forward(model, ids, pos, capture)
    last = {}
    hook = hf_model.model.layers[-1].register_forward_hook(
        lambda m, a, out: last.setdefault("h", out))
    with torch.no_grad():
        ref = hf_model(input_ids=ids, output_hidden_states=True)
    hook.remove()
    assert (logits - ref.logits).abs().max() <= TOL
    feats = [f.transpose(0, 1) for f in features.split(HIDDEN, dim=-1)]
    for f, i in zip(feats, taps):
        expected = last["h"] if i == LAYERS - 1 else ref.hidden_states[i + 1]
        assert (f - expected).abs().max() <= TOL, i


def test_import_matches_hf_and_skips_mtp(target, utils, monkeypatch, capsys):
    """Dense layer 0, MoE layers 1-2 (taps after each) equal HF; the MTP layer is said once
    (however often the config is loaded) and none of its tensors is read."""
    utils.initialize_model_parallel(1, 1)
    path, hf_model = target
    opened = record_checkpoint_reads(monkeypatch)
    load_hf_config(path)
    model = import_target(path)
    out = capsys.readouterr().out
    assert out.count("skipping 1 multi-token-prediction layer(s) (num_nextn_predict_layers=1, "
                     "model.layers.3): not part of the target") == 1, out
    assert any(k.startswith("model.layers.3.") for k in opened[-1].shapes)
    tensors = hf_import.loaded_tensors(model)
    assert opened[-1].elements_read == sum(t.numel() for t in tensors.values())

    layers = model.decoder.layers
    assert len(layers) == LAYERS and all(isinstance(l.self_attention, MLASelfAttention)
                                         for l in layers)
    assert isinstance(layers[0].mlp, MLP) and all(isinstance(l.mlp, MoELayer) for l in layers[1:])
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    for i in (1, 2):  # the score-correction bias is the router's expert bias
        bias = hf_model.model.layers[i].mlp.gate.e_score_correction_bias
        assert torch.equal(layers[i].mlp.router.expert_bias, bias) and bias.abs().max() > 0
    assert_matches_hf(model, hf_model, taps=[0, 1, 2])


@pytest.mark.parametrize("variant,source", [
    # Plain RoPE, no group restriction (one group), top-2 of 8, every layer MoE, tied embeddings.
    (dict(rope_parameters=dict(rope_type="default", rope_theta=500.0), n_group=1, topk_group=1,
          num_experts_per_tok=2, first_k_dense_replace=0, tie_word_embeddings=True),
     "safetensors"),
    # YaRN without mscale (the plain attention factor, unscaled softmax), all 4 groups chosen;
    # from transformers 5's in-memory state dict (experts fused).
    (dict(rope_parameters=dict(YARN, mscale=None, mscale_all_dim=None), topk_group=4),
     "state_dict"),
], ids=["rope_ungrouped_tied", "yarn_no_mscale_all_groups"])
def test_variants_match_hf(variant, source, utils, tmp_path):
    utils.initialize_model_parallel(1, 1)
    model = tiny_deepseek_model(seed=2, **variant)
    if source == "safetensors":
        target = import_target(save_deepseek_checkpoint(model, tmp_path))
    else:
        state = model.state_dict()
        assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
        target = build_target(model.config, target_transformer_config(model.config))
        load_hf_weights(target, state)
    assert_matches_hf(target, model, taps=[1, 2])


def test_transformer_config_and_dense_draft(target):
    """MLA and YaRN fields, the router as transformers runs it, and a dense GQA draft whose
    defaults come from the target's heads, v_head_dim and dense FFN."""
    hf = load_hf_config(target[0])
    config = target_transformer_config(hf, tensor_parallel_size=2, expert_model_parallel_size=2)
    assert isinstance(config, MLATransformerConfig) and config.multi_latent_attention
    assert (config.q_lora_rank, config.kv_lora_rank, config.qk_head_dim,
            config.qk_pos_emb_head_dim, config.v_head_dim) == (32, 16, 16, 8, 16)
    assert (config.num_query_groups, config.kv_channels, config.qk_layernorm) == (4, 16, True)
    assert (config.rope_type, config.rotary_base, config.rotary_scaling_factor,
            config.original_max_position_embeddings, config.mscale, config.mscale_all_dim,
            config.beta_fast, config.beta_slow) == ("yarn", 1000.0, 8.0, 8, 1.0, 0.8, 32, 1)
    assert config.moe_layer_freq == [0, 1, 1] and config.num_moe_experts == 8
    assert (config.ffn_hidden_size, config.moe_ffn_hidden_size,
            config.moe_shared_expert_intermediate_size) == (96, 16, 32)
    assert config.moe_router_score_function == "sigmoid" and config.moe_router_topk == 4
    assert config.moe_router_enable_expert_bias and config.moe_router_bias_update_rate == 0
    assert (config.moe_router_num_groups, config.moe_router_group_topk,
            config.moe_router_topk_scaling_factor) == (4, 2, 2.5)
    assert config.moe_router_dtype == "fp32" and config.moe_router_load_balancing_type == "none"
    assert config.moe_aux_loss_coeff == 0 and config.moe_expert_capacity_factor is None

    cfg = DFlashConfig(num_draft_layers=1, mask_token_id=3).resolve(
        config, vocab_size=VOCAB, target_rope_theta=1000.0)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
            cfg.ffn_hidden_size) == (4, 4, 16, 96)  # FFN: never the per-expert 16
    draft = draft_transformer_config(cfg, config)
    assert type(draft) is TransformerConfig and not draft.multi_latent_attention
    assert draft.num_moe_experts is None and not draft.moe_router_enable_expert_bias
    assert draft.moe_shared_expert_intermediate_size is None
    assert draft.expert_tensor_parallel_size == 2
    assert (draft.num_query_groups, draft.kv_channels, draft.ffn_hidden_size) == (4, 16, 96)


class OracleDraft(torch.nn.Module):
    """A stand-in draft that proposes the target's own greedy continuation `sequence` with its
    last slot wrong: every step accepts all but one draft token and rejects one, whose K/V stays
    behind in the target's cache (overwritten by the next verify)."""

    def __init__(self, sequence):
        super().__init__()
        self.sequence = sequence
        self.dflash_config = types.SimpleNamespace(target_layer_ids=[1], block_size=4,
                                                   mask_token_id=0)

    def forward(self, block, features, attention_mask, positions, return_hidden, kv_cache):
        size = block.shape[1]
        start = int(positions[0, -size])
        self.proposal = torch.tensor(self.sequence[start + 1:start + size])
        self.proposal[-1] = (self.proposal[-1] + 1) % VOCAB
        return torch.zeros(size, 1, 1)  # stands for the block's hidden states

    def propose(self, hidden, anchor):
        return self.proposal


def test_greedy_decoding_with_the_kv_cache_equals_full_forwards(target, utils):
    """evaluate.SpeculativeDecoder on the DeepSeek-V3 target (megatron's StaticInferenceContext,
    explicit causal mask): target-only decoding equals the argmax of full no-cache forwards; with
    multi-token verify blocks (an oracle draft that is wrong once per block, and a random dense
    draft built for the MLA target) it stays lossless."""
    utils.initialize_model_parallel(1, 1)
    model = import_target(target[0])
    prompt, new = tokens(seed=4)[0][0, :6].tolist(), 14
    baseline = SpeculativeDecoder(model).generate(prompt, new, block_size=1)
    sequence = list(prompt)
    with torch.no_grad():
        for _ in range(new):
            logits = model(torch.tensor([sequence]), None, attention_mask=None)
            sequence.append(int(logits[0, -1].argmax()))
    assert baseline.tokens == sequence[len(prompt):]

    oracle = SpeculativeDecoder(model, OracleDraft(sequence)).generate(prompt, new)
    assert oracle.tokens == baseline.tokens
    assert oracle.accepted == [d - 1 for d in oracle.drafted] and max(oracle.accepted) == 2

    hf = load_hf_config(target[0])
    config = target_transformer_config(hf)
    cfg = DFlashConfig(num_draft_layers=1, mask_token_id=3, block_size=4,
                       target_layer_ids=[0, 2]).resolve(config, vocab_size=VOCAB,
                                                        target_rope_theta=1000.0)
    draft = build_draft(config, cfg, model)
    randomize_(draft, seed=5)
    assert SpeculativeDecoder(model, draft).generate(prompt, new).tokens == baseline.tokens


# --- group-limited routing: every (n_group, topk_group, top-k) equals HF or is refused --------

GROUP_EXPERTS = 12
GROUP_GRID = [(groups, topk_group, top_k) for groups in (1, 2, 3, 4, 6, 12)
              for topk_group in sorted({1, 2, 3, groups, groups + 1}) for top_k in range(1, 8)]


def refused_group_field(groups, topk_group, top_k):
    """What the import must refuse, by the field it names; None where megatron's router equals
    transformers'. transformers keeps the topk_group groups whose 2 best (corrected) scores sum
    highest (groups of one expert fail there), megatron those whose top_k // topk_group best do;
    keeping every group is plain top-k; top-k must fit in the kept groups."""
    size = GROUP_EXPERTS // groups
    if size < 2:
        return f"n_group={groups} (n_routed_experts={GROUP_EXPERTS}"
    if topk_group > groups:
        return f"topk_group={topk_group} (n_group={groups})"
    if topk_group < groups and (top_k // topk_group != 2 or top_k > topk_group * size):
        return f"num_experts_per_tok={top_k} with topk_group={topk_group} ("
    return None


@pytest.mark.parametrize("groups,topk_group,top_k", GROUP_GRID)
def test_group_limited_routing_equals_hf_or_is_refused(groups, topk_group, top_k, utils,
                                                      tmp_path):
    """topk_group = 1 keeps one group (a restriction, not none); each expressible combination
    gives HF's logits, each other one fails in load_hf_config with one line naming the field."""
    kw = dict(n_routed_experts=GROUP_EXPERTS, n_group=groups, topk_group=topk_group,
              num_experts_per_tok=top_k, norm_topk_prob=top_k > 1, num_hidden_layers=1,
              first_k_dense_replace=0, num_nextn_predict_layers=0, n_shared_experts=1,
              rope_parameters=dict(rope_type="default", rope_theta=1000.0))
    field = refused_group_field(groups, topk_group, top_k)
    if field is not None:
        tiny_deepseek_config(**kw).save_pretrained(tmp_path)  # no tensors: never read
        with pytest.raises(ValueError, match="not supported by the DeepSeek-V3 import") as error:
            load_hf_config(tmp_path)
        message = str(error.value)
        assert field in message and "\n" not in message, message
        assert message.startswith(f"{tmp_path / 'config.json'}: ")
        return
    utils.initialize_model_parallel(1, 1)
    hf_model = tiny_deepseek_model(seed=7, **kw)
    config = target_transformer_config(hf_model.config)
    grouped = topk_group < groups
    assert (config.moe_router_num_groups, config.moe_router_group_topk) == (
        (groups, topk_group) if grouped else (None, None))
    model = build_target(hf_model.config, config)
    load_hf_weights(model, hf_model.state_dict())
    ids = tokens()[0]
    with torch.no_grad():
        logits, ref = model(ids, None, attention_mask=None), hf_model(input_ids=ids).logits
    assert (logits - ref).abs().max() <= TOL


# --- errors: one clear error naming the config field, before any tensor is read ----------------

@pytest.mark.parametrize("changes,message", [
    (dict(scoring_func="softmax"), "scoring_func='softmax'"),
    (dict(topk_method="group_limited_greedy"), "topk_method='group_limited_greedy'"),
    (dict(rope_interleave=False), "rope_interleave=False"),
    (dict(q_lora_rank=None), "q_lora_rank=None"),
    (dict(norm_topk_prob=False), "norm_topk_prob=False with num_experts_per_tok=4"),
    (dict(num_experts_per_tok=3), "num_experts_per_tok=3 with topk_group=2 (group scores need"),
    (dict(rope_parameters=dict(YARN, mscale=None)), "rope_parameters.mscale=None with "
                                                    "mscale_all_dim=0.8"),
    (dict(rope_parameters=dict(YARN, attention_factor=2.0)),
     "rope_parameters.attention_factor=2.0 (megatron derives"),
    (dict(rope_parameters=dict(rope_type="linear", rope_theta=1000.0, factor=2.0)),
     "rope_parameters.rope_type='linear' (supported: default, yarn)"),
])
def test_unsupported_config_fails_naming_the_field(target, tmp_path, changes, message):
    with open(f"{target[0]}/config.json") as f:
        cfg = json.load(f)
    (tmp_path / "config.json").write_text(json.dumps(cfg | changes))  # no tensors: never read
    with pytest.raises(ValueError, match="not supported by the DeepSeek-V3 import") as error:
        load_hf_config(tmp_path)
    assert message in str(error.value) and str(tmp_path / "config.json") in str(error.value)


def test_quantized_checkpoint_fails_naming_the_field(target, tmp_path):
    """DeepSeek-V3 as released holds FP8 block-scaled weights: refused, not read as numbers."""
    with open(f"{target[0]}/config.json") as f:
        cfg = json.load(f)
    fp8 = dict(quant_method="fp8", fmt="e4m3", weight_block_size=[128, 128])
    (tmp_path / "config.json").write_text(json.dumps(cfg | dict(quantization_config=fp8)))
    with pytest.raises(ValueError, match=r"quantization_config \(quant_method='fp8'\) not "
                                         r"supported .* dequantize the checkpoint first"):
        load_hf_config(tmp_path)


def test_local_backend_needs_divisible_latent_widths(target):
    """The local spec splits the q / kv down projections over TP: 16 + 8 = 24 rows cannot be
    split 16 ways (checked before any layer is built)."""
    config = target_transformer_config(load_hf_config(target[0]))
    with pytest.raises(ValueError, match=r"q_lora_rank=32 is not divisible by the tensor-parallel "
                                         r"size 3"):
        deepseek_v3.check_tensor_parallel(config, 3)
    with pytest.raises(ValueError, match=r"kv_lora_rank \+ qk_rope_head_dim=24 is not divisible "
                                         r"by the tensor-parallel size 16"):
        deepseek_v3.check_tensor_parallel(config, 16)


def test_transformer_engine_names(target, monkeypatch):
    """megatron's TE MLA layer spec (read without TE, like test_te_spec): input norm separate,
    q / kv latent norms fused into the up projections, replicated down projections, the dense
    layer's pre-MLP norm fused into fc1 and the MoE layer's separate; the mapping names that."""
    import megatron.core.extensions.transformer_engine as te_ext
    import megatron.core.models.gpt.gpt_layer_specs as gpt_specs
    from megatron.core.extensions.transformer_engine import (TELayerNormColumnParallelLinear,
                                                             TELinear, TENorm)
    from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider
    from megatron.core.transformer.identity_op import IdentityOp

    monkeypatch.setattr(te_ext, "HAVE_TE", True)
    monkeypatch.setattr(gpt_specs, "TESpecProvider", TESpecProvider)
    monkeypatch.setattr(gpt_specs, "TENorm", TENorm)
    hf = load_hf_config(target[0])
    config = target_transformer_config(hf)
    dense, sparse = gpt_specs.get_gpt_decoder_layer_specs(config, use_transformer_engine=True)[:2]
    attention = dense.submodules.self_attention.submodules
    assert dense.submodules.input_layernorm is not IdentityOp
    assert attention.linear_q_down_proj is TELinear and attention.linear_kv_down_proj is TELinear
    assert attention.linear_q_up_proj is TELayerNormColumnParallelLinear
    assert attention.linear_kv_up_proj is TELayerNormColumnParallelLinear
    assert attention.q_layernorm is IdentityOp and attention.kv_layernorm is IdentityOp
    assert dense.submodules.pre_mlp_layernorm is IdentityOp
    assert sparse.submodules.pre_mlp_layernorm is not IdentityOp

    rows = {name: (hf, kind) for name, hf, kind in target_family(hf).weight_rows(
        config, [0, 1], embedding=False, final_norm=False, output=False, tied=False,
        fused_norms=True)}
    layer0, layer1 = "decoder.layers.0.", "decoder.layers.1."
    assert rows[layer0 + "input_layernorm.weight"][0] == ("model.layers.0.input_layernorm.weight",)
    assert rows[layer0 + "self_attention.linear_q_up_proj.layer_norm_weight"][0] == (
        "model.layers.0.self_attn.q_a_layernorm.weight",)
    assert rows[layer0 + "self_attention.linear_kv_up_proj.layer_norm_weight"][0] == (
        "model.layers.0.self_attn.kv_a_layernorm.weight",)
    assert rows[layer0 + "self_attention.linear_q_down_proj.weight"][1] == "replicated"
    assert layer0 + "mlp.linear_fc1.layer_norm_weight" in rows
    assert layer1 + "pre_mlp_layernorm.weight" in rows
    assert not any(n.endswith(("q_layernorm.weight", "kv_layernorm.weight")) for n in rows)
