"""The reward model (InstructGPT step 2) on the pipeline engine.

The last pipe layer is a scalar value head (hidden -> 1) on the final norm's output. A sequence's
score is the value at its last real token (`models.heads.last_token_index`, the answer's EOS).

Data: `pairwise` records and `ranked` records (K >= 2 responses, best first), built with
kind="ranked" (`data.batching.RankedDataset`, `collate_ranked`). Every micro-batch holds B records
(train_micro_batch_size_per_gpu) and all their responses, response-major: row k*B + b is response k
of record b, so each response is forwarded once per step, not once per pair. The pipeline needs the
same row count in every micro-batch, so every record has K rows, K the most responses of any record
of the data (train and eval); a record with fewer fills the rest with copies of its best response
that no pair uses (the build stats count these `filler_rows`; a dataset of pairs has K = 2 and none).
A micro-batch is therefore K*B rows: size train_micro_batch_size_per_gpu for that (the memory model
and `parts: "auto"` count B rows), and tokens/s counts the filler rows, which are computed.

Loss. A pair (i better than j, of one record) costs -logsigmoid(score_i - score_j - margin) (margin: a
pairwise record's optional `margin`, 0 when absent, as in Llama 2's reward model; ranked records have
none). As InstructGPT does, a record's loss is the mean over its K(K-1)/2 pairs (all comparisons of
one prompt count as one example, whatever its K), and a micro-batch's loss is the mean over its B
records. Every micro-batch holds the same number of records (the sampler drops the remainder), so
DeepSpeed's mean over micro-batches and data-parallel ranks is the mean over the global batch's
records, however they are split. With only pairs (K = 2) that is the mean over the global batch's
pairs, computed by the original pairwise code path (`pairwise_loss`: bit-identical to before).

Eval: accuracy is the fraction of ordered pairs whose better response scores strictly higher (each
pair of a ranking counts once; a tie counts as wrong, as DPO's rewards/accuracies, so an untrained
head that scores everything alike gets 0, not 0.5), chosen/rejected score the mean score of the better/worse side over pairs, loss the
training loss (mean over records of the mean over their pairs).

    deepspeed train_ds.py --config configs/ds_config_rm.json      ("stage": "rm")
"""

import torch
import torch.nn.functional as F

from data.batching import collate_ranked
from models.heads import last_token_index, sequence_scores
from trainer.batches import forward_eval_rows
from trainer.engine import checkpoint
from trainer.engine.build import build_engine
from trainer.engine.distributed import all_reduce_sum
from trainer.recipes.common import finish, prepare, start, train_step


def run(cfg, topo, device_name: str) -> dict:
    """Train; returns {"step", "history", "evals"} on every rank. Collective: every rank calls it."""
    job = prepare(cfg, topo, "rm", head="value", kind="ranked", collate=collate_ranked)
    data = job.data
    engine = build_engine(cfg, job.plan, topo, job.total_steps, weights=job.weights(cfg), loss_fn=reward_loss)
    state, meter = start(cfg, topo, job, engine, data.batches, device_name)

    def evaluate_and_log(step: int) -> dict:
        return meter.log_eval(step, evaluate(engine, cfg, data, topo), shown="accuracy")

    last_saved = state.step if job.resume_from else None
    for step in range(state.step + 1, job.total_steps + 1):
        feed, real_tokens = None, 0
        if data.batches is not None:
            micro, _, real_tokens = data.batches.next_step()
            feed = (with_score_labels(batch) for batch in micro)
        loss, seconds = train_step(engine, feed, step)
        state.step = step
        state.history.append([step, loss])
        meter.log_step(step, loss, real_tokens, seconds)
        if cfg.eval_interval and step % cfg.eval_interval == 0 and data.n_eval_rows:
            state.evals.append([step, evaluate_and_log(step)])
        if cfg.save_interval and step % cfg.save_interval == 0:
            checkpoint.save_training(engine, cfg.save_path, state, data.batches, cfg.keep_last)
            last_saved = step
    return finish(cfg, topo, job, engine, state, meter, data.batches, last_saved, evaluate_and_log, "rm")


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


def ranked_pairs(n_responses: torch.Tensor, margins: torch.Tensor) -> tuple:
    """The ordered pairs of a micro-batch of B records laid out response-major (row k*B + b =
    response k of record b): n_responses int64[B], margins float[B] ->
    (better int64[P], worse int64[P], margin float32[P], weight float32[P]), P = sum n(n-1)/2, with
    weight 1 / (B * n(n-1)/2): the weighted sum of pair losses is the mean over records of the mean
    over each record's pairs."""
    B = len(n_responses)
    better, worse, margin, weight = [], [], [], []
    for b, n in enumerate(n_responses.tolist()):
        n_pairs = n * (n - 1) // 2
        for i in range(n):
            for j in range(i + 1, n):
                better.append(i * B + b)
                worse.append(j * B + b)
                margin.append(float(margins[b]))
                weight.append(1.0 / (B * n_pairs))
    return (torch.tensor(better, dtype=torch.int64), torch.tensor(worse, dtype=torch.int64),
            torch.tensor(margin, dtype=torch.float32), torch.tensor(weight, dtype=torch.float32))


def ranked_loss(values: torch.Tensor, labels) -> torch.Tensor:
    """labels (last_index int64[K*B], better, worse, margin, weight: [P], from `ranked_pairs`) ->
    sum(weight * -logsigmoid(score_better - score_worse - margin)): the mean over the B records of
    each record's mean pair loss."""
    index, better, worse, margin, weight = labels
    scores = sequence_scores(values, index)  # float32[K*B]
    better, worse = better.to(scores.device), worse.to(scores.device)
    losses = pair_losses(scores[better], scores[worse], margin)
    return (losses * weight.to(losses.device, losses.dtype)).sum()


def reward_loss(values: torch.Tensor, labels) -> torch.Tensor:
    """The training loss_fn: `pairwise_loss` for batches of pairs, `ranked_loss` otherwise (by the
    labels `with_score_labels` made)."""
    return pairwise_loss(values, labels) if len(labels) == 2 else ranked_loss(values, labels)


def only_pairs(attention_mask: torch.Tensor, margins: torch.Tensor) -> bool:
    """True when a collated batch holds K = 2 rows per record (the dataset has only pairs)."""
    return attention_mask.shape[0] == 2 * len(margins)


def with_score_labels(batch: tuple) -> tuple:
    """A collated batch (`collate_ranked`) as the engine pulls it. Pairs (K = 2): labels (score
    positions int64[2B], margins float[B]), as before ranked records existed; K > 2: labels (score
    positions int64[K*B], better, worse, margin, weight) of `ranked_pairs`."""
    (input_ids, attention_mask), _answer_labels, margins, n_responses = batch
    index = last_token_index(attention_mask)
    if only_pairs(attention_mask, margins):
        return (input_ids, attention_mask), (index, margins)
    return (input_ids, attention_mask), (index, *ranked_pairs(n_responses, margins))


def pair_sums(values: torch.Tensor, labels) -> torch.Tensor:
    """float64[6] over the micro-batch's real pairs: (pairs, correct, chosen score, rejected score, loss,
    records); a pair is a record here, so the loss sum is also the sum of the records' losses."""
    index, margin, real = labels
    chosen, rejected = pair_scores(values, index)
    weight = real.to(chosen.device, torch.float64)
    chosen, rejected = chosen.double(), rejected.double()
    loss = pair_losses(chosen, rejected, margin)
    return torch.stack([weight.sum(), ((chosen > rejected).double() * weight).sum(), (chosen * weight).sum(),
                        (rejected * weight).sum(), (loss * weight).sum(), weight.sum()]).cpu()


def ranked_sums(values: torch.Tensor, labels) -> torch.Tensor:
    """float64[6] over the micro-batch's real records' pairs: (pairs, correctly ordered pairs, better
    score, worse score, sum over records of their mean pair loss, records). labels: `with_score_labels`'
    ranked labels + real bool[B] (filler records have weight 0)."""
    index, better, worse, margin, weight, real = labels
    scores = sequence_scores(values, index).double()
    better, worse = better.to(scores.device), worse.to(scores.device)
    B = len(real)
    record = better % B  # each pair's record (row k*B + b)
    is_real = real.to(scores.device, torch.float64)[record]  # float64[P]
    hi, lo = scores[better], scores[worse]
    loss = pair_losses(hi, lo, margin)
    record_share = weight.to(scores.device, torch.float64) * B  # 1 / (its record's pairs)
    return torch.stack([is_real.sum(), ((hi > lo).double() * is_real).sum(), (hi * is_real).sum(), (lo * is_real).sum(),
                        (loss * record_share * is_real).sum(), real.double().sum()]).cpu()


def eval_sums(values: torch.Tensor, labels) -> torch.Tensor:
    """The evaluation's reduce: `pair_sums` for batches of pairs, `ranked_sums` otherwise."""
    return pair_sums(values, labels) if len(labels) == 3 else ranked_sums(values, labels)


def evaluate(engine, cfg, data, topo) -> dict:
    """Accuracy (pairs whose better response scores higher), mean chosen (better) / rejected (worse)
    scores over the eval pairs, and the loss (mean over records of their mean pair loss), each
    replica's last stage scoring its share (`eval_row_indices`); sums all-reduced. Collective."""
    def micro_batch_of(indices):
        inputs, labels = with_score_labels(collate_ranked([data.eval[max(i, 0)] for i in indices]))
        return inputs, (*labels, torch.tensor([i >= 0 for i in indices]))

    sums = torch.zeros(6, dtype=torch.float64)
    for results in forward_eval_rows(engine, cfg, topo, data.n_eval_rows, micro_batch_of if data.eval is not None else None,
                                     eval_sums):
        if results is not None:
            sums += torch.stack(results).sum(0)
    sums = all_reduce_sum(sums)
    n_pairs, n_records = max(sums[0].item(), 1.0), max(sums[5].item(), 1.0)
    return {"loss": sums[4].item() / n_records, "accuracy": sums[1].item() / n_pairs,
            "chosen_score": sums[2].item() / n_pairs, "rejected_score": sums[3].item() / n_pairs}


# ---------------------------------------------------------------------------------------------
# The RLHF chain's hooks (listed in trainer/recipes/__init__.py; trainer/chain.py calls them).

def headline(result: dict, cfg) -> dict:
    evals = result.get("eval") or {}
    return {"eval_accuracy": evals.get("accuracy"), "eval_chosen_score": evals.get("chosen_score"),
            "eval_rejected_score": evals.get("rejected_score")}


def headline_text(numbers: dict) -> str:
    from trainer.metrics import format_number as fmt

    return (f"eval accuracy {fmt(numbers['eval_accuracy'])} (chosen score {fmt(numbers['eval_chosen_score'])}, "
            f"rejected {fmt(numbers['eval_rejected_score'])})")
