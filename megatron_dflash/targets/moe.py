"""Mixture-of-experts targets (Qwen3-MoE, DeepSeek-V3) on megatron-core's own MoE layer.

The MoE layers of the target are megatron's `MoELayer` (TopKRouter, the allgather or alltoall
token dispatcher, SequentialMLP experts — TEGroupedMLP with `moe_grouped_gemm`), laid out by
megatron's expert-parallel groups; this module only says how a HF config and its tensors map
onto them:

* `moe_transformer_fields`: the TransformerConfig fields of the MoE layers — experts, top-k,
  per-expert FFN size, which layers are MoE (`moe_layer_freq` as a per-layer list), the router
  as inference runs it (softmax, top-k, fp32, no load-balancing loss, no capacity factor: no
  token is ever dropped, no jitter), and the expert-parallel layout.
* `moe_layer_rows`: the weight mapping of one MoE layer's MLP for this rank's local experts:
  the router, and per local expert fc1 = `[gate; up]` and fc2 = down, each sliced over the
  expert-tensor-parallel group (an EP rank reads only its experts, an expert-TP rank only its
  slices of them).

Qwen3-MoE (transformers `Qwen3MoeForCausalLM`): layer i is MoE iff `i not in mlp_only_layers`,
`num_experts > 0` and `(i + 1) % decoder_sparse_step == 0`, else a dense SwiGLU MLP of
`intermediate_size`. The router takes softmax over all experts, keeps the top
`num_experts_per_tok` and, with `norm_topk_prob`, renormalises them — which is megatron's
softmax over the top-k logits (`moe_router_pre_softmax=False`); without it the top-k
probabilities are used as they are (`moe_router_pre_softmax=True`). There is no shared expert.

DeepSeek-V3 (`DeepseekV3ForCausalLM`): its layer pattern, sigmoid router with the
`e_score_correction_bias` (megatron's router `expert_bias` buffer), group-limited top-k and shared
experts are in `target.deepseek_v3`; its shared experts (`mlp.shared_experts.*`, one SwiGLU) are
split over the tensor-parallel group like a dense MLP.

On disk (and as `save_pretrained` writes it) each expert has its own tensors,
`model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight`; transformers 5 holds them fused
in memory (`mlp.experts.gate_up_proj` [E, 2F, H], `mlp.experts.down_proj` [E, H, F]), which
`per_expert_state_dict` turns into per-expert views so an in-memory state dict loads the same.
"""
from __future__ import annotations

import re
from typing import Mapping

import torch
from megatron.core.transformer.transformer_config import TransformerConfig
from transformers import PretrainedConfig

from megatron_dflash.targets import deepseek_v3
from megatron_dflash.weights import merge_fc1

MOE_ARCHITECTURES = ("Qwen3MoeForCausalLM", deepseek_v3.ARCHITECTURE)
TOKEN_DISPATCHERS = ("allgather", "alltoall")

_FUSED = re.compile(r"(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")


def is_moe(hf_config: PretrainedConfig) -> bool:
    """Whether the target has MoE layers (megatron's MoE layer then holds its experts)."""
    return (hf_config.architectures or [None])[0] in MOE_ARCHITECTURES \
        and any(moe_layer_pattern(hf_config))


def num_experts(hf_config: PretrainedConfig) -> int | None:
    """The routed experts of each MoE layer; None for a dense target."""
    return hf_config.num_local_experts if is_moe(hf_config) else None


def moe_layer_pattern(hf_config: PretrainedConfig) -> list[int]:
    """Per layer, 1 for an MoE layer and 0 for a dense one (megatron's `moe_layer_freq` list)."""
    if deepseek_v3.is_deepseek_v3(hf_config):
        return deepseek_v3.moe_layer_pattern(hf_config)
    n = hf_config.num_hidden_layers
    experts = getattr(hf_config, "num_experts", 0) or 0
    dense = set(getattr(hf_config, "mlp_only_layers", None) or [])
    step = getattr(hf_config, "decoder_sparse_step", 1) or 1
    return [int(i not in dense and experts > 0 and (i + 1) % step == 0) for i in range(n)]


def check_moe_hf_config(hf_config: PretrainedConfig) -> list[str]:
    """The features of an MoE config that the import does not cover (empty when it does)."""
    problems = []
    if getattr(hf_config, "use_sliding_window", False):
        problems.append("use_sliding_window=True")
    if not is_moe(hf_config):
        return problems
    softmax = not deepseek_v3.is_deepseek_v3(hf_config)  # DeepSeek's router: deepseek_v3
    if softmax and hf_config.num_experts_per_tok == 1 and hf_config.norm_topk_prob:
        # Every token's one weight is 1; megatron refuses softmax-after-top-1 (zero gradient).
        problems.append("num_experts_per_tok=1 with norm_topk_prob=True")
    if not 1 <= hf_config.num_experts_per_tok <= hf_config.num_local_experts:
        problems.append(f"num_experts_per_tok={hf_config.num_experts_per_tok} (num_experts="
                        f"{hf_config.num_local_experts})")
    return problems


def moe_transformer_fields(hf_config: PretrainedConfig, *, tensor_parallel_size: int = 1,
                           expert_model_parallel_size: int = 1,
                           expert_tensor_parallel_size: int | None = None,
                           token_dispatcher: str = "allgather",
                           grouped_gemm: bool = False) -> dict:
    """The TransformerConfig fields of the target's MoE layers (none for a dense target).

    Raises ValueError when the layout cannot hold the experts: expert parallelism on a dense
    target, experts not divisible by the expert-parallel size, a per-expert FFN not divisible
    by the expert-tensor-parallel size (default: the tensor-parallel size, as megatron's), or
    shared experts not divisible by the tensor-parallel size.
    """
    ep, etp = expert_model_parallel_size, expert_tensor_parallel_size or tensor_parallel_size
    if not is_moe(hf_config):
        if ep > 1:
            raise ValueError(f"expert_model_parallel_size={ep}: the target is dense (no "
                             "experts); expert parallelism needs an MoE target")
        return {}
    if token_dispatcher not in TOKEN_DISPATCHERS:
        raise ValueError(f"token_dispatcher={token_dispatcher!r} must be one of "
                         f"{TOKEN_DISPATCHERS}")
    experts, ffn = hf_config.num_local_experts, hf_config.moe_intermediate_size
    if ep < 1 or experts % ep:
        raise ValueError(f"num_experts={experts} is not divisible by the expert-parallel size "
                         f"{ep}: every expert-parallel rank holds the same number of experts")
    if etp < 1 or ffn % etp:
        raise ValueError(f"moe_intermediate_size={ffn} is not divisible by the "
                         f"expert-tensor-parallel size {etp}")
    router = (deepseek_v3.router_fields(hf_config) if deepseek_v3.is_deepseek_v3(hf_config) else
              dict(moe_router_score_function="softmax",
                   moe_router_pre_softmax=not hf_config.norm_topk_prob,
                   moe_router_topk_scaling_factor=None,
                   moe_shared_expert_intermediate_size=None))
    shared = router["moe_shared_expert_intermediate_size"]
    if shared and shared % tensor_parallel_size:
        raise ValueError(f"n_shared_experts * moe_intermediate_size = {shared} is not divisible "
                         f"by the tensor-parallel size {tensor_parallel_size}")
    return dict(
        num_moe_experts=experts,
        moe_layer_freq=moe_layer_pattern(hf_config),
        moe_ffn_hidden_size=ffn,
        moe_router_topk=hf_config.num_experts_per_tok,
        moe_router_dtype="fp32",
        # Frozen, used as at inference: no load-balancing loss, no capacity (no token dropped).
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_z_loss_coeff=None,
        moe_input_jitter_eps=None,
        moe_expert_capacity_factor=None,
        moe_token_dispatcher_type=token_dispatcher,
        moe_grouped_gemm=grouped_gemm,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
        **router,
    )


def is_moe_layer(config: TransformerConfig, layer_id: int) -> bool:
    """Whether global layer `layer_id` (0-based) of a target config is an MoE layer."""
    if not config.num_moe_experts:
        return False
    freq = config.moe_layer_freq
    if isinstance(freq, int):
        return layer_id % freq == 0
    return bool(freq[layer_id])


def local_experts(config: TransformerConfig, ep_rank: int, ep_size: int) -> range:
    """The global ids of the experts expert-parallel rank `ep_rank` holds (megatron's
    contiguous `local_expert_indices`)."""
    per_rank = config.num_moe_experts // ep_size
    return range(ep_rank * per_rank, (ep_rank + 1) * per_rank)


def moe_layer_rows(config: TransformerConfig, local: int, layer_id: int,
                   experts: range) -> list[tuple[str, tuple, str]]:
    """(megatron parameter, HF tensors, conversion) of MoE layer `layer_id`'s MLP (at local index
    `local` of the decoder) for the local experts `experts`: the router (and its expert bias),
    the shared experts, and per local expert j the merged `[gate; up]` fc1 and the down fc2
    (SequentialMLP `local_experts.j.linear_fcN.weight`, TEGroupedMLP `linear_fcN.weightj`)."""
    hf = f"model.layers.{layer_id}.mlp"
    mg = f"decoder.layers.{local}.mlp"
    rows = [(f"{mg}.router.weight", (f"{hf}.gate.weight",), "replicated")]
    if config.moe_router_enable_expert_bias:
        rows.append((f"{mg}.router.expert_bias", (f"{hf}.gate.e_score_correction_bias",),
                     "replicated"))
    if config.moe_shared_expert_intermediate_size:
        shared = f"{hf}.shared_experts"
        rows += [(f"{mg}.shared_experts.linear_fc1.weight",
                  (f"{shared}.gate_proj.weight", f"{shared}.up_proj.weight"), "fc1"),
                 (f"{mg}.shared_experts.linear_fc2.weight", (f"{shared}.down_proj.weight",),
                  "rows")]
    for j, e in enumerate(experts):
        fc1, fc2 = ((f"{mg}.experts.linear_fc{n}.weight{j}" for n in (1, 2))
                    if config.moe_grouped_gemm else
                    (f"{mg}.experts.local_experts.{j}.linear_fc{n}.weight" for n in (1, 2)))
        expert = f"{hf}.experts.{e}"
        rows += [(fc1, (f"{expert}.gate_proj.weight", f"{expert}.up_proj.weight"), "expert_fc1"),
                 (fc2, (f"{expert}.down_proj.weight",), "expert_rows")]
    return rows


def hf_shape(name: str, config: TransformerConfig) -> tuple[int, ...] | None:
    """The shape of an MoE tensor (router, expert bias, shared or routed expert) from the config;
    None for other tensors."""
    hidden, ffn = config.hidden_size, config.moe_ffn_hidden_size
    if name.endswith(".mlp.gate.weight"):
        return (config.num_moe_experts, hidden)
    if name.endswith(".mlp.gate.e_score_correction_bias"):
        return (config.num_moe_experts,)
    if ".mlp.shared_experts." in name:
        ffn = config.moe_shared_expert_intermediate_size
        return (hidden, ffn) if name.endswith("down_proj.weight") else (ffn, hidden)
    if ".mlp.experts." in name:
        return (hidden, ffn) if name.endswith("down_proj.weight") else (ffn, hidden)
    return None


def expert_converters(rank: int, size: int) -> dict:
    """(checkpoint, HF tensors) -> this expert-tensor-parallel rank's expert tensor: fc1
    `[gate_r; up_r]` and fc2's column slice, each read slice by slice."""
    def columns(checkpoint, key):
        return checkpoint.get_shard(key, 0, rank, size)

    return {
        "expert_fc1": lambda checkpoint, gate, up: merge_fc1(columns(checkpoint, gate),
                                                             columns(checkpoint, up)),
        "expert_rows": lambda checkpoint, key: checkpoint.get_shard(key, 1, rank, size),
    }


def per_expert_state_dict(state_dict: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """`state_dict` with transformers 5's fused expert tensors (`...mlp.experts.gate_up_proj`
    [E, 2F, H] = per expert `[gate; up]`, `...mlp.experts.down_proj` [E, H, F]) as per-expert
    views named as on disk; unchanged (the same object) when there are none."""
    if not any(_FUSED.match(k) for k in state_dict):
        return state_dict
    out = {}
    for key, tensor in state_dict.items():
        match = _FUSED.match(key)
        if match is None:
            out[key] = tensor
            continue
        prefix, kind = match.groups()
        for e in range(tensor.shape[0]):
            if kind == "down_proj":
                out[f"{prefix}.{e}.down_proj.weight"] = tensor[e]
            else:
                gate, up = tensor[e].chunk(2, dim=0)
                out[f"{prefix}.{e}.gate_proj.weight"] = gate
                out[f"{prefix}.{e}.up_proj.weight"] = up
    return out
