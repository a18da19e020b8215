"""Small torch.distributed helpers used by the recipes (DeepSpeed initialises the process group)."""
import os
import sys
import traceback

import torch


def world() -> tuple[int, int, int]:
    """(global rank, world size, local rank) from the launcher's environment."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def collective_device() -> torch.device:
    """Where tensors for collectives must live: NCCL reduces only CUDA tensors, gloo CPU ones."""
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s Python object on every rank."""
    buf = [obj]
    torch.distributed.broadcast_object_list(buf, src=src)
    return buf[0]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of `tensor` over every rank, returned on the CPU."""
    reduced = tensor.to(collective_device())
    torch.distributed.all_reduce(reduced)
    return reduced.cpu()


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


def deepspeed_safe_cuda_arch_list(environ=os.environ):
    """DeepSpeed 0.19's JIT op builder (`compute_capability_args`) parses each TORCH_CUDA_ARCH_LIST
    entry with int(), so an arch suffix such as "9.0a" (set by some CUDA images for Hopper) aborts the
    first op build (FusedAdam) with a ValueError. Drop the suffixes for this process and its ranks;
    returns the new value when it changed, else None."""
    value = environ.get("TORCH_CUDA_ARCH_LIST")
    if not value:
        return None
    parts = value.replace(";", " ").split()

    def plain(entry: str) -> str:
        ptx = entry.endswith("+PTX")
        arch = entry[:-4] if ptx else entry
        arch = arch.rstrip("abf") if arch[:1].isdigit() else arch
        return arch + ("+PTX" if ptx else "")

    fixed = " ".join(plain(p) for p in parts)
    if fixed == " ".join(parts):
        return None
    environ["TORCH_CUDA_ARCH_LIST"] = fixed
    return fixed


def init_process_group(backend: str) -> None:
    """deepspeed.init_distributed, leaving nothing behind in /dev/shm (see
    compat.private_api.release_shm_allreduce_names)."""
    import deepspeed

    from compat.private_api import release_shm_allreduce_names

    deepspeed.init_distributed(dist_backend=backend)
    release_shm_allreduce_names()
