"""The start and the end that SFT, RM and DPO share (PPO has its own: four models), so that each
recipe's run() shows only what is its own: its data kind, its loss, its step and its evaluation.

    job = prepare(cfg, topo, "sft", head="lm", kind="lm", collate=collate)   # plan, tokenizer, data, resume
    engine = build_engine(...)                                                # the recipe's loss_fn
    state, meter = start(cfg, topo, job, engine, batches, device_name)       # save path, resume, meter
    ... the recipe's loop ...
    return finish(cfg, topo, job, engine, state, meter, batches, last_saved, evaluate, title)
"""
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from trainer.batches import load_data
from trainer.engine import checkpoint
from trainer.engine.guards import check_finite_loss
from trainer.engine.plan import plan_model
from trainer.engine.preflight import preflight
from trainer.metrics import StepMeter, log_plan, write_loss_curve


@dataclass
class Prepared:
    hosts: list                    # every rank's host (preflight)
    plan: object                   # the model's ModelPlan
    tokenizer: object
    data: object                   # trainer.batches.RecipeData
    total_steps: int
    resume_from: Optional[tuple]   # (checkpoint root, tag) or None

    def weights(self, cfg) -> str:
        """build_engine's `weights`: the checkpoint when resuming, else model_path's (or a seeded init)."""
        return "checkpoint" if self.resume_from else ("init" if cfg.from_scratch else "load")


def prepare(cfg, topo, recipe: str, head: str, kind: str, collate) -> Prepared:
    """Collective: check the nodes, plan the model, load the tokenizer and the data, decide the resume."""
    from transformers import AutoTokenizer

    hosts = preflight(cfg, topo.rank, topo.world_size)
    plan = plan_model(cfg, head=head)
    tokenizer = AutoTokenizer.from_pretrained(plan.side_dir)
    data = load_data(cfg, tokenizer, kind, topo, collate)
    total_steps = cfg.train_steps or cfg.n_epochs * data.steps_per_epoch
    resume_from = checkpoint.decide_resume(cfg.save_path, cfg.resume)
    if topo.rank == 0:
        log_plan(recipe, cfg, plan, data.data.stats)
    return Prepared(hosts, plan, tokenizer, data, total_steps, resume_from)


def start(cfg, topo, job: Prepared, engine, batches, device_name: str):
    """Collective: the save path's side files (rank 0), the resumed (or a fresh) TrainState, the meter."""
    if topo.rank == 0:
        checkpoint.prepare_save_path(cfg.save_path, job.plan, cfg.config_path, cfg.precision, job.data.data.stats["pad"]["id"])
        checkpoint.write_topology(cfg.save_path, job.plan, topo, job.hosts)
    state = checkpoint.start_or_resume(engine, job.resume_from, batches)
    return state, StepMeter(cfg, job.plan, engine, topo, device_name, job.total_steps, state.step)


def train_step(engine, feed, step: int) -> tuple[float, float]:
    """Collective: one train_batch; (its loss, seconds). A non-finite loss stops every rank."""
    start_time = time.perf_counter()
    loss = float(engine.train_batch(data_iter=feed))
    seconds = time.perf_counter() - start_time
    check_finite_loss(loss, step)
    return loss, seconds


def finish(cfg, topo, job: Prepared, engine, state, meter, batches, last_saved: Optional[int],
           evaluate: Callable[[int], dict], title: str, extra: Optional[dict] = None) -> dict:
    """Collective: the last evaluation (unless the loop just made it), the last save (unless the loop
    just saved), the loss curve; returns the recipe's summary {"step", "history", "evals", **extra}.
    evaluate(step) -> its metrics, logged (the recipe's own evaluation)."""
    meter.close()
    if job.data.n_eval_rows and (not state.evals or state.evals[-1][0] != state.step):
        state.evals.append([state.step, evaluate(state.step)])
    if last_saved != state.step:
        checkpoint.save_training(engine, cfg.save_path, state, batches, cfg.keep_last)
    if topo.rank == 0:
        write_loss_curve(str(Path(cfg.save_path) / "loss_curve.png"), state.history,
                         [(s, e["loss"]) for s, e in state.evals], f"{job.plan.hf_config.model_type} {title}")
    return {"step": state.step, "history": state.history, "evals": state.evals, **(extra or {})}
