"""The trainer measures itself: tokens/s, model FLOPs utilisation, progress, monitor events, and a
loss-curve PNG at the end.

FLOPs per token (training = forward + backward = 3x forward), from PaLM (Chowdhery et al. 2022,
appendix B) as used by nanoGPT's estimate_mfu:
    6 * N + 12 * L * H * T
N = parameters doing matmuls (all but the input embedding), L layers, H hidden size, T sequence
length. MFU = achieved FLOPs/s / the device's peak dense FLOPs/s for the training dtype.
"""
import math
from typing import Optional

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
