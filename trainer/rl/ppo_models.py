"""PPO's four models on the same ranks (three when reward functions score alone): the config each is
built with (the critic's own optimizer settings, bf16 frozen models), their joint "auto" split, and the
checks before any engine exists."""
import dataclasses
import logging

from models.pipe_dir import CheckpointError, read_metadata, resolve_checkpoint_dir
from trainer.config import ModelTopo
from trainer.engine.plan import ModelSpec, log_co_resident, plan_co_resident

logger = logging.getLogger("pipetune")
MONITOR_KEYS = ("tensorboard", "csv_monitor", "wandb", "comet")
MODELS = "ppo: the actor, critic, reference and reward model"


def model_configs(cfg, opts) -> dict:
    """key (the config key naming the model) -> ModelSpec, in the order actor, critic, reference, reward;
    no reward model when reward functions score alone (PPOOptions.builds_reward_model)."""
    critic_parts = opts.critic.get("parts")
    frozen = frozen_config(cfg, opts)
    specs = {"actor_path": ModelSpec(cfg, "lm", opts.actor_path, False),
             "critic_path": ModelSpec(critic_config(cfg, opts), "value", opts.critic_path, False),
             "ref_path": ModelSpec(with_parts(frozen, opts.ref_parts), "lm", opts.reference_path, True)}
    if opts.builds_reward_model:
        specs["reward_path"] = ModelSpec(with_parts(frozen, opts.reward_parts or critic_parts), "value",
                                         opts.reward_model_path, True)
    return specs


def plan_models(cfg, opts, device_budget, specs=None) -> dict:
    """The models' plans, "auto" parts fitting them together on each stage
    (trainer.engine.plan.plan_co_resident); device_budget None: no memory limit."""
    return plan_co_resident(specs or model_configs(cfg, opts), device_budget, MODELS,
                            hint=". ppo.frozen_bf16 halves the reference and reward model; the actor's generation (the KV "
                                 "cache of every rollout row of a replica) shrinks with fewer rows per replica "
                                 "(rollout_batch_size x n_samples_per_prompt / data-parallel size) or a smaller "
                                 "max_new_tokens")


def log_plans(specs: dict, plans: dict) -> None:
    log_co_resident(specs, plans, "ppo")


def with_parts(cfg, parts):
    """cfg with another model's layers per stage (None: cfg's own)."""
    if parts is None:
        return cfg
    return dataclasses.replace(cfg, model_topo=ModelTopo(cfg.model_topo.pipe, cfg.model_topo.data, parts))


def critic_config(cfg, opts):
    """The critic engine's config: the actor's DeepSpeed config with the critic's optimizer /
    scheduler / clipping overrides and no monitor (every PPO metric goes through the actor's)."""
    ds = {k: v for k, v in cfg.ds_config.items() if k not in MONITOR_KEYS}
    ds.update({k: v for k, v in opts.critic.items() if k != "parts"})
    return dataclasses.replace(with_parts(cfg, opts.critic.get("parts")), ds_config=ds)


def frozen_config(cfg, opts):
    """The frozen engines' config: cfg's precision, or bf16 with ppo.frozen_bf16."""
    if not opts.frozen_bf16:
        return cfg
    ds = {k: v for k, v in cfg.ds_config.items() if k not in ("fp16", "bf16", "bfloat16")}
    return dataclasses.replace(cfg, ds_config={**ds, "bf16": {"enabled": True}})


def check_models(cfg, opts, tokenizer, plans: dict, label: str = "PPO") -> None:
    """Before any engine exists: heads as PPO needs them, one vocabulary, and room for the answers
    (`plans` keyed by config key: PPO's four, or GRPO's actor and its optional reference and reward model;
    `label` names the recipe in the messages)."""
    from transformers import AutoTokenizer

    actor = plans["actor_path"]
    for key, plan in plans.items():
        _, search = resolve_checkpoint_dir(plan.model_path)
        head = read_metadata(search).get("head", "lm")
        if key in ("actor_path", "ref_path") and head != "lm":
            raise CheckpointError(f"{key} {plan.model_path} has a {head} head; the actor and the reference need an LM "
                                  "head (an SFT run's save_path or a hg_to_pp folder)")
        if key == "reward_path" and head != "value":
            raise CheckpointError(f"reward_path {plan.model_path} has an LM head; the reward model must be a trained "
                                  "reward model (stage \"rm\"'s save_path)")
        if plan.model_config.vocab_size != actor.model_config.vocab_size:
            raise CheckpointError(f"{key} {plan.model_path} has a vocabulary of {plan.model_config.vocab_size} tokens, "
                                  f"actor_path {actor.model_path} has {actor.model_config.vocab_size}: "
                                  f"{label} scores the actor's token ids with every model, so all need the same tokenizer")
        if plan.side_dir != actor.side_dir and AutoTokenizer.from_pretrained(plan.side_dir).get_vocab() != tokenizer.get_vocab():
            raise CheckpointError(f"{key} {plan.model_path}: its tokenizer differs from actor_path's; {label} needs one "
                                  "tokenizer for all its models (train them from the same base)")
    context = getattr(actor.model_config, "max_position_embeddings", None)
    if context and opts.rollout_width(cfg.max_seq_len) > context:
        raise CheckpointError(f"max_seq_len {cfg.max_seq_len} (prompt tokens) + {label.lower()}.max_new_tokens {opts.max_new_tokens} > the "
                              f"actor's {context} positions: lower either")
