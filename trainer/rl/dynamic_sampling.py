"""DAPO's dynamic sampling with refill (Yu et al. 2025, arXiv 2503.14476, Algorithm 1 and eq. 11; verl's
`algorithm.filter_groups` with `max_num_gen_batches`): a group whose rewards are all equal has advantage
0 under grpo, dr_grpo and rloo and teaches nothing, so the step generates further groups until its batch
holds rollout_batch_size groups with a reward signal, or until grpo.max_refill_rounds extra rounds.

Fixed shapes. DeepSpeed's pipeline sends fixed activation shapes and every rank must make the same
collective calls, so a replica's batch is always its share of one round: G = rollout_batch_size / D
groups of n_samples_per_prompt rows (a group stays on the replica that generated it). Each round is a
whole ordinary rollout (rollout_batch_size further prompts from the sampler, every replica generating
and scoring its share); the first round's groups are the batch's slots, and each slot without a signal
takes the next signal group of the later rounds in generation order (round, then group). Rounds stop
when every replica's slots hold signal groups (one all-reduce per round, which also tells the other
stages of a replica which groups its last stage kept) or after max_refill_rounds extra rounds; a slot
still without a signal keeps its first-round group, which grpo.filter_zero_std_groups masks as before.
So with max_refill_rounds 0, or when the first round has a signal everywhere, the batch is the first
round exactly (no copy, the same row order): today's mask-only behaviour. Each replica refills from its
own share of the later rounds, so which groups are trained depends on the number of replicas (every
round's prompts do not). The rounds' rollouts (ids, masks, rewards: not the KV caches) are held until the
batch is taken: at most 1 + max_refill_rounds rollouts.

Determinism (resume): rank 0's prompt sampler advances by rollout_batch_size per round, and round k's
per-row sampling seeds come from (seed, step, k) (trainer.rl.rollout.step_prompt_records); the
number of rounds follows from the rewards, which follow from both. A checkpoint after the step holds the
sampler's position after the last round, so a resumed run draws what the uninterrupted one drew.
"""
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from trainer.rl.advantages import zero_std_groups
from trainer.rl.rollout import Rollout


@dataclass
class ScoredRound:
    """One round's rollout with its rewards: ro on every rank of the replica (trainer.rl.rollout.Rollout);
    rewards float64[R], per_function float64[R,F], rm_scores float32[R] or None on the last stage (None,
    None, None elsewhere)."""
    ro: Rollout
    rewards: Optional[torch.Tensor]
    per_function: Optional[torch.Tensor]
    rm_scores: Optional[torch.Tensor]


def refill_plan(signal: list) -> list[tuple[int, int]]:
    """Which (round, group) fills each slot of one replica's batch. signal: per round, bool[G] (the group's
    rewards differ). Slot g keeps first-round group g when it has a signal; otherwise it takes the next
    unused signal group of rounds 1.. in (round, group) order; without one it keeps (0, g) (masked later)."""
    spare = iter([(k, j) for k in range(1, len(signal)) for j, s in enumerate(signal[k]) if s])
    return [(0, g) if s else next(spare, (0, g)) for g, s in enumerate(signal[0])]


def is_full(signal: list) -> bool:
    """Every slot of the replica's batch can hold a signal group: the later rounds' signal groups cover the
    first round's groups without a signal."""
    return sum(int(s.sum()) for s in signal[1:]) >= int((~signal[0]).sum())


def sample_groups(generate_round: Callable[[int], ScoredRound], group: int, max_refill_rounds: int, dp_rank: int,
                  n_replicas: int, reduce_sum) -> tuple[ScoredRound, int, Optional[torch.Tensor]]:
    """Collective: (this replica's batch, rounds generated, the first round's rewards or None off the last
    stage). generate_round(k) -> ScoredRound: round k's rollout (itself collective); reduce_sum sums a
    float64 tensor over every rank (trainer.engine.distributed.all_reduce_sum)."""
    first = generate_round(0)
    if max_refill_rounds == 0:
        return first, 1, first.rewards
    rounds, signals = [first], []  # signals: per round, bool[D, G] over every replica
    while True:
        local = torch.zeros(n_replicas, first.ro.n_rows // group, dtype=torch.float64)
        if rounds[-1].rewards is not None:  # the last stage of replica dp_rank; zeros elsewhere
            local[dp_rank] = (~zero_std_groups(rounds[-1].rewards, group)).double()
        signals.append(reduce_sum(local) > 0)
        if len(rounds) > max_refill_rounds or all(is_full([s[d] for s in signals]) for d in range(n_replicas)):
            break
        rounds.append(generate_round(len(rounds)))
    plan = refill_plan([s[dp_rank] for s in signals])
    return take_groups(rounds, plan, group), len(rounds), first.rewards


def take_groups(rounds: list, plan: list, group: int) -> ScoredRound:
    """The batch of plan's (round, group) pairs, in slot order; the first round itself when plan is it."""
    if all(k == 0 and j == g for g, (k, j) in enumerate(plan)):
        return rounds[0]
    rows = [(k, torch.arange(j * group, (j + 1) * group)) for k, j in plan]

    def cat(get):
        parts = [get(rounds[k]) for k, _ in rows]
        return None if parts[0] is None else torch.cat([p[r] for p, (_, r) in zip(parts, rows)])

    ro = Rollout(*(cat(lambda x, f=f: getattr(x.ro, f)) for f in ("ids", "mask", "tokens", "answer", "ended", "n_new",
                                                                  "gen_logps")))
    return ScoredRound(ro, cat(lambda x: x.rewards), cat(lambda x: x.per_function), cat(lambda x: x.rm_scores))
