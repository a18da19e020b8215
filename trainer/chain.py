"""The RLHF chain behind rlhf.py: one config -> the steps' configs (merge + hand-off) -> each
step's recipe on every rank (trainer.launch.run_recipe) -> its exports -> rlhf_state.json -> the
summary. rlhf.py's docstring is the user's guide (config keys, the folders written).

What a chain is belongs here: which pipelines exist (CHAINS), which key of a step takes which earlier
step's result (hand_offs). What a step leaves and reports belongs to its recipe: the chain asks the
recipe (trainer.recipes.recipe_hook) for its exports, what the state file keeps of its
summary, its headline numbers and their line; the registry's docstring lists these hooks.
"""
import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from trainer.config import ConfigError, TrainConfig, read_config_json
from trainer.launch import Rank, launch, run_recipe
from trainer.recipes import recipe_hook, step_result, validate_config

logger = logging.getLogger("pipetune")

CHAINS = (("sft", "rm", "ppo"), ("sft", "dpo"), ("sft", "grpo"))
STEPS = ("sft", "rm", "ppo", "dpo", "grpo")
CHAIN_KEYS = ("pipeline", "rm_init")
RM_INITS = ("sft", "base")


def hand_offs(rm_init: str = "sft") -> dict:
    """step -> {a key of its config: where its value comes from}: an earlier step's name (that step's
    save_path, a training save_path: every recipe follows its `latest`) or "base" (the shared
    model_path, the base model). rm_init chooses the RM's start."""
    return {"sft": {}, "rm": {"model_path": rm_init},
            "ppo": {"model_path": "sft", "actor_path": "sft", "critic_path": "rm"}, "dpo": {"model_path": "sft"},
            "grpo": {"model_path": "sft", "actor_path": "sft"}}


# Keys the chain sets in every step's config: giving them in the file is a mistake.
SET_BY_CHAIN = {
    "stage": "each step's stage is its section's name",
    "save_path": "each step saves to ROOT/<step>; give the root as the top-level save_path",
    "split_index": "each step takes the share of data_split at its position in the pipeline",
    "actor_path": "PPO's and GRPO's actor is the SFT step's result",
    "critic_path": "PPO's critic is the RM step's result",
}
MONITORS_WITH_JOB_NAME = ("csv_monitor", "tensorboard")
STATE_FILE = "rlhf_state.json"
SUMMARY_FILE = "summary.json"
SUMMARY_TEXT = "summary.txt"  # what rank 0 printed


@dataclass
class Step:
    name: str
    position: int
    root: Path                # the chain's save_path
    raw: dict                 # the step's config as written to config_file
    config_file: Path         # ROOT/configs/<step>.json
    cfg: TrainConfig = None   # raw validated
    exports: list = field(default_factory=list)  # [(pipeline checkpoint, HF folder)]


def run(config_path: str) -> int:
    """Every rank of `deepspeed rlhf.py`: start (trainer.launch; every step's config is validated
    before the first starts), find the missing inputs, run the chain. The exit status."""
    def warnings(steps: list[Step]) -> list[str]:
        return [f"[{step.name}] {warning}" for step in steps for warning in step.cfg.warnings]

    def body(steps: list[Step], where: Rank) -> int:
        from trainer.engine.distributed import broadcast_object

        missing = broadcast_object(missing_inputs(steps) if where.rank == 0 else None)  # before step 1, not when its step starts
        if missing:
            if where.rank == 0:
                print(f"error: {ConfigError(config_path, missing)}", file=sys.stderr)
            return 2
        return run_chain(steps, where.rank, where.world_size, where.device_name)

    return launch(lambda world_size, fp16: load_steps(config_path, world_size, fp16), warnings, body)


# ---------------------------------------------------------------------------------------------
# The config: shared keys + one section per step -> one validated train config per step.

def load_steps(path: str, world_size=None, device_supports_fp16: bool = True) -> list[Step]:
    """Read the RLHF config and validate every step's config; ConfigError listing every problem."""
    return load_steps_from(read_config_json(path), path, world_size, device_supports_fp16)


def load_steps_from(raw: dict, path: str = "<config>", world_size=None, device_supports_fp16: bool = True) -> list[Step]:
    steps = plan_steps(raw, path)
    validate_steps(steps, path, world_size, device_supports_fp16)
    return steps


def plan_steps(raw: dict, path: str = "<config>") -> list[Step]:
    """The steps of the pipeline, each with its config (not yet validated). ConfigError for problems
    of the chain's own keys and the sections' chain-set keys."""
    problems = []
    pipeline = raw.get("pipeline", list(CHAINS[0]))
    pipeline = tuple(pipeline) if isinstance(pipeline, list) else pipeline
    if pipeline not in CHAINS:
        problems.append(f"pipeline must be {' or '.join(json.dumps(list(c)) for c in CHAINS)}, got {json.dumps(raw['pipeline'])}")
    rm_init = raw.get("rm_init", "sft")
    if rm_init not in RM_INITS:
        problems.append(f"rm_init must be \"sft\" (the RM starts from the SFT step's result) or \"base\" (from model_path), "
                        f"got {json.dumps(rm_init)}")
    if not isinstance(raw.get("save_path"), str):
        problems.append("missing save_path (a string): the root folder of the chain (ROOT/sft, ROOT/rm, ...)")
    shared = {k: v for k, v in raw.items() if k not in CHAIN_KEYS and k not in STEPS}
    sections = {}
    for name in STEPS:
        sections[name] = raw.get(name, {})
        if not isinstance(sections[name], dict):
            problems.append(f"section {name!r} must be an object of config keys, got {json.dumps(sections[name])}")
            sections[name] = {}
    for where, keys in [("the top level", shared)] + [(f"section {n!r}", s) for n, s in sections.items()]:
        for key in sorted(set(keys) & set(SET_BY_CHAIN) - ({"save_path"} if keys is shared else set())):
            problems.append(f"{where}: {key} is set by the RLHF command ({SET_BY_CHAIN[key]}); remove it")
        if keys.get("resume", "auto") != "auto":
            problems.append(f"{where}: resume {json.dumps(keys['resume'])}: the RLHF command always resumes (\"auto\"); remove it")
    handed = [n for n in STEPS if "model_path" in hand_offs()[n]]  # rm, ppo, dpo, grpo: they start from a result
    for name in handed:
        if "model_path" in sections[name]:
            problems.append(f"section {name!r}: model_path is set by the RLHF command (the hand-off from the step before; "
                            "the RM's start is chosen with rm_init); remove it")
    for where, keys in [("the top level", shared)] + [(f"section {n!r}", sections[n]) for n in handed]:
        if "from_scratch" in keys:
            problems.append(f"{where}: from_scratch applies to the SFT step only: put it in section 'sft'")
    if problems:
        raise ConfigError(path, problems)
    unused = [n for n in STEPS if n in raw and n not in pipeline]
    if unused:
        logger.info("rlhf: section(s) %s not in the pipeline %s: not run", unused, list(pipeline))
    root = Path(raw["save_path"])
    return [Step(name, i, root, step_config(shared, sections[name], name, i, root, rm_init), root / "configs" / f"{name}.json")
            for i, name in enumerate(pipeline)]


def step_config(shared: dict, section: dict, name: str, position: int, root: Path, rm_init: str = "sft") -> dict:
    """One step's train_ds.py config: shared merged with its section, plus the hand-off."""
    raw = merge(shared, section)
    raw["stage"] = name
    raw["save_path"] = str(root / name)
    raw["resume"] = "auto"
    base_model = raw.get("model_path")
    for key, source in hand_offs(rm_init)[name].items():
        raw[key] = base_model if source == "base" else str(root / source)
    if raw.get("data_split") is not None:
        raw["split_index"] = position
    for monitor in MONITORS_WITH_JOB_NAME:
        if isinstance(raw.get(monitor), dict) and "job_name" not in (section.get(monitor) or {}):
            shared_name = (shared.get(monitor) or {}).get("job_name") if isinstance(shared.get(monitor), dict) else None
            raw[monitor] = {**raw[monitor], "job_name": f"{shared_name}-{name}" if shared_name else name}
    return raw


def merge(shared: dict, section: dict) -> dict:
    """The section's keys over the shared ones: objects merge key by key (recursively), except
    objects of another "type" (an optimizer or scheduler of another kind), which replace the shared
    one whole; lists and other values replace; null removes the shared key."""
    out = dict(shared)
    for key, value in section.items():
        old = out.get(key)
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(old, dict) and value.get("type", old.get("type")) == old.get("type"):
            out[key] = merge(old, value)
        else:
            out[key] = value
    return out


def validate_steps(steps: list[Step], path: str, world_size=None, device_supports_fp16: bool = True) -> None:
    """trainer.config.validate on every step (sets step.cfg); ConfigError naming each problem's section.
    A problem every step has (a shared key's) is listed once."""
    found = {}
    for step in steps:
        try:
            fresh = json.loads(json.dumps(step.raw))  # validate fills in DeepSpeed's batch keys; step.raw stays as written
            step.cfg = validate_config(fresh, str(step.config_file), world_size, device_supports_fp16)
        except ConfigError as e:
            found[step.name] = e.problems
    if not found:
        for step in steps:
            step.exports = export_plan(step)
        return
    everywhere = set.intersection(*(set(p) for p in found.values())) if len(found) == len(steps) else set()
    problems = [f"shared keys (every step): {p}" for p in next(iter(found.values())) if p in everywhere]
    for name, listed in found.items():
        problems += [f"section {name!r} (shared keys + its own): {p}" for p in listed if p not in everywhere]
    raise ConfigError(path, problems)


def missing_inputs(steps: list[Step]) -> list[str]:
    """Data files and given models that are not there (rank 0's view; the preflight of each step
    compares the nodes): found now rather than hours later, when their step starts."""
    from data.sources import expand_paths

    problems = []
    for step in steps:
        cfg = step.cfg
        for key, value in (("data_path", cfg.data_path), ("eval_data_path", cfg.eval_data_path),
                           ("ppo.ptx_data_path", getattr(cfg.options, "ptx_data_path", None))):
            if value is not None:
                problems += [f"section {step.name!r}: {key}: {p}" for p in expand_paths(value)[1]]
        results = {s.cfg.save_path for s in steps}  # made by the chain: not there yet
        for key in ("model_path", "ref_path", "reward_path"):
            path = getattr(cfg, key, None) or getattr(cfg.options, key, None)
            if path and path not in results and not os.path.exists(path):
                problems.append(f"section {step.name!r}: {key} {path} does not exist")
    return problems


def export_plan(step: Step) -> list[tuple[Path, Path]]:
    """(pipeline checkpoint, HF folder) pairs: the step's models, as its recipe lists them."""
    return recipe_hook(step.name, "exports")(step.cfg)


# ---------------------------------------------------------------------------------------------
# The run: every rank runs every step; rank 0 exports and keeps the state.

def run_chain(steps: list[Step], rank: int, world_size: int, device_name: str) -> int:
    """Collective. Runs the steps not yet done, exports each, marks it done; writes the summary.
    Returns the exit status (0, or 1/2 with the error printed by rank 0: trainer.launch.run_recipe)."""
    import time

    import torch

    from trainer.engine.distributed import broadcast_object

    root = steps[0].root
    write_step_configs(steps)
    torch.distributed.barrier()  # every node's config files exist before any recipe hashes them
    state = broadcast_object(read_state(root) if rank == 0 else None)
    for step in steps:
        if step.name in state["done"]:
            if rank == 0:
                logger.info("rlhf: step %s is done (%s), skipped", step.name, root / STATE_FILE)
                warn_if_changed(step, state["done"][step.name])
            continue
        if rank == 0:
            logger.info("rlhf: step %d/%d %s -> %s", step.position + 1, len(steps), step.name, step.cfg.save_path)
        start = time.perf_counter()
        status, summary = run_recipe(step.cfg, Rank(rank, world_size, device_name), step.name)
        status = status or export_step(step, rank)
        if status:
            if rank == 0:
                logger.error("rlhf: stopped in step %s; the same command resumes it (steps done: %s)", step.name,
                             ", ".join(state["done"]) or "none")
            return status
        if rank == 0:  # done: only now that its exports are complete
            state["done"][step.name] = {"result": step_result(step.name, summary), "config_sha256": config_sha(step),
                                        "exports": [str(dest) for _, dest in step.exports],
                                        "seconds": round(time.perf_counter() - start, 1)}
            write_json_atomic(root / STATE_FILE, state)
        torch.distributed.barrier()
        free_memory()
    if rank == 0:
        summary = chain_summary(steps, state, root)
        for name, headline in summary["steps"].items():  # the files the summary names (PPO's reward curve)
            recipe_hook(name, "write_plots")(state["done"][name]["result"], headline)
        write_json_atomic(root / SUMMARY_FILE, summary)
        text = summary_text(summary, root)
        (root / SUMMARY_TEXT).write_text(text + "\n")
        print(text, flush=True)
    return 0


def write_step_configs(steps: list[Step]) -> None:
    """Each node's first local rank writes ROOT/configs/<step>.json (the recipes copy it into their
    save_path and the preflight compares it across nodes)."""
    if int(os.environ.get("LOCAL_RANK", 0)) != 0:
        return
    for step in steps:
        step.config_file.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(step.config_file, step.raw)


def export_step(step: Step, rank: int) -> int:
    """Collective: rank 0 writes every HF export of the step (pp_to_hg, written whole or not at all,
    then fsynced); the other ranks wait. 0, or 1 with the error printed on rank 0."""
    from convert.pp_to_hg import pp_to_hg
    from trainer.engine.distributed import broadcast_object
    from trainer.files import fsync_tree

    problem = None
    if rank == 0:
        try:
            for source, dest in step.exports:
                logger.info("rlhf: exporting %s -> %s", source, dest)
                fsync_tree(pp_to_hg(str(source), str(dest), overwrite=True, progress=False))
        except Exception as e:  # noqa: BLE001 - every rank stops with it, not only rank 0
            problem = f"error: [{step.name}] export failed ({type(e).__name__}): {e}"
    problem = broadcast_object(problem)
    if problem and rank == 0:
        print(problem, file=sys.stderr)
    return 1 if problem else 0


def free_memory() -> None:
    """What one step's engines leave behind, before the next step builds its own."""
    import gc

    from deepspeed.accelerator import get_accelerator

    gc.collect()
    get_accelerator().empty_cache()


# ---------------------------------------------------------------------------------------------
# State (what is done) and the results of each step.

def read_state(root: Path) -> dict:
    path = root / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else {"done": {}}


def write_json_atomic(path: Path, data: dict) -> None:
    """trainer.files' atomic write (temporary file named per process, fsync, rename, folder fsync)."""
    from trainer.files import write_json_atomic as write

    path.parent.mkdir(parents=True, exist_ok=True)
    write(path, data)


def config_sha(step: Step) -> str:
    return hashlib.sha256(json.dumps(step.raw, sort_keys=True).encode()).hexdigest()


def warn_if_changed(step: Step, done: dict) -> None:
    if done.get("config_sha256") != config_sha(step):
        logger.warning("rlhf: step %s is marked done but its config changed since; it is not rerun. To redo it, remove "
                       "%s, its entry in %s and the steps after it", step.name, step.cfg.save_path, STATE_FILE)


def chain_summary(steps: list[Step], state: dict, root: Path) -> dict:
    """summary.json: per step its headline numbers (the recipe's headline) and exports."""
    out = {"save_path": str(root), "pipeline": [s.name for s in steps], "steps": {}}
    for step in steps:
        done = state["done"][step.name]
        line = {"steps": done["result"]["steps"], "seconds": done.get("seconds"), "exports": done["exports"]}
        line.update(recipe_hook(step.name, "headline")(done["result"], step.cfg))
        out["steps"][step.name] = line
    return out


def summary_text(summary: dict, root: Path) -> str:
    """The lines rank 0 prints at the end (and writes to summary.txt); each step's numbers in its
    recipe's words (headline_text)."""
    lines = [f"RLHF summary ({root / SUMMARY_FILE}):"]
    for name, s in summary["steps"].items():
        text = recipe_hook(name, "headline_text")(s)
        seconds = f" in {s['seconds']:.0f} s" if s.get("seconds") is not None else ""
        lines.append(f"  {name:<4} {s['steps']:>4} steps{seconds}: {text}")
        lines.append(f"       exports: {', '.join(s['exports'])}")
    return "\n".join(lines)
