"""SpecForge 0.2.0's own DFlash training step, as the benchmark's side-by-side baseline.

    .venv/bin/pip install --no-deps specforge==0.2.0    (optional; never needed by training)
    python tools/specforge_baseline.py --target-config DIR --seq-length 1024 --num-anchors 128 \
        --num-draft-layers 1 --dtype fp32 --configuration fastest --steps 2 --json sf.json

As a script it measures one configuration (`tools/benchmark_dflash.py` runs it in a process of its
own per case): seconds per step, loss and peak memory written to --json before one more step is
counted by FlopCounterMode (`step_cost.measure_step`; not run under FlexAttention, which the
counter cannot see). `DIR` holds the target's HF `config.json` (a real model's directory will do:
only the config is read; the weights are random).

`build_specforge_step(hf_config, ...)` returns a zero-argument callable that runs exactly one
SpecForge DFlash training step on a fresh batch and returns its loss. Everything the step does is
SpecForge's code, built as its `specforge train` assembly builds it (`training/assembly.py`,
`algorithms/model_providers.py`):

  draft         `training.model_loading.resolve_draft_config` on a `Config` whose target is the
                given HF config (the draft generated from it, then `draft_num_hidden_layers` /
                `draft_block_size` applied: target_layer_ids = `build_target_layer_ids(L, n)`),
                built by the DFlash provider's `build_draft` (`DFlashDraftModel`, with
                `config._attn_implementation = training.attention_backend`)
  model         `algorithms.common.dflash_family_model.OnlineDFlashModel` with the config's
                defaults, as `_build_dflash_family_model` builds it, its frozen embedding / LM
                head SpecForge's `TargetEmbeddingsAndHead` holding the in-process target's tensors
  backend       `training.backend.FSDPTrainingBackend(ParallelConfig.from_distributed(...))`
                `.prepare_model(model, wrap=..., optimizer_target=model.draft_model)`: FSDP1
                SHARD_GRAD_OP (its default: per-decoder-layer auto wrap, mixed precision), its
                `NO_SHARD` path (DDP), or `wrap=False` (the bare module)
  optimizer     `optimizer.BF16Optimizer` (fp32 master AdamW, lr 1e-4, grad clip 0.5, cosine
                schedule, 1.5% warmup) via `training.assembly._ConfiguredOptimizerFactory`
  step          `training.controller.TrainerCore(accumulation_steps=1).train_step` over the
                provider's `DFlashTrainStrategy`: `OnlineDFlashModel.forward` (anchor sampling,
                noise embedding, DFlash mask, draft, LM head + CE over all N*B block slots, in
                slices of `objective_chunk_blocks` blocks under activation checkpointing, so
                executed twice, unless it is 0), loss normalisation, `backend.backward`, gradient
                scaling, `BF16Optimizer.step` (clip, AdamW, LR step, copy back).

CONFIGURATIONS (`configuration(name, device)`), SpecForge's own knobs only:
  default   its defaults: FSDP (on CPU, where torch's FSDP1 refuses to run, its NO_SHARD path:
            DDP), flex_attention (CPU: sdpa; FlexAttention has no CPU backward in torch 2.11),
            objective_chunk_blocks 128.
  fastest   the fastest it offers for the device: no wrapper (in a world of one DDP's bucket
            all-reduce and FSDP's flat parameters only add work), objective_chunk_blocks 0 (the
            LM head + CE once over all slots, its logits kept for backward instead of
            recomputed), attention as the default (flex_attention on CUDA computes only the
            128x128 tiles the mask touches, sdpa and eager every pair; on CPU eager is slower
            than sdpa). Profiled on CPU at the qwen3-cpu shape (seq 1024, 128 anchors, 1 draft
            layer, fp32; `tools/benchmark_dflash.py` docstring) the default's ~20 s step spends
            ~14 s in the LM head's three [2048 x 1024] x [1024 x 152k] matmuls (forward,
            recompute, input gradient) and ~4.5 s in fp32 log-softmax (forward, recompute,
            backward); target 0.4 s, draft 0.6 s + backward, DDP and BF16Optimizer < 0.1 s.
            Liger kernels (`model.use_liger_kernel`) are GPU-only and not installed with it.
Both run the harness's target forward (below) with `logits_to_keep=1`.

SpecForge 0.2.0 has no in-process target: the trainer consumes `hidden_states` captured by an
external SGLang server (online) or from disk (offline). Here the target is a random-initialised HF
`AutoModelForCausalLM` built from the same config, run under `torch.no_grad()` with
`output_hidden_states=True` at the start of every step on that step's new random tokens, and the
features are cut with SpecForge's own `modeling.draft.dflash.extract_context_feature(hidden_states,
target_layer_ids)` (layer i -> HF hidden_states[i + 1], SGLang's DFlash capture convention).
FlexAttention uses a BlockMask from SpecForge's `create_dflash_block_mask` through transformers'
compiled flex attention; sdpa/eager a dense boolean [b, 1, N*B, S+N*B] mask
(`create_dflash_sdpa_mask`).
"""
from __future__ import annotations

import argparse
import hashlib
import tempfile
from typing import Any

import torch
import torch.distributed as dist
from transformers import AutoConfig

from megatron_dflash.distributed import init_distributed, shutdown_distributed
from megatron_dflash.step_cost import add_case_arguments, json_recorder, measure_step

SPECFORGE_VERSION = "0.2.0"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CONFIGURATION_NAMES = ("fastest", "default")


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


def configuration(name: str, device: torch.device) -> dict:
    """The `build_specforge_step` keywords of a named configuration (module docstring)."""
    attention = default_attention_backend(device)
    if name == "default":
        return dict(wrap="fsdp" if torch.device(device).type == "cuda" else "ddp",
                    attention_backend=attention, objective_chunk_blocks=128,
                    target_logits_to_keep=1)
    if name == "fastest":
        return dict(wrap="none", attention_backend=attention, objective_chunk_blocks=0,
                    target_logits_to_keep=1)
    raise ValueError(f"configuration {name!r} must be one of {CONFIGURATION_NAMES}")


class SpecForgeStep:
    """One SpecForge DFlash training step per call, on new random tokens (`fresh_tokens`);
    returns the step's loss (a float).

    Attributes: `attention_backend` (what `OnlineDFlashModel` and the draft's
    `_attn_implementation` use), `target_layer_ids`, `mask_token_id`, `wrapper` ("fsdp", "ddp"
    or "none"), `objective_chunk_blocks`, `logits_to_keep`, `last_result` (SpecForge's
    `StepResult`: loss, grad_norm, metrics incl. acc), `batch_digests` (one per step's tokens),
    and the parts: `target`, `model` (the `OnlineDFlashModel`), `wrapped`, `backend`, `core`,
    `cfg` (SpecForge `Config`), `input_ids`, `loss_mask`.
    """

    def __init__(self, **parts: Any):
        self.__dict__.update(parts)
        self.last_result = None
        self.batch_digests: list[str] = []

    def new_tokens(self) -> None:
        """The next batch's random tokens (drawn on the host, as a data loader hands them over)."""
        tokens = torch.randint(0, self.vocab_size - 1, tuple(self.input_ids.shape),
                               generator=self.generator)
        self.batch_digests.append(hashlib.sha1(tokens.numpy().tobytes()).hexdigest()[:16])
        self.input_ids = tokens.to(self.device)

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
        if self.fresh_tokens:
            self.new_tokens()
        return self.train_step(self.target_hidden_states())

    def close(self) -> None:
        """Destroy the process group if `build_specforge_step` created it."""
        if self.own_process_group and dist.is_initialized():
            shutdown_distributed()
        self.own_process_group = False


def build_specforge_step(hf_target_config, *, seq_length: int, num_anchors: int,
                         block_size: int, num_draft_layers: int, batch_size: int = 1,
                         device: torch.device | str | None = None,
                         dtype: torch.dtype = torch.bfloat16, seed: int = 1234,
                         attention_backend: str | None = None,
                         mask_token_id: int | None = None,
                         response_start: int | None = None,
                         wrap: str | None = None, fresh_tokens: bool = True,
                         objective_chunk_blocks: int | None = None,
                         target_logits_to_keep: int = 0, total_steps: int = 1000,
                         ) -> SpecForgeStep:
    """Build SpecForge's DFlash training (target, draft, OnlineDFlashModel, FSDP backend,
    BF16Optimizer, TrainerCore) on random batches; see the module docstring.

    hf_target_config: a `transformers` config of a Qwen3-like (or Llama) target; the target is
        random-initialised from it, on `device`, in `dtype`.
    batch: `batch_size` sequences of `seq_length` random tokens (`seed`), new ones every step
        unless `fresh_tokens` is False; the loss mask covers positions >= `response_start`
        (default seq_length // 10, as tools/benchmark_dflash.py); at least `num_anchors`
        anchors must be eligible (SpecForge: supervised and followed by a supervised token).
    mask_token_id: default vocab_size - 1 (as tools/benchmark_dflash.py).
    wrap: "fsdp" (`training.fsdp_sharding=SHARD_GRAD_OP`), "ddp" (its `NO_SHARD`: DDP) or
        "none" (`prepare_model(wrap=False)`). Default: fsdp on CUDA, ddp on CPU (torch's FSDP1
        refuses a CPU-only process: "FSDP needs a non-CPU accelerator device").
    objective_chunk_blocks: `training.objective_chunk_blocks` (default: SpecForge's, 128).
    target_logits_to_keep: the target forward's `logits_to_keep` (0: every position, as a plain
        HF forward; 1: the last token only).
    total_steps: the optimizer schedule's horizon (warmup is 1.5% of it).
    """
    reason = specforge_unavailable_reason()
    if reason is not None:
        raise RuntimeError(reason)
    from transformers import AutoModelForCausalLM

    from specforge.algorithms.common.dflash_family_model import OnlineDFlashModel
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
    training = {"strategy": "dflash", "attention_backend": attention_backend,
                "num_anchors": num_anchors, "batch_size": batch_size, "total_steps": total_steps,
                "seed": seed, "fsdp_sharding": "NO_SHARD" if wrap == "ddp" else "SHARD_GRAD_OP"}
    if objective_chunk_blocks is not None:
        training["objective_chunk_blocks"] = int(objective_chunk_blocks)

    with tempfile.TemporaryDirectory(prefix="specforge-target-") as target_dir:
        hf_target_config.save_pretrained(target_dir)  # config.json only: the draft is derived
        cfg = Config.model_validate({
            "model": {"target_model_path": target_dir, "torch_dtype": dtype_name,
                      "draft_num_hidden_layers": num_draft_layers,
                      "draft_block_size": block_size, "mask_token_id": mask_token_id},
            # Offline mode: the trainer is handed `hidden_states` (here: by the in-process target).
            "data": {"hidden_states_path": target_dir, "max_length": seq_length},
            "training": training,
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

    t = cfg.training
    model = OnlineDFlashModel(
        draft_model=draft, target_lm_head=target_parts.lm_head,
        target_embed_tokens=target_parts.embed_tokens, mask_token_id=mask_token_id,
        block_size=int(draft.block_size), attention_backend=t.attention_backend,
        num_anchors=t.num_anchors, loss_decay_gamma=t.loss_decay_gamma,
        objective_chunk_blocks=t.objective_chunk_blocks, loss_type=t.loss_type,
        dpace_alpha=t.dpace_alpha,
    ).to(device=device, dtype=dtype)

    # A world-of-one group for FSDP/DDP when the caller has none (the project's one start-up).
    own_group = wrap != "none" and init_distributed()
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
        wrapper=backend._wrapper_kind, objective_chunk_blocks=model.objective_chunk_blocks,
        fresh_tokens=fresh_tokens, generator=g, vocab_size=vocab,
        logits_to_keep=int(target_logits_to_keep), own_process_group=own_group,
        device=device, dtype=dtype)
    return step


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_case_arguments(p)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--configuration", choices=CONFIGURATION_NAMES, default="fastest")
    return p


def main(argv=None) -> dict:
    """Measure one configuration (`step_cost.measure_step`); the result also goes to --json."""
    args = build_parser().parse_args(argv)
    reason = specforge_unavailable_reason()
    if reason is not None:
        case = {}
        json_recorder(args.json, case)({"skipped": reason})
        return case
    device = (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
              else torch.device("cpu"))
    settings = configuration(args.configuration, device)
    step = build_specforge_step(
        AutoConfig.from_pretrained(args.target_config), seq_length=args.seq_length,
        num_anchors=args.num_anchors, block_size=args.block_size,
        num_draft_layers=args.num_draft_layers, batch_size=args.micro_batch_size,
        device=device, dtype=DTYPES[args.dtype], seed=args.seed,
        total_steps=args.warmup + args.steps + 1000, **settings)
    case = {"attention": step.attention_backend,
            "specforge": {"configuration": args.configuration, "wrapper": step.wrapper,
                          "attention_backend": step.attention_backend,
                          "objective_chunk_blocks": step.objective_chunk_blocks,
                          "target_logits_to_keep": step.logits_to_keep, "dtype": args.dtype},
            "tokens": args.micro_batch_size * args.seq_length,
            "block_tokens": args.micro_batch_size * args.num_anchors * args.block_size}

    write = json_recorder(args.json, case)

    def record(result: dict) -> None:
        write({**result, "batches": len(step.batch_digests),
               "distinct_batches": len(set(step.batch_digests))})

    def broken():  # --break-flop-counter: a step that fails under the counter
        raise TypeError("flop counter failure forced by --break-flop-counter")

    count_with = broken if args.break_flop_counter else step
    if step.attention_backend == "flex_attention":  # what the counter cannot see: not counted
        count_with = None
        case["counter_error"] = "not counted: FlexAttention is invisible to FlopCounterMode"
    try:
        measure_step(step, args.warmup, args.steps, record, count_with)
    finally:
        step.close()
    return case


if __name__ == "__main__":
    main()
