"""Output folders are written whole or not at all: into a temporary sibling, renamed at the end."""
import shutil
import tempfile
from pathlib import Path

from data.cache import readable_as_umask

from .errors import ConversionError


def temp_dir_beside(dest: Path) -> Path:
    """mkdtemp's folder (0700), given the mode the umask gives a new folder: the renamed result is
    readable by others as HF's save_pretrained folders are (0755 under umask 022)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    readable_as_umask(tmp, directory=True)
    return tmp


def check_dest(dest: Path, overwrite: bool) -> None:
    if dest.exists() and not dest.is_dir():
        raise ConversionError(f"--save-path {dest} exists and is not a directory")
    if dest.is_dir() and any(dest.iterdir()) and not overwrite:
        raise ConversionError(f"--save-path {dest} is not empty: choose another folder or pass --overwrite")
    dest.parent.mkdir(parents=True, exist_ok=True)


def replace_dir(tmp: Path, dest: Path) -> None:
    """Move the finished temporary folder into place; an old `dest` is removed only now."""
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        dest.rename(old)
        tmp.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(dest)
