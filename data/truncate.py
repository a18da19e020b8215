"""Fitting over-long samples into ``max_seq_len`` tokens, beyond plain right truncation
(``data.packing.fit_length``):

- ``fit_context``: pairwise, ranked and prompt samples keep their end (the scored answer and its EOS,
  or the generation prompt) and lose context from the left, keeping the template's structure: first
  whole oldest exchanges (the context then starts at a later user turn), then the start of the last
  context turn's text (its "Human:\\n" header is kept). The BOS, when the tokenizer adds one, stays
  first. All answers of a pair or ranking share one cut, so every row sees the same context.
- ``chunk``: a pretrain document split into rows of ``max_seq_len`` tokens that overlap by one token,
  so every token after the first is a trained target exactly once (position 0 of a row is never
  predicted).

The cuts are made on the token ids of the whole rendered text (no re-tokenization of pieces), at
token boundaries given by the tokenizer's character offsets.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np

from data.tokenize import CutSource

Sample = Tuple[np.ndarray, np.ndarray]  # (ids int32 [L], target bool [L])


def _index(starts: np.ndarray, pos: int) -> int:
    """Index of the first token that starts at or after character ``pos``."""
    return int(np.searchsorted(starts, pos, side="left"))


def context_start(src: CutSource, max_len: int) -> Optional[int]:
    """The smallest character position the context can start at so that the sample fits in ``max_len``
    tokens (the first turn's start when it fits whole); None when even the last context turn's header
    plus the tail does not fit."""
    starts, L, lay = src.starts, len(src.ids), src.layout
    n_prefix, tail = _index(starts, src.prefix_end), _index(starts, lay.tail_start)
    fixed = n_prefix + (L - tail)  # BOS + separator + answer/generation prompt: always kept
    for t in lay.turn_starts:  # oldest first: the first that fits keeps the most context
        if fixed + tail - _index(starts, t) <= max_len:
            return t
    header = _index(starts, lay.content[0]) - _index(starts, lay.turn_starts[-1])
    end = _index(starts, lay.content[1])
    k = L - max_len + n_prefix + header  # first kept token of the last turn's text
    if k > end:
        return None
    while k < end and starts[k] == starts[k - 1]:  # not inside one character's byte tokens
        k += 1
    return int(starts[k]) if k < L else lay.content[1]


def apply_context_start(src: CutSource, pos: int) -> Sample:
    """The sample with its context starting at character ``pos`` (a value of ``context_start``, or a
    later one): BOS + [last turn's header +] tokens from ``pos`` on."""
    starts, lay = src.starts, src.layout
    n_prefix = _index(starts, src.prefix_end)
    keep = [np.arange(n_prefix)]
    if pos not in lay.turn_starts:  # inside the last turn's text: keep its header
        keep.append(np.arange(_index(starts, lay.turn_starts[-1]), _index(starts, lay.content[0])))
    keep.append(np.arange(_index(starts, pos), len(src.ids)))
    index = np.concatenate(keep)
    return src.ids[index], src.target[index]


def fit_context(sides: Sequence[CutSource], max_len: int) -> Optional[List[Sample]]:
    """Cut the context shared by ``sides`` (the answers of a pair or ranking, or one prompt) at one place
    so that every side fits; None when an answer (with the template around it) alone does not fit."""
    cuts = [context_start(s, max_len) for s in sides]
    if any(c is None for c in cuts):
        return None
    pos = max(cuts)
    out = [apply_context_start(s, pos) for s in sides]
    assert all(len(ids) <= max_len for ids, _ in out), "context cut left a sample over max_len"
    return out


def chunk(ids: np.ndarray, target: np.ndarray, max_len: int) -> List[Sample]:
    """Rows of at most ``max_len`` tokens with stride ``max_len - 1``: token i (i >= 1) is a target in
    exactly one row (row position 0 is never trained, so it is cleared)."""
    out, stride = [], max_len - 1
    for start in range(0, max(len(ids) - 1, 1), stride):
        piece_ids, piece_tgt = ids[start:start + max_len], target[start:start + max_len].copy()
        piece_tgt[0] = False
        out.append((piece_ids, piece_tgt))
    return out
