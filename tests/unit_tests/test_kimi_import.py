"""Kimi-K2 / K2.5 targets through the DeepSeek-V3 import: a tiny stand-in of Kimi-K2.5's
checkpoint (the VLM wrapper's config with a kimi_k2 `text_config`, text weights under
`language_model.*`, vision tensors never read) and of Kimi-K2's (DeepSeek-V3 with model_type
kimi_k2) give the text model's logits and taps; tying follows the tensors on disk whatever the
wrapper's config says; quantized releases are refused naming the field."""
import json
from pathlib import Path

import pytest

from megatron_dflash.targets import hf_import
from megatron_dflash.targets.hf_import import load_hf_config
from tests.dflash_testing import record_checkpoint_reads, tiny_deepseek_model
from tests.families_testing import assert_matches_hf, import_target, save_kimi_k25

KIMI_LIKE = dict(n_group=1, topk_group=1, num_experts_per_tok=2, num_nextn_predict_layers=0)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied_on_disk"])
def test_kimi_k25_text_model_matches_hf(tied, utils, tmp_path, monkeypatch, capsys):
    utils.initialize_model_parallel(1, 1)
    text_model = tiny_deepseek_model(seed=4, tie_word_embeddings=tied, **KIMI_LIKE)
    path = save_kimi_k25(text_model, tmp_path, tied_on_disk=tied)
    opened = record_checkpoint_reads(monkeypatch)
    hf = load_hf_config(path)
    assert hf.model_type == "deepseek_v3" and hf.tie_word_embeddings == tied
    assert hf.architectures == ["KimiK25ForConditionalGeneration"]
    assert "skipping the vision tower and projector" in capsys.readouterr().out
    model = import_target(path)
    assert opened[-1].elements_read == sum(
        t.numel() for t in hf_import.loaded_tensors(model).values())  # no vision tensor read
    assert_matches_hf(model, text_model, taps=[0, 2])


def test_kimi_k2_model_type_reads_as_deepseek_v3(utils, tmp_path):
    utils.initialize_model_parallel(1, 1)
    text_model = tiny_deepseek_model(seed=5, **KIMI_LIKE)
    text_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config |= {"model_type": "kimi_k2",
               "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert_matches_hf(import_target(tmp_path), text_model, taps=[1])


def test_quantized_release_is_refused_naming_the_field(tmp_path):
    path = save_kimi_k25(tiny_deepseek_model(**KIMI_LIKE), tmp_path)
    config = json.loads((Path(path) / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "compressed-tensors"}
    (Path(path) / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"quantization_config \(quant_method="
                                         r"'compressed-tensors'\) not supported"):
        load_hf_config(path)
