"""Regeneration with the frozen megatron target (megatron_dflash/regeneration,
megatron_dflash/generation, tools/regenerate_data.py): batched greedy decoding equals HF
`transformers` greedy `generate` token for token (prompts of different lengths, a stop token, the
length limit), the taps captured while generating equal a full forward's hidden states, sampling
is reproducible per conversation, all turns vs the last one, a killed run resumes with every id
exactly once and the uninterrupted run's output and features, a resume with other settings is
refused with one line naming the flag, stop tokens come from the target's GenerationConfig, and
bad input is reported with file:line."""
import json
import os
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.layout_testing import Utils
from tests.dflash_testing import load_script
from tests.regenerate_testing import (CHATML, STOP, TAPS, VOCAB, chat_target_dir,
                                      conversations_jsonl)
from megatron_dflash import regeneration as regen
from megatron_dflash.data.conversations import MALFORMED, DataReport
from megatron_dflash.feature_cache import FeatureCacheDataset, read_manifest
from megatron_dflash.generation import stop_token_ids
from megatron_dflash.log import setup_logging
from megatron_dflash.regeneration import output as regen_output
from megatron_dflash.targets import build_target, load_hf_config, load_hf_weights
from megatron_dflash.targets import target_transformer_config


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(target dir, megatron target at TP=1, HF model, tokenizer)."""
    path = chat_target_dir(tmp_path_factory.mktemp("regen") / "target", seed=3)
    setup_logging()  # the progress and skipped-conversation lines, on stdout
    Utils.initialize_model_parallel(1)
    hf_config = load_hf_config(path)
    target = build_target(hf_config, target_transformer_config(hf_config))
    load_hf_weights(target, path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    yield path, target, hf, AutoTokenizer.from_pretrained(path)
    Utils.destroy_model_parallel()


def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(6, VOCAB, (n,), generator=g).tolist() for n in lengths]


def _hf_greedy(hf, prompt, max_new_tokens, stop=None):
    hf.generation_config.eos_token_id = stop
    out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                      dtype=torch.long), do_sample=False, max_new_tokens=max_new_tokens,
                      pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_batched_greedy_equals_hf_generate(setup):
    """A batch of prompts of 3, 8 and 13 tokens (left-padded to 13) gives each prompt's HF
    greedy continuation: 20 tokens without a stop token, and, with a stop token taken from an
    output, exactly up to and including its first occurrence."""
    _, target, hf, _ = setup
    prompts = _prompts([3, 8, 13], seed=1)
    expected = [_hf_greedy(hf, p, 20) for p in prompts]
    out = regen.BatchGenerator(target, []).generate(prompts, 20)
    assert [o.tokens for o in out] == expected and all(len(e) == 20 for e in expected)
    stop = expected[1][6]
    stopped = regen.BatchGenerator(target, [stop]).generate(prompts, 20)
    for prompt, o in zip(prompts, stopped):
        assert o.tokens == _hf_greedy(hf, prompt, 20, stop)
    assert stopped[1].tokens[-1] == stop and len(stopped[1].tokens) <= 7
    single = regen.BatchGenerator(target, [stop]).generate(prompts[1:2], 20)
    assert single[0].tokens == stopped[1].tokens


def test_features_captured_while_generating_equal_a_full_forward(setup):
    """Prefill + decode taps (with the KV cache, left padding and the extra last step) equal HF
    `hidden_states[i + 1]` of the whole prompt + generated sequence (fp32, <= 1e-5); `taps`
    (a killed run's rewrite) gives the same."""
    _, target, hf, _ = setup
    prompts = _prompts([4, 11], seed=2)
    generator = regen.BatchGenerator(target, [], TAPS)
    out = generator.generate(prompts, 9)
    for prompt, o in zip(prompts, out):
        tokens = torch.tensor([prompt + o.tokens])
        with torch.no_grad():
            hidden = hf(tokens, output_hidden_states=True).hidden_states
        full = torch.cat([hidden[i + 1][0] for i in TAPS], -1)
        assert o.features.shape == full.shape == (len(prompt) + 9, 2 * 64)
        assert (o.features - full).abs().max() < 1e-5
    rewritten = generator.taps([p + o.tokens for p, o in zip(prompts, out)])
    assert all((r - o.features).abs().max() < 1e-5 for r, o in zip(rewritten, out))


def _conversations(path):
    return regen.read_conversations([path], DataReport())


def _run(setup, conversations, batch_size=3, **kw):
    _, target, _, tokenizer = setup
    generator = regen.BatchGenerator(target, [STOP], kw.pop("layer_ids", None))
    return {r.conversation.id: r for r in regen.regenerate(
        generator, regen.ChatPrompts(tokenizer), conversations, batch_size=batch_size,
        max_new_tokens=kw.pop("max_new_tokens", 8), **kw)}


def test_sampling_is_reproducible_per_conversation(setup, tmp_path):
    """The same seed gives the same samples whatever the batch; another seed other samples;
    greedy differs from sampling."""
    conversations = _conversations(conversations_jsonl(tmp_path / "in.jsonl", count=4))
    sampled = regen.Sampling(temperature=1.0, top_p=0.9, seed=5)
    runs = [_run(setup, conversations, batch_size=b, sampling=sampled) for b in (4, 1)]
    other = _run(setup, conversations, sampling=regen.Sampling(1.0, 0.9, seed=6))
    greedy = _run(setup, conversations)
    messages = [{k: r.messages for k, r in run.items()} for run in (*runs, other, greedy)]
    assert messages[0] == messages[1]
    assert messages[0] != messages[2] and messages[0] != messages[3]


def test_all_turns_vs_last_turn_only(setup, tmp_path):
    """All turns: each assistant turn is new, and a later turn's prompt holds the earlier
    generated ids (here: the same as tokenising the rendered conversation, this tokenizer being
    word-level); the loss mask covers exactly the generated tokens. Last turn only: earlier
    assistant turns stay as written. A conversation ending with a user turn gets an answer."""
    _, _, _, tokenizer = setup
    conversations = _conversations(conversations_jsonl(tmp_path / "in.jsonl", count=3))
    original = {c.id: c.messages for c in conversations}
    every = _run(setup, conversations)
    last = _run(setup, conversations, last_turn_only=True)
    for cid, messages in original.items():
        assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if messages[-1]["role"] == "user":  # c0: one new turn after it
            assistant.append(len(messages))
        regenerated, kept = every[cid].messages, last[cid].messages
        assert len(regenerated) == len(kept) == assistant[-1] + 1
        assert [m["role"] for m in regenerated] == [m["role"] for m in kept]
        for i, m in enumerate(regenerated):
            if i in assistant:
                assert m != messages[i] if i < len(messages) else m["role"] == "assistant"
            else:
                assert m == messages[i]
        assert kept[:assistant[-1]] == messages[:assistant[-1]]
        assert kept[-1] != (messages[assistant[-1]] if assistant[-1] < len(messages) else None)
        result = every[cid]
        text = tokenizer.apply_chat_template(regenerated[:assistant[-1]], tokenize=False,
                                             add_generation_prompt=True)
        prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert result.tokens[:len(prompt)] == prompt
        assert sum(result.loss_mask) == result.generated_tokens
        assert sum(last[cid].loss_mask) == last[cid].generated_tokens < result.generated_tokens
    assert len(every["c0"].messages) == 4  # user, assistant, user, new assistant


def test_templates_that_rewrite_history_and_thinking(setup, tmp_path):
    """A template that renders earlier answers differently once later turns follow cannot keep
    the generated ids: such a conversation is reported and skipped unless --last-turn-only;
    --thinking reaches the template as enable_thinking."""
    tokenizer = AutoTokenizer.from_pretrained(setup[0])
    tokenizer.chat_template = CHATML.replace(
        "m['content']", "(m['content'] if m['role'] != 'assistant' or loop.last else 'w9')") \
        + "{% if enable_thinking is defined %}{{ 'thinking=' ~ enable_thinking }}{% endif %}"
    conversations = _conversations(conversations_jsonl(tmp_path / "in.jsonl", count=2))
    generator = regen.BatchGenerator(setup[1], [STOP])
    for last_turn_only in (False, True):
        results = list(regen.regenerate(generator, regen.ChatPrompts(tokenizer),
                                        conversations, batch_size=2, max_new_tokens=4,
                                        last_turn_only=last_turn_only))
        problems = [r.problem for r in results if r.messages is None]
        assert len(problems) == (0 if last_turn_only else 2)
        assert all("use --last-turn-only" in str(p) for p in problems)
    user = [{"role": "user", "content": "w1"}]
    assert regen.ChatPrompts(tokenizer, False).render(user).endswith("thinking=False")
    assert "thinking" not in regen.ChatPrompts(tokenizer).render(user)


def test_read_conversations_reports_bad_lines(tmp_path):
    lines = [json.dumps({"id": "a", "messages": [{"role": "user", "content": "w1"}]}),
             "{not json",
             json.dumps({"messages": [{"role": "wizard", "content": "w1"}]}),
             json.dumps({"id": "a", "messages": [{"role": "user", "content": "w2"}]}),
             json.dumps({"conversations": [{"from": "gpt", "value": "w3"},
                                           {"from": "human", "value": "w4"}]})]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(lines) + "\n")
    report = DataReport()
    conversations = regen.read_conversations([str(path)], report)
    assert [(c.id, c.index, c.messages) for c in conversations] == [
        ("a", 0, [{"role": "user", "content": "w1"}]),
        (f"{path}:5", 1, [{"role": "user", "content": "w4"}])]  # leading answer dropped
    assert [(p.line, p.kind) for p in report.problems] == [
        (2, MALFORMED), (3, "unknown format"), (4, regen.DUPLICATE_ID)]
    assert f"{path}:2: malformed JSON" in report.summary()


def _tool_args(target, inputs, output, *extra):
    return ["--target", target, "--input", inputs, "--output", str(output), "--batch-size", "2",
            "--max-new-tokens", "6", "--log-interval", "0", *extra]


class _Killed(Exception):
    pass


def _record_generated(monkeypatch) -> list[str]:
    """The ids that regenerate_to_file hands to generation from now on."""
    generated, regenerate = [], regen.regenerate
    monkeypatch.setattr(regen_output, "regenerate", lambda g, p, todo, **kw: (
        generated.extend(c.id for c in todo) or regenerate(g, p, todo, **kw)))
    return generated


def _die_after(monkeypatch, n: int) -> list[str]:
    """PartWriter.write dies in the middle of the n-th line (a kill); returns the ids tried."""
    write, calls = regen.PartWriter.write, []

    def dying_write(self, record):
        calls.append(record["id"])
        if len(calls) == n:
            self.file.write(json.dumps(record)[:20])
            self.file.flush()
            raise _Killed()
        write(self, record)

    monkeypatch.setattr(regen.PartWriter, "write", dying_write)
    return calls


def test_kill_and_restart_gives_every_id_once_and_the_same_output(setup, tmp_path, monkeypatch,
                                                                  capsys):
    """The tool, killed after 3 conversations (the third's line torn mid-write), restarted:
    the output and the feature cache hold every id exactly once and equal an uninterrupted
    run's; the resumed run regenerates only the conversations its part file lacked."""
    tool = load_script("tools/regenerate_data.py")
    path, inputs = setup[0], conversations_jsonl(tmp_path / "in.jsonl", count=7)
    with open(inputs, "a") as f:
        f.write("{broken\n")
    features = ["--offline-features", None, "--seq-length", "64", "--target-layer-ids", "0", "2"]

    def args(name):
        extra = list(features)
        extra[1] = str(tmp_path / f"{name}_features")
        return _tool_args(path, inputs, tmp_path / f"{name}.jsonl", *extra)

    assert tool.main(args("whole")) == 0
    write = regen.PartWriter.write
    calls = _die_after(monkeypatch, 3)  # a kill in the middle of the third line
    with pytest.raises(_Killed):
        tool.main(args("resumed"))
    monkeypatch.setattr(regen.PartWriter, "write", write)
    assert not os.path.exists(tmp_path / "resumed.jsonl")
    capsys.readouterr()
    generated = _record_generated(monkeypatch)
    assert tool.main(args("resumed")) == 0
    out = capsys.readouterr().out
    assert "in.jsonl:8: malformed JSON" in out and "7 conversations written" in out
    assert sorted(generated) == [f"c{i}" for i in range(7) if f"c{i}" not in calls[:2]]
    whole, resumed = ((tmp_path / f"{n}.jsonl").read_text().splitlines() for n in ("whole",
                                                                                     "resumed"))
    assert resumed == whole
    assert [json.loads(line)["id"] for line in resumed] == [f"c{i}" for i in range(7)]
    caches = [FeatureCacheDataset(str(tmp_path / f"{n}_features"),
                                  read_manifest(str(tmp_path / "whole_features")))
              for n in ("whole", "resumed")]
    ids = [c.ids() for c in caches]
    assert sorted(ids[1]) == sorted(ids[0]) == [f"c{i}" for i in range(7)]
    for cid in ids[0]:
        a, b = (c[i.index(cid)] for c, i in zip(caches, ids))
        assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["loss_mask"], b["loss_mask"])
        assert (a["features"] - b["features"]).abs().max() < 1e-5
        assert 0 < int(a["loss_mask"].sum()) < len(a["tokens"]) <= 64


@pytest.mark.parametrize("extra,message", [
    (["--pipeline-model-parallel-size", "2"], "--pipeline-model-parallel-size=2: generation runs"),
    (["--temperature", "-1"], "--temperature=-1.0 must be >= 0"),
    (["--top-p", "0"], "--top-p=0.0 must be in (0, 1]"),
    (["--offline-features", "feat"], "--offline-features needs --seq-length"),
    (["--expert-model-parallel-size", "2"], "world size 1 is not divisible by"),
])
def test_bad_flags_are_one_line_errors_before_the_target_loads(setup, tmp_path, capsys, extra,
                                                               message):
    tool = load_script("tools/regenerate_data.py")
    inputs = conversations_jsonl(tmp_path / "in.jsonl", count=1)
    with pytest.raises(SystemExit) as e:
        tool.main(_tool_args(setup[0], inputs, tmp_path / "out.jsonl", *extra))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and message in err[-1], err
    with pytest.raises(SystemExit):
        tool.main(_tool_args(setup[0], str(tmp_path / "missing.jsonl"), tmp_path / "o.jsonl"))
    assert "--input: " in capsys.readouterr().err


def test_progress_is_reported_when_a_batch_ends(setup, tmp_path, capsys):
    """Each progress line counts whole batches (batches of 2, five conversations: 2, 4, 5, then
    the final line), so its generated tokens/s is what was generated in the time it shows."""
    tool = load_script("tools/regenerate_data.py")
    inputs = conversations_jsonl(tmp_path / "in.jsonl", count=5)
    assert tool.main(_tool_args(setup[0], inputs, tmp_path / "out.jsonl")) == 0
    out = capsys.readouterr().out
    assert [int(n) for n in re.findall(r"conversations: (\d+)/5 ", out)] == [2, 4, 5, 5], out


def test_resume_with_other_settings_is_refused_before_generating(setup, tmp_path, monkeypatch,
                                                                 capsys):
    """Killed after 3 conversations (written with --max-new-tokens 6), restarted with
    --max-new-tokens 4, then --temperature 0.5, then both: each is refused with one line naming
    the flag(s), before anything is generated or written; restarted with the same flags, it
    completes and equals an uninterrupted run (greedy: --seed changes nothing and is accepted)."""
    tool = load_script("tools/regenerate_data.py")
    path, inputs = setup[0], conversations_jsonl(tmp_path / "in.jsonl", count=7)
    out = tmp_path / "resumed.jsonl"
    assert tool.main(_tool_args(path, inputs, tmp_path / "whole.jsonl")) == 0
    write = regen.PartWriter.write
    _die_after(monkeypatch, 4)
    with pytest.raises(_Killed):
        tool.main(_tool_args(path, inputs, out))
    monkeypatch.setattr(regen.PartWriter, "write", write)
    parts = regen.parts_dir(str(out))
    part = (tmp_path / "resumed.jsonl.parts" / "part-00000.jsonl").read_text()
    generated = _record_generated(monkeypatch)
    capsys.readouterr()
    refusals = [
        (["--max-new-tokens", "4"], f"--max-new-tokens: the part files in {parts} were written "
                                    f"with 6, this run asks for 4; use the same value or remove "
                                    f"{parts} to start afresh"),
        (["--temperature", "0.5"], f"--temperature: the part files in {parts} were written with "
                                   f"0.0, this run asks for 0.5; use the same value"),
        (["--max-new-tokens", "4", "--temperature", "0.5"],
         f"--temperature, --max-new-tokens: the part files in {parts} were written with 0.0 "
         f"and 6, this run asks for 0.5 and 4; use the same values or remove {parts}"),
    ]
    for extra, message in refusals:
        argv = _tool_args(path, inputs, out) + extra
        with pytest.raises(SystemExit) as e:
            tool.main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and message in err[-1], err
    assert generated == [] and not out.exists()
    assert (tmp_path / "resumed.jsonl.parts" / "part-00000.jsonl").read_text() == part
    assert tool.main(_tool_args(path, inputs, out, "--seed", "7")) == 0
    assert len(generated) == 4  # 7 - the 3 whole lines the kill left
    assert out.read_text() == (tmp_path / "whole.jsonl").read_text()


def test_library_resume_names_fields_without_flags(setup, tmp_path):
    """Through `regenerate_to_file` (no flag map): the field name is the name; the chat template
    and the target (config.json hash) are settings too; settings recorded by a run killed
    before its first conversation do not bind the next run."""
    _, target, _, tokenizer = setup
    conversations = _conversations(conversations_jsonl(tmp_path / "in.jsonl", count=2))
    output = str(tmp_path / "out.jsonl")
    generator = regen.BatchGenerator(target, [STOP])

    def run(prompts=regen.ChatPrompts(tokenizer), max_new_tokens=3):
        return regen.regenerate_to_file(generator, prompts, conversations, output, batch_size=2,
                                        max_new_tokens=max_new_tokens, target=setup[0])

    assert run(max_new_tokens=5) == 2  # records the settings, writes every conversation
    other = AutoTokenizer.from_pretrained(setup[0])
    other.chat_template = CHATML + " "
    for kwargs, message in (({"max_new_tokens": 3}, "max_new_tokens: the part files in "),
                            ({"max_new_tokens": 5, "prompts": regen.ChatPrompts(other)},
                             "chat_template_sha256: the part files in ")):
        with pytest.raises(regen.SettingsMismatch) as e:
            run(**kwargs)
        assert str(e.value).startswith(message) and "\n" not in str(e.value)
    assert run(max_new_tokens=5) == 2
    os.remove(regen.part_path(output, 0))  # as if killed before the first part line
    assert run(max_new_tokens=3) == 2


def test_stop_token_ids_come_from_the_generation_config(tmp_path):
    """generation_config.json's eos_token_id (int or list) when the file exists, else
    config.json's; plus the tokenizer's eos when one is given."""
    from types import SimpleNamespace

    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 5}))
    assert stop_token_ids(str(tmp_path)) == [5]
    assert stop_token_ids(str(tmp_path), SimpleNamespace(eos_token_id=9)) == [5, 9]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 3]}))
    assert stop_token_ids(str(tmp_path)) == [3, 7]
    assert stop_token_ids(str(tmp_path), SimpleNamespace(eos_token_id=7)) == [3, 7]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 4}))
    assert stop_token_ids(str(tmp_path), SimpleNamespace(eos_token_id=None)) == [4]
