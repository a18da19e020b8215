"""train_ds.py: user mistakes found after start-up (model_path, resume) are one error line, no
traceback. One rank (WORLD_SIZE=1, gloo), a few seconds each."""
import json
import os
import socket
import subprocess
import sys

from conftest import REPO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_one_rank(tmp_path, **over):
    cfg = {"model_path": str(REPO / "configs" / "tiny-llama"), "save_path": str(tmp_path / "out"),
           "data_path": str(REPO / "data" / "samples" / "mixed.json"), "train_steps": 1, "max_seq_len": 32,
           "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [1, 1]}, "parts": [7]},
           "train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "SGD", "params": {"lr": 0.0}}}
    cfg.update(over)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "train_ds.py", "--config", str(path)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


def test_model_path_without_layer_files_is_one_error_line(tmp_path):
    """Issue 10.7: a folder with config.json and a tokenizer but no layer files (forgot hg_to_pp)."""
    rc, out = run_one_rank(tmp_path)
    assert rc == 1 and "Traceback" not in out
    assert (f"error: {REPO / 'configs' / 'tiny-llama'}: no layer_NN-model_states.pt files and no DeepSpeed 'latest' file: "
            "give a hg_to_pp output, a training save_path or one of its global_stepN folders") in out


def test_bad_resume_path_is_one_error_line(tmp_path):
    rc, out = run_one_rank(tmp_path, from_scratch=True, resume=str(tmp_path / "nowhere"))
    assert rc == 1 and "Traceback" not in out
    assert f"error: resume: {tmp_path / 'nowhere'} is neither a save_path with a 'latest' file nor a global_stepN folder" in out


def test_missing_model_and_data_paths_are_config_errors(tmp_path):
    """Issue 23.4: a model_path or data_path that is not there is a config error naming the key, found
    before the ranks meet: exit status 2, no multi-node wording, no abort line, no traceback."""
    rc, out = run_one_rank(tmp_path, model_path=str(tmp_path / "no-model"), data_path=[str(tmp_path / "no-data.jsonl")])
    assert rc == 2, out
    assert "Traceback" not in out and "terminate called" not in out and "every node" not in out
    assert "Setting accelerator to CPU" not in out  # issue 23.14: trainer/quiet.py
    assert (f"error: {tmp_path / 'config.json'}: 2 problem(s) in the training config:\n"
            f"  - model_path {tmp_path / 'no-model'} does not exist (give a hg_to_pp output, a training save_path or a "
            "global_stepN folder)\n"
            f"  - data_path: {tmp_path / 'no-data.jsonl'}: no such file (or the glob/folder matched no .json, .jsonl or "
            ".parquet file and no save_to_disk folder)\n") in out
