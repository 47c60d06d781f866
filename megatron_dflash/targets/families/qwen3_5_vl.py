"""Qwen3.5 / Qwen3.6 as Qwen publishes them: the VLMs `Qwen3_5ForConditionalGeneration` and
`Qwen3_5MoeForConditionalGeneration`, whose text model (`qwen3_5`) is the target. Its config is
`text_config`, its weights sit under `model.language_model.` (the LM head at `lm_head`), and the
vision encoder (`model.visual.*`) is never read. Tying follows the wrapper's
`tie_word_embeddings`, as transformers ties these models.
"""
from megatron_dflash.targets.families.qwen3_5 import Qwen35
from megatron_dflash.targets.family import VisionLanguageWrapper


class Qwen35VL(VisionLanguageWrapper, Qwen35):
    architectures = ("Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration")
    hf_prefix = "model.language_model."
    vision_weights = "the vision encoder (model.visual.*)"

    def text_config(self, hf_config):
        """The wrapper's `tie_word_embeddings` too: transformers ties these models by it."""
        text = super().text_config(hf_config)
        text.tie_word_embeddings = hf_config.tie_word_embeddings
        return text


FAMILY = Qwen35VL()
