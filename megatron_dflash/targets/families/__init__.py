"""The target families, found by discovery: every module of this package exports `FAMILY`, a
`TargetFamily` naming the HF `architectures[0]` values it imports. Adding a family is adding a
module here (and its tests); nothing else lists them.
"""
from __future__ import annotations

import functools
import importlib
import pkgutil

from megatron_dflash.targets.family import TargetFamily


@functools.cache
def by_architecture() -> dict[str, TargetFamily]:
    """Architecture name -> its family, from every module of this package."""
    table = {}
    for module in pkgutil.iter_modules(__path__):
        family = importlib.import_module(f"{__name__}.{module.name}").FAMILY
        for architecture in family.architectures:
            if architecture in table:
                raise RuntimeError(f"architecture {architecture} is claimed by two families: "
                                   f"{type(table[architecture]).__name__} and "
                                   f"{type(family).__name__}")
            table[architecture] = family
    return table


def find_family(architectures) -> TargetFamily | None:
    """The family of a config's `architectures` list (by its first entry); None if unsupported."""
    return by_architecture().get(architectures[0]) if architectures else None


def family_for(architectures, where) -> TargetFamily:
    """`find_family`, or a ValueError naming `where` (the config file) and what is supported."""
    family = find_family(architectures)
    if family is None:
        raise ValueError(f"{where}: architectures={architectures} is not supported; supported: "
                         f"{', '.join(sorted(by_architecture()))}")
    return family
