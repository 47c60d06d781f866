"""The loss masks of the new families' chat templates: gpt-oss's harmony format (each assistant
turn's final channel and its end token — <|end|> for earlier turns, <|return|> for the last —
never the system header or the last turn's analysis channel), a regenerated harmony answer split
back into its channels, and Kimi-K2's role markers; the mask token of a Kimi-like vocabulary is its
first reserved special token."""
from megatron_dflash.data import HFChatTokenizer
from megatron_dflash.data.mask_token import resolve_mask_token_id
from megatron_dflash.regeneration.turns import ChatPrompts
from tests.chat_testing import (HARMONY, HARMONY_TOKENS, KIMI, KIMI_TOKENS, chat_tokenizer,
                                supervised_text)

CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "Four."},
        {"role": "user", "content": "And three plus three?"},
        {"role": "assistant", "content": "Six, of course.", "thinking": "Three and three."}]
CORPUS = [m["content"] for m in CHAT] + ["Three and three.", "assistant final analysis"]


def test_harmony_supervises_each_final_channel():
    chat = HFChatTokenizer(chat_tokenizer(HARMONY, HARMONY_TOKENS, CORPUS,
                                          eos_token="<|return|>", pad_token="<|endoftext|>"))
    text = chat.tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert "<|channel|>analysis<|message|>Three and three.<|end|>" in text
    assert supervised_text(chat, CHAT) == ["<|channel|>final<|message|>Four.<|end|>",
                                      "<|channel|>final<|message|>Six, of course.<|return|>"]


def test_a_regenerated_harmony_answer_is_split_into_its_channels():
    """What gpt-oss generates after `<|start|>assistant` (up to its <|return|> stop token)
    becomes the message the harmony template takes back: analysis as `thinking`, final as
    `content` (channel markers in either are refused by the template)."""
    generated = ("<|channel|>analysis<|message|>Three and three.<|end|><|start|>assistant"
                 "<|channel|>final<|message|>Six, of course.")
    message = ChatPrompts.message(generated)
    assert message == {"role": "assistant", "content": "Six, of course.",
                       "thinking": "Three and three."}
    assert ChatPrompts.message("Plain.") == {"role": "assistant", "content": "Plain."}
    chat = HFChatTokenizer(chat_tokenizer(HARMONY, HARMONY_TOKENS, CORPUS,
                                          eos_token="<|return|>", pad_token="<|endoftext|>"))
    assert supervised_text(chat, CHAT[:-1] + [message])[-1] == (
        "<|channel|>final<|message|>Six, of course.<|return|>")


def test_kimi_supervises_each_turn_and_picks_a_reserved_mask_token():
    tokenizer = chat_tokenizer(KIMI, KIMI_TOKENS, CORPUS, eos_token="[EOS]")
    chat = HFChatTokenizer(tokenizer)
    assert supervised_text(chat, CHAT) == ["Four.<|im_end|>", "Six, of course.<|im_end|>"]
    mask_id, how = resolve_mask_token_id(tokenizer, len(tokenizer))
    assert tokenizer.convert_ids_to_tokens(mask_id) == "<|reserved_token_0|>", how
