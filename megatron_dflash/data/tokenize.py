"""Chat tokenizer front-ends: messages -> (tokens, loss_mask) with the loss on assistant tokens.

Loss-mask convention (both front-ends): 1 on the tokens of every assistant message's content
and on the end-of-turn token that closes it (the drafter must learn to stop), 0 on system and
user turns, role headers, the generation prompt and the whitespace after an end-of-turn token.
DFlash labels are same-position (spec §6.4: block slot k predicts token a+k), so unlike
SpecForge's next-token pipeline the last position is NOT forced to 0: its label is itself.
"""
from __future__ import annotations

import bisect
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass

from jinja2 import TemplateError

from megatron_dflash.data.conversations import TEMPLATE, SampleError

CHATML_START, CHATML_END = "<|im_start|>", "<|im_end|>"


@dataclass
class Tokenized:
    tokens: list[int]
    loss_mask: list[int]
    full_length: int  # before truncation to seq_length

    @property
    def truncated(self) -> bool:
        return self.full_length > len(self.tokens)


class ChatTemplateError(ValueError):
    """The tokenizer's chat template cannot yield assistant spans: a setup error, not bad data."""


class ChatTokenizer(ABC):
    """One interface for both front-ends; `vocab_size` sizes the on-disk dtype."""

    vocab_size: int
    pad_id: int

    @abstractmethod
    def encode_messages(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """(tokens, loss_mask) of the whole conversation."""

    def encode(self, messages: list[dict], seq_length: int | None = None) -> Tokenized:
        """Tokenise and keep the first `seq_length` tokens (the caller reports truncation)."""
        tokens, mask = self.encode_messages(messages)
        return Tokenized(tokens[:seq_length], mask[:seq_length], len(tokens))


class HFChatTokenizer(ChatTokenizer):
    """An HF fast tokenizer and its chat template; assistant spans come from rendering prefixes.

    Few templates carry `{% generation %}` tags (SmolLM2's does not), so the span of assistant
    turn i is [len(render(msgs[:i], add_generation_prompt)), len(render(msgs[:i+1]).rstrip())) in
    the rendered text, valid only if each shorter rendering is a prefix of the longer ones.
    Tokens are assigned to spans through the fast tokenizer's character offsets.
    """

    def __init__(self, tokenizer):
        if not tokenizer.chat_template:
            raise ChatTemplateError(f"{tokenizer.name_or_path}: tokenizer has no chat template")
        if not tokenizer.is_fast:
            raise ChatTemplateError(f"{tokenizer.name_or_path}: needs a fast tokenizer "
                                    "(character offsets locate the assistant tokens)")
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        self.pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0)
                           if i is not None)

    def _render(self, messages, generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=generation_prompt)
        except TemplateError as e:  # e.g. raise_exception("roles must alternate")
            raise SampleError(TEMPLATE, str(e)) from None

    def encode_messages(self, messages):
        text = self._render(messages, False)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            head = self._render(messages[:i], True)
            turn = self._render(messages[:i + 1], False)
            if not (turn.startswith(head) and text.startswith(turn)):
                raise ChatTemplateError(
                    f"{self.tokenizer.name_or_path}: chat template is not prefix-stable (rendering "
                    f"the first {i} messages with add_generation_prompt=True, then {i + 1}, then all "
                    f"{len(messages)}, does not give growing prefixes of one text), so assistant "
                    "tokens cannot be located; use a template that renders earlier turns the same "
                    "whatever follows them (no history rewriting)")
            spans += [len(head), len(turn.rstrip())]
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        # A token is supervised when its last character lies in a span (odd bisect position).
        mask = [bisect.bisect_left(spans, end) % 2 for _, end in enc["offset_mapping"]]
        return list(enc["input_ids"]), mask


class SentencePieceChatTokenizer(ChatTokenizer):
    """A SentencePiece model with a ChatML rendering `<|im_start|>role\\ncontent<|im_end|>\\n`.

    ChatML markers are single ids when the model has them as pieces (user-defined symbols),
    otherwise they are encoded as text. Each segment is encoded separately, so the mask
    boundaries are exact (SentencePiece adds its dummy-prefix piece to each segment).
    """

    def __init__(self, processor):
        self.sp = processor
        self.vocab_size = processor.get_piece_size()
        self.pad_id = next(i for i in (processor.pad_id(), processor.eos_id(), 0) if i >= 0)
        self._start, self._end = self._marker(CHATML_START), self._marker(CHATML_END)

    def _marker(self, piece: str) -> list[int]:
        i = self.sp.piece_to_id(piece)
        return self.sp.encode(piece) if self.sp.is_unknown(i) else [i]

    def encode_messages(self, messages):
        tokens, mask = [], []
        for m in messages:
            head = self._start + self.sp.encode(m["role"] + "\n")
            body = self.sp.encode(m["content"]) + self._end
            tail = self.sp.encode("\n")
            supervised = int(m["role"] == "assistant")
            tokens += head + body + tail
            mask += [0] * len(head) + [supervised] * len(body) + [0] * len(tail)
        return tokens, mask


def load_chat_tokenizer(spec: str, gguf_file: str | None = None) -> ChatTokenizer:
    """`hf:PATH` (HF tokenizer dir, or GGUF dir with `gguf_file`) or `sp:MODEL` (SentencePiece).

    Load failures become one ValueError naming the spec; nothing is fetched from the network.
    """
    kind, _, path = spec.partition(":")
    if kind not in ("hf", "sp") or not path:
        raise ValueError(f"tokenizer {spec!r}: expected hf:PATH or sp:MODEL")
    if not os.path.exists(path):
        raise ValueError(f"tokenizer {spec!r}: {path} does not exist")
    if gguf_file is not None and not os.path.isfile(os.path.join(path, gguf_file)):
        raise ValueError(f"tokenizer {spec!r}: no GGUF file {gguf_file} in {path}")
    if kind == "hf" and gguf_file is None and os.path.isdir(path) \
            and any(f.endswith(".gguf") for f in os.listdir(path)):
        raise ValueError(f"tokenizer {spec!r}: {path} holds GGUF files; name one with --gguf-file")
    try:
        if kind == "sp":
            import sentencepiece
            return SentencePieceChatTokenizer(sentencepiece.SentencePieceProcessor(model_file=path))
        from transformers import AutoTokenizer
        return HFChatTokenizer(AutoTokenizer.from_pretrained(path, gguf_file=gguf_file,
                                                             local_files_only=True))
    except ChatTemplateError:
        raise
    except Exception as e:  # noqa: BLE001 - any loader failure is a bad --tokenizer
        raise ValueError(f"tokenizer {spec!r}: cannot load: {' '.join(str(e).split())}") from e


def tokenizer_spec(tokenizer: str | None, target: str) -> str:
    """`--tokenizer` as given (hf:PATH / sp:MODEL, or a bare HF dir), else the target's own."""
    spec = tokenizer or target
    return spec if spec.startswith(("hf:", "sp:")) else f"hf:{spec}"
