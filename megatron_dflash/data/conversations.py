"""JSONL conversations (OpenAI `messages` or ShareGPT `conversations`) -> [{role, content}].

Bad data never stops a run and is never dropped silently: every skipped or altered sample is
recorded in a `DataReport` with its `file:line` and a reason, and the report prints a summary.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Iterator

# Reasons a sample is skipped (or, for TRUNCATED, kept shortened).
MALFORMED = "malformed JSON"
UNKNOWN_FORMAT = "unknown format"
NO_ASSISTANT = "no assistant turn"
TEMPLATE = "chat template error"
NO_SUPERVISED = "no assistant token within seq_length"
TRUNCATED = "truncated to seq_length"

# ShareGPT speaker names (and OpenAI roles) -> the three roles chat templates know.
ROLES = {
    "system": "system",
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant",
    "bard": "assistant", "model": "assistant",
}


class SampleError(Exception):
    """One sample cannot be used; `kind` is one of the reasons above."""

    def __init__(self, kind: str, detail: str = ""):
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind
        self.detail = detail


def _content(value, where: str) -> str:
    """A string, or OpenAI's list of {"type": "text", "text": ...} parts joined."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                       and isinstance(p.get("text"), str) for p in value):
        return "".join(p["text"] for p in value)
    raise SampleError(UNKNOWN_FORMAT, f"{where}: content is not text")


def normalize(record) -> list[dict]:
    """One JSON record -> [{role, content}] from its first non-assistant turn to its last
    assistant turn.

    Leading assistant turns answer nothing, and chat templates render the empty history before
    them differently (e.g. without the default system prompt), so they are dropped, as SpecForge
    does. Turns after the last assistant turn carry no loss and, DFlash being causal, cannot
    influence any supervised position, so they are dropped too.
    """
    if not isinstance(record, dict):
        raise SampleError(UNKNOWN_FORMAT, f"expected a JSON object, got {type(record).__name__}")
    key = "messages" if "messages" in record else "conversations" if "conversations" in record else None
    if key is None:
        raise SampleError(UNKNOWN_FORMAT, "no 'messages' or 'conversations' field")
    turns = record[key]
    if not isinstance(turns, list) or not turns:
        raise SampleError(UNKNOWN_FORMAT, f"'{key}' is not a non-empty list")
    messages = []
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise SampleError(UNKNOWN_FORMAT, f"{where} is not an object")
        role_key, content_key = ("role", "content") if "role" in turn else ("from", "value")
        if role_key not in turn or content_key not in turn:
            raise SampleError(UNKNOWN_FORMAT, f"{where} needs role/content or from/value")
        role = ROLES.get(str(turn[role_key]).lower())
        if role is None:
            raise SampleError(UNKNOWN_FORMAT, f"{where}: unknown role {turn[role_key]!r}")
        messages.append({"role": role, "content": _content(turn[content_key], where)})
    first = next((i for i, m in enumerate(messages) if m["role"] != "assistant"), len(messages))
    messages = messages[first:]
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise SampleError(NO_ASSISTANT)
    return messages[:last + 1]


def parse_line(raw: bytes | str) -> list[dict]:
    """One JSONL line -> normalised messages; raises SampleError."""
    try:
        record = json.loads(raw)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise SampleError(MALFORMED, str(e)) from None
    return normalize(record)


def iter_lines(paths: Iterable[str]) -> Iterator[tuple[str, int, bytes]]:
    """(path, 1-based line number, raw line) of every non-blank line.

    Lines stay bytes so that one undecodable line is reported, not fatal to the whole file.
    """
    for path in paths:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if raw.strip():
                    yield path, lineno, raw


@dataclass
class Problem:
    file: str
    line: int
    kind: str
    detail: str

    def __str__(self):
        return f"{self.file}:{self.line}: {self.kind}" + (f" ({self.detail})" if self.detail else "")


class DataReport:
    """Counts of conversations read and kept, and every problem with its file:line."""

    def __init__(self):
        self.read = 0
        self.kept = 0
        self.files: list[str] = []
        self.problems: list[Problem] = []

    def add(self, file: str, line: int, kind: str, detail: str = ""):
        self.problems.append(Problem(file, line, kind, detail))

    def counts(self) -> Counter:
        return Counter(p.kind for p in self.problems)

    @property
    def skipped(self) -> int:
        return self.read - self.kept

    def summary(self, examples: int = 3) -> str:
        """A few lines: totals, then each problem kind with its count and first locations."""
        counts = self.counts()
        lines = [f"data: {self.read} conversations in {len(self.files)} file(s): {self.kept} kept "
                 f"({counts[TRUNCATED]} truncated), {self.skipped} skipped"]
        for kind, n in counts.most_common():
            shown = [p for p in self.problems if p.kind == kind][:examples]
            lines.append(f"  {kind}: {n}")
            lines += [f"    {p}" for p in shown]
            if n > len(shown):
                lines.append(f"    ... and {n - len(shown)} more")
        return "\n".join(lines)
