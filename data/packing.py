"""Length policy, sample storage and packing of samples into ``max_seq_len`` rows.

Samples live in ``Samples``: one flat int32 token array + bool target array + offsets, so a million
records cost ~5 bytes/token instead of a padded [N, max_seq_len] matrix. Rows are materialised per item.

Packing is best-fit decreasing: samples sorted by length (longest first, ties by index, so it is
deterministic) each go into the open row with the least room that still fits them.
"""
from __future__ import annotations

import bisect
import dataclasses
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

OVERFLOW_POLICIES = ("truncate", "drop", "chunk")  # "chunk": data.dataset, data.truncate


@dataclasses.dataclass
class Samples:
    tokens: np.ndarray  # int32 [total tokens]
    target: np.ndarray  # bool  [total tokens], True = trained
    offsets: np.ndarray  # int64 [n + 1]; sample i is tokens[offsets[i]:offsets[i+1]]

    @classmethod
    def from_list(cls, samples: Sequence[Tuple[np.ndarray, np.ndarray]]) -> "Samples":
        lengths = np.array([len(ids) for ids, _ in samples], dtype=np.int64)
        offsets = np.zeros(len(samples) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        cat = (lambda xs, dt: np.concatenate(xs) if xs else np.zeros(0, dtype=dt))
        return cls(cat([s[0] for s in samples], np.int32), cat([s[1] for s in samples], bool), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def get(self, i: int) -> Tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.tokens[a:b], self.target[a:b]

    def state(self) -> Dict[str, torch.Tensor]:
        return {"tokens": torch.from_numpy(self.tokens), "target": torch.from_numpy(self.target),
                "offsets": torch.from_numpy(self.offsets)}

    @classmethod
    def from_state(cls, st: Dict[str, torch.Tensor]) -> "Samples":
        return cls(st["tokens"].numpy(), st["target"].numpy(), st["offsets"].numpy())

    def select(self, index: np.ndarray) -> "Samples":
        """The samples ``index`` (sorted, unique) in that order; ``self`` itself when that is all of them.
        Copies one contiguous run of samples at a time."""
        index = np.asarray(index, dtype=np.int64)
        if len(index) == len(self) and (not len(index) or (index[0] == 0 and index[-1] == len(self) - 1)):
            return self
        lengths = self.lengths()[index]
        offsets = np.zeros(len(index) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        tokens, target = np.empty(offsets[-1], dtype=np.int32), np.empty(offsets[-1], dtype=bool)
        if not len(index):
            return Samples(tokens, target, offsets)
        breaks = np.flatnonzero(np.diff(index) != 1) + 1  # runs of consecutive sample indices
        for lo, hi in zip(np.concatenate([[0], breaks]), np.concatenate([breaks, [len(index)]])):
            a, b = self.offsets[index[lo]], self.offsets[index[hi - 1] + 1]
            tokens[offsets[lo]:offsets[hi]] = self.tokens[a:b]
            target[offsets[lo]:offsets[hi]] = self.target[a:b]
        return Samples(tokens, target, offsets)


class SampleWriter:
    """Samples appended a batch at a time (``add``) and spilled to two temporary files (ids, targets) as
    they come; ``finish`` reads them back into one array each. So memory holds no per-sample arrays while
    a large file streams by, nothing accumulates in the heap between batches, and the result (~5 bytes
    per token) is allocated once."""

    def __init__(self, spill_dir: Optional[str] = None):
        self._files = (tempfile.TemporaryFile(dir=spill_dir, prefix="pipetune-ids-"),
                       tempfile.TemporaryFile(dir=spill_dir, prefix="pipetune-target-"))
        self.lengths: List[np.ndarray] = []

    def add(self, samples: Sequence[Tuple[np.ndarray, np.ndarray]]) -> None:
        if samples:
            np.concatenate([s[0] for s in samples]).astype(np.int32, copy=False).tofile(self._files[0])
            np.concatenate([s[1] for s in samples]).astype(bool, copy=False).tofile(self._files[1])
            self.lengths.append(np.array([len(s[0]) for s in samples], dtype=np.int64))

    def finish(self) -> Samples:
        lengths = np.concatenate(self.lengths) if self.lengths else np.zeros(0, dtype=np.int64)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        arrays = []
        for fh, dtype in zip(self._files, (np.int32, bool)):
            fh.flush()
            fh.seek(0)
            arrays.append(np.fromfile(fh, dtype=dtype))
            fh.close()
        self.lengths = []
        return Samples(arrays[0], arrays[1], offsets)


def fit_length(ids: np.ndarray, target: np.ndarray, max_len: int, overflow: str
               ) -> Tuple[Optional[Tuple[np.ndarray, np.ndarray]], Optional[str], bool]:
    """Right truncation or drop -> (sample or None, drop reason or None, was_truncated).

    ``overflow`` "truncate" keeps the first ``max_len`` tokens, "drop" drops longer samples ("too_long").
    A sample with no trained token left is dropped ("no_target_tokens"). (Pairwise and prompt samples
    are cut from the left instead, and pretrain documents may be chunked: ``data.truncate``.)"""
    truncated = False
    if len(ids) > max_len:
        if overflow == "drop":
            return None, "too_long", False
        ids, target = ids[:max_len], target[:max_len]
        truncated = True
    if not target.any():
        return None, "no_target_tokens", truncated
    return (ids, target), None, truncated


def pack(lengths: Sequence[int], max_len: int) -> List[List[int]]:
    """Best-fit decreasing: sample indices grouped into rows of total length <= max_len."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: List[List[int]] = []
    free: List[Tuple[int, int]] = []  # sorted (room left, row id) of rows that still have room
    for i in order:
        n = int(lengths[i])
        assert 0 < n <= max_len, "samples must be fitted to max_len before packing"
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, r = free.pop(k)
        else:
            room, r = max_len, len(rows)
            rows.append([])
        rows[r].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, r))
    return rows


def rows_to_arrays(rows: Sequence[Sequence[int]]) -> Tuple[np.ndarray, np.ndarray]:
    """Rows of sample indices -> (row_offsets int64 [R+1], row_samples int64 [n])."""
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(r) for r in rows], out=offsets[1:])
    flat = np.fromiter((i for r in rows for i in r), dtype=np.int64, count=int(offsets[-1]))
    return offsets, flat
