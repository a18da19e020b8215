"""trainer/engine/checkpoint.py without ranks: what pruning keeps, RNG state, durable writes, resume errors.
The collective paths (save, resume, node-local save_paths) run in tests/test_train_multirank.py and
tests/test_multinode.py."""
import json
import os
import random

import numpy as np
import pytest
import torch

from models.pipe_dir import CheckpointError
from trainer.engine import checkpoint


def make_tags(root, steps):
    for s in steps:
        (root / f"global_step{s}").mkdir(parents=True)
        (root / f"global_step{s}" / "layer_00-model_states.pt").write_bytes(b"x")


def tags(root):
    return sorted((p.name for p in root.glob("global_step*")), key=lambda n: int(n[len("global_step"):]))


def test_keep_last_by_save_order_not_step_number():
    # A run that resumed from step 3 of a lineage 1..5 and saved 4 again: step 5 is stale.
    lineage = ["global_step1", "global_step2", "global_step3", "global_step4"]
    assert checkpoint.tags_to_keep(lineage, 2, "global_step3") == {"global_step3", "global_step4"}
    assert checkpoint.tags_to_keep(lineage, 1, "global_step3") == {"global_step3", "global_step4"}
    assert checkpoint.tags_to_keep(lineage, 3, None) == {"global_step2", "global_step3", "global_step4"}


def test_prune_removes_stale_and_old_tags_keeps_others(tmp_path):
    """Issue 11.8: resume global_step2 of a run that had saved 2, 4, 6, continue with saves at 3 and 5:
    keep_last 2 by step number would delete the new 3 and keep the stale 6; by save order it keeps
    3, 5 (the last two of this lineage) and 2 (resumed from), and removes the stale 4 and 6."""
    make_tags(tmp_path, [2, 3, 4, 5, 6])
    (tmp_path / "latest").write_text("global_step5")
    keep = checkpoint.tags_to_keep(["global_step2", "global_step3", "global_step5"], 2, "global_step2")
    removed = checkpoint.prune(str(tmp_path), keep)
    assert removed == ["global_step4", "global_step6"]
    assert tags(tmp_path) == ["global_step2", "global_step3", "global_step5"]
    assert (tmp_path / "latest").read_text() == "global_step5"  # other files untouched


def test_rng_state_round_trip_includes_activation_checkpointing_tracker():
    from deepspeed.runtime.activation_checkpointing.checkpointing import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    tracker.reset()
    tracker.add("model-parallel-rng", 1234)
    try:
        torch.manual_seed(0), np.random.seed(0), random.seed(0)
        state = checkpoint.rng_state()
        assert "deepspeed_checkpointing" in state and "model-parallel-rng" in state["deepspeed_checkpointing"]
        expected = (torch.rand(3), np.random.rand(3), random.random(), tracker.get_states()["model-parallel-rng"].clone())
        with tracker.fork("model-parallel-rng"):
            torch.rand(5)  # advances the tracker's stream
        torch.rand(3), np.random.rand(3), random.random()
        assert not torch.equal(tracker.get_states()["model-parallel-rng"], expected[3])
        checkpoint.set_rng_state(state)
        assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])
        assert random.random() == expected[2]
        assert torch.equal(tracker.get_states()["model-parallel-rng"], expected[3])
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            assert len(state["cuda"]) == torch.cuda.device_count()
    finally:
        tracker.reset()


def test_atomic_writes_leave_no_temporary_files_and_fsync_tree_runs(tmp_path):
    checkpoint._write_json_atomic(tmp_path / "trainer_state.json", {"step": 3})
    checkpoint._write_text_atomic(tmp_path / "latest", "global_step3")
    assert json.loads((tmp_path / "trainer_state.json").read_text()) == {"step": 3}
    assert sorted(os.listdir(tmp_path)) == ["latest", "trainer_state.json"]
    make_tags(tmp_path, [3])
    checkpoint.fsync_tree(tmp_path / "global_step3")  # files and folders; raises if any cannot be opened


def test_find_resume_tag(tmp_path):
    assert checkpoint.find_resume_tag(str(tmp_path), "never") is None
    assert checkpoint.find_resume_tag(str(tmp_path), "auto") is None
    make_tags(tmp_path, [4])
    (tmp_path / "latest").write_text("global_step4\n")
    assert checkpoint.find_resume_tag(str(tmp_path), "auto") == (str(tmp_path), "global_step4")
    assert checkpoint.find_resume_tag("elsewhere", str(tmp_path / "global_step4")) == (str(tmp_path), "global_step4")
    with pytest.raises(CheckpointError, match=r"resume: .*missing is neither a save_path with a 'latest' file nor a global_stepN"):
        checkpoint.find_resume_tag("elsewhere", str(tmp_path / "missing"))
