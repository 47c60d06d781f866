"""Small models and inputs shared by the tests (random-initialised, built from configs)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_dflash import specs
from megatron_dflash.config import DFlashConfig, draft_transformer_config
from megatron_dflash.model import target_head
from megatron_dflash.synthetic import (HIDDEN, ROPE_THETA, VOCAB, dflash_config,  # noqa: F401
                                       draft_inputs, head_only_target, pattern_dataset,
                                       randomize_, target_config, tiny_target_dir)
from tests.families_testing import perturbed_model

REPO = Path(__file__).resolve().parents[1]


def load_script(path: str):
    """A script of the repository (`tools/x.py`, `examples/...`: not packages) as a module, to
    call its functions in-process."""
    spec = importlib.util.spec_from_file_location(Path(path).stem, REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def head_state(target: GPTModel) -> dict[str, torch.Tensor]:
    return {"embedding": target.embedding.word_embeddings.weight.detach().clone(),
            "output": target.output_layer.weight.detach().clone()}


def load_head_shard(target: GPTModel, full: dict[str, torch.Tensor], rank: int, size: int):
    with torch.no_grad():
        target.embedding.word_embeddings.weight.copy_(full["embedding"].chunk(size)[rank])
        target.output_layer.weight.copy_(full["output"].chunk(size)[rank])


def build_draft(tcfg: TransformerConfig, cfg: DFlashConfig, target: GPTModel, backend="local",
                attention="dense"):
    draft = specs.build_draft(cfg, draft_transformer_config(cfg, tcfg), backend, attention)
    draft.borrow_target_head(*target_head(target))
    return draft


def params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of a module's parameters (its state dict without megatron's extra states)."""
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def load_params(module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy `tensors` into exactly the module's parameters (no more, no fewer)."""
    own = dict(module.named_parameters())
    assert sorted(own) == sorted(tensors), set(own) ^ set(tensors)
    with torch.no_grad():
        for n, p in own.items():
            p.copy_(tensors[n])


def weighted_loss(logits: torch.Tensor, inputs: dict) -> torch.Tensor:
    """The DFlash CE objective (Σ w·CE / Σ w) of vocab-parallel draft logits."""
    from tests.loss_testing import dflash_loss

    loss_sum, weight_sum = dflash_loss(logits, inputs["labels"], inputs["weights"])
    return loss_sum / weight_sum


def all_gather(t: torch.Tensor, group) -> list[torch.Tensor]:
    """Every rank's copy of `t` in `group`, in rank order."""
    import torch.distributed as dist

    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return parts


def tiny_moe_config(vocab=VOCAB, layers=4, hidden=HIDDEN, experts=8, top_k=2, dense_layers=(2,),
                    norm_topk_prob=True, **kw):
    """A small HF Qwen3-MoE config: GQA with q/k norm, `experts` routed experts (top `top_k`,
    per-expert FFN 32) in every layer but `dense_layers` (dense FFN 96, what the draft's FFN
    defaults to)."""
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        architectures=["Qwen3MoeForCausalLM"], vocab_size=vocab, hidden_size=hidden,
        intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=experts,
        num_experts_per_tok=top_k, norm_topk_prob=norm_topk_prob,
        mlp_only_layers=list(dense_layers), max_position_embeddings=256, rms_norm_eps=1e-6,
        initializer_range=0.1, **kw)


def tiny_moe_target_dir(path, seed=0, **kw) -> str:
    """A random `tiny_moe_config` model (norms perturbed: `perturbed_model`) saved as config.json
    + safetensors (one tensor per expert, as on disk)."""
    perturbed_model(tiny_moe_config(**kw), seed).save_pretrained(path)
    return str(path)


def save_fused_experts(model, path) -> str:
    """`model` as config.json + one safetensors file of its in-memory state dict: each MoE
    layer's experts fused (`mlp.experts.gate_up_proj` [E, 2F, H], `mlp.experts.down_proj`
    [E, H, F]), as transformers 5 holds them, not one tensor per expert as `save_pretrained`."""
    from safetensors.torch import save_file

    Path(path).mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(path)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        del state["lm_head.weight"]
    save_file(state, Path(path) / "model.safetensors", metadata={"format": "pt"})
    return str(path)


DEEPSEEK_YARN = dict(rope_type="yarn", rope_theta=1000.0, factor=8.0,
                     original_max_position_embeddings=8, mscale=1.0, mscale_all_dim=0.8,
                     beta_fast=32, beta_slow=1)


def tiny_deepseek_config(**kw):
    """A small HF DeepSeek-V3 config: MLA (q/kv LoRA ranks 32/16, nope/rope/v head dims 16/8/16)
    with YaRN (positions past its original 8); layer 0 dense (FFN 96), layers 1-2 MoE: 8 routed
    experts in 4 groups, top-4 within the best 2 groups, 2 shared experts (per-expert FFN 16);
    one multi-token-prediction layer."""
    from transformers import DeepseekV3Config

    return DeepseekV3Config(**dict(
        architectures=["DeepseekV3ForCausalLM"], vocab_size=VOCAB, hidden_size=HIDDEN,
        intermediate_size=96, moe_intermediate_size=16, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, n_group=4,
        topk_group=2, num_experts_per_tok=4, n_shared_experts=2, routed_scaling_factor=2.5,
        norm_topk_prob=True, first_k_dense_replace=1, num_nextn_predict_layers=1,
        max_position_embeddings=64, rope_parameters=dict(DEEPSEEK_YARN), rms_norm_eps=1e-6,
        initializer_range=0.1) | kw)


def tiny_deepseek_model(seed=0, **kw):
    """A random HF model of `tiny_deepseek_config(**kw)`, norms and score-correction biases
    perturbed away from their initial 1 and 0 (the same on every rank)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_deepseek_config(**kw),
                                             dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn_like(b))
    return model


def save_deepseek_checkpoint(model, path) -> str:
    """`model` as config.json + safetensors, plus an MTP layer's tensors (model.layers.{L}.*,
    a copy of layer 1 and an `eh_proj`) as DeepSeek checkpoints hold them."""
    from safetensors.torch import load_file, save_file

    model.save_pretrained(path)
    file = f"{path}/model.safetensors"
    state = load_file(file)
    mtp = model.config.num_hidden_layers
    state |= {k.replace("model.layers.1.", f"model.layers.{mtp}."): v.clone()
              for k, v in state.items() if k.startswith("model.layers.1.")}
    hidden = model.config.hidden_size
    state[f"model.layers.{mtp}.eh_proj.weight"] = torch.randn(hidden, 2 * hidden)
    save_file(state, file, metadata={"format": "pt"})
    return str(path)


def tiny_deepseek_dir(path, seed=0, **kw) -> str:
    return save_deepseek_checkpoint(tiny_deepseek_model(seed, **kw), path)


def edit_config(path, **changes) -> None:
    """Set `changes` in the config.json of the HF checkpoint directory `path`."""
    file = Path(path) / "config.json"
    file.write_text(json.dumps(json.loads(file.read_text()) | changes))


def record_checkpoint_reads(monkeypatch) -> list:
    """Every HF checkpoint `hf_import` opens from now on (in order), to count what it reads."""
    from megatron_dflash.targets import hf_import

    opened = []

    class Recorded(hf_import.HFCheckpoint):
        def __init__(self, source):
            super().__init__(source)
            opened.append(self)

    monkeypatch.setattr(hf_import, "HFCheckpoint", Recorded)
    return opened
