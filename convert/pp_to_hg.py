"""Pipeline layer files -> HF folder (sharded safetensors + index, config, tokenizer), streaming:
one pipe layer is in memory at a time, written straight into its shard.

Everything is checked before anything is written (every expected layer file is there, every key
and shape matches the config), the output is built in a temporary folder and renamed at the end.
"""
import json
import shutil
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm
from transformers import AutoConfig
from transformers.utils.hub import convert_file_size_to_int

from models.pipeline import layer_key_rules, pipe_key_to_hf, pipe_layer_names
from models.registry import get_architecture
from trainer.files import check_export_room, export_disk_full, is_disk_full, load_tensors

from .errors import ConversionError
from .hg_to_pp import expected_layer_shapes
from .output_dir import check_dest, replace_dir, temp_dir_beside
from models.pipe_dir import copy_side_files, find_layer_files, find_side_file, read_metadata, resolve_checkpoint_dir
from .safetensors_stream import StreamingSafetensorsWriter, TensorSpec

HF_CLASS_SUFFIX = {"lm": "ForCausalLM", "value": "ForSequenceClassification"}


def load_layer(path: Path) -> dict[str, torch.Tensor]:
    """A layer file, memory-mapped: tensors are read from disk only when touched."""
    try:
        state = load_tensors(path, mmap=True)  # plain tensors only: a pickle of anything else is refused
    except ConversionError:
        raise
    except Exception as e:  # a truncated or foreign file
        raise ConversionError(f"{path}: cannot read layer file ({type(e).__name__}: {e})") from None
    if "module" in state and isinstance(state["module"], dict):
        state = state["module"]
    return state


def plan_pipe_to_hf(ckpt_dir: Path, config, head: str, search: Optional[list[Path]] = None
                    ) -> tuple[list[TensorSpec], dict[str, tuple[Path, str]]]:
    """Check the layer files against the config; return (HF tensor specs in pipe order,
    {HF name: (layer file, key in it)}). `search`: folders with the run's side files."""
    rules = layer_key_rules(config, head)
    expected = expected_layer_shapes(config, head)
    files = find_layer_files(ckpt_dir)
    names = pipe_layer_names(config, head)
    needed = [r.index for r in rules if r.file_expected]
    missing = [i for i in needed if i not in files]
    if missing:
        raise ConversionError(
            f"{ckpt_dir}: missing layer files for pipe layers " + ", ".join(f"{i} ({names[i]})" for i in missing)
            + f" (the {config.model_type} config has {len(names)} pipe layers: embedding, {len(names) - 3} blocks, final_norm, "
            f"{head}_head). On a multi-node run each node writes the layers of its own stages: copy all layer files into one folder"
            + _where_written(missing, search or [ckpt_dir, ckpt_dir.parent])
        )
    extra = sorted(i for i in files if i >= len(names) or (i not in needed))
    if extra:
        raise ConversionError(f"{ckpt_dir}: layer files {extra} do not belong to a {len(names)}-layer {config.model_type} pipeline with a {head} head (wrong config.json?)")
    specs, sources, problems = [], {}, []
    for index in needed:
        state = load_layer(files[index])
        want = expected[index]
        for key in sorted(set(want) - set(state)):
            problems.append(f"{files[index].name}: missing {key}")
        for key in sorted(set(state) - set(want)):
            problems.append(f"{files[index].name}: unexpected {key}")
        for key, tensor in state.items():
            if key in want and tuple(tensor.shape) != want[key]:
                problems.append(f"{files[index].name}: {key} has shape {list(tensor.shape)}, config expects {list(want[key])}")
            elif key in want:
                hf_name = pipe_key_to_hf(rules, index, key)
                specs.append(TensorSpec(hf_name, tensor.dtype, tuple(tensor.shape)))
                sources[hf_name] = (files[index], key)
        del state
    if problems:
        raise ConversionError(f"{ckpt_dir}: layer files do not match config.json: " + "; ".join(problems))
    return specs, sources


def _where_written(missing: list[int], search: list[Path]) -> str:
    """'; layer 5 was written by stage 1 on node(s) b' from the training run's topology.json."""
    path = find_side_file(search, "topology.json")
    if path is None:
        return ""
    topo = json.loads(path.read_text())
    by_stage = {}
    for i in missing:
        if i < len(topo["layer_stage"]):
            by_stage.setdefault(topo["layer_stage"][i], []).append(i)
    return "; " + "; ".join(f"layers {', '.join(map(str, layers))} were written by stage {s} on node(s) "
                            f"{', '.join(topo['stage_hosts'][str(s)])}" for s, layers in sorted(by_stage.items()))


def shard_specs(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive groups of tensors of at most max_shard_bytes each (a larger tensor gets its own shard)."""
    shards, current, size = [], [], 0
    for spec in specs:
        if current and size + spec.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(spec)
        size += spec.nbytes
    if current:
        shards.append(current)
    return shards


def open_pipe_checkpoint(input_path) -> tuple[Path, list[Path], object, str]:
    """A pipeline checkpoint path (hg_to_pp output, training save_path, global_stepN) ->
    (folder of the layer files, folders holding its side files in search order, HF config, head)."""
    ckpt_dir, search = resolve_checkpoint_dir(Path(input_path))
    config_path = find_side_file(search, "config.json")
    if config_path is None:
        raise ConversionError(f"{ckpt_dir}: no config.json here or in {search[-1]} (hg_to_pp and training checkpoints write one)")
    config = AutoConfig.from_pretrained(config_path.parent)
    get_architecture(config.model_type)
    head = read_metadata(search).get("head", "lm")
    return ckpt_dir, search, config, head


def iter_hf_tensors(specs: list[TensorSpec], sources: dict[str, tuple[Path, str]], on_layer_file=None):
    """Yield (HF name, tensor) for `specs` in order (pipe-layer order, as `plan_pipe_to_hf` returns
    them), with one memory-mapped layer file open at a time. `on_layer_file(path)` is called as each
    file is opened. Used by pp_to_hg (writing shards) and inference.loading (building a model in memory for demo.py)."""
    current_path, current_state = None, {}
    for spec in specs:
        path, key = sources[spec.name]
        if path != current_path:
            current_path, current_state = path, load_layer(path)
            if on_layer_file is not None:
                on_layer_file(path)
        yield spec.name, current_state.pop(key)


def pp_to_hg(input_path: str, save_path: str, max_shard_size: str = "5GB", overwrite: bool = False, progress: bool = True) -> Path:
    dest = Path(save_path)
    ckpt_dir, search, config, head = open_pipe_checkpoint(input_path)
    check_dest(dest, overwrite)
    specs, sources = plan_pipe_to_hf(ckpt_dir, config, head, search)
    try:
        max_bytes = convert_file_size_to_int(max_shard_size)
    except (ValueError, TypeError):
        raise ConversionError(f"--max-shard-size {max_shard_size!r}: use a size such as 5GB or 500MB") from None
    shards = shard_specs(specs, max_bytes)
    needed = sum(s.nbytes for s in specs)
    check_export_room(dest, needed)  # a full disk is one line before writing, or after (partial removed)

    tmp = temp_dir_beside(dest)
    try:
        weight_map = _write_shards(tmp, shards, sources, progress)
        copy_side_files(search, tmp, skip=("config.json",))
        tokenizer = _load_tokenizer(tmp)
        pad_id = _value_head_pad(tmp, config, tokenizer, read_metadata(search)) if head == "value" else None
        _write_config(tmp, config, specs, head, pad_id)
        _write_chat_template(tmp, tokenizer, read_metadata(search).get("template", "pipetune"))
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(s.nbytes for s in specs)}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        replace_dir(tmp, dest)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(e, dest, needed):
            raise export_disk_full(dest, needed) from None
        raise
    return dest


def _write_shards(out: Path, shards: list[list[TensorSpec]], sources: dict[str, tuple[Path, str]], progress: bool) -> dict[str, str]:
    names = (["model.safetensors"] if len(shards) == 1
             else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map = {}
    bar = tqdm(total=len({p for p, _ in sources.values()}), desc="pp_to_hg", unit="layer", disable=not progress)
    tensors = iter_hf_tensors([spec for shard in shards for spec in shard], sources, on_layer_file=lambda _: bar.update(1))
    for shard_name, shard in zip(names, shards):
        with StreamingSafetensorsWriter(out / shard_name, shard, metadata={"format": "pt"}) as writer:
            for spec in shard:
                name, tensor = next(tensors)
                assert name == spec.name
                writer.write(name, tensor)
                weight_map[name] = shard_name
    bar.close()
    return weight_map


def _load_tokenizer(out: Path):
    """The exported folder's tokenizer, or None when it has no tokenizer files."""
    if not any((out / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(out)


def _write_chat_template(out: Path, tokenizer, template: str = "pipetune") -> None:
    """Store the prompt format training used with the tokenizer (`chat_template.jinja`, which
    transformers loads with the tokenizer), so `apply_chat_template` reproduces training prompts:
    pipetune's template, or for `template` "model" (recorded in pipetune.json) the tokenizer's own."""
    from data.templates import set_chat_template

    if tokenizer is None:
        return  # no tokenizer to attach it to
    if template == "model":
        if not tokenizer.chat_template:
            raise ConversionError("pipetune.json says training used the tokenizer's own chat template (template "
                                  "\"model\"), but the checkpoint's tokenizer has none")
        (out / "chat_template.jinja").write_text(tokenizer.get_chat_template())
        return
    (out / "chat_template.jinja").write_text(set_chat_template(tokenizer))


def _value_head_pad(out: Path, config, tokenizer, metadata: dict) -> Optional[int]:
    """The pad id training used, for a value-head (reward model / critic) export.

    HF *ForSequenceClassification scores the last token that is not `config.pad_token_id`; training
    padded with the data pipeline's pad and scored the last real token (the answer's EOS). So the
    config gets that pad id, whatever the source config said (a source pad == EOS would make HF score
    the token before EOS), and the exported tokenizer pads with it too, so that
    `tokenizer(texts, padding=True)` batches score as in training. The id is the one the trainer
    recorded in pipetune.json (`pad_token_id`), else the data pipeline's default for this tokenizer.
    None (config left as it is) only without both; a source pad equal to EOS is then an error."""
    eos = config.eos_token_id
    eos_ids = set(eos) if isinstance(eos, (list, tuple)) else {eos}
    pad = metadata.get("pad_token_id")
    if pad is None and tokenizer is not None:
        from data.errors import TokenizerError
        from data.tokenize import pad_token_id

        try:
            pad = pad_token_id(tokenizer)
        except TokenizerError as e:
            raise ConversionError(f"value-head export: {e}; or record the pad id training used as \"pad_token_id\" "
                                  "in pipetune.json") from None
    if pad is None:
        if config.pad_token_id is not None and config.pad_token_id in eos_ids:
            raise ConversionError(f"value-head export: config.json has pad_token_id {config.pad_token_id} == EOS, and "
                                  "there is no tokenizer and no pad_token_id in pipetune.json to tell which pad "
                                  "training used (HF sequence classification would score the token before EOS)")
        return None
    pad = int(pad)
    if pad in eos_ids or (tokenizer is not None and pad == tokenizer.eos_token_id):
        raise ConversionError(f"value-head export: pad id {pad} is EOS; the reward is read at the answer's EOS, "
                              "so the pad must differ from it")
    if tokenizer is not None and tokenizer.pad_token_id != pad:
        _set_tokenizer_pad(out, tokenizer.convert_ids_to_tokens(pad))
    return pad


def _set_tokenizer_pad(out: Path, token: str) -> None:
    """Make the exported tokenizer pad with `token` (tokenizer_config.json, and special_tokens_map.json
    when it names a pad token)."""
    for name, create in (("tokenizer_config.json", True), ("special_tokens_map.json", False)):
        path = out / name
        data = json.loads(path.read_text()) if path.is_file() else {}
        if create or "pad_token" in data:
            data["pad_token"] = token
            path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _write_config(out: Path, config, specs: list[TensorSpec], head: str, pad_id: Optional[int] = None) -> None:
    float_dtypes = {s.dtype for s in specs if s.dtype.is_floating_point}
    if len(float_dtypes) != 1:
        raise ConversionError(f"layer files mix dtypes {sorted(map(str, float_dtypes))}; convert them to one dtype first")
    config.dtype = next(iter(float_dtypes))
    arch = get_architecture(config.model_type)
    config.architectures = [dict(arch.hf_class_names).get(head) or arch.hf_class_prefix + HF_CLASS_SUFFIX[head]]
    if head == "value":
        config.num_labels = 1
        if pad_id is not None:  # the pad training used (see _value_head_pad)
            config.pad_token_id = pad_id
    config.save_pretrained(out)
