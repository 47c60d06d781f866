"""Capture the target's residual stream after the tapped layers (the DFlash context features).

DFlash layer id i is the hidden-states output of the target layer with `layer_number == i + 1`
(HF `hidden_states[i + 1]`), before the final norm. Forward hooks on the target's
TransformerLayers record it; only taps on this pipeline stage are hooked. Layouts follow
megatron: [s, b, h], sequence-sharded ([s/tp, b, h]) under sequence parallelism.
"""
from __future__ import annotations

import contextlib
from functools import partial
from typing import Sequence

import torch
from megatron.core.models.gpt import GPTModel

from megatron_dflash.config import check_layer_ids


class FeatureCapture:
    """Context manager that hooks the tapped layers of this pipeline stage.

        with FeatureCapture(target, target_layer_ids) as capture:
            logits, features = target_forward(target, input_ids, position_ids, capture)

    Args:
        gpt_model: the target (any pipeline stage).
        layer_ids: DFlash target layer ids (0-based, global, strictly increasing).
    """

    def __init__(self, gpt_model: GPTModel, layer_ids: Sequence[int]):
        check_layer_ids(list(layer_ids), gpt_model.config.num_layers)
        layers = {layer.layer_number - 1: layer for layer in gpt_model.decoder.layers}
        self.local_ids = [i for i in layer_ids if i in layers]  # this stage's taps, in order
        self._layers = {i: layers[i] for i in self.local_ids}
        self._captured: dict[int, torch.Tensor] = {}
        self._handles = []
        self.active = False

    def __enter__(self) -> "FeatureCapture":
        if self.active:
            raise RuntimeError("FeatureCapture is already active")
        self._captured.clear()
        self._handles = [layer.register_forward_hook(partial(self._record, i))
                         for i, layer in self._layers.items()]
        self.active = True
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.active = False

    def _record(self, layer_id, module, args, output):
        # A copy, detached: later layers or CUDA graphs may reuse the residual stream's memory.
        hidden = output[0] if isinstance(output, tuple) else output
        self._captured[layer_id] = hidden.detach().clone()

    def features(self) -> torch.Tensor | None:
        """This stage's taps of the last forward, concatenated along hidden in id order:
        [s(/tp under SP), b, K_local * h]; None when no tap is on this stage.

        Hands the tensors over: the next call needs another forward. Raises RuntimeError if a
        local tap did not run since the last call.
        """
        if not self.local_ids:
            return None
        missing = [i for i in self.local_ids if i not in self._captured]
        if missing:
            raise RuntimeError(f"target layers {missing} did not run since the last features() "
                               "call (forward the target inside the FeatureCapture context)")
        return torch.cat([self._captured.pop(i) for i in self.local_ids], dim=-1)


def target_forward(gpt_model: GPTModel, input_ids: torch.Tensor, position_ids: torch.Tensor,
                   capture: FeatureCapture) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Run the frozen target under `torch.no_grad()` with causal attention and capture features.

    Args:
        input_ids, position_ids: [b, s]. megatron's RoPE uses positions 0..s-1 whatever
            `position_ids` holds. On a later pipeline stage the input comes from
            `gpt_model.set_input_tensor` as usual.
        capture: a FeatureCapture of `gpt_model`; entered for this call if it is not active.
    Returns:
        (vocab-parallel logits [b, s, V/tp] on the last stage, else None;
         `capture.features()`).
    """
    hooks = contextlib.nullcontext() if capture.active else capture
    with torch.no_grad(), hooks:
        output = gpt_model(input_ids=input_ids, position_ids=position_ids, attention_mask=None)
    return (output if gpt_model.post_process else None), capture.features()
