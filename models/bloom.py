"""BLOOM pipe layers. Blocks subclass transformers' `BloomBlock` (keys equal HF's minus
`transformer.h.{i}.`). Tied embeddings by default; `word_embeddings_layernorm` lives in the
embedding layer; alibi is rebuilt in every block from the int mask. Eager attention only (BLOOM's
attention adds alibi to the scores itself).
"""
import torch
from torch import nn
from transformers.masking_utils import create_causal_mask
from transformers.models.bloom.modeling_bloom import BloomBlock, _get_alibi_slopes

from .stage_io import join_stage_outputs, position_ids_from, same_segment_mask_fn, split_stage_inputs


class BloomEmbedding(nn.Module):
    """(input_ids, mask[, seg]) -> (layernorm(embedding) float[B,T,H], mask[, seg])."""

    def __init__(self, config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.word_embeddings_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)

    @property
    def embedding_weight(self) -> torch.Tensor:
        return self.word_embeddings.weight

    def forward(self, inputs: tuple) -> tuple:
        input_ids, attention_mask, segment_ids = split_stage_inputs(inputs)
        hidden = self.word_embeddings_layernorm(self.word_embeddings(input_ids))
        return join_stage_outputs(hidden, attention_mask, segment_ids)


def alibi_from(attention_mask: torch.Tensor, segment_ids, num_heads: int, dtype: torch.dtype) -> torch.Tensor:
    """float[B*heads, 1, T]: slope_h * key_position, positions counted over real tokens (and from
    each segment's start when packed), as transformers' `build_alibi_tensor` does for one sequence."""
    batch, seq_len = attention_mask.shape
    positions = position_ids_from(attention_mask, segment_ids).masked_fill(attention_mask == 0, 0)
    slopes = _get_alibi_slopes(num_heads, attention_mask.device)  # float32[heads]
    alibi = slopes[None, :, None] * positions[:, None, :].float()  # [B, heads, T]
    return alibi.reshape(batch * num_heads, 1, seq_len).to(dtype)


class BloomPipeBlock(BloomBlock):
    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.config = config

    def forward(self, inputs: tuple, past_key_values=None, attention_inputs=None) -> tuple:
        """As `LlamaPipeBlock.forward`; with a cache, alibi covers every key position (past + new),
        taken from the full mask, so left padding shifts it as it shifts positions."""
        hidden, attention_mask, segment_ids = split_stage_inputs(inputs)
        causal_mask, alibi = attention_inputs or self.attention_inputs(inputs, past_key_values)
        hidden, _ = super().forward(
            hidden, alibi=alibi, attention_mask=causal_mask, layer_past=past_key_values,
            use_cache=past_key_values is not None,
        )
        return join_stage_outputs(hidden, attention_mask, segment_ids)

    def attention_inputs(self, inputs: tuple, past_key_values=None) -> tuple:
        """(causal mask, alibi): the same for every block of a stage."""
        hidden, attention_mask, segment_ids = split_stage_inputs(inputs)
        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=hidden,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            and_mask_function=None if segment_ids is None else same_segment_mask_fn(segment_ids),
            layer_idx=self.self_attention.layer_idx,
        )
        return causal_mask, alibi_from(attention_mask, segment_ids, self.num_heads, hidden.dtype)


class BloomFinalNorm(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)

    def forward(self, inputs: tuple) -> tuple:
        hidden, attention_mask, segment_ids = split_stage_inputs(inputs)
        return join_stage_outputs(self.ln_f(hidden), attention_mask, segment_ids)
