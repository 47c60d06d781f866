"""The frozen megatron target's forward over a KV cache: the one masked forward that batched
regeneration (`generation.batch`) and speculative decoding's verify (`megatron_dflash.evaluate`)
both run, so the two cannot drift apart.

Why not megatron.core.inference's engines. Tried on CPU with gloo (megatron-core 0.19.2):
`StaticInferenceEngine` runs on `DynamicInferenceEngine`, whose `DynamicInferenceContext` fails at
construction without an NVIDIA driver; its fallback, the legacy static batch
(`TextGenerationController.generate_all_output_tokens_static_batch`), does run the forward steps on
CPU but times every step with `torch.cuda.Event(enable_timing=True).elapsed_time`, which has no CPU
counterpart, and fails after the last step. Even on a GPU it stops on one termination id
(`tokenizer.eod`, where a target may stop on several), draws samples for the whole batch from one
generator (a conversation's sample would depend on its batch-mates), pads prompts to the right (a
row's tokens past its prompt are computed from its neighbours' schedule) and verifies no block of
draft tokens. So the cache is megatron's `StaticInferenceContext`, driven here:

* a forward at `sequence_len_offset = offset` writes its tokens' K/V at offset.. and attends to
  everything before; moving the offset back drops entries (the next forward overwrites them).
* an explicit mask (bool, True = masked) is always passed: megatron's static path assumes one new
  token per step once the offset is past the prompt (it then switches to "no mask"), which would let
  a verified block see its own future. Megatron's local core attention applies it; Transformer
  Engine's ignores it, so the target must use the local backend.
* rows of different lengths are left-padded to the longest, so every row decodes at the same
  offset; the mask hides the padding from real tokens (a padding query sees the padding before it,
  so no row is fully masked). RoPE takes positions from the offset, so a row padded by p sits p
  positions later than alone; rotary attention depends only on relative positions, so logits agree
  with unpadded decoding up to rounding (fp32: greedy equals HF `generate` token for token, tested).
* logits are gathered over the tensor-parallel group; unless every position is asked for, only the
  last position reaches the LM head (a pre-hook on the output layer): a prefill then produces one
  row of logits per prompt, not [b, s, V].

Hybrid targets (Qwen3-Next/3.5: megatron's GatedDeltaNet layers) decode without a cache: megatron-
core 0.19.2's GatedDeltaNet raises on any inference context (its recurrent and conv states have no
place there), so the "cache" is the token history and every forward recomputes each row's whole
sequence, then returns its last positions. Rows run without their left padding (the recurrent
layers have no mask to hide it), one forward per distinct padding. Exact — a row's outputs are
those of its tokens alone — and quadratic in the length: said once when such an engine is built.
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.ssm.gated_delta_net import GatedDeltaNet
from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region
from torch.nn.utils.rnn import pad_sequence

from megatron_dflash.log import logger
from megatron_dflash.targets.capture import FeatureCapture

NO_CACHE_NOTICE = ("the target has gated-delta-net layers, which megatron-core 0.19.2 runs with no "
                   "inference state: decoding without a KV cache (each step recomputes the whole "
                   "sequence)")


class TargetEngine:
    """The frozen target (a GPTModel with all its layers, local backend, one pipeline stage, no
    sequence parallelism; any TP/EP) run over a KV cache.

    Args:
        target: the GPTModel (put in eval mode).
        layer_ids: taps that `forward(..., capture=True)` returns (DFlash target layer ids), or
            None for no capture.
    """

    def __init__(self, target, layer_ids: Sequence[int] | None = None):
        self.target = target.eval()
        self.device = next(target.parameters()).device
        self.tp_group = target.pg_collection.tp
        self.capture = FeatureCapture(target, layer_ids) if layer_ids is not None else None
        self.recompute = any(isinstance(layer.self_attention, GatedDeltaNet)
                             for layer in target.decoder.layers)
        if self.recompute:
            logger.info(NO_CACHE_NOTICE)

    def new_cache(self, batch_size: int, max_length: int) -> StaticInferenceContext | torch.Tensor:
        """A KV cache for `batch_size` rows of at most `max_length` positions (a hybrid target:
        their token history)."""
        if self.recompute:
            return torch.zeros(batch_size, max_length, dtype=torch.long, device=self.device)
        return StaticInferenceContext(batch_size, max_length)

    def gather(self, logits: torch.Tensor) -> torch.Tensor:
        """Vocabulary-parallel logits (last dim V/TP) gathered whole over the TP group (also for a
        draft that borrows this target's head)."""
        return gather_from_tensor_model_parallel_region(logits, group=self.tp_group)

    @torch.no_grad()
    def forward(self, cache: StaticInferenceContext, tokens: torch.Tensor, offset: int = 0,
                padding: torch.Tensor | None = None, *, all_positions: bool = False,
                capture: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Forward `tokens` [b, s] at positions offset..offset+s-1, the cache holding positions
        < offset. `padding` [b, >= offset+s] (True = a row's left padding) or None (no padding).

        Returns (logits [b, s, V] if `all_positions` else [b, 1, V] (the last position),
        taps [s, b, K*H] when `capture`, else None).
        """
        if capture and self.capture is None:
            raise ValueError("capture=True needs layer_ids")
        if self.recompute:
            return self._recompute(cache, tokens, offset, padding, all_positions, capture)
        s = tokens.shape[1]
        query = torch.arange(offset, offset + s, device=self.device)
        mask = (torch.arange(offset + s, device=self.device)[None, :] > query[:, None])[None, None]
        if padding is not None:  # padding keys hidden from real queries
            keys = padding[:, None, None, :offset + s]
            mask = mask | (keys & ~padding[:, None, offset:offset + s, None])
        cache.sequence_len_offset = offset
        head = (None if all_positions else
                self.target.output_layer.register_forward_pre_hook(_last_position))
        try:
            with self.capture if capture else contextlib.nullcontext():
                logits = self.target(tokens, None, attention_mask=mask, inference_context=cache)
        finally:
            if head is not None:
                head.remove()
        return self.gather(logits), (self.capture.features() if capture else None)

    def _recompute(self, history: torch.Tensor, tokens: torch.Tensor, offset: int,
                   padding: torch.Tensor | None, all_positions: bool, capture: bool):
        """`forward` without a cache (module docstring): `history` [b, max_length] holds every
        row's tokens; rows sharing a padding run together, each from its first real token."""
        b, s = tokens.shape
        end = offset + s
        history[:, offset:end] = tokens
        starts = (padding[:, :end].sum(1) if padding is not None
                  else torch.zeros(b, dtype=torch.long, device=self.device))
        logits = taps = None
        for start in starts.unique().tolist():
            rows = (starts == start).nonzero().flatten()
            keep = min(s if all_positions else 1, end - start)
            head = self.target.output_layer.register_forward_pre_hook(
                lambda module, args, keep=keep: (args[0][-keep:],) + tuple(args[1:]))
            try:
                with self.capture if capture else contextlib.nullcontext():
                    out = self.gather(self.target(history[rows, start:end], None,
                                                  attention_mask=None))
            finally:
                head.remove()
            if logits is None:
                logits = out.new_zeros(b, s if all_positions else 1, out.shape[-1])
            logits[rows, logits.shape[1] - keep:] = out
            if capture:
                features = self.capture.features()[-min(s, end - start):]
                if taps is None:
                    taps = features.new_zeros(s, b, features.shape[-1])
                taps[s - features.shape[0]:, rows] = features
        return logits, taps


def _last_position(module, args):
    """Output-layer pre-hook ([s, b, h] in): only the last position's logits are needed."""
    return (args[0][-1:],) + tuple(args[1:])


def left_pad(sequences: Sequence[Sequence[int]], device, extra: int = 0
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [b, L + extra], padding [b, L + extra]): the token sequences left-padded with 0 to the
    longest (L), then `extra` columns of 0 for what is generated; padding is True on the left
    padding only."""
    rows = [torch.as_tensor(s, dtype=torch.long, device=device) for s in sequences]
    ids = pad_sequence(rows, batch_first=True, padding_value=0, padding_side="left")
    lengths = torch.tensor([len(r) for r in rows], device=device)
    length = ids.shape[1]
    padding = torch.arange(length + extra, device=device)[None, :] < (length - lengths)[:, None]
    ids = torch.cat([ids, ids.new_zeros(len(rows), extra)], dim=1)
    return ids, padding
