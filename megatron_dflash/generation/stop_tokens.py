"""The token ids generation stops after, read one way for regeneration and evaluation alike (two
readers had stopped the same target on different tokens)."""
from __future__ import annotations

import json
import os


def stop_token_ids(target_dir: str, tokenizer=None) -> list[int]:
    """The target's `transformers.GenerationConfig` `eos_token_id` (an int or a list) from
    generation_config.json, else (no file, or no eos there) the model config's (config.json), plus
    `tokenizer.eos_token_id` when a tokenizer is given. Sorted, each once."""
    from transformers import GenerationConfig

    eos = None
    if os.path.isfile(os.path.join(target_dir, "generation_config.json")):
        eos = GenerationConfig.from_pretrained(target_dir).eos_token_id
    config = os.path.join(target_dir, "config.json")
    if eos is None and os.path.isfile(config):
        with open(config) as f:
            eos = json.load(f).get("eos_token_id")
    stops = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        stops.append(tokenizer.eos_token_id)
    return sorted({int(s) for s in stops})
