"""Dense Llama-shaped targets: Llama (2, 3, 3.1-3.3 RoPE scaling), Qwen2 and Qwen3.

All are `TargetFamily`'s defaults — pre-norm RMSNorm layers, GQA with `kv_channels=head_dim`,
SwiGLU, no linear biases, RoPE — except Qwen2's q/k/v biases and Qwen3's per-head q/k RMSNorm.
"""
from megatron_dflash.targets.family import TargetFamily

QKV_BIAS = ("Qwen2ForCausalLM",)
QK_NORM = ("Qwen3ForCausalLM",)


class Llama(TargetFamily):
    architectures = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")

    def transformer_fields(self, hf):
        architecture = hf.architectures[0]
        return super().transformer_fields(hf) | dict(add_qkv_bias=architecture in QKV_BIAS,
                                                      qk_layernorm=architecture in QK_NORM)


FAMILY = Llama()
