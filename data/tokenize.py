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

import re
from typing import Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

from data.errors import Problem, TokenizerError
from data.records import Record
from data.templates import ContextLayout, Piece, context_layout, join_pieces, render_record, tokenizer_adds_bos


class PadChoice(NamedTuple):
    id: int
    token: Optional[str]
    source: str  # "pad_token" | "unk_token" | "spare_special" | "bos_token" | "explicit"


# Added special tokens meant for padding (Llama-3.1's "<|finetune_right_pad_id|>", "<pad>", "[PAD]"),
# then reserved/unused ones (Llama-3's "<|reserved_special_token_0|>", "[unused0]", Gemma's "<unused0>").
_SPARE_PATTERNS = (re.compile(r"pad", re.I), re.compile(r"reserved|unused", re.I))
_ROLE_TOKENS = ("bos", "eos", "unk", "sep", "cls", "mask")


def choose_pad(tokenizer, pad_token: Union[str, int, None] = None) -> PadChoice:
    """The pad token of every row, never EOS (EOS ends every scored answer: HF *ForSequenceClassification
    scores the last token that is not the pad, so a reward model or critic needs pad != EOS):

    1. ``pad_token`` when given: a token string of the vocabulary, or an id;
    2. the tokenizer's pad token, 3. its unk token (each only when it is not EOS);
    4. a spare added special token: the lowest-id one named like a pad, else like "reserved"/"unused";
    5. BOS (Llama-3-style tokenizers without a spare token; BOS is only ever the first token, never the
       last of a scored row).
    Pads are masked out of labels and attention, so which token it is changes no loss. Raises
    ``TokenizerError`` (a clear message, no traceback from the CLIs) when nothing is safe."""
    eos = tokenizer.eos_token_id
    if pad_token is not None:
        return _explicit_pad(tokenizer, pad_token, eos)
    for source, tid in (("pad_token", tokenizer.pad_token_id), ("unk_token", tokenizer.unk_token_id)):
        if tid is not None and tid != eos:
            return PadChoice(int(tid), tokenizer.convert_ids_to_tokens(int(tid)), source)
    roles = {getattr(tokenizer, f"{r}_token_id", None) for r in _ROLE_TOKENS} - {None}
    spare = sorted((tid, tok.content) for tid, tok in tokenizer.added_tokens_decoder.items()
                   if tok.special and tid not in roles and tid != eos)
    for pattern in _SPARE_PATTERNS:
        for tid, content in spare:
            if pattern.search(content):
                return PadChoice(int(tid), content, "spare_special")
    bos = tokenizer.bos_token_id
    if bos is not None and bos != eos:
        return PadChoice(int(bos), tokenizer.bos_token, "bos_token")
    raise TokenizerError(
        f"tokenizer {_name(tokenizer)} has no pad token, no unk token, no spare (reserved/unused) special token "
        "and no BOS distinct from EOS to pad with: set \"pad_token\" in the training config (build_dataset("
        "pad_token=...), data.inspect --pad-token) to a token of its vocabulary that is not EOS")


def _explicit_pad(tokenizer, pad_token: Union[str, int], eos: Optional[int]) -> PadChoice:
    if isinstance(pad_token, bool) or not isinstance(pad_token, (str, int)):
        raise TokenizerError(f"pad_token {pad_token!r}: give a token string or a token id")
    if isinstance(pad_token, int):
        if not 0 <= pad_token < len(tokenizer):
            raise TokenizerError(f"pad_token {pad_token}: not a token id of tokenizer {_name(tokenizer)} "
                                 f"(ids 0..{len(tokenizer) - 1})")
        tid, text = pad_token, tokenizer.convert_ids_to_tokens(pad_token)
    else:
        if pad_token not in tokenizer.get_vocab():
            raise TokenizerError(f"pad_token {pad_token!r} is not a token of tokenizer {_name(tokenizer)}: give one "
                                 "vocabulary entry, e.g. an unused special token such as '<|reserved_special_token_0|>'")
        tid, text = int(tokenizer.convert_tokens_to_ids(pad_token)), pad_token
    if tid == eos:
        raise TokenizerError(f"pad_token {pad_token!r} is the EOS token: pads must differ from EOS, which ends every "
                             "scored answer (an exported reward model scores the last token that is not the pad); "
                             "choose another token")
    return PadChoice(tid, text, "explicit")


def _name(tokenizer) -> str:
    return repr(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def pad_token_id(tokenizer, pad_token: Union[str, int, None] = None) -> int:
    """The pad id rows are filled with: ``choose_pad(tokenizer, pad_token).id`` (never EOS)."""
    return choose_pad(tokenizer, pad_token).id


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
                               line=record.line, field=record.source_field(p.field), reason="special_token"))
    return out


def special_token_check(records: Iterable[Tuple[Record, str]], tokenizer) -> List[Problem]:
    """The special-token problems ``tokenize_records`` would report, without tokenizing (the text of a
    record's fields is the same under every template)."""
    specials = [s for s in tokenizer.all_special_tokens if s]
    return [p for rec, side in records for p in special_token_problems(rec, render_record(rec.type, rec.fields, "", side),
                                                                      specials)]


def encode(tokenizer, texts: Sequence[str], spans: Sequence[Sequence[Tuple[int, int]]],
           batch_size: int = 1000, add_special_tokens: bool = True, with_starts: bool = False) -> List[tuple]:
    """Tokenize ``texts`` in batches -> [(ids int32 [L], target bool [L])], target from char ``spans``;
    ``with_starts`` adds each token's first character (int64 [L]) to every tuple."""
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
            out.append((ids, target, off[:, 0].copy()) if with_starts else (ids, target))
    return out


def _render(rec: Record, side: str, eos: str, bos: str) -> Tuple[List[Piece], str, List[Tuple[int, int]], bool]:
    """-> (pieces, text to tokenize, trained char spans, add_special_tokens)."""
    pieces = render_record(rec.type, rec.fields, eos, side)
    text, sp = join_pieces(pieces)
    raw = rec.type == "pretrain"
    if not raw and bos:  # as the chat template renders it: BOS text, no added special tokens
        text, sp = bos + text, [(a + len(bos), b + len(bos)) for a, b in sp]
    return pieces, text, sp, raw


def tokenize_records(records: Iterable[Tuple[Record, str]], tokenizer, batch_size: int = 1000, template=None
                     ) -> Tuple[List[Optional[Tuple[np.ndarray, np.ndarray]]], List[Problem]]:
    """(record, side) pairs -> one sample per pair (None where the record is bad) and the problems.

    ``side`` is "chosen"/"rejected" for pairwise records (ignored otherwise). ``template``: None for
    pipetune's template, else a ``data.chat_template.ModelTemplate`` (the tokenizer's own)."""
    if template is not None:
        return template.tokenize_records(records, batch_size)
    eos = eos_token(tokenizer)
    bos = tokenizer.bos_token if tokenizer_adds_bos(tokenizer) else ""
    specials = [s for s in tokenizer.all_special_tokens if s]
    groups = {True: ([], []), False: ([], [])}  # add_special_tokens -> (texts, spans)
    route, problems = [], []  # per entry: None (bad) or the group it went to
    for rec, side in records:
        pieces, text, sp, raw = _render(rec, side, eos, bos)
        bad = special_token_problems(rec, pieces, specials)
        if bad:
            problems.extend(bad)
            route.append(None)
            continue
        groups[raw][0].append(text)
        groups[raw][1].append(sp)
        route.append(raw)
    encoded = {k: iter(encode(tokenizer, t, s, batch_size, add_special_tokens=k)) for k, (t, s) in groups.items()}
    return [None if k is None else next(encoded[k]) for k in route], problems


class CutSource(NamedTuple):
    """A tokenized pairwise/prompt sample with what a left cut of its context needs."""
    ids: np.ndarray      # int32 [L], as ``tokenize_records`` gives them
    target: np.ndarray   # bool [L]
    starts: np.ndarray   # int64 [L]: each token's first character in the tokenized text
    prefix_end: int      # characters always kept before the context: the BOS text, a prompt's system message
    layout: ContextLayout


def tokenize_for_cut(record: Record, side: str, tokenizer) -> Optional[CutSource]:
    """Re-tokenize one (valid) pairwise/prompt sample with token positions, for ``data.truncate``;
    None for records without a context to cut. The ids equal ``tokenize_records``' for it."""
    eos = eos_token(tokenizer)
    bos = tokenizer.bos_token if tokenizer_adds_bos(tokenizer) else ""
    pieces, text, sp, raw = _render(record, side, eos, bos)
    layout = None if raw else context_layout(pieces)
    if layout is None:
        return None
    (ids, target, starts), = encode(tokenizer, [text], [sp], add_special_tokens=raw, with_starts=True)
    layout = layout.shifted(len(bos))
    return CutSource(ids, target, starts, layout.prefix_end, layout)
