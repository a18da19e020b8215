"""A pipelined forward-only pass that returns every micro-batch's result on the last stage.

DeepSpeed's `eval_batch` runs the inference schedule over several micro-batches but returns only
the last micro-batch's output (or the mean of the losses). Here the module's `loss_fn` is swapped
for the duration of one call by a collector that keeps `reduce(output, labels)` of each micro-batch
(e.g. the summed token loss and its count, or one score per row), so nothing as large as the logits
is kept. The engine's own monitor event for eval_batch (a zero here) is not written.
"""
import contextlib
from typing import Callable, Optional

import torch

from models.heads import DeferredLogits, deferring_without_grad


@contextlib.contextmanager
def _monitor_paused(engine):
    monitor = getattr(engine, "monitor", None)
    enabled = getattr(monitor, "enabled", False)
    if monitor is not None:
        monitor.enabled = False
    try:
        yield
    finally:
        if monitor is not None:
            monitor.enabled = enabled


def forward_only(engine, micro_batches: Optional[list], n_micro: int, reduce: Callable,
                 deferred_logits: bool = False) -> Optional[list]:
    """Collective over every rank of the engine. `micro_batches`: [(inputs, labels)] * n_micro on the
    data stages (first and last), None elsewhere. Returns [reduce(output, labels) per micro-batch] on
    the last stage, None on the other stages. No gradients; dropout off (eval mode). deferred_logits:
    an LM head hands `reduce` DeferredLogits (models.heads) instead of [B,T,V] logits."""
    collected = []

    def collect(outputs, labels):
        collected.append(reduce(outputs, labels))
        device = outputs.hidden.device if isinstance(outputs, DeferredLogits) else outputs.device
        return torch.zeros((), dtype=torch.float32, device=device)

    module = engine.module
    training_loss_fn = module.loss_fn
    module.loss_fn = collect
    try:
        with _monitor_paused(engine), (deferring_without_grad(module) if deferred_logits else contextlib.nullcontext()):
            engine.eval_batch(data_iter=iter(micro_batches) if micro_batches is not None else None,
                              num_micro_batches=n_micro, bcast_loss=False)
    finally:
        module.loss_fn = training_loss_fn
    return collected if engine.is_last_stage() else None
