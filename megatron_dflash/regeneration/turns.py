"""The turn state machine: which assistant turns of a conversation are regenerated, the prompt of
each, and what an answer adds.

User/system turns are kept; each assistant turn is regenerated in order with the conversation so
far as the prompt (or only the last with `last_turn_only`); a conversation that ends with a user
turn gets one new assistant turn. The prompt of a later turn is the earlier prompt's token ids +
the generated ids + the tokens of what the chat template renders between them (checked
prefix-stable, else the conversation is reported and skipped), so the ids are exactly those
generated, never re-tokenised: the feature cache stores them with a loss mask of 1 on every
regenerated turn's tokens (its stop token included) and 0 elsewhere, and the features of the last
turn's generation (prefill + every decode step + one step that feeds the last token) cover the
whole conversation.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from megatron_dflash.data.conversations import TEMPLATE, SampleError
from megatron_dflash.generation.batch import BatchGenerator, Generated, Sampling
from megatron_dflash.regeneration.conversations import Conversation


HARMONY_ANALYSIS = "<|channel|>analysis<|message|>"
HARMONY_FINAL = "<|channel|>final<|message|>"
HARMONY_END = "<|end|>"


class ChatPrompts:
    """Token ids of each turn's prompt, built from a HF tokenizer's chat template."""

    def __init__(self, tokenizer, thinking: bool | None = None):
        self.tokenizer = tokenizer
        self.thinking = thinking
        self.template_kwargs = {} if thinking is None else {"enable_thinking": thinking}

    @property
    def template_sha256(self) -> str:
        """A fingerprint of the chat template (a resume must render prompts the same way)."""
        text = json.dumps(self.tokenizer.chat_template, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def render(self, messages: list[dict]) -> str:
        from jinja2 import TemplateError

        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=True,
                                                      **self.template_kwargs)
        except TemplateError as e:
            raise SampleError(TEMPLATE, str(e)) from None

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=False)

    @staticmethod
    def message(text: str) -> dict:
        """The assistant message of a generated answer: the text, or — in gpt-oss's harmony
        format, whose template takes the analysis channel as `thinking` and the final channel as
        `content` and refuses channel markers in either — its channels."""
        if HARMONY_FINAL not in text:
            return {"role": "assistant", "content": text}
        analysis, _, final = text.rpartition(HARMONY_FINAL)
        thinking = analysis.partition(HARMONY_ANALYSIS)[2].partition(HARMONY_END)[0]
        return {"role": "assistant", "content": final,
                **({"thinking": thinking} if thinking else {})}


@dataclass
class _State:
    """One conversation being regenerated."""

    conversation: Conversation
    messages: list[dict]
    turns: list[int]
    """Indices (in `messages`) of the assistant turns still to generate."""
    tokens: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    head: str = ""
    """The rendered text that `tokens` stand for (prompt, generation prompt, answers)."""
    stop_text: str = ""
    """The text of the stop token that ended the last answer ("" at the length limit)."""
    turn: int = 0
    features: torch.Tensor | None = None
    generated: int = 0


def _plan(conversation: Conversation, last_turn_only: bool) -> _State:
    messages = [dict(m) for m in conversation.messages]
    if messages[-1]["role"] != "assistant":
        messages.append({"role": "assistant", "content": ""})
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    turns = turns[-1:] if last_turn_only else turns
    return _State(conversation, messages[:turns[-1] + 1], turns)


def _prompt(state: _State, prompts: ChatPrompts) -> list[int]:
    """The next turn's prompt: the first rendered and tokenised, later ones extended by the
    tokens of what the template puts after the tokens already there."""
    index = state.turns[0]
    text = prompts.render(state.messages[:index])
    if not state.tokens:
        state.tokens = prompts.encode(text)
        state.loss_mask = [0] * len(state.tokens)
    else:
        if not text.startswith(state.head):
            raise SampleError(TEMPLATE, "the chat template renders earlier turns differently once "
                                        "later ones follow, so the generated ids cannot be kept; "
                                        "use --last-turn-only")
        rest = text[len(state.head):]
        if state.stop_text and rest.startswith(state.stop_text):  # the template's end of turn
            rest = rest[len(state.stop_text):]
        rest = prompts.encode(rest)
        state.tokens += rest
        state.loss_mask += [0] * len(rest)
    state.head = text
    return state.tokens


def _accept(state: _State, generated: Generated, prompts: ChatPrompts, stops) -> None:
    index = state.turns.pop(0)
    stopped = bool(generated.tokens) and generated.tokens[-1] in stops
    body = generated.tokens[:-1] if stopped else generated.tokens
    content = prompts.decode(body)
    state.messages[index] = prompts.message(content)
    state.tokens += generated.tokens
    state.loss_mask += [1] * len(generated.tokens)
    state.head += content
    state.stop_text = prompts.decode(generated.tokens[-1:]) if stopped else ""
    state.features = generated.features
    state.generated += len(generated.tokens)
    state.turn += 1


@dataclass
class Finished:
    conversation: Conversation
    messages: list[dict] | None
    """None when skipped (`problem` says why)."""
    tokens: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    features: torch.Tensor | None = None
    generated_tokens: int = 0
    problem: SampleError | None = None
    ends_batch: bool = False
    """The last conversation a batch finishes: progress is reported there, with the whole batch
    counted (its conversations all finish in the same generate call)."""


def regenerate(generator: BatchGenerator, prompts: ChatPrompts,
               conversations: Sequence[Conversation], *, batch_size: int, max_new_tokens: int,
               sampling: Sampling = Sampling(), last_turn_only: bool = False
               ) -> Iterator[Finished]:
    """Regenerate `conversations` `batch_size` at a time, turn by turn within a batch; yields
    each conversation when its last turn is done (features attached when capturing)."""
    stops = set(generator.stops.tolist())
    for start in range(0, len(conversations), batch_size):
        states = [_plan(c, last_turn_only) for c in conversations[start:start + batch_size]]
        while states:
            ready, batch = [], []
            for state in states:
                try:
                    batch.append(list(_prompt(state, prompts)))
                    ready.append(state)
                except SampleError as e:
                    yield Finished(state.conversation, None, problem=e)
            generators = [sampling.generator(s.conversation.id, s.turn, generator.device)
                          for s in ready]
            outputs = (generator.generate(batch, max_new_tokens, sampling, generators)
                       if ready else [])
            states, finished = [], []
            for state, out in zip(ready, outputs):
                _accept(state, out, prompts, stops)
                if state.turns:
                    states.append(state)
                    continue
                finished.append(Finished(state.conversation, state.messages, state.tokens,
                                         state.loss_mask, state.features, state.generated))
            for i, done in enumerate(finished):
                done.ends_batch = not states and i == len(finished) - 1
                yield done
