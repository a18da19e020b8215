"""GRPO's step metrics, TRL's GRPO names under GRPO/: sums on the last stage of each replica (zeros
elsewhere), all-reduced over every rank, then means.

    GRPO/reward_mean, GRPO/reward_std (TRL's: the mean over groups of each group's std),
    GRPO/rewards/<function>/mean (over the rows it applied to), GRPO/rm_score_mean (the reward model's raw
    score, with reward_path), GRPO/frac_reward_zero_std (groups whose rewards are all equal: no signal; with
    grpo.max_refill_rounds those of the step's first generation round, as without refill),
    GRPO/kl (the rollout's KL estimate per answer token, kl_estimator, old vs reference log-probs; 0
    without a reference), GRPO/loss (the actor's loss as train_batch returned it), GRPO/policy_loss (the
    clipped surrogate's token mean), GRPO/entropy, GRPO/clip_ratio/low_mean, /high_mean, /region_mean
    (token shares where the clip is active, over the update's loss tokens), GRPO/completions/mean_length,
    GRPO/completions/clipped_ratio (answers that hit max_new_tokens without a stop token),
    GRPO/logprob_gap (max |generator log-prob - training-forward log-prob|), GRPO/gen_tokens_per_s (answer
    tokens generated, every round and replica, per second of generation), GRPO/time_generate_s (the
    generation of every round), GRPO/time_score_s (the rewards of every round: reward model and functions;
    then the actor's and the reference's log-probs of the batch), GRPO/time_train_s. With grpo.max_refill_rounds > 0 (DAPO's dynamic sampling, trainer.rl.dynamic_sampling):
    GRPO/num_gen_batches (generation rounds of the step, verl's name) and
    GRPO/frac_reward_zero_std_after_refill (groups of the trained batch still without a signal: masked).
    The reward and length metrics are over the trained batch's rows.
"""
import torch

from trainer.engine.distributed import all_reduce_sum
from trainer.rl.advantages import group_std, zero_std_groups
from trainer.rl.grpo_losses import GRPO_STATS

ROLLOUT_SUMS = ("rows", "groups", "reward", "group_std", "zero_std", "zero_std_after_refill", "rm_score", "kl",
                "answer_tokens", "truncated", "generated_tokens")


def rollout_sums(ro, exp, group: int, n_functions: int, first_rewards=None, generated_tokens: float = 0.0) -> dict:
    """Collective: the rollout's sums over every replica (float64); exp None off the last stage.
    first_rewards: the first generation round's rewards float64[R] (zero_std counts its groups; default
    the batch's). generated_tokens: the answer tokens this replica generated in the step, every round
    (given on the last stage; default the batch's)."""
    sums = torch.zeros(len(ROLLOUT_SUMS) + 2 * n_functions, dtype=torch.float64)
    if exp is not None:
        r = exp.rewards.double()
        applies = ~torch.isnan(exp.per_function)
        sums = torch.cat([torch.stack([
            torch.tensor(float(ro.n_rows), dtype=torch.float64), torch.tensor(float(ro.n_rows // group), dtype=torch.float64),
            r.sum(), group_std(r, group)[::group].sum(),
            zero_std_groups(first_rewards if first_rewards is not None else r, group).double().sum(),
            zero_std_groups(r, group).double().sum(),
            exp.rm_scores.double().sum() if exp.rm_scores is not None else torch.zeros((), dtype=torch.float64),
            exp.kl.double().sum(), ro.answer.double().sum(), (~ro.ended).double().sum(),
            torch.tensor(float(generated_tokens or ro.answer.sum()), dtype=torch.float64)]),
            torch.nan_to_num(exp.per_function, nan=0.0).sum(0), applies.double().sum(0)])
    values = all_reduce_sum(sums).tolist()
    out = dict(zip(ROLLOUT_SUMS, values))
    out["function_sums"], out["function_counts"] = values[len(ROLLOUT_SUMS):][:n_functions], values[len(ROLLOUT_SUMS) + n_functions:]
    return out


def step_metrics(sums: dict, loss_stats, losses: list, function_names: list, with_rm: bool, gap: float,
                 seconds: dict, rounds=None) -> dict:
    """rounds: the step's generation rounds with refill on (None: off)."""
    rows, groups = max(sums["rows"], 1.0), max(sums["groups"], 1.0)
    stats = dict(zip(GRPO_STATS, loss_stats.tolist()))
    n = max(stats["tokens"], 1.0)
    metrics = {
        "GRPO/reward_mean": sums["reward"] / rows,
        "GRPO/reward_std": sums["group_std"] / groups,
        **{f"GRPO/rewards/{name}/mean": s / c if c else 0.0
           for name, s, c in zip(function_names, sums["function_sums"], sums["function_counts"])},
        **({"GRPO/rm_score_mean": sums["rm_score"] / rows} if with_rm else {}),
        "GRPO/frac_reward_zero_std": sums["zero_std"] / groups,
        "GRPO/kl": sums["kl"] / max(sums["answer_tokens"], 1.0),
        "GRPO/loss": sum(losses) / max(len(losses), 1),
        "GRPO/policy_loss": stats["policy_loss"] / n,
        "GRPO/entropy": stats["entropy"] / n,
        "GRPO/clip_ratio/low_mean": stats["clip_low"] / n,
        "GRPO/clip_ratio/high_mean": stats["clip_high"] / n,
        "GRPO/clip_ratio/region_mean": stats["clip_region"] / n,
        "GRPO/completions/mean_length": sums["answer_tokens"] / rows,
        "GRPO/completions/clipped_ratio": sums["truncated"] / rows,
        "GRPO/logprob_gap": gap,
        "GRPO/gen_tokens_per_s": sums["generated_tokens"] / max(seconds["generate"], 1e-9),
        "GRPO/time_generate_s": seconds["generate"],
        "GRPO/time_score_s": seconds["score"],
        "GRPO/time_train_s": seconds["train"],
    }
    if rounds is not None:
        metrics["GRPO/num_gen_batches"] = float(rounds)
        metrics["GRPO/frac_reward_zero_std_after_refill"] = sums["zero_std_after_refill"] / groups
    return metrics
