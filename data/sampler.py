"""``ResumableSampler``: seeded per-epoch shuffle, sharded over data-parallel ranks, exact resume.

Epoch e's global order is ``default_rng([seed, e]).permutation(num_samples)``, cut to a multiple of
dp_size (``drop_last=True``, default) or padded by wrapping around (``drop_last=False``). Rank r takes
every dp_size-th index starting at r (``order[r::dp_size]``), so after every rank has taken p samples
exactly the first ``p * dp_size`` samples of the global order are consumed: a checkpoint can even be
resumed with another dp_size when ``p * dp_size`` divides by it.

Position: ``position`` counts this rank's indices already handed out in ``epoch``; it advances as the
iterator yields. With ``DataLoader(num_workers=0)`` (enough for our in-memory datasets) that is what
the trainer has consumed once it has fetched a batch. With worker processes the loader prefetches
ahead: pass the consumed count explicitly, ``state_dict(consumed=n_samples_consumed_this_epoch)``.

An exhausted epoch rolls over lazily, when the next iteration starts, so a state saved right after
the last batch of an epoch resumes at the start of the next one. ``set_epoch(e)`` (DistributedSampler
compatibility) restarts at position 0 only when e differs from the current epoch, so calling it after
``load_state_dict`` does not lose the restored position.
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, Optional

import numpy as np
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    def __init__(self, num_samples: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = True):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} must be in [0, dp_size={dp_size})")
        if num_samples < (dp_size if drop_last else 1):
            raise ValueError(f"{num_samples} samples cannot feed {dp_size} data-parallel ranks; add data or "
                             "use fewer ranks")
        self.num_samples, self.dp_rank, self.dp_size = num_samples, dp_rank, dp_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.epoch, self.position = 0, 0

    def __len__(self) -> int:
        """Samples this rank gets per epoch."""
        n = self.num_samples
        return n // self.dp_size if self.drop_last else -(-n // self.dp_size)

    def global_order(self, epoch: int) -> np.ndarray:
        """int64 [len(self) * dp_size]: the epoch's order over all ranks."""
        n = self.num_samples
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        total = len(self) * self.dp_size
        return order[:total] if total <= n else np.concatenate([order, order[:total - n]])

    def rank_indices(self, epoch: int) -> np.ndarray:
        return self.global_order(epoch)[self.dp_rank::self.dp_size]

    def __iter__(self) -> Iterator[int]:
        if self.position >= len(self):  # previous epoch finished: roll over now
            self.epoch, self.position = self.epoch + 1, 0
        indices = self.rank_indices(self.epoch)
        while self.position < len(indices):
            i = int(indices[self.position])
            self.position += 1
            yield i

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def state_dict(self, consumed: Optional[int] = None) -> Dict[str, Any]:
        position = self.position if consumed is None else consumed
        return {"epoch": self.epoch, "global_position": position * self.dp_size, "seed": self.seed,
                "num_samples": self.num_samples, "shuffle": self.shuffle, "drop_last": self.drop_last,
                "dp_size": self.dp_size}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for key in ("seed", "num_samples", "shuffle", "drop_last"):
            if state[key] != getattr(self, key):
                raise ValueError(f"sampler state has {key}={state[key]!r} but this sampler has "
                                 f"{getattr(self, key)!r}: resume with the same data and seed, or start a new run")
        if state["dp_size"] != self.dp_size and (not self.drop_last or state["global_position"] % self.dp_size):
            raise ValueError(f"cannot resume a dp_size={state['dp_size']} position ({state['global_position']} "
                             f"samples) with dp_size={self.dp_size}: the position must divide by the new dp_size")
        self.epoch, self.position = state["epoch"], state["global_position"] // self.dp_size
