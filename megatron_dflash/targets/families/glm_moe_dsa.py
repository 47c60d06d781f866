"""GLM-5 / 5.1 targets (transformers `GlmMoeDsaForCausalLM`) as dense multi-latent attention, up to
`index_topk` keys.

GLM-5 is DeepSeek-V3's shape (MLA with interleaved RoPE, sigmoid router with the correction bias,
shared experts, dense first layers, MTP layers) plus DeepSeek sparse attention (DSA): an indexer
per layer keeps each query's `index_topk` best keys. transformers keeps min(index_topk, keys), so
while a sequence (with its KV cache) holds at most `index_topk` keys every key is kept and DSA is
exactly dense MLA: the import is the DeepSeek-V3 one, the indexer's tensors (`self_attn.indexer.*`)
are never read, and longer sequences are refused — at plan time from `--seq-length`
(`sequence_limit`), and by the core attention (`DenseDSAAttention`) for whatever else runs the
target (regeneration, evaluation). megatron's own DSA (`experimental_attention_variant='dsa'`)
needs Transformer Engine and its absorbed MLA; it is not used. The local backend only: Transformer
Engine's core attention has no such limit.
"""
from megatron_dflash.targets.families.deepseek_v3 import DeepseekV3, MLADotProductAttention

SCOPE = "by the GLM-5 import (dense multi-latent attention up to index_topk keys)"


class GlmMoeDsa(DeepseekV3):
    architectures = ("GlmMoeDsaForCausalLM",)
    supported_features = ("layer_types",)

    def refusals(self, hf):
        dense = ["dense"] * min(hf.first_k_dense_replace, hf.num_hidden_layers)
        expected = dense + ["sparse"] * (hf.num_hidden_layers - len(dense))
        found = ([] if list(hf.mlp_layer_types) == expected else
                 [f"mlp_layer_types={hf.mlp_layer_types} (expected the first "
                  f"first_k_dense_replace={hf.first_k_dense_replace} dense)"])
        if any(t != "indexed_attention" for t in hf.layer_types):
            found.append(f"layer_types={hf.layer_types}")
        return [*super().refusals(hf), (found, SCOPE)]

    def transformer_fields(self, hf):
        # Read by `DenseDSAAttention`; DSA itself stays off (no experimental_attention_variant).
        return super().transformer_fields(hf) | dict(dsa_indexer_topk=hf.index_topk)

    def sequence_limit(self, hf):
        return hf.index_topk

    def block_spec(self, config, *, backend, pp_rank, tp_size):
        if backend != "local":
            raise ValueError(f"backend={backend!r}: the GLM-5 import runs on the local backend "
                             "(its core attention refuses more than index_topk keys)")
        return super().block_spec(config, backend=backend, pp_rank=pp_rank, tp_size=tp_size)

    def local_attention_modules(self, config):
        return super().local_attention_modules(config) | dict(core_attention=DenseDSAAttention)


class DenseDSAAttention(MLADotProductAttention):
    """MLA's core attention, refusing more keys than GLM-5's indexer keeps (`dsa_indexer_topk`),
    where its sparse attention stops being dense."""

    def forward(self, query, key, value, *args, **kwargs):
        limit = self.config.dsa_indexer_topk
        if key.shape[0] > limit:
            raise ValueError(f"{key.shape[0]} keys: GLM-5 attends densely only up to its "
                             f"index_topk={limit} keys (beyond, its sparse attention keeps "
                             "the indexer's top keys, which this import does not run)")
        return super().forward(query, key, value, *args, **kwargs)


FAMILY = GlmMoeDsa()
