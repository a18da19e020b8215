"""Lazy access to the weights of a Hugging Face checkpoint folder.

Reads `*.safetensors` (one file, or shards with `model.safetensors.index.json`) and legacy
`pytorch_model*.bin` (memory-mapped, so a shard is never read whole). Only the tensors asked for are
read, so peak memory follows what the caller holds, not the checkpoint size.
"""
import json
import os
from collections import defaultdict
from pathlib import Path

import torch

from models.dtypes import from_safetensors_name

from .errors import ConversionError

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


def _weight_files(model_dir: Path) -> tuple[str, list[Path]]:
    """('safetensors'|'bin', files). Prefers safetensors, as transformers does."""
    for kind, index_name, pattern in (("safetensors", SAFE_INDEX, "*.safetensors"), ("bin", BIN_INDEX, "pytorch_model*.bin")):
        index = model_dir / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({model_dir / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise ConversionError(f"{index}: lists shard files that are not there: {', '.join(missing)} (re-download the checkpoint)")
            return kind, files
        files = sorted(model_dir.glob(pattern))
        if files:
            return kind, files
    raise ConversionError(
        f"{model_dir}: no weights found (expected model.safetensors, model-*.safetensors with {SAFE_INDEX}, "
        "or pytorch_model*.bin)"
    )


class HFCheckpoint:
    """keys(), shape(key), dtype(key), read(keys) -> {key: tensor} over all shards of a folder."""

    def __init__(self, model_dir: str | os.PathLike):
        self.model_dir = Path(model_dir)
        self.kind, self.files = _weight_files(self.model_dir)
        self._where: dict[str, Path] = {}
        self._meta: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        for path in self.files:
            for key, meta in self._scan(path).items():
                if key in self._where:
                    raise ConversionError(f"{self.model_dir}: weight {key!r} appears in both {self._where[key].name} and {path.name}")
                self._where[key] = path
                self._meta[key] = meta

    def _scan(self, path: Path) -> dict:
        if self.kind == "safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                out = {}
                for key in f.keys():
                    sl = f.get_slice(key)
                    out[key] = (_safetensors_dtype(sl.get_dtype()), tuple(sl.get_shape()))
                return out
        state = _load_bin(path)
        out = {k: (v.dtype, tuple(v.shape)) for k, v in state.items()}
        del state
        return out

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._meta[key][1]

    def dtype(self, key: str) -> torch.dtype:
        return self._meta[key][0]

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors, each with its own storage (safe to torch.save one by one)."""
        by_file = defaultdict(list)
        for key in keys:
            by_file[self._where[key]].append(key)
        out = {}
        for path, file_keys in by_file.items():
            if self.kind == "safetensors":
                from safetensors import safe_open

                with safe_open(str(path), framework="pt") as f:
                    for key in file_keys:
                        out[key] = f.get_tensor(key)
            else:
                state = _load_bin(path)
                for key in file_keys:
                    # clone: a view of a memory-mapped storage would torch.save the whole storage.
                    out[key] = state[key].clone()
                del state
        return out


def _safetensors_dtype(name: str) -> torch.dtype:
    dtype = from_safetensors_name(name)
    if dtype is None:
        raise ConversionError(f"unsupported safetensors dtype {name}")
    return dtype


def _load_bin(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise ConversionError(f"{path}: cannot read ({e})") from None
        # Pre-zipfile (torch < 1.6) files cannot be memory-mapped: read whole.
        return torch.load(path, map_location="cpu", weights_only=True)
