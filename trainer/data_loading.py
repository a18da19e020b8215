"""Training data across ranks: rank 0 validates and tokenizes first (filling the cache), then the
other data ranks (first and last pipeline stages) read the cache; a data error stops every rank,
reported once by rank 0. The middle stages hold no data."""
from dataclasses import dataclass
from typing import Callable, Optional

from data.errors import DataError

from .batches import GlobalBatches
from .distributed import broadcast_object
from .topology import Topology


@dataclass
class RecipeData:
    data: Optional[object]             # data.dataset.Built on data ranks, else None
    batches: Optional[GlobalBatches]   # this replica's training batches on data ranks, else None
    steps_per_epoch: int               # on every rank
    n_eval_rows: int                   # on every rank

    @property
    def eval(self):
        return self.data.eval if self.data is not None else None


def build_data(cfg, tokenizer, kind: str):
    from data.dataset import build_dataset

    return build_dataset(
        cfg.data_path, tokenizer, cfg.max_seq_len, kind=kind, pack=cfg.pack and kind == "lm", overflow=cfg.overflow,
        strict=not cfg.skip_bad_records, eval_paths=cfg.eval_data_path, eval_fraction=cfg.eval_fraction,
        seed=cfg.seed, cache_dir=cfg.data_cache_dir(), pad_token=cfg.pad_token, template=cfg.template,
        data_split=cfg.data_split, split_index=cfg.split_index,
    )


def build_data_rank0_first(cfg, tokenizer, kind: str, topo: Topology, build_here: bool):
    """Collective: rank 0 builds (and caches) the data first; a data error stops every rank (rank 0
    raises it, the others a DataError saying so); then the other ranks with `build_here` read the
    cache. Returns data.dataset.Built on rank 0 and those ranks, None elsewhere."""
    data, problem = None, None
    if topo.rank == 0:
        try:
            data = build_data(cfg, tokenizer, kind)
        except DataError as e:
            problem = e
    if broadcast_object(problem is not None):
        raise problem if problem is not None else DataError([], header="invalid data (reported by rank 0)")
    if topo.rank != 0 and build_here:
        data = build_data(cfg, tokenizer, kind)
    return data


def load_data(cfg, tokenizer, kind: str, topo: Topology, collate: Callable) -> RecipeData:
    """Collective. kind: build_dataset's "lm" | "pairwise" | "prompt"."""
    data = build_data_rank0_first(cfg, tokenizer, kind, topo, build_here=topo.is_data_stage)
    batches = None
    if topo.is_data_stage:
        batches = GlobalBatches(data.train, cfg.micro_batch, cfg.grad_accum, topo.dp_rank, topo.data, cfg.seed,
                                collate=collate)
    steps_per_epoch, n_eval_rows = broadcast_object(
        (batches.steps_per_epoch, len(data.eval) if data.eval is not None else 0) if topo.rank == 0 else None)
    return RecipeData(data if topo.is_data_stage else None, batches, steps_per_epoch, n_eval_rows)
