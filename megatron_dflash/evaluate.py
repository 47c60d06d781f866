"""Lossless greedy speculative decoding with a megatron target and a DFlash draft (spec §7).

`SpeculativeDecoder.generate` is the reference loop (`dflash.model.dflash_generate`, T=0) on
megatron modules: prefill the target and capture its taps for every prompt token; then per step
draft one block `[bonus, MASK x (B-1)]` at positions start..start+B-1 from the context features
new since the last step, verify the block with one causal target forward, accept the longest
matching prefix plus the target's bonus token. Every emitted token is the target's argmax, so
the output equals target-only greedy decoding; `block_size=1` is that baseline, run through the
same loop (as the reference benchmark does). A DFlash draft proposes each slot's argmax; a DFlash2
draft its candidate selector's greedy path over each slot's top-K, from the anchor (the
reference's `DFlash2DraftModel.propose` at T=0): `DFlashDraftModel.propose`.

KV caches. The target runs on `generation.engine.TargetEngine` (megatron's
`StaticInferenceContext`, the forward regeneration uses too): a verify at offset `start` writes
the block's K/V at start..start+B-1 and attends to everything before under an explicit causal
mask; rejected tokens are dropped by moving the offset back (the stale entries are overwritten by
the next forward). The target must use the local backend (see the engine for why). The draft
keeps only context K/V (`DFlashKVCache`); its causal and sliding-window layers see the block and
the cached context as the reference's do (masked by position in `DFlashDraftModel.forward`).

Metrics follow the reference benchmark: τ = tokens emitted per draft+verify step (accepted
drafts + the bonus, cut at the length limit or a stop token), averaged per request then across
requests; throughput = 1 / mean time per output token, prefill excluded; speedup = baseline
time per token / DFlash time per token.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch
from megatron.core import parallel_state

from megatron_dflash.attention import DFlashKVCache
from megatron_dflash.config import draft_transformer_config
from megatron_dflash.draft_import import load_draft_weights
from megatron_dflash.draft_reader import load_draft_source
from megatron_dflash.generation.engine import TargetEngine
from megatron_dflash.model import target_head
from megatron_dflash.specs import build_draft
from megatron_dflash.targets.hf_import import build_target, load_hf_config, load_hf_weights


@dataclass
class Generation:
    """One request's greedy generation and its per-step statistics."""

    tokens: list[int]
    """Generated tokens (the prompt excluded), at most max_new_tokens, ending at a stop token."""
    acceptance_lengths: list[int] = field(default_factory=list)
    """Tokens emitted per verify step (reference `acceptance_lengths`)."""
    accepted: list[int] = field(default_factory=list)
    """Draft tokens accepted per step, before any cut at the length limit or a stop token."""
    drafted: list[int] = field(default_factory=list)
    """Draft tokens proposed per step (B-1, fewer near the length limit)."""
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def seconds_per_token(self) -> float:
        return self.decode_seconds / max(len(self.tokens), 1)


@dataclass
class EvalReport:
    """Acceptance and speed of DFlash against target-only greedy decoding on the same prompts."""

    block_size: int
    num_requests: int
    tau: float
    """Mean over requests of the mean acceptance length (tokens per step), in [1, B]."""
    position_acceptance: list[float]
    """k = 1..B-1: fraction of steps that drafted a k-th token whose k-th token was accepted."""
    histogram: list[float]
    """Fraction of steps emitting 0..B tokens (pooled over requests)."""
    dflash_tokens_per_second: float
    baseline_tokens_per_second: float
    speedup: float
    mismatched_requests: list[int]
    """Requests whose tokens differ from target-only greedy decoding (empty = lossless)."""

    @property
    def lossless(self) -> bool:
        return not self.mismatched_requests


class SpeculativeDecoder:
    """Greedy decoding of one request at a time with a megatron target and an optional draft.

    Args:
        target: a frozen GPTModel built with the local backend (one pipeline stage, no sequence
            parallelism); any tensor-parallel size: logits are gathered over its TP group.
        draft: a DFlashDraftModel that borrows this target's head, or None (baseline only).
    """

    def __init__(self, target, draft=None):
        self.draft = draft.eval() if draft is not None else None
        self.engine = TargetEngine(target, draft.dflash_config.target_layer_ids
                                   if draft is not None else None)
        self.target = self.engine.target
        self.device = self.engine.device

    def _verify(self, cache, ids: torch.Tensor, offset: int, capture: bool
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Target forward of `ids` [s] at positions offset..offset+s-1 with the cache holding
        positions < offset: (argmax per position [s], taps [s, 1, K*H] or None)."""
        logits, features = self.engine.forward(cache, ids[None], offset, all_positions=True,
                                               capture=capture)
        return logits[0].argmax(-1), features

    @torch.no_grad()
    def generate(self, prompt, max_new_tokens: int, stop_token_ids=(),
                 block_size: int | None = None) -> Generation:
        """Greedy generation of at most `max_new_tokens` tokens after `prompt` (token ids).

        `block_size` defaults to the draft's; 1 is target-only decoding (no draft needed).
        """
        if block_size is None:
            if self.draft is None:
                raise ValueError("block_size is required without a draft")
            block_size = self.draft.dflash_config.block_size
        if block_size > 1 and self.draft is None:
            raise ValueError(f"block_size={block_size} needs a draft")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
        prompt = torch.as_tensor(prompt, dtype=torch.long, device=self.device).flatten()
        num_prompt = prompt.shape[0]
        if num_prompt < 1:
            raise ValueError("the prompt is empty: greedy decoding needs at least one token")
        max_length = num_prompt + max_new_tokens
        mask_id = self.draft.dflash_config.mask_token_id if self.draft is not None else 0
        output = torch.full((max_length + 1,), mask_id, dtype=torch.long, device=self.device)
        output[:num_prompt] = prompt
        stops = torch.tensor(list(stop_token_ids), dtype=torch.long, device=self.device)
        cache = self.engine.new_cache(1, max_length + block_size)
        draft_cache = DFlashKVCache()
        result = Generation(tokens=[])

        t0 = _now()
        posterior, features = self._verify(cache, prompt, 0, capture=block_size > 1)
        output[num_prompt] = posterior[-1]
        result.prefill_seconds = _now() - t0

        t0 = _now()
        start = num_prompt
        stopped = bool(torch.isin(output[start], stops))
        while start + 1 < max_length and not stopped:
            size = min(block_size, max_length - start)
            block = output[start:start + size].clone()
            if size > 1:
                positions = torch.arange(start - features.shape[0], start + size,
                                         device=self.device)
                hidden = self.draft(block[None], features, None, positions[None],
                                    return_hidden=True, kv_cache=draft_cache)
                block[1:] = self.draft.propose(hidden[1:], block[:1])
            posterior, features = self._verify(cache, block, start, capture=size > 1)
            accepted = int((block[1:] == posterior[:-1]).cumprod(0).sum())
            output[start:start + accepted + 1] = block[:accepted + 1]
            output[start + accepted + 1] = posterior[accepted]
            produced = min(accepted + 1, max_length - start - 1)
            hits = torch.isin(output[start + 1:start + produced + 1], stops).nonzero()
            if hits.numel():
                produced, stopped = int(hits[0]) + 1, True
            result.acceptance_lengths.append(produced)
            result.accepted.append(accepted)
            result.drafted.append(size - 1)
            if size > 1:
                features = features[:produced]
            start += produced
        result.decode_seconds = _now() - t0
        result.tokens = output[num_prompt:min(start + 1, max_length)].tolist()
        return result


def build_decoder(target_dir: str, draft_source: str, device: torch.device | None = None
                  ) -> SpeculativeDecoder:
    """The fp32 target from an HF checkpoint and the draft from a training checkpoint root or a
    reference directory, at the initialised tensor-parallel size, on `device` (default CPU).
    Raises (before building anything) if the draft does not fit the target."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    cfg, target_config, full = load_draft_source(draft_source, target_dir, tp)
    hf_config = load_hf_config(target_dir)
    target = build_target(hf_config, target_config, backend="local")
    load_hf_weights(target, target_dir)
    draft = build_draft(cfg, draft_transformer_config(cfg, target_config))
    load_draft_weights(draft, full)
    if device is not None:
        target, draft = target.to(device), draft.to(device)
    draft.borrow_target_head(*target_head(target))
    return SpeculativeDecoder(target, draft)


def tau(acceptance_lengths: list[list[int]]) -> float:
    """Mean acceptance length: per request, then across requests (requests with no step are
    skipped, as in the reference benchmark)."""
    per_request = [statistics.mean(x) for x in acceptance_lengths if x]
    return statistics.mean(per_request) if per_request else float("nan")


def position_acceptance(generations: list[Generation], block_size: int) -> list[float]:
    """k = 1..B-1: accepted k-th draft tokens / steps that drafted a k-th token."""
    rates = []
    for k in range(1, block_size):
        steps = [(a, d) for g in generations for a, d in zip(g.accepted, g.drafted) if d >= k]
        rates.append(sum(a >= k for a, _ in steps) / len(steps) if steps else float("nan"))
    return rates


def evaluate(decoder: SpeculativeDecoder, prompts: list, max_new_tokens: int,
             stop_token_ids=(), block_size: int | None = None, warmup: bool = True
             ) -> tuple[EvalReport, list[tuple[Generation, Generation]]]:
    """DFlash vs target-only greedy decoding on every prompt, interleaved per prompt so that
    both see the same machine load. Returns the report and (dflash, baseline) per prompt."""
    block_size = block_size or decoder.draft.dflash_config.block_size
    if warmup:
        for bs in (1, block_size):
            decoder.generate(prompts[0], min(16, max_new_tokens), stop_token_ids, bs)
    pairs = [(decoder.generate(p, max_new_tokens, stop_token_ids, block_size),
              decoder.generate(p, max_new_tokens, stop_token_ids, 1)) for p in prompts]
    dflash, baseline = [d for d, _ in pairs], [b for _, b in pairs]
    lengths = [x for g in dflash for x in g.acceptance_lengths]
    dflash_tpot = statistics.mean(g.seconds_per_token for g in dflash)
    baseline_tpot = statistics.mean(g.seconds_per_token for g in baseline)
    report = EvalReport(
        block_size=block_size, num_requests=len(prompts),
        tau=tau([g.acceptance_lengths for g in dflash]),
        position_acceptance=position_acceptance(dflash, block_size),
        histogram=[lengths.count(n) / len(lengths) if lengths else 0.0
                   for n in range(block_size + 1)],
        dflash_tokens_per_second=1 / dflash_tpot if dflash_tpot else float("inf"),
        baseline_tokens_per_second=1 / baseline_tpot if baseline_tpot else float("inf"),
        speedup=baseline_tpot / dflash_tpot if dflash_tpot else float("inf"),
        mismatched_requests=[i for i, (d, b) in enumerate(pairs) if d.tokens != b.tokens])
    return report, pairs


def plot_position_acceptance(rates: list[float], path: str, title: str = "") -> None:
    """A PNG bar chart of the per-position acceptance rate (Pillow: matplotlib is not a
    dependency; Pillow comes with tensorboard)."""
    from PIL import Image, ImageDraw

    width, height, left, bottom, top = 640, 400, 50, 40, 40
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    plot_w, plot_h = width - left - 20, height - top - bottom
    draw.text((left, 10), title or "DFlash acceptance rate by draft position", fill="black")
    for tick in range(0, 11, 2):
        y = top + plot_h - tick / 10 * plot_h
        draw.line([(left - 4, y), (left + plot_w, y)], fill=(220, 220, 220))
        draw.text((5, y - 6), f"{tick / 10:.1f}", fill="black")
    slot = plot_w / max(len(rates), 1)
    for i, rate in enumerate(rates):
        x0 = left + i * slot + slot * 0.15
        value = 0.0 if rate != rate else rate  # NaN: position never drafted
        draw.rectangle([x0, top + plot_h - value * plot_h, x0 + slot * 0.7, top + plot_h],
                       fill=(52, 101, 164))
        draw.text((x0, top + plot_h + 6), str(i + 1), fill="black")
    draw.line([(left, top), (left, top + plot_h), (left + plot_w, top + plot_h)], fill="black")
    draw.text((left + plot_w // 2 - 40, height - 16), "draft position k", fill="black")
    image.save(path, format="PNG")


def _now() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()
