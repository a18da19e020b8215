"""Direct preference optimisation (DPO, and its IPO / cDPO / SimPO / RPO variants) on the pipeline engine.

Data: `pairwise` records; each micro-batch holds both sides of its pairs (B pairs -> 2B rows, the B
chosen rows first, `data.batching.collate_pairs`). The last stage sums each row's answer-token
log-probs and computes the loss of `loss_type` (`trainer.rl.dpo` has the formulas) against the
reference's log-probs, which were computed once before training (`trainer.rl.reference_logps`) and reach
the last stage through the labels tuple: (answer labels int64[2B,T], reference log-probs float64[2B],
sft scale float64[]).

Normalisation: every micro-batch holds the same number of pairs, so the preference term is the mean
over the micro-batch's pairs and DeepSpeed's mean over micro-batches and data-parallel ranks is the
mean over the global batch's pairs. The optional SFT term (`sft_coef`, RPO: the chosen answers' LM
loss) is the mean over the global batch's chosen answer tokens, normalised as SFT's loss is
(`trainer.batches`: sum / N_chosen_global * grad_accum * D).

Metrics: DeepSpeed's train_batch returns only the loss, so the loss_fn also records each micro-batch's
sums (`trainer.rl.dpo.pair_stats`) on the last stage; after train_batch they are all-reduced (zeros from
the other stages) into TRL's `rewards/chosen|rejected|margins|accuracies`, `logps/chosen|rejected`,
written as Train/... and Eval/... through DeepSpeed's monitor and shown on the progress bar.

    deepspeed train_ds.py --config configs/ds_config_dpo.json      ("stage": "dpo")

For the RLHF command (issue 14: SFT -> DPO instead of SFT -> RM -> PPO), what it needs from here:
a DPO config of its own (stage "dpo", its own save_path, pairwise data) whose model_path is the SFT
run's save_path (its `latest` is followed; ref_path then defaults to it, so the reference is the SFT
model); `run(cfg, topo, device_name)` in the same process after the SFT recipe returned (engines are
built per call; tests/multirank/train_runs.py runs recipes in sequence that way); resume "auto" per
stage (a finished stage trains no step); the reference cache is keyed by the SFT checkpoint's layer
files, so an SFT stage that trains further invalidates it. Export: pp_to_hg of the DPO save_path.
"""

import torch

from data.batching import collate_dpo, collate_pairs
from models.heads import set_defer_logits
from trainer.batches import GlobalBatches, forward_eval_rows, n_target_tokens, token_scale
from trainer.engine import checkpoint
from trainer.engine.build import build_engine, disable_dropout, frozen_engine
from trainer.engine.distributed import all_reduce_sum, broadcast_object
from trainer.engine.plan import plan_model
from trainer.metrics import write_events
from trainer.recipes.common import finish, prepare, start, train_step
from trainer.rl.dpo import STAT_FIELDS, DPOLoss, eval_pair_stats, metrics_from_stats
from trainer.rl.reference_logps import ReferenceLogps, WithReference


def run(cfg, topo, device_name: str) -> dict:
    """Train; returns {"step", "history", "evals", "train_metrics"} on every rank. Collective."""
    opts = cfg.options
    job = prepare(cfg, topo, "dpo", head="lm", kind="pairwise", collate=collate_pairs)
    data, plan = job.data, job.plan
    n_train = broadcast_object(len(data.data.train) if topo.rank == 0 else None)
    # Reference log-probs: cached, or from a frozen reference engine (freed before the policy is
    # built), or, when ref_path is the policy's start and the run is fresh, from the policy below.
    if opts.uses_reference:
        ref_plan = plan if opts.ref_path in (None, cfg.model_path) else plan_model(cfg, head="lm", model_path=opts.ref_path)
        ref = ReferenceLogps.lookup(cfg, topo, data, plan, ref_plan, n_train)
        if ref.missing and (job.resume_from or not ref.policy_is_reference):
            with frozen_engine(cfg, ref_plan, topo) as ref_engine:
                ref.compute(ref_engine, cfg, topo, data, n_train, data.n_eval_rows, f"a frozen copy of {ref_plan.model_path}")
    else:
        ref = ReferenceLogps.unused(n_train, data.n_eval_rows)
    loss_fn = DPOLoss(opts)
    engine = build_engine(cfg, plan, topo, job.total_steps, weights=job.weights(cfg), loss_fn=loss_fn)
    set_defer_logits(engine.module, cfg.chunked_loss)  # log-probs computed with the head chunk by chunk
    if opts.disable_dropout:  # the reference's log-probs come from an eval-mode forward
        disable_dropout(engine.module)
    if ref.missing:
        ref.compute(engine, cfg, topo, data, n_train, data.n_eval_rows, "the policy's starting weights")
    batches = None
    if topo.is_data_stage:
        batches = ChosenTokenBatches(WithReference(data.data.train, ref.train), cfg.micro_batch, cfg.grad_accum,
                                     topo.dp_rank, topo.data, cfg.seed, collate=collate_dpo)
    state, meter = start(cfg, topo, job, engine, batches, device_name)

    def evaluate_and_log(step: int) -> dict:
        return meter.log_eval(step, evaluate(engine, cfg, data, ref, opts, topo), shown="rewards/accuracies")

    last_saved, train_metrics = (state.step if job.resume_from else None), []
    for step in range(state.step + 1, job.total_steps + 1):
        feed, real_tokens = None, 0
        if batches is not None:
            micro, n_chosen_tokens, real_tokens = batches.next_step()
            scale = token_scale(n_chosen_tokens, cfg.grad_accum * topo.data)  # RPO's LM term: mean over chosen tokens
            feed = ((inputs, (labels, ref_logps, scale)) for inputs, labels, ref_logps in micro)
        loss, seconds = train_step(engine, feed, step)
        metrics = metrics_from_stats(all_reduce_sum(loss_fn.take_step_stats()), opts.sft_coef)
        metrics["loss"] = loss
        state.step = step
        state.history.append([step, loss])
        train_metrics.append([step, metrics])
        meter.log_step(step, loss, real_tokens, seconds)
        show_train_metrics(meter, engine, topo, step, metrics)
        if cfg.eval_interval and step % cfg.eval_interval == 0 and data.n_eval_rows:
            state.evals.append([step, evaluate_and_log(step)])
        if cfg.save_interval and step % cfg.save_interval == 0:
            checkpoint.save_training(engine, cfg.save_path, state, batches, cfg.keep_last)
            last_saved = step
    return finish(cfg, topo, job, engine, state, meter, batches, last_saved, evaluate_and_log, f"dpo ({opts.loss_type})",
                  extra={"train_metrics": train_metrics})


def evaluate(engine, cfg, data, ref, opts, topo) -> dict:
    """TRL's metrics and the loss over the eval pairs, each replica's last stage scoring its share
    (`eval_row_indices`); sums all-reduced. Collective."""
    pairs = WithReference(data.eval, ref.eval) if data.eval is not None else None

    def micro_batch_of(indices):
        inputs, labels, ref_logps = collate_dpo([pairs[max(i, 0)] for i in indices])
        return inputs, (labels, ref_logps, torch.tensor([float(i >= 0) for i in indices]))

    sums = torch.zeros(len(STAT_FIELDS), dtype=torch.float64)
    for results in forward_eval_rows(engine, cfg, topo, data.n_eval_rows, micro_batch_of if pairs is not None else None,
                                     eval_pair_stats(opts), deferred_logits=cfg.chunked_loss):
        if results is not None:
            sums += torch.stack(results).sum(0)
    return metrics_from_stats(all_reduce_sum(sums), opts.sft_coef)


def show_train_metrics(meter, engine, topo, step: int, metrics: dict) -> None:
    """Train/rewards/..., Train/logps/... to the monitor (the meter wrote Train/loss); accuracy and
    margin on the progress bar."""
    if topo.rank != 0:
        return
    write_events(engine, [(f"Train/{k}", float(v), step) for k, v in metrics.items() if k != "loss"])
    meter.bar.set_postfix_str(f"{meter.bar.postfix}, acc={metrics['rewards/accuracies']:.3g}, "
                              f"margin={metrics['rewards/margins']:.3g}")


class ChosenTokenBatches(GlobalBatches):
    """GlobalBatches whose N_global counts the chosen answers' target tokens: the SFT term's normaliser."""

    def _targets(self, index: int) -> int:
        if index not in self._n_targets:
            self._n_targets[index] = n_target_tokens(self.dataset[index][1][0])
        return self._n_targets[index]


# ---------------------------------------------------------------------------------------------
# The RLHF chain's hooks (listed in trainer/recipes/__init__.py; trainer/chain.py calls them).

def state_result(summary: dict) -> dict:
    """The last train metrics (rewards/..., logps/...)."""
    return {"train_last": summary["train_metrics"][-1][1]} if summary.get("train_metrics") else {}


def headline(result: dict, cfg) -> dict:
    evals = result.get("eval") or {}
    return {f"eval_{k}": evals.get(k) for k in ("rewards/accuracies", "rewards/margins", "loss")}


def headline_text(numbers: dict) -> str:
    from trainer.metrics import format_number as fmt

    return (f"eval rewards/accuracies {fmt(numbers['eval_rewards/accuracies'])}, "
            f"rewards/margins {fmt(numbers['eval_rewards/margins'])}")
