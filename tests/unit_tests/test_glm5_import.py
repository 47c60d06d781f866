"""GLM-5 (`GlmMoeDsaForCausalLM`) as dense multi-latent attention: up to index_topk keys its
sparse attention keeps every key, so the DeepSeek-V3 import equals transformers (which runs the
indexer) — logits and taps, with YaRN or plain RoPE; the indexer's and the MTP layer's tensors are
never read; a longer sequence is refused by the core attention and, for training, by the plan
from --seq-length."""
import re

import pytest

from megatron_dflash.targets import hf_import
from megatron_dflash.training.pretrain import parse_plan
from tests.dflash_testing import pattern_dataset, record_checkpoint_reads
from tests.families_testing import (assert_matches_hf, glm5_config, import_target,
                                    perturbed_model, save_with_mtp_layer, tokens)
from tests.training_testing import flags


@pytest.fixture(scope="module")
def glm5(tmp_path_factory):
    model = perturbed_model(glm5_config())
    return save_with_mtp_layer(model, tmp_path_factory.mktemp("glm5")), model


def test_dense_mla_equals_hf_up_to_index_topk(glm5, utils, monkeypatch):
    utils.initialize_model_parallel(1, 1)
    path, hf_model = glm5
    opened = record_checkpoint_reads(monkeypatch)
    model = import_target(path)
    assert any(".indexer." in k for k in opened[-1].shapes)
    assert opened[-1].elements_read == sum(
        t.numel() for t in hf_import.loaded_tensors(model).values())
    assert_matches_hf(model, hf_model, taps=[0, 1, 2], seq=32)
    with pytest.raises(ValueError, match="33 keys: GLM-5 attends densely only up to its "
                                         "index_topk=32 keys"):
        model(*tokens(seq=33), attention_mask=None)


def test_yarn_variant_equals_hf(utils, tmp_path):
    utils.initialize_model_parallel(1, 1)
    hf_model = perturbed_model(glm5_config(
        num_nextn_predict_layers=0, tie_word_embeddings=True, rope_parameters=dict(
            rope_type="yarn", rope_theta=1000.0, factor=4.0, original_max_position_embeddings=8,
            mscale=1.0, mscale_all_dim=1.0)), seed=2)
    hf_model.save_pretrained(tmp_path)
    assert_matches_hf(import_target(tmp_path), hf_model, taps=[2])


def test_longer_training_sequences_are_refused_at_plan_time(glm5, tmp_path, capsys):
    data = pattern_dataset(str(tmp_path / "data"), 4, 48)
    with pytest.raises(SystemExit):
        parse_plan(flags(glm5[0], data), world_size=1)
    assert re.search(r"--seq-length=48: the target .* is imported exactly only up to 32 tokens",
                     capsys.readouterr().err)
