"""FP8 for the draft and the frozen target, through Transformer Engine and megatron's own fields.

FP8 in megatron-core is a pair of `TransformerConfig` fields (`fp8` = format, `fp8_recipe`) that
`TransformerBlock` turns into TE's fp8 autocast; only TE linears honour it, so FP8 needs the
`transformer_engine` backend. Draft and target choose independently (`--fp8-*` and
`--target-fp8-*`): the target runs forward only, the draft trains. The draft's config is copied
from the target's, so its FP8 fields are always set explicitly (`FP8Settings.fields`), never
inherited. The borrowed LM head and `fc` run outside the draft's TransformerBlock, hence in bf16.

FP8 GEMMs need token counts divisible by `get_fp8_align_size` (16; 32 for mxfp8): pad the
sequence (`sequence_multiple`) and the number of blocks (`pad_blocks`; the added blocks are
unkept: no loss, no context).

The mapping works without Transformer Engine; validation only looks for it (`find_spec`), and
only `fp8_unavailable_reason` imports it, to ask what this GPU supports.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math

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


def add_fp8_args(parser: argparse.ArgumentParser) -> None:
    """The FP8 flags (Megatron-LM's names for the draft; `--target-` for the frozen target)."""
    g = parser.add_argument_group("FP8 (Transformer Engine, needs --transformer-impl "
                                  "transformer_engine)")
    g.add_argument("--fp8-format", choices=FP8_FORMATS, default=None,
                   help="train the draft's transformer layers in FP8 with this format "
                        "(hybrid: e4m3 forward, e5m2 gradients)")
    g.add_argument("--fp8-recipe", choices=FP8_RECIPES, default=None,
                   help="draft FP8 scaling recipe (default delayed); mxfp8 needs Blackwell")
    g.add_argument("--target-fp8-format", choices=FP8_FORMATS, default=None,
                   help="run the frozen target's forward in FP8 with this format")
    g.add_argument("--target-fp8-recipe", choices=FP8_RECIPES, default=None,
                   help="target FP8 scaling recipe (default delayed)")


def fp8_settings(args: argparse.Namespace) -> tuple[FP8Settings, FP8Settings]:
    """(draft, target) settings from the flags; ValueError naming the flag when inconsistent."""
    out = []
    for prefix in ("", "target_"):
        fmt, recipe = getattr(args, f"{prefix}fp8_format"), getattr(args, f"{prefix}fp8_recipe")
        flag = f"--{prefix.replace('_', '-')}fp8"
        if recipe is not None and fmt is None:
            raise ValueError(f"{flag}-recipe={recipe} needs {flag}-format (e4m3 or hybrid)")
        out.append(FP8Settings(fmt, recipe or "delayed"))
    if any(s.enabled for s in out):
        if getattr(args, "transformer_impl", None) != "transformer_engine":
            raise ValueError("FP8 (--fp8-format / --target-fp8-format) needs --transformer-impl "
                             "transformer_engine: only Transformer Engine linears run in FP8")
        if importlib.util.find_spec("transformer_engine") is None:
            raise ValueError("FP8 (--fp8-format / --target-fp8-format) needs Transformer Engine: "
                             "pip install 'megatron_dflash[te]' on a CUDA machine")
    return out[0], out[1]


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


def pad_blocks(anchors: torch.Tensor, keep: torch.Tensor, block_size: int,
               multiple: int, min_blocks: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Append unkept blocks (anchor 0, keep False) until there are at least `min_blocks` and
    N * block_size is a multiple of `multiple`; they carry no loss weight and see no context."""
    n = max(anchors.shape[1], min_blocks)
    step = multiple // math.gcd(multiple, block_size)  # blocks per aligned group
    extra = n - anchors.shape[1] + (-n % step)
    if extra == 0:
        return anchors, keep
    return (torch.cat([anchors, anchors.new_zeros(anchors.shape[0], extra)], dim=1),
            torch.cat([keep, keep.new_zeros(keep.shape[0], extra)], dim=1))
