"""Helpers for the regeneration tests (single process and distributed): a word-level ChatML
tokenizer, a tiny random Llama target beside it, and random conversations."""
from __future__ import annotations

import json

import torch

from tests.dflash_testing import tiny_target_dir

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
