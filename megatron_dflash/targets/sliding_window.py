"""HF sliding-window attention as megatron's `window_size` / `window_attn_skip_freq`.

HF's window w lets query i see keys j with i - w < j <= i (`masking_utils.sliding_window_overlay`):
megatron's `window_size = (w - 1, 0)`. The layers that slide are a per-layer 0/1 list
(`window_attn_skip_freq`, 1 = sliding; None: every layer), from HF's `layer_types` or a uniform
window (Mistral). The local backend applies it as a band mask (`SDPACoreAttention`).
"""
from __future__ import annotations

LAYER_TYPES = ("full_attention", "sliding_attention")


def window_fields(hf) -> dict:
    """TransformerConfig fields of the config's window of `sliding_window` keys on its sliding
    layers (`sliding_layers`)."""
    sliding_window, sliding = hf.sliding_window, sliding_layers(hf)
    if not sliding_window or not any(sliding):
        return dict(window_size=None, window_attn_skip_freq=None)
    return dict(window_size=(sliding_window - 1, 0),
                window_attn_skip_freq=None if all(sliding) else [int(s) for s in sliding])


def sliding_layers(hf) -> list[bool]:
    """Per layer, whether it slides: HF's `layer_types`, else every layer when a window is set."""
    layer_types = getattr(hf, "layer_types", None)
    if layer_types:
        return [t == "sliding_attention" for t in layer_types]
    return [bool(getattr(hf, "sliding_window", None))] * hf.num_hidden_layers


def window_problems(hf) -> list[str]:
    """Layer types other than full and sliding attention, or a window (or sliding layers
    without one) of no keys."""
    layer_types = getattr(hf, "layer_types", None) or []
    if any(t not in LAYER_TYPES for t in layer_types):
        return [f"layer_types={layer_types}"]
    window = getattr(hf, "sliding_window", None)
    usable = isinstance(window, int) and window >= 1
    if (window is not None or any(sliding_layers(hf))) and not usable:
        return [f"sliding_window={window!r} (a window holds at least 1 key)"]
    return []
