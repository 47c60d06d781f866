"""The model chunk megatron's schedules, DDP and optimizer see: frozen target + trainable draft.

Wrapping both in one `MegatronModule` lets the stock machinery do the rest: DDP and the
DistributedOptimizer only collect parameters that require grad (the draft), `finalize_model_grads`
reads this module's config (the draft's: q/k-norm and sequence-parallel gradient reductions), and
the checkpoint holds only the draft because `sharded_state_dict` exposes only the draft.

With pipeline parallelism each stage holds its slice of the target; only the last stage holds the
draft (and so trainable parameters). Earlier stages forward the captured features in the pipeline
payload (`training.pipeline`); their DDP buffers and optimizers are empty but still take part in
megatron's collectives.

With context parallelism the target runs on this CP rank's chunks of the sequence and the draft,
on the whole context gathered back, runs this rank's share of the blocks (`context_parallel`).

Packed rows (`--pack-sequences`) reach the target as one THD sequence with its documents'
boundaries, which every stage reads from its own micro-batch (`packed_sequences`).
"""
from __future__ import annotations

from functools import partial
from typing import Sequence

import torch
from megatron.core import tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_dflash.context_parallel import gather_context, target_inputs
from megatron_dflash.model import DFlashDraftModel, output_weight, target_head
from megatron_dflash.packed_sequences import DocumentBoundaries, rows_from_thd
from megatron_dflash.targets.capture import FeatureCapture
from megatron_dflash.training.pipeline import link_received, pack, unpack


class DFlashTrainingModule(MegatronModule):
    """Runs this stage's frozen target layers (no grad, taps captured) and, on the last stage, the
    draft, on one micro-batch.

    Args:
        target: this pipeline stage's GPTModel (`build_target`).
        draft: the draft, on the last pipeline stage only.
        config, target_layer_ids: the draft's TransformerConfig and taps, given on stages without
            the draft (the schedule, DDP and `finalize_model_grads` read the config everywhere).
        embedding: the target's word embedding for a last stage that has none (PP > 1), from
            `pipeline.word_embedding_replica`.
    """

    def __init__(self, target, draft: DFlashDraftModel | None = None, *,
                 config: TransformerConfig | None = None,
                 target_layer_ids: Sequence[int] | None = None,
                 embedding: LanguageModelEmbedding | None = None):
        super().__init__(config=draft.config if draft is not None else config)
        self.model_type = ModelType.encoder_or_decoder  # what megatron's schedules look up
        # What finalize_model_grads looks up on PP > 1: the target's embedding is frozen, so there
        # is no gradient of a tied embedding to all-reduce between the first and last stage.
        self.pre_process, self.post_process = target.pre_process, target.post_process
        self.share_embeddings_and_output_weights = False
        for p in target.parameters():
            p.requires_grad_(False)
        self.target = target
        self.draft = draft
        self.cp_group = target.pg_collection.cp
        if draft is not None:
            target_layer_ids = draft.dflash_config.target_layer_ids
            embed, output = target_head(target)
            if embedding is not None:
                self.embedding = embedding
                embed = partial(embedding, position_ids=None)
            elif not target.pre_process:
                raise ValueError("this stage has no target embedding for the draft: pass "
                                 "embedding=word_embedding_replica(target, hf_path)")
            draft.borrow_target_head(embed, output)
        self._capture = FeatureCapture(target, target_layer_ids)
        self._num_taps = len(target_layer_ids)
        self._local_slots = [list(target_layer_ids).index(i) for i in self._capture.local_ids]
        self._received = None

    def train(self, mode: bool = True) -> "DFlashTrainingModule":
        """Only the draft changes mode: the frozen target always runs as at inference (megatron's
        MoE layer, for one, refuses training mode under TP without sequence parallelism)."""
        super().train(mode)
        self.target.eval()
        return self

    def set_input_tensor(self, input_tensor) -> None:
        """The previous stage's payload (megatron's schedule hook; [None] on the first stage)."""
        self._received = input_tensor[0] if isinstance(input_tensor, list) else input_tensor

    def forward(self, tokens, position_ids, block_input_ids, attention_mask, block_position_ids,
                features=None, documents: DocumentBoundaries | None = None):
        """Last stage: (draft final-norm hidden states [Q(/tp), b, H], target hidden states
        [S(/cp)(/tp), b, H]). Other stages: the payload for the next stage [s(/cp)(/tp), b,
        H*(1+K)]. `tokens`, `position_ids` [b, S]: the whole sequence (under CP the target takes
        this rank's chunks).

        `features` [S, b, K*H]: the taps read from the offline cache (`feature_cache`; one
        stage, a target built without decoder layers): the target does not run and the second
        output is None.

        `documents`: the boundaries of packed rows. The target then takes the b rows as one THD
        sequence of b*S tokens (megatron's packed sequences: each document attended and
        positioned alone), its payload is [b*S(/tp), 1, H*(1+K)] and its outputs come back to
        [S(/tp), b, ...] for the draft and the loss.

        The target runs under no_grad (none of its activations are kept for backward) and never
        through its output layer: the loss projects only the rows it reads (`head_loss`). Its
        hidden states are final-norm ones, the teacher's for distillation, unless it was built
        as a feature extractor (`build_target(last_layer=...)`).
        """
        if features is not None:
            if self.config.sequence_parallel:
                features = tensor_parallel.scatter_to_sequence_parallel_region(
                    features, group=self.draft.tp_group)
            return self.draft(block_input_ids, features.to(self.config.params_dtype),
                              attention_mask, block_position_ids, return_hidden=True), None
        received = self._received
        if received is None:
            hidden, taps = None, [None] * self._num_taps
        else:
            hidden, taps = unpack(received.detach(), self._num_taps)
        self.target.set_input_tensor(hidden)
        rows, packed = tokens.shape[0], None
        if documents is not None:
            packed = documents.packed_seq_params()
            tokens, position_ids = tokens.reshape(1, -1), position_ids.reshape(1, -1)
        else:
            tokens, position_ids = target_inputs(tokens, position_ids, self.cp_group)
        with torch.no_grad(), self._capture:
            hidden = self.target(tokens, position_ids, attention_mask=None,
                                 packed_seq_params=packed, output_processor=_decoder_output)
        local = self._capture.features()
        if local is not None:
            for slot, tap in zip(self._local_slots, local.chunk(len(self._local_slots), dim=-1)):
                taps[slot] = tap
        if self.draft is None:
            return link_received(pack(hidden, taps), received)
        context = torch.cat(taps, dim=-1)
        if documents is not None:
            context, hidden = (rows_from_thd(t, rows, self.draft.tp_group,
                                             self.config.sequence_parallel)
                               for t in (context, hidden))
        else:
            context = gather_context(context, self.cp_group, self.draft.tp_group,
                                     self.config.sequence_parallel)
        draft_hidden = self.draft(block_input_ids, context, attention_mask, block_position_ids,
                                  return_hidden=True)
        return link_received(draft_hidden, received), hidden

    def output_weight(self) -> torch.Tensor:
        """The target's frozen vocab-parallel output weight [V/tp, H] (last stage)."""
        return output_weight(self.target)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """Only the draft (empty before the last stage): the target is frozen and is loaded from
        its own checkpoint."""
        if self.draft is None:
            return {}
        return self.draft.sharded_state_dict(prefix=f"{prefix}draft.",
                                             sharded_offsets=sharded_offsets, metadata=metadata)

    def state_dict_for_save_checkpoint(self, prefix: str = "", keep_vars: bool = False):
        if self.draft is None:
            return {}
        return self.draft.state_dict_for_save_checkpoint(prefix=f"{prefix}draft.", keep_vars=keep_vars)


def _decoder_output(hidden_states, **_):
    """GPTModel `output_processor`: the decoder's output as it is, without the output layer."""
    return hidden_states
