"""Compatibility with the pinned DeepSpeed / transformers versions: `compat.private_api` is the one
module that touches their private internals."""
