"""The whole product on a Qwen3.5-shaped MoE target (the VLM wrapper Qwen publishes, gated-delta-net
and gated-attention layers, routed and gated shared experts), on the CPU: regenerate the
assistant turns with the target while its taps go to the offline feature cache
(tools/regenerate_data.py), train a drafter from that cache and export it (the main job with
--offline-features --export), then evaluate the export with lossless speculative decoding
(tools/evaluate_dflash.py). The target decodes without a KV cache (generation.engine)."""
import json

from tests.dflash_testing import load_script
from tests.qwen_hybrid_testing import hybrid_target_dir
from tests.regenerate_testing import chat_tokenizer_dir, conversations_jsonl
from tests.training_testing import MASK, flags, run_in_process

TAPS = [0, 3]  # a linear and a full layer


def test_regenerate_cache_train_export_evaluate(tmp_path, capsys):
    target = hybrid_target_dir(tmp_path / "target", "qwen3_5_moe_vl")
    chat_tokenizer_dir(target)
    chats = conversations_jsonl(tmp_path / "chat.jsonl", count=6)
    regenerated = tmp_path / "regenerated.jsonl"
    cache, export = tmp_path / "features", tmp_path / "export"
    taps = [str(i) for i in TAPS]
    assert load_script("tools/regenerate_data.py").main([
        "--target", target, "--input", chats, "--output", str(regenerated),
        "--batch-size", "3", "--max-new-tokens", "6", "--log-interval", "0",
        "--offline-features", str(cache), "--seq-length", "48",
        "--target-layer-ids", *taps]) == 0
    out = capsys.readouterr().out
    assert "6 conversations written" in out and "without a KV cache" in out

    run_in_process(flags(target, str(regenerated), offline_features=str(cache), block_size=4,
                         train_iters=4, export=str(export)) + ["--target-layer-ids", *taps])
    with open(export / "config.json") as f:
        config = json.load(f)
    assert config["dflash_config"]["target_layer_ids"] == TAPS
    assert config["num_target_layers"] == 4 and config["dflash_config"]["mask_token_id"] == MASK

    with open(tmp_path / "prompts.jsonl", "w") as f:
        for i in range(2):
            f.write(json.dumps({"prompt": " ".join(f"w{7 * i + j}" for j in range(5))}) + "\n")
    report = tmp_path / "report.json"
    assert load_script("tools/evaluate_dflash.py").main([
        "--target", target, "--draft", str(export), "--prompts", str(tmp_path / "prompts.jsonl"),
        "--max-new-tokens", "8", "--output", str(report)]) == 0  # 0: lossless
    with open(report) as f:
        assert json.load(f)["num_requests"] == 2
