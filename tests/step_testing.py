"""The training step's test fixtures: the tiny target with a one-layer draft, its DFlash config
and tokens with a response span."""
from __future__ import annotations

import torch

from megatron_dflash.config import DFlashConfig, draft_transformer_config
from megatron_dflash.specs import build_draft
from megatron_dflash.synthetic import randomize_
from megatron_dflash.targets import (build_target, load_hf_config, load_hf_weights,
                                     target_transformer_config)
from megatron_dflash.training.module import DFlashTrainingModule

TAPS, MASK = [0, 2], 255


def step_modules(target_dir, last_layer=None, seed=3, attention="dense", **draft):
    """(training module, DFlash config) over the tiny target, built whole or up to `last_layer`;
    `draft`: DFlashConfig fields (e.g. a DFlash2 variant)."""
    hf = load_hf_config(target_dir)
    tcfg = target_transformer_config(hf)
    target = build_target(hf, tcfg, last_layer=last_layer)
    load_hf_weights(target, target_dir)
    cfg = step_config(tcfg, hf, **draft)
    draft = build_draft(cfg, draft_transformer_config(cfg, tcfg), "local", attention)
    randomize_(draft, seed=seed)
    return DFlashTrainingModule(target, draft), cfg


def step_config(tcfg, hf, num_anchors=4, **draft) -> DFlashConfig:
    """Blocks of 8, one draft layer, taps `TAPS` (unless `draft` says otherwise), resolved
    against the target."""
    return DFlashConfig(**dict(block_size=8, num_draft_layers=1, target_layer_ids=TAPS,
                               mask_token_id=MASK, num_anchors=num_anchors) | draft).resolve(
        tcfg, vocab_size=hf.vocab_size, target_rope_theta=hf.rope_parameters["rope_theta"])


def step_tokens(seq_len=48, seed=0, batch=2) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [batch, seq_len], loss mask: the response from position 12 on)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, MASK, (batch, seq_len), generator=g)
    loss_mask = torch.zeros_like(tokens, dtype=torch.bool)
    loss_mask[:, 12:] = True
    return tokens, loss_mask
