"""HF Llama / Qwen2 / Qwen3 -> megatron GPTModel import (TP=1): logits and captured features equal
transformers' own forward; weight-layout round trips; one clear error per bad checkpoint."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

from megatron_dflash import weights
from tests import weights_testing
from tests.dflash_testing import edit_config
from megatron_dflash.targets.capture import FeatureCapture, target_forward
from megatron_dflash.targets.families import by_architecture
from megatron_dflash.targets.family import tp_converters
from megatron_dflash.targets.hf_checkpoint import HFCheckpoint
from megatron_dflash.targets.hf_import import (build_target, load_hf_config, load_hf_weights,
                                              target_family, target_transformer_config)

VOCAB, HIDDEN, LAYERS, SEQ, BATCH = 128, 64, 4, 16, 2
TOL = 1e-5


def hf_config(kind, **kw):
    """Tiny random-model configs: GQA everywhere, Qwen3 with head_dim != hidden/heads."""
    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=96,
                  num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, rms_norm_eps=1e-6, initializer_range=0.1)
    common.update(kw)
    if kind == "llama":
        return LlamaConfig(architectures=["LlamaForCausalLM"], **common)
    if kind == "qwen2":
        return Qwen2Config(architectures=["Qwen2ForCausalLM"], **common)
    common.setdefault("head_dim", 32)
    return Qwen3Config(architectures=["Qwen3ForCausalLM"], **common)


def hf_model(config, seed=0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32).eval()
    with torch.no_grad():  # norms start at 1: perturb them so a swapped norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def save(model, path, **kw):
    model.save_pretrained(path, **kw)
    return path


def import_target(path):
    hf = load_hf_config(path)
    model = build_target(hf, target_transformer_config(hf))
    load_hf_weights(model, path)
    return model


def tokens():
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ))
    return ids, torch.arange(SEQ).expand(BATCH, SEQ)


def hf_reference(model, ids):
    """HF logits, hidden_states tuple, and the raw (pre-final-norm) output of the last layer."""
    last = {}
    hook = model.model.layers[-1].register_forward_hook(
        lambda m, a, out: last.setdefault("h", out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    hook.remove()
    return out.logits, out.hidden_states, last["h"]


VARIANTS = {
    "llama_gqa": dict(kind="llama"),
    "llama_tied": dict(kind="llama", tie_word_embeddings=True),
    "llama31_rope": dict(kind="llama", rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
        high_freq_factor=4.0, original_max_position_embeddings=8192)),
    "qwen3": dict(kind="qwen3", rope_parameters=dict(rope_type="default", rope_theta=1e6)),
    "qwen3_tied_sharded": dict(kind="qwen3", tie_word_embeddings=True, shard="40KB"),
    "qwen2_qkv_bias": dict(kind="qwen2"),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_import_matches_hf(variant, utils, tmp_path):
    utils.initialize_model_parallel(1, 1)
    spec = dict(VARIANTS[variant])
    shard = spec.pop("shard", None)
    hf = hf_model(hf_config(spec.pop("kind"), **spec))
    save(hf, tmp_path, **({"max_shard_size": shard} if shard else {}))
    if shard:
        assert (tmp_path / "model.safetensors.index.json").is_file()
        assert len(list(tmp_path.glob("*.safetensors"))) > 1
    model = import_target(tmp_path)
    assert not any(p.requires_grad for p in model.parameters())
    assert torch.allclose(model.rotary_pos_emb.inv_freq, hf.model.rotary_emb.inv_freq.float())

    ids, pos = tokens()
    taps = [0, 1, LAYERS - 1]
    with FeatureCapture(model, taps) as capture:
        logits, features = target_forward(model, ids, pos, capture)
    ref_logits, hidden_states, last_raw = hf_reference(hf, ids)

    assert logits.shape == (BATCH, SEQ, VOCAB)
    assert (logits - ref_logits).abs().max() <= TOL
    assert features.shape == (SEQ, BATCH, len(taps) * HIDDEN) and not features.requires_grad
    feats = features.split(HIDDEN, dim=-1)
    for i, f in zip(taps[:-1], feats):  # hidden_states[i+1]: output of layer i (i < L-1)
        assert (f.transpose(0, 1) - hidden_states[i + 1]).abs().max() <= TOL, i
    # The last layer's raw output, before the final norm (HF's last entry is after it).
    assert (feats[-1].transpose(0, 1) - last_raw).abs().max() <= TOL


def test_capture_without_forward_raises(utils, tmp_path):
    utils.initialize_model_parallel(1, 1)
    model = import_target(save(hf_model(hf_config("llama")), tmp_path))
    with FeatureCapture(model, [1, 2]) as capture:
        with pytest.raises(RuntimeError, match=r"\[1, 2\] did not run"):
            capture.features()
        ids, pos = tokens()
        with torch.no_grad():
            model(ids, pos, None)
        assert capture.features().shape == (SEQ, BATCH, 2 * HIDDEN)
        with pytest.raises(RuntimeError, match="did not run"):  # handed over: needs a new forward
            capture.features()
    with pytest.raises(ValueError, match="outside the target's layers"):
        FeatureCapture(model, [LAYERS])


def test_load_from_state_dict(utils, tmp_path):
    """A state dict works like a directory; a missing tensor is named before anything is copied."""
    utils.initialize_model_parallel(1, 1)
    hf = hf_model(hf_config("qwen3"))
    model = import_target(save(hf, tmp_path))
    state = dict(hf.state_dict())
    load_hf_weights(model, state)
    del state["model.layers.2.self_attn.k_norm.weight"]
    with pytest.raises(ValueError, match=r"state dict: tensor 'model.layers.2.self_attn.k_norm"):
        load_hf_weights(model, state)


# --- weight layouts -----------------------------------------------------------------------------

@pytest.mark.parametrize("heads,groups,tp", [(8, 4, 2), (8, 2, 4), (8, 1, 4), (4, 4, 1), (6, 2, 2)])
def test_qkv_merge_split_shard_gather(heads, groups, tp):
    hd, h = 4, 12
    q, k, v = torch.randn(heads * hd, h), torch.randn(groups * hd, h), torch.randn(groups * hd, h)
    qkv = weights.merge_qkv(q, k, v, groups)
    # group g = [q heads of g, k_g, v_g]
    rep = heads // groups
    g1 = qkv.view(groups, (rep + 2) * hd, h)[groups - 1]
    assert torch.equal(g1[:rep * hd], q[(groups - 1) * rep * hd:])
    assert torch.equal(g1[rep * hd:(rep + 1) * hd], k[(groups - 1) * hd:])
    assert all(torch.equal(a, b) for a, b in zip(weights.split_qkv(qkv, heads, groups), (q, k, v)))
    shards = [weights.shard_qkv(qkv, groups, r, tp) for r in range(tp)]
    assert torch.equal(weights_testing.gather_qkv(shards), qkv)
    bias = weights.merge_qkv(q[:, 0], k[:, 0], v[:, 0], groups)
    assert torch.equal(bias, qkv[:, 0])


def test_fc1_and_row_column_shards():
    gate, up, down = torch.randn(8, 6), torch.randn(8, 6), torch.randn(6, 8)
    fc1 = weights.merge_fc1(gate, up)
    shards = [weights.shard_fc1(fc1, r, 2) for r in range(2)]
    assert torch.equal(shards[1], torch.cat([gate[4:], up[4:]]))  # [gate_r; up_r]
    assert torch.equal(weights_testing.gather_fc1(shards), fc1)
    rows = [weights.shard_rows(down, r, 4) for r in range(4)]
    columns = [weights.shard_columns(down, r, 3) for r in range(3)]
    assert torch.equal(weights_testing.gather_rows(rows), down)
    assert torch.equal(weights_testing.gather_columns(columns), down)
    with pytest.raises(ValueError, match="not divisible by the tensor-parallel size 4"):
        weights.shard_columns(down, 0, 4)
    with pytest.raises(ValueError, match="num_query_groups=3 must divide"):
        weights.shard_qkv(torch.randn(30, 4), 3, 0, 2)


# --- sliced reads: each TP rank reads only the slices it holds ----------------------------------

def full_read_then_shard(kind, tensors, groups, rank, size):
    """The rank's tensor from whole HF tensors (the layout functions alone)."""
    if kind == "qkv":
        return weights.shard_qkv(weights.merge_qkv(*tensors, groups), groups, rank, size)
    if kind == "fc1":
        return weights.shard_fc1(weights.merge_fc1(*tensors), rank, size)
    shard = {"replicated": lambda t, r, s: t, "columns": weights.shard_columns,
             "rows": weights.shard_rows}[kind]
    return shard(*tensors, rank, size)


@pytest.mark.parametrize("source", ["safetensors", "state_dict"])
@pytest.mark.parametrize("heads,groups,tp", [(4, 2, 1), (4, 2, 2), (4, 2, 4), (4, 1, 2), (8, 1, 4)])
def test_sliced_reads_match_full_read_then_shard(heads, groups, tp, source, tmp_path):
    """Every conversion, GQA with groups >= and < ranks: bit-identical to reading whole tensors,
    reading only the rank's elements (with fewer groups than ranks, its group's q/k/v rows)."""
    hd, hidden, ffn, vocab = 4, 8, 12, 16
    torch.manual_seed(0)
    state = {"q": torch.randn(heads * hd, hidden), "k": torch.randn(groups * hd, hidden),
             "v": torch.randn(groups * hd, hidden), "q.bias": torch.randn(heads * hd),
             "k.bias": torch.randn(groups * hd), "v.bias": torch.randn(groups * hd),
             "gate": torch.randn(ffn, hidden), "up": torch.randn(ffn, hidden),
             "down": torch.randn(hidden, ffn), "embed": torch.randn(vocab, hidden),
             "norm": torch.randn(hidden)}
    if source == "safetensors":
        save_file(state, tmp_path / "model.safetensors")
    conversions = [("replicated", ("norm",)), ("columns", ("embed",)), ("rows", ("down",)),
                   ("fc1", ("gate", "up")), ("qkv", ("q", "k", "v")),
                   ("qkv", ("q.bias", "k.bias", "v.bias"))]
    for rank in range(tp):
        convert = tp_converters(groups, rank, tp)
        for kind, names in conversions:
            with HFCheckpoint(tmp_path if source == "safetensors" else state) as checkpoint:
                value = convert[kind](checkpoint, *names)
                expected = full_read_then_shard(kind, [state[n] for n in names], groups, rank, tp)
                assert value.dtype == expected.dtype and torch.equal(value, expected), (kind, rank)
                group_reads = tp // groups if kind == "qkv" and groups < tp else 1
                assert checkpoint.elements_read == expected.numel() * group_reads, (kind, rank)


# --- families: found by discovery ----------------------------------------------------------------

def test_every_family_module_is_discovered():
    """Each module of targets/families exports FAMILY; one family per architecture (dense
    Llama, Qwen2 and Qwen3 share the Llama-shaped one)."""
    table = by_architecture()
    assert {"DeepseekV3ForCausalLM", "LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
            "Qwen3MoeForCausalLM", "Qwen3NextForCausalLM", "Qwen3_5ForCausalLM",
            "Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForCausalLM",
            "Qwen3_5MoeForConditionalGeneration", "Glm4MoeForCausalLM", "GptOssForCausalLM",
            "KimiK25ForConditionalGeneration", "MistralForCausalLM", "MinistralForCausalLM",
            "Qwen2MoeForCausalLM", "MixtralForCausalLM"} <= set(table)
    assert table["Qwen2ForCausalLM"] is table["LlamaForCausalLM"] is table["Qwen3ForCausalLM"]
    assert target_family(hf_config("qwen3")) is table["Qwen3ForCausalLM"]


# --- errors: one clear error per bad checkpoint, before any model is built ----------------------

@pytest.fixture
def checkpoint(tmp_path):
    return save(hf_model(hf_config("llama")), tmp_path)


def test_missing_config(checkpoint):
    (checkpoint / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config.json: not found"):
        load_hf_config(checkpoint)


def test_no_safetensors(checkpoint):
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no model.safetensors.index.json and no \*.s"):
        load_hf_config(checkpoint)


def test_missing_shard(tmp_path):
    save(hf_model(hf_config("llama")), tmp_path, max_shard_size="40KB")
    shard = sorted(tmp_path.glob("*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"{shard.name}: listed in .*index.json but not"):
        load_hf_config(tmp_path)


def test_missing_tensor(checkpoint):
    file = checkpoint / "model.safetensors"
    state = load_file(file)
    del state["model.layers.3.mlp.up_proj.weight"]
    save_file(state, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"tensor 'model.layers.3.mlp.up_proj.weight' is missing"):
        load_hf_config(checkpoint)


def test_shape_mismatch(checkpoint):
    file = checkpoint / "model.safetensors"
    state = load_file(file)
    state["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(16, HIDDEN)
    save_file(state, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model.safetensors: tensor 'model.layers.1.self_attn."
                                         r"k_proj.weight' has shape \[16, 64\], config.json "
                                         r"implies \[32, 64\]"):
        load_hf_config(checkpoint)


def test_untied_without_lm_head(checkpoint):
    edit_config(checkpoint, tie_word_embeddings=False)
    file = checkpoint / "model.safetensors"
    state = load_file(file)
    del state["lm_head.weight"]
    save_file(state, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"tensor 'lm_head.weight' is missing"):
        load_hf_config(checkpoint)


def test_unsupported_architecture(checkpoint):
    edit_config(checkpoint, architectures=["GPTNeoXForCausalLM"], model_type="gpt_neox")
    with pytest.raises(ValueError, match=r"architectures=\['GPTNeoXForCausalLM'\] is not supp"):
        load_hf_config(checkpoint)


def test_unsupported_feature(checkpoint):
    edit_config(checkpoint, attention_bias=True)
    with pytest.raises(ValueError, match=r"config.json: attention_bias=True not supported"):
        load_hf_config(checkpoint)


LLAMA31 = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
               high_freq_factor=4.0, original_max_position_embeddings=8192)


@pytest.mark.parametrize("kind,changes,field", [
    ("llama", dict(hidden_act="gelu"), "hidden_act='gelu'"),
    ("llama", dict(mlp_bias=True), "mlp_bias=True"),
    ("qwen3", dict(attention_bias=True), "attention_bias=True"),
    ("qwen3", dict(use_sliding_window=True, sliding_window=8,
                   layer_types=["full_attention"] * 2 + ["sliding_attention"] * 2),
     "use_sliding_window=True, layer_types=['full_attention', 'full_attention', 'sliding"),
    ("llama", dict(quantization_config=dict(quant_method="fp8")),
     "quantization_config (quant_method='fp8')"),
    # transformers rotates only the first half of each head; megatron's llama3 RoPE all of it.
    ("llama", dict(rope_parameters=dict(LLAMA31, partial_rotary_factor=0.5)),
     "partial_rotary_factor=0.5"),
    ("llama", dict(rope_parameters=dict(LLAMA31, original_max_position_embeddings=4096)),
     "rope_parameters.original_max_position_embeddings=4096"),
    ("qwen2", dict(rope_parameters=dict(rope_type="dynamic", rope_theta=1e6, factor=2.0)),
     "rope_parameters.rope_type='dynamic'"),
])
def test_unsupported_config_fails_in_one_line_naming_the_field(kind, changes, field, tmp_path):
    hf_config(kind).save_pretrained(tmp_path)  # no tensors: never read
    edit_config(tmp_path, **changes)
    with pytest.raises(ValueError) as error:
        load_hf_config(tmp_path)
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'config.json'}: ") and "\n" not in message
    assert field in message and "not supported" in message, message


def test_vocab_not_divisible_by_tp():
    with pytest.raises(ValueError, match=r"vocab_size=130 is not divisible by the tensor-parallel "
                                         r"size 4"):
        target_transformer_config(hf_config("llama", vocab_size=130), tensor_parallel_size=4)
