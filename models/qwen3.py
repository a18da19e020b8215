"""Qwen3 pipe layers: the LLaMA machinery (`models.llama`) over transformers' own `Qwen3DecoderLayer`
(keys equal HF's minus `model.layers.{i}.`).
Qwen3 (dense): per-head RMSNorm `q_norm`/`k_norm` before RoPE, explicit `head_dim`, no bias.
"""
from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer, Qwen3RMSNorm, Qwen3RotaryEmbedding

from .llama import RopeEmbedding, RopeFinalNorm, RopePipeBlock

Qwen3Embedding = RopeEmbedding


class Qwen3PipeBlock(RopePipeBlock, Qwen3DecoderLayer):
    rotary_class = Qwen3RotaryEmbedding


class Qwen3FinalNorm(RopeFinalNorm):
    norm_class = Qwen3RMSNorm
