"""DFlash2's candidate selector: re-rank the backbone's top-K tokens per block slot and walk one
path from the anchor (dflash2_and_swa_spec.md §4, §8), over a vocabulary split across TP.

    score_k[j] = U_k[j] + Σ_r A[π_k, r] · p_k[r] · B[C_k[j], r]

U_k, C_k: the top-K values and ids of slot k's (transformed) logits; p_k = hidden_projection(h_k)
of its final-norm hidden state; A, B: the predecessor and successor codebooks [V, r]; π_k the
token before slot k (the anchor for slot 1; at inference the token chosen at k-1, in training the
data's token: teacher forcing).

Tensor parallelism never gathers the vocabulary. The codebooks are split over it like the
embedding (megatron's `VocabParallelEmbedding`, the same rows per rank as the output layer's
logits); candidate ids are global.
  * top-K: each rank's top-K of its logits slice is all-gathered (K·TP values a row) and the
    global top-K taken from those (`candidates`);
  * A[π]: a vocab-parallel lookup (masked rows, all-reduce);
  * B[C]·ctx: each rank dots ctx = A[π]·p with the successor rows it owns and the [M, K] partial
    scores are all-reduced; ctx's gradient is all-reduced in backward (megatron's copy/reduce
    pair of a row-parallel layer), so every rank computes the same scores, the replicated
    `hidden_projection` gets the same gradient everywhere and each codebook slice its own rows'.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import (VocabParallelEmbedding,
                                           copy_to_tensor_model_parallel_region,
                                           gather_from_tensor_model_parallel_region,
                                           reduce_from_tensor_model_parallel_region)
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import get_pg_rank, get_pg_size

from megatron_dflash.layers import DuplicatedLinear


class CandidateSelector(MegatronModule):
    """The selector's weights (`hidden_projection` [r, H], replicated; the codebooks [V/tp, r],
    vocabulary-parallel) and its vocabulary-parallel operations.

    Initialised as the trainers do (spec §6): predecessor ~ N(0, init_method_std), successor 0
    (a fresh selector walks the unary argmax), hidden projection with the draft's init method.
    """

    def __init__(self, config, dflash_config, tp_group=None):
        super().__init__(config=config)
        vocab, rank = dflash_config.vocab_size, dflash_config.selector_rank
        self.top_k = dflash_config.selector_top_k
        self.hidden_projection = DuplicatedLinear(config.hidden_size, rank, config=config,
                                                  init_method=config.init_method, bias=False)
        std = config.init_method_std
        self.predecessor_codebook = VocabParallelEmbedding(
            vocab, rank, init_method=lambda w: torch.nn.init.normal_(w, 0.0, std), config=config,
            tp_group=tp_group)
        self.successor_codebook = VocabParallelEmbedding(
            vocab, rank, init_method=torch.nn.init.zeros_, config=config, tp_group=tp_group)

    def candidates(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(U, C) [M, K]: the top-K values (differentiable, sorted) and global ids of
        vocab-parallel logits [M, V/tp], from each rank's own top-K."""
        book = self.successor_codebook
        values, ids = logits.topk(min(self.top_k, logits.shape[-1]), dim=-1)
        ids = ids + book.vocab_start_index
        if get_pg_size(book.tp_group) == 1:
            return values, ids
        values = gather_from_tensor_model_parallel_region(values, group=book.tp_group)
        ids = gather_from_tensor_model_parallel_region(ids, group=book.tp_group)
        values, where = values.topk(self.top_k, dim=-1)
        return values, ids.gather(-1, where)

    def transitions(self, hidden: torch.Tensor, predecessors: torch.Tensor,
                    ids: torch.Tensor) -> torch.Tensor:
        """[M, K'] Σ_r A[π, r]·p[r]·B[id, r] in fp32 for rows `hidden` [M, H] (TP-replicated),
        their predecessors [M] and candidate ids [M, K'] (global)."""
        book = self.successor_codebook
        context = (self.predecessor_codebook(predecessors).float()
                   * self.hidden_projection(hidden)[0].float())
        context = copy_to_tensor_model_parallel_region(context, group=book.tp_group)
        local = ids - book.vocab_start_index
        owned = (local >= 0) & (local < book.num_embeddings_per_partition)
        rows = F.embedding(local.clamp(0, book.num_embeddings_per_partition - 1), book.weight)
        partial = torch.einsum("mr,mkr->mk", context, rows.float())
        partial = torch.where(owned, partial, torch.zeros_like(partial))
        return reduce_from_tensor_model_parallel_region(partial, group=book.tp_group)

    @torch.no_grad()
    def walk(self, hidden: torch.Tensor, logits: torch.Tensor,
             anchor: torch.Tensor) -> torch.Tensor:
        """The greedy path [n] for slots 1..n: final-norm hidden states [n, H], their
        vocab-parallel (transformed) logits [n, V/tp] and the anchor token [1]."""
        unary, candidates = self.candidates(logits)
        predecessor, path = anchor.reshape(1), []
        for k in range(hidden.shape[0]):
            scores = unary[k:k + 1].float() + self.transitions(
                hidden[k:k + 1], predecessor, candidates[k:k + 1])
            predecessor = candidates[k:k + 1].gather(1, scores.argmax(1, keepdim=True))[:, 0]
            path.append(predecessor)
        return torch.cat(path)


def vocab_parallel_pick(logits: torch.Tensor, ids: torch.Tensor, tp_group) -> torch.Tensor:
    """[M] logits [M, V/tp] at global `ids` [M] (the owning rank's value, all-reduced;
    differentiable)."""
    width = logits.shape[-1]
    local = ids - get_pg_rank(tp_group) * width
    owned = (local >= 0) & (local < width)
    picked = logits.gather(-1, local.clamp(0, width - 1)[:, None])[:, 0]
    picked = torch.where(owned, picked, torch.zeros_like(picked))
    return reduce_from_tensor_model_parallel_region(picked, group=tp_group)


def selector_cross_entropy(selector: CandidateSelector, unary: torch.Tensor,
                           hidden: torch.Tensor, predecessors: torch.Tensor,
                           gold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(K-way cross-entropy [M], the selector's choice [M]) for rows with vocab-parallel unary
    logits [M, V/tp], hidden states [M, H], teacher-forced predecessors [M] and gold tokens [M].

    The candidates are the unary top-K; where the gold token is not among them it replaces the
    lowest one, with its own unary logit (ModelOpt's `inject_last`, spec §8), so every row has a
    correct class. The choice is taken over the true top-K: the token decoding would propose.
    """
    top_k = selector.top_k
    values, ids = selector.candidates(unary)
    gold_value = vocab_parallel_pick(unary, gold, selector.successor_codebook.tp_group)
    scores = (torch.cat([values, gold_value[:, None]], dim=1).float()
              + selector.transitions(hidden, predecessors, torch.cat([ids, gold[:, None]], 1)))
    choice = ids.gather(1, scores[:, :top_k].argmax(1, keepdim=True))[:, 0]
    hit = ids == gold[:, None]
    found = hit.any(1)
    injected = torch.cat([scores[:, :top_k - 1], scores[:, top_k:]], dim=1)
    logits = torch.where(found[:, None], scores[:, :top_k], injected)
    target = torch.where(found, hit.long().argmax(1), torch.full_like(gold, top_k - 1))
    return F.cross_entropy(logits, target, reduction="none"), choice
