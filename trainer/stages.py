"""config "stage" -> the Stage that trains it."""


def get_stage(name: str):
    if name == "sft":
        from .sft import SFT

        return SFT
    if name == "rm":
        from .rm import REWARD

        return REWARD
    raise ValueError(f"unknown stage {name!r}; use sft or rm")
