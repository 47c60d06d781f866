"""DFlashDraftModel: the block-diffusion drafter as a megatron module.

    context = hidden_norm(fc(concat of K tapped target hidden states))     once per forward
    x       = target_embedding([anchor token, MASK, ..., MASK] per block)   frozen, vocab-parallel
    x       = TransformerBlock of DFlash layers (K/V = [context ; x]), final norm
    logits  = target_output_layer(x)                                        frozen, vocab-parallel
    tokens  = argmax(logits), or DFlash2's `candidate_selector` path        `propose`

A DFlash2 draft's layers also convolve each block (conv.py) and its selector (selector.py) is a
submodule here, trained by the loss (`head_loss`) and walked by `propose` at inference.

The target's embedding and output layer are *borrowed* (`borrow_target_head`): they are not
registered as submodules, so they are never trained, never in the draft's optimizer and never in
its checkpoint. Tensors use megatron's [sequence, batch, hidden] layout; under sequence
parallelism the features and block embeddings are sharded along the sequence.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from itertools import chain
from typing import Callable

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_dflash.attention import DFlashKVCache
from megatron_dflash.config import DFlashConfig
from megatron_dflash.loss import unary_logits, vocab_parallel_argmax
from megatron_dflash.masks import FULL, position_masks
from megatron_dflash.rope import draft_rotary_embedding


@dataclass
class DFlashModelSubmodules:
    """What a `DFlashDraftModel` is built from (`get_dflash_model_spec` in specs.py)."""

    fc: type
    hidden_norm: type
    decoder: TransformerBlockSubmodules
    selector: ModuleSpec | None = None
    """DFlash2's `CandidateSelector` (selector.py); None for DFlash."""


class DFlashDraftModel(MegatronModule):
    """DFlash drafter: fc + hidden_norm, DFlash layers, final norm; borrows the target's head.

    Args:
        config: the draft's TransformerConfig (`draft_transformer_config`).
        submodules: from `get_dflash_model_spec(...)`.
        dflash_config: a resolved `DFlashConfig`.
        pg_collection: process groups (default: megatron's global ones).
    """

    def __init__(self, config: TransformerConfig, submodules: DFlashModelSubmodules,
                 dflash_config: DFlashConfig, pg_collection: ProcessGroupCollection | None = None):
        super().__init__(config=config)
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp
        self.dflash_config = dflash_config
        hidden = config.hidden_size
        self.fc = build_module(submodules.fc, len(dflash_config.target_layer_ids) * hidden, hidden,
                               config=config, init_method=config.init_method, bias=False,
                               skip_bias_add=False)
        self.hidden_norm = build_module(submodules.hidden_norm, config=config, hidden_size=hidden,
                                        eps=config.layernorm_epsilon)
        # fc/hidden_norm are replicated over TP but see a sequence shard each under SP.
        for p in chain(self.fc.parameters(), self.hidden_norm.parameters()):
            p.sequence_parallel = config.sequence_parallel
        self.decoder = TransformerBlock(config=config, spec=submodules.decoder, pre_process=True,
                                        post_process=True, pg_collection=pg_collection)
        self.rotary_pos_emb = draft_rotary_embedding(
            dflash_config.rope_scaling, kv_channels=config.kv_channels,
            rotary_base=dflash_config.rope_theta,
            use_cpu_initialization=config.use_cpu_initialization)
        self.candidate_selector = (None if submodules.selector is None else build_module(
            submodules.selector, config=config, dflash_config=dflash_config,
            tp_group=self.tp_group))
        self._head: tuple[Callable, Callable] | None = None

    def borrow_target_head(self, embed: Callable[[torch.Tensor], torch.Tensor],
                           output: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Use the target's frozen token embedding (`ids [b, s] -> [s(/tp), b, h]`) and output layer
        (`[s(/tp), b, h] -> vocab-parallel logits [s, b, V/tp]`). See `target_head(gpt_model)`."""
        self._head = (embed, output)

    def _rotary(self, position_ids: torch.Tensor, num_context: int):
        """RoPE frequencies for explicit positions: context at 0..S-1, each block at its anchor's
        positions. Returns (query [Q, b, 1, d], key [S+Q, b, 1, d]) for `Attention.forward`.
        `inv_freq` (a plain attribute: `.to()` of the model leaves it) moves to the positions'
        device once, as megatron's own forward does: a host copy in every step would block."""
        rope = self.rotary_pos_emb
        if rope.inv_freq.device != position_ids.device:
            rope.inv_freq = rope.inv_freq.to(position_ids.device)
        freqs = position_ids.t().unsqueeze(-1).float() * rope.inv_freq
        emb = torch.cat([freqs, freqs], dim=-1).unsqueeze(2)
        return emb[num_context:], emb

    def forward(self, block_input_ids: torch.Tensor, features: torch.Tensor,
                attention_mask: torch.Tensor | None, position_ids: torch.Tensor,
                return_hidden: bool = False, kv_cache: DFlashKVCache | None = None) -> torch.Tensor:
        """
        Args:
            block_input_ids: [b, Q] block tokens, Q = blocks x block_size, each block
                `[token at anchor, MASK, ..., MASK]`.
            features: [S, b, K*H] captured target hidden states ([S/tp, ...] under SP).
            attention_mask: [b, 1, Q, S+Q] bool, True = masked, or per-kind masks
                (`LayerMasks`, `DFlashBlockMask`) for a draft whose layers differ. None:
                inference, every block query at its position: full non-causal layers see
                everything, causal and sliding ones what the reference's `_attention_mask` lets
                them (built here from the positions, once per kind of layer).
            position_ids: [b, S+Q] positions of the S context tokens, then of the Q block tokens.
            return_hidden: return the final-norm hidden states instead of logits.
            kv_cache: inference only (no mask): `features` and the first S positions are the
                context tokens new since the last call; the block also attends to the cached ones.
        Returns:
            vocab-parallel logits [Q, b, V/tp], or hidden states [Q(/tp), b, H].
        """
        if self._head is None:
            raise RuntimeError("call borrow_target_head(...) before the first forward")
        embed, _ = self._head
        hidden = embed(block_input_ids)
        if self.dflash_config.input_embedding_scale != 1.0:
            hidden = hidden * self.dflash_config.input_embedding_scale
        context = self.hidden_norm(self.fc(features)[0])
        num_block = block_input_ids.shape[1]
        with contextlib.ExitStack() as stack:
            if kv_cache is not None:
                cached = kv_cache.add_positions(position_ids[:, :-num_block])
                position_ids = torch.cat([cached, position_ids[:, -num_block:]], dim=1)
                for layer in self.decoder.layers:
                    stack.enter_context(layer.self_attention.kv_cache(kv_cache))
            num_context = position_ids.shape[1] - num_block
            kinds = self.dflash_config.layer_attentions()
            if attention_mask is None and any(kind != FULL for kind in kinds):
                attention_mask = position_masks(position_ids[:, num_context:], position_ids,
                                                kinds)
            hidden = self.decoder(hidden_states=hidden, attention_mask=attention_mask,
                                  context=context,
                                  rotary_pos_emb=self._rotary(position_ids, num_context))
        return hidden if return_hidden else self.logits(hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocab-parallel logits [s, b, V/tp] of final-norm hidden states, as the reference
        proposes from them (output multiplier and softcap: `loss.unary_logits`)."""
        cfg = self.dflash_config
        return unary_logits(self._head[1](hidden), cfg.output_multiplier,
                            cfg.final_logit_softcapping)

    @torch.no_grad()
    def propose(self, hidden: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        """Draft tokens [n] for block slots 1..n from their final-norm hidden states [n, 1, H]
        (batch of one) after the block's `anchor` token [1]: the argmax of each slot (DFlash),
        or the selector's greedy path over each slot's top-K (DFlash2). The same on every TP
        rank; the vocabulary is never gathered."""
        logits = self.logits(hidden)[:, 0]
        if self.candidate_selector is None:
            return vocab_parallel_argmax(logits, self.tp_group)
        return self.candidate_selector.walk(hidden[:, 0], logits, anchor)


def target_head(gpt_model) -> tuple[Callable, Callable]:
    """(embed, output) of a megatron GPTModel, frozen and vocab-parallel, for `borrow_target_head`.

    The embedding reduce-scatters to sequence shards under SP; the output layer gathers them and
    returns this rank's vocabulary slice (`parallel_output`), tied weights included.
    """
    def embed(ids):
        return gpt_model.embedding(input_ids=ids, position_ids=None)

    def output(hidden):
        return gpt_model.output_layer(hidden, weight=output_weight(gpt_model))[0]

    return embed, output


def output_weight(gpt_model) -> torch.Tensor:
    """The [V/tp, H] weight of a GPTModel's output layer (the embedding's, when tied)."""
    if gpt_model.share_embeddings_and_output_weights:
        return gpt_model.shared_embedding_or_output_weight()
    return gpt_model.output_layer.weight
