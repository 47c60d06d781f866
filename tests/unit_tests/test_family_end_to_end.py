"""gpt-oss (MXFP4 experts, sinks, sliding windows, YaRN) through the whole product on the CPU:
tools/regenerate_data.py answers chat prompts with the megatron target and writes the taps it
captured into a feature cache; a drafter trains from that cache; it is exported in the reference
format (declaring the target's YaRN and taps) and evaluated by lossless speculative decoding,
whose tokens equal transformers' greedy `generate` of the same checkpoint."""
import json

import torch

from megatron_dflash.evaluate import build_decoder, evaluate
from tests.dflash_testing import load_script
from tests.families_testing import gpt_oss_config, perturbed_model, save_mxfp4
from tests.regenerate_testing import chat_tokenizer_dir, conversations_jsonl
from tests.training_testing import flags, run_in_process

TAPS = ["0", "1", "3"]


def test_gpt_oss_regenerate_cache_train_export_evaluate(tmp_path, utils):
    target = tmp_path / "target"
    hf_model = perturbed_model(gpt_oss_config(max_position_embeddings=64))
    save_mxfp4(hf_model, target)
    chat_tokenizer_dir(target)
    regenerated, cache, export = (str(tmp_path / n) for n in ("chat.jsonl", "cache", "export"))

    utils.destroy_model_parallel()
    assert load_script("tools/regenerate_data.py").main(
        ["--target", str(target), "--input", conversations_jsonl(tmp_path / "in.jsonl", count=6),
         "--output", regenerated, "--batch-size", "3", "--max-new-tokens", "8",
         "--log-interval", "0", "--offline-features", cache, "--seq-length", "48",
         "--target-layer-ids", *TAPS]) == 0
    assert len(open(regenerated).read().splitlines()) == 6

    result = run_in_process(flags(str(target), regenerated, offline_features=cache,
                                  train_iters=4, global_batch_size=4, save=str(tmp_path / "ckpt"),
                                  export=export) + ["--target-layer-ids", *TAPS])
    assert len(result["losses"]) == 4
    exported = json.loads(open(f"{export}/config.json").read())
    assert exported["dflash_config"]["target_layer_ids"] == [0, 1, 3]
    assert exported["num_target_layers"] == 4
    assert exported["rope_scaling"] == {k: v for k, v in hf_model.config.rope_parameters.items()
                                        if k != "rope_theta"}

    utils.initialize_model_parallel(1)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(6, 250, (n,), generator=g).tolist() for n in (5, 9)]
    report, pairs = evaluate(build_decoder(str(target), export), prompts, 12, warmup=False)
    assert report.lossless
    for prompt, (dflash, baseline) in zip(prompts, pairs, strict=True):
        hf_tokens = hf_model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                      eos_token_id=None, pad_token_id=0)[0, len(prompt):]
        assert dflash.tokens == baseline.tokens == hf_tokens.tolist()
