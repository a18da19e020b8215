"""Training recipes: each module has one entry function, `run(cfg, topo, device_name)`, that shows
its whole run top to bottom and owns its loop. config "stage" picks the recipe."""
import importlib

RECIPES = {"sft": "trainer.recipes.sft", "rm": "trainer.recipes.rm", "dpo": "trainer.recipes.dpo", "ppo": "trainer.recipes.ppo"}


def get_recipe(name: str):
    """The `run` function of recipe `name` (config "stage")."""
    if name not in RECIPES:
        raise ValueError(f"unknown stage {name!r}; use one of {sorted(RECIPES)}")
    return importlib.import_module(RECIPES[name]).run
