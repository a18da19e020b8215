"""The unified record schema's names, shared by ``data.sources``, ``data.formats`` and ``data.records``
(which import it and not each other in a circle).

- ``RECORD_TYPES``  the unified record types (``data.records`` validates them; docs/data_format.md).
                    The order is each type's code in built datasets (``data.dataset``): append only.
- ``ROLES``         the roles of a record's ``rounds``: "ask" (user) and "ans" (assistant); a prompt
                    record's rounds may also start with one "system" round (``SYSTEM_ROLE``)
- ``IGNORED_KEYS``  keys any record may carry besides its type's fields (not trained on)
- ``FORMATS``       the record formats a data file may hold (``data.formats``; stated per data path,
                    ``{"path": ..., "format": ...}``, or detected)
- ``json_type``     a value's JSON type name, for messages ("got a JSON list")
"""
from __future__ import annotations

from typing import Any

RECORD_TYPES = ("pretrain", "instruct", "conversation", "ref_qa", "pairwise", "prompt", "ranked")
ROLES = ("ask", "ans")
SYSTEM_ROLE = "system"
IGNORED_KEYS = ("id", "meta")
FORMATS = ("pipetune", "messages", "sharegpt", "alpaca", "preference", "completion", "qa")


def json_type(v: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(v), type(v).__name__)
