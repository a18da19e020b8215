"""A model folder -> (HF causal LM, tokenizer) ready to generate with the prompt format it was trained with.

Two kinds of folder:

- a Hugging Face folder (a `convert_model.py pp_to_hg` output, or any LLaMA/BLOOM folder), loaded with
  `from_pretrained`. Its own chat template is used: a pp_to_hg export stores pipetune's training
  template as `chat_template.jinja`, which transformers prefers to a `chat_template` in
  tokenizer_config.json; a folder without any template gets pipetune's.
- a pipeline checkpoint (a `hg_to_pp` output, a training save_path, a global_stepN folder), converted in
  memory: no files are written. It renders with the template training used, as recorded in its
  pipetune.json (`training_template_of`): pipetune's (`data.templates`; the default, and for a hg_to_pp
  output, which nothing trained yet), so that a template a chat model's tokenizer_config.json carries
  (Llama-2-chat `[INST]`, Llama-3-Instruct) is not used for a model trained on pipetune's; or, for a run
  with `template: "model"`, the tokenizer's own chat template (`data.chat_template`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from inference.errors import InferenceError, first_line

DEFAULT_CONTEXT = 2048  # BLOOM (ALiBi) has no max_position_embeddings; it was trained with 2048


def load_model(model_path: str, dtype: str):
    """(model in eval mode, tokenizer). `dtype`: "auto" (the checkpoint's) or a torch dtype name."""
    path = Path(model_path)
    if not path.exists():
        raise InferenceError(f"--model-path {path}: no such folder")
    if not path.is_dir():
        raise InferenceError(f"--model-path {path}: not a folder (give a Hugging Face folder or a pipeline checkpoint)")
    if is_pipeline_checkpoint(path):
        model, tokenizer = load_pipeline_checkpoint(path, dtype)
    else:
        model, tokenizer = load_hf_folder(path, dtype)
    return model.eval(), tokenizer


def is_pipeline_checkpoint(path: Path) -> bool:
    from models.pipe_dir import find_layer_files

    return bool(find_layer_files(path)) or (path / "latest").is_file()


def training_template_of(search: list[Path]) -> str:
    """The prompt template a pipeline checkpoint was trained with: "pipetune" or "model" (pipetune.json's
    "template", written by training; "pipetune" when absent)."""
    from models.pipe_dir import read_metadata

    return read_metadata(search).get("template", "pipetune")


def load_tokenizer(folder: Path, training_template):
    """The tokenizer of `folder`. `training_template`: True or "pipetune": render with pipetune's
    training template; "model": with the tokenizer's own (an error when it has none); False: keep the
    folder's own template and fall back to pipetune's."""
    from transformers import AutoTokenizer

    from data.templates import set_chat_template

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise InferenceError(f"{folder}: cannot load the tokenizer ({first_line(e)})") from None
    if training_template == "model":
        if not tokenizer.chat_template:
            raise InferenceError(f"{folder}: training used the tokenizer's own chat template (template \"model\" in "
                                 "pipetune.json), but this tokenizer has none: copy chat_template.jinja or "
                                 "tokenizer_config.json from the training source")
    elif training_template or not tokenizer.chat_template:
        set_chat_template(tokenizer)
    if tokenizer.eos_token_id is None:
        raise InferenceError(f"{folder}: the tokenizer has no eos_token (it ends every assistant turn in the training template)")
    return tokenizer


def load_hf_folder(path: Path, dtype: str):
    from transformers import AutoModelForCausalLM

    if not (path / "config.json").is_file():
        raise InferenceError(f"--model-path {path}: no config.json and no pipeline layer files: give a Hugging Face folder "
                             "(convert_model.py pp_to_hg output) or a pipeline checkpoint (hg_to_pp output, training save_path, global_stepN)")
    generating_head_problem(path)
    tokenizer = load_tokenizer(path, training_template=False)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype="auto" if dtype == "auto" else torch_dtype(dtype))
    except (OSError, ValueError, KeyError) as e:
        raise InferenceError(f"--model-path {path}: cannot load the model ({first_line(e)})") from None
    return model, tokenizer


def generating_head_problem(path: Path) -> None:
    """InferenceError for an HF folder whose config.json names only architectures without an LM head
    (the RM export `*ForSequenceClassification`, PPO's critic_hf): AutoModelForCausalLM would load its
    body under a random LM head and generate garbage."""
    import json

    try:
        architectures = json.loads((path / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return
    if architectures and not any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in architectures):
        raise InferenceError(f"--model-path {path}: config.json's architectures {architectures} have no LM head to generate "
                             "with (a reward/value model export, e.g. rlhf.py's rm/hf or ppo/critic_hf); give a *ForCausalLM "
                             "export (sft/hf, ppo/hf) or load it with AutoModelForSequenceClassification to score text")


def load_pipeline_checkpoint(path: Path, dtype: str):
    """Build the HF model from a pipeline checkpoint without writing files: the layer files are
    memory-mapped and their tensors loaded under their HF names (the mapping of `convert.pp_to_hg`),
    so weights are read from disk as they are used and, when no cast is needed, shared with the
    mapping rather than copied."""
    from transformers import GenerationConfig

    from convert.pp_to_hg import iter_hf_tensors, open_pipe_checkpoint, plan_pipe_to_hf
    from models.pipe_dir import TOKENIZER_FILES, CheckpointError, find_side_file

    try:
        ckpt_dir, search, config, head = open_pipe_checkpoint(path)
        if head != "lm":
            raise InferenceError(f"--model-path {path}: a pipeline checkpoint with a {head!r} head (a reward/value model) has no LM head to generate with")
        specs, sources = plan_pipe_to_hf(ckpt_dir, config, head)
        state_dict = dict(iter_hf_tensors(specs, sources))
    except CheckpointError as e:
        raise InferenceError(str(e)) from None
    tok_file = next((f for name in TOKENIZER_FILES if not name.startswith("chat_template")
                     if (f := find_side_file(search, name)) is not None), None)
    if tok_file is None:
        raise InferenceError(f"{ckpt_dir}: no tokenizer files here or in {search[-1]} (hg_to_pp copies them; copy them from the source HF folder)")
    tokenizer = load_tokenizer(tok_file.parent, training_template=training_template_of(search))
    if dtype == "auto":
        float_dtypes = {s.dtype for s in specs if s.dtype.is_floating_point}
        weights_dtype = float_dtypes.pop() if len(float_dtypes) == 1 else torch_dtype("float32")
    else:
        weights_dtype = torch_dtype(dtype)
    model = model_from_state_dict(config, state_dict, weights_dtype, where=ckpt_dir)
    gen_file = find_side_file(search, "generation_config.json")
    if gen_file is not None:
        model.generation_config = GenerationConfig.from_pretrained(gen_file.parent)
    return model, tokenizer


def model_from_state_dict(config, state_dict: dict, dtype, where: Path):
    """`AutoModelForCausalLM.from_config` with `state_dict` as its weights (HF names), tied where the
    config ties them.

    The model is built without weight initialisation (`no_init_weights`: parameter memory is
    allocated but never written), then `load_state_dict(assign=True)` puts the given tensors in place,
    so memory-mapped tensors stay shared, not copied. Not on the meta device: non-persistent buffers
    (LLaMA's RoPE `inv_freq`) are computed at construction and are in no checkpoint."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from models.pipeline import is_tied, tied_head_hf_key

    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    cast = {k: v.to(dtype) if v.is_floating_point() and v.dtype != dtype else v for k, v in state_dict.items()}
    result = model.load_state_dict(cast, strict=False, assign=True)
    model.tie_weights()
    may_miss = {tied_head_hf_key(config)} if is_tied(config) else set()
    missing = sorted(set(result.missing_keys) - may_miss)
    if missing or result.unexpected_keys:
        problems = ([f"missing {', '.join(missing)}"] if missing else []) + (
            [f"unexpected {', '.join(sorted(result.unexpected_keys))}"] if result.unexpected_keys else [])
        raise InferenceError(f"{where}: the layer files do not match the {type(model).__name__} of its config.json: "
                             + "; ".join(problems))
    if is_tied(config) and model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        raise InferenceError(f"{where}: config.json ties the LM head to the embedding, but {type(model).__name__} did not tie them")
    return model


def torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def context_length(config, tokenizer, override: Optional[int]) -> int:
    """Tokens of prompt + reply: `override`, else the model's position limit, else the tokenizer's."""
    if override:
        return override
    for attr in ("max_position_embeddings", "n_positions", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 10**6 else DEFAULT_CONTEXT
