"""Pipeline-parallel training on DeepSpeed.

  deepspeed train_ds.py --config configs/ds_config_pp.json                       # one node
  deepspeed --hostfile ./hostfile train_ds.py --config configs/ds_config_pp.json  # several nodes

The config holds DeepSpeed's keys and pipetune's project keys (trainer/config.py documents them).
"""
import argparse
import os
import sys


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="training config JSON (DeepSpeed keys + project keys)")
    parser.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)), help="set by the launcher")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    """Every rank: start (trainer.launch), run the recipe of the config's "stage", exit status 0/1/2."""
    args = parse_args(argv)
    from trainer import launch
    from trainer.recipes import load_config

    def train(cfg, where: launch.Rank) -> int:
        status, summary = launch.run_recipe(cfg, where)
        if status == 0 and where.rank == 0:
            print(f"done: {summary['step']} steps, final loss {summary['history'][-1][1]:.4f}; checkpoints in {cfg.save_path}")
        return status

    return launch.launch(lambda world_size, fp16: load_config(args.config, world_size=world_size, device_supports_fp16=fp16),
                         lambda cfg: cfg.warnings, train)


if __name__ == "__main__":
    sys.exit(main())
