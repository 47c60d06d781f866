"""The target's config.json, read and checked as the import checks it, with errors that name
`--target`."""
from __future__ import annotations

import json
import os
from pathlib import Path

from transformers import PretrainedConfig

from megatron_dflash.run.checks import one_line


def read_target_config(target: str) -> PretrainedConfig:
    """`load_hf_config(target)` (config.json, architecture, every safetensors header and tensor
    shape; no tensor data is read), each failure one line starting with `--target`."""
    from megatron_dflash.targets import load_hf_config

    try:
        return load_hf_config(target)
    except json.JSONDecodeError as e:
        raise ValueError(f"--target: {os.path.join(target, 'config.json')} is not valid JSON "
                         f"({e})") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"--target: {one_line(e)}") from None
    except Exception as e:  # safetensors' own SafetensorError: a header it cannot read
        if type(e).__name__ != "SafetensorError":
            raise
        raise ValueError(f"--target: {unreadable_safetensors(target) or target} is truncated or "
                         f"unreadable ({one_line(e)})") from None


def unreadable_safetensors(target: str) -> str | None:
    """The first safetensors file of `target` whose header cannot be read."""
    from safetensors import safe_open

    for shard in sorted(Path(target).glob("*.safetensors")):
        try:
            with safe_open(shard, framework="pt"):
                pass
        except Exception:
            return str(shard)
    return None
