"""The GRPO recipe's loss: the clipped surrogate per answer token (+ kl_coef x KL as a loss term), and
how the tokens' losses are aggregated into a minibatch's loss (TRL's `loss_type` names).

Per token (TRL grpo_trainer._compute_loss, verl core_algos):
    l_t = -min(ratio_t A_t, clip(ratio_t, 1 - epsilon, 1 + epsilon_high) A_t) (+ kl_coef KL_t)
    ratio_t = exp(logp_t - logp_old_t), KL_t the estimator of kl_estimator ("k3": exp(ref - logp) - (ref - logp) - 1)

Aggregation over a minibatch (all its micro-batches and replicas), `loss_weights`:
    grpo          mean over the minibatch's rows of (sum of the row's l_t / |o_i|)   (the GRPO paper)
    bnpo, dapo    sum of l_t / the minibatch's answer tokens                          (DAPO; as SFT normalises)
    dr_grpo       sum of l_t / (the minibatch's rows x max_new_tokens)                (Dr. GRPO: a constant)
The recipe turns that into one weight per token (`loss_weights`), times grad_accum x D for DeepSpeed's
mean over micro-batches and replicas (trainer.batches.token_scale's rule), so the loss_fn is a weighted
sum and a minibatch's loss is the same however it is split. With mask_truncated_completions, a row that
hit max_new_tokens without a stop token has no loss tokens (TRL's rule: it still counts as a row for
grpo and dr_grpo, its tokens not for dapo).
"""
import torch

from trainer.losses import at_temperature, shifted_token_logps
from trainer.rl.ppo_math import kl_estimate

LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")
# sums over the update's loss tokens (the metrics divide by "tokens")
GRPO_STATS = ("tokens", "policy_loss", "kl", "entropy", "clip_low", "clip_high", "clip_region")


def loss_weights(loss_mask: torch.Tensor, loss_type: str, n_tokens: float, n_rows: float,
                 max_new_tokens: int) -> torch.Tensor:
    """float64[R,T]: each token's weight in its minibatch's loss (see the module docstring). loss_mask
    float[R,T]: 1 on the tokens that have a loss; n_tokens, n_rows: the whole minibatch's (every replica)
    loss tokens and rows."""
    m = loss_mask.double()
    if loss_type == "grpo":
        return m / m.sum(dim=1, keepdim=True).clamp(min=1.0) / max(n_rows, 1.0)
    if loss_type in ("bnpo", "dapo"):
        return m / max(n_tokens, 1.0)
    if loss_type == "dr_grpo":
        return m / (max(n_rows, 1.0) * max_new_tokens)
    raise ValueError(f"loss_type {loss_type!r}: use one of {list(LOSS_TYPES)}")


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, epsilon: float,
                      epsilon_high: float) -> tuple[torch.Tensor, dict]:
    """Per-token -min(ratio A, clip(ratio, 1 - epsilon, 1 + epsilon_high) A), float[R,T], and bool[R,T]
    masks of the tokens where the clip is active (TRL's clip_ratio/low_mean, high_mean, region_mean)."""
    ratio = torch.exp(logp - old_logp)
    loss = -torch.minimum(ratio * advantages, ratio.clamp(1.0 - epsilon, 1.0 + epsilon_high) * advantages)
    with torch.no_grad():
        low = (ratio < 1.0 - epsilon) & (advantages < 0)
        high = (ratio > 1.0 + epsilon_high) & (advantages > 0)
    return loss, {"clip_low": low, "clip_high": high, "clip_region": low | high}


class GRPOLoss:
    """The actor's loss_fn. labels: (tokens int64[b,S-1], weights float64[b,S-1] (loss_weights x
    grad_accum x D; 0 off the loss tokens), old log-probs float32[b,S-1], advantages float32[b,S-1],
    reference log-probs float32[b,S-1] (zeros without a KL loss term)). outputs: logits or the head's
    DeferredLogits (chunked_loss). Adds each micro-batch's sums (GRPO_STATS, over its loss tokens) to
    `stats`; the recipe takes them after the step."""

    def __init__(self, opts):
        self.opts = opts
        self.stats = torch.zeros(len(GRPO_STATS), dtype=torch.float64)

    def __call__(self, outputs, labels) -> torch.Tensor:
        tokens, weights, old_logp, advantages, ref_logp = labels
        opts = self.opts
        logp, entropy = shifted_token_logps(at_temperature(outputs, opts.logprob_temperature), tokens, with_entropy=True)
        device = logp.device
        weights, old_logp, advantages, ref_logp = (x.to(device) for x in (weights, old_logp, advantages, ref_logp))
        surrogate, clipped = clipped_surrogate(logp, old_logp, advantages, opts.epsilon, opts.epsilon_high_value)
        per_token = surrogate
        kl = None
        if opts.kl_in_loss:
            kl = kl_estimate(logp, ref_logp, opts.kl_estimator)
            per_token = per_token + opts.kl_coef * kl
        loss = (per_token.double() * weights).sum().to(per_token.dtype)
        with torch.no_grad():
            m = (weights > 0).double()
            sums = [m.sum(), (surrogate.double() * m).sum(), (kl.double() * m).sum() if kl is not None else m.new_zeros(()),
                    (entropy.double() * m).sum()] + [(clipped[k].double() * m).sum() for k in GRPO_STATS[4:]]
            self.stats += torch.stack(sums).cpu()
        return loss

    def take_stats(self) -> torch.Tensor:
        out, self.stats = self.stats, torch.zeros_like(self.stats)
        return out
