"""Settings that only matter on a GPU, checked where they are decided (the plan, the trainer's
wrapping), since no CPU run can show their effect: fused kernels, FP8 target weights
re-quantised, overlapped gradient reduction, prefetch depth, the routers' fp32 expert bias."""
import pytest
import torch
from safetensors import safe_open

from megatron_dflash import fusions
from megatron_dflash.fp8 import FP8Settings
from megatron_dflash.run.config import RunConfig, TargetArgs
from megatron_dflash.run.plan import resolve_target
from megatron_dflash.training.builders import build_training_chunk
from megatron_dflash.training.pretrain import parse_plan
from megatron_dflash.training.trainer import Trainer
from tests.dflash_testing import pattern_dataset, tiny_deepseek_dir, tiny_target_dir

@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense")
    return tiny_target_dir(root / "target"), pattern_dataset(root / "data", 8, 32)


def test_target_fp8_weights_are_requantised_at_every_forward(dense):
    """megatron resets TE's cached FP8 weights only through the wrapped model's config (the
    draft's): a target in FP8 under a bf16 draft must not cache them, or they would stay
    quantised at the first step's scale; without FP8 the cache is megatron's default."""
    run = RunConfig(target=TargetArgs(target=dense[0]))
    fp8 = resolve_target(run, fp8=FP8Settings("hybrid", "delayed")).config
    assert fp8.fp8 == "hybrid" and fp8.disable_parameter_transpose_cache
    assert not resolve_target(run).config.disable_parameter_transpose_cache


def test_fusions_on_where_the_shapes_allow(dense, monkeypatch):
    """On the CPU no fusion (megatron's fused kernels are GPU ones); the draft's RoPE fusion is
    pinned off everywhere (its per-batch frequencies are not a shape TE's kernel takes), never
    inherited from the target."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the CPU resolution, anywhere
    plan = parse_plan(["--target", dense[0], "--mask-token-id", "255", "--train-data", dense[1]])
    for config in (plan.target.config, plan.draft_config):
        assert not (config.bias_activation_fusion or config.apply_rope_fusion
                    or config.gradient_accumulation_fusion)
    assert fusions.draft_fields("te")["apply_rope_fusion"] is False
    assert fusions.target_fields("te", True, FP8Settings())["apply_rope_fusion"] is False  # MLA
    assert fusions.target_fields("te", False, FP8Settings(),  # packed YaRN: the unfused THD RoPE
                                 packed_yarn=True)["apply_rope_fusion"] is False


def test_grad_reduce_overlaps_and_prefetch_covers_a_step(dense, utils):
    """Megatron DDP reduces gradients during the backward; the prefetcher holds every
    micro-batch of a step plus the next one."""
    plan = parse_plan(["--target", dense[0], "--mask-token-id", "255", "--train-data", dense[1],
                       "--seq-length", "32", "--block-size", "4", "--micro-batch-size", "1",
                       "--global-batch-size", "3", "--train-iters", "1"])
    utils.initialize_model_parallel(1)
    trainer = Trainer(plan)
    assert trainer.model.ddp_config.overlap_grad_reduce
    assert trainer.prefetch_depth == plan.num_microbatches + 1 == 4
    assert len(trainer.train()["losses"]) == 1


def test_bf16_keeps_the_router_expert_bias_in_fp32(tmp_path, utils):
    """Float16Module casts every floating buffer to bf16; the routers' expert bias (HF
    `e_score_correction_bias`, which decides near-tie routing) must stay HF's fp32 values, bit
    for bit."""
    target = tiny_deepseek_dir(tmp_path / "target")
    plan = parse_plan(["--target", target, "--mask-token-id", "255", "--train-data",
                       pattern_dataset(tmp_path / "data", 4, 32), "--bf16", "--distill-weight",
                       "0.5", "--global-batch-size", "1"])
    utils.initialize_model_parallel(1, 1)
    model = build_training_chunk(plan, torch.device("cpu"))
    biases = {name.split("decoder.layers.")[1].split(".")[0]: b
              for name, b in model.named_buffers() if name.endswith("router.expert_bias")}
    assert sorted(biases) == ["1", "2"]
    with safe_open(f"{target}/model.safetensors", framework="pt") as f:
        for layer, bias in biases.items():
            hf = f.get_tensor(f"model.layers.{layer}.mlp.gate.e_score_correction_bias")
            assert bias.dtype == torch.float32 and torch.equal(bias, hf.float()), layer
    assert next(p for p in model.parameters() if p.requires_grad).dtype == torch.bfloat16
