"""Run under `deepspeed --num_gpus 2`: tests/multirank/train_runs.py (several configs in one launch),
with pipetune's INFO log lines on stderr, so that tests can see which path a run took (e.g. where
the DPO reference log-probs came from)."""
import logging
import runpy
from pathlib import Path

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    runpy.run_path(str(Path(__file__).with_name("train_runs.py")), run_name="__main__")
