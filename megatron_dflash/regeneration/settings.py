"""The settings that shape a regenerated output, recorded beside its part files so that a resume
with other settings is refused (a restart with another --max-new-tokens had kept the first answers
and written the rest with the new limit: one output from two settings).

`OUTPUT.parts/settings.json` is written atomically by rank 0 before the first part line. A resume
compares the run's settings with it before generating anything and raises `SettingsMismatch`: one
line naming each differing setting by the caller's flag (`flags`: field name -> flag).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Mapping

from megatron_dflash.atomic import write_text
from megatron_dflash.regeneration.parts import has_parts, parts_dir

SETTINGS_FILE = "settings.json"
_UNDER = {"top_p": "temperature", "seed": "temperature", "target_layer_ids": "offline_features",
          "seq_length": "offline_features", "features_dtype": "offline_features"}


class SettingsMismatch(ValueError):
    """A resume asks for other settings than the part files were written with (one line)."""


@dataclass(frozen=True)
class Settings:
    """What shapes the output (the batch size, layout and log interval do not)."""

    target: str | None = None
    """The target's HF directory (absolute), None when the caller does not say."""
    target_config_sha256: str | None = None
    """Of its config.json."""
    chat_template_sha256: str | None = None
    thinking: bool | None = None
    temperature: float = 0.0
    top_p: float | None = None
    """None when greedy (top-p and seed then change nothing)."""
    seed: int | None = None
    max_new_tokens: int = 0
    last_turn_only: bool = False
    offline_features: bool = False
    target_layer_ids: list[int] | None = None
    """The feature cache's taps, sequence length and dtype (None without features)."""
    seq_length: int | None = None
    features_dtype: str | None = None

    @classmethod
    def of(cls, *, prompts, max_new_tokens: int, sampling, last_turn_only: bool,
           manifest: dict | None = None, target: str | None = None) -> "Settings":
        """The settings of a run: `prompts` a ChatPrompts, `sampling` a Sampling, `manifest` the
        feature cache's (`cache_manifest`) or None, `target` the target's HF directory."""
        config_sha = None
        if target is not None:
            with open(os.path.join(target, "config.json"), "rb") as f:
                config_sha = hashlib.sha256(f.read()).hexdigest()
        greedy = sampling.temperature == 0.0
        features = manifest or {}
        return cls(
            target=None if target is None else os.path.abspath(target),
            target_config_sha256=config_sha, chat_template_sha256=prompts.template_sha256,
            thinking=prompts.thinking, temperature=float(sampling.temperature),
            top_p=None if greedy else float(sampling.top_p),
            seed=None if greedy else int(sampling.seed), max_new_tokens=int(max_new_tokens),
            last_turn_only=bool(last_turn_only), offline_features=manifest is not None,
            target_layer_ids=features.get("target_layer_ids"),
            seq_length=features.get("seq_length"), features_dtype=features.get("dtype"))

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))


def check_settings(output: str, settings: Settings, flags: Mapping[str, str] | None = None
                   ) -> bool:
    """Compare `settings` with those recorded in `OUTPUT.parts`; raises SettingsMismatch if they
    differ while part files hold conversations, or if part files hold conversations but no
    settings record. Returns whether the record stands (False: `record_settings` must write this
    run's before the first part line). Reads only, so every rank may call it and reach the same
    verdict."""
    directory = parts_dir(output)
    path = os.path.join(directory, SETTINGS_FILE)
    if not os.path.isfile(path):
        if has_parts(output):
            raise SettingsMismatch(
                f"{directory} holds part files but no {SETTINGS_FILE} (written before settings "
                f"were recorded), so a resume cannot tell whether they match this run's: remove "
                f"{directory} to start afresh")
        return False
    with open(path) as f:
        recorded = json.load(f)
    wanted = settings.to_dict()
    differ = [k for k in wanted if recorded.get(k) != wanted[k]]
    # A setting that applies only under another (top-p when sampling) is named only if it differs
    # where it applies to both runs: greedy vs sampled is the temperature's difference.
    differ = [k for k in differ if not (_UNDER.get(k) in differ
                                        and None in (recorded.get(k), wanted[k]))]
    if not differ:
        return True
    if not has_parts(output):  # recorded, but killed before a conversation was written
        return False
    flags = flags or {}
    was, now = {}, {}  # by flag, in field order (several fields may share a flag)
    for key in differ:
        was.setdefault(flags.get(key, key), []).append(_show(key, recorded.get(key)))
        now.setdefault(flags.get(key, key), []).append(_show(key, wanted[key]))
    raise SettingsMismatch(
        f"{', '.join(was)}: the part files in {directory} were written with "
        f"{' and '.join(', '.join(v) for v in was.values())}, this run asks for "
        f"{' and '.join(', '.join(v) for v in now.values())}; use the same "
        f"value{'s' if len(was) > 1 else ''} or remove {directory} to start afresh")


def record_settings(output: str, settings: Settings) -> None:
    """Write `OUTPUT.parts/settings.json` atomically (before the first part line)."""
    os.makedirs(parts_dir(output), exist_ok=True)
    write_text(os.path.join(parts_dir(output), SETTINGS_FILE),
               json.dumps(settings.to_dict(), indent=1) + "\n")


def _show(key: str, value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if key.endswith("_sha256"):
        return f"{key[:-len('_sha256')].replace('_', ' ')} sha256 {value[:12]}"
    return str(value)
