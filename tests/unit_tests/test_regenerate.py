"""Regeneration with the frozen megatron target (megatron_dflash/regenerate.py,
tools/regenerate_data.py): batched greedy decoding equals HF `transformers` greedy `generate`
token for token (prompts of different lengths, a stop token, the length limit), the taps
captured while generating equal a full forward's hidden states, sampling is reproducible per
conversation, all turns vs the last one, a killed run resumes with every id exactly once and the
uninterrupted run's output and features, and bad input is reported with file:line."""
import json
import os
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import Utils
from dflash_testing import load_script, tiny_target_dir
from megatron_dflash import regenerate as regen
from megatron_dflash.data.conversations import MALFORMED, DataReport
from megatron_dflash.feature_cache import FeatureCacheDataset, read_manifest
from megatron_dflash.targets import build_target, load_hf_config, load_hf_weights
from megatron_dflash.targets import target_transformer_config

VOCAB, TAPS = 256, [0, 2]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "system", "user", "assistant"]
STOP = 2  # <|im_end|>: the tokenizer's eos and generation_config.json's eos_token_id
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def chat_tokenizer_dir(path, vocab=VOCAB) -> str:
    """A fast word-level tokenizer with a ChatML template saved into `path` (every id is one
    whitespace-separated word: ChatML markers, roles, then w0, w1, ...)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = SPECIAL + [f"w{i}" for i in range(vocab - len(SPECIAL))]
    model = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)},
                                       unk_token="<|endoftext|>"))
    model.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    model.add_special_tokens(SPECIAL[:3])  # split out before the words: "w7<|im_end|>"
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=model, eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(path)
    return str(path)


def chat_target_dir(path, seed=0) -> str:
    """The tiny random Llama target with the chat tokenizer beside it."""
    tiny_target_dir(path, vocab=VOCAB, seed=seed)
    return chat_tokenizer_dir(path)


def conversations_jsonl(path, count=7, seed=0) -> str:
    """`count` conversations of random words: one or two assistant turns, some ending with a
    user turn, alternating OpenAI and ShareGPT forms, ids from the `id` field."""
    g = torch.Generator().manual_seed(seed)

    def words(n):
        return " ".join(f"w{int(i)}" for i in torch.randint(0, 200, (n,), generator=g))

    with open(path, "w") as f:
        for i in range(count):
            turns = [("user", words(3 + i % 5)), ("assistant", words(4))]
            turns += [("user", words(2))] + ([("assistant", words(3))] if i % 3 else [])
            record = ({"id": f"c{i}", "messages": [{"role": r, "content": c} for r, c in turns]}
                      if i % 2 else
                      {"id": f"c{i}", "conversations": [{"from": {"user": "human"}.get(r, "gpt"),
                                                         "value": c} for r, c in turns]})
            f.write(json.dumps(record) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(target dir, megatron target at TP=1, HF model, tokenizer)."""
    path = chat_target_dir(tmp_path_factory.mktemp("regen") / "target", seed=3)
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
    write, calls = regen.PartWriter.write, []

    def dying_write(self, record):
        calls.append(record["id"])
        if len(calls) == 3:  # a kill in the middle of the third line
            self.file.write(json.dumps(record)[:20])
            self.file.flush()
            raise _Killed()
        write(self, record)

    monkeypatch.setattr(regen.PartWriter, "write", dying_write)
    with pytest.raises(_Killed):
        tool.main(args("resumed"))
    monkeypatch.setattr(regen.PartWriter, "write", write)
    assert not os.path.exists(tmp_path / "resumed.jsonl")
    capsys.readouterr()
    generated = []
    regenerate = regen.regenerate
    monkeypatch.setattr(regen, "regenerate", lambda g, p, todo, **kw: (
        generated.extend(c.id for c in todo) or regenerate(g, p, todo, **kw)))
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
