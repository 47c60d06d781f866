"""Chat templates of the target families (gpt-oss's harmony, Kimi-K2's) and what the loss-mask
tests build on them: a byte-level BPE tokenizer trained on the test conversations, and the text a
tokenized conversation supervises."""
from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from megatron_dflash.data import HFChatTokenizer

# The message rendering of openai/gpt-oss's chat template (harmony; its tool definitions left out):
# a system message, the first system/developer message as developer instructions, earlier
# assistant turns' final channel closed by <|end|>, the last turn's analysis channel (`thinking`)
# and final channel closed by <|return|>, and the generation prompt `<|start|>assistant`.
HARMONY = r"""
{{- "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n" }}
{{- "Knowledge cutoff: 2024-06\nCurrent date: " + strftime_now("%Y-%m-%d") + "\n\n" }}
{{- "Reasoning: " + (reasoning_effort or "medium") + "\n\n" }}
{{- "# Valid channels: analysis, commentary, final. Channel must be included for every message." }}
{{- "<|end|>" }}
{%- if messages[0].role == "developer" or messages[0].role == "system" %}
    {%- set developer_message = messages[0].content %}{%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set developer_message = "" %}{%- set loop_messages = messages %}
{%- endif %}
{%- if developer_message %}
    {{- "<|start|>developer<|message|># Instructions\n\n" + developer_message + "\n\n<|end|>" }}
{%- endif %}
{%- for message in loop_messages -%}
    {%- if message.role == 'assistant' -%}
        {%- if "<|channel|>" in message.content %}
            {{- raise_exception("You have passed a message containing <|channel|> tags") }}
        {%- endif %}
        {%- if loop.last and not add_generation_prompt %}
            {%- if "thinking" in message %}
                {{- "<|start|>assistant<|channel|>analysis<|message|>" + message.thinking }}
                {{- "<|end|>" }}
            {%- endif %}
            {{- "<|start|>assistant<|channel|>final<|message|>" + message.content + "<|return|>" }}
        {%- else %}
            {{- "<|start|>assistant<|channel|>final<|message|>" + message.content + "<|end|>" }}
        {%- endif %}
    {%- elif message.role == 'user' -%}
        {{- "<|start|>user<|message|>" + message.content + "<|end|>" }}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
<|start|>assistant
{%- endif -%}"""
HARMONY_TOKENS = ["<|start|>", "<|message|>", "<|channel|>", "<|end|>", "<|return|>",
                  "<|endoftext|>"]

# Kimi-K2's chat template shape: role markers, <|im_middle|>, turns closed by <|im_end|>.
KIMI = (r"{%- for m in messages -%}"
        r"{%- if m.role == 'system' -%}{{ '<|im_system|>system<|im_middle|>' }}"
        r"{%- elif m.role == 'user' -%}{{ '<|im_user|>user<|im_middle|>' }}"
        r"{%- else -%}{{ '<|im_assistant|>assistant<|im_middle|>' }}{%- endif -%}"
        r"{{ m.content }}{{ '<|im_end|>' }}{%- endfor -%}"
        r"{%- if add_generation_prompt -%}{{ '<|im_assistant|>assistant<|im_middle|>' }}"
        r"{%- endif -%}")
KIMI_TOKENS = ["<|im_system|>", "<|im_user|>", "<|im_assistant|>", "<|im_middle|>",
               "<|im_end|>", "[EOS]", "<|reserved_token_0|>"]


def chat_tokenizer(template: str, specials: list[str], corpus: list[str], vocab_size: int = 300,
                   **kw) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on `corpus` (exact decode, multi-character tokens) with the
    family's markers `specials` as special tokens and `template`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus * 4, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=template,
                                   clean_up_tokenization_spaces=False, **kw)


def supervised_text(chat: HFChatTokenizer, messages, **template_kwargs) -> list[str]:
    """The decoded runs of loss-mask-1 tokens; the tokens must be the template's own."""
    tokens, mask = chat.encode_messages(messages)
    hf = chat.tokenizer
    assert tokens == list(hf.apply_chat_template(messages, **template_kwargs)["input_ids"])
    assert len(mask) == len(tokens) and set(mask) <= {0, 1}
    runs, run = [], []
    for t, m in zip(tokens + [None], mask + [0]):
        if m:
            run.append(t)
        elif run:
            runs, run = runs + [hf.decode(run)], []
    return runs
