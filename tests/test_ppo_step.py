"""The PPO recipe's own step code (trainer/recipes/ppo.py score_rewards: the reward model's score and/or
the reward functions, trainer/rl/rollout.py make_experience, whiten_advantages and the feeders,
trainer/rl/ppo_metrics.py's rollout-wide moments and metrics, trainer/rl/ppo_losses.py ActorLoss) on a
fixed rollout over 2 data-parallel replicas (two gloo processes), against DeepSpeed-Chat's formulas
written out here in numpy: token rewards, whitened advantages, returns and the first minibatch's actor
loss; with reward functions, each row's score = sum_f w_f r_f (None skipped) + reward_model_weight x RM
score, clipped, then the missing-EOS penalty. A halved KL in the rewards, a whitening variance without
its mean^2 term, a dropped weight, a clip before the sum or a penalty before the clip fails it."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

KL_COEF, CLIP, GAMMA, LAM, REWARD_CLIP = 0.1, 0.2, 1.0, 0.95, 5.0
PROMPT, ANSWER, ROWS, VOCAB = 3, 4, 3, 11
W_F, W_RM, PENALTY = 0.75, 0.5, 0.5  # the reward function's weight, the RM's, the missing-EOS penalty
TARGETS = (["a", "skip", "a"], ["a", "a", "skip"])  # per replica's rows: "skip" -> the function returns None
REWARD_FILE = """
def n_words(prompts, completions, target, **kw):
    return [None if t == "skip" else float(len(c.split())) for c, t in zip(completions, target)]
"""
MODES = ("reward_model", "functions", "reward_model_and_functions")


class DigitTokenizer:
    """Decodes ids as space-separated numbers: a completion of n tokens has n words."""

    def batch_decode(self, ids, skip_special_tokens=True):
        return [" ".join(str(i) for i in row) for row in ids]


def options(mode: str, reward_file: str):
    from trainer.rl.ppo_options import PPOOptions

    functions = {"reward_funcs": (f"{reward_file}:n_words",), "reward_weights": (W_F,), "missing_eos_penalty": PENALTY}
    extra = {"reward_model": {}, "functions": functions,
             "reward_model_and_functions": {**functions, "reward_model_weight": W_RM}}[mode]
    return PPOOptions(kl_coef=KL_COEF, clip_range=CLIP, gamma=GAMMA, lam=LAM, reward_clip=REWARD_CLIP, **extra)


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


def _replica(rank: int, init_file: str, out: str, mode: str, reward_file: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    from trainer.recipes.ppo import score_rewards
    from trainer.rl.ppo_losses import ACTOR_STATS, ActorLoss
    from trainer.rl.ppo_metrics import rollout_sums, step_metrics, whitening_moments
    from trainer.rl.rewards import load_reward_functions, metric_names
    from trainer.rl.rollout import Rollout, actor_batch, make_experience, whiten_advantages

    ids, mask, answer, ended, n_new, o = fixed_rollout(rank)
    ro = Rollout(ids, mask, ids[:, 1:].contiguous(), answer[:, 1:].float(), ended, n_new, None)
    opts = options(mode, reward_file)
    funcs = load_reward_functions(opts)
    rm_scores = o["scores"] if mode != "functions" else None
    records = [{"prompt": f"prompt {r}", "target": t} for r, t in enumerate(TARGETS[rank])]
    scores, per_function = score_rewards(ro, records, rm_scores, funcs, DigitTokenizer(), SimpleNamespace(max_seq_len=PROMPT),
                                         opts, SimpleNamespace(is_last_stage=True))
    exp = make_experience(ro, [o["old"][:2], o["old"][2:]], [o["ref"][:2], o["ref"][2:]],
                          [o["values"][:2], o["values"][2:]], scores, per_function, rm_scores, opts)
    rewards, returns = exp.rewards.clone(), exp.returns.clone()
    sums = rollout_sums(ro, exp, len(funcs))
    metrics = step_metrics(sums, torch.zeros(len(ACTOR_STATS)), {"policy": [0.0], "value": [0.0], "ptx": []}, 0.0, 1,
                           {"generate": 1.0, "score": 1.0, "train": 1.0}, metric_names(funcs),
                           rm_scores is not None and bool(funcs))
    whiten_advantages(exp, ro, *whitening_moments(sums)[1:])
    rows = torch.tensor([0, 2])  # the first minibatch of this replica
    n_first = float(ro.answer[rows].sum())
    (inputs, labels) = actor_batch(ro, exp, rows, torch.tensor(1.0 / n_first, dtype=torch.float64))
    loss = ActorLoss(opts)(o["logits"][rows], labels)
    torch.save({"rewards": rewards, "returns": returns, "advantages": exp.advantages, "loss": loss.detach(),
                "metrics": {k: v for k, v in metrics.items()
                            if k in ("PPO/score_mean", "PPO/rm_score_mean") or k.startswith("PPO/rewards/")}}, f"{out}.{rank}")
    torch.distributed.destroy_process_group()


def row_scores(mode: str, replica: int, n_new, rm) -> tuple[list, list]:
    """(each row's score before the clip, the function's value or None): W_F x the word count (None on
    "skip" rows) + the RM score, weighted W_RM when both score."""
    words = [None if t == "skip" else float(n) for t, n in zip(TARGETS[replica], n_new.tolist())]
    scores = []
    for r in range(ROWS):
        function_part = W_F * (words[r] or 0.0) if mode != "reward_model" else 0.0
        rm_part = {"reward_model": 1.0, "functions": 0.0, "reward_model_and_functions": W_RM}[mode] * float(rm[r])
        scores.append(function_part + rm_part)
    return scores, words


def deepspeed_chat_by_hand(mode: str):
    """DeepSpeed-Chat's compute_rewards / get_advantages_and_returns / whitening / actor_loss_fn, per token;
    the score of each row from row_scores, clipped to +-REWARD_CLIP, then minus PENALTY where the answer
    did not end (with reward functions)."""
    per_replica = []
    for replica in range(2):
        ids, mask, answer, ended, n_new, o = fixed_rollout(replica)
        a = answer[:, 1:].numpy().astype(float)
        old, ref, values = (o[k].double().numpy() for k in ("old", "ref", "values"))
        rewards = -KL_COEF * (old - ref) * a
        adv = np.zeros_like(rewards)
        scores, words = row_scores(mode, replica, n_new, o["scores"])
        penalty = PENALTY if mode != "reward_model" else 0.0
        for r in range(ROWS):
            cols = np.nonzero(a[r])[0]
            rewards[r, cols[-1]] += np.clip(scores[r], -REWARD_CLIP, REWARD_CLIP) - penalty * (not bool(ended[r]))
            running, next_value = 0.0, 0.0
            for t in cols[::-1]:
                delta = rewards[r, t] + GAMMA * next_value - values[r, t]
                running = delta + GAMMA * LAM * running
                adv[r, t], next_value = running, values[r, t]
        per_replica.append(dict(a=a, rewards=rewards, adv=adv, returns=(adv + values) * a, ids=ids, o=o, scores=scores,
                                words=words))
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
@pytest.mark.parametrize("mode", MODES)
def test_the_recipe_step_equals_deepspeed_chat_formulas(tmp_path, mode):
    """mode: the reward model alone (the default: scores as DeepSpeed-Chat's), a reward function alone (no
    reward model), or both weighted; the clip then hits some rows' sums whose parts are within it, and the
    missing-EOS penalty comes after it."""
    reward_file = tmp_path / "n_words.py"
    reward_file.write_text(REWARD_FILE)
    out = str(tmp_path / "result")
    mp.start_processes(_replica, args=(str(tmp_path / "init"), out, mode, str(reward_file)), nprocs=2, join=True,
                       start_method="spawn")
    expected = deepspeed_chat_by_hand(mode)
    if mode == "reward_model_and_functions":  # the fixture exercises the order: a clipped sum of unclipped parts
        parts = [(W_F * (w or 0.0), W_RM * float(rm)) for r in range(2)
                 for w, rm in zip(expected[r]["words"], fixed_rollout(r)[5]["scores"])]
        assert any(abs(f + m) > REWARD_CLIP and abs(f) < REWARD_CLIP and abs(m) < REWARD_CLIP for f, m in parts)
    metrics = []
    for replica in range(2):
        got = torch.load(f"{out}.{replica}", weights_only=True)
        want = expected[replica]
        np.testing.assert_allclose(got["rewards"].double().numpy(), want["rewards"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got["returns"].double().numpy(), want["returns"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got["advantages"].double().numpy(), want["whitened"], rtol=1e-4, atol=1e-5)
        assert got["loss"].item() == pytest.approx(want["loss"], rel=1e-4, abs=1e-6)
        metrics.append(got["metrics"])
    assert metrics[0] == metrics[1]  # all-reduced: every rank logs the same
    scores = [s for p in expected for s in p["scores"]]
    words = [w for p in expected for w in p["words"] if w is not None]
    want_metrics = {"PPO/score_mean": pytest.approx(sum(scores) / len(scores), rel=1e-6)}  # the raw score, before the clip
    if mode != "reward_model":
        want_metrics["PPO/rewards/n_words/mean"] = pytest.approx(sum(words) / len(words), rel=1e-9)  # rows it applied to
    if mode == "reward_model_and_functions":
        rm = [float(s) for r in range(2) for s in fixed_rollout(r)[5]["scores"]]
        want_metrics["PPO/rm_score_mean"] = pytest.approx(sum(rm) / len(rm), rel=1e-6)
    assert metrics[0] == want_metrics
