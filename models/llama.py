"""LLaMA pipe layers. Blocks subclass transformers' `LlamaDecoderLayer`, so numerics and state-dict
keys are HF's (minus the `model.layers.{i}.` prefix). Covers grouped-query attention
(`num_key_value_heads`), `rope_parameters`/`rope_scaling`/`rope_theta`, tied or untied embeddings.
"""

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

from compat.private_api import attn_implementation

from .stage_io import (
    VARLEN_IMPLEMENTATIONS,
    join_stage_outputs,
    position_ids_from,
    same_segment_mask_fn,
    split_stage_inputs,
    varlen_kwargs,
)


class LlamaEmbedding(nn.Module):
    """(input_ids, mask[, seg]) -> (hidden float[B,T,H], mask[, seg])."""

    def __init__(self, config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)

    @property
    def embedding_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight

    def forward(self, inputs: tuple) -> tuple:
        input_ids, attention_mask, segment_ids = split_stage_inputs(inputs)
        return join_stage_outputs(self.embed_tokens(input_ids), attention_mask, segment_ids)


class LlamaPipeBlock(LlamaDecoderLayer):
    """One decoder layer; rebuilds positions, RoPE cos/sin and the causal mask from the int mask.

    The rotary module holds only a non-persistent `inv_freq` buffer, so the state dict is exactly
    HF's decoder-layer state dict.
    """

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.config = config
        self.rotary_emb = LlamaRotaryEmbedding(config=config)

    def forward(self, inputs: tuple, past_key_values=None, attention_inputs=None) -> tuple:
        """Training: hidden [B,T,H] and mask [B,T]. Cached decoding (`past_key_values` a transformers
        Cache holding this block's earlier keys/values): hidden holds only the new positions
        [B,q,H] while the mask covers past + new [B,past+q]; positions are the mask's last q.
        `attention_inputs`: what `attention_inputs()` returns, computed once for a stage's blocks."""
        hidden, attention_mask, segment_ids = split_stage_inputs(inputs)
        if attention_inputs is None:
            attention_inputs = self.attention_inputs(inputs, past_key_values)
        position_ids, causal_mask, cos_sin, attention_kwargs = attention_inputs
        hidden = super().forward(
            hidden,
            attention_mask=causal_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=past_key_values is not None,
            position_embeddings=cos_sin,
            **attention_kwargs,
        )
        return join_stage_outputs(hidden, attention_mask, segment_ids)

    def attention_inputs(self, inputs: tuple, past_key_values=None) -> tuple:
        """(position ids, causal mask, RoPE cos/sin, attention kwargs) for these inputs: the same for
        every block of a stage (same config; with a cache, every layer has seen the same positions).
        Packed rows under flash attention: no mask, cu_seqlens instead (`stage_io.varlen_kwargs`)."""
        hidden, attention_mask, segment_ids = split_stage_inputs(inputs)
        position_ids = position_ids_from(attention_mask, segment_ids)[:, -hidden.shape[1]:]
        cos_sin = self.rotary_emb(hidden, position_ids=position_ids)
        if segment_ids is not None and past_key_values is None and attn_implementation(self.config) in VARLEN_IMPLEMENTATIONS:
            return position_ids, None, cos_sin, varlen_kwargs(segment_ids)
        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=hidden,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=position_ids,
            and_mask_function=None if segment_ids is None else same_segment_mask_fn(segment_ids),
            layer_idx=self.self_attn.layer_idx,  # the cache holds only this stage's layers' entries
        )
        return position_ids, causal_mask, cos_sin, {}


class LlamaFinalNorm(nn.Module):
    """(hidden, mask[, seg]) -> (normed hidden, mask[, seg])."""

    def __init__(self, config):
        super().__init__()
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, inputs: tuple) -> tuple:
        hidden, attention_mask, segment_ids = split_stage_inputs(inputs)
        return join_stage_outputs(self.norm(hidden), attention_mask, segment_ids)
