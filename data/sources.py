"""Data files -> raw record objects, one at a time (bounded memory for large files).

File types:

    .json      a JSON array of records (read whole: use .jsonl or .parquet for large data). A .json file
               holding JSON lines (what ``datasets``' ``to_json`` writes) is read as .jsonl.
    .jsonl     one record per line, streamed line by line; blank lines are skipped
    .parquet   read by row batches (needs ``pyarrow``)
    a folder written by ``datasets``' ``Dataset.save_to_disk`` (``state.json`` + ``*.arrow``), read by
               batches from the memory-mapped Arrow files (needs ``datasets``)

``pyarrow`` and ``datasets`` are imported only when such a file is read; without them the file gets one
problem saying what to install. In columnar files (parquet, Arrow) a null value means the key is
absent: a column that some records lack is null in those rows.

A data path is a file, a glob, a folder (its .json/.jsonl/.parquet files, or itself when it is a
``save_to_disk`` folder), or ``{"path": ..., "format": ...}`` with any of those and the record format
of its files (``data.formats``; default "auto": detected per file).
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Any, Iterator, List, Optional, Sequence, Tuple, Union

from data.errors import Problem
from data.schema import FORMATS, json_type

EXTENSIONS = (".json", ".jsonl", ".parquet")
ARROW_DIR = "arrow"  # Source.kind of a save_to_disk folder
BATCH_ROWS = 1000  # rows per batch read from parquet / Arrow
INSTALL_HINT = "pip install 'pipetune[hf]' (or: pip install datasets pyarrow)"

PathItem = Union[str, os.PathLike, dict]
PathsArg = Union[PathItem, Sequence[PathItem]]
# (record index, line, object, problem): one per record; file-level problems have index None
Raw = Tuple[Optional[int], Optional[int], Any, Optional[Problem]]


@dataclasses.dataclass(frozen=True)
class Source:
    path: str                 # a file, or a save_to_disk folder
    format: Optional[str]     # the stated record format, None: detect from the file's first record
    kind: str                 # "json" | "jsonl" | "parquet" | ARROW_DIR | "unsupported"
    files: Tuple[str, ...]    # the files whose bytes are the data (content hashes, preflight)


def is_saved_dataset(folder: str) -> bool:
    """A folder written by ``Dataset.save_to_disk``."""
    return os.path.isfile(os.path.join(folder, "state.json")) and bool(glob.glob(os.path.join(folder, "*.arrow")))


def data_path_problems(value: Any, key: str = "data_path") -> List[str]:
    """Type problems of a data_path config value (a path, a {"path", "format"} object or a list of them)."""
    items = value if isinstance(value, list) else [value]
    if not items:
        return [f"{key} is an empty list"]
    out = []
    for i, item in enumerate(items):
        where = f"{key}[{i}]" if isinstance(value, list) else key
        if isinstance(item, dict):
            out += [f"{where}: {p}" for p in _entry_problems(item, FORMATS)]
        elif not isinstance(item, str):
            out.append(f"{where} must be a path (a string) or {{\"path\": ..., \"format\": ...}}, got {json.dumps(item)}")
    return out


def _entry_problems(item: dict, formats: Sequence[str]) -> List[str]:
    out = []
    extra = sorted(set(item) - {"path", "format"})
    if extra:
        out.append(f"unknown keys {extra} (use \"path\" and \"format\")")
    if not isinstance(item.get("path"), str):
        out.append(f"\"path\" must be a string (a file, glob or folder), got {json.dumps(item.get('path'))}")
    fmt = item.get("format", "auto")
    if fmt != "auto" and fmt not in formats:
        out.append(f"format {json.dumps(fmt)}: use one of {', '.join(formats)} (or \"auto\")")
    return out


def expand_sources(data_paths: PathsArg) -> Tuple[List[Source], List[Problem]]:
    """Data paths -> sources (unique, in order; a folder's and a glob's files sorted) + problems."""
    items = [data_paths] if isinstance(data_paths, (str, os.PathLike, dict)) else list(data_paths)
    sources, problems, seen = [], [], set()
    for item in items:
        fmt = None
        if isinstance(item, dict):
            bad = _entry_problems(item, FORMATS)
            if bad:
                problems.append(Problem(json.dumps(item, ensure_ascii=False), "; ".join(bad), reason="bad_path"))
                continue
            fmt = None if item.get("format", "auto") == "auto" else item["format"]
            item = item["path"]
        item = os.fspath(item)
        found, problem = _expand_one(item)
        if problem is not None:
            problems.append(problem)
        for path in found:
            if path not in seen:
                seen.add(path)
                sources.append(_source(path, fmt))
    return sources, problems


def _expand_one(item: str) -> Tuple[List[str], Optional[Problem]]:
    if glob.has_magic(item):
        found = sorted(glob.glob(item, recursive=True))
    elif os.path.isdir(item):
        if os.path.isfile(os.path.join(item, "dataset_dict.json")):
            splits = sorted(d for d in os.listdir(item) if is_saved_dataset(os.path.join(item, d)))
            return [], Problem(item, "a DatasetDict folder (DatasetDict.save_to_disk): give one split's folder, e.g. "
                               f"{os.path.join(item, splits[0] if splits else 'train')} (splits here: "
                               f"{', '.join(splits) or 'none'})", reason="missing_file")
        found = [item] if is_saved_dataset(item) else sorted(
            p for ext in EXTENSIONS for p in glob.glob(os.path.join(item, "*" + ext)))
    else:
        found = [item] if os.path.exists(item) else []
    if not found:
        return [], Problem(item, "no such file (or the glob/folder matched no .json, .jsonl or .parquet file and no "
                           "save_to_disk folder)", reason="missing_file")
    return found, None


def _source(path: str, fmt: Optional[str]) -> Source:
    if os.path.isdir(path):
        if not is_saved_dataset(path):
            return Source(path, fmt, "unsupported", ())
        files = sorted(os.path.join(path, n) for n in os.listdir(path) if os.path.isfile(os.path.join(path, n)))
        return Source(path, fmt, ARROW_DIR, tuple(files))
    ext = os.path.splitext(path)[1]
    return Source(path, fmt, ext[1:] if ext in EXTENSIONS else "unsupported", (path,))


def expand_paths(data_paths: PathsArg) -> Tuple[List[str], List[Problem]]:
    """Data paths -> every data file (a save_to_disk folder's files) and the problems of expanding them."""
    sources, problems = expand_sources(data_paths)
    return [f for s in sources for f in s.files], problems


def read_source(src: Source) -> Iterator[Raw]:
    """Yield (record_index, line, object, problem) per record of ``src``; file-level problems have index
    None and may come after records (a bad byte found mid-way through a .jsonl file ends it)."""
    reader = {"json": _read_json, "jsonl": _read_jsonl, "parquet": _read_parquet, ARROW_DIR: _read_arrow_dir}.get(src.kind)
    if reader is None:
        what = "folder is not a save_to_disk dataset" if os.path.isdir(src.path) else "unsupported file extension"
        yield None, None, None, Problem(src.path, f"{what}; use .json (a list of records), .jsonl (one record per "
                                        "line), .parquet or a folder written by datasets' save_to_disk",
                                        reason="bad_extension")
        return
    yield from reader(src.path)


def _not_utf8(path: str, raw: bytes, e: UnicodeDecodeError, offset: int = 0) -> Problem:
    line = raw[:e.start].count(b"\n") + 1
    return Problem(path, f"file is not UTF-8 (bad byte 0x{raw[e.start]:02x} at byte {offset + e.start}); re-save it "
                   "as UTF-8", line=line, reason="not_utf8")


def _read_json(path: str) -> Iterator[Raw]:
    with open(path, "rb") as fh:
        raw = fh.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        yield None, None, None, _not_utf8(path, raw, e)
        return
    if not text.strip():
        yield None, None, None, Problem(path, "file is empty", reason="empty_file")
        return
    try:
        top = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and text.lstrip().startswith("{"):  # JSON lines in a .json file
            yield from _lines(path, text.split("\n"))
            return
        yield None, None, None, Problem(path, f"invalid JSON: {e.msg} (column {e.colno}); no record of this file was "
                                        "read", line=e.lineno, reason="invalid_json")
        return
    if not isinstance(top, list):
        hint = " (wrap the records in [...], or write one record per line in a .jsonl file)"
        yield None, None, None, Problem(path, f"top level is a JSON {json_type(top)}, expected a list of records{hint}",
                                        reason="not_a_list")
        return
    if not top:
        yield None, None, None, Problem(path, "file has no records (empty list)", reason="empty_file")
    for index, obj in enumerate(top):
        yield index, None, obj, None


def _read_jsonl(path: str) -> Iterator[Raw]:
    def lines():
        offset = 0
        with open(path, "rb") as fh:
            for n, raw in enumerate(fh):
                try:
                    yield raw.decode("utf-8-sig" if n == 0 else "utf-8")
                except UnicodeDecodeError as e:
                    bad = _not_utf8(path, raw, e, offset)
                    yield dataclasses.replace(bad, line=n + 1)
                    return
                offset += len(raw)

    yield from _lines(path, lines())


def _lines(path: str, lines) -> Iterator[Raw]:
    index = 0
    for lineno, line in enumerate(lines, start=1):
        if isinstance(line, Problem):
            yield None, None, None, line
            return
        if not line.strip():
            continue
        try:
            yield index, lineno, json.loads(line), None
        except json.JSONDecodeError as e:
            yield index, lineno, None, Problem(path, f"invalid JSON: {e.msg} (column {e.colno})", record=index,
                                               line=lineno, reason="invalid_json")
        index += 1
    if index == 0:
        yield None, None, None, Problem(path, "file has no records", reason="empty_file")


def _missing(path: str, module: str, e: ImportError) -> Raw:
    return None, None, None, Problem(path, f"reading this file needs the {module!r} package ({e}): {INSTALL_HINT}",
                                     reason="missing_dependency")


def _read_parquet(path: str) -> Iterator[Raw]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        yield _missing(path, "pyarrow", e)
        return
    try:
        pf = pq.ParquetFile(path)
        batches = pf.iter_batches(batch_size=BATCH_ROWS)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError for files that are not parquet
        yield None, None, None, Problem(path, f"cannot read this parquet file: {e}", reason="bad_file")
        return
    yield from _rows(path, (b.to_pylist() for b in batches))


def _read_arrow_dir(path: str) -> Iterator[Raw]:
    try:
        import datasets
    except ImportError as e:
        yield _missing(path, "datasets", e)
        return
    try:
        ds = datasets.load_from_disk(path)
    except Exception as e:  # datasets raises FileNotFoundError/ValueError/ArrowInvalid on a damaged folder
        yield None, None, None, Problem(path, f"cannot read this save_to_disk folder: {e}", reason="bad_file")
        return
    if not isinstance(ds, datasets.Dataset):
        yield None, None, None, Problem(path, f"holds a {type(ds).__name__}, expected one Dataset: give one split's "
                                        "folder", reason="bad_file")
        return
    arrow = ds.with_format("arrow")
    yield from _rows(path, (arrow[i:i + BATCH_ROWS].to_pylist() for i in range(0, len(arrow), BATCH_ROWS)))


def _rows(path: str, batches) -> Iterator[Raw]:
    index = 0
    for rows in batches:
        for row in rows:
            yield index, None, drop_nulls(row), None
            index += 1
    if index == 0:
        yield None, None, None, Problem(path, "file has no records (no rows)", reason="empty_file")


def drop_nulls(value: Any) -> Any:
    """A columnar row with its null values removed, in nested objects too (null = absent key)."""
    if isinstance(value, dict):
        return {k: drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [drop_nulls(v) for v in value]
    return value
