"""The pipe-layer list and the HF <-> pipe checkpoint mapping, for every registered architecture.

Pipe layers, in order (index i is the shard file `layer_{i:02d}-model_states.pt`):

    0           embedding        (input_ids, mask[, seg]) -> (hidden, mask[, seg])
    1 .. N      block i-1        (hidden, mask[, seg])    -> (hidden, mask[, seg])
    N + 1       final norm       (hidden, mask[, seg])    -> (hidden, mask[, seg])
    N + 2       head             (hidden, mask[, seg])    -> logits [B,T,V] | values [B,T]

See `models.stage_io` for the tensors' contract. The final norm and the head are separate layers:
with tied embeddings the head must be DeepSpeed's tied module itself (a `TiedLayerSpec` whose
forward_fn is `heads.tied_lm_head`), and a tied layer cannot also own the final norm's weights
without leaving them unsynchronised or unsaved across stages. Keeping them apart also lets `parts`
balance the head (a vocab x hidden matmul) like any other layer, and lets RM/PPO swap the head
(`head="value"`) without touching the norm.

With tied embeddings DeepSpeed's save_checkpoint writes no file for the head layer (the head is a
function of the embedding module), so the head's weight is read from layer 0.
"""
import copy
import functools
from dataclasses import dataclass
from typing import Optional

from torch import nn

from compat.private_api import attn_implementation

from .heads import HEADS, tied_lm_head
from .registry import Architecture, get_architecture
from .stage_io import resolve_attn_implementation

TIED_KEY = "embedding"
HEAD_KEYS = {"lm": (("lm_head.", "lm_head."),), "value": (("score.", "score."),)}


def prepare_config(config, attn_implementation: Optional[str] = None):
    """A copy of an HF config ready for pipe layers: attention implementation set explicitly
    (never None: see `stage_io.resolve_attn_implementation`), no KV cache in training."""
    arch = get_architecture(config.model_type)
    if arch.check_config is not None:
        arch.check_config(config)
    config = copy.deepcopy(config)
    resolve_attn_implementation(config, attn_implementation, arch.attn_implementations)
    config.use_cache = False
    return config


def is_tied(config) -> bool:
    arch = get_architecture(config.model_type)
    return bool(getattr(config, "tie_word_embeddings", arch.tied_by_default))


def num_blocks(config) -> int:
    return int(getattr(config, get_architecture(config.model_type).num_layers_attr))


def num_pipe_layers(config) -> int:
    return num_blocks(config) + 3


def pipe_layer_names(config, head: str = "lm") -> list[str]:
    """Human names of the pipe layers, index-aligned with the spec list and layer files."""
    return ["embedding"] + [f"block.{i}" for i in range(num_blocks(config))] + ["final_norm", f"{head}_head"]


def head_is_tied(config, head: str) -> bool:
    return head == "lm" and is_tied(config)


def build_layer_specs(config, head: str = "lm") -> list:
    """The DeepSpeed `LayerSpec`/`TiedLayerSpec` list for `PipelineModule(layers=...)`.

    `config` must come from `prepare_config` (attention implementation set)."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    _check_head(head)
    arch = get_architecture(config.model_type)
    _check_prepared(config)
    tied = head_is_tied(config, head)
    if is_tied(config):
        # The tied module is the embedding layer; only its embedding weight is shared.
        weight_attr = [_embedding_weight_attr(arch)]
        specs = [TiedLayerSpec(TIED_KEY, arch.embedding, config, tied_weight_attr=weight_attr)]
    else:
        specs = [LayerSpec(arch.embedding, config)]
    specs += [LayerSpec(arch.block, config, i) for i in range(num_blocks(config))]
    specs.append(LayerSpec(arch.final_norm, config))
    if tied:
        specs.append(TiedLayerSpec(TIED_KEY, arch.embedding, config, forward_fn=tied_lm_head, tied_weight_attr=weight_attr))
    else:
        specs.append(LayerSpec(HEADS[head], config))
    return specs


def build_layers(config, head: str = "lm") -> list:
    """The same pipe layers as plain modules/functions in one process (tests, inference, on-the-fly
    conversion): a tied head is `partial(tied_lm_head, embedding_module)`, as DeepSpeed builds it."""
    _check_head(head)
    arch = get_architecture(config.model_type)
    _check_prepared(config)
    embedding = arch.embedding(config)
    layers = [embedding] + [arch.block(config, i) for i in range(num_blocks(config))] + [arch.final_norm(config)]
    if head_is_tied(config, head):
        layers.append(functools.partial(tied_lm_head, embedding))
    else:
        layers.append(HEADS[head](config))
    return layers


class SequentialPipe(nn.Module):
    """Pipe layers run in sequence in one process: forward((input_ids, mask[, seg])) -> head output."""

    def __init__(self, layers: list):
        super().__init__()
        self.layers = layers
        self.modules_ = nn.ModuleList([layer for layer in layers if isinstance(layer, nn.Module)])

    def forward(self, inputs: tuple):
        x = inputs
        for layer in self.layers:
            x = layer(x)
        return x


def _embedding_weight_attr(arch: Architecture) -> str:
    return arch.embedding_keys[0][1] + "weight"


def _check_head(head: str) -> None:
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; use one of {sorted(HEADS)}")


def _check_prepared(config) -> None:
    if attn_implementation(config) is None:
        raise ValueError("config has no attention implementation set (attention would be non-causal): pass it through models.pipeline.prepare_config first")


# ---------------------------------------------------------------------------------------------
# Checkpoint key mapping (declarative, two-way).

@dataclass(frozen=True)
class LayerKeyRules:
    """For one pipe layer: (hf_prefix, pipe_prefix) pairs. An HF key belongs to the layer when it
    starts with an hf_prefix; its pipe key is the key with that prefix replaced by pipe_prefix."""

    index: int
    name: str
    rules: tuple[tuple[str, str], ...]
    file_expected: bool  # False for a tied head: DeepSpeed writes no file for it.


def layer_key_rules(config, head: str = "lm") -> list[LayerKeyRules]:
    arch = get_architecture(config.model_type)
    n = num_blocks(config)
    names = pipe_layer_names(config, head)
    out = [LayerKeyRules(0, names[0], arch.embedding_keys, True)]
    hf_block, pipe_block = arch.block_keys
    for i in range(n):
        out.append(LayerKeyRules(i + 1, names[i + 1], ((hf_block.format(i=i), pipe_block),), True))
    out.append(LayerKeyRules(n + 1, names[n + 1], arch.final_norm_keys, True))
    tied = head_is_tied(config, head)
    out.append(LayerKeyRules(n + 2, names[n + 2], () if tied else HEAD_KEYS[head], not tied))
    return out


def hf_key_to_pipe(rules: list[LayerKeyRules], hf_key: str) -> Optional[tuple[int, str]]:
    """HF key -> (pipe layer index, key inside that layer's state dict), or None if no layer owns it."""
    for layer in rules:
        for hf_prefix, pipe_prefix in layer.rules:
            if hf_key.startswith(hf_prefix):
                return layer.index, pipe_prefix + hf_key[len(hf_prefix):]
    return None


def pipe_key_to_hf(rules: list[LayerKeyRules], index: int, pipe_key: str) -> str:
    """Inverse of `hf_key_to_pipe`."""
    for hf_prefix, pipe_prefix in rules[index].rules:
        if pipe_key.startswith(pipe_prefix):
            return hf_prefix + pipe_key[len(pipe_prefix):]
    raise KeyError(f"pipe layer {index} ({rules[index].name}) has no rule for key {pipe_key!r}")


def tied_head_hf_key(config) -> str:
    """HF name of the LM head weight, which a tied checkpoint may omit."""
    return HEAD_KEYS["lm"][0][0] + "weight"


def normalise_hf_keys(config, keys: list[str]) -> dict[str, str]:
    """Map checkpoint keys to canonical HF keys: add the base-model prefix when a checkpoint was
    saved from the bare base model (e.g. bigscience/bloom has `h.0...` not `transformer.h.0...`)."""
    arch = get_architecture(config.model_type)
    head_prefixes = tuple(p for rules in HEAD_KEYS.values() for p, _ in rules)
    if any(k.startswith(arch.base_prefix) for k in keys):
        return {k: k for k in keys}
    return {k: (k if k.startswith(head_prefixes) else arch.base_prefix + k) for k in keys}


def is_ignored_hf_key(config, hf_key: str) -> bool:
    arch = get_architecture(config.model_type)
    return hf_key.endswith(arch.ignored_hf_key_suffixes) if arch.ignored_hf_key_suffixes else False
