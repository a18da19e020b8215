"""Critic-free advantage estimators (the GRPO family), registered by name: `ESTIMATORS[name]`.

Every estimator is a pure function of one replica's rows, which hold whole groups (a prompt's G samples
in G consecutive rows: trainer.generation.decoding.replica_share places them so):

    estimator(scores float[R], answer float[R,T], kl float[R,T], opts, reduce_sum) -> advantages float[R,T]

scores: each row's reward (weighted reward functions and/or the reward model's score); answer: 1 on the
row's answer tokens (the shifted layout of trainer.rl.rollout); kl: the per-token KL estimate (used only
by the reinforce++ estimators, which put -kl_coef * KL_t in the token rewards); opts: a GRPOOptions (or
anything with n_samples_per_prompt, scale_rewards, kl_coef). reduce_sum(float64 tensor) sums a tensor over
every replica (trainer.engine.distributed.all_reduce_sum; `local_sum` in one process) and is called the
same number of times whatever the data, so ranks off the last stage call the estimator with zero rows
and take part in the sums (as trainer.rl.ppo_metrics does).

Formulas (G samples per prompt; sources: verl verl/trainer/ppo/core_algos.py, TRL
trl/trainer/grpo_trainer.py, OpenRLHF; /work/shared/DESIGN.md section 10):

    grpo                  A_i = (r_i - mean_G r) / (std_G r + EPS)      scale_rewards "group" (TRL's default)
                          A_i = (r_i - mean_G r) / (std_batch r + EPS)  scale_rewards "batch" (TRL)
                          A_i = r_i - mean_G r                          scale_rewards "none"
                          std unbiased (torch.std, as TRL and verl); EPS = 1e-4 (TRL's; verl 1e-6)
    dr_grpo               A_i = r_i - mean_G r (Dr. GRPO: no std; = grpo with scale_rewards "none")
    rloo                  A_i = r_i - mean of the other G-1 = G/(G-1) (r_i - mean_G r)  (verl)
    reinforce++           r_t = -kl_coef KL_t, + r_i at the last answer token; A_t = sum_{t'>=t} r_t'
                          (gamma 1), whitened over every answer token of the batch (verl's masked_whiten:
                          unbiased variance, rsqrt(var + 1e-8))
    reinforce++_baseline  (sum_t r_t) - its group mean, the same for every answer token, whitened over the
                          batch's answer tokens (verl compute_reinforce_plus_plus_baseline_outcome_advantage)

A token's advantage is the same for every answer token of a row for grpo, dr_grpo and rloo; they are
zero outside the answer.
"""
from typing import Callable

import torch

EPS = 1e-4            # TRL's epsilon in (r - mean) / (std + eps)
WHITEN_EPS = 1e-8     # verl's masked_whiten: rsqrt(var + 1e-8)
SCALE_REWARDS = ("group", "batch", "none")
ESTIMATORS: dict = {}
# estimators that put the KL in the token rewards (the others use it as a loss term)
KL_IN_REWARD = ("reinforce++", "reinforce++_baseline")


def register(name: str):
    def add(fn: Callable) -> Callable:
        ESTIMATORS[name] = fn
        return fn
    return add


def local_sum(t: torch.Tensor) -> torch.Tensor:
    """reduce_sum of one process (no other replica)."""
    return t


def group_view(scores: torch.Tensor, group: int) -> torch.Tensor:
    """float[R] -> float64[R/G, G]: a row per prompt (its G samples are consecutive rows)."""
    assert scores.shape[0] % group == 0, (scores.shape, group)
    return scores.double().reshape(-1, group)


def centred(scores: torch.Tensor, group: int) -> torch.Tensor:
    """r_i - mean_G r, float64[R]."""
    g = group_view(scores, group)
    return (g - g.mean(dim=1, keepdim=True)).reshape(-1)


def group_std(scores: torch.Tensor, group: int) -> torch.Tensor:
    """The unbiased std of each row's group, float64[R]."""
    g = group_view(scores, group)
    if g.numel() == 0:  # a stage without the rollout's rows (it only joins the batch sums): no 0/0 warning
        return g.reshape(-1)
    return g.std(dim=1, keepdim=True).expand_as(g).reshape(-1)


def batch_std(scores: torch.Tensor, reduce_sum) -> float:
    """The unbiased std of every row's score over all replicas (TRL's rewards.std() of the global batch)."""
    s = scores.double()
    n, total, sq = reduce_sum(torch.stack([torch.tensor(float(s.numel()), dtype=torch.float64), s.sum(),
                                           s.pow(2).sum()])).tolist()
    if n < 2:
        return 0.0
    return max((sq - total * total / n) / (n - 1), 0.0) ** 0.5


def per_token(row_values: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    """float[R] -> float32[R,T]: each row's value on its answer tokens, 0 elsewhere."""
    return (row_values.double()[:, None] * answer.double()).float()


def whiten(values: torch.Tensor, answer: torch.Tensor, reduce_sum) -> torch.Tensor:
    """(v - mean) * rsqrt(var + 1e-8) over every answer token of all replicas, unbiased variance (verl's
    masked_whiten); 0 outside the answer."""
    v, m = values.double(), answer.double()
    n, total, sq = reduce_sum(torch.stack([m.sum(), (v * m).sum(), (v * v * m).sum()])).tolist()
    mean = total / max(n, 1.0)
    var = (sq - n * mean * mean) / (n - 1) if n > 1 else 0.0
    return ((v - mean) / (max(var, 0.0) + WHITEN_EPS) ** 0.5 * m).float()


@register("grpo")
def grpo(scores, answer, kl, opts, reduce_sum=local_sum) -> torch.Tensor:
    group = opts.n_samples_per_prompt
    scale = opts.scale_rewards or "group"
    if scale == "batch":
        std = batch_std(scores, reduce_sum)
        return per_token(centred(scores, group) / (std + EPS), answer)
    if scale == "group":
        return per_token(centred(scores, group) / (group_std(scores, group) + EPS), answer)
    return per_token(centred(scores, group), answer)


@register("dr_grpo")
def dr_grpo(scores, answer, kl, opts, reduce_sum=local_sum) -> torch.Tensor:
    return per_token(centred(scores, opts.n_samples_per_prompt), answer)


@register("rloo")
def rloo(scores, answer, kl, opts, reduce_sum=local_sum) -> torch.Tensor:
    g = opts.n_samples_per_prompt
    return per_token(centred(scores, g) * (g / (g - 1)), answer)


def token_rewards(scores, answer, kl, kl_coef: float) -> torch.Tensor:
    """float64[R,T]: -kl_coef KL_t on answer tokens, + the row's score at its last answer token."""
    rewards = -kl_coef * kl.double() * answer.double()
    cols = torch.arange(answer.shape[1]).expand_as(answer)
    last = torch.where(answer > 0, cols, torch.full_like(cols, -1)).max(dim=1).values
    rows = torch.nonzero(last >= 0).flatten()
    rewards[rows, last[rows]] += scores.double()[rows]
    return rewards


@register("reinforce++")
def reinforce_pp(scores, answer, kl, opts, reduce_sum=local_sum) -> torch.Tensor:
    rewards = token_rewards(scores, answer, kl, opts.kl_coef)
    returns = rewards.flip(1).cumsum(1).flip(1) * answer.double()  # gamma 1: the sum to the end of the answer
    return whiten(returns, answer, reduce_sum)


@register("reinforce++_baseline")
def reinforce_pp_baseline(scores, answer, kl, opts, reduce_sum=local_sum) -> torch.Tensor:
    totals = token_rewards(scores, answer, kl, opts.kl_coef).sum(1)
    return whiten(per_token(centred(totals, opts.n_samples_per_prompt), answer), answer, reduce_sum)


def zero_std_groups(scores: torch.Tensor, group: int) -> torch.Tensor:
    """bool[R/G]: the groups whose rewards are all equal (their grpo/dr_grpo/rloo advantages are 0)."""
    g = group_view(scores, group)
    return (g.max(dim=1).values - g.min(dim=1).values) == 0
