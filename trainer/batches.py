"""A recipe's training data across ranks and its global batches for the pipeline engine, with the loss
normaliser that makes a step's loss the mean over the global batch's target tokens.

Loading: rank 0 validates and tokenizes first (filling the cache), then the other data ranks (first
and last pipeline stages) read the cache; a data error stops every rank, reported once by rank 0. The
middle stages hold no data.

The loss of a step must be the mean over all target tokens of the *global* batch (all micro-batches
of all data-parallel ranks), as HF Trainer's `num_items_in_batch` does, not a mean of per-micro-batch
means. DeepSpeed divides each micro-batch loss by gradient_accumulation_steps and averages
gradients over the D data-parallel ranks, so each micro-batch returns
    sum(token losses in the micro-batch) / N_global * grad_accum * D
and the engine's reported loss and the gradients come out as sum(all token losses) / N_global.
N_global is computed from the deterministic global order on every rank: no communication.

Rank r of D takes `order[r::D]` of the epoch's global order (`data.sampler.ResumableSampler`), and a
step takes micro_batch * grad_accum of those, so the D ranks' steps together cover one contiguous
slice of the global order.
"""
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from data.batching import collate as collate_rows
from data.errors import DataError
from data.sampler import ResumableSampler
from trainer.engine.distributed import broadcast_object
from trainer.engine.topology import Topology


def n_target_tokens(labels: torch.Tensor) -> int:
    """Tokens the causal LM loss is taken on: labels after the shift (position 0 predicts nothing)."""
    return int((labels[..., 1:] != -100).sum())


class GlobalBatches:
    """Step-wise iteration over epochs; state (epoch, position) saved with every checkpoint."""

    def __init__(self, dataset, micro_batch: int, grad_accum: int, dp_rank: int, dp_size: int, seed: int, collate=None):
        self.dataset, self.micro_batch, self.grad_accum = dataset, micro_batch, grad_accum
        self.collate = collate or collate_rows
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.rows_per_step = micro_batch * grad_accum  # per data-parallel rank
        self.sampler = ResumableSampler(len(dataset), dp_rank, dp_size, seed=seed, shuffle=True, drop_last=True)
        self.steps_per_epoch = len(self.sampler) // self.rows_per_step
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the training data has {len(dataset)} rows, fewer than one global batch "
                f"({self.rows_per_step * dp_size} = micro batch {micro_batch} x grad accum {grad_accum} x data-parallel {dp_size}): "
                "add data or lower train_batch_size"
            )
        self._n_targets = {}

    def _targets(self, index: int) -> int:
        if index not in self._n_targets:
            self._n_targets[index] = n_target_tokens(self.dataset[index][1])
        return self._n_targets[index]

    def next_step(self) -> tuple[list, int, int]:
        """(this rank's micro-batches [(inputs, labels)] * grad_accum, N_global targets, real tokens of the global batch)."""
        if self.sampler.position + self.rows_per_step > len(self.sampler):
            self.sampler.set_epoch(self.sampler.epoch + 1)  # the remainder (< one step) is skipped
        epoch, pos = self.sampler.epoch, self.sampler.position
        order = self.sampler.global_order(epoch)
        global_slice = order[pos * self.dp_size:(pos + self.rows_per_step) * self.dp_size]
        n_global = sum(self._targets(int(i)) for i in global_slice)
        mine = self.sampler.rank_indices(epoch)[pos:pos + self.rows_per_step]
        self.sampler.position = pos + self.rows_per_step
        items = [self.dataset[int(i)] for i in mine]
        micro = [self.collate(items[k:k + self.micro_batch]) for k in range(0, len(items), self.micro_batch)]
        real_tokens = int(sum(int(self.dataset[int(i)][0][1].sum()) for i in global_slice))
        return micro, n_global, real_tokens

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)

    @property
    def epoch(self) -> int:
        return self.sampler.epoch


def token_scale(n_global: float, accum_x_replicas: float) -> torch.Tensor:
    """The loss normaliser every recipe's loss_fn multiplies its token sum by: grad_accum * D / N_global
    (accum_x_replicas = grad_accum * D), N_global the tokens the loss averages over in the whole global
    batch (all micro-batches, all replicas); a float64 scalar tensor (no int overflow, exact). See the
    module docstring."""
    return torch.tensor(accum_x_replicas / max(n_global, 1), dtype=torch.float64)


def with_normaliser(micro_batches: list, n_global: int, accum_x_replicas: float) -> Iterator:
    """Micro-batches as the engine pulls them: (inputs, (labels, token_scale))."""
    scale = token_scale(n_global, accum_x_replicas)
    for inputs, labels in micro_batches:
        yield inputs, (labels, scale)


def eval_row_indices(n_rows: int, micro_batch: int, n_micro: int, dp_rank: int, dp_size: int) -> Iterator[list[list[int]]]:
    """The one eval-sharding scheme: rows 0..n_rows-1 in order, in calls of `n_micro` micro-batches per
    replica. Call c covers the global rows [c*G, (c+1)*G), G = micro_batch * n_micro * dp_size, and
    replica r takes every dp_size-th of them (rows[r::dp_size]). Yields this replica's micro-batches
    as lists of row indices; -1 marks filler past the end (the caller gives it no weight)."""
    global_rows = micro_batch * n_micro * dp_size
    for start in range(0, n_rows, global_rows):
        idx = list(range(start, min(start + global_rows, n_rows)))
        idx += [-1] * (global_rows - len(idx))
        mine = idx[dp_rank::dp_size]
        yield [mine[k:k + micro_batch] for k in range(0, len(mine), micro_batch)]


def forward_eval_rows(engine, cfg, topo, n_rows: int, micro_batch_of: Optional[Callable], reduce,
                      deferred_logits: bool = False) -> Iterator[Optional[list]]:
    """Collective: every row of an eval set once through the pipeline (forward only), replica r
    taking its share of each call as `eval_row_indices` says. micro_batch_of(indices) -> (inputs,
    labels) of one micro-batch (indices -1: filler rows, to be given no weight), None on ranks without
    data. Yields each call's results: `reduce`'s output per micro-batch on the last stage, else None."""
    from trainer.engine.forward_only import forward_only

    for micro_indices in eval_row_indices(n_rows, cfg.micro_batch, cfg.grad_accum, topo.dp_rank, topo.data):
        micro = [micro_batch_of(indices) for indices in micro_indices] if micro_batch_of is not None else None
        yield forward_only(engine, micro, cfg.grad_accum, reduce, deferred_logits=deferred_logits)


def eval_batches(dataset, micro_batch: int, grad_accum: int, dp_rank: int, dp_size: int) -> Iterator[tuple[list, int]]:
    """The eval set as (this replica's micro-batches, target tokens of the global batch), sharded by
    `eval_row_indices`; filler rows are copies of row 0 whose labels are all -100 (no loss, no tokens)."""
    global_rows = micro_batch * grad_accum * dp_size
    for start, micro_indices in zip(range(0, len(dataset), global_rows),
                                    eval_row_indices(len(dataset), micro_batch, grad_accum, dp_rank, dp_size)):
        n_global = sum(n_target_tokens(dataset[i][1]) for i in range(start, min(start + global_rows, len(dataset))))
        micro = []
        for indices in micro_indices:
            items = []
            for i in indices:
                if i < 0:
                    inputs, labels = dataset[0]
                    items.append((inputs, torch.full_like(labels, -100)))
                else:
                    items.append(dataset[i])
            micro.append(collate_rows(items))
        yield micro, n_global


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
