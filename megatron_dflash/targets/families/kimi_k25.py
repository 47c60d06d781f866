"""Kimi-K2.5 targets (`KimiK25ForConditionalGeneration`, transformers' `Kimi_K25...`): the text
model of the vision-language checkpoint, which is DeepSeek-V3-shaped (transformers reads its
`text_config`, `model_type` kimi_k2, as DeepSeek-V3's config), through the DeepSeek-V3 import.

The text weights live under `language_model.model.*` and `language_model.lm_head.weight`; the
vision tower and projector (`vision_tower.*`, `mm_projector.*`) are not part of the target and
never read. The wrapper's `tie_word_embeddings` defaults to True whatever the text model does, so
tying is decided by the tensors on disk: tied iff there is no `language_model.lm_head.weight`.
Kimi-K2 itself (text only, `DeepseekV3ForCausalLM` with model_type kimi_k2) is the DeepSeek-V3
import's. Checkpoints as released are INT4 (compressed-tensors): refused, dequantize first.
"""
from megatron_dflash.targets.families.deepseek_v3 import DeepseekV3
from megatron_dflash.targets.family import VisionLanguageWrapper


class KimiK25(VisionLanguageWrapper, DeepseekV3):
    architectures = ("KimiK25ForConditionalGeneration", "Kimi_K25ForConditionalGeneration")
    hf_prefix = "language_model.model."
    lm_head = "language_model.lm_head.weight"
    vision_weights = "the vision tower and projector (vision_tower.*, mm_projector.*)"

    def text_config(self, hf_config):
        """The wrapper's quantization too (the released checkpoints' INT4 is refused)."""
        text = super().text_config(hf_config)
        quantization = getattr(hf_config, "quantization_config", None)
        if quantization and not getattr(text, "quantization_config", None):
            text.quantization_config = quantization
        return text

    def tied(self, hf, shapes):
        return self.lm_head not in shapes


FAMILY = KimiK25()
