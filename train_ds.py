"""Pipeline-parallel training on DeepSpeed.

  deepspeed train_ds.py --config configs/ds_config_pp.json                       # one node
  deepspeed --hostfile ./hostfile train_ds.py --config configs/ds_config_pp.json  # several nodes

The config holds DeepSpeed's keys and pipetune's project keys (trainer/config.py documents them).
"""
import argparse
import logging
import os
import sys


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="training config JSON (DeepSpeed keys + project keys)")
    parser.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)), help="set by the launcher")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from trainer.config import ConfigError
    from trainer.recipes import load_config
    from trainer.engine.distributed import deepspeed_safe_cuda_arch_list, finish, report_crash, world

    rank, world_size, _ = world()
    try:
        from deepspeed.accelerator import get_accelerator

        accel = get_accelerator()
        cfg = load_config(args.config, world_size=world_size, device_supports_fp16=accel.is_fp16_supported())
    except ConfigError as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2

    if rank == 0:
        for warning in cfg.warnings:
            logging.getLogger("pipetune").warning(warning)
    fixed = deepspeed_safe_cuda_arch_list()
    if fixed and rank == 0:
        logging.getLogger("pipetune").info("TORCH_CUDA_ARCH_LIST -> %r for DeepSpeed's op builder", fixed)
    import torch

    from data.errors import DataError, TokenizerError

    if accel.device_name() == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from trainer.engine.distributed import init_process_group

    init_process_group(accel.communication_backend_name())
    device_name = torch.cuda.get_device_name() if accel.device_name() == "cuda" else accel.device_name()
    from models.pipe_dir import CheckpointError
    from trainer.engine.guards import NonFiniteError
    from trainer.engine.preflight import PreflightError
    from trainer.engine.topology import Topology
    from trainer.recipes import get_recipe

    try:
        summary = get_recipe(cfg.stage)(cfg, Topology.from_config(cfg, rank, world_size), device_name)
    except (NonFiniteError, PreflightError, CheckpointError) as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 1
    except TokenizerError as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except DataError as e:
        if rank == 0:
            print("error: the training data has problems (fix them or set \"skip_bad_records\": true):", file=sys.stderr)
            print("\n".join(e.lines), file=sys.stderr)
        return 2
    except BaseException as e:  # noqa: BLE001 - logged with the rank, then re-raised through the exit code
        report_crash(rank, e)
        return 1
    if rank == 0:
        print(f"done: {summary['step']} steps, final loss {summary['history'][-1][1]:.4f}; checkpoints in {cfg.save_path}")
    finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
