"""Files pipetune writes and reads: one atomic write, weights read without unpickling, and a full
disk reported as one line.

- `write_atomic` (and its text/JSON/torch forms): temporary file named per host and process (nodes
  that share a folder may write the same file at once), fsync of the file, os.replace, fsync of the
  folder so that the rename itself is durable. A failed write leaves the old file and no temporary.
- `load_tensors`: torch.load(weights_only=True). A file that needs more than tensors and plain
  containers to load (a pickle of any other object can run code when unpickled) is a `FileRefused`
  naming the file and the object it asked for.
- `DiskFullError`: a save or an export that ran out of space, or that the free space cannot hold
  (checked before writing), in one line: where, how much is free, how much it needs, and what is left.
- `raise_on_every_rank`, `on_every_rank`: collective. A file problem found on one rank (its own stage's layer file,
  its own RNG file, its own write) stops every rank with the same one line, instead of a hang of
  the others on the next collective.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
from pathlib import Path
from typing import Callable, Optional, Union

from models.pipe_dir import CheckpointError

# Test hooks (tests/test_files.py, tests/multirank/files_runs.py): a save or export whose path contains
# the value fails with ENOSPC after writing half the file; the free space is reported as this many bytes.
ENOSPC_AT_ENV = "PIPETUNE_TEST_ENOSPC_AT"
FREE_BYTES_ENV = "PIPETUNE_TEST_FREE_BYTES"


class FileRefused(CheckpointError):
    """A weights or state file that is not plain tensors: refused unread (one error line)."""


class DiskFullError(CheckpointError):
    """A save or export that does not fit on its device (one error line)."""


# ---------------------------------------------------------------------------------------------
# Writing

def write_atomic(path: Union[str, Path], data: Union[str, bytes, Callable]) -> Path:
    """Write `data` (str, bytes, or a function that writes into a binary file object) to `path`
    whole or not at all: temporary file, fsync, os.replace, fsync of the folder."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
    return path


def write_text_atomic(path: Union[str, Path], text: str) -> Path:
    return write_atomic(path, text)


def write_json_atomic(path: Union[str, Path], data) -> Path:
    return write_atomic(path, json.dumps(data, indent=1) + "\n")


def save_torch_atomic(obj, path: Union[str, Path]) -> Path:
    """torch.save(obj) through `write_atomic` (obj: tensors and plain containers, so that
    `load_tensors` reads it back)."""
    import torch

    return write_atomic(path, lambda f: torch.save(obj, f))


def fsync_tree(folder: Union[str, Path]) -> Path:
    """Flush every file under `folder`, and the folders, to stable storage: DeepSpeed's torch.save
    and the exports' writers do not fsync, so without this a machine crash after `latest` moved (or
    an export was renamed into place) could leave it naming files still only in the page cache."""
    folder = Path(folder)
    for path in sorted(folder.rglob("*")) + [folder]:
        fsync_path(path)
    return folder


def fsync_path(path: Union[str, Path]) -> None:
    path = Path(path)
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Reading weights without unpickling

def load_tensors(path: Union[str, Path], map_location="cpu", mmap: bool = False):
    """torch.load(path, weights_only=True): tensors, numbers, strings and plain containers only.
    A file that asks for anything else is refused before any of it runs (FileRefused)."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location=map_location, mmap=mmap, weights_only=True)
    except pickle.UnpicklingError as e:
        raise refused(path, e) from None


def refused(path, error: Exception) -> FileRefused:
    """The one line for a file torch's weights-only unpickler would not load."""
    text = str(error)
    wanted = re.search(r"GLOBAL ([\w.]+)", text)
    what = f"it asks to unpickle {wanted.group(1)}" if wanted else f"it is not plain tensors ({_first_line(text)})"
    return FileRefused(f"{path}: refused to load: {what}, and unpickling a file from elsewhere can run code. "
                       "pipetune reads weights as plain tensors only (torch.load weights_only=True); rewrite the file "
                       "from a source you trust (e.g. convert_model.py hg_to_pp from a safetensors folder)")


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("Weights only load failed")]
    return (lines[0] if lines else text.strip())[:200]


# ---------------------------------------------------------------------------------------------
# Free space and a full disk

def free_bytes(path: Union[str, Path]) -> int:
    """Free bytes on the device that holds `path` (its nearest existing folder)."""
    if os.environ.get(FREE_BYTES_ENV):
        return int(os.environ[FREE_BYTES_ENV])
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def tree_size(path: Union[str, Path]) -> int:
    """Bytes of the files under `path` (0 when it does not exist)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def is_disk_full(error: BaseException, where: Union[str, Path], needed: int = 0) -> bool:
    """True for ENOSPC/EDQUOT, and for torch's own write errors ("unexpected pos ... vs ...",
    "iostream error", "file write failed": its zip writer drops the errno) while `where` has less room
    left than `needed` (at least 1 MB)."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error)
    if "No space left on device" in text or "Disk quota exceeded" in text:
        return True
    torch_write = isinstance(error, RuntimeError) and any(
        s in text for s in ("unexpected pos", "iostream error", "file write failed", "PytorchStreamWriter"))
    return torch_write and free_bytes(where) < max(needed, 1 << 20)


def disk_full_message(what: str, where: Union[str, Path], needed: int, needed_how: str, after: str) -> str:
    """`what` at `where`: no space left on device (free, needed); `after`: what is left and what to do."""
    return (f"{what} {where}: no space left on device ({human(free_bytes(where))} free, it needs about "
            f"{human(needed)}{needed_how}); {after}")


def check_export_room(dest: Union[str, Path], needed: int) -> None:
    """An export (pp_to_hg) of `needed` bytes that the free space next to `dest` cannot hold: one line."""
    if free_bytes(Path(dest).parent) < needed:
        raise export_disk_full(dest, needed, written=False)


def export_disk_full(dest: Union[str, Path], needed: int, written: bool = True) -> DiskFullError:
    after = ("the partial export was removed" if written else "nothing was written") + f"; {dest} is unchanged"
    return DiskFullError(disk_full_message("exporting to", dest, needed, ", the size of the weights", after))


def inject_enospc(path: Union[str, Path], write: Callable[[], None]) -> None:
    """Test hook: write, then (when PIPETUNE_TEST_ENOSPC_AT is part of `path`) cut the file to half
    its size and fail as a full disk does."""
    write()
    marker = os.environ.get(ENOSPC_AT_ENV)
    if marker and marker in str(path):
        size = Path(path).stat().st_size
        os.truncate(path, size // 2)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


# ---------------------------------------------------------------------------------------------
# Every rank stops with the same line

def raise_on_every_rank(error: Optional[Exception]) -> None:
    """Collective (a plain call without a process group): every rank passes the error it met (or
    None); when any rank met one, every rank raises the lowest such rank's as a CheckpointError of the
    same class, so the entry points print its one line and exit. The rank that met it re-raises its
    own exception (unexpected kinds keep their traceback there)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        if error is not None:
            raise error
        return
    mine = None if error is None else (type(error).__name__, str(error), isinstance(error, CheckpointError))
    seen = [None] * dist.get_world_size()
    dist.all_gather_object(seen, mine)
    failed = [(rank, e) for rank, e in enumerate(seen) if e is not None]
    if not failed:
        return
    if error is not None:
        raise error
    rank, (kind, message, user_facing) = failed[0]
    cls = {c.__name__: c for c in (FileRefused, DiskFullError)}.get(kind, CheckpointError)
    raise cls(message if user_facing else f"rank {rank} failed: {kind}: {_first_line(message)}")


def on_every_rank(work: Callable, *args):
    """Collective: work(*args) on this rank; an exception on any rank is raised on every rank (the
    message of the lowest rank that met one), instead of leaving the others in the next collective."""
    error = result = None
    try:
        result = work(*args)
    except Exception as e:  # noqa: BLE001 - raised again below, on every rank
        error = e
    raise_on_every_rank(error)
    return result
