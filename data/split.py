"""Deterministic record-level splits (done before tokenization, so packing never mixes splits).

- ``split_shares(n, "2,4,4", seed)``: DeepSpeed-Chat-like ``data_split``: a seeded permutation of the n
  records cut into disjoint shares proportional to the weights (meant as share 0 for SFT, 1 for RM, 2
  for PPO; the trainer does not pass a split yet). The same files, weights and seed give the same,
  disjoint shares.
- ``eval_split(indices, fraction, seed)``: hold out ``round(fraction * n)`` records (at least 1 when
  fraction > 0 and n > 1) for evaluation.
Both depend only on (n, weights/fraction, seed): the same inputs give the same split on every rank.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple, Union

import numpy as np

_SHARE_STREAM, _EVAL_STREAM = 0, 1  # independent random streams of one seed


def parse_data_split(spec: Union[str, Sequence[float]]) -> List[float]:
    """ "2,4,4" or [2, 4, 4] -> [2.0, 4.0, 4.0]; weights must be >= 0 with a positive sum."""
    try:
        weights = [float(x) for x in (spec.split(",") if isinstance(spec, str) else spec)]
    except ValueError:
        raise ValueError(f"data_split {spec!r}: use comma-separated numbers such as \"2,4,4\"") from None
    if not weights or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"data_split {spec!r}: weights must be >= 0 and not all zero, e.g. \"2,4,4\"")
    return weights


def split_shares(n: int, data_split: Union[str, Sequence[float]], seed: int) -> List[np.ndarray]:
    """Disjoint, sorted index arrays covering range(n), one per weight."""
    weights = np.asarray(parse_data_split(data_split))
    perm = np.random.default_rng([seed, _SHARE_STREAM]).permutation(n)
    bounds = np.round(np.cumsum(weights) / weights.sum() * n).astype(np.int64)
    starts = np.concatenate([[0], bounds[:-1]])
    return [np.sort(perm[a:b]) for a, b in zip(starts, bounds)]


def eval_split(indices: np.ndarray, fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """``indices`` -> (train indices, eval indices), both sorted."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"eval fraction {fraction} must be in [0, 1)")
    indices = np.asarray(indices, dtype=np.int64)
    n = len(indices)
    n_eval = int(round(fraction * n))
    if fraction > 0 and n > 1:
        n_eval = min(max(n_eval, 1), n - 1)
    perm = np.random.default_rng([seed, _EVAL_STREAM]).permutation(n)
    return np.sort(indices[perm[n_eval:]]), np.sort(indices[perm[:n_eval]])
