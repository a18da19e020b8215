"""Architectures as data, keyed by HF `config.model_type`.

Each entry names the layer classes and the declarative HF <-> pipe key rules; `models.pipeline`
turns these into the pipe-layer list and the two-way checkpoint mapping. Adding an architecture
means adding one entry here and one module of layer classes.
"""
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Architecture:
    model_type: str
    # Layer classes: embedding(config), block(config, layer_idx), final_norm(config).
    embedding: type
    block: type
    final_norm: type
    # HF key prefix -> pipe key prefix, per pipe-layer kind. "{i}" is the block index.
    embedding_keys: tuple[tuple[str, str], ...]
    block_keys: tuple[str, str]
    final_norm_keys: tuple[tuple[str, str], ...]
    # HF's base-model prefix: checkpoints saved from the bare base model (e.g. bigscience/bloom)
    # lack it, and get it added on read.
    base_prefix: str
    # Attention implementations that work for this architecture, default first.
    attn_implementations: tuple[str, ...]
    # HF keys that are derived buffers, never weights (e.g. old LLaMA's rotary inv_freq).
    ignored_hf_key_suffixes: tuple[str, ...] = ()
    # `config.tie_word_embeddings` default when a config omits it.
    tied_by_default: bool = False
    # Number of attention heads / hidden size accessors differ across configs.
    num_layers_attr: str = "num_hidden_layers"
    # (config, attn_implementation, seq_len) -> floating elements one block saves for backward per
    # token (models.activation_memory); None: unknown (memory estimates then leave activations out).
    block_activation_elements: Callable = None
    # transformers' class-name prefix: exports name `<prefix>ForCausalLM` / `<prefix>ForSequenceClassification`,
    # unless hf_class_names names a head's class ((head, class name) pairs).
    hf_class_prefix: str = ""
    hf_class_names: tuple[tuple[str, str], ...] = ()
    # config -> None, raising ValueError (naming the config.json key) for settings the layers do not implement.
    check_config: Callable = None


def _rope_decoder(model_type: str, module: str, prefix: str, activations: str = "llama_block_elements", **extra) -> Architecture:
    """LLaMA and the families built like it (transformers' own decoder layer + RoPE + RMSNorm):
    the same key layout (`model.embed_tokens`, `model.layers.{i}`, `model.norm`, `lm_head`)."""
    import importlib

    from . import activation_memory

    layers = importlib.import_module(f"{__package__}.{module}")
    return Architecture(
        model_type=model_type,
        embedding=getattr(layers, f"{prefix}Embedding"),
        block=getattr(layers, f"{prefix}PipeBlock"),
        final_norm=getattr(layers, f"{prefix}FinalNorm"),
        embedding_keys=(("model.embed_tokens.", "embed_tokens."),),
        block_keys=("model.layers.{i}.", ""),
        final_norm_keys=(("model.norm.", "norm."),),
        base_prefix="model.",
        attn_implementations=("sdpa", "eager", "flash_attention_2"),
        ignored_hf_key_suffixes=(".rotary_emb.inv_freq",),
        block_activation_elements=getattr(activation_memory, activations),
        hf_class_prefix=prefix,
        **extra,
    )


def _llama() -> Architecture:
    """LLaMA 1/2/3.x (Llama 3.1+'s `rope_type: "llama3"` is read by HF's rotary module)."""
    return _rope_decoder("llama", "llama", "Llama")


def _qwen2() -> Architecture:
    """Qwen2 / Qwen2.5: q/k/v biases; sliding-window layers where `use_sliding_window` is set."""
    return _rope_decoder("qwen2", "qwen2", "Qwen2")


def _qwen3() -> Architecture:
    """Qwen3 dense: q_norm/k_norm over head_dim before RoPE, explicit head_dim."""
    return _rope_decoder("qwen3", "qwen3", "Qwen3", "qwen3_block_elements")


def _mistral() -> Architecture:
    """Mistral: the LLaMA block; `sliding_window` (v0.1) makes every layer sliding."""
    return _rope_decoder("mistral", "mistral", "Mistral")


def _gemma3_text() -> Architecture:
    """Gemma 3 text (1B): GeGLU, (1 + w) norms, scaled embeddings, q/k norms, sliding/full layers with
    two RoPE bases; tied head."""
    from . import gemma3

    return _rope_decoder("gemma3_text", "gemma3", "Gemma3", "gemma3_block_elements", tied_by_default=True,
                         hf_class_names=(("value", "Gemma3TextForSequenceClassification"),),
                         check_config=gemma3.check_config)


def _bloom() -> Architecture:
    from . import activation_memory, bloom

    return Architecture(
        model_type="bloom",
        embedding=bloom.BloomEmbedding,
        block=bloom.BloomPipeBlock,
        final_norm=bloom.BloomFinalNorm,
        embedding_keys=(
            ("transformer.word_embeddings.", "word_embeddings."),
            ("transformer.word_embeddings_layernorm.", "word_embeddings_layernorm."),
        ),
        block_keys=("transformer.h.{i}.", ""),
        final_norm_keys=(("transformer.ln_f.", "ln_f."),),
        base_prefix="transformer.",
        attn_implementations=("eager",),
        tied_by_default=True,
        block_activation_elements=activation_memory.bloom_block_elements,
        hf_class_prefix="Bloom",
    )


_REGISTRY: dict[str, Callable[[], Architecture]] = {
    "llama": _llama, "qwen2": _qwen2, "qwen3": _qwen3, "mistral": _mistral, "gemma3_text": _gemma3_text, "bloom": _bloom,
}
SUPPORTED_MODEL_TYPES = tuple(sorted(_REGISTRY))


class UnsupportedModelError(ValueError):
    pass


def get_architecture(model_type: str) -> Architecture:
    try:
        return _REGISTRY[model_type]()
    except KeyError:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)} "
            "(the model_type key of the model's config.json)"
        ) from None
