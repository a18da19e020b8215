"""`model_topo.parts: "auto"`: balance stages by compute, with the embedding and head weighted
by what they cost rather than counted as one layer each, subject to every stage fitting in its
device's memory (trainer.engine.memory estimates it).

Cost per token (forward matmul FLOPs, the usual 2 x params rule plus attention scores, as in
nanoGPT's estimate_mfu and PaLM appendix B):
    embedding   ~0 (a lookup; counted as one hidden-size vector so it is never free)
    block       2 * block params + 4 * T * H (QK^T and attention x V over T keys)
    final norm  ~H
    head        2 * vocab * H
"""

from typing import Callable, Optional

from deepspeed.runtime.utils import partition_balanced


def layer_costs(layer_params: list[int], hidden: int, seq_len: int, n_blocks: int) -> list[float]:
    costs = [float(hidden)]
    costs += [2.0 * p + 4.0 * seq_len * hidden for p in layer_params[1:1 + n_blocks]]
    costs += [float(hidden), 2.0 * layer_params[-1] if layer_params[-1] else 2.0 * layer_params[0]]
    return costs


class AutoPartsError(ValueError):
    pass


def auto_parts(layer_params: list[int], hidden: int, seq_len: int, num_stages: int, stage_bytes: Optional[Callable] = None,
               budget=None) -> list[int]:
    """Layers per stage minimising the most expensive stage. With `stage_bytes(start, stop, stage)`
    (bytes of a stage holding layers [start, stop)) and `budget` (bytes per rank, or a list: bytes for
    each stage, when other models share the ranks), every stage must fit: the compute-balanced split
    when it does, else the best-balanced split among those that fit."""
    n_blocks = len(layer_params) - 3
    if num_stages > len(layer_params):
        raise AutoPartsError(f"{num_stages} pipeline stages but only {len(layer_params)} pipe layers: reduce dims[0]")
    costs = layer_costs(layer_params, hidden, seq_len, n_blocks)
    bounds = partition_balanced(costs, num_stages)
    parts = [int(bounds[i + 1] - bounds[i]) for i in range(num_stages)]
    if stage_bytes is None or budget is None or _fits(parts, stage_bytes, budget):
        return parts
    fitted = _constrained_split(costs, num_stages, stage_bytes, budget)
    if fitted is None:
        peaks = _stage_peaks(parts, stage_bytes)
        worst = max(range(num_stages), key=lambda s: peaks[s])
        room = (f"{format_bytes(budget)} per rank" if not isinstance(budget, (list, tuple))
                else "the room per stage (" + ", ".join(format_bytes(max(b, 0.0)) for b in budget) + ")")
        raise AutoPartsError(
            f"no split of the {len(layer_params)} pipe layers into {num_stages} stages fits in {room} "
            f"(the compute-balanced split needs {format_bytes(peaks[worst])} on stage {worst}): use more pipeline stages, "
            "ZeRO stage 1 or offload_optimizer, use_grad_ckpt, or a smaller micro-batch / max_seq_len")
    return fitted


def _stage_peaks(parts: list[int], stage_bytes: Callable) -> list[float]:
    peaks, start = [], 0
    for stage, n in enumerate(parts):
        peaks.append(stage_bytes(start, start + n, stage))
        start += n
    return peaks


def _limit(budget, stage: int) -> float:
    """Stage `stage`'s bytes: one figure for every stage, or one per stage."""
    return budget[stage] if isinstance(budget, (list, tuple)) else budget


def _fits(parts: list[int], stage_bytes: Callable, budget) -> bool:
    return all(peak <= _limit(budget, s) for s, peak in enumerate(_stage_peaks(parts, stage_bytes)))


def _constrained_split(costs: list[float], num_stages: int, stage_bytes: Callable, budget) -> Optional[list[int]]:
    """Exact DP: the first j layers in k non-empty stages, minimising the most expensive stage's cost,
    every stage within budget. O(P L^2) stage_bytes calls (a 70B model in 16 stages: ~0.1 M)."""
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[-1] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for k in range(1, num_stages + 1):
        for j in range(k, n - (num_stages - k) + 1):
            for i in range(k - 1, j):
                if best[k - 1][i] == inf:
                    continue
                value = max(best[k - 1][i], prefix[j] - prefix[i])
                if value < best[k][j] and stage_bytes(i, j, k - 1) <= _limit(budget, k - 1):
                    best[k][j], cut[k][j] = value, i
    if best[num_stages][n] == inf:
        return None
    parts, j = [], n
    for k in range(num_stages, 0, -1):
        i = cut[k][j]
        parts.append(j - i)
        j = i
    return parts[::-1]


def stage_report(parts: list[int], names: list[str], layer_params: list[int], param_bytes: int,
                 stage_memory: Callable) -> str:
    """One line per stage: layers, parameter bytes and the training-memory estimate with its parts
    (`stage_memory(start, stop, stage)` -> {"weights", "gradients", "optimizer", "activations", "head"[,
    "generation"]})."""
    lines, start = [], 0
    for stage, n in enumerate(parts):
        params = sum(layer_params[start:start + n])
        parts_bytes = stage_memory(start, start + n, stage)
        detail = ", ".join(f"{k} {format_bytes(v)}" for k, v in parts_bytes.items() if v)
        lines.append(f"  stage {stage}: layers {start}-{start + n - 1} ({names[start]} .. {names[start + n - 1]}), "
                     f"{format_bytes(params * param_bytes)} params, ~{format_bytes(sum(parts_bytes.values()))} training memory ({detail})")
        start += n
    return "\n".join(lines)


def format_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"
