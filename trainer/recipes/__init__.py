"""Training recipes, and the one registry of them: config "stage" -> the recipe's module and its
options class.

A recipe module has one entry function, `run(cfg, topo, device_name)`, that shows its whole run top
to bottom, owns its loop and returns its summary dict. Its options class (a trainer.config.RecipeOptions)
declares the top-level config keys the recipe owns, their defaults and their checks; the validated
options are `cfg.options`. The shared keys are trainer/config.py's.

The RLHF chain (trainer/chain.py, rlhf.py) runs recipes one after another and asks each recipe's module
(`recipe_module(stage)`) what its step leaves and reports, through small functions at the module's end:

    exports(cfg) -> [(pipeline checkpoint, HF folder)]   what the chain converts with pp_to_hg after
                                                          the step (PPO: the actor, the critic, the EMA)
    state_result(summary) -> dict     what rlhf_state.json keeps of run()'s summary besides the steps,
                                      the first/last train loss and the last eval (PPO: its reward curve)
    headline(result, cfg) -> dict     the step's numbers in summary.json, from that kept result
    headline_text(headline) -> str    the same as one line of the printed summary (summary.txt)
    write_plots(result, headline)     optional: files the headline names (PPO's reward curve)

A recipe that a chain runs defines headline and headline_text; exports, state_result and write_plots
default to `DEFAULT_HOOKS` (the model -> save_path/hf; nothing kept; no plot). chain.py names no recipe
in its logic and reads every hook through `recipe_hook`.
"""
import importlib
import os
from pathlib import Path
from typing import Optional

from trainer.config import ConfigError, TrainConfig, read_config_json, validate

# stage -> (the module with run(), "module:Class" of its options). Options modules import no engine,
# so validating a config stays light.
RECIPES = {
    "sft": ("trainer.recipes.sft", "trainer.recipes.options:SFTOptions"),
    "rm": ("trainer.recipes.rm", "trainer.recipes.options:RMOptions"),
    "dpo": ("trainer.recipes.dpo", "trainer.rl.dpo:DPOOptions"),
    "ppo": ("trainer.recipes.ppo", "trainer.rl.ppo_options:PPOOptions"),
    "grpo": ("trainer.recipes.grpo", "trainer.rl.grpo_options:GRPOOptions"),
}


def options_classes() -> dict:
    """stage -> its options class, in registry order."""
    out = {}
    for stage, (_, where) in RECIPES.items():
        module, name = where.split(":")
        out[stage] = getattr(importlib.import_module(module), name)
    return out


def recipe_module(name: str):
    """The module of recipe `name` (config "stage"): its run() and the chain's hooks."""
    if name not in RECIPES:
        raise ValueError(f"unknown stage {name!r}; use one of {sorted(RECIPES)}")
    return importlib.import_module(RECIPES[name][0])


def default_exports(cfg) -> list:
    save = Path(cfg.save_path)
    return [(save, save / "hf")]


DEFAULT_HOOKS = {"exports": default_exports, "state_result": lambda summary: {}, "write_plots": lambda result, headline: None,
                 "headline": lambda result, cfg: {}, "headline_text": lambda numbers: ""}


def recipe_hook(name: str, hook: str):
    """Recipe `name`'s chain hook `hook` (the module docstring lists them), or its default."""
    module = recipe_module(name)
    return getattr(module, hook) if hasattr(module, hook) else DEFAULT_HOOKS[hook]


def get_recipe(name: str):
    """The `run` function of recipe `name` (config "stage")."""
    return recipe_module(name).run


def validate_config(raw: dict, path: str = "<config>", world_size: Optional[int] = None,
                    device_supports_fp16: bool = True) -> TrainConfig:
    """The shared keys (trainer.config) and the recipe's own keys (its options class) of a config
    object; ConfigError listing every problem."""
    return validate(raw, path, world_size, device_supports_fp16, options_classes())


def load_config(path: str, world_size: Optional[int] = None, device_supports_fp16: bool = True) -> TrainConfig:
    """Read and validate a config file; ConfigError listing every problem found."""
    return validate_config(read_config_json(path), path, world_size, device_supports_fp16)


def step_result(name: str, summary: dict) -> dict:
    """What the summary needs from a recipe's summary: steps, first/last train loss, the last eval,
    and what the recipe keeps besides (its state_result: PPO's reward curve, DPO's last train metrics)."""
    history = summary["history"]
    result = {"steps": summary["step"], "train_loss_first": history[0][1] if history else None,
              "train_loss_last": history[-1][1] if history else None}
    if summary["evals"]:
        result["eval_step"], result["eval"] = summary["evals"][-1]
    result.update(recipe_hook(name, "state_result")(summary))
    return result


def done_line(cfg, summary: dict) -> str:
    """train_ds.py's last line (rank 0), in the words of the RLHF summary: the recipe's headline
    (SFT eval loss, RM accuracy, PPO reward start -> end, DPO eval rewards) besides the final train
    loss, after writing the recipe's plots (PPO's reward curve); a run that found its config already
    trained says so and how to train further."""
    from trainer.metrics import format_number

    if summary.get("start_step") is not None and summary["step"] == summary["start_step"]:
        return (f"done: nothing to train: {cfg.save_path} already holds step {summary['step']}, the end of this config "
                "(resume \"auto\"); to train further raise train_steps or n_epochs, or give another save_path to start over")
    result = step_result(cfg.stage, summary)
    numbers = recipe_hook(cfg.stage, "headline")(result, cfg)
    recipe_hook(cfg.stage, "write_plots")(result, numbers)
    return (f"done: {summary['step']} steps, final train loss {format_number(result['train_loss_last'])}; "
            f"{recipe_hook(cfg.stage, 'headline_text')(numbers)}; checkpoints in {cfg.save_path}")


# The config keys naming models a recipe starts from (besides model_path), and data files.
MODEL_PATH_KEYS = ("actor_path", "critic_path", "ref_path", "reward_path")
DATA_PATH_KEYS = ("data_path", "eval_data_path", "ptx_data_path")


def missing_inputs(cfg: TrainConfig) -> list[str]:
    """The models and data files cfg names that are not there, one line each naming the key: checked by
    train_ds.py before the ranks meet, so a typo'd path is a config error (exit status 2), not a
    preflight failure about nodes. (The chain checks its steps' inputs itself: trainer/chain.py.)"""
    from data.sources import expand_paths

    problems = []
    if not os.path.exists(cfg.model_path):
        problems.append(f"model_path {cfg.model_path} does not exist (give a hg_to_pp output, a training save_path or a "
                        "global_stepN folder)")
    for key in MODEL_PATH_KEYS:
        path = getattr(cfg.options, key, None)
        if path and path != cfg.model_path and not os.path.exists(path):
            problems.append(f"{key} {path} does not exist")
    for key in DATA_PATH_KEYS:
        value = getattr(cfg, key, None) if hasattr(cfg, key) else getattr(cfg.options, key, None)
        if value is not None:
            problems += [f"{key}: {p}" for p in expand_paths(value)[1] if p.reason == "missing_file"]
    return problems


def load_checked_config(path: str, world_size: Optional[int] = None, device_supports_fp16: bool = True) -> TrainConfig:
    """load_config, then its models and data files must exist (ConfigError naming the keys). On a
    multi-node job only the first node checks here (its node rank: DeepSpeed's CROSS_RANK, torchrun's
    GROUP_RANK): the other nodes meet rank 0, and the preflight names the node that cannot see a path
    (a node that stopped here would leave rank 0 waiting for it)."""
    cfg = load_config(path, world_size, device_supports_fp16)
    if os.environ.get("CROSS_RANK", os.environ.get("GROUP_RANK", "0")) == "0":
        problems = missing_inputs(cfg)
        if problems:
            raise ConfigError(path, problems)
    return cfg


__all__ = ["RECIPES", "ConfigError", "get_recipe", "load_checked_config", "load_config", "missing_inputs", "options_classes", "recipe_hook", "recipe_module", "step_result", "validate_config"]
