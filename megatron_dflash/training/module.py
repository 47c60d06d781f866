"""The model chunk megatron's schedules, DDP and optimizer see: frozen target + trainable draft.

Wrapping both in one `MegatronModule` lets the stock machinery do the rest: DDP and the
DistributedOptimizer only collect parameters that require grad (the draft), `finalize_model_grads`
reads this module's config (the draft's: q/k-norm and sequence-parallel gradient reductions), and
the checkpoint holds only the draft because `sharded_state_dict` exposes only the draft.
"""
from __future__ import annotations

import torch
from megatron.core.enums import ModelType
from megatron.core.transformer.module import MegatronModule

from megatron_dflash.model import DFlashDraftModel, target_head
from megatron_dflash.target.capture import FeatureCapture


class DFlashTrainingModule(MegatronModule):
    """Runs the frozen target (no grad, taps captured) and the draft on one micro-batch."""

    def __init__(self, target, draft: DFlashDraftModel):
        super().__init__(config=draft.config)
        self.model_type = ModelType.encoder_or_decoder  # what megatron's schedules look up
        for p in target.parameters():
            p.requires_grad_(False)
        self.target = target
        self.draft = draft
        draft.borrow_target_head(*target_head(target))
        self._capture = FeatureCapture(target, draft.dflash_config.target_layer_ids)

    def set_input_tensor(self, input_tensor) -> None:
        """Pipeline input from the previous stage goes to the target (megatron's schedule hook)."""
        self.target.set_input_tensor(input_tensor)

    def forward(self, tokens, position_ids, block_input_ids, attention_mask, block_position_ids):
        """Returns (draft vocab-parallel logits [Q, b, V/tp], target logits [b, S, V/tp]).

        The target runs under no_grad: none of its activations are kept for backward.
        """
        with torch.no_grad(), self._capture:
            target_logits = self.target(tokens, position_ids, attention_mask=None)
        features = self._capture.features()
        logits = self.draft(block_input_ids, features, attention_mask, block_position_ids)
        return logits, target_logits

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """Only the draft: the target is frozen and is loaded from its own checkpoint."""
        return self.draft.sharded_state_dict(prefix=f"{prefix}draft.",
                                             sharded_offsets=sharded_offsets, metadata=metadata)

    def state_dict_for_save_checkpoint(self, prefix: str = "", keep_vars: bool = False):
        return self.draft.state_dict_for_save_checkpoint(prefix=f"{prefix}draft.", keep_vars=keep_vars)
