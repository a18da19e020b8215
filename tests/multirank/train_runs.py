"""Run under `deepspeed --num_gpus 2`: several training configs one after another in one launch
(launching ranks costs ~10 s each time). Writes one JSON line per config to --out (rank 0):
{"config", "history", "evals", "step", "tags" (the global_stepN folders left in save_path)}.
"""
import argparse
import json
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", action="append", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from deepspeed.accelerator import get_accelerator

    from trainer.engine.distributed import finish, world
    from trainer.engine.topology import Topology
    from trainer.recipes import get_recipe, load_config

    rank, world_size, _ = world()
    from trainer.engine.distributed import init_process_group

    init_process_group("gloo")
    results = []
    for path in args.config:
        cfg = load_config(path, world_size=world_size, device_supports_fp16=get_accelerator().is_fp16_supported())
        summary = get_recipe(cfg.stage)(cfg, Topology.from_config(cfg, rank, world_size), "cpu")
        torch.distributed.barrier()
        save = Path(cfg.save_path)  # the checkpoints left after this run (pruning), in step order
        tags = sorted((p.name for p in save.glob("global_step*")), key=lambda n: int(n[len("global_step"):]))
        results.append({"config": path, **summary, "tags": tags})
        torch.distributed.barrier()
    if rank == 0:
        with open(args.out, "w") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
    finish()


if __name__ == "__main__":
    main()
