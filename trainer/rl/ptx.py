"""PPO-ptx (InstructGPT): after each actor minibatch step, one more actor step on LM records of
ptx_data_path with loss ptx_coef x the token-mean LM loss, at the rollout width so the pipeline's
activation shapes stay the same (DeepSpeed-Chat's unsupervised step; the schedulers count it)."""
import dataclasses

from data.batching import collate
from trainer.batches import load_data, with_normaliser
from trainer.losses import global_token_mean_loss


def load_ptx_batches(cfg, opts, tokenizer, topo):
    """Collective: GlobalBatches of the ptx records on the data stages (None elsewhere); rows at the
    rollout width S."""
    ptx_cfg = dataclasses.replace(cfg, data_path=opts.ptx_data_path, max_seq_len=opts.rollout_width(cfg.max_seq_len),
                                  eval_fraction=0.0, eval_data_path=None, data_split=None, split_index=0, pack=False)
    return load_data(ptx_cfg, tokenizer, "lm", topo, collate).batches


def ptx_step(engine, batches, coef: float, accum_x_replicas: float) -> float:
    """Collective: one train_batch of the actor on the next ptx batch with loss coef x (token-mean LM
    loss over the global batch, normalised as SFT's); returns the LM loss (without coef)."""
    feed = None
    if batches is not None:
        micro, n_global, _ = batches.next_step()
        feed = with_normaliser(micro, n_global, accum_x_replicas)
    module = engine.module
    ppo_loss_fn = module.loss_fn
    module.loss_fn = lambda outputs, labels: coef * global_token_mean_loss(outputs, labels)
    try:
        loss = float(engine.train_batch(data_iter=feed))
    finally:
        module.loss_fn = ppo_loss_fn
    return loss / coef
