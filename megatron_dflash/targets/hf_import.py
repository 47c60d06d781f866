"""Load a Hugging Face checkpoint of a supported family (one adapter per family in
`targets/families/`) into a frozen megatron-core `GPTModel`.

    hf = load_hf_config(path)                       # validates config.json and every tensor header
    config = target_transformer_config(hf, tensor_parallel_size=tp, sequence_parallel=sp)
    model = build_target(hf, config)                # this pipeline stage's layers only, frozen
    load_hf_weights(model, path)                    # this TP rank's slices of this stage's tensors

A bad checkpoint (no config.json, unsupported architecture or feature, no safetensors, a missing
tensor or a wrong shape) fails in `load_hf_config` with one error naming the file or tensor,
before any model exists: it reads only `config.json` and the safetensors headers. Everything
family-specific is the family adapter's (`TargetFamily`); this module holds no family branch.
"""
from __future__ import annotations

import functools
import json
from dataclasses import replace
from pathlib import Path
from typing import Mapping

import torch
import torch.distributed as dist
from megatron.core.models.gpt import GPTModel
from megatron.core.pipeline_parallel.utils import is_pp_first_stage, is_pp_last_stage
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
from megatron.core.utils import get_pg_rank, get_pg_size
from transformers import PretrainedConfig

from megatron_dflash.layers import check_backend, te_modules
from megatron_dflash.targets.families import family_for
from megatron_dflash.targets.family import TargetFamily
from megatron_dflash.targets.hf_checkpoint import CONFIG_FILE, HFCheckpoint

# training/pipeline.py's import (not this package's to edit); new code uses HFCheckpoint.


def load_hf_config(path: str | Path) -> PretrainedConfig:
    """Read `path/config.json` and check that the checkpoint can be imported.

    Checks, in order: config.json exists; the architecture and its features are supported
    (`target_transformer_config`); safetensors files exist (one file, several, or an index and
    its shards); every tensor the model needs is present with the shape config.json implies.
    Only headers are read. Raises FileNotFoundError or ValueError naming the file or tensor.
    What the checkpoint holds beyond the target (e.g. DeepSeek-V3's multi-token-prediction
    layers) is skipped, said once. Returns the text model's config (`TargetFamily.text_config`:
    a VLM wrapper's text part, keeping the wrapper's `architectures`), which the rest reads.
    """
    path = Path(path)
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: not found; expected a Hugging Face checkpoint "
                                "directory (config.json + safetensors)")
    family = family_for(json.loads(config_file.read_text()).get("architectures"), config_file)
    hf_config = family.read_config(path)
    config = target_transformer_config(hf_config)
    family = target_family(hf_config)
    text = family.text_config(hf_config)
    with HFCheckpoint(path) as checkpoint:
        checkpoint.add_views(family.tensor_views(checkpoint.shapes))
        text.tie_word_embeddings = family.tied(text, checkpoint.shapes)
        rows = family.weight_rows(config, range(config.num_layers), embedding=True,
                                  final_norm=True, output=True, tied=text.tie_word_embeddings)
        checkpoint.check(family.hf_shapes(rows, config, text.vocab_size))
    notice = family.skip_notice(text)
    if notice:
        _say_once(f"{config_file}: {notice}")
    return text


def target_family(hf_config: PretrainedConfig) -> TargetFamily:
    """The family adapter of `hf_config` (ValueError naming config.json if unsupported)."""
    return family_for(hf_config.architectures, _config_file(hf_config))


def target_transformer_config(hf_config: PretrainedConfig, *, tensor_parallel_size: int = 1,
                              sequence_parallel: bool = False,
                              params_dtype: torch.dtype = torch.float32,
                              pipeline_parallel_size: int = 1,
                              context_parallel_size: int = 1, cp_comm_type: str | None = None,
                              expert_model_parallel_size: int = 1,
                              expert_tensor_parallel_size: int | None = None,
                              moe_token_dispatcher_type: str = "allgather",
                              moe_grouped_gemm: bool = False, **overrides) -> TransformerConfig:
    """The megatron TransformerConfig of a HF config: the family's fields (`TargetFamily.
    transformer_fields`, `moe_fields` with the expert-parallel layout), no dropout, and the
    parallel layout and dtype. Weights are allocated on the CPU and not initialised
    (`load_hf_weights` overwrites every parameter). `ffn_hidden_size` is always the dense
    `intermediate_size`. `context_parallel_size`/`cp_comm_type`: megatron's context
    parallelism (`context_parallel.py`). `overrides` go to the config. Raises ValueError naming
    every unsupported config field (`TargetFamily.check`) or layout.
    """
    family = target_family(hf_config)
    hf = family.text_config(hf_config)
    family.check(hf, _config_file(hf_config))
    if hf.vocab_size % tensor_parallel_size:
        raise ValueError(f"vocab_size={hf.vocab_size} is not divisible by the "
                         f"tensor-parallel size {tensor_parallel_size}; the vocabulary is not "
                         "padded, pick a TP size that divides it")
    fields = family.transformer_fields(hf) | dict(
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tensor_parallel_size,
        sequence_parallel=sequence_parallel,
        pipeline_model_parallel_size=pipeline_parallel_size,
        context_parallel_size=context_parallel_size,
        cp_comm_type=cp_comm_type if context_parallel_size > 1 else None,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=True,
        perform_initialization=False,
    )
    return family.transformer_config_class(hf)(
        **fields,
        **family.moe_fields(hf, tensor_parallel_size=tensor_parallel_size,
                            expert_model_parallel_size=expert_model_parallel_size,
                            expert_tensor_parallel_size=expert_tensor_parallel_size,
                            token_dispatcher=moe_token_dispatcher_type,
                            grouped_gemm=moe_grouped_gemm),
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

    `backend="local"` uses megatron's local layer spec with the family's local modules
    (`TargetFamily.block_spec`: `LocalRMSNorm` norms, torch SDPA core attention);
    `backend="te"` uses Transformer Engine layers. The output layer keeps its vocab-parallel
    logits (`parallel_output`). The model remembers its family (`load_hf_weights` asks it).
    """
    check_backend(backend)
    if config.moe_grouped_gemm and backend != "te":
        raise ValueError("moe_grouped_gemm needs backend='te' (Transformer Engine's grouped "
                         "GEMM); the local backend runs the experts one after another")
    if pg_collection is None:
        pg_collection = ProcessGroupCollection.use_mpu_process_groups()
    pre_process = is_pp_first_stage(pg_collection.pp) if pre_process is None else pre_process
    post_process = is_pp_last_stage(pg_collection.pp) if post_process is None else post_process
    if backend == "te":
        te_modules()
    family = target_family(hf_config)
    hf = family.text_config(hf_config)
    pp_rank = get_pg_rank(pg_collection.pp)
    block = family.block_spec(config, backend=backend, pp_rank=pp_rank,
                              tp_size=get_pg_size(pg_collection.tp))
    if last_layer is not None:
        offset = get_transformer_layer_offset(config, pp_rank=pp_rank)
        block = replace(block, layer_specs=block.layer_specs[:max(0, last_layer + 1 - offset)],
                        layer_norm=None)
    # Torch modules inside megatron's layers (GatedDeltaNet's nn.Conv1d) initialise themselves
    # from the global RNG, by an amount that depends on the TP size; the weights are loaded
    # anyway, and the draft built next must draw the same numbers at every layout.
    with torch.random.fork_rng():
        model = GPTModel(config, block, vocab_size=hf.vocab_size,
                         max_sequence_length=hf.max_position_embeddings,
                         pre_process=pre_process, post_process=post_process,
                         share_embeddings_and_output_weights=hf.tie_word_embeddings,
                         pg_collection=pg_collection, **family.gpt_model_kwargs(hf))
    model.target_family = family
    return freeze(model)


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Turn off gradients and dropout: the target is never trained."""
    model.requires_grad_(False)
    return model.eval()


def load_hf_weights(gpt_model: GPTModel,
                    path_or_state_dict: str | Path | Mapping[str, torch.Tensor]) -> None:
    """Copy HF weights into `gpt_model` (from `build_target`): this pipeline stage's tensors,
    sliced for this rank of the model's TP group and read slice by slice, so each rank reads only
    what it holds (MoE layers: only its expert-parallel rank's experts, sliced over the expert-TP
    group). HF layer i goes to the local layer with `layer_number == i + 1`.

    Before anything is copied, checks that every model parameter (and router expert bias) has an
    HF source and that every needed HF tensor exists with the shape the model config implies
    (from headers).
    """
    family = getattr(gpt_model, "target_family", None)
    if family is None:
        raise ValueError("the model has no target family: it was not built by "
                         "build_target(target_transformer_config(...))")
    params = loaded_tensors(gpt_model)
    pgs = gpt_model.pg_collection
    ep, expt_tp = getattr(pgs, "ep", None), getattr(pgs, "expt_tp", None)
    rows = family.weight_rows(
        gpt_model.config, [layer.layer_number - 1 for layer in gpt_model.decoder.layers],
        embedding=gpt_model.pre_process,
        final_norm=gpt_model.decoder.final_layernorm is not None,
        output=gpt_model.post_process and gpt_model.output_layer.weight is not None,
        tied=gpt_model.share_embeddings_and_output_weights,
        fused_norms=has_fused_norms(gpt_model),
        expert_parallel=(get_pg_rank(ep), get_pg_size(ep)))
    unmapped = sorted(params.keys() - {name for name, _, _ in rows})
    if unmapped:
        raise ValueError(f"no Hugging Face tensor maps to the megatron parameters {unmapped}: the "
                         "model was not built by build_target(target_transformer_config(...))")
    convert = family.converters(gpt_model.config, tp=(get_pg_rank(pgs.tp), get_pg_size(pgs.tp)),
                                expert_tp=(get_pg_rank(expt_tp), get_pg_size(expt_tp)))
    with HFCheckpoint(path_or_state_dict) as checkpoint, torch.no_grad():
        checkpoint.add_views(family.tensor_views(checkpoint.shapes))
        checkpoint.check(family.hf_shapes(rows, gpt_model.config, gpt_model.vocab_size))
        for name, hf_names, kind in rows:
            value = convert[kind](checkpoint, *hf_names)
            if value.shape != params[name].shape:
                raise ValueError(f"{name}: {list(hf_names)} give a {list(value.shape)} tensor on "
                                 f"this rank, the model holds {list(params[name].shape)}")
            params[name].copy_(value)


def loaded_tensors(gpt_model: GPTModel) -> dict[str, torch.Tensor]:
    """The tensors `load_hf_weights` fills: the model's parameters and its routers'
    `expert_bias` buffers (megatron keeps that bias, HF's `e_score_correction_bias`, as a buffer;
    it is checkpoint data all the same)."""
    return dict(gpt_model.named_parameters()) | {
        name: buffer for name, buffer in gpt_model.named_buffers()
        if name.endswith(".router.expert_bias")}


def has_fused_norms(gpt_model: GPTModel) -> bool:
    """Whether the layers come from Transformer Engine's spec, which fuses norms into linears."""
    return any(isinstance(layer.input_layernorm, IdentityOp)
               or isinstance(getattr(layer.self_attention, "kv_layernorm", None), IdentityOp)
               for layer in gpt_model.decoder.layers)


def _config_file(hf_config: PretrainedConfig) -> Path | str:
    return Path(hf_config.name_or_path) / CONFIG_FILE if hf_config.name_or_path else CONFIG_FILE


@functools.cache
def _say_once(message: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(message, flush=True)
