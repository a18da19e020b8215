"""The trainer measures itself: tokens/s, model FLOPs utilisation, progress, monitor events, and a
loss-curve PNG at the end. Rank 0's view of a run: the plan and data summary at the start, a progress
bar (loss, lr, tokens/s, MFU on GPUs with a known peak, the last eval), and every metric written
through DeepSpeed's monitor (TensorBoard, CSV, W&B: whatever the config enables).

FLOPs per token (training = forward + backward = 3x forward), from PaLM (Chowdhery et al. 2022,
appendix B) as used by nanoGPT's estimate_mfu:
    6 * N + 12 * L * H * T
N = parameters doing matmuls (all but the input embedding), L layers, H hidden size, T sequence
length. MFU = achieved FLOPs/s / the device's peak dense FLOPs/s for the training dtype.
"""
import logging
import math
from typing import Optional

from tqdm import tqdm

# Peak dense FLOPs/s per device (vendor datasheets, no sparsity), by training dtype.
PEAK_FLOPS = {
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},   # SXM
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},
    "A800": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},
    "L40S": {"bf16": 362e12, "fp16": 362e12, "fp32": 91.6e12},
    "A10": {"bf16": 125e12, "fp16": 125e12, "fp32": 31.2e12},
    "V100": {"bf16": None, "fp16": 125e12, "fp32": 15.7e12},
    "4090": {"bf16": 165e12, "fp16": 165e12, "fp32": 82.6e12},
}


def flops_per_token(n_matmul_params: int, n_layers: int, hidden: int, seq_len: int) -> float:
    return 6.0 * n_matmul_params + 12.0 * n_layers * hidden * seq_len


def peak_flops(device_name: Optional[str], precision: str) -> Optional[float]:
    """Peak FLOPs/s of one device, or None when unknown (e.g. CPUs): MFU is then not reported."""
    if not device_name:
        return None
    for key, table in PEAK_FLOPS.items():
        if key in device_name.upper():
            return table.get(precision)
    return None


def mfu(tokens_per_s: float, flops_token: float, n_devices: int, peak: Optional[float]) -> Optional[float]:
    if not peak or tokens_per_s <= 0:
        return None
    return tokens_per_s * flops_token / (n_devices * peak)


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 50 else float("inf")


def write_loss_curve(path: str, train: list[tuple[int, float]], evals: list[tuple[int, float]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot([s for s, _ in train], [l for _, l in train], label="train loss", linewidth=1.2)
    if evals:
        ax.plot([s for s, _ in evals], [l for _, l in evals], "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean over target tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_metric_curves(path: str, series: dict, xlabel: str, ylabel: str, title: str) -> None:
    """One PNG with a line per entry of `series` {label: [(x, y), ...]} (e.g. the RLHF command's PPO
    reward, RM score and KL per PPO step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for label, points in series.items():
        if points:
            ax.plot([x for x, _ in points], [y for _, y in points], label=label, linewidth=1.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


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

    def __init__(self, cfg, plan, engine, topo, device_name: str, total_steps: int, start_step: int, desc: str = "train"):
        self.engine, self.rank, self.world_size = engine, topo.rank, topo.world_size
        self.flops_token = flops_per_token(plan.n_matmul_params, plan.n_blocks, plan.model_config.hidden_size, cfg.max_seq_len)
        self.peak = peak_flops(device_name, cfg.precision)
        self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, unit="step", disable=self.rank != 0,
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

    def log_metrics(self, step: int, metrics: dict, shown: dict) -> None:
        """A recipe's own step metrics ({name: value}) to the monitors; `shown` ({label: name}) on the bar."""
        if self.rank != 0:
            return
        write_events(self.engine, [(k, v, step) for k, v in metrics.items()])
        self.bar.set_postfix({label: f"{metrics[name]:.3g}" for label, name in shown.items()})
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


def format_number(x) -> str:
    """A number for a summary line: 4 significant digits; "n/a" when there is none."""
    return "n/a" if x is None else f"{x:.4g}"
