"""trainer/rl/ppo_math.py against hand-computed values."""
import math

import pytest
import torch

from trainer.rl import ppo_math as pm


def test_kl_estimators():
    logp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0]])  # d = 0.5, -1.0
    torch.testing.assert_close(pm.kl_estimate(logp, ref, "k1"), torch.tensor([[0.5, -1.0]]))
    torch.testing.assert_close(pm.kl_estimate(logp, ref, "k2"), torch.tensor([[0.125, 0.5]]))
    torch.testing.assert_close(pm.kl_estimate(logp, ref, "k3"), torch.tensor([[math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0]]))
    assert (pm.kl_estimate(logp, ref, "k3") >= 0).all()
    assert torch.equal(pm.kl_estimate(logp, logp, "k3"), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="use one of"):
        pm.kl_estimate(logp, ref, "k4")


def test_token_rewards_score_at_last_real_token_clipped_with_missing_eos_penalty():
    kl = torch.tensor([[0.1, 0.2, 0.3, 0.0], [0.4, 0.5, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    scores = torch.tensor([7.0, -1.0])
    r = pm.token_rewards(kl, scores, mask, kl_coef=0.1, reward_clip=5.0)
    torch.testing.assert_close(r, torch.tensor([[-0.01, -0.02, -0.03 + 5.0, 0.0], [-0.04, -0.05 - 1.0, 0.0, 0.0]]))
    r = pm.token_rewards(kl, scores, mask, 0.1, 5.0, ended=torch.tensor([True, False]), missing_eos_penalty=2.0)
    assert r[1, 1].item() == pytest.approx(-0.05 - 3.0) and r[0, 2].item() == pytest.approx(-0.03 + 5.0)
    assert r[1, 2:].abs().sum() == 0  # never at a pad position


def test_gae_by_hand():
    # One row, 3 answer tokens + 1 pad; gamma 0.9, lambda 0.5.
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.2, 0.4, 9.0]])  # the pad's value must not leak in
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    adv, ret = pm.gae(rewards, values, mask, gamma=0.9, lam=0.5)
    d2 = 1.0 + 0.9 * 0.0 - 0.4
    d1 = 0.0 + 0.9 * 0.4 - 0.2
    d0 = 0.0 + 0.9 * 0.2 - 0.5
    a2 = d2
    a1 = d1 + 0.45 * a2
    a0 = d0 + 0.45 * a1
    torch.testing.assert_close(adv, torch.tensor([[a0, a1, a2, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[a0 + 0.5, a1 + 0.2, a2 + 0.4, 0.0]]))
    # gamma = lambda = 1: advantages are the reward-to-go minus the value.
    adv, _ = pm.gae(rewards, values, mask, 1.0, 1.0)
    torch.testing.assert_close(adv, torch.tensor([[0.5, 0.8, 0.6, 0.0]]))


def test_policy_loss_clips_and_counts():
    logp_old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.5, 0.9, 1.0]]))  # ratios 1.5, 0.9, 1.0
    adv = torch.tensor([[1.0, -2.0, 3.0]])
    mask = torch.ones(1, 3)
    loss, stats = pm.policy_loss(logp, logp_old, adv, mask, clip_range=0.2)
    # max(-A r, -A clip(r)): token 0: max(-1.5, -1.2) = -1.2; token 1: max(1.8, 1.8) = 1.8; token 2: -3.
    assert loss.item() == pytest.approx((-1.2 + 1.8 - 3.0) / 3)
    assert stats["clip_frac"].item() == pytest.approx(1 / 3)
    k3 = [1.5 - 1 - math.log(1.5), 0.9 - 1 - math.log(0.9), 0.0]  # KL(old || new) from old's samples: r - 1 - log r
    assert stats["approx_kl"].item() == pytest.approx(sum(k3) / 3, rel=1e-5)
    # Normalised by a global token count (the minibatch's), not this micro-batch's.
    loss_global, _ = pm.policy_loss(logp, logp_old, adv, mask, 0.2, n_tokens=6)
    assert loss_global.item() == pytest.approx(loss.item() / 2)
    # Gradient only where unclipped: token 0 (ratio 1.5 > 1.2 with A > 0) gets none.
    logp = logp.clone().requires_grad_()
    pm.policy_loss(logp, logp_old, adv, mask, 0.2)[0].backward()
    assert logp.grad[0, 0] == 0 and logp.grad[0, 1] != 0 and logp.grad[0, 2] != 0


def test_value_loss_clipped():
    values = torch.tensor([[1.0, 0.0]])
    old = torch.tensor([[0.5, 0.0]])
    returns = torch.tensor([[2.0, 1.0]])
    mask = torch.tensor([[1.0, 1.0]])
    # token 0: max((1-2)^2, (0.7-2)^2) = 1.69; token 1: max(1, 1) = 1.
    assert pm.value_loss(values, old, returns, mask, 0.2).item() == pytest.approx(0.5 * (1.69 + 1.0) / 2)
