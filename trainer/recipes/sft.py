"""Supervised fine-tuning / pretraining: causal-LM loss on the trained tokens (answers and their
end of turn; every token of pretrain records), the mean over the global batch's target tokens
(`trainer.batches` explains the normaliser), evaluated as the mean loss over all eval targets.

    deepspeed train_ds.py --config configs/ds_config_pp.json      ("stage": "sft", the default)
"""

import torch

from data.batching import collate
from models.heads import set_defer_logits
from trainer.batches import eval_batches, with_normaliser
from trainer.engine import checkpoint
from trainer.engine.build import build_engine
from trainer.engine.distributed import all_reduce_sum
from trainer.engine.forward_only import forward_only
from trainer.generation.eval_samples import sample_generations
from trainer.losses import global_token_mean_loss, token_loss_sums
from trainer.metrics import perplexity
from trainer.recipes.common import finish, prepare, start, train_step


def run(cfg, topo, device_name: str) -> dict:
    """Train; returns {"step", "history", "evals"} on every rank. Collective: every rank calls it."""
    job = prepare(cfg, topo, "sft", head="lm", kind="lm", collate=collate)
    data = job.data
    engine = build_engine(cfg, job.plan, topo, job.total_steps, weights=job.weights(cfg), loss_fn=global_token_mean_loss)
    set_defer_logits(engine.module, cfg.chunked_loss)  # the loss computes the head chunk by chunk
    state, meter = start(cfg, topo, job, engine, data.batches, device_name)

    def evaluate_and_sample(step: int) -> dict:
        metrics = meter.log_eval(step, evaluate(engine, cfg, data, topo))
        sample_generations(engine, cfg, job.plan, job.tokenizer, data, topo, step)  # eval_samples: N (0: off)
        return metrics

    last_saved = state.step if job.resume_from else None
    for step in range(state.step + 1, job.total_steps + 1):
        feed, real_tokens = None, 0
        if data.batches is not None:
            micro, n_global, real_tokens = data.batches.next_step()
            feed = with_normaliser(micro, n_global, cfg.grad_accum * topo.data)
        loss, seconds = train_step(engine, feed, step)
        state.step = step
        state.history.append([step, loss])
        meter.log_step(step, loss, real_tokens, seconds)
        if cfg.eval_interval and step % cfg.eval_interval == 0 and data.n_eval_rows:
            state.evals.append([step, evaluate_and_sample(step)])
        if cfg.save_interval and step % cfg.save_interval == 0:
            checkpoint.save_training(engine, cfg.save_path, state, data.batches, cfg.keep_last)
            last_saved = step
    return finish(cfg, topo, job, engine, state, meter, data.batches, last_saved, evaluate_and_sample, "sft")


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

def headline(result: dict, cfg) -> dict:
    evals = result.get("eval") or {}
    return {"eval_loss": evals.get("loss"), "eval_perplexity": evals.get("perplexity")}


def headline_text(numbers: dict) -> str:
    from trainer.metrics import format_number as fmt

    return f"eval loss {fmt(numbers['eval_loss'])} (perplexity {fmt(numbers['eval_perplexity'])})"
