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


DEFAULT_HOOKS = {"exports": default_exports, "state_result": lambda summary: {}, "write_plots": lambda result, headline: None}


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


__all__ = ["RECIPES", "ConfigError", "get_recipe", "load_config", "options_classes", "recipe_hook", "recipe_module", "validate_config"]
