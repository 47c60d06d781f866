"""The adapter of one target family: how its HF config and tensors map onto megatron-core's
GPTModel (in the spirit of torchtitan's per-model `state_dict_adapter`).

`TargetFamily` holds the Llama-shaped defaults — pre-norm RMSNorm layers, GQA with
`kv_channels = head_dim`, SwiGLU, RoPE (plain, linear, Llama-3.1 or YaRN scaled: `rope`),
weights under `model.` —
and each family in `targets/families/` overrides what differs. The generic builder and loader
(`hf_import`) only ask the family, so they hold no family branch.

A row is (megatron parameter, HF tensors, conversion kind): the kind names one of `converters`,
which turns the HF tensors into this rank's megatron tensor, reading only the slices it holds.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig
from transformers import AutoConfig, PretrainedConfig

from megatron_dflash import rope
from megatron_dflash.layers import LocalRMSNorm
from megatron_dflash.targets.hf_checkpoint import CONFIG_FILE, HFCheckpoint, View, hf_tensor
from megatron_dflash.targets.sdpa_attention import SDPACoreAttention
from megatron_dflash.weights import check_qkv_groups, merge_fc1, merge_qkv, shard_columns

Row = tuple[str, tuple[str, ...], str]

COMMON_SCOPE = ("(the import covers silu MLPs, no attention/MLP biases, full attention in every "
                "layer and unquantized weights: dequantize the checkpoint first)")
ROPE_SCOPE = f"by megatron's rotary embeddings ({rope.SUPPORTED})"


class TargetFamily:
    """The Llama-shaped defaults. Methods take the text model's config (`text_config`)."""

    architectures: tuple[str, ...] = ()  # HF `architectures[0]` values this family imports
    config_class = TransformerConfig
    hf_prefix = "model."  # the text weights: {prefix}embed_tokens, {prefix}layers.{i}, {prefix}norm
    lm_head = "lm_head.weight"
    # Transformer Engine's spec fuses these norms into the next linear: their names there.
    te_fused_norms = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
                      "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}
    core_attention = SDPACoreAttention  # the local backend's (megatron's is an unfused softmax)
    # `common_problems` fields the family maps (and checks) itself.
    supported_features: tuple[str, ...] = ()

    # --- config.json -> megatron ---------------------------------------------------------------

    def read_config(self, path) -> PretrainedConfig:
        """The checkpoint directory's config (transformers' `AutoConfig`)."""
        return AutoConfig.from_pretrained(path)

    def tied(self, hf: PretrainedConfig, shapes: dict[str, tuple[int, ...]]) -> bool:
        """Whether the LM head is the embedding, given the checkpoint's tensors: what the config
        says (a family whose config cannot be trusted on it asks the tensors)."""
        return hf.tie_word_embeddings

    def text_config(self, hf_config: PretrainedConfig) -> PretrainedConfig:
        """The text model's config: the config itself, or a VLM wrapper's text part carrying
        the wrapper's `architectures` and `name_or_path` (`load_hf_config` returns it, and it is
        passed here again)."""
        return hf_config

    def refusals(self, hf: PretrainedConfig) -> list[tuple[list[str], str]]:
        """Groups of (features the import cannot reproduce, each naming its config field; what
        the import covers instead); `check` raises on the first non-empty group."""
        return [(common_problems(hf, supported=self.supported_features), COMMON_SCOPE),
                (self.rope_problems(hf), ROPE_SCOPE)]

    def check(self, hf: PretrainedConfig, where=CONFIG_FILE) -> None:
        """Raise one ValueError line naming every refused field of the first non-empty group,
        `where` (config.json's path) first."""
        for problems, scope in self.refusals(hf):
            if problems:
                raise ValueError(f"{where}: {', '.join(problems)} not supported {scope}")

    def transformer_fields(self, hf: PretrainedConfig) -> dict:
        """TransformerConfig fields of the model's shape (parallelism and dtype: `hf_import`),
        YaRN's included when the config class holds them."""
        yarn = self.transformer_config_class(hf) is rope.YarnTransformerConfig
        return dict(
            num_layers=hf.num_hidden_layers,
            hidden_size=hf.hidden_size,
            ffn_hidden_size=self.ffn_hidden_size(hf),
            num_attention_heads=hf.num_attention_heads,
            num_query_groups=hf.num_key_value_heads,
            kv_channels=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
            layernorm_epsilon=hf.rms_norm_eps,
            normalization="RMSNorm",
            gated_linear_unit=True,
            activation_func=F.silu,
            add_bias_linear=False,
            add_qkv_bias=False,
            qk_layernorm=False,
        ) | (rope.config_fields(self.rope_scaling(hf)) if yarn else {})

    def ffn_hidden_size(self, hf: PretrainedConfig) -> int:
        """The dense MLP's width (HF `intermediate_size`), which the draft's FFN defaults to."""
        return hf.intermediate_size

    def moe_fields(self, hf: PretrainedConfig, *, tensor_parallel_size: int,
                   expert_model_parallel_size: int, expert_tensor_parallel_size: int | None,
                   token_dispatcher: str, grouped_gemm: bool) -> dict:
        """TransformerConfig fields of the MoE layers and their layout: none for a dense target."""
        if expert_model_parallel_size > 1:
            raise ValueError(f"expert_model_parallel_size={expert_model_parallel_size}: the "
                             "target is dense (no experts); expert parallelism needs an MoE target")
        return {}

    def rotary_percent(self, hf: PretrainedConfig) -> float:
        """The fraction of each head's dims RoPE rotates (megatron's `rotary_percent`): all;
        a family whose attention rotates a part reads it from the config."""
        return 1.0

    def rope_scaling(self, hf: PretrainedConfig) -> dict:
        """The RoPE scaling of the config (`rope.scaling_of`), which the draft takes too."""
        return rope.scaling_of(hf.rope_parameters, hf.max_position_embeddings)

    def rope_problems(self, hf: PretrainedConfig) -> list[str]:
        """RoPE fields the import cannot reproduce: a partial rotary in a family that rotates
        every dim, and what megatron's rotary modules lack (`rope.problems`)."""
        partial = (hf.rope_parameters or {}).get("partial_rotary_factor", 1.0)
        if self.rotary_percent(hf) == 1.0 and partial != 1.0:
            return [f"partial_rotary_factor={partial} (this family rotates every head dim)"]
        return rope.problems(self.rope_scaling(hf), self.rotary_percent(hf))

    def gpt_model_kwargs(self, hf: PretrainedConfig, where=CONFIG_FILE) -> dict:
        """GPTModel's position-embedding arguments (`rope.gpt_model_kwargs`)."""
        return rope.gpt_model_kwargs(self.rope_scaling(hf), hf.rope_parameters["rope_theta"],
                                     self.rotary_percent(hf))

    def transformer_config_class(self, hf: PretrainedConfig) -> type:
        """`config_class`, with the YaRN fields when the target's RoPE is YaRN."""
        return rope.config_class(self.rope_scaling(hf), self.config_class)

    def sequence_limit(self, hf: PretrainedConfig) -> int | None:
        """The longest sequence the import reproduces exactly (None: any)."""
        return None

    def skip_notice(self, hf: PretrainedConfig) -> str | None:
        """What the checkpoint holds that is not part of the target (said once), if anything."""
        return None

    def final_norm_weight(self, path: str) -> torch.Tensor:
        """The target's final norm as a plain RMSNorm weight (a draft's final norm starts there)."""
        return hf_tensor(path, f"{self.hf_prefix}norm.weight")

    # --- the megatron model --------------------------------------------------------------------

    def block_spec(self, config: TransformerConfig, *, backend: str, pp_rank: int,
                   tp_size: int) -> TransformerBlockSubmodules:
        """This stage's decoder block spec: megatron's, and on the local backend every norm a
        `LocalRMSNorm` (megatron's torch norm refuses sequence parallelism) and the core
        attention `local_attention_modules`."""
        block = get_gpt_decoder_block_spec(config, use_transformer_engine=backend == "te",
                                           normalization="RMSNorm", pp_rank=pp_rank)
        if backend == "te":
            return block
        modules = self.local_attention_modules(config)

        def layer(spec):
            attention = spec.submodules.self_attention
            attention = replace(attention, submodules=replace(attention.submodules, **modules))
            return replace(spec, submodules=replace(
                spec.submodules, input_layernorm=LocalRMSNorm, pre_mlp_layernorm=LocalRMSNorm,
                self_attention=attention))

        return replace(block, layer_specs=[layer(s) for s in block.layer_specs],
                       layer_norm=LocalRMSNorm)

    def local_attention_modules(self, config: TransformerConfig) -> dict:
        qk_norm = LocalRMSNorm if config.qk_layernorm else IdentityOp
        return dict(core_attention=self.core_attention, q_layernorm=qk_norm, k_layernorm=qk_norm)

    # --- weights -------------------------------------------------------------------------------

    def weight_rows(self, config: TransformerConfig, layer_ids, *, embedding: bool,
                    final_norm: bool, output: bool, tied: bool, fused_norms: bool = False,
                    expert_parallel: tuple[int, int] = (0, 1)) -> list[Row]:
        """The rows of the given global layer ids, which sit at local indices 0, 1, ... of the
        decoder (plus the embedding, final norm and output layer when asked). `fused_norms`:
        Transformer Engine's layer spec; `expert_parallel`: (EP rank, EP size)."""
        embed = f"{self.hf_prefix}embed_tokens.weight"
        rows = [("embedding.word_embeddings.weight", (embed,), "columns")] if embedding else []
        for local, layer_id in enumerate(layer_ids):
            hf = f"{self.hf_prefix}layers.{layer_id}."
            rows += [(f"decoder.layers.{local}.{name}", tuple(hf + n for n in hf_names), kind)
                     for name, hf_names, kind in self.layer_rows(
                         config, layer_id, fused_norms=fused_norms,
                         expert_parallel=expert_parallel)]
        if final_norm:
            rows.append(("decoder.final_layernorm.weight", (f"{self.hf_prefix}norm.weight",),
                         "replicated"))
        if output:
            rows.append(("output_layer.weight", (embed if tied else self.lm_head,), "columns"))
        return rows

    def layer_rows(self, config: TransformerConfig, layer_id: int, *, fused_norms: bool,
                   expert_parallel: tuple[int, int]) -> list[Row]:
        """One layer's rows, both sides named relative to the layer."""
        return [*self.attention_rows(config, fused_norms),
                *self.mlp_rows(config, layer_id, fused_norms=fused_norms,
                               expert_parallel=expert_parallel)]

    def attention_rows(self, config: TransformerConfig, fused_norms: bool) -> list[Row]:
        attn = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
        rows = [("input_layernorm.weight", ("input_layernorm.weight",), "replicated"),
                ("self_attention.linear_qkv.weight", tuple(f"{p}.weight" for p in attn), "qkv"),
                ("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",), "rows")]
        if config.add_qkv_bias:
            rows.append(("self_attention.linear_qkv.bias", tuple(f"{p}.bias" for p in attn), "qkv"))
        if config.qk_layernorm:
            rows += [(f"self_attention.{q}_layernorm.weight", (f"self_attn.{q}_norm.weight",),
                      "replicated") for q in "qk"]
        return self.fuse_norms(rows, fused_norms)

    def mlp_rows(self, config: TransformerConfig, layer_id: int, *, fused_norms: bool,
                 expert_parallel: tuple[int, int]) -> list[Row]:
        """The pre-MLP norm and a dense SwiGLU MLP."""
        return self.fuse_norms([
            ("pre_mlp_layernorm.weight", ("post_attention_layernorm.weight",), "replicated"),
            ("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), "fc1"),
            ("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), "rows"),
        ], fused_norms)

    def fuse_norms(self, rows: list[Row], fused_norms: bool) -> list[Row]:
        """`rows` with the norms Transformer Engine fuses under their fused names."""
        if not fused_norms:
            return rows
        return [(self.te_fused_norms.get(name, name), hf, kind) for name, hf, kind in rows]

    def hf_shapes(self, rows: list[Row], config: TransformerConfig,
                  vocab_size: int) -> dict[str, tuple[int, ...]]:
        """The shape config.json implies for every HF tensor named in `rows`."""
        return {n: self.hf_shape(n, config, vocab_size) for _, names, _ in rows for n in names}

    def hf_shape(self, name: str, config: TransformerConfig, vocab_size: int) -> tuple[int, ...]:
        hidden, ffn, head_dim = config.hidden_size, config.ffn_hidden_size, config.kv_channels
        q, kv = config.num_attention_heads * head_dim, config.num_query_groups * head_dim
        return {
            "embed_tokens.weight": (vocab_size, hidden), "lm_head.weight": (vocab_size, hidden),
            "q_proj.weight": (q, hidden), "k_proj.weight": (kv, hidden),
            "v_proj.weight": (kv, hidden), "q_proj.bias": (q,), "k_proj.bias": (kv,),
            "v_proj.bias": (kv,), "o_proj.weight": (hidden, q), "q_norm.weight": (head_dim,),
            "k_norm.weight": (head_dim,), "gate_proj.weight": (ffn, hidden),
            "up_proj.weight": (ffn, hidden), "down_proj.weight": (hidden, ffn),
            "input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,),
            "norm.weight": (hidden,),
        }[".".join(name.split(".")[-2:])]

    def converters(self, config: TransformerConfig, tp: tuple[int, int],
                   expert_tp: tuple[int, int]) -> dict:
        """Conversion kind -> (checkpoint, *HF names) -> this rank's tensor; `tp` and
        `expert_tp` are (rank, size) of the tensor- and expert-tensor-parallel groups."""
        return tp_converters(config.num_query_groups, *tp)

    def tensor_views(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, View]:
        """Tensors the rows name that the checkpoint stores inside others (`HFCheckpoint`)."""
        return {}


class VisionLanguageWrapper(TargetFamily):
    """A vision-language checkpoint whose text model is the target (a base listed before the text
    model's family): its `text_config` carries the wrapper's architectures and path, so that it is
    found and named as the checkpoint, and the skipped vision weights are said once."""

    vision_weights = ""  # what of the checkpoint is not read, e.g. "the vision encoder (...)"

    def text_config(self, hf_config: PretrainedConfig) -> PretrainedConfig:
        text = hf_config.get_text_config()
        if text is not hf_config:
            text.architectures = hf_config.architectures
            text._name_or_path = hf_config.name_or_path
        return text

    def skip_notice(self, hf: PretrainedConfig) -> str | None:
        vision = f"skipping {self.vision_weights}: not part of the target"
        mtp = super().skip_notice(hf)
        return f"{vision}; {mtp}" if mtp else vision


def common_problems(hf: PretrainedConfig,
                    layer_types_supported: tuple[str, ...] = ("full_attention",), *,
                    supported: tuple[str, ...] = ()) -> list[str]:
    """The fields of any family's config that the import does not cover, each named
    (`layer_types_supported`: the HF layer types the family maps; `supported`: fields the
    family maps and checks itself)."""
    problems = ([f"hidden_act={hf.hidden_act!r}"]
                if hf.hidden_act != "silu" and "hidden_act" not in supported else [])
    problems += [f"{flag}=True" for flag in ("attention_bias", "mlp_bias", "use_sliding_window")
                 if getattr(hf, flag, False) and flag not in supported]
    layer_types = getattr(hf, "layer_types", None) or []
    if any(t not in layer_types_supported for t in layer_types) and "layer_types" not in supported:
        problems.append(f"layer_types={layer_types}")
    method = quant_method(hf)
    if method and "quantization_config" not in supported:
        # e.g. DeepSeek-V3's FP8 block-scaled weights (`weight_scale_inv`)
        problems.append(f"quantization_config (quant_method={method!r})")
    return problems


def quant_method(hf: PretrainedConfig) -> str | None:
    """The checkpoint's `quantization_config.quant_method` (None: unquantized)."""
    quantization = getattr(hf, "quantization_config", None)
    if not quantization:
        return None
    return str(quantization.get("quant_method") if isinstance(quantization, dict)
               else getattr(quantization, "quant_method", None))


def tp_converters(num_query_groups: int, rank: int, size: int) -> dict:
    """The dense conversions for rank `rank` of a `size`-way tensor-parallel group, each reading
    only the slices the rank holds (fc1: `[gate_r; up_r]`)."""
    def columns(checkpoint, key):
        return checkpoint.get_shard(key, 0, rank, size)

    return {
        "replicated": lambda checkpoint, key: checkpoint.get(key),
        "columns": columns,
        "rows": lambda checkpoint, key: checkpoint.get_shard(key, 1, rank, size),
        "qkv": lambda checkpoint, q, k, v: read_qkv(checkpoint, (q, k, v), num_query_groups,
                                                    rank, size),
        "fc1": lambda checkpoint, gate, up: merge_fc1(columns(checkpoint, gate),
                                                      columns(checkpoint, up)),
    }


def read_qkv(checkpoint: HFCheckpoint, qkv: tuple[str, str, str], num_query_groups: int,
             rank: int, size: int):
    """Rank `rank`'s slice of the fused QKV (`weights.shard_qkv`) from only the q/k/v rows it
    needs: with `num_query_groups >= size` the rank's whole groups; with fewer groups a piece of
    one group (read that group's rows, cut the rank's piece)."""
    check_qkv_groups(num_query_groups, size)
    if num_query_groups % size == 0:
        parts = (checkpoint.get_shard(key, 0, rank, size) for key in qkv)
        return merge_qkv(*parts, num_query_groups // size)
    ranks_per_group = size // num_query_groups
    group = merge_qkv(*(checkpoint.get_shard(key, 0, rank // ranks_per_group, num_query_groups)
                        for key in qkv), 1)
    return shard_columns(group, rank % ranks_per_group, ranks_per_group)
