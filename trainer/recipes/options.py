"""The options of the recipes whose algorithms have no module of their own in trainer/rl/: SFT and the
reward model. (DPO's are trainer.rl.dpo.DPOOptions, PPO's trainer.rl.ppo_options.PPOOptions.)"""
from dataclasses import dataclass
from typing import Any

from trainer.config import RecipeOptions
from trainer.generation.eval_samples import EvalSamples, config_problems


@dataclass(frozen=True)
class SFTOptions(RecipeOptions):
    """Stage "sft"'s keys:
      eval_samples   at each eval, generate for this many eval-split prompts on the pipeline (greedy, 64 new
                     tokens; or {"n", "max_new_tokens", "greedy", "temperature", ...}) -> save_path/eval_samples.jsonl
                     (trainer/generation/eval_samples.py)"""
    LABEL = "SFT"
    KEYS = ("eval_samples",)

    eval_samples: Any = 0  # int or dict, as written

    @classmethod
    def problems(cls, keys: dict, project: dict, ds: dict, pipe) -> list[str]:
        return config_problems(keys["eval_samples"]) if "eval_samples" in keys else []

    @property
    def samples(self) -> EvalSamples:
        return EvalSamples.from_config(self.eval_samples)


@dataclass(frozen=True)
class RMOptions(RecipeOptions):
    """Stage "rm" has no keys of its own: pairwise (or ranked) records, a value head, the shared keys."""
    LABEL = "RM"
    lm_head_loss = False

    def micro_batch_shape(self, cfg) -> tuple[int, int]:
        # both sides of each pair; ranked records hold K rows each, K known only from the data, so
        # this is a lower bound for them
        return 2 * cfg.micro_batch, cfg.max_seq_len
