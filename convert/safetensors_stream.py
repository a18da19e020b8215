"""Write a safetensors file one tensor at a time.

The `safetensors` library writes a file from a dict of tensors held in memory at once; to keep
peak memory near one pipe layer while exporting a 70B model, we write the (simple, documented)
format directly: an 8-byte little-endian header length, a JSON header with each tensor's dtype,
shape and byte range, padded with spaces to a multiple of 8, then the raw little-endian bytes in
header order. Files are checked by reading them back with `safetensors.safe_open` in tests.
"""
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from models.dtypes import element_size, safetensors_name


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * element_size(self.dtype)


class StreamingSafetensorsWriter:
    """with StreamingSafetensorsWriter(path, specs) as w: w.write(name, tensor) in spec order."""

    def __init__(self, path: str | Path, specs: list[TensorSpec], metadata: dict | None = None):
        self.path = Path(path)
        self.specs = list(specs)
        header, offset = {"__metadata__": dict(metadata or {"format": "pt"})}, 0
        for spec in self.specs:
            header[spec.name] = {"dtype": safetensors_name(spec.dtype), "shape": list(spec.shape), "data_offsets": [offset, offset + spec.nbytes]}
            offset += spec.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._file = open(self.path, "wb")
        self._file.write(struct.pack("<Q", len(raw)))
        self._file.write(raw)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        spec = self.specs[self._next]
        if name != spec.name or tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise ValueError(f"{self.path.name}: expected {spec} next, got {name} {tensor.dtype} {tuple(tensor.shape)}")
        flat = tensor.detach().contiguous().reshape(-1)
        self._file.write(memoryview(flat.view(torch.uint8).numpy()))
        self._next += 1

    def close(self) -> None:
        self._file.close()
        if self._next != len(self.specs):
            raise ValueError(f"{self.path.name}: {len(self.specs) - self._next} tensors were never written")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *rest):
        if exc_type is None:
            self.close()
        else:
            self._file.close()
