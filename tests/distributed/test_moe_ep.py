"""Qwen3-MoE targets under expert parallelism (megatron's MoE layer and expert-parallel groups)
composed with TP, SP, PP and DP: everything equals one process. Run with
`torchrun --nproc-per-node 4 -m pytest tests/distributed/test_moe_ep.py`.

* Target: every rank's logits and captured features (taps after MoE layers, on both pipeline
  stages, each stage ending with an MoE layer) equal the single-process import (<= 1e-5, fp32),
  for both of megatron's token dispatchers; data-parallel ranks hold different tokens (and, with
  the alltoall dispatcher, sequences of different lengths), so tokens really travel to other
  ranks' experts. Each rank reads from the safetensors exactly the elements it holds: an
  expert-parallel rank only its experts, an expert-TP rank only its slices of them.
* Training: 20 DFlash steps give the single-process losses and grad norms (<= 1e-5) — the same
  `trajectory` driver as tests/distributed/test_pipeline.py — for Qwen3-MoE at seven layouts
  (one of them context-parallel, CP2 x EP2) and DeepSeek-V3 at PP2 x EP2.
* DeepSeek-V3 (megatron's MLA, sigmoid group-limited router with expert bias, shared experts),
  GLM-4.5 (its router, q/k/v biases, q/k norms, half rotary) and gpt-oss (sinks, sliding windows,
  biases, clamped GLU experts de-quantised from MXFP4 on their expert-parallel rank, YaRN):
  logits and taps at EP2, EP4, TP2 x EP2 with SP and PP2 x EP2 (both dispatchers) equal the
  single-process import; 20 DFlash training steps of gpt-oss at PP2 x EP2 equal one process.

gloo runs both dispatchers: allgather (all_gather_into_tensor / reduce_scatter_tensor over the
expert TP x EP group, equal shapes) and alltoall (all_to_all_single with uneven splits over EP;
its uneven all-gather / reduce-scatter over expert TP, which gloo lacks, through the CPU
adaptations in megatron_dflash/cpu.py).
"""
import math
import os
import shutil
import tempfile

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.moe.moe_layer import MoELayer

from tests.layout_testing import Utils
from tests.dflash_testing import (pattern_dataset, record_checkpoint_reads, tiny_deepseek_dir,
                                  tiny_moe_target_dir)
from tests.families_testing import (glm4_moe_config, gpt_oss_config, perturbed_model,
                                    save_mxfp4)
from megatron_dflash.targets.capture import FeatureCapture, target_forward
from megatron_dflash.targets.hf_import import (build_target, load_hf_config, load_hf_weights,
                                              target_transformer_config)
from tests.pipeline_testing import (STEPS, assert_layout_equals, assert_same_trajectory, flags,
                                    started_references, trajectory)

VOCAB, HIDDEN, BATCH = 256, 64, 2
# Layers 0, 1 and 3 MoE, 2 dense: at PP2 both stages end with an MoE layer.
TAPS = [0, 1, 3]
DISPATCHERS = ("allgather", "alltoall")

TARGET_LAYOUTS = {  # world 4
    "ep2": dict(ep=2),  # x DP4 (expert DP 2)
    "ep4": dict(ep=4),
    "tp2ep2": dict(tp=2, ep=2),  # expert TP 2 = TP
    "tp2ep2_sp": dict(tp=2, ep=2, sp=True),
    "tp2_etp1_ep2": dict(tp=2, ep=2, etp=1),  # the EP group inside the TP group
    "etp2ep2": dict(ep=2, etp=2),  # expert TP across data-parallel ranks
    "pp2ep2": dict(pp=2, ep=2),
}


@pytest.fixture(scope="module")
def shared():
    path = [tempfile.mkdtemp(prefix="dflash_moe_") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(path, src=0)
    if dist.get_rank() == 0:
        tiny_moe_target_dir(os.path.join(path[0], "target"))
        tiny_deepseek_dir(os.path.join(path[0], "deepseek"), num_hidden_layers=4)
        perturbed_model(glm4_moe_config(num_hidden_layers=4, num_nextn_predict_layers=0)
                        ).save_pretrained(os.path.join(path[0], "glm"))
        save_mxfp4(perturbed_model(gpt_oss_config()), os.path.join(path[0], "gpt_oss"))
        for name, count, length in (("long", 24, 48), ("short", 24, 32)):
            pattern_dataset(os.path.join(path[0], name), count, length, seed=length)
    dist.barrier()
    yield path[0]
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(path[0])


def _tokens(dp_rank, uneven):
    """Different tokens per data-parallel rank; `uneven`: also different lengths."""
    seq = 12 if uneven and dp_rank % 2 else 16
    g = torch.Generator().manual_seed(100 + dp_rank)
    return torch.randint(0, VOCAB, (BATCH, seq), generator=g), torch.arange(seq).expand(BATCH, seq)


@pytest.fixture(scope="module")
def reference(shared):
    """The one-process import's logits and features for every data-parallel rank's tokens."""
    Utils.initialize_model_parallel(1, 1)
    path = os.path.join(shared, "target")
    hf = load_hf_config(path)
    model = build_target(hf, target_transformer_config(hf))
    load_hf_weights(model, path)
    out = {}
    for uneven in (False, True):
        for dp in range(4):
            with FeatureCapture(model, TAPS) as capture:
                out[uneven, dp] = target_forward(model, *_tokens(dp, uneven), capture)
    Utils.destroy_model_parallel()
    return out


@pytest.mark.world(4)
@pytest.mark.parametrize("dispatcher", DISPATCHERS)
@pytest.mark.parametrize("layout", list(TARGET_LAYOUTS))
def test_target_layout_equals_one_process(layout, dispatcher, shared, reference, monkeypatch):
    spec = dict(tp=1, pp=1, ep=1, etp=None, sp=False) | TARGET_LAYOUTS[layout]
    opened = record_checkpoint_reads(monkeypatch)
    Utils.initialize_model_parallel(spec["tp"], spec["pp"], ep=spec["ep"], etp=spec["etp"])
    path = os.path.join(shared, "target")
    hf = load_hf_config(path)
    config = target_transformer_config(
        hf, tensor_parallel_size=spec["tp"], sequence_parallel=spec["sp"],
        pipeline_parallel_size=spec["pp"], expert_model_parallel_size=spec["ep"],
        expert_tensor_parallel_size=spec["etp"], moe_token_dispatcher_type=dispatcher)
    model = build_target(hf, config)
    load_hf_weights(model, path)
    _, load = opened  # the header check of load_hf_config, then the load
    assert load.elements_read == sum(p.numel() for p in model.parameters())
    expert_reads = sum(math.prod(s) for k, s in load.shapes.items() if ".experts." in k)
    ep, etp = spec["ep"], spec["etp"] or spec["tp"]
    held = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    moe_layers = sum(isinstance(layer.mlp, MoELayer) for layer in model.decoder.layers)
    assert held * 3 * ep * etp == expert_reads * moe_layers  # its experts' slices, of its layers

    dp = parallel_state.get_data_parallel_rank()
    uneven = dispatcher == "alltoall"  # different lengths on the ranks of an expert group
    # At PP2 each stage ends with an MoE layer: taps 0, 1 on the first, 3 on the last.
    assert_layout_equals(model, spec, TAPS, _tokens(dp, uneven), *reference[uneven, dp],
                         first_stage_taps=2)
    Utils.destroy_model_parallel()


# After layer 0 and the MoE layers 1 and 3 (each stage's last); DeepSeek-V3's and GLM's layer 0
# is dense, gpt-oss's every layer MoE (layer 0 sliding, 1 full).
FAMILY_TAPS = [0, 1, 3]
FAMILY_LAYOUTS = {  # world 4
    "ep2_allgather": dict(ep=2),  # x DP4 (expert DP 2)
    "ep4_alltoall": dict(ep=4),
    "tp2ep2_sp_alltoall": dict(tp=2, ep=2, sp=True),  # x DP2
    "pp2ep2_allgather": dict(pp=2, ep=2),  # x DP2
    "pp2ep2_alltoall": dict(pp=2, ep=2),
}
FAMILIES = ("deepseek", "glm", "gpt_oss")


@pytest.fixture(scope="module")
def family_references(shared):
    """Per family: the one-process import's (logits, features) for every data-parallel rank's
    tokens, even and uneven lengths."""
    Utils.initialize_model_parallel(1, 1)
    out = {}
    for family in FAMILIES:
        path = os.path.join(shared, family)
        hf = load_hf_config(path)
        model = build_target(hf, target_transformer_config(hf))
        load_hf_weights(model, path)
        for uneven in (False, True):
            for dp in range(4):
                with FeatureCapture(model, FAMILY_TAPS) as capture:
                    out[family, uneven, dp] = target_forward(model, *_tokens(dp, uneven),
                                                             capture)
    Utils.destroy_model_parallel()
    return out


@pytest.mark.world(4)
@pytest.mark.parametrize("layout", list(FAMILY_LAYOUTS))
@pytest.mark.parametrize("family", FAMILIES)
def test_family_layout_equals_one_process(family, layout, shared, family_references,
                                          monkeypatch):
    """Every family's own pieces at every layout: logits and taps equal the one-process import;
    gpt-oss's expert-parallel ranks read (and de-quantise) only their experts' MXFP4 blocks."""
    path = os.path.join(shared, family)
    spec = dict(tp=1, pp=1, ep=1, sp=False) | FAMILY_LAYOUTS[layout]
    dispatcher = layout.rsplit("_", 1)[1]
    etp = 1 if family == "gpt_oss" else None  # biased experts: whole (expert-TP 1)
    opened = record_checkpoint_reads(monkeypatch)
    Utils.initialize_model_parallel(spec["tp"], spec["pp"], ep=spec["ep"], etp=etp)
    hf = load_hf_config(path)
    model = build_target(hf, target_transformer_config(
        hf, tensor_parallel_size=spec["tp"], sequence_parallel=spec["sp"],
        pipeline_parallel_size=spec["pp"], expert_model_parallel_size=spec["ep"],
        expert_tensor_parallel_size=etp, moe_token_dispatcher_type=dispatcher))
    load_hf_weights(model, path)
    if family == "gpt_oss":  # expert weights: 4 bits + one 8-bit scale per 32 values read
        params = dict(model.named_parameters())
        quantized = sum(p.numel() for n, p in params.items()
                        if ".experts." in n and n.endswith(".weight"))
        assert opened[-1].elements_read == (sum(p.numel() for p in params.values())
                                            - quantized + quantized * 17 // 32)
    dp = parallel_state.get_data_parallel_rank()
    uneven = dispatcher == "alltoall"
    assert_layout_equals(model, spec, FAMILY_TAPS, _tokens(dp, uneven),
                         *family_references[family, uneven, dp], first_stage_taps=2)
    Utils.destroy_model_parallel()


# --- 20 DFlash training steps: the single-process trajectory -------------------------------------

TRAIN_LAYOUTS = {  # world 4: flags (the reference: the same target and seq_length_buckets)
    "ep2_allgather": dict(expert_model_parallel_size=2, seq_length_buckets=1),
    "ep2_alltoall": dict(expert_model_parallel_size=2, moe_token_dispatcher_type="alltoall"),
    "tp2ep2_sp_allgather": dict(tensor_model_parallel_size=2, expert_model_parallel_size=2,
                                sequence_parallel=True, seq_length_buckets=1),
    "tp2_etp1_ep2_allgather": dict(tensor_model_parallel_size=2, expert_model_parallel_size=2,
                                   expert_tensor_parallel_size=1),
    "pp2ep2_allgather": dict(pipeline_model_parallel_size=2, expert_model_parallel_size=2,
                             seq_length_buckets=1),
    "pp2ep2_alltoall": dict(pipeline_model_parallel_size=2, expert_model_parallel_size=2,
                            moe_token_dispatcher_type="alltoall"),
    # Context parallelism: CP ranks' different tokens go to the same experts (CP is folded
    # into expert-DP).
    "cp2ep2_alltoall": dict(context_parallel_size=2, expert_model_parallel_size=2,
                            moe_token_dispatcher_type="alltoall"),
    "deepseek_pp2ep2_alltoall": dict(target="deepseek", pipeline_model_parallel_size=2,
                                     expert_model_parallel_size=2,
                                     moe_token_dispatcher_type="alltoall"),
    "gpt_oss_pp2ep2_alltoall": dict(target="gpt_oss", pipeline_model_parallel_size=2,
                                    expert_model_parallel_size=2, expert_tensor_parallel_size=1,
                                    moe_token_dispatcher_type="alltoall"),
}


def _flags(shared, target="target", **kw):
    return flags(os.path.join(shared, target),
                 [os.path.join(shared, "long"), os.path.join(shared, "short")],
                 target_layer_ids=TAPS, **kw)


def _reference_key(kw: dict) -> tuple[str, int]:
    return kw.get("target", "target"), kw.get("seq_length_buckets", 3)


@pytest.fixture(scope="module", autouse=True)
def train_references(shared):
    """The single-process trajectories the training layouts compare with, started with the module
    so that they run beside the target tests above."""
    keys = sorted({_reference_key(kw) for kw in TRAIN_LAYOUTS.values()})
    wanted = {"%s/%d" % key: (_flags(shared, key[0], seq_length_buckets=key[1]), STEPS)
              for key in keys}
    with started_references(shared, wanted) as refs:
        yield refs


@pytest.mark.world(4)
@pytest.mark.parametrize("layout", list(TRAIN_LAYOUTS))
def test_training_layout_equals_one_process(layout, shared, train_references):
    kw = dict(TRAIN_LAYOUTS[layout])
    got = trajectory(_flags(shared, **kw))
    reference = train_references.get("%s/%d" % _reference_key(kw))
    assert got["lengths"] == ([48] if kw.get("seq_length_buckets") == 1 else [32, 48])
    assert_same_trajectory(got, reference)
    assert reference["loss"][-1] < 0.9 * reference["loss"][0]
