"""Chat data pipeline: JSONL forms, bad-data reports, assistant-only loss masks, indexed datasets,
resumable sampling, collation, held-out splits and the chitchat conversion."""
import io
import json
import os

import pytest
import sentencepiece as spm
import torch

from tests.dflash_testing import load_script
from megatron_dflash.data import (ChatTemplateError, ConversationDataset,
                                  IndexedConversationDataset, ResumableSampler, SampleError,
                                  SentencePieceChatTokenizer, build_dataset, collate,
                                  held_out_split, load_chat_tokenizer, normalize, parse_line,
                                  split_indices)
from megatron_dflash.data.chitchat import conversation_to_messages, write_chitchat_jsonl
from megatron_dflash.data.conversations import (MALFORMED, NO_ASSISTANT, NO_SUPERVISED, TEMPLATE,
                                                TRUNCATED, UNKNOWN_FORMAT)
from megatron_dflash.targets.gguf import smollm2_gguf

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hello, how are you today?"},
    {"role": "assistant", "content": "I am fine, thank you!"},
    {"role": "user", "content": "What is the weather like?"},
    {"role": "assistant", "content": "Sunny and warm, with a light breeze."},
]
SHAREGPT = {"conversations": [{"from": "system", "value": "You are terse."},
                              {"from": "human", "value": "Hello, how are you today?"},
                              {"from": "gpt", "value": "I am fine, thank you!"},
                              {"from": "human", "value": "What is the weather like?"},
                              {"from": "chatgpt", "value": "Sunny and warm, with a light breeze."}]}


def _load_tool():
    return load_script("tools/preprocess_data.py")


def _write_jsonl(path, records):
    with open(path, "w") as f:
        f.writelines((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)
    return str(path)


@pytest.fixture(scope="module")
def sp_path(tmp_path_factory):
    """A ~400-piece SentencePiece BPE trained here on a few KB, with ChatML pieces reserved."""
    lines = [f"{m['content']} {w} number {i}." for i in range(60) for m in CHAT
             for w in ("yes", "no", "maybe")]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=400, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        user_defined_symbols=["<|im_start|>", "<|im_end|>"], num_threads=1, minloglevel=2)
    path = tmp_path_factory.mktemp("sp") / "chat.model"
    path.write_bytes(model.getvalue())
    return str(path)


@pytest.fixture(scope="module")
def sp_tok(sp_path):
    return load_chat_tokenizer(f"sp:{sp_path}")


def _supervised_runs(tokens, mask):
    """Contiguous runs of loss-mask-1 token ids."""
    runs, run = [], []
    for t, m in zip(tokens, mask):
        if m:
            run.append(t)
        elif run:
            runs, run = runs + [run], []
    return runs + [run] if run else runs


# --- JSONL forms and bad data ------------------------------------------------------------------

def test_both_forms_normalise_to_the_same_messages():
    assert normalize({"messages": CHAT}) == CHAT
    assert parse_line(json.dumps(SHAREGPT).encode()) == CHAT
    # a leading assistant turn answers nothing (and templates render an empty history apart)
    opening = {"conversations": [{"from": "gpt", "value": "Hi!"}] + SHAREGPT["conversations"][1:]}
    assert normalize(opening) == CHAT[1:]
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                       {"type": "text", "text": "b"}]},
                          {"role": "assistant", "content": "c"},
                          {"role": "user", "content": "unanswered"}]}
    # text parts are joined; turns after the last assistant turn carry no loss and are dropped
    assert normalize(parts) == [{"role": "user", "content": "ab"},
                                {"role": "assistant", "content": "c"}]


@pytest.mark.parametrize("line,kind", [
    (b'{"messages": [', MALFORMED),
    (b'\xff\xfe{}', MALFORMED),
    (b'[1, 2]', UNKNOWN_FORMAT),
    (b'{"text": "hi"}', UNKNOWN_FORMAT),
    (b'{"messages": [{"role": "wizard", "content": "x"}]}', UNKNOWN_FORMAT),
    (b'{"conversations": [{"from": "gpt", "value": null}]}', UNKNOWN_FORMAT),
    (b'{"messages": [{"role": "user", "content": "hi"}]}', NO_ASSISTANT),
    (b'{"messages": [{"role": "assistant", "content": "hi"}]}', NO_ASSISTANT),
])
def test_unusable_lines_raise_sample_error(line, kind):
    with pytest.raises(SampleError) as e:
        parse_line(line)
    assert e.value.kind == kind


def test_bad_data_is_reported_with_file_and_line(tmp_path, sp_tok):
    long_chat = [{"role": "user", "content": "hi"},
                 {"role": "assistant", "content": "thank you " * 100}]
    late_answer = [{"role": "user", "content": "Hello there " * 100}, {"role": "assistant", "content": "x"}]
    path = _write_jsonl(tmp_path / "bad.jsonl", [
        {"messages": CHAT},                                      # 1
        '{"messages": [{"role": "user", "content": "oops"}',     # 2 malformed JSON
        SHAREGPT,                                                # 3
        {"messages": [{"role": "user", "content": "hi"}]},       # 4 no assistant turn
        {"messages": long_chat},                                 # 5 over-long: truncated, kept
        "",                                                      # 6 blank: not a sample
        {"messages": late_answer},                               # 7 answer beyond seq_length
    ])
    ds = ConversationDataset(path, sp_tok, seq_length=128)
    assert len(ds) == 3
    assert len(ds[2]["tokens"]) == 128 and ds[2]["loss_mask"].any()
    got = [(p.file, p.line, p.kind) for p in ds.report.problems]
    assert got == [(path, 2, MALFORMED), (path, 4, NO_ASSISTANT), (path, 5, TRUNCATED),
                   (path, 7, NO_SUPERVISED)]
    r = ds.report
    assert (r.read, r.kept, r.skipped) == (6, 3, 3)
    summary = r.summary()
    for line in (2, 4, 5, 7):
        assert f"bad.jsonl:{line}: " in summary
    assert "6 conversations in 1 file(s): 3 kept (1 truncated), 3 skipped" in summary


# --- loss masks --------------------------------------------------------------------------------

def _assert_assistant_only(tokenizer, decode, end_text):
    sample = tokenizer.encode(CHAT)
    assert len(sample.tokens) == len(sample.loss_mask) and not sample.truncated
    runs = _supervised_runs(sample.tokens, sample.loss_mask)
    assert [decode(r) for r in runs] == [m["content"] + end_text for m in CHAT
                                         if m["role"] == "assistant"]


def test_sentencepiece_loss_mask_is_exactly_the_assistant_tokens(sp_tok):
    sp = sp_tok.sp
    assert sp_tok._start == [sp.piece_to_id("<|im_start|>")]  # user-defined pieces: single ids
    _assert_assistant_only(sp_tok, sp.decode, "<|im_end|>")
    tokens, _ = sp_tok.encode_messages(CHAT[:1])
    assert tokens == sp_tok._start + sp.encode("system\n") + sp.encode(CHAT[0]["content"]) \
        + sp_tok._end + sp.encode("\n")


def test_sentencepiece_without_chatml_pieces_encodes_markers_as_text(tmp_path):
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["hello world"] * 50), model_writer=model,
                                   vocab_size=300, hard_vocab_limit=False, byte_fallback=True,
                                   minloglevel=2)
    tok = SentencePieceChatTokenizer(spm.SentencePieceProcessor(model_proto=model.getvalue()))
    assert tok._end == tok.sp.encode("<|im_end|>") and len(tok._end) > 1


def test_smollm2_loss_mask_is_exactly_the_assistant_tokens(smol):
    hf = smol.tokenizer
    _assert_assistant_only(smol, hf.decode, "<|im_end|>")
    # no system turn: the template injects its default one, still masked out
    sample = smol.encode(CHAT[1:])
    assert sample.tokens == list(hf.apply_chat_template(CHAT[1:], tokenize=True)["input_ids"])
    assert [hf.decode(r) for r in _supervised_runs(sample.tokens, sample.loss_mask)] == \
        [CHAT[2]["content"] + "<|im_end|>", CHAT[4]["content"] + "<|im_end|>"]
    truncated = smol.encode(CHAT, seq_length=10)
    assert truncated.truncated and truncated.tokens == smol.encode(CHAT).tokens[:10]


def test_template_problems(smol, monkeypatch):
    # no token ends an assistant turn, so no conversation has its end supervised: a setup error
    monkeypatch.setattr(smol.tokenizer, "chat_template",
                        "{{ messages|length }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(ChatTemplateError, match="closes an assistant turn with no special token"):
        smol.encode(CHAT)
    # a template that rejects one conversation: that sample is reported, not fatal
    monkeypatch.setattr(smol.tokenizer, "chat_template", "{{ raise_exception('roles must alternate') }}")
    with pytest.raises(SampleError) as e:
        smol.encode(CHAT)
    assert e.value.kind == TEMPLATE and "alternate" in e.value.detail


# --- indexed dataset via tools/preprocess_data.py ----------------------------------------------

def test_preprocess_round_trip(tmp_path, sp_path, sp_tok, capsys):
    tool = _load_tool()
    data = _write_jsonl(tmp_path / "a.jsonl", [{"messages": CHAT}, "not json", SHAREGPT])
    data2 = _write_jsonl(tmp_path / "b.jsonl", [{"messages": CHAT[:3]}])
    prefix = str(tmp_path / "out" / "chat")
    os.makedirs(os.path.dirname(prefix))
    argv = ["--input", data, data2, "--output-prefix", prefix, "--tokenizer", f"sp:{sp_path}",
            "--seq-length", "48"]
    assert tool.main(argv) == 0
    out = capsys.readouterr().out
    assert "a.jsonl:2: malformed JSON" in out and "wrote 3 conversations" in out
    assert sorted(os.listdir(os.path.dirname(prefix))) == [
        "chat.bin", "chat.idx", "chat_loss_mask.bin", "chat_loss_mask.idx"]

    indexed, report = build_dataset(prefix, None, seq_length=48)
    assert isinstance(indexed, IndexedConversationDataset) and report is None
    assert indexed.tokens.index.dtype.__name__ == "uint16"
    memory = ConversationDataset([data, data2], sp_tok, seq_length=48)
    assert len(indexed) == len(memory) == 3
    for i in range(3):
        for key, dtype in (("tokens", torch.long), ("loss_mask", torch.bool)):
            assert indexed[i][key].dtype == dtype
            assert torch.equal(indexed[i][key], memory[i][key])
    shorter = IndexedConversationDataset(prefix, seq_length=20)
    assert torch.equal(shorter[0]["tokens"], memory[0]["tokens"][:20])

    # a process pool gives the same files
    assert tool.main(argv[:4] + [prefix + "2", "--tokenizer", f"sp:{sp_path}", "--seq-length",
                                  "48", "--workers", "2"]) == 0
    assert "a.jsonl:2: malformed JSON" in capsys.readouterr().out
    for suffix in (".bin", "_loss_mask.bin"):
        with open(prefix + suffix, "rb") as a, open(prefix + "2" + suffix, "rb") as b:
            assert a.read() == b.read()


@pytest.mark.parametrize("case", ["missing input", "bad tokenizer", "gguf without file",
                                  "nothing usable", "no dir"])
def test_preprocess_errors_leave_nothing(tmp_path, sp_path, capsys, case):
    tool = _load_tool()
    good = _write_jsonl(tmp_path / "good.jsonl", [{"messages": CHAT}])
    bad = _write_jsonl(tmp_path / "bad.jsonl", ["{", {"messages": CHAT[:2]}])
    inputs, tokenizer, prefix = [good], f"sp:{sp_path}", str(tmp_path / "out")
    if case == "missing input":
        inputs = [good, str(tmp_path / "absent.jsonl")]
    elif case == "bad tokenizer":
        tokenizer = f"sp:{good}"
    elif case == "gguf without file":
        tokenizer = f"hf:{smollm2_gguf()[0]}"
    elif case == "nothing usable":
        inputs = [bad]
    else:
        prefix = str(tmp_path / "absent" / "out")
    before = sorted(os.listdir(tmp_path))
    rc = tool.main(["--input", *inputs, "--output-prefix", prefix, "--tokenizer", tokenizer,
                    "--seq-length", "32"])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("preprocess_data: error: ") and err.count("\n") == 1
    assert sorted(os.listdir(tmp_path)) == before


# --- sampler, collate, split -------------------------------------------------------------------

def _take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_sampler_resumes_exactly_and_ranks_are_disjoint():
    kw = dict(total_samples=23, micro_batch_size=2, data_parallel_size=2, seed=7)
    full = [_take(ResumableSampler(data_parallel_rank=r, **kw), 15) for r in range(2)]
    for step in zip(*full):  # each step: disjoint ranks
        assert not set(step[0]) & set(step[1])
    for epoch in range(3):  # 5 steps of 4 per epoch: 20 distinct of 23, a new order each epoch
        seen = [i for s in range(5 * epoch, 5 * epoch + 5) for r in range(2) for i in full[r][s]]
        assert len(set(seen)) == 20
    assert full[0][:5] != full[0][5:10]
    k = 7
    for r in range(2):
        resumed = ResumableSampler(data_parallel_rank=r, consumed_samples=k * 4, **kw)
        assert _take(resumed, 15 - k) == full[r][k:]
        assert resumed.consumed_samples == 15 * 4
    assert _take(ResumableSampler(data_parallel_rank=0, **{**kw, "seed": 8}), 5) != full[0][:5]
    assert _take(ResumableSampler(10, 2, shuffle=False), 2) == [[0, 1], [2, 3]]
    with pytest.raises(ValueError, match="multiple"):
        ResumableSampler(data_parallel_rank=0, consumed_samples=6, **kw)
    with pytest.raises(ValueError, match="cannot fill"):
        ResumableSampler(3, 2, data_parallel_size=2)


def test_collate_pads_to_a_multiple():
    samples = [{"tokens": torch.tensor([5, 6, 7]), "loss_mask": torch.tensor([0, 1, 1]).bool()},
               {"tokens": torch.arange(1, 6), "loss_mask": torch.ones(5, dtype=torch.bool)}]
    batch = collate(samples, pad_id=0, pad_to_multiple_of=4)
    assert batch["tokens"].dtype == torch.long and batch["loss_mask"].dtype == torch.bool
    assert batch["tokens"].tolist() == [[5, 6, 7, 0, 0, 0, 0, 0], [1, 2, 3, 4, 5, 0, 0, 0]]
    assert batch["loss_mask"].int().tolist() == [[0, 1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]]
    assert collate(samples, pad_id=9)["tokens"].shape == (2, 5)


def test_held_out_split_is_deterministic():
    train, held = split_indices(100, 0.1, seed=3)
    assert len(held) == 10 and sorted(train + held) == list(range(100))
    assert (train, held) == split_indices(100, 0.1, seed=3)
    assert held != split_indices(100, 0.1, seed=4)[1]
    assert split_indices(5, 0.01, 0)[1] and split_indices(5, 0.0, 0)[1] == []
    a, b = held_out_split(list(range(50, 60)), 0.2, seed=1)
    assert sorted(list(a) + list(b)) == list(range(50, 60)) and len(b) == 2
    with pytest.raises(ValueError):
        split_indices(1, 0.5, 0)


# --- chitchat ----------------------------------------------------------------------------------

def _utterances(*pairs):
    return [[{"sender": s, "text": t} for t in texts] for s, texts in pairs]


def test_chitchat_conversation_roles():
    conv = {"prompt": "Cats or dogs?",
            "messages": _utterances(("a", ["Cats", "obviously"]), ("b", [" "]), ("b", ["Dogs!"]),
                                    ("a", ["Why?"]))}
    assert conversation_to_messages(conv) == [
        {"role": "user", "content": "Cats or dogs?"}, {"role": "assistant", "content": "Cats\nobviously"},
        {"role": "user", "content": "Dogs!"}, {"role": "assistant", "content": "Why?"}]
    del conv["prompt"]
    assert [m["role"] for m in conversation_to_messages(conv)] == ["user", "assistant", "user"]
    assert conversation_to_messages({"prompt": "x", "messages": _utterances(("a", ["hi", "hey"]))}) is None


def test_chitchat_jsonl_is_valid_and_split(tmp_path, smol):
    split = write_chitchat_jsonl(str(tmp_path), held_out_fraction=0.05, seed=0)
    assert (split.train + split.held_out, split.skipped_monologues) == (4017, 3151)
    ids = {}
    for name, path in (("train", split.train_path), ("held_out", split.held_out_path)):
        with open(path, "rb") as f:
            lines = f.readlines()
        ids[name] = {json.loads(line)["id"] for line in lines}
        for line in lines:
            messages = json.loads(line)["messages"]
            roles = [m["role"] for m in messages]
            assert roles[::2] == ["user"] * len(roles[::2]) and set(roles[1::2]) == {"assistant"}
            assert all(m["content"] for m in messages) and parse_line(line)
    assert len(ids["held_out"]) == split.held_out == 201 and not ids["train"] & ids["held_out"]
    ds = ConversationDataset(split.held_out_path, smol, seq_length=256)
    assert len(ds) == 201 and ds.report.skipped == 0
