"""Load record files (``.json`` array or ``.jsonl``) and validate every record.

Record types (see docs/data_format.md):

    pretrain      {"text"}
    instruct      {"instruct", "input"?, "output"}       "input" is absent rather than empty
    conversation  {"rounds": [["ask"|"ans", text], ...]}  at least one "ans"
    ref_qa        {"reference", "rounds"}
    pairwise      {"prompt" | "rounds", "chosen", "rejected", "margin"?}  (margin: a number, default 0)
    prompt        {"prompt" | "rounds"}

Every record may also carry "id" and "meta" (ignored). Any other key is an error, so typos such as
"inputs" are caught instead of silently dropping the input.

``load_records`` never raises for bad data: it returns the valid records plus one ``Problem`` per bad
record or file, so strict mode can report every problem at once and skip mode can count them.
"""
from __future__ import annotations

import dataclasses
import glob
import math
import hashlib
import json
import os
from typing import Any, Iterable, List, Optional, Sequence, Tuple, Union

from data.errors import Problem

ROLES = ("ask", "ans")
IGNORED_KEYS = ("id", "meta")
# type -> (required string fields, optional string fields, answer fields that must be non-empty)
_STRING_FIELDS = {
    "pretrain": (("text",), ()),
    "instruct": (("instruct", "output"), ("input",)),
    "conversation": ((), ()),
    "ref_qa": (("reference",), ()),
    "pairwise": (("chosen", "rejected"), ()),
    "prompt": ((), ()),
}
RECORD_TYPES = tuple(_STRING_FIELDS)
_HAS_ROUNDS = {"conversation": "required", "ref_qa": "required", "pairwise": "prompt_or_rounds",
               "prompt": "prompt_or_rounds"}

PathsArg = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]


@dataclasses.dataclass
class Record:
    """One validated record. ``fields`` holds the user's keys minus "type"/"id"/"meta";
    ``rounds`` are tuples ``(role, text)``."""
    type: str
    fields: dict
    file: str
    index: int  # 0-based index in its file
    line: Optional[int] = None  # 1-based line (JSONL only)


@dataclasses.dataclass
class LoadResult:
    records: List[Record]
    problems: List[Problem]
    files: List[Tuple[str, str]]  # (path, sha256 of its bytes), in load order


def expand_paths(data_paths: PathsArg) -> Tuple[List[str], List[Problem]]:
    """A path, a glob, a directory (its *.json/*.jsonl), or a list of those -> sorted unique files."""
    items = [data_paths] if isinstance(data_paths, (str, os.PathLike)) else list(data_paths)
    files, problems, seen = [], [], set()
    for item in items:
        item = os.fspath(item)
        if glob.has_magic(item):
            found = sorted(glob.glob(item, recursive=True))
        elif os.path.isdir(item):
            found = sorted(glob.glob(os.path.join(item, "*.json")) + glob.glob(os.path.join(item, "*.jsonl")))
        else:
            found = [item] if os.path.exists(item) else []
        if not found:
            problems.append(Problem(item, "no such file (or the glob/directory matched no .json/.jsonl file)",
                                    reason="missing_file"))
        for f in found:
            if f not in seen:
                seen.add(f)
                files.append(f)
    return files, problems


def load_records(data_paths: PathsArg) -> LoadResult:
    """Read and validate every record of every file; never raises for bad data."""
    paths, problems = expand_paths(data_paths)
    records, files = [], []
    for path in paths:
        with open(path, "rb") as fh:
            raw = fh.read()
        files.append((path, hashlib.sha256(raw).hexdigest()))
        for index, line, obj, problem in _parse_file(path, raw):
            if problem is not None:
                problems.append(problem)
                continue
            rec, bad = validate_record(obj, path, index, line)
            problems.extend(bad)
            if rec is not None:
                records.append(rec)
    return LoadResult(records, problems, files)


def _parse_file(path: str, raw: bytes) -> Iterable[Tuple[Optional[int], Optional[int], Any, Optional[Problem]]]:
    """Yield (record_index, line, object, problem) per record; file-level problems have index None."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        yield None, None, None, Problem(path, f"file is not UTF-8 (bad byte 0x{raw[e.start]:02x} at byte "
                                        f"{e.start}); re-save it as UTF-8", line=line, reason="not_utf8")
        return
    if path.endswith(".jsonl"):
        index = 0
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                yield index, lineno, json.loads(line), None
            except json.JSONDecodeError as e:
                yield index, lineno, None, Problem(path, f"invalid JSON: {e.msg} (column {e.colno})",
                                                   record=index, line=lineno, reason="invalid_json")
            index += 1
        if index == 0:
            yield None, None, None, Problem(path, "file has no records", reason="empty_file")
    elif path.endswith(".json"):
        if not text.strip():
            yield None, None, None, Problem(path, "file is empty", reason="empty_file")
            return
        try:
            top = json.loads(text)
        except json.JSONDecodeError as e:
            yield None, None, None, Problem(path, f"invalid JSON: {e.msg} (column {e.colno}); no record of this "
                                            "file was read", line=e.lineno, reason="invalid_json")
            return
        if not isinstance(top, list):
            hint = " (wrap the records in [...], or write one record per line in a .jsonl file)"
            yield None, None, None, Problem(path, f"top level is a JSON {_json_type(top)}, expected a list of "
                                            f"records{hint}", reason="not_a_list")
            return
        if not top:
            yield None, None, None, Problem(path, "file has no records (empty list)", reason="empty_file")
        for index, obj in enumerate(top):
            yield index, None, obj, None
    else:
        yield None, None, None, Problem(path, "unsupported file extension; use .json (a list of records) or "
                                        ".jsonl (one record per line)", reason="bad_extension")


def _json_type(v: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(v), type(v).__name__)


def validate_record(obj: Any, file: str, index: int, line: Optional[int] = None
                    ) -> Tuple[Optional[Record], List[Problem]]:
    """Return (Record, []) for a valid record, else (None, problems) with every problem found."""
    def bad(field: Optional[str], message: str, reason: str) -> Problem:
        return Problem(file, message, record=index, line=line, field=field, reason=reason)

    if not isinstance(obj, dict):
        return None, [bad(None, f"record is a JSON {_json_type(obj)}, expected an object", "not_an_object")]
    rtype = obj.get("type")
    if "type" not in obj:
        return None, [bad("type", f"missing; use one of {', '.join(RECORD_TYPES)}", "missing_type")]
    if not isinstance(rtype, str):
        return None, [bad("type", f"must be a string, got a JSON {_json_type(rtype)}", "bad_type")]
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
    for key in obj:
        if key not in allowed:
            problems.append(bad(key, f"unknown field for type {rtype!r}; allowed: "
                                f"{', '.join(sorted(allowed - {'type'}))}", "unknown_field"))
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
            problems.extend(_check_rounds(obj["rounds"], bad, need_answer=False))
    if problems:
        return None, problems
    fields = {k: v for k, v in obj.items() if k not in ("type", *IGNORED_KEYS)}
    if "rounds" in fields:
        fields["rounds"] = [(role, text) for role, text in fields["rounds"]]
    return Record(rtype, fields, file, index, line), []


def _check_text(value: Any, field: str, bad, absent_hint: bool = False) -> List[Problem]:
    if not isinstance(value, str):
        return [bad(field, f"must be a string, got a JSON {_json_type(value)}", "bad_value")]
    if not value.strip():
        hint = "; omit the key instead" if absent_hint else ""
        return [bad(field, f"is empty{hint}", "empty_text")]
    return []


def _check_rounds(rounds: Any, bad, need_answer: bool) -> List[Problem]:
    if not isinstance(rounds, list):
        return [bad("rounds", f"must be a list of [role, text] pairs, got a JSON {_json_type(rounds)}", "bad_value")]
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
        if role not in ROLES:
            problems.append(bad(where + "[0]", f"unknown role {role!r}; use 'ask' or 'ans'", "unknown_role"))
        problems.extend(_check_text(text, where + "[1]", bad))
    if need_answer and not problems and not any(role == "ans" for role, _ in rounds):
        problems.append(bad("rounds", "has no answer: add at least one [\"ans\", text] turn (nothing would be "
                            "trained on)", "no_answer"))
    return problems
