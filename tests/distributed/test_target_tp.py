"""Imported target under TP=2 (with and without sequence parallelism) and PP=2: logits and captured
features equal the TP=1 import; a Qwen3-MoE checkpoint with fused experts under expert
parallelism reads only each rank's slices. Run with `torchrun --nproc-per-node 2 -m pytest` (and
4 for the expert-parallel layouts)."""
import math

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.dot_product_attention import DotProductAttention
from tests.dflash_testing import (record_checkpoint_reads, save_fused_experts, tiny_moe_config,
                                  tiny_target_dir)
from tests.families_testing import perturbed_model
from transformers import AutoModelForCausalLM, LlamaConfig, MinistralConfig, Qwen3Config

from megatron_dflash.targets import hf_import
from megatron_dflash.targets.capture import FeatureCapture, target_forward
from megatron_dflash.targets.sdpa_attention import SDPACoreAttention
from megatron_dflash.targets.hf_import import (build_target, load_hf_config, load_hf_weights,
                                              target_transformer_config)

VOCAB, HIDDEN, LAYERS, SEQ, BATCH = 128, 64, 4, 16, 2
TAPS = [0, 2, 3]
TOL = 1e-5

CONFIGS = {
    # GQA with more groups than ranks: each rank holds one whole group.
    "llama": lambda: LlamaConfig(architectures=["LlamaForCausalLM"], num_key_value_heads=2),
    # One group for two ranks: megatron all-gathers the fused QKV and re-slices it.
    "qwen3_ng1_tied": lambda: Qwen3Config(architectures=["Qwen3ForCausalLM"], num_key_value_heads=1,
                                          head_dim=32, tie_word_embeddings=True),
    # Sliding windows of 6 keys on layers 0 and 2 (megatron's per-layer list, global ids under
    # PP) and YaRN past an original context of 8.
    "ministral_window_yarn": lambda: MinistralConfig(
        architectures=["MinistralForCausalLM"], num_hidden_layers=LAYERS, num_key_value_heads=2,
        head_dim=16, sliding_window=6,
        layer_types=["sliding_attention", "full_attention"] * 2, max_position_embeddings=32,
        rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=4.0,
                             original_max_position_embeddings=8)),
}


def hf_model(kind):
    config = CONFIGS[kind]()
    config.update(dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=96,
                       num_hidden_layers=LAYERS, num_attention_heads=4, initializer_range=0.1))
    torch.manual_seed(0)  # same model on every rank
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


def tokens():
    torch.manual_seed(1)
    return torch.randint(0, VOCAB, (BATCH, SEQ)), torch.arange(SEQ).expand(BATCH, SEQ)


def import_target(hf, **parallel):
    model = build_target(hf.config, target_transformer_config(hf.config, **parallel))
    load_hf_weights(model, hf.state_dict())
    return model


def gather(tensor, dim, group):
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def reference(hf, utils):
    utils.initialize_model_parallel(1, 1)
    model = import_target(hf)
    with FeatureCapture(model, TAPS) as capture:
        return target_forward(model, *tokens(), capture)


@pytest.mark.world(2)
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2_sp"])
@pytest.mark.parametrize("kind", list(CONFIGS))
def test_tp2_matches_tp1(kind, sequence_parallel, utils):
    hf = hf_model(kind)
    ref_logits, ref_features = reference(hf, utils)

    utils.initialize_model_parallel(2, 1)
    model = import_target(hf, tensor_parallel_size=2, sequence_parallel=sequence_parallel)
    with FeatureCapture(model, TAPS) as capture:
        logits, features = target_forward(model, *tokens(), capture)
    tp_group = parallel_state.get_tensor_model_parallel_group()
    assert logits.shape == (BATCH, SEQ, VOCAB // 2)  # vocab-parallel
    assert features.shape == (SEQ // 2 if sequence_parallel else SEQ, BATCH, len(TAPS) * HIDDEN)
    if sequence_parallel:
        features = gather(features, 0, tp_group)
    assert (gather(logits, -1, tp_group) - ref_logits).abs().max() <= TOL
    assert (features - ref_features).abs().max() <= TOL


@pytest.mark.world(2)
@pytest.mark.parametrize("kind", ["qwen3_ng1_tied", "ministral_window_yarn"])
def test_pp2_stages_match_tp1(kind, utils):
    """Each stage loads only its layers (embedding first, norm + tied output layer last) and
    captures only its taps; stage 0's output is sent to stage 1 by hand."""
    hf = hf_model(kind)
    ref_logits, ref_features = reference(hf, utils)

    utils.initialize_model_parallel(1, 2)
    model = import_target(hf, pipeline_parallel_size=2)
    first = parallel_state.is_pipeline_first_stage()
    assert [layer.layer_number for layer in model.decoder.layers] == ([1, 2] if first else [3, 4])
    assert hasattr(model, "embedding") == first and hasattr(model, "output_layer") == (not first)
    windows = [layer.self_attention.core_attention.window for layer in model.decoder.layers]
    if kind.startswith("ministral"):  # global layers 1 and 3 (0-based 0 and 2) slide
        assert windows == [(5, 0), None]
    ids, pos = tokens()
    with FeatureCapture(model, TAPS) as capture:
        assert capture.local_ids == ([0] if first else [2, 3])
        if first:
            with torch.no_grad():
                hidden = model(ids, pos, None)
            dist.send(hidden, dst=parallel_state.get_pipeline_model_parallel_next_rank())
            features = capture.features()
        else:
            hidden = torch.empty(SEQ, BATCH, HIDDEN)
            dist.recv(hidden, src=parallel_state.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(hidden)
            logits, features = target_forward(model, ids, pos, capture)
            assert (logits - ref_logits).abs().max() <= TOL
    expected = ref_features[..., :HIDDEN] if first else ref_features[..., HIDDEN:]
    assert (features - expected).abs().max() <= TOL


@pytest.mark.world(2)
def test_tp2_reads_only_its_slices(utils, tmp_path, monkeypatch):
    """Each rank reads from the safetensors exactly the elements of its own parameters
    (replicated norms in full), not the whole checkpoint; the header check reads none."""
    opened = record_checkpoint_reads(monkeypatch)
    path = [tiny_target_dir(tmp_path / "target") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(path, src=0)  # transformers saves on rank 0 only
    path = path[0]
    utils.initialize_model_parallel(2, 1)
    hf = load_hf_config(path)
    model = build_target(hf, target_transformer_config(hf, tensor_parallel_size=2))
    load_hf_weights(model, path)
    headers, load = opened
    full = sum(math.prod(shape) for shape in load.shapes.values())
    assert headers.elements_read == 0
    assert load.elements_read == sum(p.numel() for p in model.parameters())
    assert load.elements_read < 0.55 * full


@pytest.mark.world(2)
@pytest.mark.parametrize("kind", list(CONFIGS))
def test_tp2_sdpa_equals_local_attention(kind, utils, monkeypatch):
    """At TP=2 the SDPA core attention (the local default) gives this rank's logits and features
    of megatron's DotProductAttention, also with one KV group for two ranks."""
    hf = hf_model(kind)
    utils.initialize_model_parallel(2, 1)
    results = []
    for core_attention in (SDPACoreAttention, DotProductAttention):
        monkeypatch.setattr(hf_import.target_family(hf.config), "core_attention", core_attention)
        model = import_target(hf, tensor_parallel_size=2)
        assert type(model.decoder.layers[0].self_attention.core_attention) is core_attention
        with FeatureCapture(model, TAPS) as capture:
            results.append(target_forward(model, *tokens(), capture))
    (logits, features), (ref_logits, ref_features) = results
    assert (logits - ref_logits).abs().max() <= TOL
    assert (features - ref_features).abs().max() <= TOL


@pytest.mark.world(4)
@pytest.mark.parametrize("layout", [dict(tp=2, ep=2), dict(tp=1, ep=2, etp=2)],
                         ids=["tp2ep2", "ep2etp2"])
def test_fused_experts_on_disk_read_only_the_ranks_slices(layout, utils, tmp_path, monkeypatch):
    """A Qwen3-MoE checkpoint storing transformers 5's fused experts: under expert parallelism
    each rank reads exactly the elements it holds (its experts' slices of the fused tensors),
    and the logits equal the one-process import of the same model saved one tensor per expert."""
    paths = [None, None]
    if dist.get_rank() == 0:
        hf = perturbed_model(tiny_moe_config())
        hf.save_pretrained(tmp_path / "per_expert")
        paths = [str(tmp_path / "per_expert"), save_fused_experts(hf, tmp_path / "fused")]
    dist.broadcast_object_list(paths, src=0)
    per_expert, fused = paths
    ids = tokens()[0]

    utils.initialize_model_parallel(1, 1)
    hf = load_hf_config(per_expert)
    model = build_target(hf, target_transformer_config(hf))
    load_hf_weights(model, per_expert)
    with torch.no_grad():
        ref_logits = model(ids, None, None)

    utils.initialize_model_parallel(layout["tp"], 1, ep=layout["ep"], etp=layout.get("etp"))
    hf = load_hf_config(fused)
    model = build_target(hf, target_transformer_config(
        hf, tensor_parallel_size=layout["tp"], expert_model_parallel_size=layout["ep"],
        expert_tensor_parallel_size=layout.get("etp")))
    opened = record_checkpoint_reads(monkeypatch)
    load_hf_weights(model, fused)
    assert opened[-1].elements_read == sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        logits = model(ids, None, None)
    tp_group = parallel_state.get_tensor_model_parallel_group()
    assert (gather(logits, -1, tp_group) - ref_logits).abs().max() <= TOL
