"""chitchat-dataset (MIT, 7,168 two-person chats) -> OpenAI `messages` JSONL for the default run.

Each conversation is a list of message groups, each group one speaker's consecutive utterances,
plus (for most) the `prompt` both people were given. The prompt becomes the first user turn, so
the first speaker answers it as the assistant; then the speakers alternate assistant/user.
Without a prompt the first speaker is the user. One-speaker conversations are monologues, not
chats: they are skipped and counted.
"""
from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from itertools import groupby

from megatron_dflash.data.dataset import split_indices

CHITCHAT_PACKAGE = "chitchat_dataset"


def chitchat_json() -> str:
    """Path of dataset.json in the installed chitchat-dataset package (not imported)."""
    spec = importlib.util.find_spec(CHITCHAT_PACKAGE)
    path = os.path.join(spec.submodule_search_locations[0], "dataset.json") if spec else ""
    if not os.path.isfile(path):
        raise FileNotFoundError("chitchat-dataset==0.9.0 is not installed "
                                "(pip install chitchat-dataset==0.9.0)")
    return path


def conversation_to_messages(conversation: dict) -> list[dict] | None:
    """OpenAI messages for one chitchat conversation, or None for a one-speaker conversation.

    Empty utterances are dropped; consecutive utterances of one speaker form one turn.
    """
    utterances = [(u["sender"], u["text"].strip()) for group in conversation["messages"]
                  for u in group]
    turns = [(sender, "\n".join(text for _, text in group))
             for sender, group in groupby([u for u in utterances if u[1]], key=lambda u: u[0])]
    if len({sender for sender, _ in turns}) < 2:
        return None
    prompt = (conversation.get("prompt") or "").strip()
    messages = [{"role": "user", "content": prompt}] if prompt else []
    roles = ("assistant", "user") if prompt else ("user", "assistant")
    messages += [{"role": roles[i % 2], "content": text} for i, (_, text) in enumerate(turns)]
    return messages


@dataclass
class ChitchatSplit:
    train_path: str
    held_out_path: str
    train: int
    held_out: int
    skipped_monologues: int


def write_chitchat_jsonl(out_dir: str, held_out_fraction: float = 0.05,
                         seed: int = 0) -> ChitchatSplit:
    """Write out_dir/chitchat_{train,held_out}.jsonl ({"id", "messages"} per line).

    The split is by sorted conversation id and `seed`, so it is the same on every machine; each
    file is written under a temporary name and renamed when complete.
    """
    with open(chitchat_json(), encoding="utf-8") as f:
        data = json.load(f)
    converted = [(cid, conversation_to_messages(data[cid])) for cid in sorted(data)]
    records = [{"id": cid, "messages": m} for cid, m in converted if m is not None]
    train, held_out = split_indices(len(records), held_out_fraction, seed)
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for name, indices in (("train", train), ("held_out", held_out)):
        path = paths[name] = os.path.join(out_dir, f"chitchat_{name}.jsonl")
        with open(path + ".partial", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(records[i], ensure_ascii=False) + "\n" for i in indices)
        os.replace(path + ".partial", path)
    return ChitchatSplit(paths["train"], paths["held_out"], len(train), len(held_out),
                         len(converted) - len(records))
