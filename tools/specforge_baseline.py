"""SpecForge 0.2.0's own DFlash training step, as a side-by-side baseline for the benchmark.

    .venv/bin/pip install --no-deps specforge==0.2.0    (optional; never needed by training)

`build_specforge_step(hf_config, ...)` returns a zero-argument callable that runs exactly one
SpecForge DFlash training step and returns its loss. Everything the step does is SpecForge's
code, built the way its `specforge train` assembly builds it (`training/assembly.py`,
`algorithms/model_providers.py`, `training/trainer.py`):

  draft config  `training.model_loading.resolve_draft_config` on a `Config` whose target is the
                given HF config (written as `config.json` to a temporary directory): the draft is
                generated from the target (`_generate_draft_config` +
                `algorithms.model_providers.populate_dflash_generated_config`), then
                `model.draft_num_hidden_layers` / `model.draft_block_size` are applied
                (`apply_dflash_overrides`: target_layer_ids = `build_target_layer_ids(L, n)`)
  draft model   the DFlash provider's `build_draft` (`build_dflash_draft`:
                `AutoDraftModel.from_config` -> `modeling.draft.dflash.DFlashDraftModel`, with
                `config._attn_implementation = training.attention_backend`)
  training model `algorithms.common.dflash_family_model.OnlineDFlashModel(draft, target lm_head,
                target embed_tokens, mask_token_id, block_size, attention_backend, num_anchors,
                loss_decay_gamma, objective_chunk_blocks, loss_type, dpace_alpha)` with the
                config defaults, as `_build_dflash_family_model` builds it, except that the
                frozen embedding / LM head are SpecForge's `TargetEmbeddingsAndHead` holding the
                in-process target's own tensors instead of reading them back from safetensors
  backend       `training.backend.FSDPTrainingBackend(ParallelConfig.from_distributed(...))`
                `.prepare_model(model, optimizer_target=model.draft_model)` over the default
                process group (a world of one is created, nccl on CUDA / gloo on CPU, when the
                caller has none): on CUDA FSDP1 SHARD_GRAD_OP (SpecForge's default), per-decoder-
                layer auto wrap, target embedding / head ignored, mixed precision
                `param_dtype` = `dtype` (SpecForge always uses bf16); on CPU, where torch's FSDP1
                refuses to run, SpecForge's `fsdp_sharding=NO_SHARD` path, i.e. DDP
  optimizer     `optimizer.BF16Optimizer` (fp32 master AdamW, lr 1e-4, grad clip 0.5, cosine
                schedule with 1.5% warmup) via `training.assembly._ConfiguredOptimizerFactory`
  step          `training.strategies.base.DFlashTrainStrategy` (the provider's `build_step`)
                under `training.controller.TrainerCore(accumulation_steps=1).train_step`:
                forward (`OnlineDFlashModel.forward`: anchor sampling, noise embedding, DFlash
                mask, draft forward, chunked-checkpointed LM head + CE), loss normalisation,
                `backend.backward`, gradient scaling by the loss denominator, `backend.step`
                = `BF16Optimizer.step` (clip, AdamW, zero_grad, LR step, copy back, grads None).
                With the default `objective_chunk_blocks=128` the draft LM head + CE runs under
                activation checkpointing, so its forward is executed twice per step.

SpecForge 0.2.0 has no in-process target: the trainer consumes `hidden_states` captured by an
external SGLang server (online) or from disk (offline). Here the target is a random-initialised
HF `AutoModelForCausalLM` built from the same config, run under `torch.no_grad()` with
`output_hidden_states=True` at the start of every step (`include_target=False`: once, at build,
like offline training), and the features are cut with SpecForge's own
`modeling.draft.dflash.extract_context_feature(hidden_states, draft.target_layer_ids)` (layer i
-> HF hidden_states[i + 1], SGLang's DFlash capture convention).

Attention: SpecForge's default `training.attention_backend` is "flex_attention" (a FlexAttention
BlockMask from `create_dflash_block_mask`, run through transformers' compiled flex attention).
FlexAttention has no CPU backward in torch 2.11, so on CPU the default is "sdpa" (a dense boolean
[b, 1, N*B, S+N*B] mask from `create_dflash_sdpa_mask`, run by transformers' SDPA); "eager" is
the other choice SpecForge offers. `step.attention_backend` says which was used.
"""
from __future__ import annotations

import datetime
import os
import socket
import tempfile
from typing import Any

import torch
import torch.distributed as dist

SPECFORGE_VERSION = "0.2.0"


def specforge_unavailable_reason() -> str | None:
    """None when SpecForge 0.2.0's DFlash training pieces import here, else why not."""
    try:
        import importlib.metadata as md

        version = md.version("specforge")
    except Exception:  # noqa: BLE001
        return "specforge is not installed (pip install --no-deps specforge==0.2.0)"
    if version != SPECFORGE_VERSION:
        return f"specforge {version} is installed; this baseline is written for {SPECFORGE_VERSION}"
    try:
        import specforge.algorithms.dflash.providers  # noqa: F401
        import specforge.training.controller  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"specforge does not import: {type(e).__name__}: {e}"
    return None


def default_attention_backend(device: torch.device) -> str:
    """SpecForge's default (flex_attention) where it can train, else sdpa (CPU)."""
    return "flex_attention" if torch.device(device).type == "cuda" else "sdpa"


def _ensure_process_group(device: torch.device) -> bool:
    """A world-of-one default group for FSDP when the caller has none; True if created here."""
    if dist.is_initialized():
        return False
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            timeout=datetime.timedelta(minutes=10))
    return True


class SpecForgeStep:
    """One SpecForge DFlash training step per call; returns the step's loss (a float).

    Attributes: `attention_backend` (what `OnlineDFlashModel` and the draft's
    `_attn_implementation` use), `target_layer_ids`, `mask_token_id`, `wrapper` ("fsdp", "ddp"
    or "none"), `last_result` (SpecForge's `StepResult`: loss, grad_norm, metrics incl. acc),
    and the parts: `target`, `model` (the `OnlineDFlashModel`), `wrapped`, `backend`, `core`,
    `cfg` (SpecForge `Config`), `input_ids`, `loss_mask`.
    """

    def __init__(self, **parts: Any):
        self.__dict__.update(parts)
        self.last_result = None

    def target_hidden_states(self) -> torch.Tensor:
        """The target's forward and SpecForge's DFlash feature extraction ([b, S, K*H])."""
        from specforge.modeling.draft.dflash import extract_context_feature

        with torch.no_grad():
            out = self.target(input_ids=self.input_ids, output_hidden_states=True,
                              use_cache=False, logits_to_keep=self.logits_to_keep)
            return extract_context_feature(out.hidden_states, self.target_layer_ids)

    def train_step(self, hidden_states: torch.Tensor) -> float:
        """SpecForge's trainer step on one batch of captured features."""
        from specforge.runtime.contracts import TrainBatch

        batch = TrainBatch(sample_ids=[f"bench-{i}" for i in range(self.input_ids.shape[0])],
                           strategy="dflash",
                           tensors={"input_ids": self.input_ids, "loss_mask": self.loss_mask,
                                    "hidden_states": hidden_states})
        self.last_result = self.core.train_step(batch)
        return float(self.last_result.loss)

    def __call__(self) -> float:
        hidden = self.target_hidden_states() if self.include_target else self.cached_hidden
        return self.train_step(hidden)

    def close(self) -> None:
        """Destroy the process group if `build_specforge_step` created it."""
        if self.own_process_group and dist.is_initialized():
            dist.destroy_process_group()
        self.own_process_group = False


def build_specforge_step(hf_target_config, *, seq_length: int, num_anchors: int,
                         block_size: int, num_draft_layers: int, batch_size: int = 1,
                         device: torch.device | str | None = None,
                         dtype: torch.dtype = torch.bfloat16, seed: int = 1234,
                         attention_backend: str | None = None,
                         mask_token_id: int | None = None,
                         response_start: int | None = None,
                         anchors: tuple[torch.Tensor, torch.Tensor] | None = None,
                         wrap: str | None = None, include_target: bool = True,
                         target_logits: bool = True, total_steps: int = 1000,
                         ) -> SpecForgeStep:
    """Build SpecForge's DFlash training (target, draft, OnlineDFlashModel, FSDP backend,
    BF16Optimizer, TrainerCore) on a fixed random batch; see the module docstring.

    hf_target_config: a `transformers` config of a Qwen3-like (or Llama) target; the target is
        random-initialised from it, on `device`, in `dtype`.
    batch: `batch_size` sequences of `seq_length` random tokens (`seed`); the loss mask covers
        positions >= `response_start` (default seq_length // 10, as tools/benchmark_dflash.py);
        at least `num_anchors` anchors must be eligible (SpecForge: supervised and followed by
        a supervised token).
    mask_token_id: default vocab_size - 1 (as tools/benchmark_dflash.py).
    anchors: optional ([b, N] positions, [b, N] keep) to pin the anchors every step instead of
        SpecForge's own uniform sampling (`OnlineDFlashModel._sample_anchor_positions`).
    wrap: "fsdp" (SpecForge's default, `training.fsdp_sharding=SHARD_GRAD_OP`), "ddp" (its
        `NO_SHARD`: DDP) or "none" (the bare module). Default: fsdp on CUDA, ddp on CPU (torch's
        FSDP1 refuses a CPU-only process: "FSDP needs a non-CPU accelerator device").
    include_target: run the target's forward in every step (else once, at build).
    target_logits: the target forward computes logits for every position (as an HF forward
        does; set False for `logits_to_keep=1`, i.e. the LM head on the last token only).
    total_steps: the optimizer schedule's horizon (warmup is 1.5% of it).
    """
    reason = specforge_unavailable_reason()
    if reason is not None:
        raise RuntimeError(reason)
    from transformers import AutoModelForCausalLM

    from specforge.algorithms.dflash.providers import create_registration
    from specforge.config import Config
    from specforge.modeling.target.target_utils import TargetEmbeddingsAndHead
    from specforge.training.assembly import _ConfiguredOptimizerFactory
    from specforge.training.backend import FSDPTrainingBackend, ParallelConfig
    from specforge.training.controller import TrainerCore
    from specforge.training.model_loading import resolve_draft_config
    from specforge.training.model_utils import resolve_mask_token_id

    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    attention_backend = attention_backend or default_attention_backend(device)
    wrap = wrap or ("fsdp" if device.type == "cuda" else "ddp")
    if wrap not in ("fsdp", "ddp", "none"):
        raise ValueError(f"wrap must be fsdp, ddp or none, got {wrap!r}")
    vocab = int(hf_target_config.vocab_size)
    mask_token_id = vocab - 1 if mask_token_id is None else int(mask_token_id)
    response_start = seq_length // 10 if response_start is None else int(response_start)
    eligible = seq_length - 1 - response_start
    if eligible < num_anchors:
        raise ValueError(f"only {eligible} eligible anchors for num_anchors={num_anchors}")
    dtype_name = {torch.bfloat16: "bfloat16", torch.float16: "float16",
                  torch.float32: "float32"}[dtype]
    registration = create_registration()  # the "dflash" entry of SpecForge's builtin registry
    provider = registration.providers.model

    with tempfile.TemporaryDirectory(prefix="specforge-target-") as target_dir:
        hf_target_config.save_pretrained(target_dir)  # config.json only: the draft is derived
        cfg = Config.model_validate({
            "model": {"target_model_path": target_dir, "torch_dtype": dtype_name,
                      "draft_num_hidden_layers": num_draft_layers,
                      "draft_block_size": block_size, "mask_token_id": mask_token_id},
            # Offline mode: the trainer is handed `hidden_states` (here: by the in-process target).
            "data": {"hidden_states_path": target_dir, "max_length": seq_length},
            "training": {"strategy": "dflash", "attention_backend": attention_backend,
                         "num_anchors": num_anchors, "batch_size": batch_size,
                         "total_steps": total_steps, "seed": seed,
                         "fsdp_sharding": "NO_SHARD" if wrap == "ddp" else "SHARD_GRAD_OP"},
        })
        draft_config = resolve_draft_config(cfg, provider=provider.draft_config)

    # The target, random-initialised where it runs (as tools/benchmark_dflash.py's target).
    torch.manual_seed(seed)
    with torch.device(device):
        target = AutoModelForCausalLM.from_config(hf_target_config, dtype=dtype)
    target.eval().requires_grad_(False)

    torch.manual_seed(seed)
    draft = provider.build_draft(cfg, draft_config).to(device=device, dtype=dtype)

    # `_build_dflash_family_model`, with the target's embedding / LM head handed over in memory
    # (SpecForge reads the same two tensors from the checkpoint's safetensors).
    mask_token_id = resolve_mask_token_id(explicit=cfg.model.mask_token_id, tokenizer=None,
                                          draft_model=draft,
                                          embedding_vocab_size=int(draft.config.vocab_size))
    draft.mask_token_id = mask_token_id
    if getattr(draft.config, "dflash_config", None) is None:
        draft.config.dflash_config = {}
    draft.config.dflash_config["mask_token_id"] = mask_token_id
    draft.config.dflash_config["target_layer_ids"] = list(draft.target_layer_ids)
    with torch.device("meta"):
        target_parts = TargetEmbeddingsAndHead(hf_target_config)
    target_parts.embed_tokens.weight = target.get_input_embeddings().weight
    target_parts.lm_head.weight = target.get_output_embeddings().weight
    target_parts.eval().requires_grad_(False)

    from specforge.algorithms.common.dflash_family_model import OnlineDFlashModel

    t = cfg.training
    model = OnlineDFlashModel(
        draft_model=draft, target_lm_head=target_parts.lm_head,
        target_embed_tokens=target_parts.embed_tokens, mask_token_id=mask_token_id,
        block_size=int(draft.block_size), attention_backend=t.attention_backend,
        num_anchors=t.num_anchors, loss_decay_gamma=t.loss_decay_gamma,
        objective_chunk_blocks=t.objective_chunk_blocks, loss_type=t.loss_type,
        dpace_alpha=t.dpace_alpha,
    ).to(device=device, dtype=dtype)
    if anchors is not None:
        positions, keep = (a.to(device) for a in anchors)
        model._sample_anchor_positions = lambda seq_len, loss_mask, dev: (positions, keep)

    own_group = wrap != "none" and _ensure_process_group(device)
    parallel = ParallelConfig.from_distributed(sharding_strategy=t.fsdp_sharding,
                                               param_dtype=dtype)
    optimizer_factory = _ConfiguredOptimizerFactory(cfg)
    optimizer_factory.configure_total_steps(total_steps)
    backend = FSDPTrainingBackend(parallel, optimizer_factory=optimizer_factory)
    wrapped = backend.prepare_model(model, wrap=wrap != "none", optimizer_target=model.draft_model)
    strategy = registration.providers.step.build(wrapped, target_head=None)
    core = TrainerCore(strategy, backend, accumulation_steps=t.accumulation_steps)
    strategy.trainable_module().train()  # as TrainerController.fit does

    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab - 1, (batch_size, seq_length), generator=g).to(device)
    loss_mask = (torch.arange(seq_length) >= response_start).float().expand(
        batch_size, -1).contiguous().to(device)
    step = SpecForgeStep(
        target=target, model=model, wrapped=wrapped, backend=backend, core=core, cfg=cfg,
        draft_config=draft_config, input_ids=input_ids, loss_mask=loss_mask,
        attention_backend=model.attention_backend,
        draft_attn_implementation=draft.config._attn_implementation,
        target_layer_ids=list(draft.target_layer_ids), mask_token_id=mask_token_id,
        wrapper=backend._wrapper_kind, include_target=include_target,
        logits_to_keep=0 if target_logits else 1, own_process_group=own_group,
        cached_hidden=None, device=device, dtype=dtype)
    if not include_target:
        step.cached_hidden = step.target_hidden_states()
    return step
