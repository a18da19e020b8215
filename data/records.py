"""Load record files and validate every record.

Record types (see docs/data_format.md):

    pretrain      {"text"}
    instruct      {"instruct", "input"?, "output"}       "input" is absent rather than empty
    conversation  {"rounds": [["ask"|"ans", text], ...]}  at least one "ans"
    ref_qa        {"reference", "rounds"}
    pairwise      {"prompt" | "rounds", "chosen", "rejected", "margin"?}  (margin: a number, default 0)
    prompt        {"prompt" | "rounds", ...}  (any other field is a column: GRPO's reward functions get it;
                  the rounds may start with one ["system", text] round: the prompt's system message)
    ranked        {"prompt" | "rounds", "responses": [best, ..., worst]}  (K >= 2 distinct answers)

Every record may also carry "id" and "meta" (ignored). Any other key is an error, so typos such as
"inputs" are caught instead of silently dropping the input; except in prompt records, whose other
fields (e.g. "answer") are kept in ``fields`` for the reward functions.

Files are read by ``data.sources`` (.json, .jsonl, .parquet, save_to_disk folders); records in the
ecosystem's formats (messages, ShareGPT, Alpaca, preference, prompt/completion) are mapped to these
types by ``data.formats`` and then validated the same way, their problems naming the source's fields.
``prompts=True`` (``build_dataset(kind="prompt")``) reads them as prompts: question/answer records and
chats ending with a user message become prompt records (``data.formats``), and a prompt record from
such a format keeps its prompt as the source gave it (``Record.given_prompt``).

``RecordStream`` yields the valid records one at a time (bounded memory) and collects the problems;
``load_records`` keeps them all. Neither raises for bad data: they give the valid records plus one
``Problem`` per bad record or file, so strict mode can report every problem at once and skip mode can
count them.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
from typing import Any, Dict, Iterator, List, Optional, Tuple

from data.errors import Problem
from data.formats import detect_format, map_record, undetected_message
from data.hashing import file_sha256
from data.schema import IGNORED_KEYS, RECORD_TYPES, ROLES, SYSTEM_ROLE, json_type
from data.sources import PathsArg, data_path_problems, expand_paths, expand_sources, read_source

__all__ = ["Record", "LoadResult", "RecordStream", "load_records", "validate_record", "to_record", "expand_paths",
           "expand_sources", "data_path_problems", "PathsArg"]

# type -> (required string fields, optional string fields, answer fields that must be non-empty)
_STRING_FIELDS = {
    "pretrain": (("text",), ()),
    "instruct": (("instruct", "output"), ("input",)),
    "conversation": ((), ()),
    "ref_qa": (("reference",), ()),
    "pairwise": (("chosen", "rejected"), ()),
    "prompt": ((), ()),
    "ranked": ((), ()),  # "responses" is a list, checked by _check_responses
}
assert tuple(_STRING_FIELDS) == RECORD_TYPES, "one entry per record type, in data.schema's order"
_HAS_ROUNDS = {"conversation": "required", "ref_qa": "required", "pairwise": "prompt_or_rounds",
               "prompt": "prompt_or_rounds", "ranked": "prompt_or_rounds"}


@dataclasses.dataclass
class Record:
    """One validated record. ``fields`` holds the unified keys minus "type"/"id"/"meta";
    ``rounds`` are tuples ``(role, text)``. ``format``: the file's record format; ``field_map``: unified
    field name -> the source record's (None for unified records); ``given_prompt``: the prompt as the
    source record gave it (a string or {"role", "content"} messages; None: as the unified fields say)."""
    type: str
    fields: dict
    file: str
    index: int  # 0-based index in its file
    line: Optional[int] = None  # 1-based line (JSONL only)
    format: str = "pipetune"
    field_map: Optional[Dict[str, str]] = None
    given_prompt: Any = None

    def source_field(self, field: Optional[str]) -> Optional[str]:
        """The user's name for a unified field (e.g. "rounds[1][1]" -> "messages[2].content")."""
        if field is None or not self.field_map:
            return field
        return self.field_map.get(field, field)


@dataclasses.dataclass
class LoadResult:
    records: List[Record]
    problems: List[Problem]
    files: List[Tuple[str, str]]  # (path, sha256 of its bytes), in load order
    formats: List[Tuple[str, str]] = dataclasses.field(default_factory=list)  # (data path, record format)


class RecordStream:
    """The valid records of ``data_paths`` in order, one at a time; ``problems``, ``files`` (path,
    sha256) and ``formats`` (data path, record format) fill in as it is iterated (once). ``prompts``:
    read the records as prompts (module docstring)."""

    def __init__(self, data_paths: PathsArg, prompts: bool = False):
        self.prompts = prompts
        self.sources, self.problems = expand_sources(data_paths)
        self.files: List[Tuple[str, str]] = []
        self.formats: List[Tuple[str, str]] = []

    def __iter__(self) -> Iterator[Record]:
        for src in self.sources:
            self.files.extend((f, file_sha256(f)) for f in src.files)
            fmt = src.format
            if fmt is not None:
                self.formats.append((src.path, fmt))
            for index, line, obj, problem in read_source(src):
                if problem is not None:
                    self.problems.append(problem)
                    continue
                if fmt is None and isinstance(obj, dict):
                    fmt = detect_format(obj)
                    if fmt is None:
                        self.problems.append(Problem(src.path, undetected_message(obj), reason="unknown_format"))
                        break
                    self.formats.append((src.path, fmt))
                rec, bad = to_record(obj, fmt or "pipetune", src.path, index, line, self.prompts)
                self.problems.extend(bad)
                if rec is not None:
                    yield rec


def load_records(data_paths: PathsArg, prompts: bool = False) -> LoadResult:
    """Read and validate every record of every file (as prompts: ``prompts``); never raises for bad data."""
    stream = RecordStream(data_paths, prompts)
    records = list(stream)
    return LoadResult(records, stream.problems, stream.files, stream.formats)


def to_record(obj: Any, fmt: str, file: str, index: int, line: Optional[int] = None, prompts: bool = False
              ) -> Tuple[Optional[Record], List[Problem]]:
    """A record object of format ``fmt`` -> (Record, []) or (None, problems naming the source's fields)."""
    if fmt == "pipetune" or not isinstance(obj, dict):
        return validate_record(obj, file, index, line)
    mapped = map_record(fmt, obj, prompts)
    if mapped.obj is None:
        return None, [Problem(file, msg, record=index, line=line, field=field, reason=reason)
                      for field, msg, reason in mapped.problems]
    rec, problems = validate_record(mapped.obj, file, index, line)
    if rec is None:
        return None, [dataclasses.replace(p, field=mapped.fields.get(p.field, p.field)) for p in problems]
    rec.format, rec.field_map, rec.given_prompt = fmt, mapped.fields, mapped.prompt
    return rec, []


def validate_record(obj: Any, file: str, index: int, line: Optional[int] = None
                    ) -> Tuple[Optional[Record], List[Problem]]:
    """Return (Record, []) for a valid record, else (None, problems) with every problem found."""
    def bad(field: Optional[str], message: str, reason: str) -> Problem:
        return Problem(file, message, record=index, line=line, field=field, reason=reason)

    if not isinstance(obj, dict):
        return None, [bad(None, f"record is a JSON {json_type(obj)}, expected an object", "not_an_object")]
    rtype = obj.get("type")
    if "type" not in obj:
        return None, [bad("type", f"missing; use one of {', '.join(RECORD_TYPES)}", "missing_type")]
    if not isinstance(rtype, str):
        return None, [bad("type", f"must be a string, got a JSON {json_type(rtype)}", "bad_type")]
    if rtype not in _STRING_FIELDS:
        return None, [bad("type", f"unknown type {rtype!r}; use one of {', '.join(RECORD_TYPES)}", "unknown_type")]

    problems: List[Problem] = []
    required, optional = _STRING_FIELDS[rtype]
    rounds_rule = _HAS_ROUNDS.get(rtype)
    allowed = set(required) | set(optional) | {"type", *IGNORED_KEYS}
    if rounds_rule:
        allowed |= {"rounds"} | ({"prompt"} if rounds_rule == "prompt_or_rounds" else set())
    if rtype == "pairwise":
        allowed.add("margin")
        margin = obj.get("margin", 0.0)
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
            problems.append(bad("margin", f"must be a finite number (how much the chosen answer should outscore the "
                                f"rejected one), got {json.dumps(margin)}", "bad_value"))
    if rtype == "ranked":
        allowed.add("responses")
        if "responses" not in obj:
            problems.append(bad("responses", "missing (required for type 'ranked': a list of at least 2 answers, "
                                "best first)", "missing_field"))
        else:
            problems.extend(_check_responses(obj["responses"], bad))
    for key in obj:
        if key not in allowed and rtype != "prompt":  # a prompt record's other fields are columns (reward functions)
            close = difflib.get_close_matches(key, sorted(allowed - {"type"}), n=1, cutoff=0.6)
            allowed_list = ", ".join(sorted(allowed - {"type"}))
            problems.append(bad(key, f"unknown field for type {rtype!r}: did you mean {close[0]!r}? (allowed: {allowed_list})"
                                if close else f"unknown field for type {rtype!r}; allowed: {allowed_list}", "unknown_field"))
    for key in required:
        if key not in obj:
            problems.append(bad(key, f"missing (required for type {rtype!r})", "missing_field"))
    for key in required + optional:
        if key in obj:
            problems.extend(_check_text(obj[key], key, bad, absent_hint=key in optional))

    if rounds_rule == "required":
        if "rounds" not in obj:
            problems.append(bad("rounds", f"missing (required for type {rtype!r})", "missing_field"))
        else:
            problems.extend(_check_rounds(obj["rounds"], bad, need_answer=True))
    elif rounds_rule == "prompt_or_rounds":
        has_p, has_r = "prompt" in obj, "rounds" in obj
        if has_p == has_r:
            problems.append(bad("prompt", "give exactly one of 'prompt' (a string) or 'rounds' (a list of "
                                "[role, text] pairs)", "missing_field" if not has_p else "bad_value"))
        elif has_p:
            problems.extend(_check_text(obj["prompt"], "prompt", bad))
        else:
            problems.extend(_check_rounds(obj["rounds"], bad, need_answer=False, system_first=rtype == "prompt"))
    if problems:
        return None, problems
    fields = {k: v for k, v in obj.items() if k not in ("type", *IGNORED_KEYS)}
    if "rounds" in fields:
        fields["rounds"] = [(role, text) for role, text in fields["rounds"]]
    return Record(rtype, fields, file, index, line), []


def _check_text(value: Any, field: str, bad, absent_hint: bool = False) -> List[Problem]:
    if not isinstance(value, str):
        return [bad(field, f"must be a string, got a JSON {json_type(value)}", "bad_value")]
    if not value.strip():
        hint = "; omit the key instead" if absent_hint else ""
        return [bad(field, f"is empty{hint}", "empty_text")]
    return []


def _check_responses(responses: Any, bad) -> list[Problem]:
    """A ranked record's answers: a list of >= 2 non-empty, distinct strings (best first)."""
    if not isinstance(responses, list):
        return [bad("responses", f"must be a list of answer strings (best first), got a JSON {json_type(responses)}",
                    "bad_value")]
    if len(responses) < 2:
        return [bad("responses", f"has {len(responses)} answer(s); a ranking needs at least 2 (best first; "
                    "a pair can also be a 'pairwise' record)", "too_few_responses")]
    problems: list[Problem] = []
    first_seen: dict[str, int] = {}  # stripped text -> index of its first occurrence
    for i, text in enumerate(responses):
        where = f"responses[{i}]"
        text_problems = _check_text(text, where, bad)
        problems.extend(text_problems)
        if text_problems:
            continue
        key = text.strip()
        if key in first_seen:
            problems.append(bad(where, f"repeats responses[{first_seen[key]}]; the answers of a ranking must differ "
                                "(equal answers cannot be ordered)", "duplicate_response"))
        else:
            first_seen[key] = i
    return problems


def _check_rounds(rounds: Any, bad, need_answer: bool, system_first: bool = False) -> List[Problem]:
    """``system_first``: a ["system", text] round may come first (a prompt record's system message)."""
    if not isinstance(rounds, list):
        return [bad("rounds", f"must be a list of [role, text] pairs, got a JSON {json_type(rounds)}", "bad_value")]
    if not rounds:
        return [bad("rounds", "is empty; give at least one [\"ask\", text] pair", "empty_text")]
    problems = []
    for i, turn in enumerate(rounds):
        where = f"rounds[{i}]"
        if not (isinstance(turn, list) and len(turn) == 2):
            problems.append(bad(where, f"must be a [role, text] pair, got {json.dumps(turn, ensure_ascii=False)[:60]}",
                                "bad_value"))
            continue
        role, text = turn
        if role == SYSTEM_ROLE and system_first and i == 0:
            if len(rounds) == 1:
                problems.append(bad("rounds", "has only a system round: add the prompt's [\"ask\", text] round",
                                    "missing_field"))
        elif role == SYSTEM_ROLE:
            where_ok = "first in a prompt record's rounds" if system_first else "in prompt records only (as their first round)"
            problems.append(bad(where + "[0]", f"a 'system' round is allowed {where_ok}; use 'ask' or 'ans' here",
                                "unknown_role"))
        elif role not in ROLES:
            problems.append(bad(where + "[0]", f"unknown role {role!r}; use 'ask' or 'ans'", "unknown_role"))
        problems.extend(_check_text(text, where + "[1]", bad))
    if need_answer and not problems and not any(role == "ans" for role, _ in rounds):
        problems.append(bad("rounds", "has no answer: add at least one [\"ans\", text] turn (nothing would be "
                            "trained on)", "no_answer"))
    return problems
