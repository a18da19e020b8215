"""LLaMA pipe layers, and the RoPE decoder machinery the LLaMA-shaped families share (Qwen2, Qwen3,
Mistral, Gemma 3: `models.qwen2`, `models.qwen3`, `models.mistral`, `models.gemma3`). Blocks
subclass transformers' own decoder layer (`LlamaDecoderLayer`, ...), so numerics and state-dict keys
are HF's (minus the `model.layers.{i}.` prefix). Covers grouped-query attention (`num_key_value_heads`),
`rope_parameters`/`rope_scaling`/`rope_theta` (Llama 3.1's `rope_type: "llama3"` included: HF's rotary
module reads it), tied or untied embeddings, and sliding-window layers (`config.layer_types`, or
Mistral's `sliding_window`): their mask is transformers' `create_sliding_window_causal_mask`, built
with a sliding layer's cache entry, so training, prefill and cached decoding see HF's window.
"""

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
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

SLIDING = "sliding_attention"


def layer_type(config, layer_idx: int) -> str:
    """"full_attention" or "sliding_attention" for block `layer_idx`, as transformers decides it for the
    KV cache (`cache_utils.get_layer_types_and_kwargs`): `config.layer_types` where the family has it
    (Qwen2/Qwen3), else sliding wherever `config.sliding_window` is set (Mistral v0.1)."""
    types = getattr(config, "layer_types", None)
    if types:
        return types[layer_idx]
    return SLIDING if getattr(config, "sliding_window", None) is not None else "full_attention"


class RopeEmbedding(nn.Module):
    """(input_ids, mask[, seg]) -> (hidden float[B,T,H], mask[, seg])."""

    def __init__(self, config):
        super().__init__()
        self.embed_tokens = self.make_embedding(config)

    @staticmethod
    def make_embedding(config) -> nn.Module:
        """The token embedding (a family with another one, e.g. Gemma 3's scaled, overrides this)."""
        return nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)

    @property
    def embedding_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight

    def forward(self, inputs: tuple) -> tuple:
        input_ids, attention_mask, segment_ids = split_stage_inputs(inputs)
        return join_stage_outputs(self.embed_tokens(input_ids), attention_mask, segment_ids)


class StageMasks:
    """The causal masks of one stage's forward, by layer type, each built on first use by the first
    block of that type that asks (its `layer_idx` is on this stage, so its cache entry holds this
    stage's past: a stage's cache has no entries for other stages' layers). Full layers get
    `create_causal_mask`, sliding layers `create_sliding_window_causal_mask` (a sliding layer's cache
    keeps only the window, and the mask's sizes follow it)."""

    def __init__(self, config, hidden, attention_mask, past_key_values, position_ids, and_mask_function):
        self.args = dict(config=config, inputs_embeds=hidden, attention_mask=attention_mask,
                         past_key_values=past_key_values, position_ids=position_ids,
                         and_mask_function=and_mask_function)
        self.built = {}

    def for_block(self, block):
        kind = block.layer_type
        if kind not in self.built:
            build = create_sliding_window_causal_mask if kind == SLIDING else create_causal_mask
            self.built[kind] = build(**self.args, layer_idx=block.self_attn.layer_idx)
        return self.built[kind]


class RopeByLayerType:
    """RoPE cos/sin of one stage's forward per layer type, computed on first use (Gemma 3: sliding and
    full layers rotate with different bases; the rotary module takes the layer type)."""

    def __init__(self, rotary_emb, hidden, position_ids):
        self.rotary_emb, self.hidden, self.position_ids = rotary_emb, hidden, position_ids
        self.built = {}

    def for_block(self, block):
        if block.layer_type not in self.built:
            self.built[block.layer_type] = self.rotary_emb(self.hidden, self.position_ids, block.layer_type)
        return self.built[block.layer_type]


class RopePipeBlock:
    """Mixin over a transformers decoder layer (first base after this one): one block that rebuilds
    positions, RoPE cos/sin and its causal mask from the int mask. Subclasses set `rotary_class`
    (and `rope_by_layer_type` where the rotary module takes the layer type, as Gemma 3's does).

    The rotary module holds only a non-persistent `inv_freq` buffer, so the state dict is exactly
    HF's decoder-layer state dict."""

    rotary_class = None
    rope_by_layer_type = False

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.config = config
        self.layer_type = layer_type(config, layer_idx)
        self.rotary_emb = self.rotary_class(config=config)

    def forward(self, inputs: tuple, past_key_values=None, attention_inputs=None) -> tuple:
        """Training: hidden [B,T,H] and mask [B,T]. Cached decoding (`past_key_values` a transformers
        Cache holding this block's earlier keys/values): hidden holds only the new positions
        [B,q,H] while the mask covers past + new [B,past+q]; positions are the mask's last q.
        `attention_inputs`: what `attention_inputs()` returns, computed once for a stage's blocks."""
        hidden, attention_mask, segment_ids = split_stage_inputs(inputs)
        if attention_inputs is None:
            attention_inputs = self.attention_inputs(inputs, past_key_values)
        position_ids, masks, cos_sin, attention_kwargs = attention_inputs
        if isinstance(cos_sin, RopeByLayerType):
            cos_sin = cos_sin.for_block(self)
        hidden = super().forward(
            hidden,
            attention_mask=None if masks is None else masks.for_block(self),
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=past_key_values is not None,
            position_embeddings=cos_sin,
            **attention_kwargs,
        )
        return join_stage_outputs(hidden, attention_mask, segment_ids)

    def attention_inputs(self, inputs: tuple, past_key_values=None) -> tuple:
        """(position ids, StageMasks, RoPE cos/sin, attention kwargs) for these inputs: the same for
        every block of a stage (same config; with a cache, every layer has seen the same positions).
        Packed rows under flash attention: no mask, cu_seqlens instead (`stage_io.varlen_kwargs`; the
        attention module passes its own sliding window to the kernel)."""
        hidden, attention_mask, segment_ids = split_stage_inputs(inputs)
        position_ids = position_ids_from(attention_mask, segment_ids)[:, -hidden.shape[1]:]
        if self.rope_by_layer_type:
            cos_sin = RopeByLayerType(self.rotary_emb, hidden, position_ids)
        else:
            cos_sin = self.rotary_emb(hidden, position_ids=position_ids)
        if segment_ids is not None and past_key_values is None and attn_implementation(self.config) in VARLEN_IMPLEMENTATIONS:
            return position_ids, None, cos_sin, varlen_kwargs(segment_ids)
        masks = StageMasks(self.config, hidden, attention_mask, past_key_values, position_ids,
                           None if segment_ids is None else same_segment_mask_fn(segment_ids))
        return position_ids, masks, cos_sin, {}


class RopeFinalNorm(nn.Module):
    """(hidden, mask[, seg]) -> (normed hidden, mask[, seg]). Subclasses set `norm_class`."""

    norm_class = None

    def __init__(self, config):
        super().__init__()
        self.norm = self.norm_class(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, inputs: tuple) -> tuple:
        hidden, attention_mask, segment_ids = split_stage_inputs(inputs)
        return join_stage_outputs(self.norm(hidden), attention_mask, segment_ids)


LlamaEmbedding = RopeEmbedding


class LlamaPipeBlock(RopePipeBlock, LlamaDecoderLayer):
    rotary_class = LlamaRotaryEmbedding


class LlamaFinalNorm(RopeFinalNorm):
    norm_class = LlamaRMSNorm
