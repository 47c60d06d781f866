"""Helpers for the export/import/evaluation tests: tiny random HF targets, reference-format drafts
and draft checkpoints, all built from configs on the CPU, and the checks that compare a draft's
decoding with the reference's (cached forward, `dflash_generate`)."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
import time

import dflash.model
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dflash.model import DFlashDraftModel as ReferenceDraft
from dflash.model import _crop_to, _make_cache, dflash_generate
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

from tests.dflash_testing import load_script, randomize_
from megatron_dflash.attention import DFlashKVCache
from megatron_dflash.checkpoint import save_model_checkpoint
from megatron_dflash.config import DFlashConfig
from megatron_dflash.draft_export import export_checkpoint
from megatron_dflash.evaluate import build_decoder, tau
from megatron_dflash.reference_format import reference_config
from megatron_dflash.training.module import DFlashTrainingModule
from megatron_dflash.training.step import make_forward_step, prepare_microbatch

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


def random_prompts(n, length=6, seed=0, generator=None) -> list[list[int]]:
    """`n` prompts of `length` random ids past the special ones, from `generator` when given (a
    test that draws on from it after the prompts), else from a fresh one seeded `seed`."""
    g = torch.Generator().manual_seed(seed) if generator is None else generator
    return [torch.randint(4, VOCAB, (length,), generator=g).tolist() for _ in range(n)]


def assert_cached_decoding_equals_reference(draft, ref: ReferenceDraft, head: dict, features,
                                            chunks, generator, block_size: int) -> None:
    """Context `features` [S, 1, 2H] arriving in `chunks`: each step's block logits with the draft
    KV cache equal a recompute over the whole context and the reference's DynamicCache path
    (cropped back to the context: the reference drops the block's K/V)."""
    cache, ref_cache, start = DFlashKVCache(), _make_cache(ref.config), 0
    with torch.no_grad():
        for chunk in chunks:
            new = slice(start, start + chunk)
            start += chunk
            block = torch.randint(0, VOCAB, (1, block_size), generator=generator)
            positions = torch.arange(new.start, start + block_size)[None]
            cached = draft(block, features[new], None, positions, kv_cache=cache)
            full = draft(block, features[:start], None, torch.arange(start + block_size)[None])
            assert len(cache) == start
            assert (cached - full).abs().max() < 1e-5
            hidden = ref(position_ids=positions, past_key_values=ref_cache, use_cache=True,
                         noise_embedding=F.embedding(block, head["embedding"]),
                         target_hidden=features[new].transpose(0, 1))
            _crop_to(ref_cache, start)
            assert (cached[:, 0] - (hidden @ head["output"].t())[0]).abs().max() < 1e-5


def assert_trained_export_decodes_like_reference(tmp_path, monkeypatch, target: str, decoder,
                                                 prompts, generator, reference_class):
    """Train `decoder`'s draft 30 steps with the training step's own loss on the target's greedy
    continuations of `prompts` (anchors drawn from `generator`), save and export it: the export
    loads in `reference_class` with strict keys; our speculative decoding with it equals
    target-only greedy decoding, and every request's acceptance lengths (so τ) equal the
    reference loop's (`dflash_generate`, HF target). Returns the loaded reference draft."""
    draft = decoder.draft
    greedy = [decoder.generate(p, 36, block_size=1).tokens for p in prompts]
    tokens = torch.tensor([p + g for p, g in zip(prompts, greedy)])
    loss_mask = torch.zeros_like(tokens, dtype=torch.bool)
    loss_mask[:, 6:] = True
    module = DFlashTrainingModule(decoder.target, draft)
    forward_step = make_forward_step(draft.dflash_config, 0.0)
    optimizer = torch.optim.AdamW(draft.parameters(), lr=3e-3, weight_decay=0.0)
    draft.train()
    for _ in range(30):
        mb = prepare_microbatch(tokens, loss_mask, draft.dflash_config, generator)
        output, loss_func = forward_step(iter([mb]), module)
        loss, _ = loss_func(output)
        optimizer.zero_grad()
        (loss / mb["weights"].sum()).backward()
        optimizer.step()
    write_draft_checkpoint(tmp_path / "ckpt", draft, draft.dflash_config)
    out = export_checkpoint(str(tmp_path / "ckpt"), str(tmp_path / "out"))
    reference, info = reference_class.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]

    exported = build_decoder(target, out)
    hf_target = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    monkeypatch.setattr(dflash.model, "_cuda_time", time.perf_counter)  # CPU: no CUDA clock
    lengths = []
    for prompt, expected in zip(prompts, greedy):
        ours = exported.generate(prompt, 30)
        assert ours.tokens == expected[:30]  # lossless
        stats = dflash_generate(reference.eval(), hf_target, torch.tensor([prompt]), 30, None,
                                return_stats=True)
        assert stats.output_ids[0, len(prompt):].tolist() == ours.tokens
        assert stats.acceptance_lengths == ours.acceptance_lengths
        lengths.append(ours.acceptance_lengths)
    assert tau(lengths) > 2.0, lengths  # the drafts were really accepted
    return reference
