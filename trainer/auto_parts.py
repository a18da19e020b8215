"""`model_topo.parts: "auto"`: balance stages by compute, with the embedding and head weighted
by what they cost rather than counted as one layer each.

Cost per token (forward matmul FLOPs, the usual 2 x params rule plus attention scores, as in
nanoGPT's estimate_mfu and PaLM appendix B):
    embedding   ~0 (a lookup; counted as one hidden-size vector so it is never free)
    block       2 * block params + 4 * T * H (QK^T and attention x V over T keys)
    final norm  ~H
    head        2 * vocab * H
"""

from deepspeed.runtime.utils import partition_balanced


def layer_costs(layer_params: list[int], hidden: int, seq_len: int, n_blocks: int) -> list[float]:
    costs = [float(hidden)]
    costs += [2.0 * p + 4.0 * seq_len * hidden for p in layer_params[1:1 + n_blocks]]
    costs += [float(hidden), 2.0 * layer_params[-1] if layer_params[-1] else 2.0 * layer_params[0]]
    return costs


def auto_parts(layer_params: list[int], hidden: int, seq_len: int, num_stages: int) -> list[int]:
    """Layers per stage minimising the most expensive stage."""
    n_blocks = len(layer_params) - 3
    if num_stages > len(layer_params):
        raise ValueError(f"{num_stages} pipeline stages but only {len(layer_params)} pipe layers: reduce dims[0]")
    bounds = partition_balanced(layer_costs(layer_params, hidden, seq_len, n_blocks), num_stages)
    return [int(bounds[i + 1] - bounds[i]) for i in range(num_stages)]


def stage_report(parts: list[int], names: list[str], layer_params: list[int], param_bytes: int, hidden: int,
                 seq_len: int, micro_batch: int, n_heads: int, optimizer_bytes_per_param: int = 12) -> str:
    """One line per stage: layers, parameter bytes and a rough training-memory estimate.

    Memory = params x (weight + grad bytes + optimizer bytes) + activations, where activations of a
    block per in-flight micro-batch follow Korthikanti et al. 2022 (no recomputation):
    T*B*H*(34 + 5*heads*T/H) bytes at 16-bit; 1F1B keeps (stages - stage) micro-batches in flight.
    """
    lines, start = [], 0
    for stage, n in enumerate(parts):
        idx = range(start, start + n)
        params = sum(layer_params[i] for i in idx)
        blocks = sum(1 for i in idx if names[i].startswith("block."))
        act = blocks * seq_len * micro_batch * hidden * (34 + 5 * n_heads * seq_len / hidden) * (param_bytes / 2)
        in_flight = len(parts) - stage
        mem = params * (2 * param_bytes + optimizer_bytes_per_param) + act * in_flight
        lines.append(f"  stage {stage}: layers {start}-{start + n - 1} ({names[start]} .. {names[start + n - 1]}), "
                     f"{_gib(params * param_bytes)} params, ~{_gib(mem)} training memory")
        start += n
    return "\n".join(lines)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"
