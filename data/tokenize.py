"""Render records and tokenize each whole text once; derive label masks from character offsets.

A sample is ``(ids, target)``: ``ids`` int32 [L] as the tokenizer produced them (with BOS when the
tokenizer adds one), ``target`` bool [L], True where the token is trained. A token is trained when its
character span overlaps a trained span of the rendered text (see ``data.templates``); special tokens
that the tokenizer adds (BOS) have an empty span and are never trained. ``target[0]`` is always False:
position 0 is never predicted (the loss shifts), and clearing it keeps packed rows from scoring a
record's first token from the previous record's last token.

We tokenize the full rendered text in batches with the fast tokenizer (``return_offsets_mapping``) and
never concatenate separately tokenized pieces (that would change tokens at the seams). Offsets are
reliable for both tiny tokenizers: LLaMA's byte-fallback tokens of one character all carry that
character's span, and a leading "\u2581" piece's span includes the space it stands for.

BOS: pretrain text is tokenized with ``add_special_tokens=True`` (the tokenizer's own convention: LLaMA
adds BOS, BLOOM adds nothing). Chat-type records are tokenized exactly as
``apply_chat_template(..., tokenize=True)`` does it: the BOS *text* is prepended when the tokenizer adds
BOS (``chat_template(add_bos=True)`` starts with ``{{ bos_token }}``) and ``add_special_tokens=False``.
The difference matters for LLaMA: after "<s>" SentencePiece adds no dummy-prefix space, so "Human" is
one token id while ``tok("Human...")`` gives "\u2581Human". Training on the chat template's ids keeps
training and inference (HF chat template, vLLM, ...) token-identical.

The EOS/end-of-turn token is rendered as its text (e.g. "</s>") and the tokenizer maps it to its id. So a
record whose own text contains a special-token string would inject control tokens: such records are
reported as bad (reason "special_token").
"""
from __future__ import annotations

from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np

from data.errors import Problem
from data.records import Record
from data.templates import Piece, join_pieces, render_record, tokenizer_adds_bos


def pad_token_id(tokenizer) -> int:
    """Pad id: the tokenizer's pad token, else its unk token; never EOS (EOS is part of scored answers)."""
    for tid in (tokenizer.pad_token_id, tokenizer.unk_token_id):
        if tid is not None and tid != tokenizer.eos_token_id:
            return int(tid)
    raise ValueError("tokenizer has neither a pad token nor an unk token distinct from EOS; set "
                     "tokenizer.pad_token to an unused token before building the dataset")


def eos_token(tokenizer) -> str:
    if tokenizer.eos_token is None:
        raise ValueError("tokenizer has no eos_token; it is needed as the end-of-turn token")
    return tokenizer.eos_token


def special_token_problems(record: Record, pieces: Sequence[Piece], specials: Sequence[str]) -> List[Problem]:
    """Record text that contains a special-token string such as "</s>" (would become a control token)."""
    out = []
    for p in pieces:
        if p.field is None:
            continue
        hit = next((s for s in specials if s in p.text), None)
        if hit is not None:
            out.append(Problem(record.file, f"contains the special token text {hit!r}, which the tokenizer would "
                               "turn into a control token; remove or escape it", record=record.index,
                               line=record.line, field=p.field, reason="special_token"))
    return out


def encode(tokenizer, texts: Sequence[str], spans: Sequence[Sequence[Tuple[int, int]]],
           batch_size: int = 1000, add_special_tokens: bool = True) -> List[Tuple[np.ndarray, np.ndarray]]:
    """Tokenize ``texts`` in batches -> [(ids int32 [L], target bool [L])], target from char ``spans``."""
    out = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[start:start + batch_size]), add_special_tokens=add_special_tokens,
                        return_offsets_mapping=True, return_attention_mask=False,
                        verbose=False)  # no "longer than model_max_length" warning: we fit lengths
        for ids, offsets, sp in zip(enc["input_ids"], enc["offset_mapping"], spans[start:start + batch_size]):
            ids = np.asarray(ids, dtype=np.int32)
            off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)  # [L, 2] char [start, end)
            target = np.zeros(len(ids), dtype=bool)
            if sp:
                s = np.asarray(sp, dtype=np.int64)  # [S, 2]
                # overlap of token [a, b) with span [c, d): a < d and b > c (empty spans never overlap)
                target = ((off[:, None, 0] < s[None, :, 1]) & (off[:, None, 1] > s[None, :, 0])
                          & (off[:, None, 1] > off[:, None, 0])).any(axis=1)
            if len(target):
                target[0] = False
            out.append((ids, target))
    return out


def tokenize_records(records: Iterable[Tuple[Record, str]], tokenizer, batch_size: int = 1000
                     ) -> Tuple[List[Optional[Tuple[np.ndarray, np.ndarray]]], List[Problem]]:
    """(record, side) pairs -> one sample per pair (None where the record is bad) and the problems.

    ``side`` is "chosen"/"rejected" for pairwise records (ignored otherwise)."""
    eos = eos_token(tokenizer)
    bos = tokenizer.bos_token if tokenizer_adds_bos(tokenizer) else ""
    specials = [s for s in tokenizer.all_special_tokens if s]
    groups = {True: ([], []), False: ([], [])}  # add_special_tokens -> (texts, spans)
    route, problems = [], []  # per entry: None (bad) or the group it went to
    for rec, side in records:
        pieces = render_record(rec.type, rec.fields, eos, side)
        bad = special_token_problems(rec, pieces, specials)
        if bad:
            problems.extend(bad)
            route.append(None)
            continue
        text, sp = join_pieces(pieces)
        raw = rec.type == "pretrain"
        if not raw and bos:  # as the chat template renders it: BOS text, no added special tokens
            text, sp = bos + text, [(a + len(bos), b + len(bos)) for a, b in sp]
        groups[raw][0].append(text)
        groups[raw][1].append(sp)
        route.append(raw)
    encoded = {k: iter(encode(tokenizer, t, s, batch_size, add_special_tokens=k)) for k, (t, s) in groups.items()}
    return [None if k is None else next(encoded[k]) for k in route], problems
