"""PPO's and GRPO's rollouts: which prompts a step uses, and the generated rows at one fixed width.

Prompts. Rank 0 holds the prompt dataset and a `ResumableSampler` over it (seeded shuffle, one
epoch after another); a step takes the next `rollout_batch_size` prompts of the global order and
broadcasts their token ids and records (the reward functions' prompts and columns), because every stage of every replica needs them (the generator builds
its micro-batches from them), and middle stages hold no data. With n_samples_per_prompt = k each
prompt appears k times in a row; the prompts are shared among the D replicas before that repetition
counts: replica r takes prompts r::D with their k rows each (`replica_share(..., group=k)`), so a
prompt's samples are generated, scored and trained on one replica (group-relative advantages need them
together).
The sampler's state goes into the checkpoint (rank 0's), so a resumed run takes the same prompts.

Width. Every rollout row is laid out at S = max_seq_len + max_new_tokens columns: the prompt
right-aligned in [0, max_seq_len) (left padding; positions come from the attention mask, so the
padding changes nothing), the answer from column max_seq_len, pad after it. One width for every
step keeps the activation shapes DeepSpeed's pipeline engine sends fixed (it sends the shapes once).
"""
from dataclasses import dataclass
from typing import Optional

import torch

from data.sampler import ResumableSampler
from trainer.engine.distributed import broadcast_object
from trainer.generation.token_sampling import row_seed, row_seeds
from trainer.rl.ppo_math import gae, kl_estimate, token_rewards


class PromptSampler:
    """Rank 0's position in the prompt data: `take(n)` -> n dataset indices, epochs rolling over."""

    def __init__(self, n_prompts: int, seed: int):
        self.sampler = ResumableSampler(n_prompts, 0, 1, seed=seed, shuffle=True, drop_last=False)

    def take(self, n: int) -> list[int]:
        out = []
        while len(out) < n:
            order = self.sampler.global_order(self.sampler.epoch)
            pos = self.sampler.position
            chunk = order[pos:pos + n - len(out)]
            out += [int(i) for i in chunk]
            self.sampler.position = pos + len(chunk)
            if self.sampler.position >= len(order):
                self.sampler.set_epoch(self.sampler.epoch + 1)
        return out

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


def prompt_ids(dataset, index: int) -> list[int]:
    """A PromptDataset item (left-padded ids, mask) -> the prompt's token ids."""
    ids, mask = dataset[index]
    return ids[mask.bool()].tolist()


def step_prompt_records(sampler: Optional[PromptSampler], dataset, n_prompts: int, n_samples: int, seed: int,
                        step: int, round_: int = 0) -> tuple[list, list, list]:
    """Collective: (prompt token ids, one sampling seed, the prompt's record) per row, the same global lists
    on every rank (rank 0 chooses). Rows: each prompt n_samples times in a row; a record is {"prompt": as
    the data gave it, **its other fields} (data.batching.PromptDataset.record; {} when it kept none), the
    reward functions' prompts and columns (trainer.rl.rewards). round_: the step's generation round
    (GRPO's trainer.rl.dynamic_sampling); the seeds depend on (seed, step, round_), so a prompt drawn
    again in a later round of the step gets other answers; round 0's are a step's without refill."""
    chosen = None
    if sampler is not None:
        picked = sampler.take(n_prompts)
        chosen = ([prompt_ids(dataset, i) for i in picked for _ in range(n_samples)],
                  [dataset.record(i) for i in picked for _ in range(n_samples)])
    prompts, records = broadcast_object(chosen)
    base = seed * 1_000_003 + step
    return prompts, row_seeds(base if round_ == 0 else row_seed(base, [round_]), prompts), records


@dataclass
class Rollout:
    """One replica's rows at the fixed width S. On every rank: ids, mask int64[R,S]; tokens int64[R,S-1]
    (= ids[:, 1:]); answer float32[R,S-1] (1 on generated tokens, shifted as tokens are); ended bool[R]
    (the answer ended with a stop token); n_new int64[R]. On the last stage only: gen_logps
    float32[R,S-1], the generator's raw log-probs of the answer tokens (0 elsewhere)."""
    ids: torch.Tensor
    mask: torch.Tensor
    tokens: torch.Tensor
    answer: torch.Tensor
    ended: torch.Tensor
    n_new: torch.Tensor
    gen_logps: Optional[torch.Tensor]

    @property
    def n_rows(self) -> int:
        return self.ids.shape[0]

    def micro_batches(self, rows: torch.Tensor, micro_batch: int) -> list[torch.Tensor]:
        """Row indices int64[k] -> consecutive chunks of micro_batch rows."""
        return [rows[i:i + micro_batch] for i in range(0, len(rows), micro_batch)]

    def answer_ids(self, prompt_width: int) -> list[list[int]]:
        """Each row's answer token ids (stop token included), from column prompt_width."""
        return [self.ids[r, prompt_width:prompt_width + int(n)].tolist() for r, n in enumerate(self.n_new)]


def generate_rollout(actor, plan, prompts, seeds, cfg, opts, sampling, stop_ids, pad_id: int) -> Rollout:
    """Collective: this replica's prompt groups (each prompt's n_samples_per_prompt rows together)
    generated by the actor's pipeline with `sampling` (a SamplingConfig), laid out at the rollout width.
    prompts, seeds: the step's global lists (step_prompt_records); opts: the recipe's RolloutOptions."""
    from trainer.generation.decoding import generate, replica_share

    group = opts.n_samples_per_prompt
    gen = generate(actor.module, plan.model_config, replica_share(prompts, actor.module, group),
                   max_new_tokens=opts.max_new_tokens, stop_ids=stop_ids, pad_id=pad_id, sampling=sampling,
                   seeds=replica_share(seeds, actor.module, group), max_context=opts.rollout_width(cfg.max_seq_len))
    return fixed_width_rollout(gen, cfg.max_seq_len, opts.max_new_tokens, pad_id)


def fixed_width_rollout(gen, prompt_width: int, answer_width: int, pad_id: int) -> Rollout:
    """A `generation.Generation` (prompt right-aligned at its own gen.prompt_len) laid out at
    S = prompt_width + answer_width columns."""
    n, width = gen.ids.shape
    shift = prompt_width - gen.prompt_len
    assert shift >= 0 and width - gen.prompt_len <= answer_width, (gen.prompt_len, width, prompt_width, answer_width)
    S = prompt_width + answer_width
    ids = torch.full((n, S), pad_id, dtype=torch.int64)
    mask = torch.zeros(n, S, dtype=torch.int64)
    answer = torch.zeros(n, S, dtype=torch.int64)
    ids[:, shift:shift + width] = gen.ids
    mask[:, shift:shift + width] = gen.attention_mask
    answer[:, shift:shift + width] = gen.answer_mask
    gen_logps = None
    if gen.logprobs is not None:
        # answer token j sits at column prompt_width + j, i.e. shifted column prompt_width + j - 1
        gen_logps = torch.zeros(n, S - 1, dtype=torch.float32)
        steps = gen.logprobs.shape[1]
        gen_logps[:, prompt_width - 1:prompt_width - 1 + steps] = gen.logprobs * gen.answer_mask[:, gen.prompt_len:].float()
    ended = torch.tensor([reason == "stop" for reason in gen.finish_reason], dtype=torch.bool)
    return Rollout(ids, mask, ids[:, 1:].contiguous(), answer[:, 1:].float(), ended, gen.n_new.clone(), gen_logps)


@dataclass
class Experience:
    """A scored rollout, on the last stage of its replica. Per token, float32[R,S-1] (0 off the answer):
    old_logps (the training forward's log-probs of the sampled tokens: the ratio's "old"), ref_logps,
    old_values (the critic's), kl (the estimate, masked), rewards (token rewards), advantages, returns;
    per row: scores float64[R] (each row's score before the clip: the reward model's and/or the reward
    functions' weighted sum, trainer.rl.rewards.row_rewards), per_function float64[R,F] (NaN: None),
    rm_scores float32[R] (the reward model's raw score) or None without one."""
    old_logps: torch.Tensor
    ref_logps: torch.Tensor
    old_values: torch.Tensor
    scores: torch.Tensor
    per_function: torch.Tensor
    rm_scores: Optional[torch.Tensor]
    kl: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor


def make_experience(ro: Rollout, old_logps, ref_logps, old_values, scores: torch.Tensor, per_function: torch.Tensor,
                    rm_scores: Optional[torch.Tensor], opts) -> Experience:
    """PPO's rewards, GAE and returns from the models' outputs (the log-prob and value lists as forward_only
    returns them on the last stage, per micro-batch) and each row's score (row_rewards'); `opts` a PPOOptions.
    The score is clipped and the missing-EOS penalty taken at the last answer token (ppo_math.token_rewards)."""
    old_logps, ref_logps, old_values = (torch.cat(x) for x in (old_logps, ref_logps, old_values))
    kl = kl_estimate(old_logps, ref_logps, opts.kl_estimator) * ro.answer
    rewards = token_rewards(kl if opts.kl_in_reward else torch.zeros_like(kl), scores, ro.answer, opts.kl_coef,
                            opts.reward_clip, ro.ended, opts.missing_eos_penalty)
    advantages, returns = gae(rewards, old_values * ro.answer, ro.answer, opts.gamma, opts.lam)
    return Experience(old_logps, ref_logps, old_values, scores, per_function, rm_scores, kl, rewards, advantages, returns)


def whiten_advantages(exp: Optional[Experience], ro: Rollout, mean: float, var: float) -> None:
    """(A - mean) / std over the whole rollout's answer tokens (moments over every replica: ppo_metrics)."""
    if exp is not None:
        exp.advantages = (exp.advantages - mean) * torch.rsqrt(torch.tensor(var + 1e-8)) * ro.answer


# Feeding train_batch: inputs for the first stage, labels (tensors, on the last stage) for the loss.

def actor_batch(ro: Rollout, exp: Optional[Experience], rows, token_scale) -> tuple:
    """(ids, mask), (tokens, answer, old log-probs, advantages, reference log-probs, token_scale): ActorLoss's labels."""
    labels = None
    if exp is not None:
        labels = (ro.tokens[rows], ro.answer[rows], exp.old_logps[rows], exp.advantages[rows], exp.ref_logps[rows], token_scale)
    return (ro.ids[rows], ro.mask[rows]), labels


def critic_batch(ro: Rollout, exp: Optional[Experience], rows, token_scale) -> tuple:
    """(ids, mask), (answer, old values, returns, token_scale): CriticLoss's labels."""
    labels = None
    if exp is not None:
        labels = (ro.answer[rows], exp.old_values[rows], exp.returns[rows], token_scale)
    return (ro.ids[rows], ro.mask[rows]), labels
