"""Training checkpoints that resume exactly and never leave `latest` pointing at a partial save.

    SAVE_PATH/
      latest                       tag of the newest *complete* checkpoint (moved last, atomically)
      config.json, tokenizer files, generation_config.json, pipetune.json   (model side files)
      train_config.json            the training config as given
      global_stepN/
        layer_XX-model_states.pt   DeepSpeed's per-layer weights (what pp_to_hg reads)
        mp_rank_*_model_states.pt, *optim_states.pt   DeepSpeed's optimizer/scheduler state
        trainer_state.json         step, losses, evals, data position, the run's save order
        rng_rank_RRRR.safetensors  each rank's torch / CUDA / numpy / python / DeepSpeed
        rng_rank_RRRR.json         activation-checkpointing RNG state (trainer/engine/rng_files.py; no pickles)
      critic/, ema/                PPO's companions (`save`'s companions): each a save_path of its own
                                   (side files, global_stepN/, latest), complete before SAVE_PATH/latest moves

DeepSpeed's own `save_checkpoint(save_latest=True)` writes `latest` before our extra state exists,
so we save with save_latest=False, add our files, fsync every file of the checkpoint and its folder,
wait for every rank, and only then replace `latest` (temporary file, fsync, os.replace, fsync of
save_path). A kill or a machine crash at any point leaves the previous checkpoint loadable.

Node-local save_paths (each node sees only its own folder) work: the resume tag and the trainer
state are rank 0's, broadcast to every rank; each node's first local rank writes trainer_state.json
and `latest` and prunes its own folder; each rank writes its RNG file next to DeepSpeed's files.
Pruning keeps the last `keep_last` checkpoints in the order this run (and the runs it resumed from)
saved them, and the checkpoint this run resumed from; any other global_stepN folder is stale (an
abandoned continuation, e.g. after resuming an older tag) and is removed.
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

from compat.checkpoint_files import recording_save_errors
from compat.private_api import load_checkpoint_with_own_model_states
from models.pipe_dir import CheckpointError, copy_side_files, write_metadata
from trainer.engine.checkpoint_write import CheckpointWrite
from trainer.engine.distributed import broadcast_object
from trainer.engine.guards import check_finite_weights
from trainer.engine.rng_files import load_rng_state, save_rng_state
from trainer.files import fsync_tree, on_every_rank
from trainer.files import write_json_atomic as _write_json_atomic
from trainer.files import write_text_atomic as _write_text_atomic

logger = logging.getLogger("pipetune")
TOPOLOGY_FILE = "topology.json"
TAG_RE = re.compile(r"^global_step(\d+)$")
# Test hook: SIGKILL this process after DeepSpeed wrote the checkpoint but before `latest` moved.
KILL_DURING_SAVE_ENV = "PIPETUNE_TEST_KILL_DURING_SAVE_AT_STEP"


def tag_for(step: int) -> str:
    return f"global_step{step}"


def prepare_save_path(save_path: str, plan, config_path: str, dtype: str, pad_token_id: int,
                      template: Optional[str] = None) -> None:
    """Rank 0, once: the side files that make SAVE_PATH a self-contained pipeline checkpoint.
    pad_token_id: the pad the data used (pp_to_hg writes it into value-head exports). template: the
    prompt template training used, "pipetune" or "model" (default: the training config's "template"
    key); pp_to_hg exports it as the chat template and demo.py renders with it."""
    out = Path(save_path)
    out.mkdir(parents=True, exist_ok=True)
    copy_side_files([plan.side_dir], out, skip=("config.json",))
    plan.model_config.save_pretrained(out)  # the config actually trained (with its dtype, attn set on load)
    if template is None:
        template = json.loads(Path(config_path).read_text()).get("template", "pipetune")
    write_metadata(out, model_type=plan.model_config.model_type, num_pipe_layers=len(plan.layer_names),
                   layer_names=plan.layer_names, tie_word_embeddings=bool(getattr(plan.model_config, "tie_word_embeddings", False)),
                   head=plan.head, dtype=dtype, source=str(plan.side_dir.resolve()), pad_token_id=pad_token_id,
                   template=template)
    shutil.copy2(config_path, out / "train_config.json")


def write_topology(save_path: str, plan, topo, hosts: list[str]) -> None:
    """SAVE_PATH/topology.json: which stage, and which nodes, hold each pipe layer. pp_to_hg uses it
    to say where a missing layer file was written (node-local save_paths)."""
    stage_hosts = {str(s): sorted({hosts[r] for r in topo.ranks_of_stage(s)}) for s in range(len(plan.parts))}
    layer_stage = [s for s, n in enumerate(plan.parts) for _ in range(n)]
    _write_json_atomic(Path(save_path) / TOPOLOGY_FILE, {"parts": plan.parts, "data_parallel": topo.data,
                                                         "layer_names": plan.layer_names, "layer_stage": layer_stage,
                                                         "stage_hosts": stage_hosts})


@dataclass
class TrainState:
    """What a recipe's loop carries between steps and saves in trainer_state.json (with the data
    position)."""
    step: int = 0
    history: list = field(default_factory=list)     # [[step, loss], ...]
    evals: list = field(default_factory=list)       # [[step, {metric: value}], ...]
    saved_tags: list = field(default_factory=list)  # this lineage's checkpoints, in save order
    resumed_from: Optional[str] = None              # the tag this run started from (never pruned by it)
    extra: dict = field(default_factory=dict)       # what the recipe added to the resumed trainer_state.json


def find_resume_tag(save_path: str, resume: str) -> Optional[tuple[str, str]]:
    """(checkpoint root, tag) to resume from, or None to start fresh (this node's view)."""
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
    raise CheckpointError(f"resume: {resume} is neither a save_path with a 'latest' file nor a global_stepN folder "
                          '(or use "auto" or "never")')


def decide_resume(save_path: str, resume: str) -> Optional[tuple[str, str]]:
    """Collective: rank 0's `find_resume_tag`, on every rank (with a node-local save_path only rank 0's
    node is sure to hold `latest`). A bad `resume` value is a CheckpointError on every rank."""
    import deepspeed.comm as dist

    answer = None
    if dist.get_rank() == 0:
        try:
            answer = ("ok", find_resume_tag(save_path, resume))
        except CheckpointError as e:
            answer = ("error", str(e))
    kind, value = broadcast_object(answer)
    if kind == "error":
        raise CheckpointError(value)
    return tuple(value) if value else None


def start_or_resume(engine, resume_from: Optional[tuple[str, str]], batches, companions: Optional[dict] = None) -> TrainState:
    """Collective. A fresh TrainState, or the one of checkpoint `resume_from` (root, tag) with the
    engine, optimizer, scheduler, data position (`batches`, None on ranks without data) and RNG
    restored; `companions` {name: engine} (PPO's critic) from root/name/tag (see `save`)."""
    if not resume_from:
        return TrainState()
    root, tag = resume_from
    saved = load(engine, root, tag)
    for name, other in (companions or {}).items():
        load_companion(other, str(Path(root) / name), tag)
    if batches is not None:
        batches.load_state_dict(saved["data"])
    if torch.distributed.get_rank() == 0:
        logger.info("resumed from %s/%s at step %d", root, tag, saved["step"])
    # A checkpoint written before the save order was recorded: its lineage is the tag itself.
    extra = {k: v for k, v in saved.items() if k not in ("step", "history", "evals", "saved_tags", "data")}
    return TrainState(saved["step"], saved["history"], saved["evals"], list(saved.get("saved_tags") or [tag]), tag, extra)


def save_training(engine, save_path: str, state: TrainState, batches, keep_last: int,
                  companions: Optional[dict] = None, extra_state: Optional[dict] = None) -> str:
    """Collective: refuse non-finite weights, then save the engine with the trainer state and rank
    0's data position (rank 0 reads data; every replica's position follows from it)."""
    import deepspeed.comm as dist

    check_finite_weights(engine.module, state.step)
    data_position = broadcast_object(batches.state_dict() if dist.get_rank() == 0 else None)
    tag = tag_for(state.step)
    state.saved_tags = [t for t in state.saved_tags if t != tag] + [tag]
    trainer_state = {"step": state.step, "history": state.history, "evals": state.evals, "data": data_position,
                     "saved_tags": state.saved_tags, **(extra_state or {})}
    for other in (companions or {}).values():
        check_finite_weights(other.module, state.step)
    return save(engine, save_path, state.step, trainer_state, tags_to_keep(state.saved_tags, keep_last, state.resumed_from),
                companions)


def tags_to_keep(saved_tags: list, keep_last: int, resumed_from: Optional[str]) -> set:
    """The checkpoints pruning leaves: the last `keep_last` of this lineage's saves (in save order, not
    by step number) and the one this run resumed from."""
    keep = set(saved_tags[-keep_last:]) if keep_last > 0 else set(saved_tags)
    return keep | ({resumed_from} if resumed_from else set())


def save(engine, save_path: str, step: int, trainer_state: dict, keep: set, companions: Optional[dict] = None) -> str:
    """Collective: every rank calls it. `keep`: the tags pruning leaves (this one always).
    companions {name: engine}: other engines of the run (PPO's critic), each saved as its own
    DeepSpeed checkpoint in SAVE_PATH/name/global_stepN (with SAVE_PATH/name/latest, so pp_to_hg reads
    it like any save_path); all of them are complete before SAVE_PATH/latest moves, the one `latest`
    a resume follows."""
    import deepspeed.comm as dist

    tag = tag_for(step)
    companions = companions or {}
    tag_dir = Path(save_path) / tag
    first_on_node = int(os.environ.get("LOCAL_RANK", 0)) == 0
    writes = CheckpointWrite(save_path, tag, list(companions))
    writes.check_room()  # collective: a checkpoint that cannot fit stops every rank before writing
    with recording_save_errors(engine, *companions.values()) as failures:
        engine.save_checkpoint(save_path, tag=tag, save_latest=False)
        for name, other in companions.items():
            other.save_checkpoint(str(Path(save_path) / name), tag=tag, save_latest=False)
    writes.agree(failures, lambda: save_rng_state(rng_state(), tag_dir, dist.get_rank()))
    # ^ collective: every rank's files (DeepSpeed's and the RNG files) are written, or every rank stops

    def state_and_fsync():
        if first_on_node:
            _write_json_atomic(tag_dir / "trainer_state.json", trainer_state)
            fsync_tree(tag_dir)
            for name in companions:
                fsync_tree(Path(save_path) / name / tag)
    writes.agree([], state_and_fsync)
    if os.environ.get(KILL_DURING_SAVE_ENV) == str(step):
        os.kill(os.getpid(), 9)

    def move_latest_and_prune():
        if first_on_node:
            for name in companions:
                _write_text_atomic(Path(save_path) / name / "latest", tag)
            _write_text_atomic(Path(save_path) / "latest", tag)
            prune(save_path, set(keep) | {tag})
            for name in companions:
                prune(str(Path(save_path) / name), set(keep) | {tag})
    writes.agree([], move_latest_and_prune)
    return tag


def prune(save_path: str, keep: set) -> list[str]:
    """Remove every global_stepN folder of save_path (as this node sees it) not named in `keep`."""
    removed = []
    for path in sorted(Path(save_path).iterdir()):
        if TAG_RE.match(path.name) and path.is_dir() and path.name not in keep:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed


def load(engine, root: str, tag: str) -> dict:
    """Collective. Restores module, optimizer and scheduler (DeepSpeed) and this rank's RNG; returns
    rank 0's trainer_state.json on every rank. A node without the checkpoint folder (node-local
    save_path) is named in the error."""
    import deepspeed.comm as dist

    from trainer.engine.preflight import node_name

    tag_dir = Path(root) / tag
    seen = [None] * dist.get_world_size()
    dist.all_gather_object(seen, (node_name(), tag_dir.is_dir()))
    missing = sorted({host for host, present in seen if not present})
    if missing:
        raise CheckpointError(f"resume: checkpoint {tag_dir} is missing on node(s) {', '.join(missing)}; with a node-local "
                              "save_path every node needs its own files of that checkpoint in place")
    load_path, _ = load_checkpoint_with_own_model_states(engine, root, tag, load_module_strict=True,
                                                         load_optimizer_states=True, load_lr_scheduler_states=True)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {tag} from {root}")
    set_rng_state(on_every_rank(load_rng_state, tag_dir, dist.get_rank()))
    return broadcast_object(json.loads((tag_dir / "trainer_state.json").read_text()) if dist.get_rank() == 0 else None)


def load_companion(engine, root: str, tag: str) -> None:
    """Collective: a companion engine's module, optimizer and scheduler from root/tag (see `save`)."""
    if not (Path(root) / tag).is_dir():
        raise CheckpointError(f"resume: {Path(root) / tag} is missing (saved together with {Path(root).parent / tag}); "
                              "the checkpoint is incomplete: resume an older tag or start fresh")
    load_path, _ = load_checkpoint_with_own_model_states(engine, root, tag, load_module_strict=True,
                                                         load_optimizer_states=True, load_lr_scheduler_states=True)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {tag} from {root}")


def rng_state() -> dict:
    """Every generator a step may draw from: torch (CPU), CUDA (every device), numpy, python, and
    DeepSpeed's activation-checkpointing RNG tracker (its model-parallel streams, when any)."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    tracker = _checkpointing_rng_tracker()
    if tracker.get_states():
        state["deepspeed_checkpointing"] = tracker.get_states()
    return state


def set_rng_state(state: Optional[dict]) -> None:
    if state is None:  # a checkpoint without RNG files
        return
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "deepspeed_checkpointing" in state:
        _checkpointing_rng_tracker().set_states(state["deepspeed_checkpointing"])


def _checkpointing_rng_tracker():
    from deepspeed.runtime.activation_checkpointing.checkpointing import get_cuda_rng_tracker

    return get_cuda_rng_tracker()
