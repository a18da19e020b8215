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


def test_clip_frac_counts_tokens_whose_clip_is_active():
    """A ratio past 1 +- eps counts only where the clip takes the gradient away (TRL's clip_ratio): 1.5 with
    A > 0 and 0.5 with A < 0 are clipped; 1.5 with A < 0 and 0.5 with A > 0 are not (the unclipped term wins)."""
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.5, 0.5]]))
    adv = torch.tensor([[1.0, -1.0, -1.0, 1.0]])
    _, stats = pm.policy_loss(logp, torch.zeros(1, 4), adv, torch.ones(1, 4), clip_range=0.2)
    assert stats["clip_frac"].item() == pytest.approx(2 / 4)
    logp = logp.clone().requires_grad_()
    pm.policy_loss(logp, torch.zeros(1, 4), adv, torch.ones(1, 4), 0.2)[0].backward()
    assert (logp.grad[0] == 0).tolist() == [True, True, False, False]  # the counted ones are those without gradient


def test_missing_eos_penalty_is_subtracted_after_the_clip():
    """A truncated answer scoring 8 (clip 5, penalty 2) gets 3, not the 5 of an answer that ended."""
    kl, mask = torch.zeros(2, 2), torch.ones(2, 2)
    r = pm.token_rewards(kl, torch.tensor([8.0, 8.0]), mask, 0.1, 5.0, ended=torch.tensor([True, False]), missing_eos_penalty=2.0)
    assert r[:, 1].tolist() == [5.0, 3.0]


def test_kl_estimators_as_loss_terms_exact_expectation():
    """Over a 6-token categorical, the expected gradient (tokens drawn from the policy, the gradient taken
    through log pi) of each estimator as a loss term: k1 -> 0, k2 -> grad KL(pi || ref), k3 -> grad KL(ref || pi).
    Why config refuses k1 as a loss term (trainer/rl/ppo_options.py)."""
    torch.manual_seed(0)
    theta = torch.randn(6, dtype=torch.float64, requires_grad=True)
    ref = torch.log_softmax(torch.randn(6, dtype=torch.float64), 0)

    def expected_grad(estimator: str) -> torch.Tensor:
        logp = torch.log_softmax(theta, 0)
        weights = logp.exp().detach()  # the sampling distribution: no gradient through it
        (g,) = torch.autograd.grad((weights * pm.kl_estimate(logp, ref, estimator)).sum(), theta)
        return g

    def true_grad(direction: str) -> torch.Tensor:
        logp = torch.log_softmax(theta, 0)
        kl = (logp.exp() * (logp - ref)).sum() if direction == "pi||ref" else (ref.exp() * (ref - logp)).sum()
        (g,) = torch.autograd.grad(kl, theta)
        return g

    torch.testing.assert_close(expected_grad("k1"), torch.zeros(6, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(expected_grad("k2"), true_grad("pi||ref"), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(expected_grad("k3"), true_grad("ref||pi"), rtol=1e-10, atol=1e-12)
    assert pm.KL_LOSS_ESTIMATORS == ("k2", "k3")
