"""Validation: every bad-input case gets one precise line; skip mode counts by reason."""
import json

import pytest
from data_fixtures import MIXED, write_json, write_jsonl

from data.errors import DataError, Problem
from data.records import load_records

GOOD = {"type": "instruct", "instruct": "Say hi.", "output": "Hi."}


def problems_of(tmp_path, records, name="d.json"):
    path = write_json(tmp_path / name, records)
    res = load_records(path)
    return path, res, [str(p) for p in res.problems]


def test_samples_are_valid():
    res = load_records(MIXED)
    assert res.problems == []
    types = {r.type for r in res.records}
    assert types == {"pretrain", "instruct", "conversation", "ref_qa", "pairwise", "prompt"}
    assert len(res.records) == len(json.load(open(MIXED, encoding="utf-8")))


@pytest.mark.parametrize("record, field, words, reason", [
    ([1, 2], None, "record is a JSON list, expected an object", "not_an_object"),
    ({"text": "x"}, "type", "missing; use one of pretrain", "missing_type"),
    ({"type": 3, "text": "x"}, "type", "must be a string, got a JSON number", "bad_type"),
    ({"type": "chat", "text": "x"}, "type", "unknown type 'chat'; use one of", "unknown_type"),
    ({"type": "pretrain"}, "text", "missing (required for type 'pretrain')", "missing_field"),
    ({"type": "instruct", "instruct": "a"}, "output", "missing (required", "missing_field"),
    ({"type": "instruct", "instruct": "a", "input": 5, "output": "b"}, "input", "must be a string, got a JSON number",
     "bad_value"),
    ({"type": "instruct", "instruct": "a", "input": "", "output": "b"}, "input", "is empty; omit the key instead",
     "empty_text"),
    ({"type": "instruct", "instruct": "a", "output": "  "}, "output", "is empty", "empty_text"),
    ({"type": "instruct", "instruct": "a", "inputs": "x", "output": "b"}, "inputs", "unknown field for type",
     "unknown_field"),
    ({"type": "conversation", "rounds": "hi"}, "rounds", "must be a list of [role, text] pairs, got a JSON string",
     "bad_value"),
    ({"type": "conversation", "rounds": [["ask", "q"], ["ans"]]}, "rounds[1]", "must be a [role, text] pair",
     "bad_value"),
    ({"type": "conversation", "rounds": [["user", "q"], ["ans", "a"]]}, "rounds[0][0]",
     "unknown role 'user'; use 'ask' or 'ans'", "unknown_role"),
    ({"type": "conversation", "rounds": [["ask", "q"], ["ans", ""]]}, "rounds[1][1]", "is empty", "empty_text"),
    ({"type": "conversation", "rounds": [["ask", "q"], ["ask", "q2"]]}, "rounds", "has no answer", "no_answer"),
    ({"type": "conversation", "rounds": []}, "rounds", "is empty", "empty_text"),
    ({"type": "ref_qa", "rounds": [["ask", "q"], ["ans", "a"]]}, "reference", "missing", "missing_field"),
    ({"type": "pairwise", "prompt": "p", "chosen": "c"}, "rejected", "missing", "missing_field"),
    ({"type": "pairwise", "prompt": "p", "rounds": [["ask", "q"]], "chosen": "c", "rejected": "r"}, "prompt",
     "give exactly one of 'prompt'", "bad_value"),
    ({"type": "prompt"}, "prompt", "give exactly one of 'prompt'", "missing_field"),
    ({"type": "prompt", "prompt": ["x"]}, "prompt", "must be a string, got a JSON list", "bad_value"),
])
def test_bad_record_line(tmp_path, record, field, words, reason):
    path, res, lines = problems_of(tmp_path, [GOOD, record, GOOD])
    assert len(res.records) == 2 and len(lines) == 1
    prefix = f"{path}: record 1: " + (f"field '{field}': " if field else "")
    assert lines[0].startswith(prefix), lines[0]
    assert words in lines[0]
    assert res.problems[0].reason == reason


def test_every_bad_record_is_reported(tmp_path):
    recs = [GOOD, {"type": "pretrain"}, GOOD, {"type": "x"}, {"type": "instruct", "instruct": 1, "output": ""}]
    _, res, lines = problems_of(tmp_path, recs)
    assert [(p.record, p.field) for p in res.problems] == [(1, "text"), (3, "type"), (4, "instruct"), (4, "output")]
    assert len(res.records) == 2


def test_jsonl_syntax_error_names_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, "", '{"type": "pretrain", "text": }', GOOD, "[1]"])
    res = load_records(path)
    lines = [str(p) for p in res.problems]
    # blank line 2 is skipped; the bad line is record 1 on line 3
    assert lines[0].startswith(f"{path}: record 1 (line 3): invalid JSON: Expecting value (column 30)")
    assert lines[1] == f"{path}: record 3 (line 5): record is a JSON list, expected an object"
    assert [r.line for r in res.records] == [1, 4]


def test_json_syntax_error_names_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n {"type": "pretrain", "text": "a"},\n {"type": "pretrain" "text": "b"}\n]\n')
    res = load_records(str(path))
    assert res.records == []
    assert str(res.problems[0]).startswith(f"{path}: line 3: invalid JSON: Expecting ',' delimiter (column 22)")


@pytest.mark.parametrize("content, words, reason", [
    (b"", "file is empty", "empty_file"),
    (b"[]", "file has no records (empty list)", "empty_file"),
    (b'{"type": "pretrain", "text": "a"}', "top level is a JSON object, expected a list of records", "not_a_list"),
    (b'[{"type": "pretrain", "text": "caf\xe9"}]', "file is not UTF-8 (bad byte 0xe9 at byte 34)", "not_utf8"),
])
def test_bad_files(tmp_path, content, words, reason):
    path = tmp_path / "d.json"
    path.write_bytes(content)
    res = load_records(str(path))
    assert res.records == [] and len(res.problems) == 1
    assert str(res.problems[0]).startswith(f"{path}: ") and words in str(res.problems[0])
    assert res.problems[0].reason == reason


def test_empty_jsonl_and_bad_extension_and_missing(tmp_path):
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n\n")
    txt = tmp_path / "d.txt"
    txt.write_text("[]")
    res = load_records([str(empty), str(txt), str(tmp_path / "nope.json"), str(tmp_path / "*.parquet")])
    msgs = [str(p) for p in res.problems]
    assert msgs[0].startswith(f"{tmp_path}/nope.json: no such file")
    assert msgs[1].startswith(f"{tmp_path}/*.parquet: no such file")
    assert msgs[2] == f"{empty}: file has no records"
    assert msgs[3].startswith(f"{txt}: unsupported file extension")


def test_glob_list_and_directory(tmp_path):
    a = write_json(tmp_path / "a.json", [GOOD])
    b = write_jsonl(tmp_path / "b.jsonl", [GOOD, GOOD])
    assert len(load_records(str(tmp_path / "*.json*")).records) == 3
    assert len(load_records([a, b]).records) == 3
    assert len(load_records(str(tmp_path)).records) == 3
    assert [f for f, _ in load_records([b, a, a]).files] == [b, a]  # order kept, duplicates removed


def test_data_error_carries_lines():
    probs = [Problem("f.json", "is empty", record=2, field="output"), Problem("g.jsonl", "bad", record=0, line=1)]
    err = DataError(probs)
    assert err.lines == ["f.json: record 2: field 'output': is empty", "g.jsonl: record 0 (line 1): bad"]
    assert "2 problems" in str(err)
