"""The mask token id found from the target's tokenizer per family (spec §4.3), the explicit
override, the refusal when none exists, and its use by parse_plan without --mask-token-id."""
import io

import pytest
import sentencepiece as spm
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from tests.dflash_testing import tiny_target_dir
from megatron_dflash.data.mask_token import resolve_mask_token_id
from megatron_dflash.synthetic import VOCAB
from megatron_dflash.training.pretrain import parse_plan

WORDS = ["hello", "world", "reserved", "mask", "the", "a"]  # plain words, never chosen
CHATML = ("{% for m in messages %}"
          "{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endfor %}")
LLAMA3 = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
          "<|reserved_special_token_1|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
QWEN3 = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]


def _tokenizer(specials, template=CHATML, **kw) -> PreTrainedTokenizerFast:
    """A word-level tokenizer: WORDS, then `specials` as added special tokens, in id order."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>"] + WORDS)},
                                     unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", chat_template=template,
                                   **kw)


def test_the_tokenizers_mask_token():
    tok = _tokenizer(["<|im_end|>", "[M]"], mask_token="[M]", eos_token="<|im_end|>")
    assert resolve_mask_token_id(tok, len(tok) + 8) == (
        tok.convert_tokens_to_ids("[M]"), "'[M]', the tokenizer's mask_token")


@pytest.mark.parametrize("name", ["<|MASK|>", "[MASK]", "<mask>"])
def test_a_mask_token_in_the_vocabulary(name):
    tok = _tokenizer(["<|im_end|>", name], eos_token="<|im_end|>")
    assert tok.mask_token is None
    mask_id, how = resolve_mask_token_id(tok, len(tok))
    assert mask_id == tok.convert_tokens_to_ids(name)
    assert how == f"{name!r}, in the tokenizer's vocabulary"


def test_llama3_uses_its_first_reserved_special_token():
    tok = _tokenizer(LLAMA3, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    # Llama-3's vocabulary fills its embedding exactly: no spare row
    mask_id, how = resolve_mask_token_id(tok, len(tok))
    assert mask_id == tok.convert_tokens_to_ids("<|reserved_special_token_0|>")
    assert how.startswith("'<|reserved_special_token_0|>', the first reserved special token")
    # a reserved token the chat template writes occurs in chat: the next one
    writes = _tokenizer(LLAMA3, template=CHATML + "<|reserved_special_token_0|>",
                        eos_token="<|eot_id|>")
    assert resolve_mask_token_id(writes, len(writes))[0] == \
        writes.convert_tokens_to_ids("<|reserved_special_token_1|>")


def test_qwen3_uses_the_first_spare_embedding_row():
    tok = _tokenizer(QWEN3, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    # Qwen3: 151669 = len(tokenizer) inside the padded 151936-row embedding
    mask_id, how = resolve_mask_token_id(tok, len(tok) + 267)
    assert mask_id == len(tok) and how.startswith("no token: the first embedding row past")


def test_none_is_refused_naming_the_flag():
    # a mask_token that is the pad token is no mask: data produces it
    tok = _tokenizer(QWEN3, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                     mask_token="<|endoftext|>")
    with pytest.raises(ValueError, match="--mask-token-id is needed.*pass --mask-token-id"):
        resolve_mask_token_id(tok, len(tok))
    # a mask token outside the target's embedding cannot be used either
    outside = _tokenizer(QWEN3 + ["<|MASK|>"], eos_token="<|im_end|>")
    with pytest.raises(ValueError, match="--mask-token-id"):
        resolve_mask_token_id(outside, len(outside) - 1)


def test_explicit_id_wins_and_is_range_checked():
    tok = _tokenizer(["<|MASK|>"], mask_token="<|MASK|>")
    assert resolve_mask_token_id(tok, len(tok), explicit=3) == (3, "--mask-token-id")
    n = len(tok)
    with pytest.raises(ValueError, match=rf"--mask-token-id={n} must be an integer \[0, {n - 1}\]"):
        resolve_mask_token_id(tok, len(tok), explicit=len(tok))


def test_sentencepiece_pieces():
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["hello world, the reserved word"] * 50), model_writer=model,
        vocab_size=60, hard_vocab_limit=False, user_defined_symbols=["<|im_end|>", "<reserved_0>"],
        minloglevel=2, num_threads=1)
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    n = sp.get_piece_size()
    assert resolve_mask_token_id(sp, n) == (sp.piece_to_id("<reserved_0>"),
                                            "'<reserved_0>', the first reserved special token "
                                            "(the chat template never writes it)")


# --- parse_plan without --mask-token-id ----------------------------------------------------------

@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return tiny_target_dir(tmp_path_factory.mktemp("target"))


def _saved(tmp_path, tok) -> str:
    tok.save_pretrained(tmp_path)
    return str(tmp_path)


def test_parse_plan_resolves_from_the_tokenizer(target, tmp_path, capsys):
    spare = _tokenizer(QWEN3, eos_token="<|im_end|>")
    assert len(spare) < VOCAB
    plan = parse_plan(["--target", target, "--tokenizer", _saved(tmp_path, spare)])
    assert plan.dflash.mask_token_id == len(spare)
    [line] = [l for l in capsys.readouterr().out.splitlines() if l.startswith("mask token:")]
    assert line.startswith(f"mask token: id {len(spare)} from hf:{tmp_path}: no token")
    # the flag still wins
    assert parse_plan(["--target", target, "--tokenizer", str(tmp_path),
                       "--mask-token-id", "7"]).dflash.mask_token_id == 7


@pytest.mark.parametrize("case", ["no candidate", "no tokenizer"])
def test_parse_plan_refuses_without_a_mask_token(target, tmp_path, capsys, case):
    argv = ["--target", target]
    if case == "no candidate":  # every one of the target's rows is a token, none a mask
        full = _tokenizer(QWEN3 + [f"<extra_{i}>" for i in range(VOCAB - 7 - len(QWEN3))],
                          eos_token="<|im_end|>")
        assert len(full) == VOCAB
        argv += ["--tokenizer", _saved(tmp_path, full)]
    with pytest.raises(SystemExit):
        parse_plan(argv)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--mask-token-id" in err
    assert ("is needed" if case == "no candidate" else "cannot be loaded") in err
