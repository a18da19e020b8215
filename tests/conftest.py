"""Shared fixtures: tiny HF models with seeded random weights, built once per test session from the
committed configs (no weights are downloaded or stored in git). Norm weights and biases are random
too (HF's init leaves them at 1 and 0), so logits and training parity exercise them."""
import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CONFIGS = {name: REPO / "configs" / f"tiny-{name}" for name in ("llama", "bloom", "qwen2", "qwen3", "mistral", "llama3", "gemma3")}

# One torch thread: tests run beside DeepSpeed ranks on a 2-core machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "multirank: launches DeepSpeed ranks (deepspeed --num_gpus 2 on CPU/gloo); ~1 min")
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """tiny_hf(model_type, tied=None, dtype="float32", **overrides) -> Path of an HF folder."""
    from models.random_init import save_random_model

    cache = {}

    def make(model_type: str, tied=None, dtype: str = "float32", **overrides) -> Path:
        key = (model_type, tied, dtype, json.dumps(overrides, sort_keys=True))
        if key not in cache:
            name = f"{model_type}-{'tied' if tied else 'untied' if tied is False else 'default'}-{dtype}-{len(cache)}"
            out = tmp_path_factory.mktemp("hf") / name
            save_random_model(CONFIGS[model_type], out, seed=0, dtype=dtype, tie_word_embeddings=tied, overrides=overrides)
            cache[key] = randomise_norms_and_biases(out, dtype, seed=1)
        return cache[key]

    return make


def randomise_norms_and_biases(hf_dir: Path, dtype: str, seed: int, scale: float = 0.1) -> Path:
    """Add seeded N(0, scale) noise to every 1-D parameter of the HF model in hf_dir (norm weights,
    norm and linear biases: HF initialises them to exactly 1 and 0) and save it back."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=getattr(torch, dtype))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.dim() == 1:
                p.add_((torch.randn(p.shape, generator=gen) * scale).to(p.dtype))
    model.save_pretrained(hf_dir)
    return hf_dir


def free_port() -> int:
    """A local port nobody listens on: test files (and other runs on the machine) launch ranks at the
    same time, and a fixed --master_port then fails with "address already in use"."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_ranks(script, *args, ranks=2, env_extra=None, check=True, timeout=1800):
    """`deepspeed --num_gpus RANKS SCRIPT ARGS` from the repo root on a free port, one torch thread per
    rank (two ranks share the 2 cores): the multi-rank tests' one way to launch. Returns the
    CompletedProcess; with check, a failed launch fails the test with the end of its output."""
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env_extra or {})}
    port = free_port()
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_addr", "127.0.0.1",
           "--master_port", str(port), str(script), *map(str, args)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)
    finally:
        leaked = remove_shm_allreduce_segments("127.0.0.1", port)
    if check:
        assert proc.returncode == 0, f"launch failed ({proc.returncode}):\n{proc.stdout[-5000:]}\n{proc.stderr[-5000:]}"
        assert not leaked, f"a launch that ended well left DeepSpeed's shm all-reduce segments in /dev/shm: {leaked}"
    return proc


def remove_shm_allreduce_segments(addr: str, port: int) -> list[str]:
    """Delete (and name) the /dev/shm segments DeepSpeed's CPU all-reduce made for the launch on
    addr:port. train_ds.py and friends unlink their own at start (trainer.engine.distributed.init_process_group);
    a rank that dies inside init_distributed cannot, and each left behind holds 69 MB of RAM."""
    leaked = sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_*"))
    for path in leaked:
        path.unlink(missing_ok=True)
    return [p.name for p in leaked]
