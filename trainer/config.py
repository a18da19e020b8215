"""The training config: one JSON file holding DeepSpeed's own keys (passed through to DeepSpeed)
and pipetune's project keys (documented and validated here, before anything heavy happens).

Project keys (all optional unless marked):

  model_path      (required) a `convert_model.py hg_to_pp` folder (or a training save_path);
                  with from_scratch, any folder with config.json + tokenizer files
  from_scratch    false: load weights from model_path; true: seeded init from its config.json
  save_path       (required) where checkpoints, logs and the loss curve go
  data_path       (required) a .json/.jsonl/.parquet file, a save_to_disk folder, a glob, a folder, or a list of
                  them; an entry may be {"path": ..., "format": "messages" | "sharegpt" | "alpaca" | "preference"
                  | "completion" | "pipetune"} (default: the format is detected per file; docs/data_format.md)
  eval_data_path  separate eval files; or eval_fraction: a share of data_path held out (0 = none)
  data_split      e.g. "2,4,4" with split_index 0 | 1 | 2: use only that disjoint share of data_path's records
                  (seeded by `seed`, DeepSpeed-Chat's data_split; the RLHF command gives each step its share)
  max_seq_len     tokens per row (default 512); pack: pack several records per row (false)
  overflow        over-long records: "truncate" (default; SFT cut on the right, pairwise/prompt context cut
                  on the left so answers keep their EOS), "drop", or "chunk" (pretrain documents split
                  into max_seq_len rows, every token trained once)
  template        "pipetune" (default: pipetune's Human:/Assistant: template) or "model" (the tokenizer's own
                  chat_template, loss on assistant turns only; exports and demo.py then use it too)
  pad_token       the padding token (a token string or id); default: the tokenizer's pad, else unk, else a
                  spare pad-like/reserved special token, else BOS (never EOS; see data.tokenize.choose_pad)
  skip_bad_records  false (strict: any bad record stops the run) | true (drop and count them)
  n_epochs / train_steps  how long to train: train_steps wins when both are given
  model_topo      {"process_topology": {"axes": ["pipe", "data"], "dims": [P, D]}, "parts": [...] | "auto"}
  use_grad_ckpt   activation checkpointing of the transformer blocks (false)
  compile         torch.compile each transformer block (per block, so the pipeline schedule is untouched):
                  true, or an object of torch.compile options ({"backend": ..., "mode": ...}); default false
  chunked_loss    SFT, DPO and the PPO actor: the LM head's matmul and the loss's log-softmax run over chunks
                  of tokens, the backward recomputing each chunk, so the [B,T,V] logits never exist while
                  training, nor in the forward-only log-prob passes (SFT/DPO eval, DPO's reference, PPO's
                  scoring of actor and reference) (true; false: full logits)
  use_flash_attn  flash_attention_2 (LLaMA on CUDA with flash-attn installed) (false); with pack, packed rows
                  go to the kernel padding-free as cu_seqlens (models.stage_io.varlen_kwargs), no mask built
  seed            (1234) data order, init, dropout
  save_interval   steps between checkpoints (0: only at the end); keep_last: checkpoints kept (2)
  eval_interval   steps between evaluations (0: only at the end)
  eval_samples    SFT: at each eval, generate for this many eval-split prompts on the pipeline (greedy, 64 new
                  tokens; or {"n", "max_new_tokens", "greedy", "temperature", ...}) -> save_path/eval_samples.jsonl
  resume          "auto" (continue from save_path/latest when present), "never", or a checkpoint folder
  no_decay        parameter-name patterns without weight decay (default: biases and norm weights)
  stage           which recipe runs (trainer/recipes/__init__.py, the registry): "sft" (causal LM loss on the
                  trained tokens), "rm" (reward model: pairwise records, value head), "dpo" (pairwise
                  records, LM head, preference loss against a frozen reference), "ppo" (prompts; actor,
                  critic, reference and reward model on the same ranks) or "grpo" (prompts; critic-free
                  group-relative RL with reward functions)
  recipe keys     each recipe owns its keys, documents them and checks them in its options class:
                  SFT's eval_samples (trainer/recipes/options.py), DPO's beta, loss_type, label_smoothing,
                  simpo_gamma, sft_coef, ref_path (trainer/rl/dpo.py), PPO's actor_path, critic_path,
                  reward_path, ref_path and "ppo": {...} (trainer/rl/ppo_options.py), GRPO's actor_path,
                  ref_path, reward_path and "grpo": {...} (trainer/rl/grpo_options.py). The validated
                  options are cfg.options.
  cache_dir       tokenized-data cache (default: save_path/.data_cache)
"""
import dataclasses
import difflib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from trainer.engine.deepspeed_config import (
    DEEPSPEED_KEYS,
    batch_problems,
    deepspeed_warnings,
    nested_params_problems,
    precision_and_zero_problems,
)

DEFAULT_NO_DECAY = ("bias", "norm.weight", "layernorm.weight", "ln_f.weight")


class ConfigError(ValueError):
    """One or more problems with the training config; str() lists them, one per line."""

    def __init__(self, path: str, problems: list[str]):
        self.problems = problems
        super().__init__(f"{path}: {len(problems)} problem(s) in the training config:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass
class ModelTopo:
    pipe: int
    data: int
    parts: Union[list[int], str]  # layers per stage, or "auto"


@dataclass
class TrainConfig:
    model_path: str
    save_path: str
    data_path: Any
    model_topo: ModelTopo
    ds_config: dict
    from_scratch: bool = False
    eval_data_path: Any = None
    eval_fraction: float = 0.0
    data_split: Any = None  # "2,4,4" or [2, 4, 4]
    split_index: int = 0
    max_seq_len: int = 512
    pack: bool = False
    overflow: str = "truncate"
    pad_token: Union[str, int, None] = None
    template: str = "pipetune"
    skip_bad_records: bool = False
    n_epochs: Optional[int] = None
    train_steps: Optional[int] = None
    use_grad_ckpt: bool = False
    compile: Any = False  # False | True | {torch.compile keyword arguments}
    chunked_loss: bool = True
    use_flash_attn: bool = False
    seed: int = 1234
    save_interval: int = 0
    keep_last: int = 2
    eval_interval: int = 0
    resume: str = "auto"
    no_decay: tuple = DEFAULT_NO_DECAY
    stage: str = "sft"
    cache_dir: Optional[str] = None
    options: Any = None  # the recipe's typed options (a RecipeOptions subclass), from the recipe's own keys
    config_path: str = ""
    warnings: tuple = ()  # one line each, logged by rank 0 (not a config key)

    # Derived values (DeepSpeed's batch arithmetic).
    @property
    def micro_batch(self) -> int:
        return int(self.ds_config["train_micro_batch_size_per_gpu"])

    @property
    def grad_accum(self) -> int:
        return int(self.ds_config["gradient_accumulation_steps"])

    @property
    def global_batch(self) -> int:
        return int(self.ds_config["train_batch_size"])

    @property
    def precision(self) -> str:
        if self.ds_config.get("bf16", {}).get("enabled") or self.ds_config.get("bfloat16", {}).get("enabled"):
            return "bf16"
        return "fp16" if self.ds_config.get("fp16", {}).get("enabled") else "fp32"

    def micro_batch_shape(self) -> tuple[int, int]:
        """(rows, tokens per row) of one training micro-batch, as the recipe builds it (its options say)."""
        return self.options.micro_batch_shape(self)

    def data_cache_dir(self) -> str:
        return self.cache_dir or os.path.join(self.save_path, ".data_cache")


class RecipeOptions:
    """What a recipe's options class declares (trainer/recipes/__init__.py lists them by stage): the
    top-level config keys it owns, their checks, and the training micro-batch's shape. A subclass is
    a frozen dataclass built from its keys once they passed `problems`."""
    LABEL = ""                     # how messages name the recipe ("DPO")
    KEYS: tuple = ()               # the top-level config keys the recipe owns
    lm_head_loss = True            # the loss reads an LM head (chunked_loss applies; the memory model counts it)

    @classmethod
    def problems(cls, keys: dict, project: dict, ds: dict, pipe: Optional[int]) -> list[str]:
        """What is wrong with the recipe's keys (`keys`: those of KEYS the config gives), given the
        shared project keys and the DeepSpeed keys (batch triple filled in); [] when nothing is."""
        return []

    @classmethod
    def from_keys(cls, keys: dict) -> "RecipeOptions":
        return cls(**keys)

    @classmethod
    def shared_defaults(cls, keys: dict) -> dict:
        """Shared keys the recipe's own keys imply when the config leaves them out."""
        return {}

    def micro_batch_shape(self, cfg) -> tuple[int, int]:
        """(rows, tokens per row) of one training micro-batch as the recipe builds it (memory model, auto parts)."""
        return cfg.micro_batch, cfg.max_seq_len

    def generation_shape(self, cfg):
        """(rows in flight per replica, prompt tokens, new tokens) of the rollouts the trained model
        generates (its KV cache counts in the memory model), or None when the recipe generates none."""
        return None


PROJECT_KEYS = frozenset(f.name for f in dataclasses.fields(TrainConfig)) - {"ds_config", "config_path", "warnings", "options"}
_TYPES = {
    "from_scratch": bool, "eval_fraction": (int, float), "max_seq_len": int, "pack": bool, "overflow": str,
    "skip_bad_records": bool, "n_epochs": int, "split_index": int, "data_split": (str, list), "train_steps": int, "use_grad_ckpt": bool, "use_flash_attn": bool,
    "chunked_loss": bool,
    "seed": int, "save_interval": int, "keep_last": int, "eval_interval": int, "resume": str, "stage": str,
    "model_path": str, "save_path": str, "cache_dir": str, "no_decay": list, "pad_token": (str, int),
    "template": str,
}


def read_config_json(path: str) -> dict:
    """The config file's top-level JSON object; ConfigError (file missing, bad JSON, not an object)."""
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(path, ["file not found"]) from None
    except json.JSONDecodeError as e:
        raise ConfigError(path, [f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}"]) from None
    if not isinstance(raw, dict):
        raise ConfigError(path, ["the top level must be a JSON object"])
    return raw


def validate(raw: dict, path: str, world_size: Optional[int], device_supports_fp16: bool,
             recipes: dict) -> TrainConfig:
    """The shared keys checked here, the recipe's own keys by its options class: `recipes` maps each
    stage to its RecipeOptions subclass (trainer.recipes.validate_config passes the registry's)."""
    problems: list[str] = []
    stage = raw.get("stage", "sft")
    owner = _key_owners(recipes)
    own_class = recipes.get(stage) if isinstance(stage, str) else None
    project = {k: v for k, v in raw.items() if k in PROJECT_KEYS}
    ds = {k: v for k, v in raw.items() if k in DEEPSPEED_KEYS}
    known = PROJECT_KEYS | DEEPSPEED_KEYS | set(owner)
    for key in sorted(set(raw) - known):
        close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
        problems.append(f"unknown key {key!r}" + (f": did you mean {close[0]!r}?" if close else " (see trainer/config.py for the project keys)"))
    own_keys = {k: raw[k] for k in (own_class.KEYS if own_class else ()) if k in raw}
    for key, value in (own_class.shared_defaults(own_keys) if own_class else {}).items():
        project.setdefault(key, value)
    for key in ("model_path", "save_path", "data_path", "model_topo"):
        if key not in raw and key not in project:
            problems.append(f"missing required key {key!r}")
    problems.extend(type_problems(project, _TYPES))
    if any(p.startswith(("missing required", *(f"{k} must be" for k in _TYPES))) for p in problems) or "model_topo" not in raw:
        raise ConfigError(path, problems)

    topo = _validate_topo(raw["model_topo"], world_size, problems)
    _validate_values(project, recipes, problems)
    batch_problems(ds, topo.data if topo else None, problems)
    precision_and_zero_problems(ds, device_supports_fp16, problems)
    if not any(p.startswith(("optimizer must be", "scheduler must be", "zero_optimization must be")) for p in problems):
        nested_params_problems(ds, problems)
    _validate_compile(project, problems)
    problems.extend(_misplaced_recipe_keys(raw, stage, own_class, owner, recipes))
    if own_class is not None:
        problems.extend(own_class.problems(own_keys, project, ds, topo.pipe if topo else None))
    if problems:
        raise ConfigError(path, problems)
    warnings = deepspeed_warnings(ds)
    fields = {k: v for k, v in project.items() if k != "model_topo"}
    if "no_decay" in fields:
        fields["no_decay"] = tuple(fields["no_decay"])
    return TrainConfig(model_topo=topo, ds_config=ds, config_path=str(path), warnings=tuple(warnings),
                       options=own_class.from_keys(own_keys), **fields)


def type_problems(values: dict, types: dict, prefix: str = "") -> list[str]:
    """`KEY must be a number, got "big"` for each key of `types` whose value has another JSON type
    (null passes: it means the default)."""
    out = []
    for key, typ in types.items():
        value = values.get(key)
        if key in values and value is not None and (not isinstance(value, typ) or (typ is int and isinstance(value, bool))):
            out.append(f"{prefix}{key} must be {_type_name(typ)}, got {json.dumps(value)}")
    return out


def section_problems(section: str, raw: dict, keys, numbers=(), integers=(), bools=(), may_be_zero=("top_k",)) -> list[str]:
    """A recipe's config section ("ppo": {...}): unknown keys (naming the known ones), and values of the
    wrong JSON type: finite numbers, integers >= 1 (>= 0 for those in may_be_zero, where 0 disables
    something: top_k), booleans."""
    out = []
    unknown = sorted(set(raw) - set(keys))
    if unknown:
        out.append(f"{section}: unknown keys {unknown} (use {', '.join(keys)})")
    for key in numbers:
        value = raw.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
            out.append(f"{section}.{key} must be a finite number, got {json.dumps(value)}")
    for key in integers:
        value, least = raw.get(key), 0 if key in may_be_zero else 1
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
            out.append(f"{section}.{key} must be an integer >= {least}, got {json.dumps(value)}")
    for key in bools:
        if key in raw and not isinstance(raw[key], bool):
            out.append(f"{section}.{key} must be true or false, got {json.dumps(raw[key])}")
    return out


def _key_owners(recipes: dict) -> dict:
    """Each recipe key -> the first recipe (registry order) owning it (ref_path: DPO and PPO)."""
    owner = {}
    for name, options in recipes.items():
        for key in options.KEYS:
            owner.setdefault(key, name)
    return owner


def _misplaced_recipe_keys(raw: dict, stage: str, own_class, owner: dict, recipes: dict) -> list[str]:
    """Keys of other recipes than `stage`'s, one line per recipe naming them."""
    own = set(own_class.KEYS) if own_class else set()
    out = []
    for name, options in recipes.items():
        given = [k for k in options.KEYS if k in raw and k not in own and owner[k] == name]
        if given and name != stage:
            out.append(f"{', '.join(given)}: {options.LABEL} keys, but stage is {stage!r} (set \"stage\": \"{name}\" or remove them)")
    return out


def _type_name(typ) -> str:
    names = {bool: "true or false", int: "an integer", str: "a string", list: "a list", (int, float): "a number",
             (str, int): "a string or an integer", (str, list): "a string or a list", dict: "an object"}
    return names.get(typ, str(typ))


def _validate_topo(topo: Any, world_size: Optional[int], problems: list[str]) -> Optional[ModelTopo]:
    if not isinstance(topo, dict):
        problems.append('model_topo must be an object: {"process_topology": {"axes": ["pipe", "data"], "dims": [P, D]}, "parts": [...]}')
        return None
    extra = set(topo) - {"process_topology", "parts"}
    if extra:
        problems.append(f"model_topo: unknown keys {sorted(extra)} (use process_topology and parts)")
    pt = topo.get("process_topology")
    if not isinstance(pt, dict) or pt.get("axes") != ["pipe", "data"]:
        problems.append('model_topo.process_topology.axes must be ["pipe", "data"]')
        return None
    dims = pt.get("dims")
    if not (isinstance(dims, list) and len(dims) == 2 and all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in dims)):
        problems.append(f"model_topo.process_topology.dims must be two positive integers [P, D], got {json.dumps(dims)}")
        return None
    pipe, data = dims
    if world_size is not None and pipe * data != world_size:
        problems.append(
            f"model_topo.process_topology.dims {dims}: pipe x data = {pipe * data} but the job has {world_size} ranks "
            f"(WORLD_SIZE); make P x D = {world_size} or launch {pipe * data} ranks"
        )
    parts = topo.get("parts", "auto")
    if parts != "auto" and not (isinstance(parts, list) and all(isinstance(p, int) and not isinstance(p, bool) for p in parts)):
        problems.append(f'model_topo.parts must be a list of layer counts (one per stage) or "auto", got {json.dumps(parts)}')
    elif isinstance(parts, list):
        if len(parts) != pipe:
            problems.append(f"model_topo.parts has {len(parts)} entries but dims[0] says {pipe} pipeline stages")
        if any(p < 1 for p in parts):
            problems.append(f"model_topo.parts {parts}: every stage needs at least one layer")
    return ModelTopo(pipe, data, parts)


def _validate_values(project: dict, recipes: dict, problems: list[str]) -> None:
    from data.packing import OVERFLOW_POLICIES

    if project.get("overflow", "truncate") not in OVERFLOW_POLICIES:
        names = ", ".join(f'"{p}"' for p in OVERFLOW_POLICIES[:-1]) + f' or "{OVERFLOW_POLICIES[-1]}"'
        problems.append(f"overflow must be {names}, got {project['overflow']!r}")
    if project.get("stage", "sft") not in recipes:
        problems.append(f"stage {project['stage']!r} is not available; use one of {list(recipes)}")
    if not 0 <= project.get("eval_fraction", 0) < 1:
        problems.append("eval_fraction must be in [0, 1)")
    if project.get("eval_fraction") and project.get("eval_data_path"):
        problems.append("give eval_data_path or eval_fraction, not both")
    if project.get("data_split") is not None:
        from data.split import parse_data_split

        try:
            n_shares = len(parse_data_split(project["data_split"]))
        except ValueError as e:
            problems.append(str(e))
        else:
            if not 0 <= project.get("split_index", 0) < n_shares:
                problems.append(f"split_index {project['split_index']} is out of range for data_split {project['data_split']!r} "
                                f"({n_shares} shares: 0 .. {n_shares - 1})")
    elif "split_index" in project:
        problems.append("split_index needs data_split (e.g. \"data_split\": \"2,4,4\")")
    _validate_data(project, problems)
    for key in ("max_seq_len", "keep_last"):
        if key in project and project[key] < 1:
            problems.append(f"{key} must be at least 1")
    for key in ("save_interval", "eval_interval", "n_epochs", "train_steps", "seed"):
        if project.get(key) is not None and project[key] < 0:
            problems.append(f"{key} must not be negative")
    if not project.get("n_epochs") and not project.get("train_steps"):
        problems.append("say how long to train: n_epochs and/or train_steps (train_steps wins when both are given)")


def _validate_data(project: dict, problems: list[str]) -> None:
    from data.chat_template import TEMPLATES
    from data.sources import data_path_problems

    if project.get("template", "pipetune") not in TEMPLATES:
        problems.append(f"template must be {' or '.join(repr(t) for t in TEMPLATES)}, got {project['template']!r}")
    for key in ("data_path", "eval_data_path"):
        if project.get(key) is not None:
            problems.extend(data_path_problems(project[key], key))


COMPILE_OPTIONS = ("backend", "mode", "fullgraph", "dynamic", "options")


def _validate_compile(project: dict, problems: list[str]) -> None:
    value = project.get("compile", False)
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(COMPILE_OPTIONS))
        if unknown:
            problems.append(f"compile: unknown torch.compile options {unknown}; use {list(COMPILE_OPTIONS)}")
    elif not isinstance(value, bool):
        problems.append(f'compile must be true, false or an object of torch.compile options (e.g. {{"mode": "max-autotune"}}), '
                        f"got {json.dumps(value)}")
