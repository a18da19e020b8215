"""The reward model (InstructGPT step 2) on the pipeline engine.

The last pipe layer is a scalar value head (hidden -> 1) on the final norm's output. Each
micro-batch holds both sides of its pairs: B pairwise records give 2B rows, the B chosen rows
first, then the B rejected rows in the same order (`data.dataset.collate_pairs`). A sequence's score
is the value at its last real token (`models.heads.last_token_index`), and the loss is
    -logsigmoid(score_chosen - score_rejected - margin), averaged over pairs
(margin: the record's optional `margin`, 0 when absent, as in Llama 2's reward model).
Every micro-batch holds the same number of pairs, so DeepSpeed's mean over micro-batches and
data-parallel ranks is the mean over the global batch's pairs.

    deepspeed train_ds.py --config configs/ds_config_rm.json      ("stage": "rm")
"""
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from data.dataset import collate_pairs
from models.heads import last_token_index, sequence_scores

from .. import checkpoint
from ..batches import eval_row_indices
from ..data_loading import load_data
from ..distributed import all_reduce_sum
from ..engine import build_engine
from ..forward_only import forward_only
from ..guards import check_finite_loss
from ..metering import StepMeter, log_plan
from ..metrics import write_loss_curve
from ..model_plan import plan_model
from ..preflight import preflight


def run(cfg, topo, device_name: str) -> dict:
    """Train; returns {"step", "history", "evals"} on every rank. Collective: every rank calls it."""
    from transformers import AutoTokenizer

    hosts = preflight(cfg, topo.rank, topo.world_size)
    plan = plan_model(cfg, head="value")
    tokenizer = AutoTokenizer.from_pretrained(plan.side_dir)
    data = load_data(cfg, tokenizer, "pairwise", topo, collate_pairs)
    total_steps = cfg.train_steps or cfg.n_epochs * data.steps_per_epoch

    resume_from = checkpoint.decide_resume(cfg.save_path, cfg.resume)
    if topo.rank == 0:
        log_plan("rm", cfg, plan, data.data.stats)
    engine = build_engine(cfg, plan, topo, total_steps, weights="checkpoint" if resume_from else
                          ("init" if cfg.from_scratch else "load"), loss_fn=pairwise_loss)
    if topo.rank == 0:
        checkpoint.prepare_save_path(cfg.save_path, plan, cfg.config_path, cfg.precision, data.data.stats["pad"]["id"])
        checkpoint.write_topology(cfg.save_path, plan, topo, hosts)
    state = checkpoint.start_or_resume(engine, resume_from, data.batches)

    meter = StepMeter(cfg, plan, engine, topo, device_name, total_steps, state.step)
    last_saved = state.step if resume_from else None
    for step in range(state.step + 1, total_steps + 1):
        feed, real_tokens = None, 0
        if data.batches is not None:
            micro, _, real_tokens = data.batches.next_step()
            feed = (with_score_labels(batch) for batch in micro)
        start = time.perf_counter()
        loss = float(engine.train_batch(data_iter=feed))
        seconds = time.perf_counter() - start
        check_finite_loss(loss, step)
        state.step = step
        state.history.append([step, loss])
        meter.log_step(step, loss, real_tokens, seconds)
        if cfg.eval_interval and step % cfg.eval_interval == 0 and data.n_eval_rows:
            state.evals.append([step, meter.log_eval(step, evaluate(engine, cfg, data, topo), shown="accuracy")])
        if cfg.save_interval and step % cfg.save_interval == 0:
            checkpoint.save_training(engine, cfg.save_path, state, data.batches, cfg.keep_last)
            last_saved = step
    meter.close()

    if data.n_eval_rows and (not state.evals or state.evals[-1][0] != state.step):
        state.evals.append([state.step, meter.log_eval(state.step, evaluate(engine, cfg, data, topo), shown="accuracy")])
    if last_saved != state.step:
        checkpoint.save_training(engine, cfg.save_path, state, data.batches, cfg.keep_last)
    if topo.rank == 0:
        write_loss_curve(str(Path(cfg.save_path) / "loss_curve.png"), state.history,
                         [(s, e["loss"]) for s, e in state.evals], f"{plan.hf_config.model_type} rm")
    return {"step": state.step, "history": state.history, "evals": state.evals}


def pair_scores(values: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """values float[2B,T] (chosen rows, then rejected), index int64[2B] -> (chosen, rejected) float32[B]."""
    return sequence_scores(values, index).chunk(2)


def pair_losses(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """float[B]: -logsigmoid(chosen - rejected - margin), in the scores' dtype."""
    return -F.logsigmoid(chosen - rejected - margin.to(chosen.device, chosen.dtype))


def pairwise_loss(values: torch.Tensor, labels) -> torch.Tensor:
    """The training loss_fn: labels (last_index int64[2B], margin float[B]) -> mean over the B pairs."""
    index, margin = labels
    return pair_losses(*pair_scores(values, index), margin).mean()


def with_score_labels(batch: tuple) -> tuple:
    """A collated pair batch as the engine pulls it: the labels are the score positions and margins."""
    (input_ids, attention_mask), _answer_labels, margin = batch
    return (input_ids, attention_mask), (last_token_index(attention_mask), margin)


def pair_sums(values: torch.Tensor, labels) -> torch.Tensor:
    """float64[5] over the micro-batch's real pairs: (pairs, correct, chosen score, rejected score, loss)."""
    index, margin, real = labels
    chosen, rejected = pair_scores(values, index)
    weight = real.to(chosen.device, torch.float64)
    chosen, rejected = chosen.double(), rejected.double()
    loss = pair_losses(chosen, rejected, margin)
    return torch.stack([weight.sum(), ((chosen > rejected).double() * weight).sum(), (chosen * weight).sum(),
                        (rejected * weight).sum(), (loss * weight).sum()]).cpu()


def evaluate(engine, cfg, data, topo) -> dict:
    """Accuracy (chosen scored above rejected), mean chosen/rejected scores and loss over the eval
    pairs, each replica's last stage scoring its share (`eval_row_indices`); sums all-reduced. Collective."""
    sums = torch.zeros(5, dtype=torch.float64)
    for micro_indices in eval_row_indices(data.n_eval_rows, cfg.micro_batch, cfg.grad_accum, topo.dp_rank, topo.data):
        micro = None
        if data.eval is not None:
            micro = []
            for indices in micro_indices:
                inputs, labels = with_score_labels(collate_pairs([data.eval[max(i, 0)] for i in indices]))
                micro.append((inputs, (*labels, torch.tensor([i >= 0 for i in indices]))))
        results = forward_only(engine, micro, cfg.grad_accum, pair_sums)
        if results is not None:
            sums += torch.stack(results).sum(0)
    sums = all_reduce_sum(sums)
    n = max(sums[0].item(), 1.0)
    return {"loss": sums[4].item() / n, "accuracy": sums[1].item() / n, "chosen_score": sums[2].item() / n,
            "rejected_score": sums[3].item() / n}
