"""Qwen3.5 / Qwen3.6 as Qwen publishes them: the VLMs `Qwen3_5ForConditionalGeneration` and
`Qwen3_5MoeForConditionalGeneration`, whose text model (`qwen3_5`) is the target. Its config is
`text_config`, its weights sit under `model.language_model.` (the LM head at `lm_head`), and the
vision encoder (`model.visual.*`) is never read. Tying follows the wrapper's
`tie_word_embeddings`, as transformers ties these models.
"""
from megatron_dflash.targets.families.qwen3_5 import Qwen35


class Qwen35VL(Qwen35):
    architectures = ("Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration")
    hf_prefix = "model.language_model."

    def text_config(self, hf_config):
        text = hf_config.get_text_config()
        if text is not hf_config:
            text.architectures = hf_config.architectures
            text._name_or_path = hf_config.name_or_path
            text.tie_word_embeddings = hf_config.tie_word_embeddings
        return text

    def skip_notice(self, hf):
        mtp = super().skip_notice(hf)
        vision = "skipping the vision encoder (model.visual.*): not part of the target"
        return f"{vision}; {mtp}" if mtp else vision


FAMILY = Qwen35VL()
