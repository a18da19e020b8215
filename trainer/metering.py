"""Rank 0's view of a run: the plan and data summary at the start, a progress bar (loss, lr,
tokens/s, MFU on GPUs with a known peak, the last eval), and every metric written through
DeepSpeed's monitor (TensorBoard, CSV, W&B: whatever the config enables)."""
import logging

from tqdm import tqdm

from .metrics import flops_per_token, mfu, peak_flops

logger = logging.getLogger("pipetune")


def write_events(engine, events) -> None:
    """[(name, value, step)] to DeepSpeed's monitors, when any is enabled."""
    monitor = getattr(engine, "monitor", None)
    if monitor is not None and monitor.enabled:
        monitor.write_events(events)


def log_plan(recipe: str, cfg, plan, stats: dict) -> None:
    logger.info("%s: pipeline split (%d stages x %d data-parallel):\n%s", recipe, cfg.model_topo.pipe, cfg.model_topo.data,
                plan.describe(cfg))
    train = stats.get("train", {})
    logger.info("data: %s samples in %s rows, types %s, truncated %s, dropped %s", train.get("samples"), train.get("rows"),
                train.get("types"), train.get("truncated"), train.get("dropped"))


class StepMeter:
    """Progress bar and monitor events of the training steps and evals (rank 0 only writes)."""

    def __init__(self, cfg, plan, engine, topo, device_name: str, total_steps: int, start_step: int):
        self.engine, self.rank, self.world_size = engine, topo.rank, topo.world_size
        self.flops_token = flops_per_token(plan.n_matmul_params, plan.n_blocks, plan.model_config.hidden_size, cfg.max_seq_len)
        self.peak = peak_flops(device_name, cfg.precision)
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", disable=self.rank != 0,
                        dynamic_ncols=True)
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

    def log_eval(self, step: int, metrics: dict, shown: str = "loss") -> dict:
        """Writes Eval/<name> events; `shown` goes on the progress bar. Returns metrics."""
        if self.rank == 0:
            write_events(self.engine, [(f"Eval/{k}", float(v), step) for k, v in metrics.items()])
            self.last_eval = {f"eval_{shown}": metrics[shown]}
            logger.info("eval at step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        return metrics

    def close(self) -> None:
        self.bar.close()
