"""The converter's error type: the checkpoint-format error of `models.pipe_dir` (one type for every
user-facing checkpoint problem, raised by the converter, the trainer's model loading and demo)."""
from models.pipe_dir import CheckpointError as ConversionError

__all__ = ["ConversionError"]
