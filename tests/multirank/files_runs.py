"""Run under `deepspeed --num_gpus 2`: the file scenarios of tests/test_files.py one after another in
one launch (launching ranks costs ~10 s each time), each through its real entry point's main()
(train_ds.main, demo.main) in this process, with sys.stderr captured per scenario on every rank.

--plan: a JSON list of steps, in order:
  {"name", "main": "train_ds" | "demo", "argv": [...], "env": {...}}   run main(argv) with env set
  {"name", "do": "copy", "src", "dst"}                                  rank 0 copies a folder
  {"name", "do": "plant", "src", "dst", "remove": [...]}                rank 0 copies the file src to dst and
                                                                         removes the files listed
  {"name", "do": "legacy_rng", "tag_dir"}                               rank 0 rewrites every rank's RNG
                                                                         files of tag_dir as the old pickled .pt
Writes --out.rank<R>.json: [{"name", "status", "stderr", "seconds"}, ...]. train_ds.main's final barrier +
destroy_process_group runs once, at the end.
"""
import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch


def rank0_action(step: dict) -> None:
    if step["do"] == "copy":
        shutil.copytree(step["src"], step["dst"])
    elif step["do"] == "plant":
        shutil.copy(step["src"], step["dst"])
        for path in step.get("remove", []):
            Path(path).unlink()
    elif step["do"] == "legacy_rng":
        from trainer.engine.rng_files import load_rng_state, rng_files

        for json_path in sorted(Path(step["tag_dir"]).glob("rng_rank_*.json")):
            rank = int(json_path.stem[len("rng_rank_"):])
            state = load_rng_state(step["tag_dir"], rank)
            tensors, meta, legacy = rng_files(step["tag_dir"], rank)
            torch.save(state, legacy)  # what checkpoints written before the change hold
            tensors.unlink()
            meta.unlink()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--plan", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

    import logging

    import demo
    import train_ds

    # Logs go to the real stderr (train_ds.main's own basicConfig is then a no-op): the captured
    # stderr of a scenario holds only what its entry point prints.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import trainer.engine.distributed as distributed

    real_finish = distributed.finish
    distributed.finish = lambda: None  # train_ds.main ends with it: once, at the very end here
    rank = int(os.environ["RANK"])
    results = []
    for step in json.loads(Path(args.plan).read_text()):
        if "do" in step:
            if rank == 0:
                rank0_action(step)
            torch.distributed.barrier()
            continue
        saved_env = {k: os.environ.get(k) for k in step.get("env", {})}
        os.environ.update(step.get("env", {}))
        err = io.StringIO()
        start = time.perf_counter()
        with contextlib.redirect_stderr(err):
            entry = train_ds.main if step["main"] == "train_ds" else lambda argv: demo.main(argv, stdout=io.StringIO(), stderr=err)
            status = entry(step["argv"])
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        results.append({"name": step["name"], "status": status, "stderr": err.getvalue(),
                        "seconds": round(time.perf_counter() - start, 1)})
        torch.distributed.barrier()
    Path(f"{args.out}.rank{rank}.json").write_text(json.dumps(results, indent=1))
    real_finish()


if __name__ == "__main__":
    main()
