"""DeepSpeed's JIT-built ops (the CPU comm op, CPU Adam, ...) are cached per venv.

torch's default cache, ~/.cache/torch_extensions/pyXY_cpu/<op>/, is shared by every venv and clone of
the user: one built against another torch or another ninja is rebuilt (35-50 s, silently), and the
next run of the other venv rebuilds it back. Every entry point (train_ds.py, rlhf.py, demo.py,
convert_model.py) and the Makefile therefore point TORCH_EXTENSIONS_DIR at `<venv>/torch_extensions`,
unless the user set one. Outside a venv torch's default stays."""
import os
import sys


def venv_op_cache() -> str | None:
    """The folder the ops of this Python's venv are built in: TORCH_EXTENSIONS_DIR as the user set it,
    else <venv>/torch_extensions (set in os.environ, so launched ranks inherit it), else None (no venv:
    torch's default)."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return os.environ["TORCH_EXTENSIONS_DIR"]
    if sys.prefix == sys.base_prefix:
        return None
    os.environ["TORCH_EXTENSIONS_DIR"] = os.path.join(sys.prefix, "torch_extensions")
    return os.environ["TORCH_EXTENSIONS_DIR"]
