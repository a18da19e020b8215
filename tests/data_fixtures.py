"""Shared helpers for tests/test_data_*.py (imported by name; tests/conftest.py is not ours)."""
import functools
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIXED = os.path.join(ROOT, "data", "samples", "mixed.json")
TOKENIZER_DIRS = {"llama": os.path.join(ROOT, "configs", "tiny-llama"),
                  "bloom": os.path.join(ROOT, "configs", "tiny-bloom")}


@functools.lru_cache(maxsize=None)
def load_tokenizer(name):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(TOKENIZER_DIRS[name])


@pytest.fixture(params=sorted(TOKENIZER_DIRS))
def tok(request):
    return load_tokenizer(request.param)


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, ensure_ascii=False)
    return str(path)


def write_jsonl(path, lines):
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(x if isinstance(x, str) else json.dumps(x, ensure_ascii=False) for x in lines) + "\n")
    return str(path)
