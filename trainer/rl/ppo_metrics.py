"""PPO's step metrics (TRL/DeepSpeed-Chat names under PPO/): sums on the last stage of each replica
(zeros elsewhere), all-reduced over every rank, then means. The recipe's docstring lists them."""
import torch

from trainer.engine.distributed import all_reduce_sum
from trainer.rl.ppo_losses import ACTOR_STATS

ROLLOUT_SUMS = ("rows", "reward", "reward_sq", "score", "rm_score", "kl", "answer_tokens", "real_tokens", "adv", "adv_sq")


def rollout_sums(ro, exp, n_functions: int) -> dict:
    """Collective: sums over the whole rollout (every replica) as float64, and each reward function's sum
    ("function_sums") and count of rows it applied to ("function_counts"). exp: an Experience, or None
    off the last stage."""
    sums = torch.zeros(len(ROLLOUT_SUMS) + 2 * n_functions, dtype=torch.float64)
    if exp is not None:
        per_row = exp.rewards.double().sum(1)
        adv = exp.advantages.double() * ro.answer.double()
        rm = exp.rm_scores.double().sum() if exp.rm_scores is not None else torch.zeros((), dtype=torch.float64)
        sums = torch.cat([torch.stack([
            torch.tensor(float(ro.n_rows), dtype=torch.float64), per_row.sum(), per_row.pow(2).sum(),
            exp.scores.double().sum(), rm, exp.kl.double().sum(), ro.answer.double().sum(), ro.mask.double().sum(),
            adv.sum(), adv.pow(2).sum()]),
            torch.nan_to_num(exp.per_function, nan=0.0).sum(0), (~torch.isnan(exp.per_function)).double().sum(0)])
    values = all_reduce_sum(sums).tolist()
    out = dict(zip(ROLLOUT_SUMS, values))
    rest = values[len(ROLLOUT_SUMS):]
    out["function_sums"], out["function_counts"] = rest[:n_functions], rest[n_functions:]
    return out


def whitening_moments(sums: dict) -> tuple[float, float, float]:
    """(answer tokens, mean, variance) of the advantages over the whole rollout."""
    n = max(sums["answer_tokens"], 1.0)
    mean = sums["adv"] / n
    return n, mean, max(sums["adv_sq"] / n - mean * mean, 0.0)


def logprob_gap(ro, exp) -> float:
    """Collective: max |generation log-prob - training-forward log-prob| over every answer token."""
    gap = torch.zeros((), dtype=torch.float64)
    if exp is not None:
        gap = ((ro.gen_logps - exp.old_logps).abs() * ro.answer).max().double()
    torch.distributed.all_reduce(gap, op=torch.distributed.ReduceOp.MAX)
    return float(gap)


def step_metrics(sums: dict, actor_stats, losses: dict, gap: float, ppo_epochs: int, seconds: dict,
                 function_names: list, rm_with_functions: bool) -> dict:
    """losses: {"policy": [...], "value": [...], "ptx": [...]} per minibatch (train_batch's); seconds:
    generate, score, train. PPO/policy_loss, PPO/kl_loss and PPO/entropy are means over the update's
    answer tokens (TRL's loss/policy_avg, verl's actor/pg_loss and actor/kl_loss); PPO/loss is the
    actor's whole loss (surrogate - entropy_coef x entropy + kl_coef x KL term). PPO/score_mean is the
    rows' score before the clip (the RM's and/or the reward functions' weighted sum);
    PPO/rewards/<function>/mean each function's mean over the rows it applied to (GRPO's names) and, with
    both a reward model and functions, PPO/rm_score_mean the reward model's raw score."""
    rows = max(sums["rows"], 1.0)
    actor = dict(zip(ACTOR_STATS, actor_stats.tolist()))
    reward_mean = sums["reward"] / rows
    n_update = max(actor["tokens"], 1.0)
    answer_tokens = sums["answer_tokens"]  # generated tokens of the rollout
    metrics = {
        "PPO/reward_mean": reward_mean,
        "PPO/reward_std": max(sums["reward_sq"] / rows - reward_mean ** 2, 0.0) ** 0.5,
        "PPO/score_mean": sums["score"] / rows,
        **{f"PPO/rewards/{name}/mean": total / count if count else 0.0
           for name, total, count in zip(function_names, sums["function_sums"], sums["function_counts"])},
        **({"PPO/rm_score_mean": sums["rm_score"] / rows} if rm_with_functions else {}),
        "PPO/kl": sums["kl"] / rows,
        "PPO/loss": sum(losses["policy"]) / len(losses["policy"]),  # the actor's whole loss, as train_batch returned it
        "PPO/policy_loss": actor["policy_loss"] / n_update,  # the clipped surrogate alone
        "PPO/kl_loss": actor["kl_loss"] / n_update,  # the KL term's estimate (before kl_coef); 0 with the KL in the reward
        "PPO/value_loss": sum(losses["value"]) / len(losses["value"]),
        "PPO/clip_frac": actor["clip_frac"] / n_update,
        "PPO/approx_kl": actor["approx_kl"] / n_update,
        "PPO/entropy": actor["entropy"] / n_update,
        "PPO/response_length": answer_tokens / rows,
        "PPO/logprob_gap": gap,
        "PPO/gen_tokens_per_s": answer_tokens / max(seconds["generate"], 1e-9),
        "PPO/train_tokens_per_s": sums["real_tokens"] * ppo_epochs / max(seconds["train"], 1e-9),
        "PPO/time_generate_s": seconds["generate"],
        "PPO/time_score_s": seconds["score"],
        "PPO/time_train_s": seconds["train"],
    }
    if losses["ptx"]:
        metrics["PPO/ptx_loss"] = sum(losses["ptx"]) / len(losses["ptx"])
    return metrics
