"""The GRPO recipe's own step code (trainer/rl/rewards.py row_rewards; trainer/rl/grpo_rollout.py make_experience,
minibatch_weights, actor_batch; trainer/rl/grpo_losses.py GRPOLoss; the recipe's group placement
trainer.generation.decoding.replica_rows) on a fixed rollout over 2 data-parallel replicas (two gloo
processes), groups of 4, a reward function from a file reading a column, a k3 KL loss term and
mask_truncated_completions, against the formulas written out here in numpy over the global rows:
rewards, advantages, and the first minibatch's loss (the mean of the two replicas' losses, as
DeepSpeed averages them) equal to the DAPO token mean over both replicas' minibatch rows. A wrong
scale, a missing mask or a group split across replicas fails it."""
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

PROMPT, ANSWER, GROUP, N_PROMPTS, VOCAB = 3, 4, 4, 4, 11
KL_COEF, EPS, WEIGHT = 0.05, 0.2, 2.0
ROWS = GROUP * N_PROMPTS  # global rows; each replica takes 2 groups
MINIBATCH = [0, 5, 2, 7]  # the first minibatch's rows within a replica's 8

REWARD_FILE = """
def last_is_target(prompts, completions, target, **kw):
    return [None if t == "skip" else float(c.split()[-1] == t) for c, t in zip(completions, target)]
"""


class DigitTokenizer:
    """Decodes ids as space-separated numbers (the test's stand-in for a tokenizer)."""

    def batch_decode(self, ids, skip_special_tokens=True):
        return [" ".join(str(i) for i in row) for row in ids]


def global_rollout():
    """All 16 rows: ids, mask, answer (shifted), ended, n_new, records, and the models' outputs."""
    g = torch.Generator().manual_seed(7)
    S = PROMPT + ANSWER
    n_new = torch.randint(1, ANSWER + 1, (ROWS,), generator=g)
    ids = torch.randint(1, 4, (ROWS, S), generator=g)  # answers' last tokens among 1..3: some match the target
    mask = torch.ones(ROWS, S, dtype=torch.int64)
    answer = torch.zeros(ROWS, S)
    for r, n in enumerate(n_new.tolist()):
        answer[r, PROMPT:PROMPT + n] = 1
        mask[r, PROMPT + n:] = 0
        ids[r, PROMPT + n:] = 0
    ended = n_new < ANSWER
    ended[3] = True  # a row that used every position and still ended with its stop token
    targets = ["1", "2", "skip", "3"]
    records = [{"prompt": f"prompt {p}", "target": targets[p]} for p in range(N_PROMPTS) for _ in range(GROUP)]
    shifted = answer[:, 1:]
    old = -torch.rand(ROWS, S - 1, generator=g) * shifted
    ref = old - 0.3 * torch.rand(ROWS, S - 1, generator=g) * shifted
    logits = torch.randn(ROWS, S, VOCAB, generator=g)
    return ids, mask, shifted, ended, n_new, records, old, ref, logits


def _replica(rank: int, init_file: str, reward_file: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    from trainer.engine.distributed import all_reduce_sum
    from trainer.generation.decoding import replica_rows
    from trainer.rl.grpo_losses import GRPOLoss
    from trainer.rl.grpo_options import GRPOOptions
    from trainer.rl.grpo_rollout import actor_batch, make_experience, minibatch_weights
    from trainer.rl.rewards import load_reward_functions, row_rewards
    from trainer.rl.rollout import Rollout

    ids, mask, answer, ended, n_new, records, old, ref, logits = global_rollout()
    mine = torch.tensor(replica_rows(ROWS, rank, 2, group=GROUP))
    ro = Rollout(ids[mine], mask[mine], ids[mine, 1:].contiguous(), answer[mine], ended[mine], n_new[mine], None)
    opts = GRPOOptions(actor_path="x", n_samples_per_prompt=GROUP, max_new_tokens=ANSWER, kl_coef=KL_COEF, epsilon=EPS,
                       mask_truncated_completions=True, reward_funcs=(f"{reward_file}:last_is_target",),
                       reward_weights=(WEIGHT,))
    funcs = load_reward_functions(opts)
    rewards = row_rewards(ro, [records[i] for i in mine], None, funcs, DigitTokenizer(), PROMPT, 1.0, "grpo")
    old_mine, ref_mine = old[mine], ref[mine]
    exp = make_experience(ro, [old_mine[:5], old_mine[5:]], [ref_mine[:3], ref_mine[3:]], *rewards, None, opts, all_reduce_sum)
    chunk = torch.tensor(MINIBATCH)
    n_tokens = float(all_reduce_sum(exp.loss_mask[chunk].sum().double()))
    weights = minibatch_weights(exp, chunk, opts, n_tokens, len(chunk) * 2, 1 * 2)  # grad_accum 1, D 2
    _, labels = actor_batch(ro, exp, chunk, weights)
    loss = GRPOLoss(opts)(logits[mine][chunk], labels)
    torch.save({"rows": mine, "rewards": exp.rewards, "advantages": exp.advantages, "loss": loss.detach()}, f"{out}.{rank}")
    torch.distributed.destroy_process_group()


def by_hand():
    """Rewards, GRPO advantages (TRL: group std, unbiased, + 1e-4) and the DAPO loss over the global rows."""
    ids, mask, answer, ended, n_new, records, old, ref, logits = global_rollout()
    rewards = np.zeros(ROWS)
    for r in range(ROWS):
        last = str(int(ids[r, PROMPT + n_new[r] - 1]))
        target = records[r]["target"]
        rewards[r] = 0.0 if target == "skip" else WEIGHT * float(last == target)
    grouped = rewards.reshape(-1, GROUP)
    adv = (rewards - np.repeat(grouped.mean(1), GROUP)) / (np.repeat(grouped.std(1, ddof=1), GROUP) + 1e-4)
    a = answer.double().numpy()
    loss_mask = a * ended.numpy()[:, None]
    logp = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1).numpy()
    ratio = np.exp(logp - old.double().numpy())
    A = adv[:, None] * a
    per_token = -np.minimum(ratio * A, np.clip(ratio, 1 - EPS, 1 + EPS) * A)
    d = ref.double().numpy() - logp
    per_token += KL_COEF * (np.exp(d) - d - 1)
    return rewards, adv[:, None] * a, per_token, loss_mask


@pytest.mark.slow
def test_the_recipe_step_equals_the_grpo_formulas(tmp_path):
    reward_file = tmp_path / "target_reward.py"
    reward_file.write_text(REWARD_FILE)
    out = str(tmp_path / "result")
    mp.start_processes(_replica, args=(str(tmp_path / "init"), str(reward_file), out), nprocs=2, join=True,
                       start_method="spawn")
    rewards, advantages, per_token, loss_mask = by_hand()
    assert 0 < (rewards > 0).sum() < ROWS  # the rollout's rewards differ within some groups
    minibatch_rows, losses = [], []
    for replica in range(2):
        got = torch.load(f"{out}.{replica}", weights_only=True)
        rows = got["rows"].numpy()
        assert sorted(set(rows // GROUP)) == [replica, replica + 2]  # whole groups on one replica
        np.testing.assert_allclose(got["rewards"].numpy(), rewards[rows], rtol=1e-6)
        np.testing.assert_allclose(got["advantages"].double().numpy(), advantages[rows], rtol=1e-5, atol=1e-6)
        minibatch_rows.extend(rows[MINIBATCH])
        losses.append(got["loss"].item())
    m = loss_mask[minibatch_rows]
    want = (per_token[minibatch_rows] * m).sum() / m.sum()  # DAPO: the token mean over both replicas' minibatch rows
    assert sum(losses) / 2 == pytest.approx(want, rel=1e-5)


FAILING_FILE = """
def picky(prompts, completions, target, **kw):
    if any(t == "boom" for t in target):
        raise ValueError("cannot parse " + completions[0])
    return [0.0] * len(completions)
"""


def _failing_replica(rank: int, init_file: str, reward_file: str, out: str) -> None:
    """Replica 1's rows make the reward function raise; both replicas must stop with its message, in GRPO's
    step and in PPO's (the same shared scoring)."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    from types import SimpleNamespace

    from trainer.recipes import grpo, ppo
    from trainer.rl.grpo_options import GRPOOptions
    from trainer.rl.ppo_options import PPOOptions
    from trainer.rl.rewards import RewardError, load_reward_functions
    from trainer.rl.rollout import Rollout

    ids, mask, answer, ended, n_new, records, *_ = global_rollout()
    ro = Rollout(ids[:4], mask[:4], ids[:4, 1:], answer[:4], ended[:4], n_new[:4], None)
    mine = [{**r, "target": "boom" if rank == 1 else "1"} for r in records[:4]]
    messages = {}
    for recipe, opts in ((grpo, GRPOOptions(actor_path="x", n_samples_per_prompt=GROUP, reward_funcs=(f"{reward_file}:picky",))),
                         (ppo, PPOOptions(actor_path="x", critic_path="y", reward_funcs=(f"{reward_file}:picky",)))):
        try:
            recipe.score_rewards(ro, mine, None, load_reward_functions(opts), DigitTokenizer(),
                                 SimpleNamespace(max_seq_len=PROMPT), opts, SimpleNamespace(is_last_stage=True))
            messages[opts.section] = None
        except RewardError as e:
            messages[opts.section] = str(e)
    torch.save(messages, f"{out}.{rank}")
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_a_reward_function_failure_on_one_replica_stops_both(tmp_path):
    reward_file = tmp_path / "picky.py"
    reward_file.write_text(FAILING_FILE)
    out = str(tmp_path / "result")
    mp.start_processes(_failing_replica, args=(str(tmp_path / "init"), f"{reward_file}", out), nprocs=2, join=True,
                       start_method="spawn")
    ids, _, _, _, n_new, *_ = global_rollout()
    for rank in range(2):
        messages = torch.load(f"{out}.{rank}", weights_only=True)
        assert list(messages) == ["grpo", "ppo"] and messages["grpo"] == messages["ppo"]
        message = messages["ppo"]
        # the first row that raises alone is named (the records are the test's: prompt "prompt 0")
        assert message.startswith("reward function ") and ":picky' raised ValueError: cannot parse " in message, message
        assert message.endswith("on sample 0 of this replica's 4 (prompt 'prompt 0', completion "
                                f"{' '.join(str(i) for i in ids[0, PROMPT:PROMPT + n_new[0]].tolist())!r})"), message
        assert "\n" not in message
