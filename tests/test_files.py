"""Files from others and a full disk (issue 24): weights are read without unpickling (a planted pickle
with a side effect is refused in one line naming the file, and its side effect never happens), RNG
state is tensors + JSON (old pickled RNG files still resume), and a save or export that runs out of
disk is one line with `latest` kept and the partial checkpoint removed; the rerun resumes exactly.

The multi-rank scenarios run in one launch (tests/multirank/files_runs.py): each through train_ds.main
or demo.main, a refused file on one stage's rank only (the last layer), so the other rank must not
hang on a collective.
"""
import errno
import io
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, launch_ranks
from convert.hg_to_pp import hg_to_pp
from ppo_fixtures import marker_reward_hf
from trainer.engine import checkpoint
from trainer.files import (ENOSPC_AT_ENV, FREE_BYTES_ENV, DiskFullError, FileRefused, is_disk_full, load_tensors, write_atomic,
                           write_json_atomic)
from trainer.engine.checkpoint_write import CheckpointWrite
from trainer.engine.rng_files import load_rng_state, rng_files, save_rng_state

DATA = str(REPO / "data" / "samples" / "mixed.json")
PREFS = str(REPO / "data" / "samples" / "preferences.jsonl")
ADAMW = {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}}


class _SideEffect:
    """Unpickling it runs `touch marker` (what a crafted layer file could do, and worse)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant_pickle(path: Path, marker: Path) -> Path:
    """Overwrite `path` with a torch.save file that writes `marker` when unpickled."""
    torch.save({"weight": torch.zeros(2), "payload": _SideEffect(marker)}, path)
    return path


# ---------------------------------------------------------------------------------------------
# Single process

def test_load_tensors_refuses_a_pickle_in_one_line_and_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    path = plant_pickle(tmp_path / "layer_00-model_states.pt", marker)
    with pytest.raises(FileRefused) as info:
        load_tensors(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "posix.system" in message and "refused" in message
    assert not marker.exists()
    torch.save({"w": torch.ones(3)}, tmp_path / "plain.pt")
    assert torch.equal(load_tensors(tmp_path / "plain.pt")["w"], torch.ones(3))


def test_pp_to_hg_and_demo_refuse_a_planted_layer_file(tiny_hf, tmp_path):
    import demo
    from convert.pp_to_hg import pp_to_hg

    pp = hg_to_pp(tiny_hf("llama", False), tmp_path / "pp", progress=False)
    marker = tmp_path / "ran"
    bad = plant_pickle(pp / "layer_03-model_states.pt", marker)
    with pytest.raises(FileRefused, match="refused to load") as info:
        pp_to_hg(pp, tmp_path / "hf", progress=False)
    assert str(bad) in str(info.value) and not (tmp_path / "hf").exists()
    err = io.StringIO()  # demo.py on a pipeline checkpoint (one process: pp_to_hg's reader)
    assert demo.main(["--model-path", str(pp), "--prompt", "hi", "--max-new-tokens", "2"], stdout=io.StringIO(), stderr=err) == 2
    lines = err.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(bad) in lines[0] and "refused to load" in lines[0]
    assert not marker.exists()


def test_rng_state_is_tensors_and_json_and_round_trips(tmp_path):
    torch.manual_seed(3), np.random.seed(4), random.seed(5)
    state = checkpoint.rng_state()
    save_rng_state(state, tmp_path, 1)
    tensors, meta, legacy = rng_files(tmp_path, 1)
    assert tensors.is_file() and meta.is_file() and not legacy.exists()
    assert json.loads(meta.read_text())["format"] == 1
    expected = (torch.rand(3), np.random.rand(3), random.random())
    checkpoint.set_rng_state(load_rng_state(tmp_path, 1))
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]
    assert load_rng_state(tmp_path, 0) is None  # no RNG files for that rank: nothing restored


def test_old_pickled_rng_file_resumes_and_a_planted_one_is_refused(tmp_path, caplog):
    state = checkpoint.rng_state()
    torch.save(state, tmp_path / "rng_rank_0000.pt")  # the format before tensors + JSON
    expected = (torch.rand(3), np.random.rand(3), random.random())
    with caplog.at_level("WARNING", logger="pipetune"):
        checkpoint.set_rng_state(load_rng_state(tmp_path, 0))
    assert "pickled format" in caplog.text
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]
    marker = tmp_path / "ran"
    bad = plant_pickle(tmp_path / "rng_rank_0001.pt", marker)
    with pytest.raises(FileRefused, match="refused to load"):
        load_rng_state(tmp_path, 1)
    assert not marker.exists() and bad.exists()


def test_atomic_write_failure_keeps_the_old_file_and_no_temporary(tmp_path):
    path = write_json_atomic(tmp_path / "latest.json", {"tag": "global_step2"})

    def full(f):
        f.write(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OSError):
        write_atomic(path, full)
    assert json.loads(path.read_text()) == {"tag": "global_step2"} and [p.name for p in tmp_path.iterdir()] == ["latest.json"]


def fake_checkpoint(save: Path, tag: str, size: int) -> None:
    (save / tag).mkdir(parents=True)
    (save / tag / "layer_00-model_states.pt").write_bytes(b"x" * size)
    (save / "latest").write_text(tag)


def test_full_disk_before_and_during_a_save_is_one_line_latest_kept(tmp_path, monkeypatch):
    save = tmp_path / "save"
    fake_checkpoint(save, "global_step2", 3_800_000)
    monkeypatch.setenv(FREE_BYTES_ENV, "1400000")
    writes = CheckpointWrite(str(save), "global_step4", [])
    with pytest.raises(DiskFullError) as info:
        writes.check_room()
    message = str(info.value)
    assert "\n" not in message and str(save) in message and "no space left on device" in message
    assert "1.4 MB free" in message and "3.8 MB" in message and "still names global_step2" in message and "rerun" in message
    # During: DeepSpeed wrote part of global_step4, then a write failed (ENOSPC, or torch's errno-less
    # writer error while the device is full).
    (save / "global_step4").mkdir()
    (save / "global_step4" / "layer_00-model_states.pt").write_bytes(b"x" * 1000)
    for error in (OSError(errno.ENOSPC, "No space left on device"), RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 6080 vs 5972")):
        with pytest.raises(DiskFullError, match="the partial checkpoint was removed; .* still names global_step2"):
            CheckpointWrite(str(save), "global_step4", []).agree([(str(save / "global_step4" / "x.pt"), error)])
        assert not (save / "global_step4").exists() and (save / "latest").read_text() == "global_step2"
        (save / "global_step4").mkdir()
    monkeypatch.setenv(FREE_BYTES_ENV, str(10**12))  # plenty of room: torch's writer error is not a full disk
    assert not is_disk_full(RuntimeError("unexpected pos 6080 vs 5972"), save, 3_800_000)
    with pytest.raises(RuntimeError):
        CheckpointWrite(str(save), "global_step4", []).agree([(str(save / "x"), RuntimeError("unexpected pos 1 vs 2"))])


def test_save_writes_are_recorded_not_raised_and_engines_restored():
    """A failed write inside DeepSpeed's save (its checkpoint_engine) or inside another saver (the
    actor's EMA) is recorded and the rank's later writes are skipped, so every rank reaches the
    end of the save; the engines get their own writers back."""
    from compat.checkpoint_files import recording_save_errors

    written = []

    class Writer:
        def save(self, state_dict, path):
            if path.endswith("b.pt"):
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 6080 vs 5972")
            written.append(path)

    class Engine:  # DeepSpeed's engine: writes through .checkpoint_engine
        def __init__(self):
            self.checkpoint_engine = Writer()

        def save_checkpoint(self, save_dir, tag, save_latest=False):
            for name in ("a.pt", "b.pt", "c.pt"):
                self.checkpoint_engine.save(state_dict={}, path=f"{save_dir}/{tag}/{name}")

    class EMA:  # no checkpoint_engine: its own save_checkpoint
        def save_checkpoint(self, save_dir, tag, save_latest=False):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"{save_dir}/{tag}/layer_00-model_states.pt")

    engine, ema = Engine(), EMA()
    writer = engine.checkpoint_engine
    with recording_save_errors(engine) as failures:
        engine.save_checkpoint("/s", tag="global_step4")
    assert written == ["/s/global_step4/a.pt"] and [p for p, _ in failures] == ["/s/global_step4/b.pt"]
    assert engine.checkpoint_engine is writer
    with recording_save_errors(ema) as failures:
        ema.save_checkpoint("/s/ema", tag="global_step4", save_latest=False)
    assert [p for p, _ in failures] == ["/s/ema/global_step4/layer_00-model_states.pt"] and "save_checkpoint" not in vars(ema)


def test_exports_that_do_not_fit_are_one_line_and_write_nothing(tiny_hf, tmp_path, monkeypatch):
    from convert.pp_to_hg import pp_to_hg

    pp = hg_to_pp(tiny_hf("llama", False), tmp_path / "pp", progress=False)
    monkeypatch.setenv(FREE_BYTES_ENV, "1000")
    with pytest.raises(DiskFullError, match="exporting to .*: no space left on device .*nothing was written"):
        pp_to_hg(pp, tmp_path / "hf", progress=False)
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf.tmp-*"))
    with pytest.raises(DiskFullError, match="exporting to .*pp2: no space left on device"):
        hg_to_pp(tiny_hf("llama", False), tmp_path / "pp2", progress=False)
    assert not (tmp_path / "pp2").exists() and not list(tmp_path.glob(".pp2.tmp-*"))


# ---------------------------------------------------------------------------------------------
# One 2-rank launch

def sft_config(tmp: Path, name: str, model_path: Path, **over) -> Path:
    cfg = {"model_path": str(model_path), "save_path": str(tmp / name), "data_path": DATA, "max_seq_len": 64,
           "train_steps": 6, "save_interval": 2, "seed": 7, "resume": "never", "keep_last": 3,
           "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [2, 1]}, "parts": [2, 5]},
           "train_batch_size": 4, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
           "steps_per_print": 10**6, "optimizer": ADAMW}
    cfg.update(over)
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(cfg, indent=1))
    return path


@pytest.fixture(scope="module")
def launched(tiny_hf, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("files")
    pp = hg_to_pp(tiny_hf("llama", False), tmp / "pp", progress=False)
    evil = tmp / "evil_pp"  # the last layer (stage 1's rank only) is a pickle with a side effect
    shutil.copytree(pp, evil)
    plant_pickle(evil / "layer_06-model_states.pt", tmp / "marker_layer")
    evil_rng = plant_pickle(tmp / "evil_rng.pt", tmp / "marker_rng")
    reward = hg_to_pp(marker_reward_hf(tiny_hf("llama", False), tmp / "reward_hf", marker=5, pad_id=0), tmp / "reward",
                      progress=False)
    ppo = {"stage": "ppo", "actor_path": str(pp), "critic_path": str(reward), "ref_path": str(evil), "save_path": str(tmp / "ppo"),
           "data_path": PREFS, "max_seq_len": 64, "train_steps": 1, "train_batch_size": 4, "train_micro_batch_size_per_gpu": 2,
           "resume": "never", "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [2, 1]}, "parts": [3, 4]},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-5}}, "ppo": {"max_new_tokens": 4}}
    (tmp / "ppo.json").write_text(json.dumps(ppo))
    full = sft_config(tmp, "full", pp)
    resume = json.loads(full.read_text())
    (tmp / "full_resume.json").write_text(json.dumps({**resume, "resume": "auto"}))
    rng_copy = json.loads(full.read_text())
    (tmp / "rng_resume.json").write_text(json.dumps({**rng_copy, "save_path": str(tmp / "rng"), "resume": "auto"}))
    train = lambda name, config, **env: {"name": name, "main": "train_ds", "argv": ["--config", str(config)], "env": env}  # noqa: E731
    plan = [
        train("reference", sft_config(tmp, "reference", pp)),
        train("model_path", sft_config(tmp, "model_path", evil)),
        train("ppo_reference", tmp / "ppo.json"),
        {"name": "demo", "main": "demo", "argv": ["--model-path", str(evil), "--pipeline-stages", "2", "--prompt", "hi",
                                                   "--max-new-tokens", "2"], "env": {}},
        # global_step4's last layer file (stage 1) fails half-written: ENOSPC on one rank
        train("enospc", full, **{ENOSPC_AT_ENV: "global_step4/layer_06"}),
        {"name": "copy", "do": "copy", "src": str(tmp / "full"), "dst": str(tmp / "rng")},
        # rank 1's RNG state of the resumed checkpoint replaced by an (old-format) pickle with a side effect
        {"name": "plant", "do": "plant", "src": str(evil_rng), "dst": str(tmp / "rng" / "global_step2" / "rng_rank_0001.pt"),
         "remove": [str(tmp / "rng" / "global_step2" / f"rng_rank_0001.{ext}") for ext in ("json", "safetensors")]},
        train("rng", tmp / "rng_resume.json"),
        # resumed from global_step2, the save at step 4 cannot fit (checked before writing)
        train("no_room", tmp / "full_resume.json", **{FREE_BYTES_ENV: "1000"}),
        {"name": "legacy", "do": "legacy_rng", "tag_dir": str(tmp / "full" / "global_step2")},
        train("rerun", tmp / "full_resume.json"),
    ]
    (tmp / "plan.json").write_text(json.dumps(plan, indent=1))
    out = tmp / "results"
    proc = launch_ranks(REPO / "tests" / "multirank" / "files_runs.py", "--plan", tmp / "plan.json", "--out", out)
    ranks = [{r["name"]: r for r in json.loads(Path(f"{out}.rank{rank}.json").read_text())} for rank in range(2)]
    return tmp, ranks, proc.stdout + proc.stderr


def one_error_line(ranks, name, status=1) -> str:
    """Every rank stopped with `status`; rank 0 printed exactly one error line and no traceback, the others nothing."""
    assert [r[name]["status"] for r in ranks] == [status, status], [r[name] for r in ranks]
    text = ranks[0][name]["stderr"]  # besides the error: the progress bar, DeepSpeed's prints while building
    lines = re.findall(r"error: [^\r\n]*", text)
    assert len(lines) == 1 and "Traceback" not in text, text
    assert ranks[1][name]["stderr"] == "", ranks[1][name]["stderr"]
    return lines[0]


@pytest.mark.multirank
def test_planted_pickles_are_refused_on_every_rank_in_one_line(launched):
    tmp, ranks, output = launched
    bad_layer = str(tmp / "evil_pp" / "layer_06-model_states.pt")
    for name, status in (("model_path", 1), ("ppo_reference", 1), ("demo", 2)):
        line = one_error_line(ranks, name, status)
        assert bad_layer in line and "refused to load" in line and "posix.system" in line, (name, line)
    line = one_error_line(ranks, "rng")
    assert str(tmp / "rng" / "global_step2" / "rng_rank_0001.pt") in line and "refused to load" in line, line
    assert not (tmp / "marker_layer").exists() and not (tmp / "marker_rng").exists()
    assert "Traceback" not in output


@pytest.mark.multirank
def test_full_disk_is_one_line_latest_kept_and_the_rerun_resumes_exactly(launched):
    tmp, ranks, output = launched
    save = tmp / "full"
    line = one_error_line(ranks, "enospc")
    assert f"saving checkpoint global_step4 (writing {save / 'global_step4' / 'layer_06-model_states.pt'}) to {save}" in line
    assert "no space left on device" in line and "free, it needs about" in line and "the size of global_step2" in line
    assert f"{save / 'latest'} still names global_step2: free space and rerun to resume from it" in line
    line = one_error_line(ranks, "no_room")
    assert "saving checkpoint global_step4 to" in line and "(1.0 KB free" in line and "not saved:" in line
    # The rerun (RNG files of global_step2 in the old pickled format) resumes and finishes exactly.
    assert [r["rerun"]["status"] for r in ranks] == [0, 0]
    assert (save / "latest").read_text() == "global_step6"
    state = json.loads((save / "global_step6" / "trainer_state.json").read_text())
    reference = json.loads((tmp / "reference" / "global_step6" / "trainer_state.json").read_text())
    assert [s for s, _ in state["history"]] == list(range(1, 7))
    torch.testing.assert_close(torch.tensor([l for _, l in state["history"]]), torch.tensor([l for _, l in reference["history"]]),
                               rtol=0, atol=1e-6)
    for f in sorted((tmp / "reference" / "global_step6").glob("layer_*-model_states.pt")):
        a, b = load_tensors(f), load_tensors(save / "global_step6" / f.name)
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6, f.name
    assert sorted(p.name for p in (save / "global_step6").glob("rng_rank_*")) == [
        "rng_rank_0000.json", "rng_rank_0000.safetensors", "rng_rank_0001.json", "rng_rank_0001.safetensors"]
    assert "Traceback" not in output
