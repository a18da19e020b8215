"""Small torch.distributed helpers used by the recipes (DeepSpeed initialises the process group)."""
import os
import sys
import traceback

import torch


def world() -> tuple[int, int, int]:
    """(global rank, world size, local rank) from the launcher's environment."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s Python object on every rank."""
    buf = [obj]
    torch.distributed.broadcast_object_list(buf, src=src)
    return buf[0]


def finish() -> None:
    """Every rank ends here: without the barrier and destroy_process_group a 2-stage run sometimes
    aborts at exit ("terminate called without an active exception")."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def report_crash(rank: int, exc: BaseException) -> None:
    """Log the real error on the rank where it happened: its peers only see gloo/NCCL's
    "Connection closed by peer"."""
    sys.stderr.write(f"[rank {rank}] training failed: {type(exc).__name__}: {exc}\n")
    traceback.print_exc(file=sys.stderr)
    sys.stderr.flush()
