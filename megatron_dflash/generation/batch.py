"""Batched generation (greedy or sampled) with the frozen target: a prefill of the left-padded
prompts, then one token per row per step, all over `TargetEngine`'s KV cache, optionally
capturing the taps of every position for the offline feature cache.

Sampling reuses megatron's `TorchSampling.filter_logits` (temperature, top-p) and draws each row
from its own generator, seeded from (seed, conversation id, turn), so a sample depends neither on
its batch-mates nor on the shard or a restart.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from megatron.core.inference.sampling.torch_sampling import TorchSampling

from megatron_dflash.generation.engine import TargetEngine, left_pad


@dataclass
class Sampling:
    """Greedy (temperature 0) or sampled with temperature and nucleus (top-p) filtering."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def generator(self, conversation_id: str, turn: int, device) -> torch.Generator | None:
        """The generator of one turn of one conversation (None when greedy)."""
        if self.greedy:
            return None
        digest = hashlib.sha256(f"{self.seed}\0{conversation_id}\0{turn}".encode()).digest()
        return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)


@dataclass
class Generated:
    tokens: list[int]
    """New tokens, at most max_new_tokens, ending at the first stop token if one was hit."""
    features: torch.Tensor | None = None
    """[prompt + generated tokens, K*H] taps, when capturing."""


class BatchGenerator:
    """Batched generation with a frozen megatron target (see `TargetEngine` for what it needs).

    Args:
        target: a GPTModel from `build_target(..., backend="local")` with all its layers.
        stop_token_ids: generation of a row ends after any of these.
        layer_ids: taps to capture (DFlash target layer ids), or None for no capture.
    """

    def __init__(self, target, stop_token_ids: Iterable[int],
                 layer_ids: Sequence[int] | None = None):
        self.engine = TargetEngine(target, layer_ids)
        self.device = self.engine.device
        self.stops = torch.tensor(sorted(set(stop_token_ids)), dtype=torch.long, device=self.device)

    @property
    def capturing(self) -> bool:
        return self.engine.capture is not None

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 sampling: Sampling = Sampling(),
                 generators: Sequence[torch.Generator | None] | None = None) -> list[Generated]:
        """Generate for every prompt (token ids) in one batch; `generators` (one per prompt) draw
        the samples unless greedy."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("a prompt is empty: generation needs at least one token")
        ids, padding = left_pad(prompts, self.device, extra=max_new_tokens)
        b, length = len(prompts), ids.shape[1] - max_new_tokens
        cache = self.engine.new_cache(b, ids.shape[1])
        done = torch.zeros(b, dtype=torch.bool, device=self.device)
        counts = torch.zeros(b, dtype=torch.long, device=self.device)
        captured = []

        def forward(start: int, end: int) -> torch.Tensor:  # the last position's logits [b, V]
            logits, taps = self.engine.forward(cache, ids[:, start:end], start, padding,
                                               capture=self.capturing)
            if taps is not None:
                captured.append(taps)
            return logits[:, -1].float()

        logits = forward(0, length)
        for step in range(max_new_tokens):
            new = torch.where(done, 0, self._next(logits, sampling, generators))
            ids[:, length + step] = new
            counts += ~done
            done |= torch.isin(new, self.stops)
            if bool(done.all()) or step + 1 == max_new_tokens:
                break
            logits = forward(length + step, length + step + 1)
        if self.capturing:  # the last token's taps: one more step
            forward(length + step, length + step + 1)
        features = torch.cat(captured) if captured else None
        out = []
        for i, prompt in enumerate(prompts):
            n = int(counts[i])
            rows = features[length - len(prompt):length + n, i] if features is not None else None
            out.append(Generated(ids[i, length:length + n].tolist(), rows))
        return out

    @torch.no_grad()
    def taps(self, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """The captured taps [T, K*H] of each token sequence, by one batched forward (what
        `generate` captures, for conversations whose features a killed run did not write)."""
        ids, padding = left_pad(sequences, self.device)
        length = ids.shape[1]
        _, taps = self.engine.forward(self.engine.new_cache(len(sequences), length), ids, 0,
                                      padding, capture=True)
        return [taps[length - len(s):, i] for i, s in enumerate(sequences)]

    @staticmethod
    def _next(logits, sampling: Sampling, generators) -> torch.Tensor:
        if sampling.greedy:
            return logits.argmax(-1)
        top_p = sampling.top_p if sampling.top_p < 1.0 else 0.0  # 0 = no nucleus filter
        filtered = TorchSampling.filter_logits(logits, sampling.temperature, 0, float(top_p))
        probs = filtered.softmax(-1)
        return torch.cat([torch.multinomial(probs[i], 1, generator=g)
                          for i, g in enumerate(generators)])
