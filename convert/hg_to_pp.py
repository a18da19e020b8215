"""HF folder -> pipeline layer files, streaming: one pipe layer is in memory at a time."""
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm
from transformers import AutoConfig

from models.pipeline import (
    build_layers, hf_key_to_pipe, is_ignored_hf_key, pipe_key_to_hf, is_tied, layer_key_rules, normalise_hf_keys,
    pipe_layer_names, prepare_config, tied_head_hf_key,
)
from models.dtypes import PRECISIONS, precision_dtype
from models.registry import get_architecture
from trainer.files import check_export_room, export_disk_full, is_disk_full

from .errors import ConversionError
from .hf_reader import HFCheckpoint
from .output_dir import check_dest, replace_dir, temp_dir_beside
from models.pipe_dir import copy_side_files, layer_file_name, write_metadata


def check_local_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise ConversionError(
            f"{what} {str(path)!r} is not a local directory. Download the model first, e.g. "
            f"`hf download {path} --local-dir ./{path.name}` on a machine with hub access, then pass that folder"
        )


def expected_layer_shapes(config, head: str = "lm") -> list[dict[str, tuple[int, ...]]]:
    """Per pipe layer: {pipe key: shape}, from the layer classes built on the meta device."""
    with torch.device("meta"):
        layers = build_layers(prepare_config(config), head=head)
    return [({k: tuple(v.shape) for k, v in layer.state_dict().items()} if isinstance(layer, torch.nn.Module) else {}) for layer in layers]


def plan_hf_to_pipe(config, ckpt: HFCheckpoint, head: str = "lm") -> dict[int, dict[str, str]]:
    """{pipe layer: {pipe key: source checkpoint key}}, or ConversionError naming every missing,
    unexpected and mis-shaped weight."""
    rules = layer_key_rules(config, head)
    expected = expected_layer_shapes(config, head)
    canon = normalise_hf_keys(config, ckpt.keys())
    plan: dict[int, dict[str, str]] = defaultdict(dict)
    unexpected, wrong_shape = [], []
    for src_key, hf_key in canon.items():
        if is_ignored_hf_key(config, hf_key):
            continue
        if is_tied(config) and head == "lm" and hf_key == tied_head_hf_key(config):
            continue  # a tied checkpoint may carry a copy of the embedding as lm_head; HF re-ties it.
        where = hf_key_to_pipe(rules, hf_key)
        if where is None or where[1] not in expected[where[0]]:
            unexpected.append(src_key)
            continue
        index, pipe_key = where
        if tuple(ckpt.shape(src_key)) != expected[index][pipe_key]:
            wrong_shape.append(f"{src_key}: checkpoint {list(ckpt.shape(src_key))}, config expects {list(expected[index][pipe_key])}")
        plan[index][pipe_key] = src_key
    missing = [
        pipe_key_to_hf(rules, i, k) for i, shapes in enumerate(expected) for k in shapes if k not in plan.get(i, {})
    ]
    problems = []
    if missing:
        problems.append(f"missing weights ({len(missing)}): " + ", ".join(missing))
    if unexpected:
        problems.append(f"unexpected weights ({len(unexpected)}): " + ", ".join(sorted(unexpected)))
    if wrong_shape:
        problems.append(f"shape mismatches ({len(wrong_shape)}): " + "; ".join(wrong_shape))
    if problems:
        raise ConversionError(f"{ckpt.model_dir}: checkpoint does not match its config.json ({config.model_type}): " + " | ".join(problems))
    return plan


def head_of(config) -> str:
    """"value" for an HF *ForSequenceClassification model with one label (a reward model or
    critic), else "lm"."""
    if any(a.endswith("ForSequenceClassification") for a in (getattr(config, "architectures", None) or [])):
        if getattr(config, "num_labels", 1) != 1:
            raise ConversionError(f"sequence-classification model with num_labels={config.num_labels}: only a scalar "
                                  "value head (num_labels 1, a reward model) converts to a pipeline")
        return "value"
    return "lm"


def hg_to_pp(input_path: str, save_path: str, dtype: str = "auto", overwrite: bool = False, head: Optional[str] = None,
             progress: bool = True) -> Path:
    src, dest = Path(input_path), Path(save_path)
    check_local_dir(src, "--input-path")
    if not (src / "config.json").is_file():
        raise ConversionError(f"{src}: no config.json (is this a Hugging Face model folder?)")
    check_dest(dest, overwrite)
    config = AutoConfig.from_pretrained(src)
    get_architecture(config.model_type)  # fails early on unsupported model types
    head = head or head_of(config)
    if dtype != "auto" and dtype not in PRECISIONS:
        raise ConversionError(f"--dtype {dtype!r}: use auto, {', '.join(PRECISIONS)}")
    ckpt = HFCheckpoint(src)
    plan = plan_hf_to_pipe(config, ckpt, head)
    names = pipe_layer_names(config, head)
    target_dtype: Optional[torch.dtype] = None if dtype == "auto" else precision_dtype(dtype)
    needed = sum(f.stat().st_size for f in src.iterdir() if f.suffix in (".safetensors", ".bin"))  # about, at the same dtype
    if dtype == "auto":
        check_export_room(dest, needed)

    tmp = temp_dir_beside(dest)
    try:
        out_dtypes = set()
        for index in tqdm(sorted(plan), desc="hg_to_pp", unit="layer", disable=not progress):
            source = ckpt.read(list(plan[index].values()))
            state = {}
            for pipe_key, src_key in plan[index].items():
                tensor = source.pop(src_key)
                if target_dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(target_dtype)
                out_dtypes.add(tensor.dtype)
                state[pipe_key] = tensor
            torch.save(state, tmp / layer_file_name(index))
            del state, source
        copy_side_files([src], tmp)
        write_metadata(
            tmp, model_type=config.model_type, num_pipe_layers=len(names), layer_names=names,
            tie_word_embeddings=is_tied(config), head=head,
            dtype=", ".join(sorted(str(d).replace("torch.", "") for d in out_dtypes)), source=str(src.resolve()),
        )
        replace_dir(tmp, dest)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(e, dest, needed):
            raise export_disk_full(dest, needed) from None
        raise
    return dest
