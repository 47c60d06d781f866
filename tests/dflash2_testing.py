"""DFlash2 test helpers: the z-lab reference `DFlash2DraftModel` for a config, with weights away
from the identity start, and its tensors under the file's names (codebooks without `.weight`)."""
from __future__ import annotations

import torch
from dflash.model import DFlash2DraftModel
from transformers import Qwen3Config

from megatron_dflash.config import DFlashConfig
from megatron_dflash.synthetic import randomize_
from tests.interop_testing import TARGET_LAYERS, VOCAB, draft_config

# Small DFlash2 sizes: 4 channel groups of 16 at hidden 64, rank 8, top-5 of 256 tokens.
DFLASH2 = dict(draft_variant="dflash2", conv_kernel_size=2, conv_group_size=16, selector_rank=8,
               selector_top_k=5)
# Non-default logit and embedding scales, so the parity tests exercise them.
SCALES = dict(output_multiplier=1.5, final_logit_softcapping=8.0, input_embedding_scale=1.25)
_CODEBOOKS = ("candidate_selector.predecessor_codebook", "candidate_selector.successor_codebook")


def dflash2_config(**kw) -> DFlashConfig:
    """A resolved-looking DFlash2 config for the tiny targets (`interop_testing.draft_config`)."""
    return draft_config(**(DFLASH2 | dict(vocab_size=VOCAB) | kw))


def reference_dflash2(cfg: DFlashConfig, seed=0, **config_keys) -> DFlash2DraftModel:
    """The reference DFlash2 draft for `cfg` (eval mode): random weights, the convolutions near
    their identity start and codebooks large enough that the selector changes choices;
    `config_keys` are further config.json keys (`layer_types`, ...)."""
    keys = ("mask_token_id", "target_layer_ids", "block_size", *DFLASH2, *SCALES)
    dflash = {k: getattr(cfg, k) for k in keys if k != "draft_variant"}
    config = Qwen3Config(
        **config_keys,
        hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_draft_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
        rms_norm_eps=cfg.norm_eps, vocab_size=VOCAB, max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        block_size=cfg.block_size, num_target_layers=TARGET_LAYERS, bos_token_id=1,
        eos_token_id=2, dflash_config=dflash)
    model = DFlash2DraftModel(config).eval()
    randomize_(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("base_kernel"):
                p[:, 0] += 1.0
            elif "codebook" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    return model


def file_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A reference model's tensors under the names its files hold (no `.weight` on the
    codebooks: spec §6)."""
    return {k.removesuffix(".weight") if k.removesuffix(".weight") in _CODEBOOKS else k:
            v.detach().clone() for k, v in model.state_dict().items()}


def load_file_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Load file-named tensors into a reference model, strictly (no missing or extra key)."""
    model.load_state_dict({f"{k}.weight" if k in _CODEBOOKS else k: v
                           for k, v in tensors.items()}, strict=True)
