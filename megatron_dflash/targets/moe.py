"""What every mixture-of-experts family shares with megatron-core's own MoE layer.

The MoE layers of the target are megatron's `MoELayer` (TopKRouter, the allgather or alltoall
token dispatcher, SequentialMLP experts — TEGroupedMLP with `moe_grouped_gemm`), laid out by
megatron's expert-parallel groups. `MoEFamily` is the base of the MoE families: a family says
which layers are MoE (`moe_layer_pattern`) and how its router maps (`router_fields`: softmax by
default); this module turns that into megatron's fields — the router as inference runs it
(fp32, no load-balancing loss, no capacity factor: no token is ever dropped, no jitter) and the
expert-parallel layout — and maps one MoE layer's weights for this rank's local experts: the
router (and its expert bias), shared experts split over TP like a dense MLP, and per local expert
fc1 = `[gate; up]` and fc2 = down, each sliced over the expert-tensor-parallel group (an EP rank
reads only its experts, an expert-TP rank only its slices of them).

`save_pretrained` writes one tensor per expert, `model.layers.{i}.mlp.experts.{e}.{gate,up,
down}_proj.weight`; transformers 5 holds them fused in memory, and a checkpoint may store them so
(`mlp.experts.gate_up_proj` [E, 2F, H] = per expert `[gate; up]`, `mlp.experts.down_proj`
[E, H, F]): `fused_expert_views` names each expert's slices of those, read slice by slice.
"""
from __future__ import annotations

import re

from megatron.core.transformer.transformer_config import TransformerConfig
from transformers import PretrainedConfig

from megatron_dflash.targets.families import find_family
from megatron_dflash.targets.family import Row, TargetFamily
from megatron_dflash.targets.hf_checkpoint import View
from megatron_dflash.weights import merge_fc1

TOKEN_DISPATCHERS = ("allgather", "alltoall")
MOE_SCOPE = "by the mixture-of-experts import"

_FUSED = re.compile(r"(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")


def is_moe(hf_config: PretrainedConfig) -> bool:
    """Whether the target has MoE layers (megatron's MoE layer then holds its experts)."""
    family = find_family(hf_config.architectures)
    return isinstance(family, MoEFamily) and any(
        family.moe_layer_pattern(family.text_config(hf_config)))


def num_experts(hf_config: PretrainedConfig) -> int | None:
    """The routed experts of each MoE layer; None for a dense target."""
    if not is_moe(hf_config):
        return None
    family = find_family(hf_config.architectures)
    return family.routed_experts(family.text_config(hf_config))


def expert_ffn_hidden_size(hf_config: PretrainedConfig) -> int:
    """Each routed expert's FFN width of an MoE target (`is_moe`)."""
    family = find_family(hf_config.architectures)
    return family.expert_ffn_hidden_size(family.text_config(hf_config))


def is_moe_layer(config: TransformerConfig, layer_id: int) -> bool:
    """Whether global layer `layer_id` (0-based) of a target config is an MoE layer."""
    if not config.num_moe_experts:
        return False
    freq = config.moe_layer_freq
    if isinstance(freq, int):
        return layer_id % freq == 0
    return bool(freq[layer_id])


def expert_parameter(config: TransformerConfig, j: int, fc: int, kind: str = "weight") -> str:
    """megatron's name of local expert j's linear_fc{fc} `kind` (weight or bias) in an MoE layer:
    SequentialMLP's `local_experts.j.linear_fcN.weight`, TEGroupedMLP's `linear_fcN.weightj`."""
    if config.moe_grouped_gemm:
        return f"mlp.experts.linear_fc{fc}.{kind}{j}"
    return f"mlp.experts.local_experts.{j}.linear_fc{fc}.{kind}"


def local_experts(config: TransformerConfig, ep_rank: int, ep_size: int) -> range:
    """The global ids of the experts expert-parallel rank `ep_rank` holds (megatron's
    contiguous `local_expert_indices`)."""
    per_rank = config.num_moe_experts // ep_size
    return range(ep_rank * per_rank, (ep_rank + 1) * per_rank)


class MoEFamily(TargetFamily):
    """A Llama-shaped family whose MLPs are MoE layers where `moe_layer_pattern` says so (a
    config with none is dense); the router defaults to softmax over all experts, top-k,
    renormalised iff `norm_topk_prob` — megatron's softmax over the top-k logits
    (`moe_router_pre_softmax=False`), else the top-k probabilities as they are (True)."""

    def moe_layer_pattern(self, hf: PretrainedConfig) -> list[int]:
        """Per layer, 1 for an MoE layer and 0 for a dense one (megatron's `moe_layer_freq`)."""
        raise NotImplementedError

    def routed_experts(self, hf: PretrainedConfig) -> int:
        """The routed experts of each MoE layer (HF `num_local_experts`, an alias of Qwen3-MoE's
        `num_experts`; a config without the alias names its own field)."""
        return hf.num_local_experts

    def expert_ffn_hidden_size(self, hf: PretrainedConfig) -> int:
        """Each routed expert's FFN width (HF `moe_intermediate_size`)."""
        return hf.moe_intermediate_size

    def router_fields(self, hf: PretrainedConfig) -> dict:
        """TransformerConfig router and shared-expert fields."""
        return dict(moe_router_score_function="softmax",
                    moe_router_pre_softmax=not hf.norm_topk_prob,
                    moe_router_topk_scaling_factor=None,
                    moe_shared_expert_intermediate_size=None)

    def router_problems(self, hf: PretrainedConfig) -> list[str]:
        if hf.num_experts_per_tok == 1 and hf.norm_topk_prob:
            # Every token's one weight is 1; megatron refuses softmax-after-top-1 (zero gradient).
            return ["num_experts_per_tok=1 with norm_topk_prob=True"]
        return []

    def refusals(self, hf: PretrainedConfig) -> list[tuple[list[str], str]]:
        problems = []
        if any(self.moe_layer_pattern(hf)):
            problems = self.router_problems(hf)
            if not 1 <= hf.num_experts_per_tok <= self.routed_experts(hf):
                problems.append(f"num_experts_per_tok={hf.num_experts_per_tok} (num_experts="
                                f"{self.routed_experts(hf)})")
        return [*super().refusals(hf), (problems, MOE_SCOPE)]

    def moe_fields(self, hf: PretrainedConfig, *, tensor_parallel_size: int,
                   expert_model_parallel_size: int, expert_tensor_parallel_size: int | None,
                   token_dispatcher: str, grouped_gemm: bool) -> dict:
        """Raises ValueError when the layout cannot hold the experts: experts not divisible by
        the expert-parallel size, a per-expert FFN not divisible by the expert-tensor-parallel
        size (default: the tensor-parallel size, as megatron's), or shared experts not divisible
        by the tensor-parallel size."""
        if not any(self.moe_layer_pattern(hf)):
            return super().moe_fields(
                hf, tensor_parallel_size=tensor_parallel_size,
                expert_model_parallel_size=expert_model_parallel_size,
                expert_tensor_parallel_size=expert_tensor_parallel_size,
                token_dispatcher=token_dispatcher, grouped_gemm=grouped_gemm)
        ep = expert_model_parallel_size
        etp = expert_tensor_parallel_size or tensor_parallel_size
        if token_dispatcher not in TOKEN_DISPATCHERS:
            raise ValueError(f"token_dispatcher={token_dispatcher!r} must be one of "
                             f"{TOKEN_DISPATCHERS}")
        experts, ffn = self.routed_experts(hf), self.expert_ffn_hidden_size(hf)
        if ep < 1 or experts % ep:
            raise ValueError(f"num_experts={experts} is not divisible by the expert-parallel size "
                             f"{ep}: every expert-parallel rank holds the same number of experts")
        if etp < 1 or ffn % etp:
            raise ValueError(f"moe_intermediate_size={ffn} is not divisible by the "
                             f"expert-tensor-parallel size {etp}")
        router = self.router_fields(hf)
        shared = router["moe_shared_expert_intermediate_size"]
        if shared and shared % tensor_parallel_size:
            raise ValueError(f"n_shared_experts * moe_intermediate_size = {shared} is not "
                             f"divisible by the tensor-parallel size {tensor_parallel_size}")
        return dict(
            num_moe_experts=experts,
            moe_layer_freq=self.moe_layer_pattern(hf),
            moe_ffn_hidden_size=ffn,
            moe_router_topk=hf.num_experts_per_tok,
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

    def mlp_rows(self, config: TransformerConfig, layer_id: int, *, fused_norms: bool,
                 expert_parallel: tuple[int, int]) -> list[Row]:
        """An MoE layer's pre-MLP norm (a separate module in every spec) and MoE rows."""
        if not is_moe_layer(config, layer_id):
            return super().mlp_rows(config, layer_id, fused_norms=fused_norms,
                                    expert_parallel=expert_parallel)
        return [("pre_mlp_layernorm.weight", ("post_attention_layernorm.weight",), "replicated"),
                *self.moe_rows(config, local_experts(config, *expert_parallel))]

    def moe_rows(self, config: TransformerConfig, experts: range) -> list[Row]:
        """One MoE layer's router (and its expert bias), shared experts, and per local expert j
        the merged `[gate; up]` fc1 and the down fc2 (`expert_parameter`)."""
        rows = [("mlp.router.weight", ("mlp.gate.weight",), "replicated")]
        if config.moe_router_enable_expert_bias:
            rows.append(("mlp.router.expert_bias", ("mlp.gate.e_score_correction_bias",),
                         "replicated"))
        if config.moe_shared_expert_intermediate_size:
            rows += [("mlp.shared_experts.linear_fc1.weight",
                      ("mlp.shared_experts.gate_proj.weight", "mlp.shared_experts.up_proj.weight"),
                      "fc1"),
                     ("mlp.shared_experts.linear_fc2.weight",
                      ("mlp.shared_experts.down_proj.weight",), "rows")]
        for j, e in enumerate(experts):
            fc1, fc2 = (expert_parameter(config, j, n) for n in (1, 2))
            expert = f"mlp.experts.{e}"
            rows += [(fc1, (f"{expert}.gate_proj.weight", f"{expert}.up_proj.weight"),
                      "expert_fc1"),
                     (fc2, (f"{expert}.down_proj.weight",), "expert_rows")]
        return rows

    def hf_shape(self, name: str, config: TransformerConfig, vocab_size: int) -> tuple[int, ...]:
        hidden, ffn = config.hidden_size, config.moe_ffn_hidden_size
        if name.endswith(".mlp.gate.weight"):
            return (config.num_moe_experts, hidden)
        if name.endswith(".mlp.gate.e_score_correction_bias"):
            return (config.num_moe_experts,)
        if ".mlp.shared_experts." in name:
            ffn = config.moe_shared_expert_intermediate_size
        elif ".mlp.experts." not in name:
            return super().hf_shape(name, config, vocab_size)
        return (hidden, ffn) if name.endswith("down_proj.weight") else (ffn, hidden)

    def converters(self, config: TransformerConfig, tp: tuple[int, int],
                   expert_tp: tuple[int, int]) -> dict:
        return super().converters(config, tp, expert_tp) | expert_converters(*expert_tp)

    def tensor_views(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, View]:
        return fused_expert_views(shapes)


class EveryLayerMoEFamily(MoEFamily):
    """MoE in every layer, experts `intermediate_size` wide, the softmax router always
    renormalised over the top-k (Mixtral, gpt-oss: their configs have no `norm_topk_prob`)."""

    def moe_layer_pattern(self, hf: PretrainedConfig) -> list[int]:
        return [1] * hf.num_hidden_layers

    def expert_ffn_hidden_size(self, hf: PretrainedConfig) -> int:
        return hf.intermediate_size

    def router_fields(self, hf: PretrainedConfig) -> dict:
        return dict(moe_router_score_function="softmax", moe_router_pre_softmax=False,
                    moe_router_topk_scaling_factor=None, moe_shared_expert_intermediate_size=None)

    def router_problems(self, hf: PretrainedConfig) -> list[str]:
        if hf.num_experts_per_tok == 1:  # softmax over one logit; megatron refuses it
            return ["num_experts_per_tok=1"]
        return []


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


def fused_expert_views(shapes: dict[str, tuple[int, ...]]) -> dict[str, View]:
    """Per-expert names, as `save_pretrained` writes them, for each expert's slices of fused
    `...mlp.experts.gate_up_proj` [E, 2F, H] (gate: rows [0, F), up: [F, 2F), as
    `chunk(2)` splits them) and `...mlp.experts.down_proj` [E, H, F]."""
    views = {}
    for key, shape in shapes.items():
        match = _FUSED.match(key)
        if match is None:
            continue
        prefix, kind = match.groups()
        for e in range(shape[0]):
            if kind == "down_proj":
                views[f"{prefix}.{e}.down_proj.weight"] = (key, (e,))
            else:
                half = (shape[1] + 1) // 2
                views[f"{prefix}.{e}.gate_proj.weight"] = (key, (e, slice(0, half)))
                views[f"{prefix}.{e}.up_proj.weight"] = (key, (e, slice(half, shape[1])))
    return views
