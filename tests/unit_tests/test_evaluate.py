"""Speculative decoding with a megatron target and our draft: the draft KV cache equals a full
recompute and the reference's cached forward, decoding is lossless (random and trained drafts)
and equals HF `transformers` greedy `generate` of the same checkpoint, τ / per-position
acceptance match hand-computed values on a scripted case, and tools/evaluate_dflash.py runs with
plain `python` on the CPU."""
import json
import os
import subprocess
import sys
import types

import pytest
import torch

from tests.dflash_testing import (build_draft, head_only_target, head_state, randomize_,
                                  target_config)
from tests.dflash_testing import dflash_config as resolved_config
from tests.interop_testing import (REPO, VOCAB, assert_cached_decoding_equals_reference,
                                   draft_config, random_prompts, reference_model, target_dir,
                                   tool, write_reference_dir)
from megatron_dflash import state_dict_adapter
from megatron_dflash.evaluate import (Generation, SpeculativeDecoder, build_decoder, evaluate,
                                      plot_position_acceptance, position_acceptance, tau)
from tests.loss_testing import dflash_loss
from megatron_dflash.model import target_head
from megatron_dflash.training.module import DFlashTrainingModule
from megatron_dflash.training.step import prepare_microbatch


@pytest.fixture
def models(tmp_path):
    """(target dir, reference-format random draft dir) of matching tiny models."""
    cfg = draft_config()
    return (target_dir(tmp_path / "target", seed=3),
            write_reference_dir(tmp_path / "draft", cfg, reference_model(cfg, 4).state_dict()))


def test_draft_kv_cache_equals_recompute_and_reference(utils):
    """Context chunks of 10, 3, 1, 5 tokens: each step's block logits with the cache equal a
    recompute over the whole context and the reference's DynamicCache path (crop to start)."""
    utils.initialize_model_parallel(1)
    tcfg = target_config()
    cfg = resolved_config(tcfg, block_size=8)
    target = head_only_target()
    draft = build_draft(tcfg, cfg, target)
    randomize_(draft, seed=5)
    ref = reference_model(draft_config(block_size=8, rope_theta=cfg.rope_theta))
    ref.load_state_dict(state_dict_adapter.megatron_to_hf(
        {k: v.detach() for k, v in draft.named_parameters()}, cfg))
    head = head_state(target)
    g = torch.Generator().manual_seed(6)
    features = torch.randn(19, 1, 2 * cfg.hidden_size, generator=g)
    assert_cached_decoding_equals_reference(draft, ref, head, features, (10, 3, 1, 5), g, 8)


@pytest.mark.parametrize("kind", ["qwen3", "llama"])
def test_lossless_with_random_draft(utils, tmp_path, kind):
    utils.initialize_model_parallel(1)
    cfg = draft_config()
    target = target_dir(tmp_path / "target", kind=kind, seed=7)
    draft = write_reference_dir(tmp_path / "draft", cfg, reference_model(cfg, 8).state_dict())
    decoder = build_decoder(target, draft)
    prompts = random_prompts(3, seed=9)
    report, pairs = evaluate(decoder, prompts, max_new_tokens=20, warmup=False)
    assert report.lossless and report.num_requests == 3
    assert all(len(b.tokens) == 20 for _, b in pairs)
    assert 1 <= report.tau <= cfg.block_size
    # A stop token inside the output: both loops stop right after it.
    stop = pairs[0][1].tokens[9]
    spec = decoder.generate(prompts[0], 20, [stop])
    base = decoder.generate(prompts[0], 20, [stop], block_size=1)
    assert spec.tokens == base.tokens and spec.tokens[-1] == stop and stop not in spec.tokens[:-1]


@pytest.fixture
def trained(utils, models):
    """(decoder, prompts): a draft trained 40 steps on the target's own greedy continuations of
    8 prompts (`models`' target and random draft as the start)."""
    utils.initialize_model_parallel(1)
    decoder = build_decoder(*models)
    target, draft = decoder.target, decoder.draft
    prompts = random_prompts(8, seed=10)
    sequences = [p + decoder.generate(p, 42, block_size=1).tokens for p in prompts]
    tokens = torch.tensor(sequences)
    loss_mask = torch.zeros_like(tokens, dtype=torch.bool)
    loss_mask[:, 6:] = True
    cfg = draft.dflash_config
    module = DFlashTrainingModule(target, draft)
    optimizer = torch.optim.AdamW(draft.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(11)
    draft.train()
    for _ in range(40):
        mb = prepare_microbatch(tokens, loss_mask, cfg, g)
        hidden, _ = module(mb["tokens"], mb["position_ids"], mb["block_input_ids"],
                           mb["attention_mask"], mb["block_position_ids"])
        logits = target_head(target)[1](hidden)
        loss_sum, weight_sum = dflash_loss(logits, mb["labels"], mb["weights"])
        optimizer.zero_grad()
        (loss_sum / weight_sum).backward()
        optimizer.step()
    return SpeculativeDecoder(target, draft), prompts


def _hf_greedy(model, prompt, max_new_tokens, stop=None) -> list[int]:
    """HF `generate` greedy: no stop token unless `stop` (then it ends right after one)."""
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                         dtype=torch.long), do_sample=False, max_new_tokens=max_new_tokens,
                         eos_token_id=stop, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _assert_equals_hf_generate(decoder, target_path, prompts, n=36) -> int:
    """The decoder's output (speculative and target-only) equals HF `transformers` greedy
    `generate` (fp32, CPU) of the target checkpoint token for token, without a stop token and
    with one from the output. Returns the speculative decoder's verify steps without a stop."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(target_path, dtype=torch.float32).eval()
    steps = 0
    for prompt in prompts:
        expected = _hf_greedy(hf, prompt, n)
        spec = decoder.generate(prompt, n)
        assert len(expected) == n and spec.tokens == expected
        assert decoder.generate(prompt, n, block_size=1).tokens == expected
        steps += len(spec.acceptance_lengths)
        stop = expected[n // 3]
        expected = _hf_greedy(hf, prompt, n, stop)
        assert expected[-1] == stop and len(expected) < n
        assert decoder.generate(prompt, n, [stop]).tokens == expected
    return steps


@pytest.mark.parametrize("kind", ["qwen3", "llama"])
def test_random_draft_equals_hf_transformers_generate(utils, tmp_path, kind):
    utils.initialize_model_parallel(1)
    cfg = draft_config()
    path = target_dir(tmp_path / "target", kind=kind, seed=21)
    decoder = build_decoder(path, write_reference_dir(tmp_path / "draft", cfg,
                                                      reference_model(cfg, 22).state_dict()))
    _assert_equals_hf_generate(decoder, path, random_prompts(3, seed=23))


def test_lossless_with_trained_draft(trained, models):
    """The trained draft accepts often, and the output still equals target-only greedy decoding
    and HF `transformers` greedy `generate` token for token."""
    decoder, prompts = trained
    report, _ = evaluate(decoder, prompts[:4], max_new_tokens=36, warmup=False)
    assert report.lossless
    assert report.tau > 3.0, report  # 5.3 when written
    assert report.position_acceptance[0] > 0.5
    steps = _assert_equals_hf_generate(decoder, models[0], prompts[:3], n=36)
    assert steps < 3 * 36 / 3  # τ > 3 here too: the drafts were really accepted


class ScriptedDraft(torch.nn.Module):
    """Proposes the target's greedy tokens for the first `script[step]` slots of each block and
    a wrong token after them, so every step's acceptance is known in advance."""

    def __init__(self, greedy, script, block_size):
        super().__init__()
        self.greedy, self.script = greedy, list(script)
        self.dflash_config = types.SimpleNamespace(block_size=block_size, mask_token_id=3,
                                                   target_layer_ids=[1, 4])

    def forward(self, block, features, mask, positions, return_hidden, kv_cache):
        size, start = block.shape[1], int(positions[0, -block.shape[1]])
        right = self.script.pop(0)
        tokens = self.greedy[start + 1:start + size]
        self.proposal = torch.cat([tokens[:right], (tokens[right:] + 1) % VOCAB])
        return torch.zeros(size, 1, 1)  # stands for the block's hidden states

    def propose(self, hidden, anchor):
        return self.proposal


def test_tau_and_position_acceptance_on_a_scripted_case(utils, tmp_path, models):
    """B=8, 17 new tokens. Request 1 accepts 2, 7, 0, 3 drafts (emits 3, 8, 1, 4: τ=4); request
    2 accepts 1 per step (8 steps of 2: τ=2). τ is the mean of per-request means: 3.0 (the
    pooled mean would be 32/12)."""
    utils.initialize_model_parallel(1)
    target = build_decoder(*models).target
    prompts = random_prompts(2, seed=12)
    baseline = SpeculativeDecoder(target)
    greedy = [torch.tensor(p + baseline.generate(p, 17, block_size=1).tokens) for p in prompts]
    scripts = [[2, 7, 0, 3], [1] * 8]
    runs = []
    for prompt, seq, script in zip(prompts, greedy, scripts):
        decoder = SpeculativeDecoder(target, ScriptedDraft(seq, script, block_size=8))
        report, pairs = evaluate(decoder, [prompt], 17, warmup=False)
        assert report.lossless
        runs.append(pairs[0][0])
    assert [g.acceptance_lengths for g in runs] == [[3, 8, 1, 4], [2] * 8]
    assert [g.accepted for g in runs] == [[2, 7, 0, 3], [1] * 8]
    assert [g.drafted for g in runs] == [[7, 7, 5, 4], [7, 7, 7, 7, 7, 6, 4, 2]]  # cut at 17
    assert tau([g.acceptance_lengths for g in runs]) == 3.0
    expected = [11 / 12, 3 / 12, 2 / 11, 1 / 11, 1 / 9, 1 / 8, 1 / 7]
    assert position_acceptance(runs, 8) == pytest.approx(expected)


def test_tau_definition():
    g = [Generation([], acceptance_lengths=[4, 2]), Generation([], acceptance_lengths=[1]),
         Generation([], acceptance_lengths=[])]
    assert tau([x.acceptance_lengths for x in g]) == 2.0


def test_plot_is_a_png(tmp_path):
    path = tmp_path / "acc.png"
    plot_position_acceptance([0.9, 0.7, float("nan"), 0.2], str(path), "test")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 500


def test_evaluate_tool(utils, tmp_path, models, capsys):
    utils.initialize_model_parallel(1)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"input_ids": p}) for p in random_prompts(2, seed=13)))
    args = ["--target", models[0], "--draft", models[1], "--prompts", str(prompts),
            "--max-new-tokens", "12", "--plot", str(tmp_path / "acc.png"),
            "--output", str(tmp_path / "report.json")]
    assert tool("evaluate_dflash").main(args) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["mismatched_requests"] == [] and report["num_requests"] == 2
    assert len(report["position_acceptance"]) == 7 and (tmp_path / "acc.png").is_file()
    assert "lossless: yes" in capsys.readouterr().out


def test_evaluate_tool_runs_with_plain_python_on_cpu(tmp_path, models):
    """`python tools/evaluate_dflash.py` as a user runs it: its own process and world of one,
    CUDA hidden, no test harness (no tests/ on its path, no CPU adaptations applied for it)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                        "MASTER_PORT") and not k.startswith("TORCHELASTIC")}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    script = os.path.join(REPO, "tools", "evaluate_dflash.py")
    usage = tool("evaluate_dflash").build_parser().format_help()  # what --help prints
    assert "Runs on CPU or GPU as is" in " ".join(usage.split())
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"input_ids": p}) for p in random_prompts(2, seed=14)))
    result = subprocess.run(
        [sys.executable, script, "--target", models[0], "--draft", models[1], "--prompts",
         str(prompts), "--max-new-tokens", "12", "--output", str(tmp_path / "report.json")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "lossless: yes" in result.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["mismatched_requests"] == [] and report["num_requests"] == 2


def test_evaluate_rejects_empty_prompts(utils, tmp_path, models, capsys):
    """An empty prompt (no input_ids, or text that the target's tokenizer makes no tokens of:
    this tiny target has no tokenizer files) is one error message, not a crash mid-forward."""
    utils.initialize_model_parallel(1)
    for record, message in (({"input_ids": []}, "line 1 has no input_ids"),
                            ({"prompt": "hello"}, "prompt 1 encodes to no tokens")):
        prompts = tmp_path / "prompts.jsonl"
        prompts.write_text(json.dumps(record))
        capsys.readouterr()
        rc = tool("evaluate_dflash").main(["--target", models[0], "--draft", models[1],
                                           "--prompts", str(prompts)])
        err = capsys.readouterr().err.strip()
        assert rc == 1 and err.startswith("evaluate_dflash: error:") and message in err, err
    with pytest.raises(ValueError, match="prompt is empty"):
        SpeculativeDecoder(build_decoder(*models).target).generate([], 4, block_size=1)


def test_evaluate_rejects_a_draft_for_another_target(utils, tmp_path, models, capsys):
    utils.initialize_model_parallel(1)
    other = target_dir(tmp_path / "other", hidden_size=32, head_dim=8)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"input_ids": random_prompts(1, seed=15)[0]}))
    capsys.readouterr()
    rc = tool("evaluate_dflash").main(["--target", other, "--draft", models[1],
                                       "--prompts", str(prompts)])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err.startswith("evaluate_dflash: error:") and "hidden size 32" in err
