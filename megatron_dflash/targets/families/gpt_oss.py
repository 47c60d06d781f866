"""gpt-oss targets (transformers `GptOssForCausalLM`, 20b and 120b) on megatron's own layers.

Attention: GQA with biases on q/k/v/o (`add_bias_linear`), per-head attention sinks
(`self_attn.sinks`: an extra logit in each softmax's denominator, megatron's
`softmax_type='learnable'` whose `softmax_offset` is split over TP by head), and the layers
`layer_types` marks sliding (even ones, window 128) attend to a window (`sliding_window`); YaRN
RoPE with `truncate=False` (`rope`).
MoE in every layer: a biased router, softmax over the top-k logits (`moe_router_pre_softmax=
False`); experts with biases and a clamped SwiGLU, out = (clamp(u, ±c) + 1) · g·σ(1.702 g) with
g = min(g, c) — megatron's `quick_gelu` with `glu_linear_offset=1`, `activation_func_clamp_value
= swiglu_limit`. HF's fused `gate_up_proj` interleaves gate and up (rows 0::2 / 1::2 of the
de-quantised [2F, H]): megatron's fc1 is `[gate; up]`, so each expert-TP rank reads its contiguous
2F/TP rows and de-interleaves them.
On disk the experts are MXFP4 (`mlp.experts.{gate_up,down}_proj_{blocks,scales}`, `mxfp4`) or,
re-saved by transformers, [E, in, out] tensors (`gate_up_proj` [E, H, 2F], `down_proj` [E, F, H]);
both are read through per-expert views (`hf_checkpoint.Decoded`), so an expert-parallel rank
reads and de-quantises only its experts.
"""
import torch
from megatron.core.fusions.fused_bias_geglu import quick_gelu

from megatron_dflash.targets import mxfp4
from megatron_dflash.targets.family import quant_method
from megatron_dflash.targets.hf_checkpoint import Decoded
from megatron_dflash.targets.moe import EveryLayerMoEFamily, expert_parameter, local_experts
from megatron_dflash.targets.sliding_window import window_fields, window_problems

SCOPE = ("by the gpt-oss import (megatron's sinks, sliding window, biased router and clamped "
         "quick-GELU GLU experts; MXFP4 or unquantized experts)")
QUICK_GELU_ALPHA = 1.702


class GptOss(EveryLayerMoEFamily):
    architectures = ("GptOssForCausalLM",)
    supported_features = ("attention_bias", "layer_types", "quantization_config")

    def refusals(self, hf):
        found = window_problems(hf)
        method = quant_method(hf)
        if method not in (None, "mxfp4"):
            found.append(f"quantization_config (quant_method={method!r}; supported: mxfp4)")
        if hf.swiglu_alpha != QUICK_GELU_ALPHA:
            found.append(f"swiglu_alpha={hf.swiglu_alpha} (megatron's quick_gelu has "
                         f"{QUICK_GELU_ALPHA})")
        if not hf.attention_bias:
            found.append("attention_bias=False")
        return [*super().refusals(hf), (found, SCOPE)]

    def transformer_fields(self, hf):
        return super().transformer_fields(hf) | dict(
            add_bias_linear=True,
            add_qkv_bias=True,
            softmax_type="learnable",
            activation_func=quick_gelu,
            glu_linear_offset=1.0,
            activation_func_clamp_value=float(hf.swiglu_limit),
            **window_fields(hf),
        )

    def moe_fields(self, hf, *, tensor_parallel_size, expert_model_parallel_size,
                   expert_tensor_parallel_size, token_dispatcher, grouped_gemm):
        """Expert-TP 1: megatron's MoE layer takes biased experts only whole."""
        etp = expert_tensor_parallel_size or tensor_parallel_size
        if etp != 1:
            raise ValueError(f"expert_tensor_parallel_size={etp} (default: the tensor-parallel "
                             "size): gpt-oss's experts have biases, which megatron's MoE layer "
                             "takes only whole; set it to 1")
        return super().moe_fields(
            hf, tensor_parallel_size=tensor_parallel_size,
            expert_model_parallel_size=expert_model_parallel_size,
            expert_tensor_parallel_size=1, token_dispatcher=token_dispatcher,
            grouped_gemm=grouped_gemm)

    def attention_rows(self, config, fused_norms):
        return super().attention_rows(config, fused_norms) + [
            ("self_attention.linear_proj.bias", ("self_attn.o_proj.bias",), "replicated"),
            ("self_attention.core_attention.softmax_offset", ("self_attn.sinks",), "columns")]

    def mlp_rows(self, config, layer_id, *, fused_norms, expert_parallel):
        """Every layer's MoE: the biased router and, per local expert, the biased fc1 (from the
        interleaved gate_up, `interleaved_fc1`) and fc2 (SequentialMLP or TEGroupedMLP names)."""
        rows = [("pre_mlp_layernorm.weight", ("post_attention_layernorm.weight",), "replicated"),
                ("mlp.router.weight", ("mlp.router.weight",), "replicated"),
                ("mlp.router.bias", ("mlp.router.bias",), "replicated")]
        for j, e in enumerate(local_experts(config, *expert_parallel)):
            expert = f"mlp.experts.{e}."
            rows += [(expert_parameter(config, j, 1), (expert + "gate_up_proj",),
                      "interleaved_fc1"),
                     (expert_parameter(config, j, 1, "bias"), (expert + "gate_up_proj_bias",),
                      "interleaved_fc1"),
                     (expert_parameter(config, j, 2), (expert + "down_proj",), "expert_rows"),
                     (expert_parameter(config, j, 2, "bias"), (expert + "down_proj_bias",),
                      "replicated")]
        return rows

    def hf_shape(self, name, config, vocab_size):
        hidden, ffn = config.hidden_size, config.moe_ffn_hidden_size
        experts = config.num_moe_experts
        last = ".".join(name.split(".")[-2:])
        shapes = {"self_attn.sinks": (config.num_attention_heads,), "o_proj.bias": (hidden,),
                  "router.weight": (experts, hidden), "router.bias": (experts,)}
        if ".mlp.experts." in name:
            shapes = {"gate_up_proj": (2 * ffn, hidden), "gate_up_proj_bias": (2 * ffn,),
                      "down_proj": (hidden, ffn), "down_proj_bias": (hidden,)}
            return shapes[name.rsplit(".", 1)[1]]
        return shapes[last] if last in shapes else super().hf_shape(name, config, vocab_size)

    def converters(self, config, tp, expert_tp):
        rank, size = expert_tp

        def interleaved_fc1(checkpoint, key):
            # This rank's contiguous rows hold its gate and up slices, interleaved.
            return deinterleave(checkpoint.get_shard(key, 0, rank, size))

        return super().converters(config, tp, expert_tp) | {"interleaved_fc1": interleaved_fc1}

    def tensor_views(self, shapes):
        """Per expert e of each layer's fused experts: `mlp.experts.{e}.gate_up_proj` [2F, H]
        (rows interleaved), `.down_proj` [H, F] (megatron's orientation) and their biases."""
        views = {}
        for key, shape in shapes.items():
            prefix, _, kind = key.rpartition(".mlp.experts.")
            if not prefix:
                continue
            for e in range(shape[0]):
                expert = f"{prefix}.mlp.experts.{e}."
                if kind in ("gate_up_proj_blocks", "down_proj_blocks"):
                    name = key.removesuffix("_blocks")
                    views[expert + kind.removesuffix("_blocks")] = mxfp4.expert_view(
                        name, e, mxfp4.stored_shape(shape)[1:])
                elif kind in ("gate_up_proj", "down_proj"):
                    views[expert + kind] = transposed_view(key, e, (shape[2], shape[1]))
                elif kind in ("gate_up_proj_bias", "down_proj_bias"):
                    views[expert + kind] = (key, (e,))
        return views


def deinterleave(rows: torch.Tensor) -> torch.Tensor:
    """[gate; up] of rows (or a bias) whose gate and up entries alternate."""
    return torch.cat([rows[0::2], rows[1::2]])


def transposed_view(key: str, expert: int, shape: tuple[int, int]) -> Decoded:
    """Expert `expert` of a stored [E, C, R] tensor as the [R, C] tensor it holds transposed."""
    def read(raw, index):
        rows, cols = index
        return raw(key, (expert, cols, rows)).t()

    return Decoded(shape, (key,), read)


FAMILY = GptOss()
