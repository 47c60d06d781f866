"""Assistant loss masks located in the rendering of the whole conversation, per template family:
ChatML, Llama-3, Qwen3 (think block on the last turn only; enable_thinking), SmolLM2's real
tokenizer, a `{% generation %}` template, and a conversation that cannot be aligned."""
import json

import pytest
from transformers import PreTrainedTokenizerFast

from megatron_dflash.data import ConversationDataset, HFChatTokenizer
from megatron_dflash.data.conversations import TEMPLATE
from tests.chat_testing import chat_tokenizer, supervised_text

CHATML = (r"{% for m in messages %}"
          r"{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{% endfor %}"
          r"{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = (r"{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m.role + "
          r"'<|end_header_id|>\n\n' + m.content | trim + '<|eot_id|>' }}{% endfor %}"
          r"{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
          r"{% endif %}")
# Qwen3's behaviour: reasoning is dropped from assistant turns before the last user turn, and the
# turns after it open with a think block (an empty one when the message has no reasoning).
QWEN3 = r"""
{%- set ns = namespace(last_query=-1) -%}
{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last_query = loop.index0 -%}{%- endif -%}{%- endfor -%}
{%- for m in messages -%}
  {%- if m.role == 'assistant' -%}
    {%- set answer = m.content -%}{%- set reasoning = '' -%}
    {%- if '</think>' in m.content -%}
      {%- set answer = m.content.split('</think>')[-1].lstrip('\n') -%}
      {%- set reasoning = m.content.split('</think>')[0].split('<think>')[-1].strip('\n') -%}
    {%- endif -%}
    {%- if loop.index0 > ns.last_query and (loop.last or reasoning) -%}
      {{- '<|im_start|>assistant\n<think>\n' + reasoning + '\n</think>\n\n' + answer -}}
    {%- else -%}
      {{- '<|im_start|>assistant\n' + answer -}}
    {%- endif -%}
  {%- else -%}
    {{- '<|im_start|>' + m.role + '\n' + m.content -}}
  {%- endif -%}
  {{- '<|im_end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '<|im_start|>assistant\n' -}}
  {%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\n\n</think>\n\n' -}}{%- endif -%}
{%- endif -%}"""
GENERATION = (r"{% for m in messages %}{{ '<|im_start|>' + m.role + '\n' }}"
              r"{% if m.role == 'assistant' %}{% generation %}{{ m.content + '<|im_end|>' }}"
              r"{% endgeneration %}{% else %}{{ m.content + '<|im_end|>' }}{% endif %}{{ '\n' }}"
              r"{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# A template that rewrites assistant content: turns containing the word cannot be found.
REDACTING = CHATML.replace("m.content +", "(m.content | replace('secret', '[redacted]')) +")

CHATML_TOKENS = ["<|im_start|>", "<|im_end|>"]
LLAMA3_TOKENS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
QWEN3_TOKENS = CHATML_TOKENS + ["<think>", "</think>"]

SINGLE = [{"role": "user", "content": "What is the capital of France?"},
          {"role": "assistant", "content": "Paris."}]
MULTI = [{"role": "system", "content": "You are terse."},
         {"role": "user", "content": "Hello, how are you today?"},
         {"role": "assistant", "content": "I am fine, thank you!"},
         {"role": "user", "content": "What is the weather like?"},
         {"role": "assistant", "content": "Sunny and warm, with a light breeze."}]
REASONED = [{"role": "user", "content": "What is two plus two?"},
            {"role": "assistant", "content": "<think>\nTwo and two make four.\n</think>\n\nFour."},
            {"role": "user", "content": "And three plus three?"},
            {"role": "assistant", "content": "<think>\nThree and three make six.\n</think>\n\nSix."}]
CORPUS = [m["content"] for chat in (SINGLE, MULTI, REASONED) for m in chat]


def _hf_tokenizer(template: str, specials: list[str], **kw) -> PreTrainedTokenizerFast:
    """A chat tokenizer trained here on the test conversations."""
    return chat_tokenizer(template, specials, CORPUS, vocab_size=400, **kw)


@pytest.fixture(scope="module")
def families():
    return {
        "chatml": HFChatTokenizer(_hf_tokenizer(CHATML, CHATML_TOKENS, eos_token="<|im_end|>")),
        "llama3": HFChatTokenizer(_hf_tokenizer(LLAMA3, LLAMA3_TOKENS, eos_token="<|eot_id|>",
                                                bos_token="<|begin_of_text|>")),
        "qwen3": HFChatTokenizer(_hf_tokenizer(QWEN3, QWEN3_TOKENS, eos_token="<|im_end|>")),
        "generation": HFChatTokenizer(_hf_tokenizer(GENERATION, CHATML_TOKENS,
                                                    eos_token="<|im_end|>")),
    }


def _answers(messages, end):
    return [m["content"] + end for m in messages if m["role"] == "assistant"]


@pytest.mark.parametrize("family,end", [("chatml", "<|im_end|>"), ("llama3", "<|eot_id|>"),
                                        ("generation", "<|im_end|>")])
@pytest.mark.parametrize("messages", [SINGLE, MULTI], ids=["single", "multi"])
def test_mask_is_each_assistant_turn_and_its_end_token(families, family, end, messages):
    assert supervised_text(families[family], messages) == _answers(messages, end)


def test_generation_tags_give_the_mask(families, monkeypatch):
    chat = families["generation"]
    # the template's own assistant mask is used: tags around the content alone leave out the end
    monkeypatch.setattr(chat.tokenizer, "chat_template",
                        GENERATION.replace("m.content + '<|im_end|>' }}{% endgeneration %}",
                                           "m.content }}{% endgeneration %}{{ '<|im_end|>' }}"))
    assert supervised_text(chat, MULTI) == _answers(MULTI, "")
    # tags that wrap nothing: the turns are located in the rendering instead
    monkeypatch.setattr(chat.tokenizer, "chat_template",
                        GENERATION.replace("m.role == 'assistant'", "m.role == 'nobody'"))
    assert supervised_text(chat, MULTI) == _answers(MULTI, "<|im_end|>")


def test_llama3_trims_content(families):
    padded = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  Paris.\n"}]
    assert supervised_text(families["llama3"], padded) == ["Paris.<|eot_id|>"]


@pytest.mark.parametrize("messages", [SINGLE, MULTI], ids=["single", "multi"])
def test_smollm2_real_tokenizer(smol, messages):
    assert supervised_text(smol, messages) == _answers(messages, "<|im_end|>")


THINK = "<think>\n\n</think>\n\n"


@pytest.mark.parametrize("messages,expected", [
    (SINGLE, [THINK + "Paris.<|im_end|>"]),
    # earlier turns render without a think block, the last with an empty one: the rendering of
    # the 3-message prefix is not a prefix of the whole (the old prefix scheme raised here)
    (MULTI, ["I am fine, thank you!<|im_end|>",
             THINK + "Sunny and warm, with a light breeze.<|im_end|>"]),
    # reasoning dropped from the earlier turn, kept in the last
    (REASONED, ["Four.<|im_end|>",
                "<think>\nThree and three make six.\n</think>\n\nSix.<|im_end|>"]),
], ids=["single", "multi", "reasoning"])
def test_qwen3_supervises_what_each_turn_renders(families, messages, expected):
    assert supervised_text(families["qwen3"], messages) == expected


def test_qwen3_without_thinking_leaves_the_prompted_think_block_out(families):
    """enable_thinking=False puts the empty think block in the generation prompt: inference
    feeds it, so the last turn supervises only its answer."""
    chat = HFChatTokenizer(families["qwen3"].tokenizer, template_kwargs={"enable_thinking": False})
    kw = {"enable_thinking": False}
    assert supervised_text(chat, SINGLE, **kw) == ["Paris.<|im_end|>"]
    assert supervised_text(chat, MULTI, **kw) == _answers(MULTI, "<|im_end|>")
    assert supervised_text(chat, REASONED, **kw) == [
        "Four.<|im_end|>", "<think>\nThree and three make six.\n</think>\n\nSix.<|im_end|>"]


def test_unalignable_conversation_is_reported_and_skipped(families, tmp_path):
    chat = HFChatTokenizer(_hf_tokenizer(REDACTING, CHATML_TOKENS, eos_token="<|im_end|>"))
    secret = [{"role": "user", "content": "Tell me."},
              {"role": "assistant", "content": "The secret is out."}]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps({"messages": m}) for m in (MULTI, secret, SINGLE)) + "\n")
    ds = ConversationDataset(str(path), chat, seq_length=512)
    assert len(ds) == 2 and ds.report.skipped == 1
    [problem] = ds.report.problems
    assert (problem.file, problem.line, problem.kind) == (str(path), 2, TEMPLATE)
    assert "assistant message 1" in problem.detail and "<|im_end|>" in problem.detail
    assert f"chat.jsonl:2: {TEMPLATE}" in ds.report.summary()
    kept = [chat.tokenizer.decode([t for t, m in zip(s["tokens"].tolist(), s["loss_mask"]) if m])
            for s in ds]
    assert kept == ["".join(_answers(MULTI, "<|im_end|>")), "".join(_answers(SINGLE, "<|im_end|>"))]
