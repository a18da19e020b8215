"""Heads for the last pipe layer. Swappable: the LM head for SFT/pretraining, a scalar value head
for reward models and the PPO critic. Keys match transformers' (`lm_head.weight`, `score.weight`).
"""
import torch
from torch import nn
import torch.nn.functional as F


class LMHead(nn.Module):
    """hidden float[B,T,H] -> logits float[B,T,V]."""

    def __init__(self, config):
        super().__init__()
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, inputs: tuple) -> torch.Tensor:
        return self.lm_head(inputs[0])


class ValueHead(nn.Module):
    """hidden float[B,T,H] -> values float[B,T]; same key as HF's *ForSequenceClassification
    (`score.weight`, num_labels=1), so an RM exports to that class directly."""

    def __init__(self, config):
        super().__init__()
        self.score = nn.Linear(config.hidden_size, 1, bias=False)

    def forward(self, inputs: tuple) -> torch.Tensor:
        return self.score(inputs[0]).squeeze(-1)


def tied_lm_head(embedding_module: nn.Module, inputs: tuple) -> torch.Tensor:
    """Forward of a tied LM head: DeepSpeed calls it with the stage's copy of the tied embedding
    module (TiedLayerSpec forward_fn). logits = hidden @ embedding_weight.T."""
    return F.linear(inputs[0], embedding_module.embedding_weight)


HEADS = {"lm": LMHead, "value": ValueHead}
