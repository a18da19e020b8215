"""PPO's config keys (stage "ppo"), their defaults and their validation.

Top-level keys (paths accept what model_path accepts: a hg_to_pp folder, a training save_path, a
global_stepN folder):
  actor_path    (required) the policy to train, usually an SFT run's save_path (LM head)
  critic_path   (required) the value model to train, usually an RM run's save_path (value head;
                an LM checkpoint also works: its head is then a fresh seeded value head)
  ref_path      the frozen reference of the KL penalty (default: actor_path)
  reward_path   the frozen reward model (value head). Without ppo.reward_funcs the default is critic_path;
                with ppo.reward_funcs a reward model is built only when reward_path is given

"ppo": {...} (every key optional; defaults are DeepSpeed-Chat's where it has one):
  rollout_batch_size   (train_batch_size) prompts generated per PPO step, over all replicas
  n_samples_per_prompt (1) answers per prompt; rollout rows = rollout_batch_size x n_samples_per_prompt,
                       a multiple of train_batch_size (a minibatch: one optimizer step of actor and critic)
  max_new_tokens       (64) answer length limit (prompts: at most max_seq_len tokens, cut on the left)
  greedy (false), temperature (1.0), top_k (0: off), top_p (1.0: off), repetition_penalty (1.0): sampling
  logprobs_at_temperature  (false) the log-probs of the ratio, the KL and the entropy: false, of the model's raw
                       logits (DeepSpeed-Chat's convention; tokens are still sampled at `temperature`, so at
                       T != 1 the sampled KL estimate is biased: PPO/kl then estimates KL(pi || ref) from
                       samples of another distribution, and can be negative); true, of logits / temperature
                       for the actor and the reference alike (TRL's and verl's): PPO/kl is then an unbiased
                       estimate of KL(pi_T || ref_T), the distributions the tokens come from
  ppo_epochs           (1) passes over each rollout; optimizer steps per PPO step = ppo_epochs x minibatches
  kl_coef (0.1), kl_estimator ("k1" | "k2" | "k3"), kl_in_reward (true: -kl_coef KL_t in each token's
                       reward; false: kl_coef x mean KL added to the actor's loss, with the reference's log-probs;
                       then "k2" (gradient of KL(policy || ref)) or "k3" (of KL(ref || policy)): k1's is zero)
  reward_funcs         ([]) reward functions on the decoded answers, TRL's interface (as grpo.reward_funcs:
                       a built-in of trainer/rl/rewards.py, "module:function" or "path/to/file.py:function";
                       each gets the prompt record's other fields as columns), instead of or beside the reward model
  reward_weights       (1.0 each) one weight per reward function
  reward_model_weight  (1.0) the reward model's score's weight in the sum (with a reward model)
  reward_timeout_s     (null: no limit) the longest one reward function's call on a replica's rows may take
  reward_kwargs        ({}) built-in options: {"format": {"pattern": ...}, "overlong": {...}} (trainer/rl/rewards.py)
                       A row's score = sum_f reward_weights[f] x f's reward (functions returning None skipped:
                       TRL's nansum) + reward_model_weight x the RM score; reward_clip and missing_eos_penalty
                       apply to that score
  reward_clip          (5) the score is clipped to +-reward_clip
  missing_eos_penalty  (null) subtracted from the (clipped) score of answers that hit max_new_tokens without EOS
  clip_range (0.2), value_clip (0.2), gamma (1.0), lambda (0.95), whiten_advantages (true)
  entropy_coef         (0) entropy bonus in the actor's loss (PPO/entropy is reported either way)
  ptx_coef, ptx_data_path  (0, none) InstructGPT's PPO-ptx: after each actor minibatch step, one more actor
                       step on a batch of LM records from ptx_data_path (any SFT data) with loss ptx_coef x
                       the token-mean LM loss (DeepSpeed-Chat's unsupervised step; the schedulers count it)
  ema_decay            (none) keep an EMA of the actor (e.g. 0.992, DeepSpeed-Chat's), saved in SAVE_PATH/ema
  disable_dropout      (true) no dropout in the actor and critic while training (TRL's default): the first
                       minibatch's ratio is then exactly the rollout's
  critic               DeepSpeed overrides for the critic engine: {"optimizer", "scheduler",
                       "gradient_clipping"} (default: the actor's), and "parts" (its layers per stage)
  ref_parts, reward_parts   layers per stage of the frozen models (default: the actor's / the critic's)
  frozen_bf16          (false) hold the reference and the reward model in bf16 whatever the training
                       precision (half their memory; a GPU option: bf16 on CPU is ~20x slower)
"""
import json
from dataclasses import dataclass, field
from typing import Optional, Union

from trainer.config import section_problems, type_problems
from trainer.rl.ppo_math import KL_ESTIMATORS, KL_LOSS_ESTIMATORS
from trainer.rl.rewards import reward_problems
from trainer.rl.rollout_options import RolloutOptions

PATH_KEYS = ("actor_path", "critic_path", "reward_path")  # ref_path is shared with DPO
CRITIC_KEYS = ("optimizer", "scheduler", "gradient_clipping", "parts")


@dataclass(frozen=True)
class PPOOptions(RolloutOptions):
    """Stage "ppo"'s keys: the module docstring. Built from the top-level paths and the "ppo" object."""
    LABEL = "PPO"
    KEYS = ("actor_path", "critic_path", "reward_path", "ref_path", "ppo")

    actor_path: str = ""
    critic_path: str = ""
    ref_path: Optional[str] = None  # None: actor_path
    reward_path: Optional[str] = None  # None: critic_path, unless reward_funcs (then no reward model)
    rollout_batch_size: Optional[int] = None  # None: train_batch_size
    n_samples_per_prompt: int = 1
    max_new_tokens: int = 64
    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    ppo_epochs: int = 1
    kl_coef: float = 0.1
    kl_estimator: str = "k1"
    kl_in_reward: bool = True
    reward_clip: float = 5.0
    missing_eos_penalty: Optional[float] = None
    clip_range: float = 0.2
    value_clip: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    frozen_bf16: bool = False
    disable_dropout: bool = True
    logprobs_at_temperature: bool = False
    entropy_coef: float = 0.0
    ptx_coef: float = 0.0
    ptx_data_path: Union[str, list, None] = None
    ema_decay: Optional[float] = None
    reward_funcs: tuple = ()
    reward_weights: Optional[tuple] = None
    reward_model_weight: float = 1.0
    reward_timeout_s: Optional[float] = None
    reward_kwargs: dict = field(default_factory=dict)
    critic: dict = field(default_factory=dict)
    ref_parts: Union[list, str, None] = None
    reward_parts: Union[list, str, None] = None

    @classmethod
    def from_keys(cls, keys: dict) -> "PPOOptions":
        section = dict(keys.get("ppo") or {})
        if "lambda" in section:
            section["lam"] = section.pop("lambda")
        for key in ("reward_funcs", "reward_weights"):
            if section.get(key) is not None:
                section[key] = tuple(section[key])
        return cls(**{k: v for k, v in keys.items() if k != "ppo"}, **section)

    @classmethod
    def problems(cls, keys: dict, project: dict, ds: dict, pipe: Optional[int]) -> list[str]:
        return problems(keys, project, ds, pipe)

    @property
    def logprob_temperature(self) -> float:
        """The temperature of every log-prob PPO uses (ratio, KL, entropy, the generator's for logprob_gap)."""
        return self.temperature if self.logprobs_at_temperature and not self.greedy else 1.0

    @property
    def reference_path(self) -> str:
        return self.ref_path or self.actor_path

    @property
    def builds_reward_model(self) -> bool:
        """Without reward functions always (reward_path defaults to critic_path); with them only when
        reward_path is given."""
        return not self.reward_funcs or bool(self.reward_path)

    @property
    def reward_model_path(self) -> Optional[str]:
        return (self.reward_path or self.critic_path) if self.builds_reward_model else None


_NUMBERS = ("temperature", "top_p", "repetition_penalty", "kl_coef", "reward_clip", "clip_range", "value_clip", "gamma",
            "lambda", "entropy_coef", "missing_eos_penalty", "ptx_coef", "ema_decay", "reward_model_weight",
            "reward_timeout_s")
_INTEGERS = ("rollout_batch_size", "n_samples_per_prompt", "max_new_tokens", "top_k", "ppo_epochs")
_BOOLS = ("greedy", "kl_in_reward", "whiten_advantages", "frozen_bf16", "disable_dropout", "logprobs_at_temperature")
KEYS = _NUMBERS + _INTEGERS + _BOOLS + ("kl_estimator", "critic", "ref_parts", "reward_parts", "ptx_data_path", "reward_funcs",
                                        "reward_weights", "reward_kwargs")


def problems(keys: dict, project: dict, ds: dict, pipe: Optional[int]) -> list[str]:
    """What is wrong with a stage "ppo" config (its PPO keys, the shared project keys, and the DeepSpeed
    keys after the batch triple was filled); [] when nothing is. Keys named as the user writes them."""
    out = type_problems(keys, {"actor_path": str, "critic_path": str, "reward_path": str, "ref_path": str, "ppo": dict})
    if out:
        return out
    for key in ("actor_path", "critic_path"):
        if not keys.get(key):
            out.append(f"stage \"ppo\" needs {key!r} (the {'policy: an SFT run' if key == 'actor_path' else 'value model: an RM run'}'s save_path)")
    if project.get("from_scratch"):
        out.append("stage \"ppo\" starts from trained models (actor_path, critic_path); from_scratch is not supported")
    raw = keys.get("ppo", {})
    out.extend(section_problems("ppo", raw, KEYS, _NUMBERS, _INTEGERS, _BOOLS))
    out.extend(reward_problems("ppo", raw))
    if raw.get("reward_funcs") and not keys.get("reward_path"):
        unused = [k for k in ("reward_model_weight", "reward_parts") if k in raw]
        if unused:
            out.append(f"{', '.join(f'ppo.{k}' for k in unused)} set, but with ppo.reward_funcs the reward model is built "
                       "only when reward_path is given: add reward_path (its score joins the functions' sum) or remove "
                       f"{'them' if len(unused) > 1 else 'it'}")
    if raw.get("kl_estimator", "k1") not in KL_ESTIMATORS:
        out.append(f"ppo.kl_estimator must be one of {list(KL_ESTIMATORS)}, got {raw['kl_estimator']!r}")
    elif raw.get("kl_in_reward") is False and raw.get("kl_estimator", "k1") not in KL_LOSS_ESTIMATORS:
        out.append('ppo.kl_in_reward false puts the KL in the actor\'s loss, where "k1" has a zero gradient in '
                   'expectation: use "kl_estimator": "k2" (its gradient is that of KL(policy || reference)) or "k3" '
                   "(that of KL(reference || policy))")
    critic = raw.get("critic", {})
    if not isinstance(critic, dict) or set(critic) - set(CRITIC_KEYS):
        out.append(f"ppo.critic must be an object with keys among {list(CRITIC_KEYS)}, got {json.dumps(critic)}")
    for name, parts in (("ppo.critic.parts", critic.get("parts") if isinstance(critic, dict) else None),
                        ("ppo.ref_parts", raw.get("ref_parts")), ("ppo.reward_parts", raw.get("reward_parts"))):
        if parts is None or parts == "auto":
            continue
        if not (isinstance(parts, list) and all(isinstance(p, int) and not isinstance(p, bool) and p >= 1 for p in parts)):
            out.append(f'{name} must be a list of layer counts (one per stage) or "auto", got {json.dumps(parts)}')
        elif pipe is not None and len(parts) != pipe:
            out.append(f"{name} has {len(parts)} entries but model_topo says {pipe} pipeline stages")
    if isinstance(critic, dict) and any(isinstance(critic.get(k), dict) for k in ("optimizer", "scheduler")):
        from trainer.engine.deepspeed_config import nested_params_problems

        found: list[str] = []  # the critic's engine takes these in place of the actor's (ppo_models.critic_config)
        nested_params_problems({**ds, **{k: critic[k] for k in ("optimizer", "scheduler") if isinstance(critic.get(k), dict)}},
                               found)
        out += [f"ppo.critic.{p}" for p in found if p.startswith(tuple(k for k in ("optimizer", "scheduler") if k in critic))]
    if out:
        return out
    opts = PPOOptions.from_keys(keys)
    for key in ("clip_range", "value_clip", "reward_clip", "temperature"):
        if getattr(opts, key) <= 0:
            out.append(f"ppo.{key} must be positive, got {getattr(opts, key)}")
    if opts.ema_decay is not None and not 0 < opts.ema_decay < 1:
        out.append(f"ppo.ema_decay must be in (0, 1) (e.g. 0.992), got {opts.ema_decay}")
    if opts.ptx_coef and not opts.ptx_data_path:
        out.append("ppo.ptx_coef needs ppo.ptx_data_path (the LM records of the ptx term, e.g. the SFT data)")
    elif opts.ptx_data_path is not None:
        from data.sources import data_path_problems

        out.extend(data_path_problems(opts.ptx_data_path, "ppo.ptx_data_path"))
    for key in ("kl_coef", "entropy_coef", "ptx_coef"):
        if getattr(opts, key) < 0:
            out.append(f"ppo.{key} must not be negative, got {getattr(opts, key)}")
    if not 0 <= opts.gamma <= 1 or not 0 <= opts.lam <= 1:
        out.append(f"ppo.gamma and ppo.lambda must be in [0, 1], got {opts.gamma} and {opts.lam}")
    if not 0 < opts.top_p <= 1:
        out.append(f"ppo.top_p must be in (0, 1] (1 disables it), got {opts.top_p}")
    out.extend(opts.rollout_problems("ppo", ds))
    return out
