"""Run under `deepspeed --num_gpus 2`: several RLHF chains (rlhf.py configs) one after another in one
launch, with pipetune's INFO log lines on stderr. --kill-last-at-step N: SIGKILL the process during
the save of step N of a recipe of the last chain (trainer.engine.checkpoint's test hook, set only for it).
"""
import argparse
import logging
import os
import sys


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", action="append", required=True)
    parser.add_argument("--kill-last-at-step", type=int)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import torch

    from trainer import chain
    from trainer.engine.checkpoint import KILL_DURING_SAVE_ENV
    from trainer.engine.distributed import finish, world

    torch.set_num_threads(1)
    rank, world_size, _ = world()
    from trainer.engine.distributed import init_process_group

    init_process_group("gloo")
    for i, path in enumerate(args.config):
        if args.kill_last_at_step is not None and i == len(args.config) - 1:
            os.environ[KILL_DURING_SAVE_ENV] = str(args.kill_last_at_step)
        status = chain.run_chain(chain.load_steps(path, world_size), rank, world_size, "cpu")
        if status:
            return status
    finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
