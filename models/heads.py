"""Heads for the last pipe layer. Swappable: the LM head for SFT/pretraining, a scalar value head
for reward models and the PPO critic. Keys match transformers' (`lm_head.weight`, `score.weight`).
"""
import contextlib
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class DeferredLogits(NamedTuple):
    """An LM head's output when its logits are left to the loss: the final norm's output
    float[B,T,H] and the head weight float[V,H] (the tied embedding's when tied). A loss computes
    the matmul chunk by chunk (trainer.losses.chunked_lm_head_loss_sum), so [B,T,V] never exists.
    Only returned while the head's `defer_logits` is set and gradients are enabled (training) or,
    inside `deferring_without_grad`, in forward-only scoring; otherwise (eval, generation) heads
    return logits."""
    hidden: torch.Tensor
    weight: torch.Tensor


def _non_leaf(weight: torch.Tensor) -> torch.Tensor:
    """A view of the weight with a grad_fn. Engines hook their backward prologue on the outputs that
    have one (DeepSpeed's BF16_Optimizer clears the 16-bit gradients there); a bare parameter in the
    output would get its gradient accumulated before that prologue ran, and then cleared."""
    return weight.view_as(weight)


def set_defer_logits(module: nn.Module, on: bool = True) -> int:
    """Make every LM head inside `module` (a PipelineModule's stage, or plain layers) defer its logits
    to the loss while training; a tied head reads the flag from its embedding module. Returns how
    many modules were set."""
    heads = _lm_heads(module)
    for head in heads:
        head.defer_logits = on
    return len(heads)


def _lm_heads(module: nn.Module) -> list:
    """The LM heads inside `module`, and the embedding modules a tied head reads its flags from."""
    return [sub for sub in module.modules() if isinstance(sub, LMHead) or hasattr(sub, "embedding_weight")]


@contextlib.contextmanager
def deferring_without_grad(module: nn.Module):
    """Within: every LM head in `module` defers its logits under no_grad too, for forward-only passes
    whose reducer takes DeferredLogits (log-probs chunk by chunk: no [B,T,V] logits, which the
    pipeline would otherwise keep for two micro-batches). Restores the heads' flags on exit."""
    heads = _lm_heads(module)
    saved = [(getattr(h, "defer_logits", False), getattr(h, "defer_without_grad", False)) for h in heads]
    for head in heads:
        head.defer_logits, head.defer_without_grad = True, True
    try:
        yield
    finally:
        for head, (defer, without_grad) in zip(heads, saved):
            head.defer_logits, head.defer_without_grad = defer, without_grad


def _defers(head) -> bool:
    return getattr(head, "defer_logits", False) and (torch.is_grad_enabled() or getattr(head, "defer_without_grad", False))


class LMHead(nn.Module):
    """hidden float[B,T,H] -> logits float[B,T,V]."""

    def __init__(self, config):
        super().__init__()
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    defer_logits = False
    defer_without_grad = False

    def forward(self, inputs: tuple):
        if _defers(self):
            return DeferredLogits(inputs[0], _non_leaf(self.lm_head.weight))
        return self.lm_head(inputs[0])


class ValueHead(nn.Module):
    """hidden float[B,T,H] -> values float[B,T]; same key as HF's *ForSequenceClassification
    (`score.weight`, num_labels=1), so an RM exports to that class directly."""

    def __init__(self, config):
        super().__init__()
        self.score = nn.Linear(config.hidden_size, 1, bias=False)

    def forward(self, inputs: tuple) -> torch.Tensor:
        return self.score(inputs[0]).squeeze(-1)


def tied_lm_head(embedding_module: nn.Module, inputs: tuple):
    """Forward of a tied LM head: DeepSpeed calls it with the stage's copy of the tied embedding
    module (TiedLayerSpec forward_fn). logits = hidden @ embedding_weight.T (or DeferredLogits)."""
    if _defers(embedding_module):
        return DeferredLogits(inputs[0], _non_leaf(embedding_module.embedding_weight))
    return F.linear(inputs[0], embedding_module.embedding_weight)


HEADS = {"lm": LMHead, "value": ValueHead}


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """int64[B]: index of each row's last real token (right or left padding alike). The score of a
    sequence is the value head's output there (the answer's EOS): the one rule shared by reward-model
    training, its evaluation, the HF export check and PPO scoring."""
    seq_len = attention_mask.shape[-1]
    return (seq_len - 1 - attention_mask.long().flip(-1).argmax(-1)).long()


def sequence_scores(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values float[B,T], index int64[B] -> float32[B] scores."""
    return values.float().gather(1, index.to(values.device).view(-1, 1)).squeeze(1)
