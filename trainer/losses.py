"""Loss functions for the last pipeline stage: `loss_fn(outputs, labels)` as DeepSpeed calls it.

Labels follow HF's convention: int64[B,T], unshifted, -100 where no loss is taken; the loss shifts
(logits at t predict the token at t+1).
"""
import torch
import torch.nn.functional as F


def shifted_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed fp32 cross-entropy over the target tokens, number of target tokens) of a micro-batch.
    logits float[B,T,V], labels int64[B,T] (unshifted)."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:].to(shift_logits.device)
    total = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                            ignore_index=-100, reduction="sum")
    return total, (shift_labels != -100).sum()


def causal_lm_loss(logits: torch.Tensor, labels) -> torch.Tensor:
    """Mean cross-entropy over this micro-batch's target tokens (HF's per-batch loss).
    logits float[B,T,V], labels int64[B,T] (or a tuple whose first item is labels)."""
    if isinstance(labels, (tuple, list)):
        labels = labels[0]
    total, count = shifted_token_losses(logits, labels)
    return total / count


def global_token_mean_loss(logits: torch.Tensor, labels) -> torch.Tensor:
    """The training loss: this micro-batch's summed token cross-entropy times
    `loss_scale` = grad_accum * D / N_global (see trainer.batches), so that DeepSpeed's averaging
    over micro-batches and data-parallel ranks yields the mean over the global batch's tokens.
    labels: (labels int64[B,T], loss_scale float64 scalar)."""
    labels, loss_scale = labels
    total, _ = shifted_token_losses(logits, labels)
    return total * loss_scale.to(total.device, torch.float32)


def token_loss_sums(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """float64[2] on the CPU: (summed cross-entropy, target tokens) of a micro-batch; for evaluation."""
    total, count = shifted_token_losses(logits, labels)
    return torch.stack([total.double(), count.double()]).cpu()
