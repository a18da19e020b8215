"""The one table of tensor dtypes: torch dtype <-> safetensors name <-> bytes per element, and the
precision names of configs and command lines ("fp32", "bf16", "fp16").

Used by the converters (`--dtype`, reading and writing safetensors headers) and the trainer
(memory estimates: `bytes_per_param("bf16") == 2`).
"""
from typing import NamedTuple, Optional

import torch


class DType(NamedTuple):
    torch: torch.dtype
    safetensors: str          # the dtype name in a safetensors header
    nbytes: int               # bytes per element
    precision: Optional[str]  # the config/CLI name, for dtypes weights are trained or stored in


TABLE = (
    DType(torch.float64, "F64", 8, None),
    DType(torch.float32, "F32", 4, "fp32"),
    DType(torch.bfloat16, "BF16", 2, "bf16"),
    DType(torch.float16, "F16", 2, "fp16"),
    DType(torch.int64, "I64", 8, None),
    DType(torch.int32, "I32", 4, None),
    DType(torch.int16, "I16", 2, None),
    DType(torch.int8, "I8", 1, None),
    DType(torch.uint8, "U8", 1, None),
    DType(torch.bool, "BOOL", 1, None),
)
PRECISIONS = tuple(d.precision for d in TABLE if d.precision)  # ("fp32", "bf16", "fp16")

_BY_TORCH = {d.torch: d for d in TABLE}
_BY_SAFETENSORS = {d.safetensors: d for d in TABLE}
_BY_PRECISION = {d.precision: d for d in TABLE if d.precision}


def _precision(name: str) -> DType:
    try:
        return _BY_PRECISION[name]
    except KeyError:
        raise ValueError(f"precision {name!r}: use one of {', '.join(PRECISIONS)}") from None


def precision_dtype(name: str) -> torch.dtype:
    """"bf16" -> torch.bfloat16 (ValueError naming the choices for an unknown name)."""
    return _precision(name).torch


def bytes_per_param(name: str) -> int:
    """Bytes per parameter stored in precision `name`: "fp32" -> 4, "bf16"/"fp16" -> 2."""
    return _precision(name).nbytes


def element_size(dtype: torch.dtype) -> int:
    """Bytes per element of a torch dtype in the table."""
    return _BY_TORCH[dtype].nbytes


def safetensors_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "BF16" (KeyError for a dtype safetensors files of ours never hold)."""
    return _BY_TORCH[dtype].safetensors


def from_safetensors_name(name: str) -> Optional[torch.dtype]:
    """"BF16" -> torch.bfloat16; None for a name not in the table (the caller says what failed)."""
    d = _BY_SAFETENSORS.get(name)
    return None if d is None else d.torch
