"""The conversations to regenerate: JSONL records in OpenAI `messages` or ShareGPT
`conversations` form, parsed as training reads them (`data.conversations.normalize`) except that
a trailing user turn is kept (it asks for a new answer), each with a stable id (the record's `id`,
else `file:line`) that shards, part files and the feature cache key on."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Sequence

from megatron_dflash.data.conversations import (MALFORMED, UNKNOWN_FORMAT, DataReport,
                                                SampleError, iter_lines, normalize)

DUPLICATE_ID = "duplicate id"
# What normalize() keeps after it: an assistant turn, removed again (a trailing user turn asks for
# one new assistant turn; normalize drops turns after the last assistant turn).
_PLACEHOLDER = {"role": "assistant", "content": ""}


@dataclass
class Conversation:
    id: str
    index: int
    """Position among the usable conversations of the input (the output's order)."""
    messages: list[dict]
    where: str = ""


def parse_conversation(raw: bytes | str) -> tuple[str | None, list[dict]]:
    """(the record's `id` or None, its messages) as `normalize` gives them, except that turns
    after the last assistant turn are kept (a trailing user turn asks for a new answer)."""
    try:
        record = json.loads(raw)
    except ValueError as e:
        raise SampleError(MALFORMED, str(e)) from None
    key = next((k for k in ("messages", "conversations")
                if isinstance(record, dict) and isinstance(record.get(k), list)), None)
    if key is None:
        return None, normalize(record)  # raises its own error
    messages = normalize({key: [*record[key], _PLACEHOLDER]})[:-1]
    if not messages:
        raise SampleError(UNKNOWN_FORMAT, "no user or system turn")
    record_id = record.get("id")
    return (None if record_id is None else str(record_id)), messages


def read_conversations(paths: Sequence[str], report: DataReport) -> list[Conversation]:
    """The usable conversations of `paths` in order; bad lines and repeated ids go to `report`
    with their file:line. Ids: the record's `id`, else `file:line`."""
    out, seen = [], set()
    report.files = list(paths)
    for path, line, raw in iter_lines(paths):
        report.read += 1
        try:
            record_id, messages = parse_conversation(raw)
        except SampleError as e:
            report.add(path, line, e.kind, e.detail)
            continue
        cid = record_id if record_id is not None else f"{path}:{line}"
        if cid in seen:
            report.add(path, line, DUPLICATE_ID, cid)
            continue
        seen.add(cid)
        out.append(Conversation(cid, len(out), messages, f"{path}:{line}"))
    report.kept = len(out)
    return out
