"""Stop before a non-finite loss or non-finite weights reach a checkpoint."""
import math

import torch

from trainer.engine.distributed import collective_device


class NonFiniteError(RuntimeError):
    """The loss or the weights hold NaN/inf: the run stops without saving (one error line)."""


def check_finite_loss(loss: float, step: int) -> None:
    if not math.isfinite(loss):
        raise NonFiniteError(
            f"step {step}: the training loss is {loss}; stopping without saving (the last good checkpoint is "
            f"the one save_path/latest names, if any). Lower the learning rate, check the data, or use bf16 instead of fp16"
        )


def check_finite_weights(module, step: int) -> None:
    """Collective: refuse to write a checkpoint whose weights hold NaN/inf on any rank."""
    bad = torch.zeros((), dtype=torch.float32, device=collective_device())
    for p in module.parameters():
        if not torch.isfinite(p.detach()).all():
            bad += 1
    torch.distributed.all_reduce(bad)
    if bad.item():
        raise NonFiniteError(f"step {step}: {int(bad.item())} parameter tensors hold NaN/inf; not saving this checkpoint "
                             "(the last good one is the one save_path/latest names, if any). Lower the learning rate or check the data")
