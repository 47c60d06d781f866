"""The embedded default's own choices: its prompts, the human answers it can train on instead,
and its flag defaults (the run itself is `make run`, measured in the issue notes)."""
import json

from megatron_dflash.run.flags import build_parser, run_config
from megatron_dflash.training import embedded, embedded_data
from megatron_dflash.training.pretrain import parse_plan


def test_prompts_are_distinct_user_turns_openings_first_without_held_out(tmp_path):
    path = tmp_path / "chats.jsonl"
    chats = [
        {"id": "a", "messages": [{"role": "user", "content": "What is your favourite smell?"},
                                 {"role": "assistant", "content": "Rain on a hot street."},
                                 {"role": "user", "content": "Mine is coffee in the morning"}]},
        {"id": "b", "messages": [{"role": "user", "content": "What is your favourite smell?"},
                                 {"role": "assistant", "content": "Pine."},
                                 {"role": "user", "content": "ok"}]},
        {"id": "c", "messages": [{"role": "user", "content": "Where would you like to travel?"}]},
    ]
    path.write_text("".join(json.dumps(c) + "\n" for c in chats))
    got = embedded_data.prompts(str(path), 10)
    assert [p["id"] for p in got] == ["a/0", "c/0", "a/2"]  # openings first, "ok" too short
    assert got[2]["messages"] == [{"role": "user", "content": "Mine is coffee in the morning"}]
    assert [p["id"] for p in embedded_data.prompts(str(path), 1)] == ["a/0"]
    held_out = {"Where would you like to travel?"}
    assert [p["id"] for p in embedded_data.prompts(str(path), 10, exclude=held_out)] == ["a/0", "a/2"]


def _field(run, name):
    return next(getattr(section, name) for section in vars(run).values()
                if hasattr(section, name))


def test_embedded_defaults_apply_only_to_the_embedded_default():
    defaults = run_config(build_parser().parse_args([]))
    embedded_run = parse_plan([]).run
    for name, value in embedded.RUN_DEFAULTS.items():
        assert _field(embedded_run, name) == value, name
    assert any(_field(defaults, n) != v for n, v in embedded.RUN_DEFAULTS.items())
    assert parse_plan(["--block-size", "4"]).run.dflash.block_size == 4  # a flag still wins
    assert parse_plan([]).dflash.mask_token_id == 16  # the embedded target's


def test_human_answers_are_the_replies_that_followed_the_same_prompts(tmp_path, monkeypatch):
    """--embedded-answers human: each training prompt with the human reply after it; a prompt the
    conversation ended on has none and is left out."""
    chats = [
        {"id": "a", "messages": [{"role": "user", "content": "What is your favourite smell?"},
                                 {"role": "assistant", "content": "Rain on a hot street."},
                                 {"role": "user", "content": "Mine is coffee in the morning"}]},
        {"id": "c", "messages": [{"role": "user", "content": "Where would you like to travel?"},
                                 {"role": "assistant", "content": "Japan, for the food."}]},
        {"id": "h", "messages": [{"role": "user", "content": "Held out: what did you eat?"}]},
    ]
    (tmp_path / "chitchat_train.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats[:2]))
    (tmp_path / "chitchat_held_out.jsonl").write_text(json.dumps(chats[2]) + "\n")
    path = embedded_data.human_answers(str(tmp_path))
    got = [json.loads(line) for line in open(path)]
    assert got == [{"id": "a/0", "messages": chats[0]["messages"][:2]},
                   {"id": "c/0", "messages": chats[1]["messages"]}]  # "a/2" ended the chat
    prompts = [json.loads(line)["id"] for line in open(embedded_data.train_prompts(str(tmp_path)))]
    assert prompts == ["a/0", "c/0", "a/2"]  # the regenerated run's prompts: the same ones
