"""Optimizers: DeepSpeed's own (AdamW, Adam, SGD, Lion, ...) built by DeepSpeed from the config,
or Lion from lion-pytorch (`"optimizer": {"type": "LionPytorch", "params": {...}}`), built here and
handed to DeepSpeed. Weight decay is excluded for biases and norm weights (configurable: no_decay).
"""
import importlib.util
import logging

import torch

logger = logging.getLogger(__name__)
LION_PYTORCH_TYPES = {"lionpytorch", "lion_pytorch", "lion-pytorch"}


def param_groups(module: torch.nn.Module, no_decay: tuple[str, ...]) -> list[dict]:
    """[decayed params, params with weight_decay 0]. A name matches no_decay when it ends with one of
    the patterns (so "bias" catches every bias, "norm.weight" every *norm.weight)."""
    decay, no = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no if any(name.endswith(pat) for pat in no_decay) else decay).append(p)
    groups = [{"params": decay, "name": "decay"}]
    if no:
        groups.append({"params": no, "weight_decay": 0.0, "name": "no_decay"})
    return groups


def is_lion_pytorch(ds_config: dict) -> bool:
    return str(ds_config.get("optimizer", {}).get("type", "")).lower() in LION_PYTORCH_TYPES


def triton_usable() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("triton") is not None


def build_lion_pytorch(groups: list[dict], params: dict):
    """lion_pytorch.Lion. Its `use_triton=True` path calls exit() (status 0!) when triton is
    missing, which would end training silently: use triton only where it and CUDA are there."""
    from lion_pytorch import Lion

    params = dict(params)
    if params.get("use_triton") and not triton_usable():
        logger.warning("LionPytorch: use_triton needs CUDA and triton; using the plain PyTorch implementation")
        params["use_triton"] = False
    try:
        return Lion(groups, **params)
    except SystemExit:
        raise RuntimeError("lion-pytorch tried to exit the process while building its optimizer (triton import failed)") from None
    except TypeError as e:
        raise ValueError(f"optimizer.params for LionPytorch: {e} (valid: lr, betas, weight_decay, use_triton, decoupled_weight_decay)") from None


def check_deepspeed_lion(ds_config: dict, on_cuda: bool) -> None:
    """DeepSpeed's own "Lion" on CPU exists only as DeepSpeedCPULion (ZeRO-1 + CPU optimizer offload)."""
    opt = str(ds_config.get("optimizer", {}).get("type", "")).lower()
    if opt != "lion" or on_cuda:
        return
    zero = ds_config.get("zero_optimization", {})
    offload = zero.get("offload_optimizer", {}).get("device")
    if zero.get("stage", 0) != 1 or offload != "cpu":
        raise ValueError(
            'optimizer type "Lion" (DeepSpeed\'s) runs on CPU only with zero_optimization {"stage": 1, '
            '"offload_optimizer": {"device": "cpu"}}; add that, or use "LionPytorch"'
        )
