"""Pipeline checkpoint folders: layer file names, the metadata file, and finding the layer files
of a `hg_to_pp` output, a training `save_path` (follows DeepSpeed's `latest`) or a `global_stepN`.

    PP_DIR/
      layer_00-model_states.pt ... layer_NN-model_states.pt   (DeepSpeed's per-layer file naming)
      config.json, generation_config.json, tokenizer files
      pipetune.json                                           (metadata, see write_metadata)
"""
import json
import re
import shutil
from pathlib import Path
from typing import Optional

METADATA_FILE = "pipetune.json"
FORMAT_VERSION = 1
# The files of a Hugging Face tokenizer (SentencePiece, tokenizers JSON or vocab/merges), with its
# chat template: the one list (random_init copies them, converters and training carry them along).
TOKENIZER_FILES = (
    "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
)
# Files copied alongside the weights so that the folder is self-contained.
SIDE_FILES = ("config.json", "generation_config.json") + TOKENIZER_FILES


class CheckpointError(Exception):
    """A user-facing problem with a checkpoint (missing files, weights, shapes, paths).
    The message says what is wrong and how to fix it; CLIs print it without a traceback."""


_LAYER_RE = re.compile(r"^layer_(\d+)-model_states\.pt$")


def layer_file_name(index: int) -> str:
    """DeepSpeed's `PipelineModule.ckpt_layer_path` naming (no model-parallel rank suffix)."""
    return f"layer_{index:02d}-model_states.pt"


def find_layer_files(folder: Path) -> dict[int, Path]:
    return {int(m.group(1)): p for p in folder.iterdir() if (m := _LAYER_RE.match(p.name))}


def resolve_checkpoint_dir(path: Path) -> tuple[Path, list[Path]]:
    """(folder holding the layer files, folders to search for config/tokenizer/metadata in order).

    - a folder with layer files: itself (a hg_to_pp output or a global_stepN folder; side files may
      be in the parent save_path);
    - a training save_path with DeepSpeed's `latest` file: the tag folder it names.
    """
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (give a hg_to_pp output, a training save_path or a global_stepN folder)")
    if find_layer_files(path):
        return path, [path, path.parent]
    latest = path / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        tag_dir = path / tag
        if not tag_dir.is_dir():
            raise CheckpointError(f"{latest} names checkpoint {tag!r}, but {tag_dir} does not exist")
        if not find_layer_files(tag_dir):
            raise CheckpointError(f"{tag_dir} (from {latest}) holds no layer_*-model_states.pt files")
        return tag_dir, [tag_dir, path]
    raise CheckpointError(
        f"{path}: no layer_NN-model_states.pt files and no DeepSpeed 'latest' file: "
        "give a hg_to_pp output, a training save_path or one of its global_stepN folders"
    )


def find_side_file(search: list[Path], name: str) -> Optional[Path]:
    for folder in search:
        if (folder / name).is_file():
            return folder / name
    return None


def copy_side_files(search: list[Path], dest: Path, skip: tuple[str, ...] = ()) -> list[str]:
    copied = []
    for name in SIDE_FILES:
        if name in skip:
            continue
        src = find_side_file(search, name)
        if src is not None:
            shutil.copy2(src, dest / name)
            copied.append(name)
    return copied


def write_metadata(folder: Path, **fields) -> None:
    """model_type, num_pipe_layers, layer_names, tie_word_embeddings, head, dtype, source."""
    data = {"format": "pipetune-pipeline-checkpoint", "version": FORMAT_VERSION, **fields}
    (folder / METADATA_FILE).write_text(json.dumps(data, indent=2) + "\n")


def read_metadata(search: list[Path]) -> dict:
    path = find_side_file(search, METADATA_FILE)
    if path is None:
        return {}
    data = json.loads(path.read_text())
    if data.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: written by a newer pipetune (format version {data['version']}); upgrade pipetune")
    return data
