"""Chat tokenizer front-ends: messages -> (tokens, loss_mask) with the loss on assistant tokens.

Loss-mask convention (both front-ends): 1 on the tokens of every assistant message's content
and on the end-of-turn token that closes it (the drafter must learn to stop), 0 on system and
user turns, role headers, the generation prompt and the whitespace after an end-of-turn token.
What a template writes inside an assistant turn besides the message (Qwen3's think block on the
last turn) counts as content: the target produces it, so the drafter must too.
DFlash labels are same-position (spec §6.4: block slot k predicts token a+k), so unlike
SpecForge's next-token pipeline the last position is NOT forced to 0: its label is itself.
"""
from __future__ import annotations

import bisect
import os
import re
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


# Probe conversation rendered once per template to learn how it frames assistant turns.
_PROBE = [{"role": "user", "content": "Probe question one?"},
          {"role": "assistant", "content": "Probe answer one."},
          {"role": "user", "content": "Probe question two?"},
          {"role": "assistant", "content": "Probe answer two."}]
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")  # transformers' own test
REASONING_END = "</think>"


@dataclass(frozen=True)
class TurnLayout:
    """How a chat template frames an assistant turn, learnt from rendering `_PROBE`.

    `header` opens every assistant turn: the generation prompt, or the longest start of it that
    every turn renders (Qwen3's generation prompt under enable_thinking=False ends with an empty
    think block that only the last turn renders); `prompt_rest` is the remainder, not supervised
    where a turn renders it (inference puts it in the prompt). `ends` close a turn: whitespace
    the template puts after the content, then a special token (`<|im_end|>`, `<|eot_id|>`, ...;
    gpt-oss's harmony closes the last turn with `<|return|>`, earlier ones with `<|end|>`).
    """
    header: str
    prompt_rest: str
    ends: tuple[str, ...]

    @classmethod
    def probe(cls, render, special_tokens: list[str], name: str) -> "TurnLayout":
        try:
            one, prompted, full = (render(_PROBE[:1], False), render(_PROBE[:1], True),
                                   render(_PROBE, False))
        except SampleError as e:
            raise ChatTemplateError(f"{name}: chat template cannot render a plain user/assistant "
                                    f"exchange: {e.detail}") from None
        prompt = prompted[len(one):] if prompted.startswith(one) else ""
        header, ends, cursor = len(prompt), set(), 0
        for message in _PROBE:
            at = full.find(message["content"], cursor)
            if at < 0:
                raise ChatTemplateError(f"{name}: chat template does not render message content "
                                        f"verbatim ({message['content']!r} is missing from "
                                        f"{full!r}), so assistant tokens cannot be located")
            if message["role"] == "assistant":
                window = full[cursor:at]
                header = max((k for k in range(header + 1) if prompt[:k] in window), default=0)
                tail = full[at + len(message["content"]):]
                gap = tail[:len(tail) - len(tail.lstrip())]
                token = max((t for t in special_tokens if tail.startswith(t, len(gap))),
                            key=len, default=None)
                if token is None:
                    raise ChatTemplateError(
                        f"{name}: chat template closes an assistant turn with no special token "
                        f"(the content is followed by {tail[:24]!r}), so the end of an assistant "
                        "turn, which the loss supervises, cannot be found")
                ends.add(gap + token)
            cursor = at + len(message["content"])
        return cls(prompt[:header], prompt[header:], tuple(sorted(ends)))

    def span(self, text: str, content: str, cursor: int) -> tuple[int, int] | None:
        """[start, end) in `text` of the assistant turn of `content`, the first at or after
        `cursor`: what the turn renders after its header, through its end token (a Qwen3 think
        block the template adds or keeps included); None when the rendering holds no such turn.

        The content is searched as given, stripped, and as the answer after its reasoning
        block (templates drop the reasoning of earlier turns).
        """
        answer = content.rpartition(REASONING_END)[2]
        candidates = dict.fromkeys((content, content.strip(), answer, answer.strip()))
        markers = [end.strip() for end in self.ends]
        opening = text.find(self.header, cursor) if self.header else cursor
        while opening >= 0:
            body = opening + len(self.header)
            if self.prompt_rest and text.startswith(self.prompt_rest, body):
                body += len(self.prompt_rest)
            for c, end in ((c, end) for c in candidates for end in self.ends):
                at = text.find(c + end, body)
                if at < 0:
                    continue
                if not self.header:  # nothing marks the turn's start: supervise the content
                    return at, at + len(c + end)
                gap = text[body:at]
                if not any(m in gap for m in markers) and self.header not in gap:
                    return body, at + len(c + end)
            opening = text.find(self.header, opening + 1) if self.header else -1
        return None


class HFChatTokenizer(ChatTokenizer):
    """An HF fast tokenizer and its chat template; assistant spans are found in the rendering
    of the whole conversation, as the target sees it.

    A template with `{% generation %}` tags marks them itself (transformers' assistant mask).
    Otherwise each assistant message is located in order in the rendered text between the
    template's assistant header and end-of-turn token (`TurnLayout`), so templates that render
    a turn differently depending on what follows it (Qwen3's think blocks) are handled; tokens
    are assigned to spans through the fast tokenizer's character offsets. A conversation whose
    turns cannot be located is a SampleError (skipped and reported), never mis-masked.
    `template_kwargs` go to the template (e.g. enable_thinking=False).
    """

    def __init__(self, tokenizer, template_kwargs: dict | None = None):
        if not tokenizer.chat_template:
            raise ChatTemplateError(f"{tokenizer.name_or_path}: tokenizer has no chat template")
        if not tokenizer.is_fast:
            raise ChatTemplateError(f"{tokenizer.name_or_path}: needs a fast tokenizer "
                                    "(character offsets locate the assistant tokens)")
        self.tokenizer = tokenizer
        self.template_kwargs = dict(template_kwargs or {})
        self.vocab_size = len(tokenizer)
        self.pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0)
                           if i is not None)
        self._layouts: dict[str, TurnLayout] = {}  # per template text, probed on first use

    def _render(self, messages, generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation_prompt,
                **self.template_kwargs)
        except TemplateError as e:  # e.g. raise_exception("roles must alternate")
            raise SampleError(TEMPLATE, str(e)) from None

    def _layout(self) -> TurnLayout:
        template = self.tokenizer.get_chat_template()
        if template not in self._layouts:
            special = {t.content for t in self.tokenizer.added_tokens_decoder.values() if t.special}
            self._layouts[template] = TurnLayout.probe(
                self._render, sorted(special | set(self.tokenizer.all_special_tokens)),
                self.tokenizer.name_or_path)
        return self._layouts[template]

    def encode_messages(self, messages):
        if _GENERATION_TAG.search(self.tokenizer.get_chat_template()):
            try:
                enc = self.tokenizer.apply_chat_template(
                    messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                    **self.template_kwargs)
            except TemplateError as e:
                raise SampleError(TEMPLATE, str(e)) from None
            if any(enc["assistant_masks"]):  # tags that wrap nothing: locate the turns instead
                return list(enc["input_ids"]), list(enc["assistant_masks"])
        text = self._render(messages, False)
        layout, spans, cursor = self._layout(), [], 0
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            span = layout.span(text, message["content"], cursor)
            if span is None:
                raise SampleError(TEMPLATE, f"assistant message {i} (of {len(messages)}) is not "
                                            "in the rendered conversation between the template's "
                                            "assistant header and "
                                            f"{' or '.join(e.strip() for e in layout.ends)}")
            spans += span
            cursor = span[1]
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
