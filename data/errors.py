"""Validation problems and the exception that carries them.

A ``Problem`` is one bad record (or one bad file) and formats as one line:

    data/x.jsonl: record 3 (line 4): field 'rounds[1][0]': unknown role 'user'; use 'ask' or 'ans'

``record`` is the 0-based index of the record in its file (array index for ``.json``, index among
non-blank lines for ``.jsonl``); ``line`` is 1-based and given for JSONL records and JSON syntax errors.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence


@dataclasses.dataclass(frozen=True)
class Problem:
    file: str
    message: str  # what is wrong, and where possible how to fix it
    record: Optional[int] = None  # 0-based record index; None for file-level problems
    line: Optional[int] = None  # 1-based line number when known
    field: Optional[str] = None  # e.g. "rounds[2][1]"
    reason: str = "invalid"  # short key used to count drops in skip mode

    def __str__(self) -> str:
        where = [self.file]
        if self.record is not None:
            where.append(f"record {self.record}" + (f" (line {self.line})" if self.line else ""))
        elif self.line is not None:
            where.append(f"line {self.line}")
        if self.field:
            where.append(f"field '{self.field}'")
        return ": ".join(where + [self.message])


class DataError(Exception):
    """Raised in strict mode; ``lines`` holds one human-readable line per problem."""

    def __init__(self, problems: Sequence[Problem], header: str = "invalid data"):
        self.problems = list(problems)
        self.lines = [str(p) for p in self.problems]
        n = len(self.lines)
        super().__init__(f"{header}: {n} problem{'s' if n != 1 else ''}\n" + "\n".join(self.lines))


class DataMessage(DataError):
    """A data problem that is one message, not a list of bad records. A ``DataError``, so every caller
    that reports data errors without a traceback reports this one too; ``lines`` holds the one message
    and ``problems`` is empty."""

    def __init__(self, message: str):
        Exception.__init__(self, message)
        self.problems, self.lines = [], [message]


class TokenizerError(DataMessage):
    """The tokenizer cannot serve this data build (e.g. no safe pad token)."""


class NoSamplesError(DataMessage, ValueError):
    """No sample of the kind asked for is left to train on (every record unused, invalid and skipped, or
    dropped): the message says what was used, unused and dropped, and what to change."""
