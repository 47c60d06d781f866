"""Sharding over generation replicas, durable part files, and the merge into one output, so that a
killed run resumes where it stopped and the output holds every id exactly once.

Conversation i belongs to generation replica i % R; each replica's leader appends finished
conversations to its own part file `OUTPUT.parts/part-RRRRR.jsonl` (flush + fsync per line); a
restart reads the part files (a torn last line is cut off) and skips the ids already there; at the
end rank 0 writes `output` atomically in input order from the part files. The ranks of one replica
are a TP group, widened to the expert-parallel group for an MoE target whose experts span
data-parallel ranks (megatron's token dispatcher exchanges those ranks' tokens, so they run the
same batch). The settings that shaped the part files are recorded beside them (`settings`).
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from typing import Sequence

from megatron.core import parallel_state

from megatron_dflash.atomic import write_text
from megatron_dflash.regeneration.conversations import Conversation


@dataclass
class Replica:
    """This rank's generation replica: which conversations it takes and whether it writes."""

    index: int
    count: int
    leader: bool


def generation_replica() -> Replica:
    """Replicas are the data-parallel ranks, grouped so that an expert-parallel group that spans
    data-parallel ranks (EP x expert-TP wider than TP) runs one batch."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    span = max(1, parallel_state.get_expert_model_parallel_world_size()
               * parallel_state.get_expert_tensor_parallel_world_size() // tp)
    dp_rank = parallel_state.get_data_parallel_rank()
    dp = parallel_state.get_data_parallel_world_size()
    return Replica(dp_rank // span, max(1, dp // span),
                   parallel_state.get_tensor_model_parallel_rank() == 0 and dp_rank % span == 0)


def parts_dir(output: str) -> str:
    return output + ".parts"


def part_path(output: str, replica: int) -> str:
    return os.path.join(parts_dir(output), f"part-{replica:05d}.jsonl")


def has_parts(output: str) -> bool:
    """Whether any part file of `output` holds a byte (a run already wrote conversations)."""
    return any(os.path.getsize(p) for p in glob.glob(os.path.join(parts_dir(output),
                                                                  "part-*.jsonl")))


def read_part(path: str) -> dict[str, dict]:
    """The records of a part file by id; a torn last line (a kill mid-write) is cut off."""
    if not os.path.isfile(path):
        return {}
    records, good = {}, 0
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break
            record = json.loads(raw)
            records[record["id"]] = record
            good += len(raw)
    if good != os.path.getsize(path):
        with open(path, "r+b") as f:
            f.truncate(good)
    return records


class PartWriter:
    """Appends finished conversations to one replica's part file, one durable line each."""

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.file = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


def merge_parts(output: str, conversations: Sequence[Conversation], replicas: int) -> int:
    """Write `output` ({"id", "messages"} per line, input order) from the part files, atomically;
    returns the number of conversations written (skipped ones are left out). Raises if an id is
    missing or appears in two part files."""
    records: dict[str, dict] = {}
    for r in range(replicas):
        for cid, record in read_part(part_path(output, r)).items():
            if cid in records:
                raise RuntimeError(f"{output}: id {cid!r} is in two part files")
            records[cid] = record
    missing = [c.id for c in conversations if c.id not in records]
    if missing:
        raise RuntimeError(f"{output}: {len(missing)} conversations were not generated "
                           f"(first: {missing[0]!r})")
    lines = [json.dumps({"id": c.id, "messages": records[c.id]["messages"]}, ensure_ascii=False)
             for c in conversations if records[c.id].get("messages") is not None]
    write_text(output, "".join(line + "\n" for line in lines))
    return len(lines)
