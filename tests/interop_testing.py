"""Helpers for the export/import/evaluation tests: tiny random HF targets, reference-format drafts
and draft checkpoints, all built from configs on the CPU."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile

import torch
import torch.distributed as dist
import torch.nn.functional as F
from dflash.model import DFlashDraftModel as ReferenceDraft
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

from tests.dflash_testing import load_script, randomize_
from megatron_dflash.checkpoint import save_model_checkpoint
from megatron_dflash.config import DFlashConfig
from megatron_dflash.reference_format import reference_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB, HIDDEN, TARGET_LAYERS = 256, 64, 6


def target_dir(path, kind="qwen3", seed=0, **kw) -> str:
    """A tiny random HF target checkpoint (GQA; Qwen3 with head_dim != hidden/heads; the Llama
    variant ties its embeddings like SmolLM2)."""
    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128,
                  num_hidden_layers=TARGET_LAYERS, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512, rms_norm_eps=1e-6, initializer_range=0.1,
                  bos_token_id=1, eos_token_id=2)
    common.update(kw)
    config = (LlamaConfig(architectures=["LlamaForCausalLM"], tie_word_embeddings=True, **common)
              if kind == "llama" else
              Qwen3Config(architectures=["Qwen3ForCausalLM"], **dict({"head_dim": 24}, **common)))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.save_pretrained(path)
    return str(path)


def draft_config(**kw) -> DFlashConfig:
    """A resolved-looking draft config (every field explicit) for the tiny targets."""
    fields = dict(block_size=8, num_draft_layers=2, target_layer_ids=[1, 4], mask_token_id=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=24, ffn_hidden_size=96,
                  rope_theta=10000.0, norm_eps=1e-6, hidden_size=HIDDEN)
    fields.update(kw)
    return DFlashConfig(**fields)


TARGET_FIELDS = dict(num_target_layers=TARGET_LAYERS, vocab_size=VOCAB,
                     max_position_embeddings=512, bos_token_id=1, eos_token_id=2)


def reference_model(cfg: DFlashConfig, seed=0, **config_keys) -> ReferenceDraft:
    """The z-lab reference draft for `cfg`, with non-trivial random weights; `config_keys` are
    further config.json keys (e.g. `layer_types`, `sliding_window`, `is_causal`)."""
    config = Qwen3Config(**config_keys,
        hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_draft_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
        rms_norm_eps=cfg.norm_eps, vocab_size=VOCAB, max_position_embeddings=512,
        rope_parameters={"rope_theta": cfg.rope_theta,
                         **(cfg.rope_scaling or {"rope_type": "default"})},
        block_size=cfg.block_size, num_target_layers=TARGET_LAYERS, bos_token_id=1,
        eos_token_id=2,
        dflash_config={"mask_token_id": cfg.mask_token_id,
                       "target_layer_ids": list(cfg.target_layer_ids)})
    model = ReferenceDraft(config).eval()
    randomize_(model, seed)
    return model


def write_reference_dir(path, cfg: DFlashConfig, tensors: dict[str, torch.Tensor],
                        dtype=torch.float32, **config_overrides) -> str:
    """A reference-format directory written the way the exporter writes one (canonical config)."""
    os.makedirs(path, exist_ok=True)
    config = dict(reference_config(cfg, TARGET_FIELDS, dtype), **config_overrides)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()},
              os.path.join(path, "model.safetensors"))
    return str(path)


def reference_block_logits(ref: ReferenceDraft, embedding: torch.Tensor, output: torch.Tensor,
                           inputs: dict) -> torch.Tensor:
    """Packed multi-block logits [b, Q, V] of the reference draft for `draft_inputs(...)`."""
    emb = F.embedding(inputs["block_input_ids"], embedding)
    with torch.no_grad():
        hidden = ref(position_ids=inputs["position_ids"], attention_mask=~inputs["attention_mask"],
                     noise_embedding=emb, target_hidden=inputs["features"].transpose(0, 1))
    return hidden @ output.t()


def draft_extra(cfg: DFlashConfig) -> dict:
    """`extra` as training writes it, with the tiny target described by its config fields."""
    return {"dflash_config": dataclasses.asdict(cfg),
            "target": {"hf_config": dict(TARGET_FIELDS, num_hidden_layers=TARGET_LAYERS),
                       "path": None},
            "consumed_samples": 0, "world_size": dist.get_world_size()}


def write_draft_checkpoint(root, draft, cfg: DFlashConfig) -> str:
    """A training-layout draft-only checkpoint of `draft` at iteration 5 (collective)."""
    return save_model_checkpoint(str(root), draft, draft_extra(cfg), iteration=5)


@contextlib.contextmanager
def shared_tmp_dir():
    """One temporary directory for every rank of the world (pytest's tmp_path is per process),
    removed once all ranks are done with it."""
    path = [tempfile.mkdtemp(prefix="dflash_test_") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(path, src=0)
    try:
        yield path[0]
    finally:
        dist.barrier()
        if dist.get_rank() == 0:
            shutil.rmtree(path[0], ignore_errors=True)


def tool(name: str):
    """A CLI module from tools/, to call its `main(argv)` in-process."""
    return load_script(f"tools/{name}.py")


def reference_tensors(directory) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(directory, "model.safetensors"))


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical: same dtype, shape and bytes (NaN-safe, -0.0 != 0.0)."""
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)))
