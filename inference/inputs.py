"""Inputs -> `Item`s: the chat messages the model sees, and what to write back with its reply.

An input is a JSON string (one user message), `{"prompt": ...}`, `{"rounds": [["ask", ...], ...]}`,
or a training record with "type" (instruct, conversation, ref_qa, pairwise, prompt). Records are
validated by `data.records.validate_record` (same messages as for training data, naming file, record
and line) and turned into messages by `data.templates.record_messages` (the training format). Answers
after the last question are not shown to the model: they come back as the item's `reference`.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

from inference.errors import InferenceError

PLACEHOLDER = "-"  # the answer filled in, for validation only, where an inference input has none


@dataclasses.dataclass
class Item:
    messages: list[dict]  # what the model sees (ends with a user message)
    prompt: str  # the last user message
    where: str  # "file: line N" for messages
    id: object = None
    reference: Optional[str] = None  # answers the input carried after its last question


def message_item(text: str, where: str) -> Item:
    """One user message (a --prompt, or a JSON string line)."""
    return Item([{"role": "user", "content": text}], text, where)


def item_from_json(obj, file: str, index: int, line: Optional[int] = None) -> Item:
    """A JSON value -> Item: a string, {"prompt"}, {"rounds"} (type "prompt"), or a typed record."""
    from data.errors import Problem

    where = str(Problem(file, "", record=index, line=line)).rstrip(": ")
    if isinstance(obj, str):
        if not obj.strip():
            raise InferenceError(f"{where}: empty prompt")
        return message_item(obj, where)
    messages = record_messages(obj, file, index, line, where)
    answers = []
    while messages and messages[-1]["role"] == "assistant":
        answers.insert(0, messages.pop()["content"])
    if not messages or messages[-1]["role"] != "user":
        raise InferenceError(f"{where}: nothing to answer: the input has no question (\"ask\" turn) before its answers")
    return Item(messages, messages[-1]["content"], where, id=obj.get("id"),
                reference="\n\n".join(answers) if answers else None)


def record_messages(obj, file: str, index: int, line: Optional[int], where: str) -> list[dict]:
    """A record object (type "prompt" when it has none) -> its chat messages, as training renders it.

    Training records must carry an answer (an instruct "output", an "ans" turn); an inference input
    need not. Where it has none, a placeholder answer is added for validation and removed after."""
    from data.records import validate_record
    from data.templates import record_messages as messages_of

    placeholder = False
    if isinstance(obj, dict):
        obj = {"type": "prompt", **obj}
        if obj["type"] == "instruct" and "output" not in obj:
            obj["output"], placeholder = PLACEHOLDER, True
        if obj["type"] in ("conversation", "ref_qa") and isinstance(obj.get("rounds"), list) \
                and not any(isinstance(t, list) and t[:1] == ["ans"] for t in obj["rounds"]):
            obj["rounds"], placeholder = obj["rounds"] + [["ans", PLACEHOLDER]], True
        if obj["type"] == "pretrain":
            raise InferenceError(f"{where}: a pretrain record has no chat form; give the text as {{\"prompt\": ...}}")
    record, problems = validate_record(obj, file, index, line)
    if problems:
        more = f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})" if len(problems) > 1 else ""
        raise InferenceError(str(problems[0]) + more)
    messages = messages_of(record.type, record.fields)
    return messages[:-1] if placeholder else messages  # a placeholder is always the last message


def read_prompts_file(path: str) -> list[Item]:
    """Every input of a JSONL file (blank lines skipped); the first bad line is an InferenceError."""
    from data.errors import Problem

    p = Path(path)
    if not p.is_file():
        raise InferenceError(f"--prompts-file {path}: no such file")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise InferenceError(f"--prompts-file {path}: not UTF-8 ({e.reason} at byte {e.start})") from None
    items, index = [], 0
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InferenceError(str(Problem(path, f"invalid JSON: {e.msg} (column {e.colno}); each line must be one JSON "
                                                   "value (a string or a record object)", record=index, line=lineno))) from None
        items.append(item_from_json(obj, path, index, lineno))
        index += 1
    if not items:
        raise InferenceError(f"--prompts-file {path}: no inputs (one JSON value per line)")
    return items


def parse_record_arg(text: str) -> Item:
    """The --record option: one input as JSON."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise InferenceError(f"--record: invalid JSON: {e.msg} (column {e.colno})") from None
    return item_from_json(obj, "--record", 0)
