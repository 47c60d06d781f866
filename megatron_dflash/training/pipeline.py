"""Pipeline parallelism for DFlash training: the target's stages carry the captured features to
the draft on the last stage inside megatron-core's own 1F1B schedule.

Every stage sends the next one a single tensor, its target output widened by the K tap slots:

    payload = [hidden | tap_0 | ... | tap_{K-1}]        [s(/tp under SP), b, H * (1 + K)]

A stage runs its target layers under no_grad, writes the taps it owns into their slots and passes
the others on (zeros until the stage that owns them). Micro-batches differ in length, so the
schedule exchanges each payload's shape (`variable_seq_lengths`), which also carries the width.

Backward. The target is frozen, so no stage keeps target activations, and the only gradient that
matters is the draft's on the last stage. megatron's schedule still sends every stage's
`input_tensor.grad` upstream, and for a None gradient `send_backward` sends nothing, leaving the
previous stage waiting forever in `recv_backward`: `link_received` hands the received tensor a
defined zero gradient instead.
"""
from __future__ import annotations

import torch
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.gpt import GPTModel
from megatron.core.utils import get_pg_rank, get_pg_size

from megatron_dflash.targets import HFCheckpoint


class _ZeroGradToReceived(torch.autograd.Function):
    """`output` unchanged (not a view, so the schedule may free a sent payload); in backward,
    `output`'s gradient passes through and `received` gets zeros."""

    @staticmethod
    def forward(ctx, output, received):
        ctx.received = (received.shape, received.dtype, received.device)
        return output.detach()

    @staticmethod
    def backward(ctx, grad_output):
        shape, dtype, device = ctx.received
        return (grad_output if ctx.needs_input_grad[0] else None,
                torch.zeros(shape, dtype=dtype, device=device))


def link_received(output: torch.Tensor, received: torch.Tensor | None) -> torch.Tensor:
    """`output`, tied to the tensor received from the previous stage (None on the first stage)
    so that the schedule's backward gives `received` a zero gradient and the previous stage's
    `recv_backward` completes."""
    return output if received is None else _ZeroGradToReceived.apply(output, received)


def pack(hidden: torch.Tensor, taps: list[torch.Tensor | None]) -> torch.Tensor:
    """The payload [s, b, H*(1+K)]: hidden, then every tap slot (zeros where not captured yet)."""
    return torch.cat([hidden] + [torch.zeros_like(hidden) if t is None else t for t in taps], -1)


def unpack(payload: torch.Tensor, num_taps: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Inverse of `pack`: (hidden [s, b, H] contiguous, K tap slots)."""
    hidden, *taps = payload.chunk(1 + num_taps, dim=-1)
    return hidden.contiguous(), taps


def word_embedding_replica(target: GPTModel, hf_path: str) -> LanguageModelEmbedding:
    """A frozen copy of the target's vocab-parallel word embedding for a last stage that has none
    (PP > 1): the draft embeds its block tokens with it. A tied target shares its output layer's
    weight (the same tensor); an untied one reads its vocab slice of the family's
    `embed_tokens.weight` from `hf_path`."""
    embedding = LanguageModelEmbedding(
        config=target.config, vocab_size=target.vocab_size,
        max_sequence_length=target.max_sequence_length,
        position_embedding_type=target.position_embedding_type, tp_group=target.pg_collection.tp)
    if target.share_embeddings_and_output_weights:
        embedding.word_embeddings.weight = target.output_layer.weight
    else:
        tp = target.pg_collection.tp
        with HFCheckpoint(hf_path) as checkpoint, torch.no_grad():
            embedding.word_embeddings.weight.copy_(checkpoint.get_shard(
                f"{target.target_family.hf_prefix}embed_tokens.weight", 0, get_pg_rank(tp),
                get_pg_size(tp)))
    return embedding.requires_grad_(False).eval()
