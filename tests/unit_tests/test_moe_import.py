"""HF Qwen3-MoE -> megatron GPTModel with megatron's own MoE layer (one process): logits and
captured features equal transformers' `Qwen3MoeForCausalLM`; the router and expert settings are
the inference ones; the draft stays dense; bad MoE checkpoints and expert-parallel flags fail up
front with one message each. Expert-parallel layouts: tests/distributed/test_moe_ep.py."""

import pytest
import torch
from tests.dflash_testing import (edit_config, save_fused_experts, tiny_moe_config,
                                  tiny_moe_target_dir)
from tests.families_testing import perturbed_model
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.moe.moe_layer import MoELayer
from safetensors.torch import load_file, save_file

from megatron_dflash.config import DFlashConfig, draft_transformer_config
from megatron_dflash.targets import moe
from megatron_dflash.targets.capture import FeatureCapture, target_forward
from megatron_dflash.targets.hf_checkpoint import HFCheckpoint
from megatron_dflash.targets.hf_import import (build_target, load_hf_config, load_hf_weights,
                                              loaded_tensors, target_family,
                                              target_transformer_config)

VOCAB, HIDDEN, LAYERS, SEQ, BATCH = 256, 64, 4, 16, 2
TOL = 1e-5

VARIANTS = {
    # Layer 2 dense (mlp_only_layers); softmax over all experts, top-2 renormalised.
    "norm_topk": dict(norm_topk_prob=True),
    # Top-2 softmax probabilities used as they are; top-3 of 8.
    "no_norm_top3": dict(norm_topk_prob=False, top_k=3),
    # decoder_sparse_step=2: layers 1 and 3 MoE, 0 and 2 dense; tied embeddings.
    "sparse_step_tied": dict(dense_layers=(), decoder_sparse_step=2, tie_word_embeddings=True),
}


def tokens():
    torch.manual_seed(1)
    return torch.randint(0, VOCAB, (BATCH, SEQ)), torch.arange(SEQ).expand(BATCH, SEQ)


def import_target(source, hf_config=None):
    hf = hf_config if hf_config is not None else load_hf_config(source)
    model = build_target(hf, target_transformer_config(hf))
    load_hf_weights(model, source)
    return model


@pytest.mark.parametrize("source", ["safetensors", "fused_state_dict"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_import_matches_hf(variant, source, utils, tmp_path):
    """Every layer's output (HF hidden_states[i+1], the last one before the final norm) and the
    logits equal transformers' Qwen3MoeForCausalLM; from the safetensors (one tensor per expert)
    or from transformers 5's in-memory state dict (experts fused)."""
    utils.initialize_model_parallel(1, 1)
    hf = perturbed_model(tiny_moe_config(**VARIANTS[variant]))
    hf.save_pretrained(tmp_path)
    keys = load_file(tmp_path / "model.safetensors").keys()
    assert "model.layers.3.mlp.experts.7.down_proj.weight" in keys  # one tensor per expert
    if source == "safetensors":
        model = import_target(tmp_path)
    else:
        state = hf.state_dict()
        assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)  # fused in memory
        model = import_target(state, hf.config)
    pattern = target_family(hf.config).moe_layer_pattern(hf.config)
    assert [isinstance(layer.mlp, MoELayer) for layer in model.decoder.layers] == \
        [bool(p) for p in pattern] and 0 in pattern and 1 in pattern
    assert all(isinstance(layer.mlp, MLP) for layer, p in zip(model.decoder.layers, pattern)
               if not p)
    assert not any(p.requires_grad for p in model.parameters()) and not model.training

    ids, pos = tokens()
    taps = list(range(LAYERS))
    with FeatureCapture(model, taps) as capture:
        logits, features = target_forward(model, ids, pos, capture)
    last = {}
    hook = hf.model.layers[-1].register_forward_hook(lambda m, a, out: last.setdefault("h", out))
    with torch.no_grad():
        ref = hf(input_ids=ids, output_hidden_states=True)
    hook.remove()
    assert (logits - ref.logits).abs().max() <= TOL
    feats = [f.transpose(0, 1) for f in features.split(HIDDEN, dim=-1)]
    for i in taps[:-1]:  # after MoE and dense layers alike
        assert (feats[i] - ref.hidden_states[i + 1]).abs().max() <= TOL, i
    assert (feats[-1] - last["h"]).abs().max() <= TOL


@pytest.fixture
def per_expert_and_fused(tmp_path):
    """(HF model, its checkpoint with one tensor per expert, the same with experts fused)."""
    hf = perturbed_model(tiny_moe_config())
    hf.save_pretrained(tmp_path / "per_expert")
    fused = save_fused_experts(hf, tmp_path / "fused")
    keys = load_file(f"{fused}/model.safetensors").keys()
    assert "model.layers.3.mlp.experts.gate_up_proj" in keys
    assert not any(".mlp.experts.0." in k for k in keys)
    return hf, str(tmp_path / "per_expert"), fused


def test_fused_experts_on_disk_load_like_per_expert(per_expert_and_fused, utils):
    """transformers 5's fused experts stored in the safetensors load to the very tensors of the
    per-expert checkpoint, and give HF's logits."""
    utils.initialize_model_parallel(1, 1)
    hf, per_expert, fused = per_expert_and_fused
    loaded = [loaded_tensors(import_target(path)) for path in (per_expert, fused)]
    assert loaded[0].keys() == loaded[1].keys()
    assert all(torch.equal(loaded[0][k], loaded[1][k]) for k in loaded[0])
    ids, pos = tokens()
    with FeatureCapture(model := import_target(fused), [0]) as capture:
        logits, _ = target_forward(model, ids, pos, capture)
    with torch.no_grad():
        assert (logits - hf(input_ids=ids).logits).abs().max() <= TOL


@pytest.mark.parametrize("ep_rank,etp_rank", [(0, 1), (1, 0)])
def test_fused_experts_read_only_the_ranks_slices(per_expert_and_fused, ep_rank, etp_rank):
    """An expert-parallel rank reads only its experts' slices of the fused tensors, an
    expert-TP rank only its rows / columns of them: the elements of its per-expert reads."""
    _, per_expert, fused = per_expert_and_fused
    hf = load_hf_config(fused)
    config = target_transformer_config(hf, expert_model_parallel_size=2,
                                       expert_tensor_parallel_size=2)
    family = target_family(hf)
    rows = [row for row in family.weight_rows(config, [0, 3], embedding=False, final_norm=False,
                                              output=False, tied=False,
                                              expert_parallel=(ep_rank, 2))
            if row[2].startswith("expert_")]
    convert = family.converters(config, tp=(0, 1), expert_tp=(etp_rank, 2))
    with HFCheckpoint(per_expert) as one, HFCheckpoint(fused) as other:
        other.add_views(family.tensor_views(other.shapes))
        held = 0
        for _, names, kind in rows:
            value = convert[kind](one, *names)
            assert torch.equal(value, convert[kind](other, *names))
            held += value.numel()
        assert one.elements_read == other.elements_read == held
    assert held == 2 * 4 * 3 * 32 * 64 // 2  # 2 layers x 4 experts x (gate, up, down) / ETP


def test_moe_transformer_config(tmp_path):
    """Router and experts as at inference, the per-layer pattern, and a dense ffn_hidden_size
    for the dense layers and the draft."""
    hf = load_hf_config(tiny_moe_target_dir(tmp_path, norm_topk_prob=False, top_k=3))
    config = target_transformer_config(hf, tensor_parallel_size=2, expert_model_parallel_size=4,
                                       moe_token_dispatcher_type="alltoall")
    assert config.num_moe_experts == 8 and config.moe_router_topk == 3
    assert config.moe_layer_freq == [1, 1, 0, 1]
    assert (config.ffn_hidden_size, config.moe_ffn_hidden_size) == (96, 32)
    assert config.moe_router_pre_softmax and config.moe_router_score_function == "softmax"
    assert config.moe_router_dtype == "fp32" and config.moe_router_load_balancing_type == "none"
    assert config.moe_aux_loss_coeff == 0 and config.moe_expert_capacity_factor is None
    assert config.moe_input_jitter_eps is None and config.moe_token_dispatcher_type == "alltoall"
    assert (config.expert_model_parallel_size, config.expert_tensor_parallel_size) == (4, 2)
    assert config.qk_layernorm and config.moe_shared_expert_intermediate_size is None

    cfg = DFlashConfig(num_draft_layers=1, mask_token_id=3).resolve(
        config, vocab_size=VOCAB, target_rope_theta=1e6)
    assert cfg.ffn_hidden_size == hf.intermediate_size == 96  # never moe_intermediate_size
    draft = draft_transformer_config(cfg, config)
    assert draft.num_moe_experts is None and draft.moe_ffn_hidden_size is None
    assert draft.expert_model_parallel_size == 1 and draft.expert_tensor_parallel_size == 2
    assert draft.ffn_hidden_size == 96 and draft.moe_layer_freq == 1


def test_is_moe_and_num_experts():
    """What the training flags and the SLURM renderer ask: MoE iff the family has MoE layers."""
    from transformers import LlamaConfig, MixtralConfig

    assert moe.is_moe(tiny_moe_config()) and moe.num_experts(tiny_moe_config()) == 8
    all_dense = tiny_moe_config(dense_layers=range(LAYERS))
    assert not moe.is_moe(all_dense) and moe.num_experts(all_dense) is None
    assert moe.num_experts(LlamaConfig(architectures=["LlamaForCausalLM"])) is None
    assert moe.num_experts(MixtralConfig(architectures=["MixtralForCausalLM"])) == 8
    assert moe.num_experts(LlamaConfig(architectures=["OlmoeForCausalLM"])) is None


def test_each_expert_parallel_rank_maps_only_its_experts(tmp_path):
    hf = load_hf_config(tiny_moe_target_dir(tmp_path))
    config = target_transformer_config(hf, expert_model_parallel_size=2)
    family = target_family(hf)
    for rank, experts in ((0, range(0, 4)), (1, range(4, 8))):
        rows = family.weight_rows(config, [3], embedding=False, final_norm=False, output=False,
                                  tied=False, expert_parallel=(rank, 2))
        names = [n for _, hf_names, _ in rows for n in hf_names if ".experts." in n]
        assert sorted({int(n.split(".")[5]) for n in names}) == list(experts)
        local = [name for name, _, _ in rows if ".local_experts." in name]
        assert sorted({int(n.split(".")[6]) for n in local}) == [0, 1, 2, 3]
    dense = family.weight_rows(config, [2], embedding=False, final_norm=False, output=False,
                               tied=False)
    assert "decoder.layers.0.mlp.linear_fc1.weight" in [name for name, _, _ in dense]


# --- errors: one clear error per bad MoE checkpoint or layout, before any model is built ---------

@pytest.fixture
def moe_dir(tmp_path):
    return tiny_moe_target_dir(tmp_path / "moe")


def test_missing_expert_tensor(moe_dir):
    file = f"{moe_dir}/model.safetensors"
    state = load_file(file)
    del state["model.layers.3.mlp.experts.5.up_proj.weight"]
    save_file(state, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"tensor 'model.layers.3.mlp.experts.5.up_proj.weight' "
                                         r"is missing \(expected shape \[32, 64\]\)"):
        load_hf_config(moe_dir)


def test_expert_shape_mismatch(moe_dir):
    edit_config(moe_dir, moe_intermediate_size=16)
    with pytest.raises(ValueError, match=r"tensor 'model.layers.0.mlp.experts.0.gate_proj.weight' "
                                         r"has shape \[32, 64\], config.json implies \[16, 64\]"):
        load_hf_config(moe_dir)


@pytest.mark.parametrize("changes,message", [
    (dict(use_sliding_window=True), "use_sliding_window=True not supported"),
    (dict(num_experts_per_tok=1, norm_topk_prob=True),
     "num_experts_per_tok=1 with norm_topk_prob=True not supported by the mixture-of-experts"),
])
def test_unsupported_moe_feature(moe_dir, changes, message):
    edit_config(moe_dir, **changes)
    with pytest.raises(ValueError, match=message):
        load_hf_config(moe_dir)


def test_experts_not_divisible_by_expert_parallel(moe_dir):
    with pytest.raises(ValueError, match=r"num_experts=8 is not divisible by the expert-parallel "
                                         r"size 3"):
        target_transformer_config(load_hf_config(moe_dir), expert_model_parallel_size=3)


def test_grouped_gemm_needs_transformer_engine(moe_dir, utils):
    utils.initialize_model_parallel(1, 1)
    hf = load_hf_config(moe_dir)
    with pytest.raises(ValueError, match="moe_grouped_gemm needs backend='te'"):
        build_target(hf, target_transformer_config(hf, moe_grouped_gemm=True))


def parse_plan(argv, **kw):
    """The main job's plan, imported only by the flag tests (the import tests need no training
    code)."""
    from megatron_dflash.training.pretrain import parse_plan as parse

    return parse(argv, **kw)


@pytest.fixture
def dense_dir(tmp_path):
    from tests.dflash_testing import tiny_target_dir

    return tiny_target_dir(tmp_path / "dense")


@pytest.mark.parametrize("extra,world,message", [
    (["--expert-model-parallel-size", "3"], 3,
     "--expert-model-parallel-size=3 must divide the target's num_experts=8"),
    (["--expert-model-parallel-size", "2", "--tensor-model-parallel-size", "2"], 2,
     "world size 2 is not divisible by --expert-tensor-parallel-size x "
     "--expert-model-parallel-size x --pipeline-model-parallel-size = 2 x 2 x 1 = 4"),
    (["--expert-model-parallel-size", "4", "--pipeline-model-parallel-size", "2"], 4,
     "world size 4 is not divisible by --expert-tensor-parallel-size x "
     "--expert-model-parallel-size x --pipeline-model-parallel-size = 1 x 4 x 2 = 8"),
    (["--expert-tensor-parallel-size", "3"], 3,
     "--expert-tensor-parallel-size=3 must divide the target's per-expert FFN width 32"),
    (["--expert-model-parallel-size", "0"], 1, "--expert-model-parallel-size=0 must be >= 1"),
    (["--expert-model-parallel-size", "2", "--seq-length-buckets", "2"], 2,
     "--moe-token-dispatcher-type allgather with --seq-length-buckets=2: the expert-parallel "
     "ranks"),
    (["--moe-grouped-gemm"], 1, "--moe-grouped-gemm needs a GPU"),
    (["--moe-token-dispatcher-type", "flex"], 1, "--moe-token-dispatcher-type: invalid choice"),
])
def test_bad_expert_flags_fail_before_any_work(moe_dir, extra, world, message, capsys):
    argv = ["--target", moe_dir, "--mask-token-id", "255", "--global-batch-size", "12"] + extra
    with pytest.raises(SystemExit):
        parse_plan(argv, world_size=world)
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("extra,message", [
    (["--expert-model-parallel-size", "2"], "--expert-model-parallel-size=2: the target"),
    (["--expert-tensor-parallel-size", "1"], "--expert-tensor-parallel-size=1: the target"),
])
def test_expert_flags_refused_for_a_dense_target(dense_dir, extra, message, capsys):
    with pytest.raises(SystemExit):
        parse_plan(["--target", dense_dir, "--mask-token-id", "255", "--global-batch-size", "2"]
                   + extra, world_size=2)
    err = capsys.readouterr().err
    assert message in err and "is dense (no experts); it needs an MoE target" in err, err


def test_good_expert_flags_pass(moe_dir):
    args = parse_plan(["--target", moe_dir, "--mask-token-id", "255", "--global-batch-size", "4",
                       "--expert-model-parallel-size", "2", "--tensor-model-parallel-size", "2",
                       "--moe-token-dispatcher-type", "alltoall", "--seq-length-buckets", "3"],
                      world_size=4)
    assert args.data_parallel_size == 2 and args.run.parallel.expert_model_parallel_size == 2


def test_training_chunk_keeps_the_target_in_eval(moe_dir, tmp_path, utils):
    """`model.train()` (after every held-out evaluation) trains the draft only: megatron's MoE
    layer in training mode would refuse TP without sequence parallelism (and run aux losses)."""
    from tests.dflash_testing import pattern_dataset

    from megatron_dflash.training.builders import build_training_chunk

    data = pattern_dataset(tmp_path / "data", 4, 32)
    args = parse_plan(["--target", moe_dir, "--mask-token-id", "255", "--train-data", data,
                       "--global-batch-size", "1", "--seq-length", "32", "--block-size", "8",
                       "--num-anchors", "4", "--num-draft-layers", "1", "--distill-weight", "0.5"])
    utils.initialize_model_parallel(1, 1)
    model, cfg = build_training_chunk(args, torch.device("cpu")), args.dflash
    model.eval()
    model.train()
    module = model.module
    assert module.draft.training
    assert not any(m.training for m in module.target.modules())
    assert cfg.ffn_hidden_size == 96 and module.draft.config.num_moe_experts is None
