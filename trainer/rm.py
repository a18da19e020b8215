"""The reward-model stage (InstructGPT step 2) on the pipeline engine.

The last pipe layer is the final norm's output through a scalar value head (hidden -> 1). Each
micro-batch holds both sides of its pairs: B pairwise records give 2B rows, the B chosen rows
first, then the B rejected rows in the same order (`data.dataset.collate_pairs`). A sequence's score
is the value at its last real token (`models.heads.last_token_index`), and the loss is
    -logsigmoid(score_chosen - score_rejected - margin), averaged over pairs
(margin: the record's optional `margin`, 0 when absent, as in Llama 2's reward model).
Every micro-batch holds the same number of pairs, so DeepSpeed's mean over micro-batches and
data-parallel ranks is the mean over the global batch's pairs.
"""
import torch
import torch.nn.functional as F

from data.dataset import collate_pairs
from models.heads import last_token_index, sequence_scores

from .distributed import collective_device
from .loop import Context, Stage


def pairwise_loss(values: torch.Tensor, labels) -> torch.Tensor:
    """values float[2B,T] (chosen rows, then rejected); labels (last_index int64[2B], margin float[B])."""
    index, margin = labels
    scores = sequence_scores(values, index)
    chosen, rejected = scores.chunk(2)
    return -F.logsigmoid(chosen - rejected - margin.to(scores.device, torch.float32)).mean()


def feed(micro_batches: list, n_global: int = 0, loss_scale: float = 1.0):
    """(inputs, labels) as the engine pulls them: the labels are the score positions and margins."""
    for (input_ids, attention_mask), _answer_labels, margin in micro_batches:
        yield (input_ids, attention_mask), (last_token_index(attention_mask), margin)


def evaluate(ctx: Context) -> dict:
    """Accuracy (chosen scored above rejected), mean chosen/rejected scores and loss over the eval
    pairs. Each eval_batch call runs one micro-batch (DeepSpeed returns the outputs of the last
    micro-batch only); the last stage of each data-parallel replica scores its share, and the sums
    are all-reduced over every rank. Collective."""
    cfg, dp = ctx.cfg, ctx.cfg.model_topo.data
    per_call = cfg.micro_batch * dp  # pairs per eval_batch call over all replicas
    sums = torch.zeros(5, dtype=torch.float64)  # pairs, correct, chosen, rejected, loss
    for start in range(0, ctx.n_eval_rows, per_call):
        mine = [i for i in range(start + ctx.dp_rank * cfg.micro_batch, start + (ctx.dp_rank + 1) * cfg.micro_batch)]
        real = [i < ctx.n_eval_rows for i in mine]
        it = None
        if ctx.data is not None:
            batch = collate_pairs([ctx.data.eval[i if ok else 0] for i, ok in zip(mine, real)])
            it = feed([batch])
        _, values = ctx.engine.eval_batch(data_iter=it, return_logits=True, num_micro_batches=1, bcast_loss=False)
        if ctx.is_last_stage:
            (_, mask), _, margin = batch
            scores = sequence_scores(values, last_token_index(mask)).double()
            chosen, rejected = scores.chunk(2)
            weight = torch.tensor(real, dtype=torch.float64, device=scores.device)
            sums += torch.stack([weight.sum(), ((chosen > rejected).double() * weight).sum(), (chosen * weight).sum(),
                                 (rejected * weight).sum(), (-F.logsigmoid(chosen - rejected - margin.to(scores)) * weight).sum()]).cpu()
    sums = sums.to(collective_device())
    torch.distributed.all_reduce(sums)
    sums = sums.cpu()
    n = max(sums[0].item(), 1.0)
    return {"loss": sums[4].item() / n, "accuracy": sums[1].item() / n, "chosen_score": sums[2].item() / n,
            "rejected_score": sums[3].item() / n}


REWARD = Stage(name="rm", data_kind="pairwise", head="value", loss_fn=pairwise_loss, collate=collate_pairs,
               feed=feed, evaluate=evaluate)
