"""What the on-policy recipes (PPO, GRPO) share in their options: the actor is the run's model, a
step's rollout is rollout_batch_size prompts x n_samples_per_prompt rows at one fixed width, and the
reward keys (reward_funcs, reward_weights, ...: checked by trainer.rl.rewards.reward_problems)."""
from trainer.config import RecipeOptions


class RolloutOptions(RecipeOptions):
    """For an options dataclass with actor_path, rollout_batch_size, n_samples_per_prompt, max_new_tokens,
    reward_funcs and reward_weights, and a LABEL naming the recipe ("PPO")."""

    @property
    def section(self) -> str:
        """The config section the recipe's keys are in ("ppo"): messages name keys as SECTION.key."""
        return self.LABEL.lower()

    def weights(self) -> tuple:
        """One weight per reward function (reward_weights, default 1.0 each)."""
        return self.reward_weights or (1.0,) * len(self.reward_funcs)

    @classmethod
    def shared_defaults(cls, keys: dict) -> dict:
        # the actor is the run's model (its tokenizer, its parts)
        return {"model_path": keys["actor_path"]} if isinstance(keys.get("actor_path"), str) else {}

    def rollout_rows(self, train_batch_size: int) -> int:
        return (self.rollout_batch_size or train_batch_size) * self.n_samples_per_prompt

    def rollout_width(self, max_seq_len: int) -> int:
        """Columns of every rollout row: max_seq_len prompt tokens (left-padded) + max_new_tokens answer
        tokens (right-padded); the width of the training and scoring micro-batches (trainer.rl.rollout)."""
        return max_seq_len + self.max_new_tokens

    def micro_batch_shape(self, cfg) -> tuple[int, int]:
        return cfg.micro_batch, self.rollout_width(cfg.max_seq_len)

    def generation_shape(self, cfg) -> tuple[int, int, int]:
        """The actor generates every row of its replica's share of the rollout at once (prompt at
        max_seq_len columns, left-padded): the memory model counts its KV cache."""
        return self.rollout_rows(cfg.global_batch) // cfg.model_topo.data, cfg.max_seq_len, self.max_new_tokens

    def rollout_problems(self, section: str, ds: dict) -> list[str]:
        """A step's rollout against the DeepSpeed batch (ds: the batch triple filled in): whole minibatches
        of train_batch_size rows, and prompts that split evenly over the data-parallel replicas (each
        prompt's samples stay on one replica). section: the config section the keys are in ("ppo")."""
        tb = ds.get("train_batch_size")
        if not tb:
            return []
        out = []
        rows = self.rollout_rows(tb)
        if rows % tb:
            out.append(f"{section}: a rollout of rollout_batch_size {self.rollout_batch_size} x n_samples_per_prompt "
                       f"{self.n_samples_per_prompt} = {rows} rows is not a multiple of train_batch_size {tb} "
                       "(one minibatch per optimizer step); change either")
        replicas = tb // (ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"])
        prompts = self.rollout_batch_size or tb
        if prompts % replicas:
            out.append(f"{section}: {prompts} prompts per step (rollout_batch_size) cannot be shared evenly by the {replicas} "
                       "data-parallel replicas (each prompt's samples stay on one replica): make it a multiple of "
                       f"{replicas}")
        return out
