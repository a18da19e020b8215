"""A checkpoint save that runs out of disk stops every rank with one line, and leaves `latest` on the
last complete checkpoint with the partial one removed (its files would hold the space the rerun needs).

`CheckpointWrite(save_path, tag, companions)` follows one save (trainer.engine.checkpoint.save):
- `check_room()`: collective, before writing: the free space against the size of the checkpoint
  `latest` names (the new one will be about as large, and the old ones are pruned only after it is
  complete); too little is a DiskFullError on every rank before anything is written.
- `agree(failures, work)`: collective, where the save had a barrier: `work` runs on this rank unless
  its writes already failed; a full disk on any rank becomes the one DiskFullError line on every rank
  (other failures keep their kind, see `trainer.files.raise_on_every_rank`), and the partial
  checkpoint folders are removed.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, Optional

from trainer.files import DiskFullError, disk_full_message, free_bytes, is_disk_full, raise_on_every_rank, tree_size


class CheckpointWrite:
    def __init__(self, save_path: str, tag: str, companions: list[str]):
        self.save_path = Path(save_path)
        self.tag = tag
        self.folders = [self.save_path] + [self.save_path / name for name in companions]
        self.previous = self._latest(self.save_path)
        self.previous_size = 0 if self.previous in (None, tag) else sum(tree_size(f / self.previous) for f in self.folders)

    @staticmethod
    def _latest(folder: Path) -> Optional[str]:
        latest = folder / "latest"
        return latest.read_text().strip() if latest.is_file() else None

    def check_room(self) -> None:
        error = None
        if self.previous_size and free_bytes(self.save_path) < self.previous_size:
            error = DiskFullError(self._message("not saved:"))
        raise_on_every_rank(error)

    def agree(self, failures: list, work: Optional[Callable] = None) -> None:
        """failures: [(path, exception)] this rank's writes met so far (compat.checkpoint_files' recorder)."""
        error = None
        if not failures and work is not None:
            try:
                work()
            except Exception as e:  # noqa: BLE001 - turned into one line for every rank below
                failures = [(getattr(e, "filename", None) or str(self.save_path / self.tag), e)]
        if failures:
            path, error = failures[0]
            if is_disk_full(error, self.save_path, self.previous_size):
                error = DiskFullError(self._message("the partial checkpoint was removed;", path))
        try:
            raise_on_every_rank(error)
        except Exception:
            self.remove_partial()
            raise

    def _message(self, what_happened: str, failed_path: Optional[str] = None) -> str:
        if self.previous_size:
            needed, how = self.previous_size, f", the size of {self.previous}"
        else:
            needed = sum(tree_size(f / self.tag) for f in self.folders)
            how = ": what it wrote before the disk filled, and more"
        if self.previous:
            after = (f"{what_happened} {self.save_path / 'latest'} still names {self.previous}: free space and rerun "
                     f"to resume from it")
        else:
            after = f"{what_happened} no checkpoint is complete yet: free space and rerun (it starts over)"
        where = f" (writing {failed_path})" if failed_path else ""
        return disk_full_message(f"saving checkpoint {self.tag}{where} to", self.save_path, needed, how, after)

    def remove_partial(self) -> None:
        """This node's first rank removes the new tag's folders that no `latest` names."""
        if int(os.environ.get("LOCAL_RANK", 0)) != 0:
            return
        for folder in self.folders:
            if self._latest(folder) != self.tag:
                shutil.rmtree(folder / self.tag, ignore_errors=True)

