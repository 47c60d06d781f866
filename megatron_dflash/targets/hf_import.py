"""Load a Hugging Face Llama / Qwen2 / Qwen3 / Qwen3-MoE / DeepSeek-V3 checkpoint into a frozen
megatron-core `GPTModel` (MoE layers: megatron's own MoE layer, any expert-parallel layout,
`target.moe`; DeepSeek-V3: megatron's multi-latent attention, `target.deepseek_v3`).

    hf = load_hf_config(path)                       # validates config.json and every tensor header
    config = target_transformer_config(hf, tensor_parallel_size=tp, sequence_parallel=sp)
    model = build_target(hf, config)                # this pipeline stage's layers only, frozen
    load_hf_weights(model, path)                    # this TP rank's slices of this stage's tensors

A bad checkpoint (no config.json, unsupported architecture or feature, no safetensors, a missing
tensor or a wrong shape) fails in `load_hf_config` with one error naming the file or tensor,
before any model exists: it reads only `config.json` and the safetensors headers.
"""
from __future__ import annotations

import contextlib
import functools
import json
from dataclasses import replace
from pathlib import Path
from typing import Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.pipeline_parallel.utils import is_pp_first_stage, is_pp_last_stage
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig
from megatron.core.utils import get_pg_rank, get_pg_size
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig

from megatron_dflash.layers import LocalRMSNorm, _check_backend, _te
from megatron_dflash.targets import deepseek_v3, moe
from megatron_dflash.targets.sdpa_attention import SDPACoreAttention
from megatron_dflash.weights import (check_qkv_groups, merge_fc1, merge_qkv, shard_columns,
                                     shard_range)

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                           *moe.MOE_ARCHITECTURES)
CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"

# Names of the input / pre-MLP norms when TE fuses them into linear_qkv / linear_fc1 (MLA: the
# input norm stays, the q / kv latent norms go into the up projections).
_TE_FUSED_NORMS = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
                   "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}
_TE_FUSED_NORMS_MLA = {"pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
                       **deepseek_v3.TE_FUSED_NORMS}


def load_hf_config(path: str | Path) -> PretrainedConfig:
    """Read `path/config.json` and check that the checkpoint can be imported.

    Checks, in order: config.json exists; the architecture and its features are supported
    (`target_transformer_config`); safetensors files exist (one file, several, or an index and
    its shards); every tensor the model needs is present with the shape config.json implies.
    Only headers are read. Raises FileNotFoundError or ValueError naming the file or tensor.
    A DeepSeek-V3 checkpoint's multi-token-prediction layers are skipped (said once).
    """
    path = Path(path)
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: not found; expected a Hugging Face checkpoint "
                                "directory (config.json + safetensors)")
    _check_architecture(json.loads(config_file.read_text()).get("architectures"), config_file)
    hf_config = AutoConfig.from_pretrained(path)
    config = target_transformer_config(hf_config)
    with _Checkpoint(path) as checkpoint:
        checkpoint.check(_hf_shapes(
            _mapping(config, range(config.num_layers), embedding=True, final_norm=True,
                     output=True, tied=hf_config.tie_word_embeddings),
            config, hf_config.vocab_size))
    if deepseek_v3.is_deepseek_v3(hf_config) and deepseek_v3.mtp_layer_ids(hf_config):
        ids = deepseek_v3.mtp_layer_ids(hf_config)
        _say_once(f"{config_file}: skipping {len(ids)} multi-token-prediction layer(s) "
                  f"(num_nextn_predict_layers={len(ids)}, model.layers.{ids[0]}"
                  f"{f'..{ids[-1]}' if len(ids) > 1 else ''}): not part of the target")
    return hf_config


def target_transformer_config(hf_config: PretrainedConfig, *, tensor_parallel_size: int = 1,
                              sequence_parallel: bool = False,
                              params_dtype: torch.dtype = torch.float32,
                              pipeline_parallel_size: int = 1,
                              expert_model_parallel_size: int = 1,
                              expert_tensor_parallel_size: int | None = None,
                              moe_token_dispatcher_type: str = "allgather",
                              moe_grouped_gemm: bool = False, **overrides) -> TransformerConfig:
    """The megatron TransformerConfig of a HF Llama / Qwen2 / Qwen3 / Qwen3-MoE / DeepSeek-V3
    config.

    Pre-norm RMSNorm layers, SwiGLU, GQA with `kv_channels=head_dim`, no linear biases (Qwen2:
    q/k/v biases), q/k RMSNorm for Qwen3 and Qwen3-MoE, no dropout. DeepSeek-V3: an
    MLATransformerConfig (multi-latent attention and its rotary embedding, `deepseek_v3`).
    Weights are allocated on the CPU and not initialised (`load_hf_weights` overwrites every
    parameter). `ffn_hidden_size` is always the dense `intermediate_size`; an MoE target adds
    megatron's MoE fields and its expert-parallel layout (`moe.moe_transformer_fields`).
    `overrides` go to the config.
    """
    arch = _check_hf_config(hf_config)
    if hf_config.vocab_size % tensor_parallel_size:
        raise ValueError(f"vocab_size={hf_config.vocab_size} is not divisible by the "
                         f"tensor-parallel size {tensor_parallel_size}; the vocabulary is not "
                         "padded, pick a TP size that divides it")
    fields = dict(
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        ffn_hidden_size=hf_config.intermediate_size,
        num_attention_heads=hf_config.num_attention_heads,
        num_query_groups=hf_config.num_key_value_heads,
        kv_channels=_head_dim(hf_config),
        layernorm_epsilon=hf_config.rms_norm_eps,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch == "Qwen2ForCausalLM",
        qk_layernorm=arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tensor_parallel_size,
        sequence_parallel=sequence_parallel,
        pipeline_model_parallel_size=pipeline_parallel_size,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=True,
        perform_initialization=False,
    )
    config_class = TransformerConfig
    if deepseek_v3.is_deepseek_v3(hf_config):
        config_class = MLATransformerConfig
        fields |= deepseek_v3.attention_fields(hf_config)
    return config_class(
        **fields,
        **moe.moe_transformer_fields(
            hf_config, tensor_parallel_size=tensor_parallel_size,
            expert_model_parallel_size=expert_model_parallel_size,
            expert_tensor_parallel_size=expert_tensor_parallel_size,
            token_dispatcher=moe_token_dispatcher_type, grouped_gemm=moe_grouped_gemm),
        **overrides,
    )


def build_target(hf_config: PretrainedConfig, config: TransformerConfig, backend: str = "local",
                 pre_process: bool | None = None, post_process: bool | None = None,
                 pg_collection: ProcessGroupCollection | None = None,
                 last_layer: int | None = None) -> GPTModel:
    """A frozen GPTModel with this pipeline stage's layers (embedding on the first stage, final
    norm and output layer on the last; by default from the PP group's rank).

    `last_layer` (a 0-based global layer id) builds a feature extractor: only the layers up to
    that one and no final norm, so a forward stops at the deepest tapped layer and nothing past it
    is allocated, loaded or computed (a stage whose layers all lie past it holds none). The output
    layer stays on the last stage (the draft borrows it).

    `backend="local"` uses megatron's local layer spec with every norm a `LocalRMSNorm` (megatron's
    torch norm refuses sequence parallelism) and torch SDPA as core attention
    (`SDPACoreAttention`; MLA: megatron's DotProductAttention,
    `deepseek_v3.MLADotProductAttention`); `backend="te"` uses Transformer Engine layers.
    The output layer keeps its vocab-parallel logits (`parallel_output`).
    """
    _check_backend(backend)
    if config.moe_grouped_gemm and backend != "te":
        raise ValueError("moe_grouped_gemm needs backend='te' (Transformer Engine's grouped "
                         "GEMM); the local backend runs the experts one after another")
    if pg_collection is None:
        pg_collection = ProcessGroupCollection.use_mpu_process_groups()
    pre_process = is_pp_first_stage(pg_collection.pp) if pre_process is None else pre_process
    post_process = is_pp_last_stage(pg_collection.pp) if post_process is None else post_process
    if backend == "te":
        _te()
    elif config.multi_latent_attention:
        deepseek_v3.check_tensor_parallel(config, get_pg_size(pg_collection.tp))
    block = get_gpt_decoder_block_spec(config, use_transformer_engine=backend == "te",
                                       normalization="RMSNorm",
                                       pp_rank=get_pg_rank(pg_collection.pp))
    if backend == "local":
        block = _with_local_modules(block, config)
    if last_layer is not None:
        offset = get_transformer_layer_offset(config, pp_rank=get_pg_rank(pg_collection.pp))
        block = replace(block, layer_specs=block.layer_specs[:max(0, last_layer + 1 - offset)],
                        layer_norm=None)
    model = GPTModel(config, block, vocab_size=hf_config.vocab_size,
                     max_sequence_length=hf_config.max_position_embeddings,
                     pre_process=pre_process, post_process=post_process,
                     share_embeddings_and_output_weights=hf_config.tie_word_embeddings,
                     position_embedding_type="rope", pg_collection=pg_collection,
                     # MLA layers hold their own rotary embedding (MLATransformerConfig).
                     **({} if config.multi_latent_attention else _rope_kwargs(hf_config)))
    return freeze(model)


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Turn off gradients and dropout: the target is never trained."""
    model.requires_grad_(False)
    return model.eval()


def load_hf_weights(gpt_model: GPTModel,
                    path_or_state_dict: str | Path | Mapping[str, torch.Tensor]) -> None:
    """Copy HF weights into `gpt_model`: this pipeline stage's tensors, sliced for this rank of
    the model's TP group and read slice by slice, so each rank reads only what it holds (MoE
    layers: only its expert-parallel rank's experts, sliced over the expert-TP group). HF layer
    i goes to the local layer with `layer_number == i + 1`.

    Before anything is copied, checks that every model parameter (and router expert bias) has an
    HF source and that every needed HF tensor exists with the shape the model config implies
    (from headers).
    """
    params = _loaded_tensors(gpt_model)
    layer_ids = [layer.layer_number - 1 for layer in gpt_model.decoder.layers]
    pgs = gpt_model.pg_collection
    ep, expt_tp = getattr(pgs, "ep", None), getattr(pgs, "expt_tp", None)
    rows = _mapping(gpt_model.config, layer_ids, embedding=gpt_model.pre_process,
                    final_norm=gpt_model.decoder.final_layernorm is not None,
                    output=gpt_model.post_process and gpt_model.output_layer.weight is not None,
                    tied=gpt_model.share_embeddings_and_output_weights,
                    fused_norms=_has_fused_norms(gpt_model),
                    expert_parallel=(get_pg_rank(ep), get_pg_size(ep)))
    unmapped = sorted(params.keys() - {name for name, _, _ in rows})
    if unmapped:
        raise ValueError(f"no Hugging Face tensor maps to the megatron parameters {unmapped}: the "
                         "model was not built by build_target(target_transformer_config(...))")
    tp_group = gpt_model.pg_collection.tp
    convert = _converters(gpt_model.config.num_query_groups, get_pg_rank(tp_group),
                          get_pg_size(tp_group))
    convert |= moe.expert_converters(get_pg_rank(expt_tp), get_pg_size(expt_tp))
    with _Checkpoint(path_or_state_dict) as checkpoint, torch.no_grad():
        checkpoint.check(_hf_shapes(rows, gpt_model.config, gpt_model.vocab_size))
        for name, hf_names, kind in rows:
            value = convert[kind](checkpoint, *hf_names)
            if value.shape != params[name].shape:
                raise ValueError(f"{name}: {list(hf_names)} give a {list(value.shape)} tensor on "
                                 f"this rank, the model holds {list(params[name].shape)}")
            params[name].copy_(value)


def _loaded_tensors(gpt_model: GPTModel) -> dict[str, torch.Tensor]:
    """The model's parameters and its routers' `expert_bias` buffers (megatron keeps that bias,
    HF's `e_score_correction_bias`, as a buffer; it is checkpoint data all the same)."""
    return dict(gpt_model.named_parameters()) | {
        name: buffer for name, buffer in gpt_model.named_buffers()
        if name.endswith(".router.expert_bias")}


@functools.cache
def _say_once(message: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(message, flush=True)


def _check_architecture(architectures, where) -> str:
    if not architectures or architectures[0] not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{where}: architectures={architectures} is not supported; supported: "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    return architectures[0]


def _check_hf_config(hf_config: PretrainedConfig) -> str:
    """The architecture name, after rejecting every feature the mapping does not cover."""
    where = Path(hf_config.name_or_path) / CONFIG_FILE if hf_config.name_or_path else CONFIG_FILE
    arch = _check_architecture(hf_config.architectures, where)
    problems = [f"hidden_act={hf_config.hidden_act!r}"] if hf_config.hidden_act != "silu" else []
    problems += [f"{flag}=True" for flag in ("attention_bias", "mlp_bias")
                 if getattr(hf_config, flag, False)]
    layer_types = getattr(hf_config, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        problems.append(f"layer_types={layer_types}")
    quantization = getattr(hf_config, "quantization_config", None)
    if quantization:  # e.g. DeepSeek-V3's FP8 block-scaled weights (`weight_scale_inv`)
        method = (quantization.get("quant_method") if isinstance(quantization, dict)
                  else getattr(quantization, "quant_method", None))
        problems.append(f"quantization_config (quant_method={method!r})")
    if problems:
        raise ValueError(f"{where}: {', '.join(problems)} not supported (the import covers silu "
                         "MLPs, no attention/MLP biases, full attention in every layer and "
                         "unquantized weights: dequantize the checkpoint first)")
    problems = moe.check_moe_hf_config(hf_config)
    if problems:
        raise ValueError(f"{where}: {', '.join(problems)} not supported by the mixture-of-experts "
                         "import")
    if deepseek_v3.is_deepseek_v3(hf_config):
        problems = deepseek_v3.check_hf_config(hf_config)
        if problems:
            raise ValueError(f"{where}: {', '.join(problems)} not supported by the DeepSeek-V3 "
                             "import (megatron's multi-latent attention and MoE router)")
    else:
        _rope_kwargs(hf_config, where)
    return arch


def _head_dim(hf_config: PretrainedConfig) -> int:
    return (getattr(hf_config, "head_dim", None)
            or hf_config.hidden_size // hf_config.num_attention_heads)


def _rope_kwargs(hf_config: PretrainedConfig, where=CONFIG_FILE) -> dict:
    """GPTModel's RoPE arguments. megatron implements Llama-3.1 scaling ("llama3") with only the
    factor configurable (low/high frequency factors 1/4, original context 8192), as HF does."""
    rope = dict(hf_config.rope_parameters or {})
    kind = rope.get("rope_type", "default")
    kwargs = {"rotary_base": rope["rope_theta"]}
    if kind == "default":
        return kwargs
    llama31 = (rope.get("low_freq_factor"), rope.get("high_freq_factor"),
               rope.get("original_max_position_embeddings")) == (1, 4, 8192)
    if kind == "llama3" and llama31:
        return kwargs | {"rope_scaling": True, "rope_scaling_factor": rope["factor"]}
    raise ValueError(f"{where}: rope_scaling={rope} is not supported; supported: none, or "
                     "rope_type 'llama3' with low_freq_factor 1, high_freq_factor 4 and "
                     "original_max_position_embeddings 8192 (Llama 3.1-3.3)")


def _with_local_modules(block: TransformerBlockSubmodules,
                        config: TransformerConfig) -> TransformerBlockSubmodules:
    """megatron's local block spec with every norm, final norm included, a `LocalRMSNorm` and
    the core attention `SDPACoreAttention` (megatron's is an unfused matmul-softmax; MLA, whose
    values are narrower than its queries and keys, keeps it: `MLADotProductAttention`)."""
    qk_norm = LocalRMSNorm if config.qk_layernorm else IdentityOp
    if config.multi_latent_attention:
        attention_modules = dict(core_attention=deepseek_v3.MLADotProductAttention,
                                 q_layernorm=qk_norm, kv_layernorm=qk_norm)
    else:
        attention_modules = dict(core_attention=SDPACoreAttention, q_layernorm=qk_norm,
                                 k_layernorm=qk_norm)

    def layer(spec):
        attention = spec.submodules.self_attention
        attention = replace(attention, submodules=replace(attention.submodules,
                                                          **attention_modules))
        return replace(spec, submodules=replace(
            spec.submodules, input_layernorm=LocalRMSNorm, pre_mlp_layernorm=LocalRMSNorm,
            self_attention=attention))

    return replace(block, layer_specs=[layer(s) for s in block.layer_specs],
                   layer_norm=LocalRMSNorm)


def _has_fused_norms(gpt_model: GPTModel) -> bool:
    """Whether the layers come from Transformer Engine's spec, which fuses norms into linears."""
    return any(isinstance(layer.input_layernorm, IdentityOp)
               or isinstance(getattr(layer.self_attention, "kv_layernorm", None), IdentityOp)
               for layer in gpt_model.decoder.layers)


def _mapping(config: TransformerConfig, layer_ids, *, embedding: bool, final_norm: bool,
             output: bool, tied: bool, fused_norms: bool = False,
             expert_parallel: tuple[int, int] = (0, 1)) -> list[tuple[str, tuple, str]]:
    """(megatron parameter, HF tensors, conversion) for the given global layer ids, which sit at
    local indices 0, 1, ... of the decoder. An MoE layer's MLP maps the experts of
    `expert_parallel` = (EP rank, EP size) (`moe.moe_layer_rows`); its pre-MLP norm is never
    fused into a linear."""
    if config.multi_latent_attention:
        per_layer, te_names = deepseek_v3.attention_rows(te_spec=fused_norms), _TE_FUSED_NORMS_MLA
    else:
        attn = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
        per_layer, te_names = [
            ("input_layernorm.weight", ("input_layernorm.weight",), "replicated"),
            ("self_attention.linear_qkv.weight", tuple(f"{p}.weight" for p in attn), "qkv"),
            ("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",), "rows"),
        ], _TE_FUSED_NORMS
        if config.add_qkv_bias:
            per_layer.append(
                ("self_attention.linear_qkv.bias", tuple(f"{p}.bias" for p in attn), "qkv"))
        if config.qk_layernorm:
            per_layer += [(f"self_attention.{q}_layernorm.weight", (f"self_attn.{q}_norm.weight",),
                           "replicated") for q in "qk"]
    per_layer += [
        ("pre_mlp_layernorm.weight", ("post_attention_layernorm.weight",), "replicated"),
        ("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), "fc1"),
        ("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), "rows"),
    ]
    rows = []
    if embedding:
        rows.append(("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "columns"))
    for local, layer_id in enumerate(layer_ids):
        sparse = moe.is_moe_layer(config, layer_id)
        for name, hf_names, kind in per_layer:
            if sparse and name.startswith("mlp."):
                continue
            if fused_norms and not (sparse and name == "pre_mlp_layernorm.weight"):
                name = te_names.get(name, name)
            rows.append((f"decoder.layers.{local}.{name}",
                         tuple(f"model.layers.{layer_id}.{n}" for n in hf_names), kind))
        if sparse:
            rows += moe.moe_layer_rows(config, local, layer_id,
                                       moe.local_experts(config, *expert_parallel))
    if final_norm:
        rows.append(("decoder.final_layernorm.weight", ("model.norm.weight",), "replicated"))
    if output:
        rows.append(("output_layer.weight",
                     ("model.embed_tokens.weight" if tied else "lm_head.weight",), "columns"))
    return rows


def _hf_shapes(rows, config: TransformerConfig, vocab_size: int) -> dict[str, tuple[int, ...]]:
    """The shape of every HF tensor named in `rows`, from the model dimensions."""
    hidden, ffn, head_dim = config.hidden_size, config.ffn_hidden_size, config.kv_channels
    q, kv = config.num_attention_heads * head_dim, config.num_query_groups * head_dim
    by_leaf = {
        "embed_tokens.weight": (vocab_size, hidden), "lm_head.weight": (vocab_size, hidden),
        "q_proj.weight": (q, hidden), "k_proj.weight": (kv, hidden), "v_proj.weight": (kv, hidden),
        "q_proj.bias": (q,), "k_proj.bias": (kv,), "v_proj.bias": (kv,),
        "o_proj.weight": (hidden, q), "q_norm.weight": (head_dim,), "k_norm.weight": (head_dim,),
        "gate_proj.weight": (ffn, hidden), "up_proj.weight": (ffn, hidden),
        "down_proj.weight": (hidden, ffn), "input_layernorm.weight": (hidden,),
        "post_attention_layernorm.weight": (hidden,), "norm.weight": (hidden,),
    }
    mla = config.multi_latent_attention
    return {n: moe.hf_shape(n, config) or (mla and deepseek_v3.hf_shape(n, config))
            or by_leaf[".".join(n.split(".")[-2:])]
            for _, hf_names, _ in rows for n in hf_names}


def _converters(num_query_groups: int, rank: int, size: int) -> dict:
    """(checkpoint, HF tensor names) -> this TP rank's megatron tensor, by the conversion named
    in `_mapping`. Each reads only the slices the rank holds (fc1: `[gate_r; up_r]`)."""
    def columns(checkpoint, key):
        return checkpoint.get_shard(key, 0, rank, size)

    return {
        "replicated": lambda checkpoint, key: checkpoint.get(key),
        "columns": columns,
        "rows": lambda checkpoint, key: checkpoint.get_shard(key, 1, rank, size),
        "qkv": lambda checkpoint, q, k, v: _read_qkv(checkpoint, (q, k, v), num_query_groups,
                                                     rank, size),
        "fc1": lambda checkpoint, gate, up: merge_fc1(columns(checkpoint, gate),
                                                      columns(checkpoint, up)),
    }


def _read_qkv(checkpoint: _Checkpoint, qkv: tuple[str, str, str], num_query_groups: int,
              rank: int, size: int) -> torch.Tensor:
    """Rank `rank`'s slice of the fused QKV (`shard_qkv`) from only the q/k/v rows it needs.

    With `num_query_groups >= size` the slice is the rank's whole groups, the rank's shard of
    each of q, k and v. With fewer groups it is a piece of one group: read that group's rows
    and cut the rank's piece of it.
    """
    check_qkv_groups(num_query_groups, size)
    if num_query_groups % size == 0:
        parts = (checkpoint.get_shard(key, 0, rank, size) for key in qkv)
        return merge_qkv(*parts, num_query_groups // size)
    ranks_per_group = size // num_query_groups
    group = merge_qkv(*(checkpoint.get_shard(key, 0, rank // ranks_per_group, num_query_groups)
                        for key in qkv), 1)
    return shard_columns(group, rank % ranks_per_group, ranks_per_group)


class _Checkpoint(contextlib.ExitStack):
    """Names, shapes and tensors of a safetensors checkpoint directory or an in-memory state dict.

    Shapes come from the safetensors headers; a tensor's data is read only by `get` (whole) or
    `get_shard` (one TP slice). `elements_read` counts the elements they returned, so tests can
    check that a rank reads only its slices.
    """

    def __init__(self, source: str | Path | Mapping[str, torch.Tensor]):
        super().__init__()
        self._handles = {}
        self.elements_read = 0
        self._state_dict = moe.per_expert_state_dict(source) if isinstance(source, Mapping) \
            else None
        if self._state_dict is not None:
            self.name = "state dict"
            self.shapes = {k: tuple(v.shape) for k, v in self._state_dict.items()}
            self.files = {}
            return
        path = Path(source)
        index = path / INDEX_FILE
        if index.is_file():
            self.name = str(index)
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted({path / f for f in weight_map.values()})
            for shard in shards:
                if not shard.is_file():
                    raise FileNotFoundError(f"{shard}: listed in {index} but not found")
        else:
            self.name = str(path)
            shards = sorted(path.glob("*.safetensors"))
            if not shards:
                raise FileNotFoundError(f"{path}: no {INDEX_FILE} and no *.safetensors file")
        self.shapes, self.files = {}, {}
        for shard in shards:
            with safe_open(shard, framework="pt") as f:
                for key in f.keys():
                    self.shapes[key] = tuple(f.get_slice(key).get_shape())
                    self.files[key] = shard

    def check(self, expected: Mapping[str, tuple[int, ...]]) -> None:
        for key, shape in expected.items():
            if key not in self.shapes:
                raise ValueError(f"{self.name}: tensor {key!r} is missing (expected shape "
                                 f"{list(shape)})")
            if self.shapes[key] != tuple(shape):
                raise ValueError(f"{self.files.get(key, self.name)}: tensor {key!r} has shape "
                                 f"{list(self.shapes[key])}, config.json implies {list(shape)}")

    def get(self, key: str) -> torch.Tensor:
        if self._state_dict is not None:
            tensor = self._state_dict[key]
        else:
            tensor = self._handle(key).get_tensor(key)
        self.elements_read += tensor.numel()
        return tensor

    def get_shard(self, key: str, dim: int, rank: int, size: int) -> torch.Tensor:
        """Rank `rank`'s even slice of `key` along `dim`, reading only that slice."""
        start, stop = shard_range(self.shapes[key], dim, rank, size)
        if self._state_dict is not None:
            tensor = self._state_dict[key].narrow(dim, start, stop - start)
        else:
            tensor = self._handle(key).get_slice(key)[(slice(None),) * dim + (slice(start, stop),)]
        self.elements_read += tensor.numel()
        return tensor

    def _handle(self, key: str):
        file = self.files[key]
        if file not in self._handles:
            self._handles[file] = self.enter_context(safe_open(file, framework="pt"))
        return self._handles[file]


def hf_tensor(path: str | Path, name: str) -> torch.Tensor:
    """One tensor of an HF checkpoint directory (e.g. `model.norm.weight` for a draft's initial
    final norm when the target was built without it)."""
    with _Checkpoint(path) as checkpoint:
        return checkpoint.get(name)
