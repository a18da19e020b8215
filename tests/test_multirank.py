"""Real 2-rank launches (`deepspeed --num_gpus 2` on CPU/gloo). Grouped into one launch: starting
ranks costs ~10 s each time (and ~90 s once, to build DeepSpeed's shm op)."""
import json

import pytest
from conftest import REPO, launch_ranks

from convert.hg_to_pp import hg_to_pp

pytestmark = pytest.mark.multirank


def deepspeed_launch(script, *args, timeout=900):
    return launch_ranks(script, *args, timeout=timeout)


def test_two_stage_pipeline_loads_shards_strictly_and_matches_hf_loss(tiny_hf, tmp_path):
    cases = []
    for model_type, tied, parts in [("llama", False, "3,4"), ("llama", True, "2,5"), ("bloom", None, "4,3")]:
        src = tiny_hf(model_type, tied)
        pp = hg_to_pp(src, tmp_path / f"pp-{model_type}-{tied}", progress=False)
        cases += ["--case", f"{src}:{pp}:{parts}"]
    out = tmp_path / "parity.jsonl"
    deepspeed_launch(REPO / "tests" / "multirank" / "pipe_parity.py", *cases, "--out", str(out))
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(results) == 3
    for r, first_stage_layers in zip(results, ([0, 3], [0, 2], [0, 4])):
        assert abs(r["pipe_loss"] - r["hf_loss"]) <= 1e-6, r
        assert 6.0 < r["hf_loss"] < 7.5  # ~ln(1024) for random weights: the batch really ran
        assert r["stage_layers"] == first_stage_layers  # rank 0 holds exactly parts[0] layers
