"""Run under `deepspeed --num_gpus 2`: several training configs one after another in one launch
(launching ranks costs ~10 s each time). Writes one JSON line per config to --out (rank 0), as each
run ends: {"config", "history", "evals", "step", "tags" (the global_stepN folders left in save_path)}.
--kill-last-at-step N: SIGKILL the ranks during the save of step N of the last config
(trainer.engine.checkpoint's test hook, set only for it); the lines of the configs before it are written.
"""
import argparse
import json
import os
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", action="append", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--kill-last-at-step", type=int)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from deepspeed.accelerator import get_accelerator

    from trainer.engine.checkpoint import KILL_DURING_SAVE_ENV
    from trainer.engine.distributed import finish, world
    from trainer.engine.topology import Topology
    from trainer.recipes import get_recipe, load_config

    rank, world_size, _ = world()
    from trainer.engine.distributed import init_process_group

    init_process_group("gloo")
    if rank == 0:
        Path(args.out).write_text("")
    for i, path in enumerate(args.config):
        if args.kill_last_at_step is not None and i == len(args.config) - 1:
            os.environ[KILL_DURING_SAVE_ENV] = str(args.kill_last_at_step)
        cfg = load_config(path, world_size=world_size, device_supports_fp16=get_accelerator().is_fp16_supported())
        summary = get_recipe(cfg.stage)(cfg, Topology.from_config(cfg, rank, world_size), "cpu")
        torch.distributed.barrier()
        save = Path(cfg.save_path)  # the checkpoints left after this run (pruning), in step order
        tags = sorted((p.name for p in save.glob("global_step*")), key=lambda n: int(n[len("global_step"):]))
        if rank == 0:
            with open(args.out, "a") as f:
                f.write(json.dumps({"config": path, **summary, "tags": tags}) + "\n")
        torch.distributed.barrier()
    finish()


if __name__ == "__main__":
    main()
