"""Content hashes: ``file_sha256(path)``, the one file-hash helper (data cache keys, the trainer's
preflight check that every node sees the same files). Reads in 1 MiB chunks, so memory stays flat
for large files; works on Python 3.10 (``hashlib.file_digest`` needs 3.11)."""
from __future__ import annotations

import hashlib
import os
from typing import Union

CHUNK = 1 << 20


def file_sha256(path: Union[str, os.PathLike]) -> str:
    """Hex SHA-256 of the file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()
