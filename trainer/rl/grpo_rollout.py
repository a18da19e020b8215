"""GRPO's step between the generator and train_batch: the group-relative advantages from the rows' rewards
(trainer.rl.rewards.row_rewards: reward functions on decoded text and/or a reward model's score; the
prompts' records: trainer.rl.rollout.step_prompt_records), the loss weights, and what the actor's
loss_fn is fed.

Rows. A replica holds whole groups: prompt g's n_samples_per_prompt answers are rows g*G .. g*G+G-1 of
its Rollout (trainer.rl.rollout, trainer.generation.decoding.replica_share), so a group's rewards are
normalised where they were generated. Everything here runs on the last stage of each replica (where the
log-probs and the generator's outputs are), except the collectives, which every rank joins with zero
rows (trainer.rl.advantages' reduce_sum rule).
"""
from dataclasses import dataclass
from typing import Optional

import torch

from trainer.rl.advantages import ESTIMATORS, zero_std_groups
from trainer.rl.grpo_losses import loss_weights
from trainer.rl.ppo_math import kl_estimate


@dataclass
class GroupExperience:
    """A scored GRPO rollout on the last stage of its replica. Per token float32[R,S-1] (0 off the answer):
    old_logps (the training forward's, at the sampling temperature), ref_logps (zeros without a reference),
    kl (the estimate of kl_estimator, 0 without a reference), advantages, loss_mask (1 on the answer tokens
    that get a loss: not those of truncated answers with mask_truncated_completions, nor of groups with
    equal rewards with filter_zero_std_groups); per row: rewards float64[R], per_function float64[R,F], rm_scores float32[R] or None."""
    old_logps: torch.Tensor
    ref_logps: torch.Tensor
    kl: torch.Tensor
    rewards: torch.Tensor
    per_function: torch.Tensor
    rm_scores: Optional[torch.Tensor]
    advantages: torch.Tensor
    loss_mask: torch.Tensor


def make_experience(ro, old_logps: Optional[list], ref_logps: Optional[list], rewards, per_function, rm_scores,
                    opts, reduce_sum) -> Optional[GroupExperience]:
    """Collective (the estimator's batch sums): every rank calls it; off the last stage old_logps is None
    (zero rows go into the sums) and None is returned. The log-prob lists are forward_only's per-micro-batch
    tensors."""
    if old_logps is None:
        empty = torch.zeros(0, ro.answer.shape[1])
        ESTIMATORS[opts.advantage](torch.zeros(0), empty, empty, opts, reduce_sum)
        return None
    old = torch.cat(old_logps)
    ref = torch.cat(ref_logps) if ref_logps is not None else torch.zeros_like(old)
    kl = kl_estimate(old, ref, opts.kl_estimator) * ro.answer if ref_logps is not None else torch.zeros_like(old)
    kl_for_rewards = kl if opts.kl_in_reward else torch.zeros_like(kl)
    advantages = ESTIMATORS[opts.advantage](rewards, ro.answer, kl_for_rewards, opts, reduce_sum)
    keep = ro.ended | (not opts.mask_truncated_completions)
    if opts.filter_zero_std_groups:  # DAPO: groups without a reward signal leave the update
        keep = keep & ~zero_std_groups(rewards, opts.n_samples_per_prompt).repeat_interleave(opts.n_samples_per_prompt)
    return GroupExperience(old, ref, kl, rewards, per_function, rm_scores, advantages, ro.answer * keep[:, None].float())


def minibatch_weights(exp: GroupExperience, rows, opts, n_tokens: float, n_rows: float, accum_x_replicas: float):
    """float64[len(rows), S-1]: loss_weights of these rows x grad_accum x D (DeepSpeed's mean over
    micro-batches and replicas undone, as trainer.batches.token_scale)."""
    return loss_weights(exp.loss_mask[rows], opts.loss_type, n_tokens, n_rows, opts.max_new_tokens) * accum_x_replicas


def actor_batch(ro, exp: Optional[GroupExperience], rows, weights) -> tuple:
    """(ids, mask), (tokens, weights, old log-probs, advantages, reference log-probs): GRPOLoss's labels."""
    labels = None
    if exp is not None:
        labels = (ro.tokens[rows], weights, exp.old_logps[rows], exp.advantages[rows], exp.ref_logps[rows])
    return (ro.ids[rows], ro.mask[rows]), labels
