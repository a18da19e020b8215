"""Qwen2 pipe layers: the LLaMA machinery (`models.llama`) over transformers' own `Qwen2DecoderLayer`
(keys equal HF's minus `model.layers.{i}.`).
Qwen2 / Qwen2.5: bias on q/k/v (not o); sliding-window layers where `use_sliding_window` is set
(layers from `max_window_layers` on, per `config.layer_types`).
"""
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RMSNorm, Qwen2RotaryEmbedding

from .llama import RopeEmbedding, RopeFinalNorm, RopePipeBlock

Qwen2Embedding = RopeEmbedding


class Qwen2PipeBlock(RopePipeBlock, Qwen2DecoderLayer):
    rotary_class = Qwen2RotaryEmbedding


class Qwen2FinalNorm(RopeFinalNorm):
    norm_class = Qwen2RMSNorm
