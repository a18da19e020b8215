"""GRPO's config keys (stage "grpo"), their defaults and their validation. Names follow TRL's GRPOConfig.

Top-level keys (paths accept what model_path accepts: a hg_to_pp folder, a training save_path, a
global_stepN folder):
  actor_path    (required) the policy to train, usually an SFT run's save_path (LM head)
  ref_path      the frozen reference of the KL term (default: actor_path); built only when grpo.kl_coef > 0
  reward_path   a frozen reward model (value head: an RM run's save_path); built only when given

"grpo": {...} (every key optional):
  rollout_batch_size   (train_batch_size) prompts per step, over all replicas (a multiple of the replicas)
  n_samples_per_prompt (8, TRL's num_generations) answers per prompt: a group, generated, rewarded and
                       normalised on one replica. rows = rollout_batch_size x n_samples_per_prompt, a
                       multiple of train_batch_size (a minibatch: one optimizer step)
  max_new_tokens       (64) answer length limit (prompts: at most max_seq_len tokens, cut on the left)
  temperature (1.0), top_k (0: off), top_p (1.0: off), repetition_penalty (1.0): sampling. The log-probs of
                       the ratio, the KL and the entropy are those of logits / temperature (TRL's and verl's
                       convention), the same as the generator's
  num_iterations       (1, TRL's; verl's ppo_epochs) passes over each rollout
  advantage            ("grpo") the estimator: trainer/rl/advantages.py (grpo, dr_grpo, rloo, reinforce++,
                       reinforce++_baseline)
  scale_rewards        ("group") grpo's divisor: "group" (std of the group), "batch" (std of the whole rollout),
                       "none"; only for advantage "grpo" (the others define their own scale)
  loss_type            ("dapo") the aggregation: "grpo", "bnpo" / "dapo", "dr_grpo" (trainer/rl/grpo_losses.py)
  epsilon (0.2), epsilon_high (epsilon; DAPO's clip-higher: e.g. 0.28): the ratio's clip range
  mask_truncated_completions  (false) answers that hit max_new_tokens without a stop token get no loss
  filter_zero_std_groups  (false) DAPO's dynamic sampling, as a filter: the groups whose rewards are all equal
                       (advantage 0 under grpo, dr_grpo, rloo) get no loss tokens, so they do not dilute the
                       token normalisation nor pull through the KL term (no resampling: the minibatch is smaller)
  max_refill_rounds    (0) with filter_zero_std_groups: DAPO's dynamic sampling with refill (verl's filter_groups;
                       max_num_gen_batches = 1 + this). Up to this many extra rounds of rollout_batch_size prompts
                       per step, generated and rewarded, whose groups with a reward signal replace the first
                       round's groups without one, on each replica, until every replica's batch is full of
                       signal groups; what is still missing then stays masked as with the filter alone. 0: the
                       filter alone (no extra generation). Bounded, not "until full" (verl's 0): a prompt set
                       the policy always solves (or never does) would otherwise generate forever. Shapes and
                       rows per step stay fixed; a step draws rollout_batch_size prompts per round, so epochs
                       (n_epochs) pass sooner. Metrics: GRPO/num_gen_batches (rounds used),
                       GRPO/frac_reward_zero_std stays the first round's, GRPO/frac_reward_zero_std_after_refill
                       the trained batch's (trainer/rl/dynamic_sampling.py)
  kl_coef              (0.0, TRL's beta) > 0 builds the reference: kl_coef x KL as a loss term (grpo, dr_grpo,
                       rloo) or -kl_coef x KL_t in the token rewards (reinforce++, reinforce++_baseline)
  kl_estimator         ("k3") "k2" or "k3" as a loss term ("k1" is refused there: its gradient is zero in
                       expectation); "k1" too in the reward
  reward_funcs         ([]) reward functions: a built-in name (trainer/rl/rewards.py: math_answer,
                       exact_match, format, overlong) or "module:function" (a module importable from the
                       working directory or PYTHONPATH, or "path/to/file.py:function"); TRL's interface
  reward_weights       (1.0 each) one weight per reward function
  reward_model_weight  (1.0) the reward model's score's weight in the sum (with reward_path)
  reward_timeout_s     (null: no limit) the longest one reward function's call on a replica's rows may take;
                       longer stops every rank with one line naming the function
  reward_kwargs        ({}) built-in options: {"format": {"pattern": ...}, "overlong": {"max_length": ...,
                       "buffer": ...}, "math_answer": {...}} (trainer/rl/rewards.py)
  disable_dropout      (true) no dropout in the actor while training (TRL's default)
  ref_parts, reward_parts   layers per stage of the frozen models (default: the actor's)
  frozen_bf16          (false) hold the reference and the reward model in bf16
"""
import json
from dataclasses import dataclass, field
from typing import Optional, Union

from trainer.config import section_problems, type_problems
from trainer.rl.advantages import ESTIMATORS, KL_IN_REWARD, SCALE_REWARDS
from trainer.rl.grpo_losses import LOSS_TYPES
from trainer.rl.ppo_math import KL_ESTIMATORS, KL_LOSS_ESTIMATORS
from trainer.rl.rewards import reward_problems
from trainer.rl.rollout_options import RolloutOptions


@dataclass(frozen=True)
class GRPOOptions(RolloutOptions):
    """Stage "grpo"'s keys: the module docstring. Built from the top-level paths and the "grpo" object."""
    LABEL = "GRPO"
    KEYS = ("actor_path", "reward_path", "ref_path", "grpo")

    actor_path: str = ""
    ref_path: Optional[str] = None
    reward_path: Optional[str] = None
    rollout_batch_size: Optional[int] = None
    n_samples_per_prompt: int = 8
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    num_iterations: int = 1
    advantage: str = "grpo"
    scale_rewards: Optional[str] = None  # None: "group" for grpo
    loss_type: str = "dapo"
    epsilon: float = 0.2
    epsilon_high: Optional[float] = None
    mask_truncated_completions: bool = False
    filter_zero_std_groups: bool = False
    max_refill_rounds: int = 0
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    reward_funcs: tuple = ()
    reward_weights: Optional[tuple] = None
    reward_model_weight: float = 1.0
    reward_timeout_s: Optional[float] = None
    reward_kwargs: dict = field(default_factory=dict)
    disable_dropout: bool = True
    frozen_bf16: bool = False
    ref_parts: Union[list, str, None] = None
    reward_parts: Union[list, str, None] = None

    @classmethod
    def from_keys(cls, keys: dict) -> "GRPOOptions":
        section = dict(keys.get("grpo") or {})
        for key in ("reward_funcs", "reward_weights"):
            if section.get(key) is not None:
                section[key] = tuple(section[key])
        return cls(**{k: v for k, v in keys.items() if k != "grpo"}, **section)

    @classmethod
    def problems(cls, keys: dict, project: dict, ds: dict, pipe: Optional[int]) -> list[str]:
        return problems(keys, project, ds, pipe)

    @property
    def epsilon_high_value(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    @property
    def logprob_temperature(self) -> float:
        return self.temperature

    @property
    def needs_reference(self) -> bool:
        return self.kl_coef > 0

    @property
    def kl_in_loss(self) -> bool:
        return self.kl_coef > 0 and self.advantage not in KL_IN_REWARD

    @property
    def kl_in_reward(self) -> bool:
        return self.kl_coef > 0 and self.advantage in KL_IN_REWARD

    @property
    def reference_path(self) -> str:
        return self.ref_path or self.actor_path


_NUMBERS = ("temperature", "top_p", "repetition_penalty", "epsilon", "epsilon_high", "kl_coef", "reward_model_weight",
            "reward_timeout_s")
_INTEGERS = ("rollout_batch_size", "n_samples_per_prompt", "max_new_tokens", "top_k", "num_iterations",
             "max_refill_rounds")
_BOOLS = ("mask_truncated_completions", "filter_zero_std_groups", "disable_dropout", "frozen_bf16")
KEYS = _NUMBERS + _INTEGERS + _BOOLS + ("advantage", "scale_rewards", "loss_type", "kl_estimator", "reward_funcs",
                                        "reward_weights", "reward_kwargs", "ref_parts", "reward_parts")


def problems(keys: dict, project: dict, ds: dict, pipe: Optional[int]) -> list[str]:
    """What is wrong with a stage "grpo" config; [] when nothing is. Keys named as the user writes them."""
    out = type_problems(keys, {"actor_path": str, "reward_path": str, "ref_path": str, "grpo": dict})
    if out:
        return out
    if not keys.get("actor_path"):
        out.append("stage \"grpo\" needs 'actor_path' (the policy: an SFT run's save_path)")
    if project.get("from_scratch"):
        out.append("stage \"grpo\" starts from a trained policy (actor_path); from_scratch is not supported")
    raw = keys.get("grpo", {})
    out.extend(section_problems("grpo", raw, KEYS, _NUMBERS, _INTEGERS, _BOOLS, may_be_zero=("top_k", "max_refill_rounds")))
    for key, allowed in (("advantage", ESTIMATORS), ("scale_rewards", SCALE_REWARDS), ("loss_type", LOSS_TYPES),
                         ("kl_estimator", KL_ESTIMATORS)):
        if key in raw and raw[key] not in allowed:
            out.append(f"grpo.{key} must be one of {list(allowed)}, got {json.dumps(raw[key])}")
    out.extend(reward_problems("grpo", raw))
    for name in ("ref_parts", "reward_parts"):
        parts = raw.get(name)
        if parts is None or parts == "auto":
            continue
        if not (isinstance(parts, list) and all(isinstance(p, int) and not isinstance(p, bool) and p >= 1 for p in parts)):
            out.append(f'grpo.{name} must be a list of layer counts (one per stage) or "auto", got {json.dumps(parts)}')
        elif pipe is not None and len(parts) != pipe:
            out.append(f"grpo.{name} has {len(parts)} entries but model_topo says {pipe} pipeline stages")
    if out:
        return out
    opts = GRPOOptions.from_keys(keys)
    if not opts.reward_funcs and not opts.reward_path:
        out.append("stage \"grpo\" needs a reward: grpo.reward_funcs (e.g. [\"math_answer\"]) and/or reward_path "
                   "(a reward model)")
    for key in ("epsilon", "temperature"):
        if getattr(opts, key) <= 0:
            out.append(f"grpo.{key} must be positive, got {getattr(opts, key)}")
    if opts.epsilon_high is not None and opts.epsilon_high < opts.epsilon:
        out.append(f"grpo.epsilon_high {opts.epsilon_high} must be >= epsilon {opts.epsilon} (DAPO's clip-higher)")
    if opts.kl_coef < 0:
        out.append(f"grpo.kl_coef must not be negative, got {opts.kl_coef}")
    if opts.kl_in_loss and opts.kl_estimator not in KL_LOSS_ESTIMATORS:
        out.append(f'grpo.kl_coef > 0 with advantage "{opts.advantage}" puts the KL in the loss, where "k1" has a zero '
                   'gradient in expectation: use "kl_estimator": "k3" (its gradient is that of KL(reference || policy)) '
                   'or "k2" (that of KL(policy || reference))')
    if opts.ref_path and not opts.needs_reference:
        out.append("ref_path is given but grpo.kl_coef is 0: the reference is only used by the KL term (set kl_coef > 0 "
                   "or remove ref_path)")
    if opts.scale_rewards is not None and opts.advantage != "grpo":
        out.append(f'grpo.scale_rewards applies to advantage "grpo" only ("{opts.advantage}" defines its own scale): '
                   "remove it")
    if opts.n_samples_per_prompt < 2 and opts.advantage != "reinforce++":
        out.append(f'advantage "{opts.advantage}" compares the samples of a prompt: grpo.n_samples_per_prompt must be >= 2 '
                   f"(TRL's default 8), got {opts.n_samples_per_prompt}")
    if opts.max_refill_rounds and not opts.filter_zero_std_groups:
        out.append("grpo.max_refill_rounds refills the groups grpo.filter_zero_std_groups takes out of the update: set "
                   '"filter_zero_std_groups": true, or remove max_refill_rounds')
    if opts.filter_zero_std_groups and opts.n_samples_per_prompt < 2:
        out.append("grpo.filter_zero_std_groups drops groups whose rewards are all equal, which a group of one always is: "
                   f"set grpo.n_samples_per_prompt >= 2 (got {opts.n_samples_per_prompt}) or remove filter_zero_std_groups")
    if not 0 < opts.top_p <= 1:
        out.append(f"grpo.top_p must be in (0, 1] (1 disables it), got {opts.top_p}")
    out.extend(opts.rollout_problems("grpo", ds))
    return out
