"""Training checkpoints that resume exactly and never leave `latest` pointing at a partial save.

    SAVE_PATH/
      latest                       tag of the newest *complete* checkpoint (moved last, atomically)
      config.json, tokenizer files, generation_config.json, pipetune.json   (model side files)
      train_config.json            the training config as given
      global_stepN/
        layer_XX-model_states.pt   DeepSpeed's per-layer weights (what pp_to_hg reads)
        mp_rank_*_model_states.pt, *optim_states.pt   DeepSpeed's optimizer/scheduler state
        trainer_state.json         step, epoch, data position, loss history
        rng_rank_RRRR.pt           each rank's torch / numpy / python RNG state

DeepSpeed's own `save_checkpoint(save_latest=True)` writes `latest` before our extra state exists,
so we save with save_latest=False, add our files, wait for every rank, and only then replace
`latest` (write a temporary file, os.replace). A kill at any point leaves the previous checkpoint
loadable. Old tags beyond keep_last are removed after `latest` has moved.
"""
import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from models.pipe_dir import copy_side_files, write_metadata

from .guards import check_finite_weights

logger = logging.getLogger("pipetune")
TOPOLOGY_FILE = "topology.json"
TAG_RE = re.compile(r"^global_step(\d+)$")
# Test hook: SIGKILL this process after DeepSpeed wrote the checkpoint but before `latest` moved.
KILL_DURING_SAVE_ENV = "PIPETUNE_TEST_KILL_DURING_SAVE_AT_STEP"


def tag_for(step: int) -> str:
    return f"global_step{step}"


def prepare_save_path(save_path: str, plan, config_path: str, dtype: str) -> None:
    """Rank 0, once: the side files that make SAVE_PATH a self-contained pipeline checkpoint."""
    out = Path(save_path)
    out.mkdir(parents=True, exist_ok=True)
    copy_side_files([plan.side_dir], out, skip=("config.json",))
    plan.model_config.save_pretrained(out)  # the config actually trained (with its dtype, attn set on load)
    write_metadata(out, model_type=plan.model_config.model_type, num_pipe_layers=len(plan.layer_names),
                   layer_names=plan.layer_names, tie_word_embeddings=bool(getattr(plan.model_config, "tie_word_embeddings", False)),
                   head=plan.head, dtype=dtype, source=str(plan.side_dir.resolve()))
    shutil.copy2(config_path, out / "train_config.json")


def write_topology(save_path: str, plan, topo, hosts: list[str]) -> None:
    """SAVE_PATH/topology.json: which stage, and which nodes, hold each pipe layer. pp_to_hg uses it
    to say where a missing layer file was written (node-local save_paths)."""
    stage_hosts = {str(s): sorted({hosts[r] for r in topo.ranks_of_stage(s)}) for s in range(len(plan.parts))}
    layer_stage = [s for s, n in enumerate(plan.parts) for _ in range(n)]
    _write_json_atomic(Path(save_path) / TOPOLOGY_FILE, {"parts": plan.parts, "data_parallel": topo.data,
                                                         "layer_names": plan.layer_names, "layer_stage": layer_stage,
                                                         "stage_hosts": stage_hosts})


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


@dataclass
class TrainState:
    """What a recipe's loop carries between steps and saves in trainer_state.json (with the data
    position)."""
    step: int = 0
    history: list = field(default_factory=list)   # [[step, loss], ...]
    evals: list = field(default_factory=list)     # [[step, {metric: value}], ...]


def start_or_resume(engine, save_path: str, resume_from: Optional[tuple[str, str]], batches) -> TrainState:
    """Collective. A fresh TrainState, or the one of checkpoint `resume_from` (root, tag) with the
    engine, optimizer, scheduler, data position (`batches`, None on ranks without data) and RNG
    restored."""
    if not resume_from:
        return TrainState()
    saved = load(engine, *resume_from)
    if batches is not None:
        batches.load_state_dict(saved["data"])
    if torch.distributed.get_rank() == 0:
        logger.info("resumed from %s/%s at step %d", resume_from[0], resume_from[1], saved["step"])
    return TrainState(saved["step"], saved["history"], saved["evals"])


def save_training(engine, save_path: str, state: TrainState, batches, keep_last: int) -> str:
    """Collective: refuse non-finite weights, then save the engine with the trainer state and the
    data position of rank 0 (a data rank: every replica's position follows from it)."""
    import deepspeed.comm as dist

    check_finite_weights(engine.module, state.step)
    data = batches.state_dict() if dist.get_rank() == 0 else None
    box = [data]
    dist.broadcast_object_list(box, src=0)
    trainer_state = {"step": state.step, "history": state.history, "evals": state.evals, "data": box[0]}
    return save(engine, save_path, state.step, trainer_state, keep_last)


def save(engine, save_path: str, step: int, trainer_state: dict, keep_last: int) -> str:
    """Collective: every rank calls it."""
    import deepspeed.comm as dist

    tag = tag_for(step)
    engine.save_checkpoint(save_path, tag=tag, save_latest=False)
    tag_dir = Path(save_path) / tag
    rank = dist.get_rank()
    torch.save(rng_state(), tag_dir / f"rng_rank_{rank:04d}.pt")
    if rank == 0:
        _write_json_atomic(tag_dir / "trainer_state.json", trainer_state)
    dist.barrier()
    if os.environ.get(KILL_DURING_SAVE_ENV) == str(step):
        os.kill(os.getpid(), 9)
    if rank == 0:
        _write_text_atomic(Path(save_path) / "latest", tag)
        prune(save_path, keep_last, keep=tag)
    dist.barrier()
    return tag


def prune(save_path: str, keep_last: int, keep: str) -> list[str]:
    tags = sorted((int(m.group(1)), p) for p in Path(save_path).iterdir() if (m := TAG_RE.match(p.name)) and p.is_dir())
    removed = []
    for _, path in tags[:-keep_last] if keep_last > 0 else []:
        if path.name != keep:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed


def find_resume_tag(save_path: str, resume: str) -> Optional[tuple[str, str]]:
    """(checkpoint root, tag) to resume from, or None to start fresh."""
    if resume == "never":
        return None
    if resume == "auto":
        latest = Path(save_path) / "latest"
        return (save_path, latest.read_text().strip()) if latest.is_file() else None
    path = Path(resume)
    if (path / "latest").is_file():
        return str(path), (path / "latest").read_text().strip()
    if TAG_RE.match(path.name) and path.is_dir():
        return str(path.parent), path.name
    raise FileNotFoundError(f"resume: {resume} is neither a save_path with a 'latest' file nor a global_stepN folder")


def load(engine, root: str, tag: str) -> dict:
    """Collective. Restores module, optimizer and scheduler (DeepSpeed), this rank's RNG, and
    returns trainer_state.json."""
    import deepspeed.comm as dist

    load_path, _ = engine.load_checkpoint(root, tag=tag, load_module_strict=True, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if load_path is None:
        raise FileNotFoundError(f"DeepSpeed could not load checkpoint {tag} from {root}")
    tag_dir = Path(root) / tag
    rng_file = tag_dir / f"rng_rank_{dist.get_rank():04d}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return json.loads((tag_dir / "trainer_state.json").read_text())


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_json_atomic(path: Path, data: dict) -> None:
    _write_text_atomic(path, json.dumps(data, indent=1) + "\n")
