"""Deterministic record-level splits (done before tokenization, so packing never mixes splits).

- ``split_shares(n, "2,4,4", seed)``: DeepSpeed-Chat-like ``data_split``: a seeded permutation of the n
  records cut into disjoint shares proportional to the weights (share 0 for SFT, 1 for RM, 2 for PPO:
  ``build_dataset(data_split=..., split_index=i)``, the training config's ``data_split`` /
  ``split_index``). The same files, weights and seed give the same, disjoint shares, which together
  cover every record; share i holds ``round(c_i * n) - round(c_{i-1} * n)`` records (c_i: the
  cumulative normalised weights), within one record of ``w_i / sum(w) * n``.
- ``share_of(items, ...)`` / ``load_share(data_paths, ...)``: that share of a list, or of the valid
  records of data files (the index space ``build_dataset`` splits: the valid records in load order).
- ``eval_split(indices, fraction, seed)``: hold out ``round(fraction * n)`` records (at least 1 when
  fraction > 0 and n > 1) for evaluation.
All depend only on (n, weights/fraction, seed): the same inputs give the same split on every rank.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeVar

import numpy as np

_SHARE_STREAM, _EVAL_STREAM = 0, 1  # independent random streams of one seed
Item = TypeVar("Item")


def parse_data_split(spec: str | Sequence[float], n_shares: int | None = None) -> list[float]:
    """ "2,4,4" or [2, 4, 4] -> [2.0, 4.0, 4.0]; weights must be finite, >= 0, with a positive sum, and
    (when ``n_shares`` is given) there must be that many. ValueError naming the spec otherwise."""
    example = ",".join(["1"] * n_shares) if n_shares else "2,4,4"
    try:
        if isinstance(spec, str):
            weights = [float(x) for x in spec.split(",")]
        elif isinstance(spec, Sequence) and not any(isinstance(x, (bool, str)) for x in spec):
            weights = [float(x) for x in spec]
        else:
            raise ValueError
    except (TypeError, ValueError):
        raise ValueError(f"data_split {spec!r}: use comma-separated numbers such as \"{example}\" "
                         "(or a list of numbers)") from None
    if not weights:
        raise ValueError(f"data_split {spec!r} has no weights; give one per share, e.g. \"{example}\"")
    if n_shares is not None and len(weights) != n_shares:
        raise ValueError(f"data_split {spec!r} has {len(weights)} weight(s), expected {n_shares} (one per share), "
                         f"e.g. \"{example}\"")
    bad = [w for w in weights if not math.isfinite(w) or w < 0]
    if bad:
        raise ValueError(f"data_split {spec!r}: weights must be finite and >= 0 (got {bad[0]:g}); "
                         "a weight of 0 gives an empty share")
    if sum(weights) <= 0:
        raise ValueError(f"data_split {spec!r}: the weights are all zero; at least one share needs records, "
                         f"e.g. \"{example}\"")
    return weights


def split_shares(n: int, data_split: str | Sequence[float], seed: int, n_shares: int | None = None
                 ) -> list[np.ndarray]:
    """Disjoint, sorted int64 index arrays covering range(n), one per weight (``parse_data_split``)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"split_shares: the number of records must be an int >= 0, got {n!r}")
    weights = np.asarray(parse_data_split(data_split, n_shares))
    perm = np.random.default_rng([seed, _SHARE_STREAM]).permutation(n)
    bounds = np.round(np.cumsum(weights) / weights.sum() * n).astype(np.int64)  # [shares] end of each share
    bounds[-1] = n  # the cumulative sum can round below n only by float error; never lose a record
    starts = np.concatenate([[0], bounds[:-1]])
    return [np.sort(perm[a:b]) for a, b in zip(starts, bounds)]


def share_of(items: Sequence[Item], data_split: str | Sequence[float], split_index: int, seed: int,
             n_shares: int | None = None) -> list[Item]:
    """The items of share ``split_index`` (0-based), in their original order."""
    shares = split_shares(len(items), data_split, seed, n_shares)
    if isinstance(split_index, bool) or not isinstance(split_index, int) or not 0 <= split_index < len(shares):
        raise ValueError(f"split_index {split_index!r} is out of range for data_split {data_split!r} "
                         f"(0..{len(shares) - 1})")
    return [items[i] for i in shares[split_index].tolist()]


def load_share(data_paths, data_split: str | Sequence[float], split_index: int, seed: int,
               strict: bool = True, n_shares: int | None = None) -> list:
    """The valid records (``data.records.Record``) of share ``split_index`` of ``data_paths``: the
    records ``build_dataset(data_paths, ..., data_split=data_split, split_index=split_index, seed=seed)``
    builds from. ``strict``: raise ``DataError`` listing every bad record (else they are left out, as
    ``build_dataset(strict=False)`` leaves them out of the index space)."""
    from data.errors import DataError
    from data.records import load_records

    loaded = load_records(data_paths)
    if loaded.problems and strict:
        raise DataError(loaded.problems, "invalid data (use strict=False to drop bad records)")
    return share_of(loaded.records, data_split, split_index, seed, n_shares)


def eval_split(indices: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``indices`` -> (train indices, eval indices), both sorted."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"eval fraction {fraction} must be in [0, 1)")
    indices = np.asarray(indices, dtype=np.int64)
    n = len(indices)
    n_eval = round(fraction * n)
    if fraction > 0 and n > 1:
        n_eval = min(max(n_eval, 1), n - 1)
    perm = np.random.default_rng([seed, _EVAL_STREAM]).permutation(n)
    return np.sort(indices[perm[n_eval:]]), np.sort(indices[perm[:n_eval]])
