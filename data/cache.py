"""On-disk cache of built datasets: one builder per node, everyone else reuses the file.

The key hashes everything the result depends on (``cache_key``): the data files' content hashes, the
tokenizer (``tokenizer_fingerprint``: its full vocab/merges/normalizer JSON, special tokens and BOS
behaviour), max_seq_len, packing, overflow/strict policy, pad token, split settings,
``TEMPLATE_VERSION`` and the data-building code itself (``data_code_version``: a hash of the source of
the ``data/`` modules, so editing how records are rendered, tokenized, cut or packed rebuilds caches).

``load_or_build`` takes an exclusive ``fcntl.flock`` on ``<key>.lock`` in the cache directory: the first
process (on a node-local cache dir: the first per node; on a shared file system with working locks:
the first overall) builds and writes ``<key>.pt`` atomically (temporary file + ``os.replace``); the
others block on the lock, then load the finished file. A crashed builder releases its lock (the OS
drops flocks of dead processes) and never leaves a partial ``.pt``.
"""
from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import torch

log = logging.getLogger(__name__)
CACHE_FORMAT = 1


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (/proc/self/status), else
    by setting and restoring it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def readable_as_umask(path: str | os.PathLike, directory: bool = False) -> None:
    """Give a file made by tempfile.mkstemp (0600) or a folder made by mkdtemp (0700) the mode an
    ordinary open()/mkdir gives (0644 / 0755 under umask 022), as HF's tools leave their files: an
    export or a cache is then readable by a serving container or a teammate running as another user."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of what decides the tokenizer's output: its serialized model, special tokens, BOS use."""
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # slow tokenizer: the vocab is what we can see
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    h.update(json.dumps(tokenizer("Hello 你好")["input_ids"]).encode())  # catches add_bos/eos settings
    return h.hexdigest()


# data/ modules that do not decide a built dataset's content (the CLI, the sampler over built datasets, the
# Datasets and collates that read a built payload).
NOT_IN_CODE_VERSION = ("inspect.py", "sampler.py", "batching.py")


@functools.lru_cache(maxsize=None)
def data_code_version(folder: Optional[str] = None) -> str:
    """Hash of the source of the data-building modules (every ``*.py`` of ``folder``, default this
    package, except ``NOT_IN_CODE_VERSION``): part of the cache key, computed on first use."""
    root = Path(folder) if folder is not None else Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.glob("*.py")):
        if path.name not in NOT_IN_CODE_VERSION:
            h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def cache_key(parts: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def load_or_build(cache_dir: str, key: str, build: Callable[[], Dict[str, Any]]) -> Tuple[Dict[str, Any], bool]:
    """Return (payload, was_cached). ``build`` returns a dict of tensors and plain Python values."""
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, f"{key}.pt")
    fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # blocks while another process builds this key
        if os.path.exists(path):
            payload = torch.load(path, weights_only=True)
            if payload.get("format") == CACHE_FORMAT:
                log.info("dataset cache hit: %s", path)
                return payload, True
        log.info("building dataset cache %s (LOCAL_RANK=%s)", path, os.environ.get("LOCAL_RANK", "unset"))
        payload = dict(build(), format=CACHE_FORMAT)
        from trainer.files import save_torch_atomic

        save_torch_atomic(payload, path)
        return payload, False
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
