"""The PPO recipe's own step code (trainer/rl/rollout.py make_experience, whiten_advantages and the
feeders, trainer/rl/ppo_metrics.py's rollout-wide moments, trainer/rl/ppo_losses.py ActorLoss) on a fixed
rollout over 2 data-parallel replicas (two gloo processes), against DeepSpeed-Chat's formulas written
out here in numpy: token rewards, whitened advantages, returns and the first minibatch's actor loss.
A halved KL in the rewards or a whitening variance without its mean^2 term fails it."""
import math

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

KL_COEF, CLIP, GAMMA, LAM, REWARD_CLIP = 0.1, 0.2, 1.0, 0.95, 5.0
PROMPT, ANSWER, ROWS, VOCAB = 3, 4, 3, 11


def fixed_rollout(replica: int):
    """Replica r's rows: ids/mask/answer at width S = PROMPT + ANSWER, and what the four models gave."""
    g = torch.Generator().manual_seed(100 + replica)
    S = PROMPT + ANSWER
    n_new = torch.tensor([4, 2, 3]) if replica == 0 else torch.tensor([1, 4, 4])
    ids = torch.randint(1, VOCAB, (ROWS, S), generator=g)
    mask = torch.ones(ROWS, S, dtype=torch.int64)
    answer = torch.zeros(ROWS, S, dtype=torch.int64)
    for r, n in enumerate(n_new.tolist()):
        answer[r, PROMPT:PROMPT + n] = 1
        mask[r, PROMPT + n:] = 0
        ids[r, PROMPT + n:] = 0
    shifted = answer[:, 1:].float()
    outputs = {"old": -torch.rand(ROWS, S - 1, generator=g) * shifted, "ref": -torch.rand(ROWS, S - 1, generator=g) * shifted,
               "values": torch.randn(ROWS, S - 1, generator=g), "scores": torch.tensor([7.0, -0.5, 2.0]) * (1 + replica),
               "logits": torch.randn(ROWS, S, VOCAB, generator=g)}
    ended = n_new < ANSWER
    return ids, mask, answer, ended, n_new, outputs


def _replica(rank: int, init_file: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    from trainer.rl.ppo_losses import ActorLoss
    from trainer.rl.ppo_metrics import rollout_sums, whitening_moments
    from trainer.rl.ppo_options import PPOOptions
    from trainer.rl.rollout import Rollout, actor_batch, make_experience, whiten_advantages

    ids, mask, answer, ended, n_new, o = fixed_rollout(rank)
    ro = Rollout(ids, mask, ids[:, 1:].contiguous(), answer[:, 1:].float(), ended, n_new, None)
    opts = PPOOptions(kl_coef=KL_COEF, clip_range=CLIP, gamma=GAMMA, lam=LAM, reward_clip=REWARD_CLIP)
    exp = make_experience(ro, [o["old"][:2], o["old"][2:]], [o["ref"][:2], o["ref"][2:]],
                          [o["values"][:2], o["values"][2:]], [o["scores"][:2], o["scores"][2:]], opts)
    rewards, returns = exp.rewards.clone(), exp.returns.clone()
    whiten_advantages(exp, ro, *whitening_moments(rollout_sums(ro, exp))[1:])
    rows = torch.tensor([0, 2])  # the first minibatch of this replica
    n_first = float(ro.answer[rows].sum())
    (inputs, labels) = actor_batch(ro, exp, rows, torch.tensor(1.0 / n_first, dtype=torch.float64))
    loss = ActorLoss(opts)(o["logits"][rows], labels)
    torch.save({"rewards": rewards, "returns": returns, "advantages": exp.advantages, "loss": loss.detach()}, f"{out}.{rank}")
    torch.distributed.destroy_process_group()


def deepspeed_chat_by_hand():
    """DeepSpeed-Chat's compute_rewards / get_advantages_and_returns / whitening / actor_loss_fn, per token."""
    per_replica = []
    for replica in range(2):
        ids, mask, answer, ended, n_new, o = fixed_rollout(replica)
        a = answer[:, 1:].numpy().astype(float)
        old, ref, values = (o[k].double().numpy() for k in ("old", "ref", "values"))
        rewards = -KL_COEF * (old - ref) * a
        adv = np.zeros_like(rewards)
        for r in range(ROWS):
            cols = np.nonzero(a[r])[0]
            rewards[r, cols[-1]] += np.clip(o["scores"][r].item(), -REWARD_CLIP, REWARD_CLIP)
            running, next_value = 0.0, 0.0
            for t in cols[::-1]:
                delta = rewards[r, t] + GAMMA * next_value - values[r, t]
                running = delta + GAMMA * LAM * running
                adv[r, t], next_value = running, values[r, t]
        per_replica.append(dict(a=a, rewards=rewards, adv=adv, returns=(adv + values) * a, ids=ids, o=o))
    everything = np.concatenate([p["adv"][p["a"] > 0] for p in per_replica])  # both replicas' answer tokens
    mean, var = everything.mean(), everything.var()
    for p in per_replica:
        p["whitened"] = (p["adv"] - mean) / math.sqrt(var + 1e-8) * p["a"]
        rows = [0, 2]
        logits = p["o"]["logits"][rows].double()
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, p["ids"][rows, 1:, None]).squeeze(-1).numpy()
        ratio = np.exp(logp - p["o"]["old"][rows].double().numpy())
        A, m = p["whitened"][rows], p["a"][rows]
        per_token = np.maximum(-A * ratio, -A * np.clip(ratio, 1 - CLIP, 1 + CLIP))
        p["loss"] = (per_token * m).sum() / m.sum()
    return per_replica


@pytest.mark.slow
def test_the_recipe_step_equals_deepspeed_chat_formulas(tmp_path):
    out = str(tmp_path / "result")
    mp.start_processes(_replica, args=(str(tmp_path / "init"), out), nprocs=2, join=True, start_method="spawn")
    expected = deepspeed_chat_by_hand()
    for replica in range(2):
        got = torch.load(f"{out}.{replica}", weights_only=True)
        want = expected[replica]
        np.testing.assert_allclose(got["rewards"].double().numpy(), want["rewards"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got["returns"].double().numpy(), want["returns"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got["advantages"].double().numpy(), want["whitened"], rtol=1e-4, atol=1e-5)
        assert got["loss"].item() == pytest.approx(want["loss"], rel=1e-4, abs=1e-6)
