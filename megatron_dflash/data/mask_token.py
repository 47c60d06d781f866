"""The DFlash mask token, found from the target's tokenizer as SpecForge and ModelOpt find it.

The mask's embedding is the target's frozen row at that id (spec §4.3): it must be a row the
embedding holds and an id chat data never produces. Pad, EOS, BOS and unk are never chosen:
data produces them, and falling back to them silently degrades acceptance (NeMo PR #2461).
"""
from __future__ import annotations

from dataclasses import dataclass

MASK_NAMES = ("<|MASK|>", "[MASK]", "<mask>")


@dataclass
class _Vocabulary:
    """What the rules read, from an HF or a SentencePiece tokenizer."""
    ids: dict[str, int]
    size: int                      # first id past every token
    mask_token: str | None
    special: list[tuple[int, str]]  # added special (SentencePiece: control / <marker>) tokens
    never: set[int]                 # pad, EOS, BOS, unk
    chat_template: str


def _hf_vocabulary(tokenizer) -> _Vocabulary:
    ids = tokenizer.get_vocab()
    template = tokenizer.chat_template or ""
    return _Vocabulary(
        ids=ids, size=max(len(tokenizer), max(ids.values(), default=-1) + 1),
        mask_token=tokenizer.mask_token,
        special=sorted((i, t.content) for i, t in tokenizer.added_tokens_decoder.items()
                       if t.special),
        never={i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id,
                           tokenizer.unk_token_id) if i is not None},
        chat_template=template if isinstance(template, str) else " ".join(template.values()))


def _sp_vocabulary(sp) -> _Vocabulary:
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    return _Vocabulary(
        ids={p: i for i, p in enumerate(pieces)}, size=len(pieces), mask_token=None,
        special=[(i, p) for i, p in enumerate(pieces)
                 if sp.is_control(i) or (p.startswith("<") and p.endswith(">"))],
        never={i for i in (sp.pad_id(), sp.eos_id(), sp.bos_id(), sp.unk_id()) if i >= 0},
        chat_template="")


def resolve_mask_token_id(tokenizer, vocab_size: int,
                          explicit: int | None = None) -> tuple[int, str]:
    """(id, how it was found, with its token string) for a target of `vocab_size` embedding rows.

    In order: `explicit` (--mask-token-id); the tokenizer's mask_token; a <|MASK|> / [MASK] /
    <mask> token; the first `reserved`-named special token the chat template never writes
    (Llama-3's <|reserved_special_token_0|>); the first embedding row past the tokenizer's ids
    (Qwen3: 151669 = len(tokenizer), inside the padded 151936-row embedding). `tokenizer` is an
    HF tokenizer or a SentencePieceProcessor. ValueError naming --mask-token-id when none exists.
    """
    if explicit is not None:
        if not 0 <= explicit < vocab_size:
            raise ValueError(f"--mask-token-id={explicit} must be an integer [0, {vocab_size - 1}]")
        return explicit, "--mask-token-id"
    sentencepiece = hasattr(tokenizer, "get_piece_size")
    v = _sp_vocabulary(tokenizer) if sentencepiece else _hf_vocabulary(tokenizer)

    def usable(i: int | None) -> bool:
        return i is not None and 0 <= i < vocab_size and i not in v.never

    if v.mask_token is not None and usable(v.ids.get(v.mask_token)):
        return v.ids[v.mask_token], f"{v.mask_token!r}, the tokenizer's mask_token"
    for name in MASK_NAMES:
        if usable(v.ids.get(name)):
            return v.ids[name], f"{name!r}, in the tokenizer's vocabulary"
    for i, name in v.special:
        if "reserved" in name.lower() and name not in v.chat_template and usable(i):
            return i, (f"{name!r}, the first reserved special token (the chat template never "
                       "writes it)")
    if v.size < vocab_size:
        return v.size, (f"no token: the first embedding row past the tokenizer's {v.size} ids "
                        f"(the target's embedding has {vocab_size} rows)")
    raise ValueError(
        f"--mask-token-id is needed: the target's tokenizer has no mask token, no "
        f"{'/'.join(MASK_NAMES)} token, no reserved special token, and its {v.size} ids fill "
        f"all {vocab_size} embedding rows; pass --mask-token-id with an id the embedding holds "
        "that your data never uses (not pad, EOS, BOS or unk)")
