"""Gemma 3 text pipe layers (`gemma3_text`: Gemma 3 1B, and the text tower's config of the larger
ones) over transformers' own `Gemma3DecoderLayer` (keys equal HF's minus `model.layers.{i}.`):
GeGLU MLP, (1 + w) RMSNorms before and after attention and MLP, q/k norms, embeddings scaled by
sqrt(hidden) (`Gemma3TextScaledWordEmbedding`: the tied head uses the unscaled weight, as HF's),
sliding and full layers (`config.layer_types`) with their own RoPE bases (`rope_parameters` per layer
type; cos/sin computed once per type and stage).

Refused (`check_config`): logit soft-capping (`final_logit_softcapping`, `attn_logit_softcapping`:
null in the released Gemma 3 configs; the pipeline's LM head and sdpa do not apply them) and
`use_bidirectional_attention` (an encoder setting).
"""
from transformers.models.gemma3.modeling_gemma3 import (
    Gemma3DecoderLayer,
    Gemma3RMSNorm,
    Gemma3RotaryEmbedding,
    Gemma3TextScaledWordEmbedding,
)

from .llama import RopeEmbedding, RopeFinalNorm, RopePipeBlock


def check_config(config) -> None:
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if getattr(config, key, None) is not None:
            raise ValueError(f"gemma3_text: config.json sets {key} = {getattr(config, key)}; pipetune does not apply "
                             "logit soft-capping (Gemma 3's released configs have it null). Set it to null, or use another model")
    if getattr(config, "use_bidirectional_attention", False):
        raise ValueError("gemma3_text: config.json sets use_bidirectional_attention (an encoder setting); pipetune "
                         "trains causal LMs: set it to false")


class Gemma3Embedding(RopeEmbedding):
    """(input_ids, mask[, seg]) -> (embedding * sqrt(hidden) float[B,T,H], mask[, seg])."""

    @staticmethod
    def make_embedding(config):
        return Gemma3TextScaledWordEmbedding(config.vocab_size, config.hidden_size, config.pad_token_id,
                                             embed_scale=config.hidden_size ** 0.5)


class Gemma3PipeBlock(RopePipeBlock, Gemma3DecoderLayer):
    rotary_class = Gemma3RotaryEmbedding
    rope_by_layer_type = True


class Gemma3FinalNorm(RopeFinalNorm):
    norm_class = Gemma3RMSNorm
