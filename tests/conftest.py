"""Shared fixtures: tiny HF models with seeded random weights, built once per test session from the
committed configs (no weights are downloaded or stored in git)."""
import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CONFIGS = {"llama": REPO / "configs" / "tiny-llama", "bloom": REPO / "configs" / "tiny-bloom"}

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
            cache[key] = save_random_model(CONFIGS[model_type], out, seed=0, dtype=dtype,
                                           tie_word_embeddings=tied, overrides=overrides)
        return cache[key]

    return make
