"""Mistral pipe layers: the LLaMA machinery (`models.llama`) over transformers' own `MistralDecoderLayer`
(keys equal HF's minus `model.layers.{i}.`).
Mistral: the LLaMA block; v0.1's `sliding_window` makes every layer a sliding-window layer.
"""
from transformers.models.mistral.modeling_mistral import MistralDecoderLayer, MistralRMSNorm, MistralRotaryEmbedding

from .llama import RopeEmbedding, RopeFinalNorm, RopePipeBlock

MistralEmbedding = RopeEmbedding


class MistralPipeBlock(RopePipeBlock, MistralDecoderLayer):
    rotary_class = MistralRotaryEmbedding


class MistralFinalNorm(RopeFinalNorm):
    norm_class = MistralRMSNorm
