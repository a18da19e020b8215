"""``build_dataset``: record files -> fixed-shape torch Datasets for the SFT, RM, DPO and PPO stages.

The records each kind uses, and the Dataset it returns (item shapes and the collates: ``data.batching``):

kind="lm" (SFT / pretraining): ``LMDataset``, one row per sample, or several samples packed per row
    (pack=True). Uses pretrain, instruct, conversation, ref_qa, pairwise (prompt + chosen) and ranked
    (prompt + the best response) records; prompt records are counted as unused.
kind="pairwise" (reward model, DPO): ``PairwiseDataset``, one item per pair (prompt + chosen, prompt +
    rejected, the record's ``margin``, 0 when absent). Ranked records are not used (DPO's kind).
kind="ranked" (reward model, K-wise): ``RankedDataset``, one item of K rows per pairwise or ranked record.
    K is the most responses of any kept record of the train and eval parts (the same K for both: the
    pipeline needs one row count per micro-batch), ``stats["max_responses"]``; a record with fewer
    responses gets filler rows (counted as ``filler_rows``).
kind="prompt" (PPO/GRPO rollouts): ``PromptDataset``, the prompt ending with the generation prompt
    "Assistant:\\n". Uses prompt records and the prompts of pairwise and ranked records; the records are
    read as prompts (``data.formats``: GSM8K question/answer records and chats ending with a user message
    are prompt records here). Each item's record (``PromptDataset.record(i)``: its prompt as the source
    gave it, a string or a list of {"role", "content"} messages, system message included, and a prompt
    record's other fields) is kept for GRPO's reward functions.

Pad id: ``data.tokenize.choose_pad`` (``pad_token`` when given, else the tokenizer's pad, unk, a spare
special token or BOS; never EOS). Pads are -100 in labels and 0 in attention_mask.

Over-long samples (``overflow``): "truncate" (default) cuts SFT samples on the right; pairwise, ranked and
prompt samples instead lose context from the left, keeping the template's structure, so the scored answer
still ends with its EOS and a prompt still ends with the generation prompt (``data.truncate``; all
responses of a record share one cut; a pair or ranking with an answer that does not fit even so is
dropped, reason "answer_too_long"). "drop" drops over-long
samples. "chunk" splits over-long pretrain documents into max_seq_len rows that overlap by one token
(every token trained once) and truncates the other samples as "truncate" does. A sample left with no
trained token is dropped. Every drop is counted in the stats by reason, as are truncations
("truncated", of which "context_cut" from the left), chunked documents ("chunked", "chunks"), records
unused by this kind and bad records dropped in skip mode (``strict=False``).
"""
from __future__ import annotations

import array
import collections
import os
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from data import cache as cache_mod
from data.batching import LMDataset, PairwiseDataset, PromptDataset, RankedDataset
from data.chat_template import TEMPLATES, make_template
from data.errors import DataError, NoSamplesError, Problem
from data.hashing import file_sha256
from data.packing import OVERFLOW_POLICIES, Samples, SampleWriter, fit_length, rows_to_arrays
from data.packing import pack as pack_rows
from data.records import PathsArg, Record, RecordStream, expand_sources
from data.schema import RECORD_TYPES
from data.split import eval_split, split_shares
from data.templates import ROLE_OF, TEMPLATE_VERSION, response_side
from data.tokenize import choose_pad, special_token_check, tokenize_for_cut, tokenize_records
from data.truncate import chunk, fit_context

KINDS = ("lm", "pairwise", "ranked", "prompt")
_USES = {"lm": ("pretrain", "instruct", "conversation", "ref_qa", "pairwise", "ranked"),
         "pairwise": ("pairwise",), "ranked": ("pairwise", "ranked"), "prompt": ("prompt", "pairwise", "ranked")}
PAYLOAD_VERSION = 6  # in the cache key: 2 added pairwise margins, 3 the pad choice, 4 formats/template stats, 5 prompt
# columns, 6 prompts as given (message lists stay lists) and chats / question-answer records read as prompts
# What to do about records a kind does not use (build_dataset's error, data.inspect's "not used" line).
UNUSED_HINTS = {
    "lm": {"prompt": "prompt records have no answer to train on: they are PPO/GRPO prompts (kind=\"prompt\"); for "
                     "SFT give answers (instruct, conversation, messages ending with an assistant message, or "
                     "question/answer records)"},
    "prompt": {t: "kind=\"prompt\" reads prompt records (a prompt without its answer: {\"prompt\": ...}, messages "
                  "ending with a user message, question/answer records) and the prompts of pairwise and ranked records"
               for t in ("pretrain", "instruct", "conversation", "ref_qa")},
}


def unused_hints(kind: str, unused: Dict[str, int]) -> List[str]:
    """One line per distinct hint for the record types ``kind`` did not use (``UNUSED_HINTS``)."""
    return list(dict.fromkeys(UNUSED_HINTS.get(kind, {})[t] for t in unused if t in UNUSED_HINTS.get(kind, {})))


class Built(NamedTuple):
    train: Dataset
    eval: Optional[Dataset]
    stats: Dict[str, Any]


def build_dataset(data_paths: PathsArg, tokenizer, max_seq_len: int, *, kind: str = "lm", pack: bool = False,
                  overflow: str = "truncate", strict: bool = True, eval_paths: Optional[PathsArg] = None,
                  eval_fraction: float = 0.0, data_split: Union[str, Sequence[float], None] = None,
                  split_index: int = 0, seed: int = 1234, cache_dir: Optional[str] = None,
                  batch_size: int = 1000, pad_token: Union[str, int, None] = None, template: str = "pipetune") -> Built:
    """Validate, render, tokenize, fit and (optionally) pack; returns ``Built(train, eval, stats)``.

    data_paths / eval_paths: a path, a glob, a folder, ``{"path": ..., "format": ...}`` or a list of them
        (.json, .jsonl, .parquet, save_to_disk folders; ``data.sources``), records in any format of
        ``data.formats`` (detected per file unless stated). Streamed: memory holds the tokenized samples
        and a few bytes per record, not the records (except .json arrays, which are parsed whole).
    kind: "lm" | "pairwise" | "ranked" | "prompt" (the module docstring; item shapes: ``data.batching``).
    pack: pack several samples per row (kind="lm" only).
    overflow: "truncate" (default), "drop" or "chunk" samples longer than max_seq_len (module docstring).
    strict: raise ``DataError`` listing every bad record; else drop them and count by reason.
    eval_fraction: hold out this fraction of the (selected) records when eval_paths is not given.
    data_split, split_index: e.g. "2,4,4" and 0/1/2: use only that disjoint share of the records.
    cache_dir: reuse/build ``<cache_dir>/<key>.pt`` (one builder per node, see ``data.cache``).
    pad_token: the token (string, or id) rows are padded with; default: ``data.tokenize.choose_pad``.
        ``TokenizerError`` (a ``DataError``) when it, or the default, is not a safe pad.
    template: "pipetune" (``data.templates``) or "model" (the tokenizer's own chat template,
        ``data.chat_template``; ``TokenizerError`` when it has none or it fails the probe).
    stats: {"files", "formats", "records", "types", "invalid", "unused", "pad", "template", "data_split"?,
        "max_responses"? (kind="ranked"), "train": {...}, "eval": ..., "cache"?}.
    """
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: use one of {', '.join(KINDS)}")
    if overflow not in OVERFLOW_POLICIES:
        raise ValueError(f"overflow {overflow!r}: use one of {', '.join(OVERFLOW_POLICIES)}")
    if pack and kind != "lm":
        raise ValueError(f"pack=True applies to kind='lm' only (got kind={kind!r})")
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be >= 2, got {max_seq_len}")
    if template not in TEMPLATES:
        raise ValueError(f"template {template!r}: use one of {', '.join(TEMPLATES)}")
    choose_pad(tokenizer, pad_token)  # a bad pad choice fails here, before any work (and on a cache hit)
    tpl = make_template(template, tokenizer)  # so does a model template that fails its probe
    args = dict(kind=kind, pack=pack, overflow=overflow, strict=strict, eval_fraction=eval_fraction,
                data_split=data_split, split_index=split_index, seed=seed, max_seq_len=max_seq_len,
                batch_size=batch_size, pad_token=pad_token, template=template)

    def build() -> Dict[str, Any]:
        return _build(data_paths, eval_paths, tokenizer, **args)

    if cache_dir is None:
        payload = build()
    else:
        key = cache_mod.cache_key(dict(args, files=_file_hashes(data_paths), eval_files=_file_hashes(eval_paths),
                                       tokenizer=cache_mod.tokenizer_fingerprint(tokenizer),
                                       template=TEMPLATE_VERSION if tpl is None else "model-" + tpl.version,
                                       batch_size=None, payload=PAYLOAD_VERSION,
                                       code=cache_mod.data_code_version()))
        payload, hit = cache_mod.load_or_build(cache_dir, key, build)
        payload["stats"]["cache"] = {"key": key, "hit": hit, "path": os.path.join(cache_dir, key + ".pt")}
    train = _make(payload, "train")
    if len(train) == 0:
        st = payload["stats"]["train"]
        hints = unused_hints(kind, st["unused"])
        if st["dropped"].get("too_long"):
            hints.append(f"{st['dropped']['too_long']} record(s) do not fit max_seq_len {max_seq_len} tokens"
                         + (" even cut (a model template's prompt is cut between whole messages only)"
                            if overflow != "drop" else " (overflow \"drop\")") + ": raise max_seq_len")
        raise NoSamplesError(f"no {kind} samples left to train on (types used: {st['types']}, not used by kind={kind!r}: "
                             f"{st['unused']}, dropped: {st['dropped']}){''.join(f'; {h}' for h in hints)}; check the "
                             "data, kind, max_seq_len and overflow policy with `python -m data.inspect`")
    return Built(train, _make(payload, "eval"), payload["stats"])


def _file_hashes(paths: Optional[PathsArg]) -> List[Tuple[str, str, Optional[str]]]:
    """(file, sha256, stated format) of every data file: part of the cache key."""
    if paths is None:
        return []
    sources, problems = expand_sources(paths)
    if problems:
        raise DataError(problems, "data files not found")
    return [(os.path.abspath(f), file_sha256(f), s.format) for s in sources for f in s.files]


def _make(payload: Dict[str, Any], split: str) -> Optional[Dataset]:
    part = payload.get(split)
    if part is None:
        return None
    samples = Samples.from_state(part["samples"])
    T, pad, kind = payload["max_seq_len"], payload["pad_id"], payload["kind"]
    if kind == "lm":
        return LMDataset(samples, part["row_offsets"].numpy(), part["row_samples"].numpy(), T, pad, payload["pack"])
    if kind == "pairwise":
        return PairwiseDataset(samples, T, pad, part["margins"].numpy())
    if kind == "ranked":
        return RankedDataset(samples, T, pad, part["margins"].numpy(), part["n_responses"].numpy(),
                             payload["max_responses"])
    return PromptDataset(samples, T, pad, part.get("columns"))


def _build(data_paths, eval_paths, tokenizer, *, kind, pack, overflow, strict, eval_fraction, data_split,
           split_index, seed, max_seq_len, batch_size, pad_token, template) -> Dict[str, Any]:
    tpl = make_template(template, tokenizer)
    job = dict(tokenizer=tokenizer, tpl=tpl, kind=kind, overflow=overflow, T=max_seq_len, batch_size=batch_size)
    main_stream = RecordStream(data_paths, prompts=kind == "prompt")
    main = _run_stream(main_stream, strict, **job)
    extra_stream = RecordStream(eval_paths, prompts=kind == "prompt") if eval_paths is not None else None
    extra = _run_stream(extra_stream, strict, failed=bool(main.problems + main_stream.problems), **job) \
        if extra_stream is not None else None
    problems: List[Problem] = main_stream.problems + (extra_stream.problems if extra_stream else []) + main.problems \
        + (extra.problems if extra else [])
    if problems and strict:
        raise DataError(problems, "invalid data (use strict=False / --skip-bad to drop bad records)")
    n_extra = extra.n if extra else 0
    stats: Dict[str, Any] = {"files": [list(f) for f in main_stream.files + (extra_stream.files if extra_stream else [])],
                             "formats": dict(main_stream.formats + (extra_stream.formats if extra_stream else [])),
                             "records": main.n + n_extra}
    idx = np.arange(main.n)
    if data_split is not None:
        shares = split_shares(main.n, data_split, seed)
        if not 0 <= split_index < len(shares):
            raise ValueError(f"split_index {split_index} out of range for data_split {data_split!r}")
        idx = shares[split_index]
        stats["data_split"] = {"spec": str(data_split), "index": split_index, "records": len(idx)}
    if extra is not None:
        selected = {"train": (main, idx), "eval": (extra, np.arange(extra.n))}
    else:
        tr, ev = eval_split(idx, eval_fraction, seed)
        selected = {"train": (main, tr), "eval": (main, ev)}
    stats["types"] = dict(sum((collections.Counter(out.type_names(i)) for out, i in selected.values()),
                              collections.Counter()))
    stats["invalid"] = dict(collections.Counter(p.reason for p in problems))
    parts = {}
    for name, (out, i) in selected.items():
        parts[name] = _part(out, i, kind, pack, max_seq_len)
        stats[name] = parts[name].pop("stats")
    main.samples = None  # the parts hold what they use
    max_responses = None
    if kind == "ranked":  # one row count K for every item of both parts; fillers count as computed
        max_responses = max([2] + [int(p["n_responses"].max()) for p in parts.values() if len(p["n_responses"])])
        stats["max_responses"] = max_responses
        for name in parts:
            _ranked_row_stats(stats[name], parts[name]["n_responses"], max_responses, max_seq_len)
    stats["unused"] = {t: stats["train"]["unused"].get(t, 0) + stats["eval"]["unused"].get(t, 0)
                       for t in set(stats["train"]["unused"]) | set(stats["eval"]["unused"])}
    has_eval = eval_paths is not None or eval_fraction > 0
    pad = choose_pad(tokenizer, pad_token)
    stats["pad"] = pad._asdict()  # {"id", "token", "source"}
    stats["template"] = tpl.describe() if tpl is not None else {"name": "pipetune"}
    return {"kind": kind, "pack": pack, "max_seq_len": max_seq_len, "pad_id": pad.id, "max_responses": max_responses,
            "train": parts["train"], "eval": parts["eval"] if has_eval else None, "stats": stats}


def _ranked_row_stats(stats: dict[str, Any], n_responses: torch.Tensor, max_responses: int, T: int) -> None:
    """A ranked part's rows: K per record, of which K - n are filler (computed, never scored)."""
    n_records = len(n_responses)
    stats["filler_rows"] = int(n_records * max_responses - int(n_responses.sum()))
    stats["pairs"] = int((n_responses * (n_responses - 1) // 2).sum())  # ordered (better, worse) pairs
    stats["computed_tokens"] = n_records * max_responses * T
    stats["efficiency"] = stats["real_tokens"] / stats["computed_tokens"] if stats["computed_tokens"] else 0.0


# Per-record outcome of tokenizing and fitting (``_Outcomes.status``).
KEPT, UNUSED, DROPPED, BAD = 0, 1, 2, 3


class _Outcomes:
    """What tokenizing and fitting did to each valid record of one stream, indexed by its position among
    the stream's valid records (the index space of data_split/eval_fraction): compact arrays, plus the
    kept samples of all records in order (``samples``) and the tokenization problems."""

    def __init__(self):
        self.type = array.array("b")       # index into RECORD_TYPES
        self.status = array.array("b")     # KEPT | UNUSED | DROPPED | BAD
        self.reason = array.array("b")     # index into self.reasons (DROPPED), else -1
        self.truncated = array.array("b")  # 1: cut on the right or context cut from the left
        self.context_cut = array.array("b")
        self.chunks = array.array("i")     # rows of a chunked pretrain document (0: not chunked)
        self.n_samples = array.array("i")  # samples kept (1; 2 for a pair; K for a ranking; k chunks)
        self.margin = array.array("f")     # pairwise margin (0 otherwise)
        self.columns: List[Optional[dict]] = []  # kind="prompt": each record's prompt and other fields (prompt_columns)
        self.raw_len = array.array("q")    # token length of every tokenized side, before fitting
        self.raw_rec = array.array("q")    # ... and its record
        self.reasons: List[str] = []
        self.problems: List[Problem] = []
        self.writer = SampleWriter()
        self.pending: List[Tuple[np.ndarray, np.ndarray]] = []  # kept samples of the current batch
        self.samples: Optional[Samples] = None

    @property
    def n(self) -> int:
        return len(self.type)

    def add(self, type_: str, status: int, reason: Optional[str] = None, truncated: bool = False,
            context_cut: bool = False, chunks: int = 0, fitted: Sequence = (), margin: float = 0.0,
            columns: Optional[dict] = None) -> None:
        if reason is not None and reason not in self.reasons:
            self.reasons.append(reason)
        self.type.append(_TYPE_CODE[type_])
        self.status.append(status)
        self.reason.append(self.reasons.index(reason) if reason is not None else -1)
        self.truncated.append(truncated)
        self.context_cut.append(context_cut)
        self.chunks.append(chunks)
        self.n_samples.append(len(fitted))
        self.margin.append(margin)
        self.columns.append(columns)
        self.pending.extend(fitted)

    def end_batch(self) -> None:
        """Store the batch's kept samples as one chunk (no per-sample arrays are kept)."""
        self.writer.add(self.pending)
        self.pending = []

    def arrays(self):
        for name in ("type", "status", "reason", "truncated", "context_cut", "chunks", "n_samples", "margin",
                     "raw_len", "raw_rec"):
            setattr(self, name, np.frombuffer(getattr(self, name), dtype=getattr(self, name).typecode) if
                    isinstance(getattr(self, name), array.array) else getattr(self, name))
        self.samples = self.writer.finish()

    def type_names(self, index: np.ndarray) -> List[str]:
        return [RECORD_TYPES[c] for c in self.type[index]]


_TYPE_CODE = {t: i for i, t in enumerate(RECORD_TYPES)}


def _run_stream(stream: RecordStream, strict: bool, failed: bool = False, **job) -> _Outcomes:
    """Tokenize and fit the records of ``stream`` a batch at a time. In strict mode, once any problem
    is known the rest is only validated (its problems still reported): the build fails anyway."""
    out, batch = _Outcomes(), []
    for rec in stream:
        batch.append(rec)
        if len(batch) == job["batch_size"]:
            _process(out, batch, skip=failed or (strict and bool(stream.problems or out.problems)), **job)
            out.end_batch()
            batch = []
    _process(out, batch, skip=failed or (strict and bool(stream.problems or out.problems)), **job)
    out.end_batch()
    out.arrays()
    return out


def _process(out: _Outcomes, records: List[Record], *, skip: bool, tokenizer, tpl, kind, overflow, T, batch_size):
    """One batch of records -> their outcomes and kept samples (in record order)."""
    used = [r for r in records if r.type in _USES[kind]]
    if kind in ("pairwise", "ranked"):  # every answer of a record, best first
        entries = [(r, side) for r in used for side in _answer_sides(r)]
    elif kind == "prompt":  # a pairwise or ranked record contributes its prompt only
        entries = [(Record("prompt", {k: v for k, v in r.fields.items() if k in ("prompt", "rounds")},
                           r.file, r.index, r.line, r.format, r.field_map, r.given_prompt), "") for r in used]
    else:  # lm: a pairwise record's chosen answer, a ranked record's best (side "chosen" = responses[0])
        entries = [(r, "chosen") for r in used]
    if skip:  # the build fails: report the special-token problems too, but tokenize nothing
        out.problems.extend(special_token_check(entries, tokenizer))
        for rec in records:
            out.add(rec.type, BAD)
        return
    encoded, problems = tokenize_records(entries, tokenizer, batch_size, template=tpl)
    out.problems.extend(problems)
    bad_records = {(p.file, p.record) for p in problems}
    entry_span, start = {}, 0  # id(record) -> (its first entry, its number of entries: 1, 2 or K)
    for r in used:
        n = len(_answer_sides(r)) if kind in ("pairwise", "ranked") else 1
        entry_span[id(r)] = (start, n)
        start += n
    for rec in records:
        if rec.type not in _USES[kind]:
            out.add(rec.type, UNUSED)
            continue
        g, group = entry_span[id(rec)]
        sides = encoded[g:g + group]
        for s in sides:
            if s is not None:
                out.raw_len.append(len(s[0]))
                out.raw_rec.append(out.n)
        if (rec.file, rec.index) in bad_records:
            out.add(rec.type, BAD)
            continue
        if kind == "lm" and overflow == "chunk" and rec.type == "pretrain" and len(sides[0][0]) > T:
            fitted = chunk(*sides[0], T)
            out.add(rec.type, KEPT, chunks=len(fitted), fitted=fitted)
        elif kind == "lm":
            res, reason, cut = fit_length(*sides[0], T, "truncate" if overflow == "chunk" else overflow)
            if res is None:
                out.add(rec.type, DROPPED, reason)
            else:
                out.add(rec.type, KEPT, truncated=cut, fitted=[res])
        elif max(len(ids) for ids, _ in sides) <= T:
            out.add(rec.type, KEPT, fitted=list(sides), margin=float(rec.fields.get("margin", 0.0)),
                    columns=prompt_columns(rec) if kind == "prompt" else None)
        elif overflow == "drop":
            out.add(rec.type, DROPPED, "too_long")
        else:  # pairwise / prompt: cut the context from the left, the answer / generation prompt stays whole
            ents = entries[g:g + group]
            fitted = tpl.fit_context(ents, T) if tpl is not None else \
                fit_context([_cut_source(e, s, tokenizer) for e, s in zip(ents, sides)], T)
            if fitted is None:
                out.add(rec.type, DROPPED, "answer_too_long" if kind in ("pairwise", "ranked") else "too_long")
            else:
                out.add(rec.type, KEPT, truncated=True, context_cut=True, fitted=fitted,
                        margin=float(rec.fields.get("margin", 0.0)), columns=prompt_columns(rec) if kind == "prompt" else None)


def prompt_columns(rec: Record) -> dict:
    """A prompt's record as the reward functions see it: {"prompt": the prompt as the source gave it
    (``Record.given_prompt``: a string, or {"role", "content"} messages, system message included); for a
    unified record its "prompt" string or its rounds as messages, **the prompt record's other fields}."""
    fields = rec.fields
    if rec.given_prompt is not None:
        prompt = rec.given_prompt
    elif "prompt" in fields:
        prompt = fields["prompt"]
    else:
        prompt = [{"role": ROLE_OF[role], "content": text} for role, text in fields["rounds"]]
    other = {k: v for k, v in fields.items() if k not in ("prompt", "rounds")} if rec.type == "prompt" else {}
    return {"prompt": prompt, **other}


def _answer_sides(rec: Record) -> tuple[str, ...]:
    """The sides ``data.templates.record_turns`` renders a pairwise or ranked record's answers with, best first."""
    if rec.type == "ranked":
        return tuple(response_side(k) for k in range(len(rec.fields["responses"])))
    return ("chosen", "rejected")


def _part(out: _Outcomes, index: np.ndarray, kind: str, pack: bool, T: int) -> Dict[str, Any]:
    """The records ``index`` (sorted) of ``out`` -> payload part: their samples, rows and stats."""
    index = np.asarray(index, dtype=np.int64)
    sample_start = np.zeros(out.n + 1, dtype=np.int64)
    np.cumsum(out.n_samples, out=sample_start[1:])
    counts = out.n_samples[index].astype(np.int64)
    first = np.repeat(sample_start[index], counts)  # [samples of the part]: each one's record's first sample
    within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    samples = out.samples.select(first + within)
    in_part = np.zeros(out.n, dtype=bool)
    in_part[index] = True
    status, types = out.status[index], out.type[index]
    kept = status == KEPT
    count = lambda codes, names: {names[c]: int(k) for c, k in zip(*np.unique(codes, return_counts=True))}
    raw = out.raw_len[in_part[out.raw_rec]] if len(out.raw_rec) else np.zeros(0, dtype=np.int64)
    group = 2 if kind == "pairwise" else 1  # samples per row ("ranked": rows are counted per record below)
    lengths = samples.lengths()
    if kind == "lm" and pack:
        rows = pack_rows(lengths.tolist(), T)
        row_offsets, row_samples = rows_to_arrays(rows)
        n_rows = len(rows)
    elif kind == "lm":  # one sample per row
        row_offsets, row_samples = np.arange(len(samples) + 1, dtype=np.int64), np.arange(len(samples), dtype=np.int64)
        n_rows = len(samples)
    elif kind == "ranked":  # one row (of K responses) per kept record
        row_offsets = row_samples = None
        n_rows = int(kept.sum())
    else:
        row_offsets = row_samples = None
        n_rows = len(samples) // group
    real = int(lengths.sum())
    computed = n_rows * T * group
    stats = {"samples": n_rows if kind != "lm" else len(samples), "rows": n_rows,
             "types": count(types[kept], RECORD_TYPES), "unused": count(types[status == UNUSED], RECORD_TYPES),
             "truncated": int(out.truncated[index].sum()), "context_cut": int(out.context_cut[index].sum()),
             "chunked": int((out.chunks[index] > 0).sum()), "chunks": int(out.chunks[index].sum()),
             "dropped": count(out.reason[index][status == DROPPED], out.reasons),
             "real_tokens": real, "target_tokens": int(samples.target.sum()), "computed_tokens": computed,
             "efficiency": real / computed if computed else 0.0,
             "length_before_fit": _describe(raw), "length": _describe(lengths)}
    part = {"samples": samples.state(), "stats": stats}
    if kind in ("pairwise", "ranked"):
        part["margins"] = torch.from_numpy(out.margin[index][kept].astype(np.float32))
    if kind == "ranked":
        part["n_responses"] = torch.from_numpy(counts[kept].astype(np.int64))
    if kind == "prompt":  # one sample per kept record, in the same order
        part["columns"] = [out.columns[i] for i in index[kept]]
    if row_offsets is not None:
        part["row_offsets"], part["row_samples"] = torch.from_numpy(row_offsets), torch.from_numpy(row_samples)
    return part


def _cut_source(entry: Tuple[Record, str], sample, tokenizer):
    src = tokenize_for_cut(entry[0], entry[1], tokenizer)
    assert src is not None and np.array_equal(src.ids, sample[0]), "re-tokenizing for a context cut changed the ids"
    return src


def _describe(lengths: np.ndarray) -> Dict[str, float]:
    """Token-length summary {n, min, mean, p50, p95, max}."""
    if not len(lengths):
        return {"n": 0}
    q = np.percentile(lengths, [50, 95])
    return {"n": int(len(lengths)), "min": int(lengths.min()), "mean": round(float(lengths.mean()), 1),
            "p50": round(float(q[0]), 1), "p95": round(float(q[1]), 1), "max": int(lengths.max())}
