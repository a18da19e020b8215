"""One command for InstructGPT's three steps on the pipeline engine: SFT -> reward model -> PPO, or
SFT -> DPO. The recipes of trainer/recipes run one after another in this one process per rank (one
allocation, the ranks launched once), each handing its checkpoint to the next.

    deepspeed rlhf.py --config configs/rlhf.json                           # one node
    deepspeed --hostfile ./hostfile rlhf.py --config configs/rlhf.json     # several nodes

The config is one JSON file: the keys every step shares at the top level (train_ds.py's keys:
model_path of the base model, save_path (the root of the chain), model_topo, DeepSpeed's batch,
precision and optimizer keys, seed, ...), the chain's own keys, and a section per step holding what
differs (data_path, optimizer, parts, train_steps / n_epochs, "ppo": {...} settings, ...):

    {"pipeline": ["sft", "rm", "ppo"],    the default; or ["sft", "dpo"]
     "rm_init": "sft",                    the RM starts from SFT's result (default) or "base" (model_path)
     "model_path": "...", "save_path": "runs/rlhf", "model_topo": {...}, "train_batch_size": 8, ...,
     "sft": {"data_path": "...", "n_epochs": 2},
     "rm":  {"data_path": "...", "optimizer": {"params": {"lr": 1e-4}}},
     "ppo": {"data_path": "...", "train_steps": 30, "ppo": {"rollout_batch_size": 16}}}

(a section holds what a train_ds.py config of that stage holds: the ppo section's "ppo" object is
PPO's settings, trainer/ppo_config.py).

A step's config = `merge(shared, section)` (the section wins; objects merge key by key, except an
object whose "type" differs from the shared one's, e.g. another optimizer or scheduler, which
replaces it whole; null removes a shared key), plus what the chain sets (`step_config`):

    step  stage  save_path   starts from
    sft   sft    ROOT/sft    model_path (the base model)
    rm    rm     ROOT/rm     ROOT/sft (rm_init "sft") or model_path (rm_init "base")
    ppo   ppo    ROOT/ppo    actor_path ROOT/sft (the reference by default), critic_path ROOT/rm (the reward model by default)
    dpo   dpo    ROOT/dpo    model_path ROOT/sft (the reference by default)

and resume "auto"; split_index = the step's position in the pipeline (sft 0, rm 1, ppo 2; sft 0,
dpo 1) when its config has data_split (one mixed dataset, disjoint shares: data/split.py); the
csv_monitor / tensorboard job_name = the step's name (after the shared job_name, if any), so each
step's metrics land in OUTPUT_PATH/<step>/. Every step is validated (trainer.config.validate)
before the first one starts; problems name the section and the key, exit status 2.

save_path (ROOT) afterwards:
    configs/<step>.json   each step's config as train_ds.py would take it (copied to ROOT/<step>/train_config.json)
    sft/ rm/ dpo/         the steps' save_paths (checkpoints, loss_curve.png), each with hf/: its pp_to_hg export
    ppo/                  the actor (hf/: *ForCausalLM), ppo/critic (critic_hf/: *ForSequenceClassification),
                          ppo/ema (ema_hf/, with ppo.ema_decay), reward_curve.png
    rlhf_state.json       the steps done and their results; a step is marked done only once its exports are complete
    summary.json          SFT eval loss, RM eval accuracy, PPO reward start -> end and KL, DPO eval rewards
    summary.txt           the same as printed at the end

Rerunning the command skips the steps marked done and resumes the running one from its `latest`.
"""
import argparse
import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from trainer.config import ConfigError, TrainConfig, read_config_json, validate

logger = logging.getLogger("pipetune")

CHAINS = (("sft", "rm", "ppo"), ("sft", "dpo"))
STEPS = ("sft", "rm", "ppo", "dpo")
CHAIN_KEYS = ("pipeline", "rm_init")
RM_INITS = ("sft", "base")
# Keys the chain sets in every step's config: giving them in the file is a mistake.
SET_BY_CHAIN = {
    "stage": "each step's stage is its section's name",
    "save_path": "each step saves to ROOT/<step>; give the root as the top-level save_path",
    "split_index": "each step takes the share of data_split at its position in the pipeline",
    "actor_path": "PPO's actor is the SFT step's result",
    "critic_path": "PPO's critic is the RM step's result",
}
MONITORS_WITH_JOB_NAME = ("csv_monitor", "tensorboard")
STATE_FILE = "rlhf_state.json"
SUMMARY_FILE = "summary.json"
SUMMARY_TEXT = "summary.txt"  # what rank 0 printed
REWARD_CURVE = "reward_curve.png"


@dataclass
class Step:
    name: str
    position: int
    root: Path                # the chain's save_path
    raw: dict                 # the step's config as written to config_file
    config_file: Path         # ROOT/configs/<step>.json
    cfg: TrainConfig = None   # raw validated
    exports: list = field(default_factory=list)  # [(pipeline checkpoint, HF folder)]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the RLHF config: shared keys + a section per step")
    parser.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)), help="set by the launcher")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from trainer.distributed import broadcast_object, finish, world

    rank, world_size, _ = world()
    try:
        from deepspeed.accelerator import get_accelerator

        accel = get_accelerator()
        steps = load_steps(args.config, world_size, accel.is_fp16_supported())
    except ConfigError as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    if rank == 0:
        for step in steps:
            for warning in step.cfg.warnings:
                logger.warning("[%s] %s", step.name, warning)

    import torch

    if accel.device_name() == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from trainer.distributed import init_process_group

    init_process_group(accel.communication_backend_name())
    device_name = torch.cuda.get_device_name() if accel.device_name() == "cuda" else accel.device_name()
    missing = broadcast_object(missing_inputs(steps) if rank == 0 else None)  # before step 1, not when its step starts
    if missing:
        if rank == 0:
            print(f"error: {ConfigError(args.config, missing)}", file=sys.stderr)
        return 2
    status = run_chain(steps, rank, world_size, device_name)
    if status == 0:
        finish()
    return status


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
    for name in ("rm", "ppo", "dpo"):
        if "model_path" in sections[name]:
            problems.append(f"section {name!r}: model_path is set by the RLHF command (the hand-off from the step before; "
                            "the RM's start is chosen with rm_init); remove it")
    for where, keys in [("the top level", shared)] + [(f"section {n!r}", sections[n]) for n in ("rm", "ppo", "dpo")]:
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
    sft_result = str(root / "sft")  # a training save_path: every recipe follows its `latest`
    if name == "rm":
        raw["model_path"] = sft_result if rm_init == "sft" else base_model
    elif name == "dpo":
        raw["model_path"] = sft_result
    elif name == "ppo":
        raw["model_path"] = raw["actor_path"] = sft_result
        raw["critic_path"] = str(root / "rm")
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
            step.cfg = validate(fresh, str(step.config_file), world_size, device_supports_fp16)
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
                           ("ppo.ptx_data_path", cfg.ppo.get("ptx_data_path"))):
            if value is not None:
                problems += [f"section {step.name!r}: {key}: {p}" for p in expand_paths(value)[1]]
        results = {s.cfg.save_path for s in steps}  # made by the chain: not there yet
        for key in ("model_path", "ref_path", "reward_path"):
            path = getattr(cfg, key)
            if path and path not in results and not os.path.exists(path):
                problems.append(f"section {step.name!r}: {key} {path} does not exist")
    return problems


def export_plan(step: Step) -> list[tuple[Path, Path]]:
    """(pipeline checkpoint, HF folder) pairs: the step's model; for PPO also the critic (and the EMA)."""
    save = Path(step.cfg.save_path)
    exports = [(save, save / "hf")]
    if step.name == "ppo":
        exports.append((save / "critic", save / "critic_hf"))
        if step.cfg.ppo.get("ema_decay"):
            exports.append((save / "ema", save / "ema_hf"))
    return exports


# ---------------------------------------------------------------------------------------------
# The run: every rank runs every step; rank 0 exports and keeps the state.

def run_chain(steps: list[Step], rank: int, world_size: int, device_name: str) -> int:
    """Collective. Runs the steps not yet done, exports each, marks it done; writes the summary.
    Returns the exit status (0, or 1/2 with the error printed by rank 0 as train_ds.py does)."""
    import time

    import torch

    from trainer.distributed import broadcast_object

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
        status, summary = run_step(step, rank, world_size, device_name)
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
        if "ppo" in summary["steps"]:
            write_reward_curve(summary["steps"]["ppo"]["reward_curve"], state["done"]["ppo"]["result"]["curve"])
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


def run_step(step: Step, rank: int, world_size: int, device_name: str) -> tuple[int, dict]:
    """Collective: the step's recipe. (0, its summary), or (exit status, None) with the error printed
    on rank 0 the way train_ds.py prints it, naming the step."""
    from data.errors import DataError, TokenizerError
    from models.pipe_dir import CheckpointError
    from trainer.distributed import report_crash
    from trainer.guards import NonFiniteError
    from trainer.preflight import PreflightError
    from trainer.recipes import get_recipe
    from trainer.topology import Topology

    try:
        return 0, get_recipe(step.name)(step.cfg, Topology.from_config(step.cfg, rank, world_size), device_name)
    except (NonFiniteError, PreflightError, CheckpointError) as e:
        status, lines = 1, [f"error: [{step.name}] {e}"]
    except TokenizerError as e:
        status, lines = 2, [f"error: [{step.name}] {e}"]
    except DataError as e:
        status, lines = 2, [f"error: [{step.name}] the training data has problems (fix them or set "
                            "\"skip_bad_records\": true in the section):", *e.lines]
    except BaseException as e:  # noqa: BLE001 - logged with the rank, then re-raised through the exit code
        report_crash(rank, e)
        return 1, None
    if rank == 0:
        print("\n".join(lines), file=sys.stderr)
    return status, None


def export_step(step: Step, rank: int) -> int:
    """Collective: rank 0 writes every HF export of the step (pp_to_hg, written whole or not at all,
    then fsynced); the other ranks wait. 0, or 1 with the error printed on rank 0."""
    from convert.pp_to_hg import pp_to_hg
    from trainer.files import fsync_tree
    from trainer.distributed import broadcast_object

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


def step_result(name: str, summary: dict) -> dict:
    """What the summary needs from a recipe's summary: steps, first/last train loss, the last eval;
    PPO's reward curve [[step, reward_mean, score_mean, kl]]; DPO's last train metrics."""
    history = summary["history"]
    result = {"steps": summary["step"], "train_loss_first": history[0][1] if history else None,
              "train_loss_last": history[-1][1] if history else None}
    if summary["evals"]:
        result["eval_step"], result["eval"] = summary["evals"][-1]
    if name == "ppo":
        result["curve"] = [[s, m["PPO/reward_mean"], m["PPO/score_mean"], m["PPO/kl"]] for s, m in summary["train_metrics"]]
    if name == "dpo" and summary.get("train_metrics"):
        result["train_last"] = summary["train_metrics"][-1][1]
    return result


def chain_summary(steps: list[Step], state: dict, root: Path) -> dict:
    """summary.json: per step its headline numbers and exports."""
    out = {"save_path": str(root), "pipeline": [s.name for s in steps], "steps": {}}
    for step in steps:
        done = state["done"][step.name]
        result, evals = done["result"], done["result"].get("eval") or {}
        line = {"steps": result["steps"], "seconds": done.get("seconds"), "exports": done["exports"]}
        if step.name == "sft":
            line.update(eval_loss=evals.get("loss"), eval_perplexity=evals.get("perplexity"))
        elif step.name == "rm":
            line.update(eval_accuracy=evals.get("accuracy"), eval_chosen_score=evals.get("chosen_score"),
                        eval_rejected_score=evals.get("rejected_score"))
        elif step.name == "dpo":
            line.update({f"eval_{k}": evals.get(k) for k in ("rewards/accuracies", "rewards/margins", "loss")})
        elif step.name == "ppo":
            line.update(reward_trend(result["curve"]))
            line["reward_curve"] = str(Path(step.cfg.save_path) / REWARD_CURVE)
        out["steps"][step.name] = line
    return out


def reward_trend(curve: list) -> dict:
    """PPO's start and end: means over the first and the last `window` steps (a quarter of the run,
    1 to 5 steps: one rollout's mean is noisy)."""
    window = max(1, min(5, len(curve) // 4))
    first, last = curve[:window], curve[-window:]

    def mean(rows: list, column: int):
        return sum(r[column] for r in rows) / len(rows) if rows else None

    return {"window": window, "reward_start": mean(first, 1), "reward_end": mean(last, 1),
            "score_start": mean(first, 2), "score_end": mean(last, 2), "kl_end": mean(last, 3)}


def write_reward_curve(path: str, curve: list) -> None:
    from trainer.metrics import write_metric_curves

    write_metric_curves(path, {"PPO/reward_mean": [(s, r) for s, r, _, _ in curve],
                               "PPO/score_mean (raw RM)": [(s, c) for s, _, c, _ in curve],
                               "PPO/kl": [(s, k) for s, _, _, k in curve]},
                        "PPO step", "per answer (mean over the rollout)", "PPO reward")


def summary_text(summary: dict, root: Path) -> str:
    """The lines rank 0 prints at the end (and writes to summary.txt)."""
    def fmt(x) -> str:
        return "n/a" if x is None else f"{x:.4g}"

    lines = [f"RLHF summary ({root / SUMMARY_FILE}):"]
    for name, s in summary["steps"].items():
        if name == "sft":
            text = f"eval loss {fmt(s['eval_loss'])} (perplexity {fmt(s['eval_perplexity'])})"
        elif name == "rm":
            text = (f"eval accuracy {fmt(s['eval_accuracy'])} (chosen score {fmt(s['eval_chosen_score'])}, "
                    f"rejected {fmt(s['eval_rejected_score'])})")
        elif name == "dpo":
            text = (f"eval rewards/accuracies {fmt(s['eval_rewards/accuracies'])}, "
                    f"rewards/margins {fmt(s['eval_rewards/margins'])}")
        else:
            text = (f"reward {fmt(s['reward_start'])} -> {fmt(s['reward_end'])} (means of the first / last {s['window']} "
                    f"steps; RM score {fmt(s['score_start'])} -> {fmt(s['score_end'])}), KL {fmt(s['kl_end'])}; "
                    f"curve {s['reward_curve']}")
        seconds = f" in {s['seconds']:.0f} s" if s.get("seconds") is not None else ""
        lines.append(f"  {name:<4} {s['steps']:>4} steps{seconds}: {text}")
        lines.append(f"       exports: {', '.join(s['exports'])}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
