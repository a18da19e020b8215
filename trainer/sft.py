"""The SFT / pretraining stage: causal-LM loss on the trained tokens (answers + end of turn; every
token for pretrain records), normalised over the global batch's target tokens (trainer.batches)."""
from .batches import collate, eval_batches, with_normaliser
from .distributed import broadcast_object
from .loop import Context, Stage
from .losses import global_token_mean_loss
from .metrics import perplexity


def evaluate(ctx: Context) -> dict:
    """Mean loss over all target tokens of the eval set, and its perplexity. Collective."""
    cfg, dp = ctx.cfg, ctx.cfg.model_topo.data
    global_rows = cfg.micro_batch * cfg.grad_accum * dp
    n_batches = -(-ctx.n_eval_rows // global_rows)
    feed = (eval_batches(ctx.data.eval, cfg.micro_batch, cfg.grad_accum, ctx.dp_rank, dp)
            if ctx.data is not None and ctx.data.eval is not None else None)
    total, count = 0.0, 0
    for _ in range(n_batches):
        it, n_global = None, 0
        if feed is not None:
            micro, n_global = next(feed)
            it = with_normaliser(micro, n_global, float(cfg.grad_accum * dp))
        loss = float(ctx.engine.eval_batch(data_iter=it))
        n_global = broadcast_object(n_global if ctx.rank == 0 else None)
        total += loss * n_global
        count += n_global
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": perplexity(loss)}


SFT = Stage(name="sft", data_kind="lm", head="lm", loss_fn=global_token_mean_loss, collate=collate,
            feed=with_normaliser, evaluate=evaluate)
