"""Stage boundaries from `model_topo.parts` (layers per stage). Pure functions, no torch.distributed."""


class PartitionError(ValueError):
    pass


def boundaries_from_parts(parts: list[int], num_stages: int, layer_names: list[str]) -> list[int]:
    """`parts` [n_0, ..., n_{P-1}] (layers per stage) -> DeepSpeed's boundaries [0, n_0, n_0+n_1, ..., L].

    Errors say what to change: the length must be the number of pipeline stages, every stage needs
    at least one layer, and the sum must be the model's number of pipe layers.
    """
    n_layers = len(layer_names)
    listing = ", ".join(f"{i}:{name}" for i, name in enumerate(layer_names))
    if not isinstance(parts, (list, tuple)) or not all(isinstance(p, int) and not isinstance(p, bool) for p in parts):
        raise PartitionError(f"model_topo.parts must be a list of integers (layers per stage) or \"auto\"; got {parts!r}")
    if len(parts) != num_stages:
        raise PartitionError(
            f"model_topo.parts has {len(parts)} entries but the pipeline has {num_stages} stages "
            f"(model_topo.process_topology.dims[0]); give one layer count per stage"
        )
    empty = [i for i, p in enumerate(parts) if p < 1]
    if empty:
        raise PartitionError(f"model_topo.parts gives stage(s) {empty} no layers; every stage needs at least one layer")
    if sum(parts) != n_layers:
        raise PartitionError(
            f"model_topo.parts sums to {sum(parts)} but the model has {n_layers} pipe layers "
            f"(embedding, {n_layers - 3} blocks, final norm, head): {listing}"
        )
    bounds = [0]
    for p in parts:
        bounds.append(bounds[-1] + p)
    return bounds
