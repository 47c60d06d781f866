"""The run's settings as typed dataclasses, one per concern, as the command line gives them.

Each field is one Megatron-LM-style flag (`run.flags` adds the flags a tool takes and fills these);
`None` means "decided when the plan is resolved" (`run.plan.resolve`), usually from the target.
Nothing here reads a file: these are the user's words, not yet checked against the target.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from megatron_dflash.head_loss import DEFAULT_CHUNK_ROWS


@dataclass
class TargetArgs:
    """The frozen target and its tokenizer."""

    target: str | None = None
    """HF checkpoint directory (config.json + safetensors). None: the embedded default,
    SmolLM2-135M-Instruct, converted once into `cache_dir`."""
    cache_dir: str = "cache"
    """Converted weights and prepared data of the embedded default."""
    tokenizer: str | None = None
    """HF tokenizer directory, or `sp:model` for SentencePiece (default: the target's)."""


@dataclass
class DataArgs:
    """Training and held-out conversations, or the target's tapped features cached offline."""

    train_data: list[str] | None = None
    """JSONL conversations (OpenAI messages / ShareGPT) or indexed-dataset prefixes
    (`tools/preprocess_data.py`). None: the embedded default's data."""
    valid_data: list[str] | None = None
    """Held-out conversations for tau."""
    seq_length: int = 256
    """Tokens per sample; longer conversations are truncated and reported."""
    seq_length_buckets: int = 1
    """Micro-batches are padded to the smallest of this many evenly spaced lengths up to
    `seq_length`, so compiled attention sees at most this many shapes."""
    max_train_samples: int | None = None
    """Use at most this many training conversations."""
    pack_sequences: bool = False
    """Pack consecutive training conversations into rows of up to `seq_length` tokens, each
    still a document of its own (`data.packing`)."""
    offline_features: str | None = None
    """A feature cache directory (`megatron_dflash.feature_cache`): train from cached taps (no
    target decoder layer built); written first when it holds no cache."""
    offline_features_dtype: str | None = None
    """bf16 or fp32 (default: bf16 under `bf16`, else fp32)."""
    embedded_answers: str = "target"
    """The embedded default's training answers: the target's own (regenerated) or the human
    replies to the same prompts ("human", for comparison)."""


@dataclass
class DFlashArgs:
    """The draft and its objective (what `DFlashConfig` resolves against the target)."""

    block_size: int = 16
    """Tokens per block: the anchor and block_size-1 MASK slots predicted in one forward."""
    num_draft_layers: int = 1
    target_layer_ids: list[int] | None = None
    """0-based target layers whose outputs the draft reads (default: the reference's spread)."""
    mask_token_id: int | None = None
    """Default: found from the target's tokenizer (`data.mask_token`)."""
    num_anchors: int = 16
    """Blocks sampled per sequence per step."""
    loss_gamma: float | None = None
    """Decay of the per-position loss weight exp(-(k-1)/gamma) (default by block size)."""
    distill_weight: float | None = None
    """Weight of distillation to the target's next-token distribution (0: hard labels)."""
    attention: str = "auto"
    """Draft training attention: dense, sparse, or auto (= sparse)."""
    loss_chunk_size: int = DEFAULT_CHUNK_ROWS
    """Supervised block slots projected through the LM head at a time: the loss never holds
    more than this many rows of vocabulary logits."""
    draft_num_attention_heads: int | None = None
    draft_num_query_groups: int | None = None
    draft_kv_channels: int | None = None
    draft_ffn_hidden_size: int | None = None
    draft_variant: str = "dflash"
    """dflash, or dflash2 (convolutions around each sublayer and a candidate selector)."""
    conv_kernel_size: int | None = None
    """DFlash2 (default 2)."""
    conv_group_size: int | None = None
    """DFlash2 (default 16)."""
    selector_rank: int | None = None
    """DFlash2 (default 256)."""
    selector_top_k: int | None = None
    """DFlash2 (default 16)."""
    selector_loss_weight: float = 1.0
    """DFlash2: weight of the selector's cross-entropy in the loss."""
    output_multiplier: float = 1.0
    final_logit_softcapping: float | None = None
    input_embedding_scale: float = 1.0
    draft_sliding_window: int | None = None
    """Window of the sliding draft layers (default: no sliding layer)."""
    draft_layer_types: list[str] | None = None
    """full or sliding, per draft layer (default: all sliding with a window, else all full)."""
    draft_causal: bool | None = None
    """Causal within the block on every draft layer, or on none (default: sliding layers)."""


@dataclass
class ParallelArgs:
    """megatron's parallel layout (`parallel_state.initialize_model_parallel`)."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    """Stages of the target's layers; the draft runs on the last one."""
    virtual_pipeline_model_parallel_size: int | None = None
    """Not supported; accepted only to refuse it with one line."""
    sequence_parallel: bool = False
    context_parallel_size: int = 1
    """Split the target's sequence over this many ranks (megatron's load-balanced chunks); the
    draft gathers the context back and takes a share of the blocks (`context_parallel`)."""
    cp_comm_type: str = "p2p"
    """How Transformer Engine's CP attention exchanges K/V (GPU); the local backend all-gathers."""
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: int | None = None
    """Default: `tensor_model_parallel_size` (megatron's)."""
    moe_token_dispatcher_type: str = "allgather"
    moe_grouped_gemm: bool = False


@dataclass
class PrecisionArgs:
    """Layer implementation and number formats of target and draft."""

    bf16: bool = False
    transformer_impl: str = "local"
    """local (torch, runs on CPU) or transformer_engine (GPU, needed for FP8)."""
    fp8_format: str | None = None
    """The draft's transformer layers in FP8 with this format."""
    fp8_recipe: str | None = None
    target_fp8_format: str | None = None
    """The frozen target's forward in FP8 with this format."""
    target_fp8_recipe: str | None = None


@dataclass
class TrainingArgs:
    """Batches, steps and what stops a run."""

    micro_batch_size: int = 1
    global_batch_size: int = 4
    train_iters: int = 150
    seed: int = 1234
    max_skipped_steps: int = 10
    """Stop after this many steps in a row whose loss or gradients were not finite."""


@dataclass
class OptimizerArgs:
    """megatron's Adam (distributed by default) and LR schedule."""

    lr: float = 1e-3
    min_lr: float = 1e-4
    lr_warmup_fraction: float = 0.04
    lr_decay_style: str = "cosine"
    clip_grad: float = 1.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    use_distributed_optimizer: bool = True


@dataclass
class CheckpointArgs:
    """Draft checkpoints, resume and the reference-format export."""

    save: str | None = None
    load: str | None = None
    export: str | None = None
    """At the end of training write the draft in the reference HF format here."""
    finetune: bool = False
    """With `load`: only the draft weights; optimizer, schedule and data start afresh."""
    save_interval: int | None = None
    exit_signal_handler: bool = True
    """On SIGTERM / SIGUSR1 finish the iteration, save and exit 0 (all ranks together)."""


@dataclass
class LoggingArgs:
    """Progress lines, held-out tau, metrics and TensorBoard."""

    log_interval: int = 10
    eval_interval: int | None = None
    eval_samples: int = 16
    tensorboard_dir: str | None = None
    metrics_file: str | None = None
    """Every iteration's metrics as JSON lines (default: <save>/metrics.jsonl with `save`)."""


@dataclass
class RunConfig:
    """Everything a training run was asked to do."""

    target: TargetArgs = field(default_factory=TargetArgs)
    data: DataArgs = field(default_factory=DataArgs)
    dflash: DFlashArgs = field(default_factory=DFlashArgs)
    parallel: ParallelArgs = field(default_factory=ParallelArgs)
    precision: PrecisionArgs = field(default_factory=PrecisionArgs)
    training: TrainingArgs = field(default_factory=TrainingArgs)
    optimizer: OptimizerArgs = field(default_factory=OptimizerArgs)
    checkpoint: CheckpointArgs = field(default_factory=CheckpointArgs)
    logging: LoggingArgs = field(default_factory=LoggingArgs)

    @property
    def embedded(self) -> bool:
        """No target or no data given: the embedded default fills them (`training.embedded`)."""
        return self.target.target is None or self.data.train_data is None
