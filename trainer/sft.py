"""The SFT / pretraining recipe: causal-LM loss on the trained tokens, read top to bottom.

    data (first and last stages) -> engine (load weights, initialize) -> resume? -> loop:
    train_batch, log, eval every eval_interval, save every save_interval -> final eval + save
    -> loss curve.
"""
import logging
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from . import checkpoint
from data.errors import DataError

from .batches import GlobalBatches, eval_batches, with_normaliser
from .config import TrainConfig
from .distributed import broadcast_object
from .engine import build_engine, describe_split, resolve_parts
from .metrics import flops_per_token, mfu, peak_flops, perplexity, write_loss_curve

logger = logging.getLogger("pipetune")


class NonFiniteLoss(RuntimeError):
    pass


def build_data(cfg: TrainConfig, tokenizer):
    from data.dataset import build_dataset

    return build_dataset(
        cfg.data_path, tokenizer, cfg.max_seq_len, kind="lm", pack=cfg.pack, overflow=cfg.overflow,
        strict=not cfg.skip_bad_records, eval_paths=cfg.eval_data_path, eval_fraction=cfg.eval_fraction,
        seed=cfg.seed, cache_dir=cfg.data_cache_dir(),
    )


def plan_length(cfg: TrainConfig, steps_per_epoch: int) -> int:
    return cfg.train_steps if cfg.train_steps else cfg.n_epochs * steps_per_epoch


def run(cfg: TrainConfig, rank: int, world_size: int, device_name: str) -> dict:
    """Train; returns a summary (on every rank). Collective: every rank calls it."""
    from transformers import AutoConfig, AutoTokenizer

    pipe, dp = cfg.model_topo.pipe, cfg.model_topo.data
    stage, dp_rank = rank // dp, rank % dp  # PipeDataParallelTopology: rank = stage * D + dp_rank
    is_data_stage = stage in (0, pipe - 1)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model_path)
    hf_config = AutoConfig.from_pretrained(cfg.model_path)

    # Data: rank 0 validates and tokenizes (filling the cache) before any other rank reads it; a
    # data error stops every rank (rank 0 reports it).
    data, problem = None, None
    if rank == 0:
        try:
            data = build_data(cfg, tokenizer)
        except DataError as e:
            problem = e
    if broadcast_object(problem is not None):
        raise problem if problem is not None else DataError([], header="invalid data (reported by rank 0)")
    if rank != 0 and is_data_stage:
        data = build_data(cfg, tokenizer)
    batches = GlobalBatches(data.train, cfg.micro_batch, cfg.grad_accum, dp_rank, dp, cfg.seed) if is_data_stage else None
    steps_per_epoch, n_eval_rows = broadcast_object(
        (batches.steps_per_epoch, len(data.eval) if data.eval is not None else 0) if rank == 0 else None)
    total_steps = plan_length(cfg, steps_per_epoch)

    resume_from = checkpoint.find_resume_tag(cfg.save_path, cfg.resume)
    weights = "checkpoint" if resume_from else ("init" if cfg.from_scratch else "load")
    if rank == 0:
        parts = resolve_parts(cfg, _prepared(hf_config))
        logger.info("pipeline split (%d stages x %d data-parallel):\n%s", pipe, dp, describe_split(cfg, _prepared(hf_config), parts))
        _log_data_stats(data.stats)
    built = build_engine(cfg, hf_config, total_steps, weights)
    engine = built.engine
    if rank == 0:
        checkpoint.prepare_save_path(cfg.save_path, cfg.model_path, cfg.config_path, hf_config, "lm", built.layer_names,
                                     cfg.precision)

    start_step, history, evals = 0, [], []
    if resume_from:
        state = checkpoint.load(engine, *resume_from)
        start_step, history, evals = state["step"], state["history"], state["evals"]
        if batches is not None:
            batches.load_state_dict(state["data"])
        if rank == 0:
            logger.info("resumed from %s/%s at step %d", resume_from[0], resume_from[1], start_step)

    flops_tok = flops_per_token(_matmul_params(built), hf_config.num_hidden_layers, hf_config.hidden_size, cfg.max_seq_len)
    peak = peak_flops(device_name, cfg.precision)
    bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", disable=rank != 0, dynamic_ncols=True)
    loss_scale = float(cfg.grad_accum * dp)
    last_saved = start_step if resume_from else None
    step = start_step
    for step in range(start_step + 1, total_steps + 1):
        it = None
        if batches is not None:
            micro, n_global, real_tokens = batches.next_step()
            it = with_normaliser(micro, n_global, loss_scale)
        start = time.perf_counter()
        loss = float(engine.train_batch(data_iter=it))
        seconds = time.perf_counter() - start
        if not math.isfinite(loss):
            raise NonFiniteLoss(
                f"step {step}: the training loss is {loss}; stopping without saving (the last good checkpoint is "
                f"{cfg.save_path}/latest, if any). Lower the learning rate, check the data, or use bf16 instead of fp16"
            )
        history.append([step, loss])
        if rank == 0:
            tokens_s = real_tokens / seconds
            lr = engine.get_lr()[0]
            grad_norm = engine.get_global_grad_norm()
            util = mfu(tokens_s, flops_tok, world_size, peak)
            events = [("Train/loss", loss, step), ("Train/lr", lr, step), ("Train/tokens_per_s", tokens_s, step)]
            if grad_norm is not None:
                events.append(("Train/grad_norm", float(grad_norm), step))
            if util is not None:
                events.append(("Train/mfu", util, step))
            _write_events(engine, events)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_s:.0f}", **({"mfu": f"{util:.1%}"} if util else {}))
            bar.update(1)
        if cfg.eval_interval and step % cfg.eval_interval == 0 and n_eval_rows:
            evals.append([step, evaluate(engine, data, cfg, dp_rank, n_eval_rows, rank)])
        if cfg.save_interval and step % cfg.save_interval == 0:
            _save(engine, cfg, step, batches, history, evals, rank)
            last_saved = step
    bar.close()
    if n_eval_rows and (not evals or evals[-1][0] != step):
        evals.append([step, evaluate(engine, data, cfg, dp_rank, n_eval_rows, rank)])
    if last_saved != step:
        _save(engine, cfg, step, batches, history, evals, rank)
    if rank == 0:
        write_loss_curve(str(Path(cfg.save_path) / "loss_curve.png"), history, evals, f"{hf_config.model_type} sft")
    return {"step": step, "history": history, "evals": evals}


def evaluate(engine, data, cfg: TrainConfig, dp_rank: int, n_eval_rows: int, rank: int) -> float:
    """Mean loss over all target tokens of the eval set (every rank calls it)."""
    dp = cfg.model_topo.data
    global_rows = cfg.micro_batch * cfg.grad_accum * dp
    n_batches = -(-n_eval_rows // global_rows)
    feed = eval_batches(data.eval, cfg.micro_batch, cfg.grad_accum, dp_rank, dp) if data is not None and data.eval is not None else None
    total, count = 0.0, 0
    for _ in range(n_batches):
        it, n_global = None, 0
        if feed is not None:
            micro, n_global = next(feed)
            it = with_normaliser(micro, n_global, float(cfg.grad_accum * dp))
        loss = float(engine.eval_batch(data_iter=it))
        n_global = broadcast_object(n_global if rank == 0 else None)
        total += loss * n_global
        count += n_global
    eval_loss = total / max(count, 1)
    if rank == 0:
        logger.info("eval: loss %.4f, perplexity %.2f (%d target tokens)", eval_loss, perplexity(eval_loss), count)
        _write_events(engine, [("Eval/loss", eval_loss, engine.global_steps), ("Eval/perplexity", perplexity(eval_loss), engine.global_steps)])
    return eval_loss


def _save(engine, cfg, step, batches, history, evals, rank) -> None:
    _check_finite_weights(engine, step)
    state = {"step": step, "history": history, "evals": evals,
             "data": broadcast_object(batches.state_dict() if rank == 0 else None)}
    checkpoint.save(engine, cfg.save_path, step, state, cfg.keep_last)


def _check_finite_weights(engine, step: int) -> None:
    """Collective: refuse to write a checkpoint whose weights hold NaN/inf on any rank."""
    bad = torch.zeros((), dtype=torch.float32)
    for p in engine.module.parameters():
        if not torch.isfinite(p.detach()).all():
            bad += 1
    torch.distributed.all_reduce(bad)
    if bad.item():
        raise NonFiniteLoss(f"step {step}: {int(bad.item())} parameter tensors hold NaN/inf; not saving this checkpoint "
                            f"(the last good one is the one save_path/latest names, if any). Lower the learning rate or check the data")


def _write_events(engine, events) -> None:
    monitor = getattr(engine, "monitor", None)
    if monitor is not None and monitor.enabled:
        monitor.write_events(events)


def _prepared(hf_config):
    from models.pipeline import prepare_config

    return prepare_config(hf_config)


def _matmul_params(built) -> int:
    """All parameters but the input embedding lookup (a tied head counts once, as a matmul)."""
    from .engine import layer_param_counts

    counts = layer_param_counts(built.model_config)
    return sum(counts[1:])


def _log_data_stats(stats: dict) -> None:
    train = stats.get("train", {})
    logger.info("data: %s samples in %s rows, types %s, truncated %s, dropped %s", train.get("samples"), train.get("rows"),
                train.get("types"), train.get("truncated"), train.get("dropped"))
