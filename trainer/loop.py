"""The training loop shared by the stages (SFT, reward model), top to bottom:

    data (rank 0 validates and tokenizes first; first and last stages load it) -> engine (weights
    loaded before initialize) -> resume? -> loop: train_batch, NaN guard, log, eval every
    eval_interval, save every save_interval -> final eval + save -> loss curve.

A stage (`trainer.sft.SFT`, `trainer.rm.REWARD`) says what differs: the data kind, the head, the
loss, how a step's micro-batches are fed to the engine, and how to evaluate.
"""
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from data.errors import DataError

from . import checkpoint
from .batches import GlobalBatches
from .config import TrainConfig
from .distributed import broadcast_object, collective_device
from .engine import build_engine, describe_split, layer_param_counts, resolve_parts
from .metrics import flops_per_token, mfu, peak_flops, write_loss_curve
from .preflight import preflight

logger = logging.getLogger("pipetune")


class NonFiniteLoss(RuntimeError):
    pass


@dataclass(frozen=True)
class Stage:
    name: str
    data_kind: str                 # build_dataset kind: "lm" | "pairwise"
    head: str                      # "lm" | "value"
    loss_fn: Callable              # DeepSpeed loss_fn(outputs, labels)
    collate: Callable              # [dataset items] -> (inputs, labels)
    feed: Callable                 # (micro_batches, n_global_targets, loss_scale) -> iterator the engine pulls
    evaluate: Callable             # (Context) -> {"loss": ..., other metrics}; collective


@dataclass
class Context:
    """What a stage's evaluate() needs."""
    cfg: TrainConfig
    engine: object
    data: object                   # build_dataset result on data stages, else None
    rank: int
    dp_rank: int
    is_last_stage: bool
    n_eval_rows: int


def build_data(cfg: TrainConfig, tokenizer, kind: str):
    from data.dataset import build_dataset

    return build_dataset(
        cfg.data_path, tokenizer, cfg.max_seq_len, kind=kind, pack=cfg.pack and kind == "lm", overflow=cfg.overflow,
        strict=not cfg.skip_bad_records, eval_paths=cfg.eval_data_path, eval_fraction=cfg.eval_fraction,
        seed=cfg.seed, cache_dir=cfg.data_cache_dir(),
    )


def model_side_dir(cfg: TrainConfig) -> Path:
    """The folder with model_path's config.json and tokenizer: model_path itself, or for a
    global_stepN folder of a training run, the save_path above it."""
    from models.pipe_dir import find_side_file, resolve_checkpoint_dir

    path = Path(cfg.model_path)
    if cfg.from_scratch or not path.is_dir():
        return path
    _, search = resolve_checkpoint_dir(path)
    found = find_side_file(search, "config.json")
    return found.parent if found is not None else path


def plan_length(cfg: TrainConfig, steps_per_epoch: int) -> int:
    return cfg.train_steps if cfg.train_steps else cfg.n_epochs * steps_per_epoch


def run(cfg: TrainConfig, stage: Stage, rank: int, world_size: int, device_name: str) -> dict:
    """Train; returns {"step", "history", "evals"} on every rank. Collective: every rank calls it."""
    from transformers import AutoConfig, AutoTokenizer

    pipe, dp = cfg.model_topo.pipe, cfg.model_topo.data
    pipe_stage, dp_rank = rank // dp, rank % dp  # PipeDataParallelTopology: rank = stage * D + dp_rank
    is_data_stage = pipe_stage in (0, pipe - 1)
    hosts = preflight(cfg, rank, world_size)
    model_dir = model_side_dir(cfg)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    hf_config = AutoConfig.from_pretrained(model_dir)

    # Data: rank 0 validates and tokenizes (filling the cache) before any other rank reads it; a
    # data error stops every rank (rank 0 reports it).
    data, problem = None, None
    if rank == 0:
        try:
            data = build_data(cfg, tokenizer, stage.data_kind)
        except DataError as e:
            problem = e
    if broadcast_object(problem is not None):
        raise problem if problem is not None else DataError([], header="invalid data (reported by rank 0)")
    if rank != 0 and is_data_stage:
        data = build_data(cfg, tokenizer, stage.data_kind)
    batches = (GlobalBatches(data.train, cfg.micro_batch, cfg.grad_accum, dp_rank, dp, cfg.seed, collate=stage.collate)
               if is_data_stage else None)
    steps_per_epoch, n_eval_rows = broadcast_object(
        (batches.steps_per_epoch, len(data.eval) if data.eval is not None else 0) if rank == 0 else None)
    total_steps = plan_length(cfg, steps_per_epoch)

    resume_from = checkpoint.find_resume_tag(cfg.save_path, cfg.resume)
    weights = "checkpoint" if resume_from else ("init" if cfg.from_scratch else "load")
    if rank == 0:
        _log_plan(cfg, hf_config, stage, data.stats)
    built = build_engine(cfg, hf_config, total_steps, weights, head=stage.head, loss_fn=stage.loss_fn)
    engine = built.engine
    if rank == 0:
        checkpoint.prepare_save_path(cfg.save_path, str(model_dir), cfg.config_path, hf_config, stage.head,
                                     built.layer_names, cfg.precision)
        checkpoint.write_topology(cfg.save_path, built.parts, built.layer_names, dp, hosts)

    start_step, history, evals = 0, [], []
    if resume_from:
        state = checkpoint.load(engine, *resume_from)
        start_step, history, evals = state["step"], state["history"], state["evals"]
        if batches is not None:
            batches.load_state_dict(state["data"])
        if rank == 0:
            logger.info("resumed from %s/%s at step %d", resume_from[0], resume_from[1], start_step)

    ctx = Context(cfg, engine, data if is_data_stage else None, rank, dp_rank, pipe_stage == pipe - 1, n_eval_rows)
    meter = StepMeter(cfg, built, hf_config, world_size, device_name, total_steps, start_step, rank)
    loss_scale = float(cfg.grad_accum * dp)
    last_saved = start_step if resume_from else None
    step = start_step
    for step in range(start_step + 1, total_steps + 1):
        feed, real_tokens = None, 0
        if batches is not None:
            micro, n_global, real_tokens = batches.next_step()
            feed = stage.feed(micro, n_global, loss_scale)
        start = time.perf_counter()
        loss = float(engine.train_batch(data_iter=feed))
        seconds = time.perf_counter() - start
        if not math.isfinite(loss):
            raise NonFiniteLoss(
                f"step {step}: the training loss is {loss}; stopping without saving (the last good checkpoint is "
                f"the one save_path/latest names, if any). Lower the learning rate, check the data, or use bf16 instead of fp16"
            )
        history.append([step, loss])
        meter.log_step(step, loss, real_tokens, seconds)
        if cfg.eval_interval and step % cfg.eval_interval == 0 and n_eval_rows:
            evals.append([step, _evaluate(stage, ctx, meter, step)])
        if cfg.save_interval and step % cfg.save_interval == 0:
            _save(engine, cfg, step, batches, history, evals, rank)
            last_saved = step
    meter.close()
    if n_eval_rows and (not evals or evals[-1][0] != step):
        evals.append([step, _evaluate(stage, ctx, meter, step)])
    if last_saved != step:
        _save(engine, cfg, step, batches, history, evals, rank)
    if rank == 0:
        write_loss_curve(str(Path(cfg.save_path) / "loss_curve.png"), history, [(s, e["loss"]) for s, e in evals],
                         f"{hf_config.model_type} {stage.name}")
    return {"step": step, "history": history, "evals": evals}


class StepMeter:
    """Rank 0's progress bar and monitor events: loss, lr, grad norm, tokens/s, MFU."""

    def __init__(self, cfg, built, hf_config, world_size, device_name, total_steps, start_step, rank):
        self.engine, self.rank, self.world_size = built.engine, rank, world_size
        # All parameters but the input embedding lookup do matmuls (a tied head counts once).
        n_matmul = sum(layer_param_counts(built.model_config, built.head)[1:])
        self.flops_token = flops_per_token(n_matmul, hf_config.num_hidden_layers, hf_config.hidden_size, cfg.max_seq_len)
        self.peak = peak_flops(device_name, cfg.precision)
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", disable=rank != 0, dynamic_ncols=True)
        self.last_eval = {}

    def log_step(self, step: int, loss: float, real_tokens: int, seconds: float) -> None:
        if self.rank != 0:
            return
        tokens_s = real_tokens / seconds
        lr = self.engine.get_lr()[0]
        grad_norm = self.engine.get_global_grad_norm()
        util = mfu(tokens_s, self.flops_token, self.world_size, self.peak)
        events = [("Train/loss", loss, step), ("Train/lr", lr, step), ("Train/tokens_per_s", tokens_s, step)]
        if grad_norm is not None:
            events.append(("Train/grad_norm", float(grad_norm), step))
        if util is not None:
            events.append(("Train/mfu", util, step))
        write_events(self.engine, events)
        postfix = {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}", "tok_s": f"{tokens_s:.0f}"}
        if util is not None:
            postfix["mfu"] = f"{util:.1%}"
        postfix.update({k: f"{v:.3g}" for k, v in self.last_eval.items()})
        self.bar.set_postfix(postfix)
        self.bar.update(1)

    def log_eval(self, step: int, metrics: dict, shown: tuple = ()) -> None:
        if self.rank != 0:
            return
        write_events(self.engine, [(f"Eval/{k}", float(v), step) for k, v in metrics.items()])
        self.last_eval = {f"eval_{k}": metrics[k] for k in shown}
        logger.info("eval at step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))

    def close(self) -> None:
        self.bar.close()


def _evaluate(stage: Stage, ctx: Context, meter: StepMeter, step: int) -> dict:
    metrics = stage.evaluate(ctx)
    meter.log_eval(step, metrics, shown=tuple(k for k in ("accuracy",) if k in metrics) or ("loss",))
    return metrics


def _save(engine, cfg, step, batches, history, evals, rank) -> None:
    _check_finite_weights(engine, step)
    state = {"step": step, "history": history, "evals": evals,
             "data": broadcast_object(batches.state_dict() if rank == 0 else None)}
    checkpoint.save(engine, cfg.save_path, step, state, cfg.keep_last)


def _check_finite_weights(engine, step: int) -> None:
    """Collective: refuse to write a checkpoint whose weights hold NaN/inf on any rank."""
    bad = torch.zeros((), dtype=torch.float32, device=collective_device())
    for p in engine.module.parameters():
        if not torch.isfinite(p.detach()).all():
            bad += 1
    torch.distributed.all_reduce(bad)
    if bad.item():
        raise NonFiniteLoss(f"step {step}: {int(bad.item())} parameter tensors hold NaN/inf; not saving this checkpoint "
                            "(the last good one is the one save_path/latest names, if any). Lower the learning rate or check the data")


def write_events(engine, events) -> None:
    monitor = getattr(engine, "monitor", None)
    if monitor is not None and monitor.enabled:
        monitor.write_events(events)


def _log_plan(cfg, hf_config, stage: Stage, stats: dict) -> None:
    from models.pipeline import prepare_config

    model_config = prepare_config(hf_config)
    parts = resolve_parts(cfg, model_config, stage.head)
    logger.info("%s: pipeline split (%d stages x %d data-parallel):\n%s", stage.name, cfg.model_topo.pipe, cfg.model_topo.data,
                describe_split(cfg, model_config, parts, stage.head))
    train = stats.get("train", {})
    logger.info("data: %s samples in %s rows, types %s, truncated %s, dropped %s", train.get("samples"), train.get("rows"),
                train.get("types"), train.get("truncated"), train.get("dropped"))
