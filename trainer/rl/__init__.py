"""RL and preference math and loss functions (PPO, DPO), rollouts, the reference log-prob cache, EMA."""
