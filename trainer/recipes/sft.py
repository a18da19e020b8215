"""Supervised fine-tuning / pretraining: causal-LM loss on the trained tokens (answers and their
end of turn; every token of pretrain records), the mean over the global batch's target tokens
(`trainer.batches` explains the normaliser), evaluated as the mean loss over all eval targets.

    deepspeed train_ds.py --config configs/ds_config_pp.json      ("stage": "sft", the default)
"""
import time
from pathlib import Path

import torch

from models.heads import set_defer_logits
from trainer.batches import collate, eval_batches, load_data, with_normaliser
from trainer.engine import checkpoint
from trainer.engine.build import build_engine
from trainer.engine.distributed import all_reduce_sum
from trainer.engine.forward_only import forward_only
from trainer.engine.guards import check_finite_loss
from trainer.engine.plan import plan_model
from trainer.engine.preflight import preflight
from trainer.generation.eval_samples import sample_generations
from trainer.losses import global_token_mean_loss, token_loss_sums
from trainer.metrics import StepMeter, log_plan, perplexity, write_loss_curve


def run(cfg, topo, device_name: str) -> dict:
    """Train; returns {"step", "history", "evals"} on every rank. Collective: every rank calls it."""
    from transformers import AutoTokenizer

    hosts = preflight(cfg, topo.rank, topo.world_size)
    plan = plan_model(cfg, head="lm")
    tokenizer = AutoTokenizer.from_pretrained(plan.side_dir)
    data = load_data(cfg, tokenizer, "lm", topo, collate)
    total_steps = cfg.train_steps or cfg.n_epochs * data.steps_per_epoch

    resume_from = checkpoint.decide_resume(cfg.save_path, cfg.resume)
    if topo.rank == 0:
        log_plan("sft", cfg, plan, data.data.stats)
    engine = build_engine(cfg, plan, topo, total_steps, weights="checkpoint" if resume_from else
                          ("init" if cfg.from_scratch else "load"), loss_fn=global_token_mean_loss)
    set_defer_logits(engine.module, cfg.chunked_loss)  # the loss computes the head chunk by chunk
    if topo.rank == 0:
        checkpoint.prepare_save_path(cfg.save_path, plan, cfg.config_path, cfg.precision, data.data.stats["pad"]["id"])
        checkpoint.write_topology(cfg.save_path, plan, topo, hosts)
    state = checkpoint.start_or_resume(engine, resume_from, data.batches)

    meter = StepMeter(cfg, plan, engine, topo, device_name, total_steps, state.step)
    loss_scale = float(cfg.grad_accum * topo.data)  # see trainer.batches: sum / N_global * grad_accum * D
    last_saved = state.step if resume_from else None
    for step in range(state.step + 1, total_steps + 1):
        feed, real_tokens = None, 0
        if data.batches is not None:
            micro, n_global, real_tokens = data.batches.next_step()
            feed = with_normaliser(micro, n_global, loss_scale)
        start = time.perf_counter()
        loss = float(engine.train_batch(data_iter=feed))
        seconds = time.perf_counter() - start
        check_finite_loss(loss, step)
        state.step = step
        state.history.append([step, loss])
        meter.log_step(step, loss, real_tokens, seconds)
        if cfg.eval_interval and step % cfg.eval_interval == 0 and data.n_eval_rows:
            state.evals.append([step, meter.log_eval(step, evaluate(engine, cfg, data, topo))])
            sample_generations(engine, cfg, plan, tokenizer, data, topo, step)  # eval_samples: N (0: off)
        if cfg.save_interval and step % cfg.save_interval == 0:
            checkpoint.save_training(engine, cfg.save_path, state, data.batches, cfg.keep_last)
            last_saved = step
    meter.close()

    if data.n_eval_rows and (not state.evals or state.evals[-1][0] != state.step):
        state.evals.append([state.step, meter.log_eval(state.step, evaluate(engine, cfg, data, topo))])
        sample_generations(engine, cfg, plan, tokenizer, data, topo, state.step)
    if last_saved != state.step:
        checkpoint.save_training(engine, cfg.save_path, state, data.batches, cfg.keep_last)
    if topo.rank == 0:
        write_loss_curve(str(Path(cfg.save_path) / "loss_curve.png"), state.history,
                         [(s, e["loss"]) for s, e in state.evals], f"{plan.hf_config.model_type} sft")
    return {"step": state.step, "history": state.history, "evals": state.evals}


def evaluate(engine, cfg, data, topo) -> dict:
    """Mean loss over all target tokens of the eval set, and its perplexity. Collective: the last
    stage of each replica sums its share (`eval_batches` shards the rows), then every rank all-reduces."""
    sums = torch.zeros(2, dtype=torch.float64)
    feed = eval_batches(data.eval, cfg.micro_batch, cfg.grad_accum, topo.dp_rank, topo.data) if data.eval is not None else None
    n_calls = -(-data.n_eval_rows // (cfg.micro_batch * cfg.grad_accum * topo.data))
    for _ in range(n_calls):
        micro = next(feed)[0] if feed is not None else None
        results = forward_only(engine, micro, cfg.grad_accum, token_loss_sums, deferred_logits=cfg.chunked_loss)
        if results is not None:
            sums += torch.stack(results).sum(0).cpu()
    sums = all_reduce_sum(sums)
    loss = sums[0].item() / max(sums[1].item(), 1.0)
    return {"loss": loss, "perplexity": perplexity(loss)}


# ---------------------------------------------------------------------------------------------
# The RLHF chain's hooks (listed in trainer/recipes/__init__.py; trainer/chain.py calls them).

def exports(cfg) -> list[tuple[Path, Path]]:
    """The trained model -> save_path/hf (*ForCausalLM)."""
    save = Path(cfg.save_path)
    return [(save, save / "hf")]


def state_result(summary: dict) -> dict:
    return {}


def headline(result: dict, cfg) -> dict:
    evals = result.get("eval") or {}
    return {"eval_loss": evals.get("loss"), "eval_perplexity": evals.get("perplexity")}


def headline_text(numbers: dict) -> str:
    from trainer.metrics import format_number as fmt

    return f"eval loss {fmt(numbers['eval_loss'])} (perplexity {fmt(numbers['eval_perplexity'])})"
