"""FP8 for the draft and the frozen target, through Transformer Engine and megatron's own fields.

FP8 in megatron-core is a pair of `TransformerConfig` fields (`fp8` = format, `fp8_recipe`) that
`TransformerBlock` turns into TE's fp8 autocast; only TE linears honour it, so FP8 needs the
`transformer_engine` backend. Draft and target choose independently (`--fp8-*` and
`--target-fp8-*`): the target runs forward only, the draft trains. The draft's config is copied
from the target's, so its FP8 fields are always set explicitly (`FP8Settings.fields`), never
inherited. The borrowed LM head and `fc` run outside the draft's TransformerBlock, hence in bf16.

FP8 GEMMs need token counts divisible by `get_fp8_align_size` (16; 32 for mxfp8): pad the
sequence to `sequence_multiple` and the number of blocks with `anchors.pad_blocks` (the added
blocks are unkept: no loss, no context). The `--fp8-*` flags and their validation are in
run/flags.py and run/checks.py.

The mapping works without Transformer Engine; only `fp8_unavailable_reason` imports it, to ask
what this GPU supports.
"""
from __future__ import annotations

import dataclasses
import importlib.util

import torch
from megatron.core.enums import Fp8Recipe
from megatron.core.fp8_utils import get_fp8_align_size

FP8_FORMATS = ("e4m3", "hybrid")
FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")


@dataclasses.dataclass(frozen=True)
class FP8Settings:
    """One model's FP8 choice; `format=None` means bf16/fp32 (no FP8)."""

    format: str | None = None
    recipe: str = "delayed"

    def __post_init__(self):
        if self.format is not None and self.format not in FP8_FORMATS:
            raise ValueError(f"FP8 format {self.format!r} must be one of {FP8_FORMATS}")
        if self.recipe not in FP8_RECIPES:
            raise ValueError(f"FP8 recipe {self.recipe!r} must be one of {FP8_RECIPES}")

    @property
    def enabled(self) -> bool:
        return self.format is not None

    @property
    def align(self) -> int:
        """Token-count multiple its GEMMs need (1 without FP8)."""
        return get_fp8_align_size(Fp8Recipe(self.recipe)) if self.enabled else 1

    def fields(self) -> dict:
        """The TransformerConfig fields (`dataclasses.replace(config, **fields)`)."""
        if not self.enabled:
            return {"fp8": None}
        return {"fp8": self.format, "fp8_recipe": self.recipe}

    def apply(self, config):
        """`config` with these FP8 fields (TransformerConfig re-validates itself)."""
        return dataclasses.replace(config, **self.fields())


def fp8_unavailable_reason(settings: FP8Settings) -> str | None:
    """Why this machine cannot run `settings` (None: it can, or FP8 is off). Imports TE."""
    if not settings.enabled:
        return None
    if not torch.cuda.is_available():
        return "FP8 needs a CUDA device"
    if importlib.util.find_spec("transformer_engine") is None:
        return "Transformer Engine is not installed"
    import transformer_engine.pytorch as te

    check = {"blockwise": te.is_fp8_block_scaling_available,
             "mxfp8": te.is_mxfp8_available}.get(settings.recipe, te.is_fp8_available)
    ok, reason = check(return_reason=True)
    return None if ok else f"{settings.recipe}: {reason}"


def sequence_multiple(tensor_parallel_size: int, sequence_parallel: bool,
                      *settings: FP8Settings) -> int:
    """What sequence lengths must be a multiple of: the largest FP8 alignment of `settings`,
    times the TP size under sequence parallelism (every rank's shard stays aligned)."""
    align = max([s.align for s in settings] + [1])
    return align * (tensor_parallel_size if sequence_parallel else 1)
