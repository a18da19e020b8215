"""Each rank's RNG state in a checkpoint, stored without pickles:

    rng_rank_RRRR.safetensors   torch (CPU), cuda.<device>, deepspeed_checkpointing.<stream>: uint8 state tensors
    rng_rank_RRRR.json          numpy's and python's states as lists, and the tensors' roles

`trainer.engine.checkpoint.rng_state()`'s dict <-> these two files. Checkpoints written before (one pickled
`rng_rank_RRRR.pt`) still resume: that file is read with weights_only=True, numpy's array types
allowed, and anything else in it is refused (FileRefused); a warning says so once.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from trainer.files import load_tensors, refused, write_atomic, write_json_atomic

logger = logging.getLogger("pipetune")
FORMAT = 1


def rng_files(tag_dir, rank: int) -> tuple[Path, Path, Path]:
    """(tensors, json, legacy pickle) paths of rank `rank`'s RNG state in tag_dir."""
    stem = Path(tag_dir) / f"rng_rank_{rank:04d}"
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json"), stem.with_suffix(".pt")


def save_rng_state(state: dict, tag_dir, rank: int) -> None:
    """Write `state` (trainer.engine.checkpoint.rng_state()) as tensors + JSON; the JSON is written last,
    so its presence means both files are whole."""
    from safetensors.torch import save

    tensors_path, json_path, _ = rng_files(tag_dir, rank)
    tensors = {"torch": state["torch"]}
    tensors.update({f"cuda.{i}": s for i, s in enumerate(state.get("cuda", []))})
    tensors.update({f"deepspeed_checkpointing.{k}": s for k, s in state.get("deepspeed_checkpointing", {}).items()})
    write_atomic(tensors_path, save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    version, internal, gauss_next = state["python"]
    write_json_atomic(json_path, {
        "format": FORMAT,
        "numpy": [kind, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
        "python": [version, list(internal), gauss_next],
        "cuda_devices": len(state.get("cuda", [])),
        "deepspeed_checkpointing": sorted(state.get("deepspeed_checkpointing", {})),
    })


def load_rng_state(tag_dir, rank: int):
    """Rank `rank`'s RNG state dict from tag_dir, or None when the checkpoint has none."""
    tensors_path, json_path, legacy = rng_files(tag_dir, rank)
    if json_path.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        meta = json.loads(json_path.read_text())
        try:
            tensors = load_file(str(tensors_path))
        except (SafetensorError, OSError) as e:
            raise refused(tensors_path, e) from None
        kind, keys, pos, has_gauss, cached = meta["numpy"]
        version, internal, gauss_next = meta["python"]
        state = {"torch": tensors["torch"],
                 "numpy": (kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached),
                 "python": (version, tuple(internal), gauss_next)}
        if meta.get("cuda_devices"):
            state["cuda"] = [tensors[f"cuda.{i}"] for i in range(meta["cuda_devices"])]
        if meta.get("deepspeed_checkpointing"):
            state["deepspeed_checkpointing"] = {k: tensors[f"deepspeed_checkpointing.{k}"] for k in meta["deepspeed_checkpointing"]}
        return state
    if legacy.is_file():
        if rank == 0:
            logger.warning("%s: RNG state in the pickled format of checkpoints written before pipetune stored it as "
                           "tensors + JSON; read with weights_only=True (numpy arrays allowed, nothing else). The next "
                           "save writes the new format", legacy)
        return load_legacy_rng_state(legacy)
    return None


def load_legacy_rng_state(path) -> dict:
    """An old rng_rank_RRRR.pt: torch.load(weights_only=True) with numpy's array reconstruction and
    dtypes allowed (numpy's RNG state is a uint32 array); any other object is refused."""
    allowed = [np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    try:
        allowed.append(np._core.multiarray._reconstruct)
    except AttributeError:  # numpy < 2
        allowed.append(np.core.multiarray._reconstruct)
    with torch.serialization.safe_globals(allowed):
        state = load_tensors(path)
    if not isinstance(state, dict) or "torch" not in state:
        raise refused(path, ValueError("not an RNG state dict"))
    return state
