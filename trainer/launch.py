"""One rank's life, shared by train_ds.py (one recipe) and rlhf.py (a chain of recipes, trainer/chain.py):
start the rank, run a recipe on it, turn the recipe's errors into the process's exit status.

    start   logging, the accelerator, the config (ConfigError: printed by rank 0, exit status 2), its
            warnings (rank 0), DeepSpeed's CUDA arch list, torch threads on CPU, the process group,
            the device's name
    body    what the entry point does with the loaded config (exit status); 0 ends the process group
            cleanly (engine.distributed.finish)

run_recipe maps a recipe's errors to exit statuses, each printed by rank 0 as one message, no traceback:

    NonFiniteError, PreflightError, CheckpointError   1   (a run that went wrong, a bad checkpoint/resume)
    RewardError                                       1   (a PPO or GRPO reward function failed: every rank stops)
    DataMessage (tokenizer, no samples), DataError    2   (the user's data or tokenizer)
    anything else                                     1   the traceback, logged with its rank (report_crash)
"""
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

logger = logging.getLogger("pipetune")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@dataclass(frozen=True)
class Rank:
    """Where this process runs: its global rank, the world size and the device's name (the memory
    model and the MFU figure read it)."""
    rank: int
    world_size: int
    device_name: str


def launch(load: Callable[[int, bool], Any], warnings: Callable[[Any], list[str]],
           body: Callable[[Any, Rank], int]) -> int:
    """Every rank: start, then `body(loaded, rank)`; returns the exit status.

    load(world_size, device_supports_fp16) reads and validates the config (a ConfigError is printed by
    rank 0: exit status 2); warnings(loaded) are the lines rank 0 logs before the start; body's status
    0 ends the process group cleanly, any other is returned as it is (the ranks are stopping)."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    from trainer.config import ConfigError
    from trainer.engine.distributed import deepspeed_safe_cuda_arch_list, finish, init_process_group, world

    rank, world_size, _ = world()
    try:
        from deepspeed.accelerator import get_accelerator

        accel = get_accelerator()
        loaded = load(world_size, accel.is_fp16_supported())
    except ConfigError as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    if rank == 0:
        for warning in warnings(loaded):
            logger.warning(warning)
    fixed = deepspeed_safe_cuda_arch_list()
    if fixed and rank == 0:
        logger.info("TORCH_CUDA_ARCH_LIST -> %r for DeepSpeed's op builder", fixed)
    import torch

    if accel.device_name() == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    init_process_group(accel.communication_backend_name())
    device_name = torch.cuda.get_device_name() if accel.device_name() == "cuda" else accel.device_name()
    status = body(loaded, Rank(rank, world_size, device_name))
    if status == 0:
        finish()
    return status


# Problems of a data file as a whole, which skip_bad_records (it drops bad records) does not answer.
FILE_PROBLEMS = ("missing_file", "bad_path", "bad_extension", "missing_dependency", "not_utf8", "empty_file")


def run_recipe(cfg, where: Rank, step: Optional[str] = None) -> tuple[int, Optional[dict]]:
    """Collective: the recipe of cfg.stage on every rank. (0, its summary), or (exit status, None)
    with the error printed by rank 0 (the module docstring's table); `step` names the chain's step in
    the message ("error: [rm] ...")."""
    from data.errors import DataError, DataMessage
    from models.pipe_dir import CheckpointError
    from trainer.engine.distributed import report_crash
    from trainer.engine.guards import NonFiniteError
    from trainer.engine.preflight import PreflightError
    from trainer.engine.topology import Topology
    from trainer.recipes import get_recipe
    from trainer.rl.rewards import RewardError

    tag = f"[{step}] " if step else ""
    try:
        return 0, get_recipe(cfg.stage)(cfg, Topology.from_config(cfg, where.rank, where.world_size), where.device_name)
    except (NonFiniteError, PreflightError, CheckpointError, RewardError) as e:
        status, lines = 1, [f"error: {tag}{e}"]
    except DataMessage as e:  # the tokenizer, or no samples left: one message
        status, lines = 2, [f"error: {tag}{e}"]
    except DataError as e:
        where_to_set = " in the section" if step else ""
        skip_hint = (f" (fix them or set \"skip_bad_records\": true{where_to_set})"
                     if not e.problems or any(p.reason not in FILE_PROBLEMS for p in e.problems) else "")
        status, lines = 2, [f"error: {tag}the training data has problems{skip_hint}:", *e.lines]
    except BaseException as e:  # noqa: BLE001 - logged with the rank, then re-raised through the exit code
        report_crash(where.rank, e)
        return 1, None
    if where.rank == 0:
        print("\n".join(lines), file=sys.stderr)
    return status, None
