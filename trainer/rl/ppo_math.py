"""PPO's math as small pure functions (InstructGPT step 3), for the PPO recipe.

Shapes: B rollout rows, T answer positions (the generated tokens, right-padded), `mask` float[B,T]
1 on real answer tokens. Log-probs are of the sampled tokens, fp32. Conventions and defaults follow
DeepSpeed-Chat's `dschat/rlhf/ppo_trainer.py` (kl_coef 0.1, reward clip 5, clip ranges 0.2, gamma
1, lambda 0.95) with TRL's names for the KL estimators and whitening:

    r_t   = -kl_coef * KL_t  (+ clip(score, +-reward_clip) at the last answer token)
    A_t   = GAE over the answer: delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lambda A_{t+1}
    R_t   = A_t + V_t
    actor = masked mean of max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)), ratio = exp(logp - logp_old)
    critic = 0.5 masked mean of max((V - R)^2, (clip(V, V_old +- eps_v) - R)^2)

"Masked mean" here is a sum over the answer tokens divided by `n_tokens`: the caller passes the token
count of the whole minibatch (all micro-batches, all data-parallel ranks) so that a minibatch's loss
is the mean over its answer tokens however it is split, as SFT normalises (trainer.batches).
"""
from typing import Optional

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")
# As a loss term (the KL's gradient taken through logp on tokens sampled from the policy), in expectation:
# k1 gives 0 (useless), k2 the gradient of KL(pi || ref), k3 that of KL(ref || pi) (verl's core_algos,
# tests/test_ppo_math.py checks all three exactly on a small categorical). In the reward any of them works.
KL_LOSS_ESTIMATORS = ("k2", "k3")


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum()


def masked_mean(values: torch.Tensor, mask: torch.Tensor, n_tokens: Optional[float] = None) -> torch.Tensor:
    """sum(values * mask) / n_tokens (default: mask.sum(), at least 1)."""
    denominator = mask.sum().clamp(min=1) if n_tokens is None else n_tokens
    return masked_sum(values, mask) / denominator


def kl_estimate(logp: torch.Tensor, logp_ref: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from the log-probs [B,T] of tokens sampled from
    the policy (Schulman, "Approximating KL divergence"), with d = logp - logp_ref:
    k1 = d (unbiased, negative on some tokens), k2 = d^2 / 2 (biased, low variance),
    k3 = exp(-d) - 1 + d (unbiased and >= 0)."""
    d = logp - logp_ref
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d.pow(2)
    if estimator == "k3":
        return torch.expm1(-d) + d
    raise ValueError(f"kl estimator {estimator!r}: use one of {list(KL_ESTIMATORS)}")


def last_token_positions(mask: torch.Tensor) -> torch.Tensor:
    """int64[B]: index of each row's last answer token (rows with no answer token: 0)."""
    t = mask.shape[1]
    idx = torch.arange(t, device=mask.device).expand_as(mask)
    return torch.where(mask > 0, idx, torch.zeros_like(idx)).max(dim=1).values


def token_rewards(kl: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, kl_coef: float, reward_clip: float,
                  ended: Optional[torch.Tensor] = None, missing_eos_penalty: Optional[float] = None) -> torch.Tensor:
    """float[B,T]: -kl_coef * kl on answer tokens, plus the RM score clipped to +-reward_clip, then minus
    `missing_eos_penalty` for rows that did not end with EOS (hit max_new_tokens), at each row's last
    answer token. scores float[B]; ended bool[B] (True: the answer ended with EOS)."""
    rewards = -kl_coef * kl * mask
    score = scores.float().clamp(-reward_clip, reward_clip)
    if missing_eos_penalty is not None and ended is not None:  # after the clip: a truncated answer always pays it
        score = score - missing_eos_penalty * (~ended).float()
    rows = torch.arange(mask.shape[0], device=mask.device)
    last = last_token_positions(mask)
    has_answer = mask.sum(dim=1) > 0
    return rewards.index_put((rows[has_answer], last[has_answer]), score[has_answer], accumulate=True)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the answer tokens, from the last one backwards; the
    value after a row's last answer token is 0 (the episode ends). Returns (advantages, returns)
    float[B,T], zero outside the mask."""
    rewards, values, mask = rewards.float(), values.float(), mask.float()
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(rewards[:, 0])
    for t in range(rewards.shape[1] - 1, -1, -1):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * m
        advantages[:, t] = running
        next_value = values[:, t] * m  # a pad position passes 0 on to the token before it
    returns = (advantages + values) * mask
    return advantages, returns


def policy_loss(logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_range: float = 0.2, n_tokens: Optional[float] = None) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate; returns (loss, stats) with stats clip_frac (the share of tokens whose clip is
    active: ratio past 1 +- clip_range in the direction the advantage pushes it, so their gradient is
    zero) and approx_kl as detached masked means over the same tokens. approx_kl estimates KL(old || new) from tokens sampled from
    the old policy: k3 = r - 1 - log r (>= 0, unbiased; Schulman's estimator with r = new / old)."""
    log_ratio = logp - logp_old
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask, n_tokens)
    with torch.no_grad():
        # where the clip is active (the clipped term is the larger: no gradient), TRL's clip_ratio
        active = ((ratio < 1.0 - clip_range) & (advantages < 0)) | ((ratio > 1.0 + clip_range) & (advantages > 0))
        stats = {"clip_frac": masked_mean(active.float(), mask, n_tokens),
                 "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask, n_tokens)}
    return loss, stats


def value_loss(values: torch.Tensor, values_old: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               value_clip: float = 0.2, n_tokens: Optional[float] = None) -> torch.Tensor:
    """0.5 * masked mean of max((V - R)^2, (clip(V, V_old +- value_clip) - R)^2)."""
    clipped = values_old + (values - values_old).clamp(-value_clip, value_clip)
    return 0.5 * masked_mean(torch.maximum((values - returns).pow(2), (clipped - returns).pow(2)), mask, n_tokens)
