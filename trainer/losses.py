"""Loss functions for the last pipeline stage: `loss_fn(outputs, labels)` as DeepSpeed calls it.

Labels follow HF's convention: int64[B,T], unshifted, -100 where no loss is taken; the loss shifts
(logits at t predict the token at t+1).
"""
from typing import Optional

import torch
import torch.nn.functional as F

from models.heads import DeferredLogits


def shifted_token_losses(logits, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed fp32 cross-entropy over the target tokens, number of target tokens) of a micro-batch.
    logits float[B,T,V], or the head's DeferredLogits (then computed chunk by chunk, never [B,T,V]);
    labels int64[B,T] (unshifted)."""
    if isinstance(logits, DeferredLogits):
        return chunked_lm_head_loss_sum(logits.hidden, logits.weight, labels)
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:].to(shift_logits.device)
    total = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                            ignore_index=-100, reduction="sum")
    return total, (shift_labels != -100).sum()


def at_temperature(outputs, temperature: float):
    """An LM head's output (logits float[B,T,V] or DeferredLogits) as the logits divided by `temperature`
    (a DeferredLogits scales its hidden states: (h / T) W = (h W) / T, the chunked loss unchanged)."""
    if temperature == 1.0:
        return outputs
    if isinstance(outputs, DeferredLogits):
        return DeferredLogits(outputs.hidden / temperature, outputs.weight)
    return outputs / temperature


def global_token_mean_loss(logits: torch.Tensor, labels) -> torch.Tensor:
    """The training loss: this micro-batch's summed token cross-entropy times
    `token_scale` = grad_accum * D / N_global (see trainer.batches), so that DeepSpeed's averaging
    over micro-batches and data-parallel ranks yields the mean over the global batch's tokens.
    labels: (labels int64[B,T], token_scale float64 scalar)."""
    labels, token_scale = labels
    total, _ = shifted_token_losses(logits, labels)
    return total * token_scale.to(total.device, torch.float32)


def token_loss_sums(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """float64[2] on the CPU: (summed cross-entropy, target tokens) of a micro-batch; for evaluation."""
    total, count = shifted_token_losses(logits, labels)
    return torch.stack([total.double(), count.double()]).cpu()


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum over target rows of cross_entropy(hidden @ weight.T, labels), computed chunk by chunk of
    rows so that only `chunk` x V logits exist at a time; the backward recomputes each chunk's logits
    instead of keeping them. hidden float[N,H], weight float[V,H], labels int64[N] (-100: no loss).
    Logits and their softmax are fp32 whatever the input dtype (as `shifted_token_losses` does)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk: int):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            logits = (hidden[rows] @ weight.t()).float()  # [c, V]
            target = labels[rows]
            valid = target != -100
            picked = logits.gather(1, target.clamp(min=0).unsqueeze(1)).squeeze(1)
            total += ((torch.logsumexp(logits, dim=1) - picked) * valid).sum()
            del logits  # before the next chunk's matmul, or two chunks' logits are alive at once
        ctx.save_for_backward(hidden, weight, labels)
        ctx.chunk = chunk
        return total

    @staticmethod
    def backward(ctx, grad_total):
        hidden, weight, labels = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        for start in range(0, hidden.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            target = labels[rows]
            valid = (target != -100).unsqueeze(1)
            # d loss / d logits = softmax - onehot(target), zero on rows without a target; the
            # softmax is computed in place in the chunk's logits buffer (one [c, V] buffer at a time).
            grad = (hidden[rows] @ weight.t()).float()
            grad.sub_(grad.amax(dim=1, keepdim=True)).exp_()
            grad.div_(grad.sum(dim=1, keepdim=True))
            grad.scatter_add_(1, target.clamp(min=0).unsqueeze(1), -torch.ones_like(grad[:, :1]))
            grad.mul_(valid * grad_total)
            if grad_hidden is not None:
                grad_hidden[rows] = (grad @ weight.float()).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight.addmm_(grad.t(), hidden[rows].float())
            del grad  # before the next chunk's matmul
        return grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype), None, None


CHUNK_BYTES = 2**27  # fp32 logits per chunk: 128 MiB (133 tokens at BLOOM's 250,880 vocabulary)


def chunked_lm_head_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                             chunk_tokens: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`shifted_token_losses` without the [B,T,V] logits: the LM head's matmul and the cross-entropy
    run over chunks of `chunk_tokens` positions, the backward recomputing each chunk. hidden
    float[B,T,H] (the final norm's output), weight float[V,H] (the head's, or the tied embedding's),
    labels int64[B,T] unshifted. Returns (summed fp32 loss, number of target tokens). Peak memory of
    the loss: one chunk_tokens x V fp32 buffer (default: CHUNK_BYTES worth) and the weight's fp32
    gradient, instead of B x T x V logits, their log-softmax and gradients."""
    if chunk_tokens is None:
        chunk_tokens = max(1, CHUNK_BYTES // (4 * weight.shape[0]))
    shift_hidden = hidden[:, :-1, :].reshape(-1, hidden.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1).to(hidden.device)
    total = _ChunkedLinearCrossEntropy.apply(shift_hidden, weight, shift_labels, chunk_tokens)
    return total, (shift_labels != -100).sum()


class _ChunkedTokenLogpsEntropy(torch.autograd.Function):
    """Per-row log-prob of a target token and the entropy of the distribution, from hidden @ weight.T
    computed chunk by chunk of rows (only `chunk` x V logits at a time; the backward recomputes each
    chunk). hidden float[N,H], weight float[V,H], targets int64[N] (any id; callers mask what they do
    not use). Returns (logp float32[N], entropy float32[N]); both carry gradients:
        d logp_t / dz = onehot(t) - p,        d H / dz = -p * (log p + H)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int):
        ctx.set_materialize_grads(False)  # an unused output (e.g. the entropy) gets None: skipped below
        logp = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        entropy = torch.empty_like(logp)
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            log_probs = torch.log_softmax((hidden[rows] @ weight.t()).float(), dim=1)  # [c, V]
            logp[rows] = log_probs.gather(1, targets[rows].unsqueeze(1)).squeeze(1)
            entropy[rows] = -log_probs.exp().mul_(log_probs).sum(1)  # in place: two [c, V] buffers at most
            del log_probs  # before the next chunk's matmul
        ctx.save_for_backward(hidden, weight, targets, entropy)
        ctx.chunk = chunk
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, targets, entropy = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        for start in range(0, hidden.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            log_probs = torch.log_softmax((hidden[rows] @ weight.t()).float(), dim=1)
            probs = log_probs.exp()
            grad = torch.zeros_like(probs)
            if grad_entropy is not None:
                # -p (log p + H) * dH, reusing log_probs' buffer
                grad = log_probs.add_(entropy[rows].unsqueeze(1)).mul_(probs).mul_(-grad_entropy[rows].unsqueeze(1))
            if grad_logp is not None:
                g = grad_logp[rows].unsqueeze(1)
                grad.sub_(probs * g)
                grad.scatter_add_(1, targets[rows].unsqueeze(1), g)
            if grad_hidden is not None:
                grad_hidden[rows] = (grad @ weight.float()).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight.addmm_(grad.t(), hidden[rows].float())
            del log_probs, probs, grad  # before the next chunk's matmul
        return grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype), None, None


def shifted_token_logps(logits, tokens: torch.Tensor, with_entropy: bool = False, chunk_tokens: Optional[int] = None):
    """fp32 log-probs float32[B,T-1] of tokens int64[B,T-1] (column t: the token logits[:, t] predict,
    i.e. ids[:, t+1]); with_entropy: also the entropy of each of those distributions, float32[B,T-1].
    logits float[B,T,V], or the head's DeferredLogits: then the head's matmul runs chunk by chunk of
    positions (default CHUNK_BYTES of fp32 logits at a time) with the backward recomputing each chunk,
    so [B,T,V] never exists; the same values and gradients (fp32 rounding apart). Plain logits with no
    gradient to keep (forward-only scoring: a frozen reference, PPO's old log-probs) are converted to
    fp32 and normalised a chunk of positions at a time, so no fp32 [B,T,V] copy exists either; the
    values are the same as in one piece."""
    tokens = tokens.to(logits.hidden.device if isinstance(logits, DeferredLogits) else logits.device)
    if isinstance(logits, DeferredLogits):
        hidden, weight = logits.hidden[:, :-1, :], logits.weight
        if chunk_tokens is None:
            chunk_tokens = max(1, CHUNK_BYTES // (4 * weight.shape[0]))
        logp, entropy = _ChunkedTokenLogpsEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, tokens.reshape(-1),
                                                        chunk_tokens)
        logp, entropy = logp.view(tokens.shape), entropy.view(tokens.shape)
        return (logp, entropy) if with_entropy else logp
    if not (torch.is_grad_enabled() and logits.requires_grad):
        return _token_logps_without_grad(logits, tokens, with_entropy, chunk_tokens)
    log_probs = torch.log_softmax(logits[:, :-1, :].float(), dim=-1)
    logp = log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    if not with_entropy:
        return logp
    return logp, -(log_probs.exp() * log_probs).sum(-1)


@torch.no_grad()
def _token_logps_without_grad(logits: torch.Tensor, tokens: torch.Tensor, with_entropy: bool, chunk_tokens: Optional[int]):
    """shifted_token_logps of plain logits float[B,T,V] when nothing needs their gradient: each row's
    positions in chunks of chunk_tokens (default CHUNK_BYTES of fp32), so the fp32 log-softmax of at
    most one chunk exists at a time."""
    batch, length = tokens.shape
    vocab = logits.shape[-1]
    chunk = chunk_tokens or max(1, CHUNK_BYTES // (4 * vocab))
    logp = torch.empty(batch, length, dtype=torch.float32, device=logits.device)
    entropy = torch.empty_like(logp) if with_entropy else None
    for row in range(batch):
        for start in range(0, length, chunk):
            stop = min(start + chunk, length)
            log_probs = torch.log_softmax(logits[row, start:stop].float(), dim=-1)  # [chunk, V]
            logp[row, start:stop] = log_probs.gather(-1, tokens[row, start:stop].unsqueeze(-1)).squeeze(-1)
            if with_entropy:
                entropy[row, start:stop] = -log_probs.exp().mul_(log_probs).sum(-1)
            del log_probs  # before the next chunk's log-softmax
    return (logp, entropy) if with_entropy else logp
