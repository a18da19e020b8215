"""GRPO's step between the generator and train_batch: the prompts' records, the rows' rewards (reward
functions on decoded text and/or a reward model's score), the group-relative advantages, the loss
weights, and what the actor's loss_fn is fed.

Rows. A replica holds whole groups: prompt g's n_samples_per_prompt answers are rows g*G .. g*G+G-1 of
its Rollout (trainer.rl.rollout, trainer.generation.decoding.replica_share), so a group's rewards are
normalised where they were generated. Everything here runs on the last stage of each replica (where the
log-probs and the generator's outputs are), except the collectives, which every rank joins with zero
rows (trainer.rl.advantages' reduce_sum rule).
"""
from dataclasses import dataclass
from typing import Optional

import torch

from trainer.engine.distributed import broadcast_object
from trainer.generation.token_sampling import row_seed, row_seeds
from trainer.rl.advantages import ESTIMATORS, zero_std_groups
from trainer.rl.grpo_losses import loss_weights
from trainer.rl.ppo_math import kl_estimate
from trainer.rl.rewards import RewardError, call_reward_functions, weighted_sum
from trainer.rl.rollout import prompt_ids


def step_prompt_records(sampler, dataset, n_prompts: int, n_samples: int, seed: int, step: int,
                        round_: int = 0) -> tuple[list, list, list]:
    """Collective: (prompt token ids, one sampling seed, the prompt's record) per row, the same global lists
    on every rank (rank 0 chooses: trainer.rl.rollout.step_prompts' rule). Each prompt n_samples times in
    a row; a record is {"prompt": as the data gave it, **its other fields} (data.batching.PromptDataset.record).
    round_: the step's generation round (trainer.rl.dynamic_sampling); the seeds depend on (seed, step,
    round_), so a prompt drawn again in a later round of the step gets other answers."""
    chosen = None
    if sampler is not None:
        picked = sampler.take(n_prompts)
        chosen = ([prompt_ids(dataset, i) for i in picked for _ in range(n_samples)],
                  [dataset.record(i) for i in picked for _ in range(n_samples)])
    prompts, records = broadcast_object(chosen)
    base = seed * 1_000_003 + step
    return prompts, row_seeds(base if round_ == 0 else row_seed(base, [round_]), prompts), records


def completions_of(ro, prompt_width: int) -> list[list[int]]:
    """Each row's answer token ids (stop token included), from column prompt_width of the rollout."""
    return [ro.ids[r, prompt_width:prompt_width + int(n)].tolist() for r, n in enumerate(ro.n_new)]


def row_rewards(ro, records: list, rm_scores: Optional[torch.Tensor], funcs: list, tokenizer, prompt_width: int,
                rm_weight: float, timeout_s: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """This replica's rows -> (rewards float64[R], each function's rewards float64[R,F] (NaN: None)).
    Reward functions get the prompts as the records gave them (else the decoded prompt), the answers
    decoded without special tokens, every other record field as a column, and completion_ids. RewardError
    names the function and the sample; a function's call may take at most timeout_s seconds (None: no limit)."""
    ids = completions_of(ro, prompt_width)
    completions = tokenizer.batch_decode(ids, skip_special_tokens=True)
    prompts = [rec.get("prompt") if rec.get("prompt") is not None else
               tokenizer.decode(ro.ids[r, :prompt_width][ro.mask[r, :prompt_width].bool()], skip_special_tokens=True)
               for r, rec in enumerate(records)]
    names = sorted({k for rec in records for k in rec} - {"prompt"})
    columns = {k: [rec.get(k) for rec in records] for k in names}
    if "completion_ids" in columns:
        raise RewardError("a prompt record has a field 'completion_ids': the name is the answers' token ids "
                          "(TRL's); rename the field")
    per_function = call_reward_functions(funcs, prompts, completions, {**columns, "completion_ids": ids}, timeout_s) if funcs \
        else torch.zeros(len(ids), 0, dtype=torch.float64)
    rewards = weighted_sum(per_function, [w for _, _, w in funcs])
    if rm_scores is not None:
        rewards = rewards + rm_weight * rm_scores.double()
    return rewards, per_function


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
