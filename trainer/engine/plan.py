"""A model's pipeline plan, computed once per model and passed along: its folders, HF config, the
prepared config the pipe layers are built from, layer names, parameters per layer, the head and
the split into stages (`model_topo.parts`, explicit or "auto").

Counting parameters builds the layers on the meta device (no memory, no weights read).
"""
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional

import torch
from torch import nn

from models.dtypes import bytes_per_param
from models.pipe_dir import find_side_file, resolve_checkpoint_dir
from models.pipeline import build_layers, head_is_tied, num_blocks, pipe_layer_names, prepare_config
from models.registry import get_architecture
from trainer.engine.auto_parts import AutoPartsError, auto_parts, format_bytes, stage_report
from trainer.engine.memory import memory_budget, memory_settings, stage_memory
from trainer.engine.partition import boundaries_from_parts

logger = logging.getLogger("pipetune")


@dataclass(frozen=True)
class ModelPlan:
    model_path: Path        # what the config names: a hg_to_pp folder, a training save_path or a global_stepN
    side_dir: Path          # the folder with its config.json and tokenizer files
    hf_config: object       # as read from side_dir
    model_config: object    # prepared for pipe layers (attention implementation set, no KV cache)
    head: str               # "lm" | "value"
    layer_names: list       # index-aligned with the layer files: embedding, block.i, final_norm, <head>_head
    layer_params: list      # parameters per pipe layer (a tied head counts the embedding it shares)
    parts: list             # layers per pipeline stage
    frozen: bool = False    # run forward-only with no optimizer (PPO's reference and reward model)

    @property
    def head_index(self) -> int:
        return len(self.layer_names) - 1

    @property
    def boundaries(self) -> list[int]:
        """DeepSpeed's stage boundaries [0, n_0, n_0 + n_1, ..., L]."""
        return boundaries_from_parts(self.parts, len(self.parts), self.layer_names)

    @property
    def n_matmul_params(self) -> int:
        """All parameters but the input embedding lookup do matmuls (a tied head counts once)."""
        return sum(self.layer_params[1:])

    @property
    def n_blocks(self) -> int:
        return num_blocks(self.model_config)

    def stage_memory(self, cfg, start: int, stop: int, stage: int) -> dict:
        """Training-memory estimate (bytes by kind) of a stage holding pipe layers [start, stop)."""
        return stage_memory(self.model_config, self.layer_names, self.layer_params, head_is_tied(self.model_config, self.head),
                            start, stop, stage, memory_settings(cfg, self.model_config, self.frozen, self.generates))

    @property
    def generates(self) -> bool:
        """A trained LM (a policy): the recipe's rollouts, if it makes any, are generated with it."""
        return self.head == "lm" and not self.frozen

    def stage_totals(self, cfg) -> list[float]:
        """The memory estimate of each stage of this split, in bytes."""
        bounds = self.boundaries
        return [sum(self.stage_memory(cfg, bounds[s], bounds[s + 1], s).values()) for s in range(len(self.parts))]

    def describe(self, cfg) -> str:
        """One line per stage: layers, parameter bytes and the training-memory estimate."""
        return stage_report(self.parts, self.layer_names, self.layer_params, bytes_per_param(cfg.precision),
                            lambda start, stop, stage: self.stage_memory(cfg, start, stop, stage))


def model_side_dir(model_path: Path, from_scratch: bool = False) -> Path:
    """The folder with model_path's config.json and tokenizer: model_path itself, or for a
    global_stepN folder of a training run, the save_path above it."""
    if from_scratch or not model_path.is_dir():
        return model_path
    _, search = resolve_checkpoint_dir(model_path)
    found = find_side_file(search, "config.json")
    return found.parent if found is not None else model_path


def layer_param_counts(model_config, head: str = "lm") -> list[int]:
    """Parameters per pipe layer (a tied head counts the embedding it shares), on the meta device."""
    with torch.device("meta"):
        layers = build_layers(model_config, head)
    counts = [sum(p.numel() for p in l.parameters()) if isinstance(l, nn.Module) else 0 for l in layers]
    if counts[-1] == 0:
        counts[-1] = counts[0]
    return counts


def resolve_parts(cfg, model_config, head: str = "lm", counts=None, budget="device", frozen: bool = False) -> list[int]:
    """`model_topo.parts` checked against the model's layers, or the "auto" split: balanced by
    compute, every stage within `budget` bytes ("device": this rank's device memory, None: no limit,
    a list: bytes for each stage); a frozen model's stages hold no gradients or optimizer state."""
    names = pipe_layer_names(model_config, head)
    counts = counts if counts is not None else layer_param_counts(model_config, head)
    if cfg.model_topo.parts == "auto":
        settings = memory_settings(cfg, model_config, frozen, generates=head == "lm" and not frozen)
        tied = head_is_tied(model_config, head)

        def stage_bytes(start, stop, stage):
            return sum(stage_memory(model_config, names, counts, tied, start, stop, stage, settings).values())

        row_width = settings.seq_len  # the recipe's micro-batch width (PPO: prompt + answer columns)
        parts = auto_parts(counts, model_config.hidden_size, row_width, cfg.model_topo.pipe, stage_bytes,
                           memory_budget() if budget == "device" else budget)
    else:
        parts = list(cfg.model_topo.parts)
    boundaries_from_parts(parts, cfg.model_topo.pipe, names)  # raises with the layer list when wrong
    return parts


def plan_model(cfg, head: str = "lm", model_path=None, budget="device", frozen: bool = False) -> ModelPlan:
    """The plan for `model_path` (default: cfg.model_path) with this head and cfg's topology; "auto"
    parts fit `budget` (see resolve_parts)."""
    from transformers import AutoConfig

    path = Path(model_path or cfg.model_path)
    side_dir = model_side_dir(path, cfg.from_scratch)
    hf_config = AutoConfig.from_pretrained(side_dir)
    get_architecture(hf_config.model_type)  # an unknown model_type fails here, listing the supported ones
    model_config = prepare_config(hf_config, "flash_attention_2" if cfg.use_flash_attn else None)
    counts = layer_param_counts(model_config, head)
    parts = resolve_parts(cfg, model_config, head, counts, budget, frozen)
    return ModelPlan(path, side_dir, hf_config, model_config, head, pipe_layer_names(model_config, head), counts, parts,
                     frozen)


# ---------------------------------------------------------------------------------------------
# Several models on the same ranks (PPO's actor, critic, reference and reward model).

class ModelSpec(NamedTuple):
    cfg: object    # the config the model is built with (its own parts and DeepSpeed settings)
    head: str      # "lm" | "value"
    path: object   # its checkpoint
    frozen: bool   # forward only: no gradients or optimizer state


def plan_co_resident(specs: dict, device_budget, what: str, hint: str = "") -> dict:
    """Plans of models that share every rank's device ({key: ModelSpec} -> {key: ModelPlan}, same
    order): "auto" parts must fit them together on each stage. From the compute-balanced splits
    (kept when they fit together):
    1. while some "auto" model does not fit, the one that needs most is re-split within what the
       others leave on each stage (auto_parts with a budget per stage), until all fit or none can
       move (few models move, the rest stay compute-balanced);
    2. if that is not enough: each "auto" model re-split within its share of every stage (its usage
       scaled so that the stage's total meets the budget; when all fit their shares, they fit
       together), then 1. again from there.
    device_budget None: no memory limit. AutoPartsError names `what` (the models) and ends with `hint`."""
    stages = range(next(iter(specs.values())).cfg.model_topo.pipe)
    auto = [key for key, spec in specs.items() if spec.cfg.model_topo.parts == "auto"]
    plans = {key: plan_model(c, head, path, budget=None, frozen=frozen) for key, (c, head, path, frozen) in specs.items()}
    if not auto or device_budget is None:
        return plans
    totals = {key: plan.stage_totals(specs[key].cfg) for key, plan in plans.items()}

    def together() -> list[float]:
        return [sum(t[s] for t in totals.values()) for s in stages]

    def resplit(key, room) -> Optional[str]:  # None when it fits `room`, else why not
        c, head, path, frozen = specs[key]
        try:
            plans[key] = plan_model(c, head, path, budget=room, frozen=frozen)
        except AutoPartsError as e:
            return f"{key}: {e}"
        totals[key] = plans[key].stage_totals(c)
        return None

    def fits() -> bool:
        return all(t <= device_budget for t in together())

    def make_room() -> Optional[str]:  # re-split, needing most first, within what the others leave
        failure, stuck = None, set()  # stuck: cannot fit in what the others leave now
        for _ in range(4 * len(auto)):
            room = {key: [device_budget - sum(totals[o][s] for o in totals if o != key) for s in stages] for key in auto}
            over = [key for key in auto if key not in stuck and any(t > r for t, r in zip(totals[key], room[key]))]
            if fits() or not over:
                break
            key = max(over, key=lambda k: max(totals[k]))
            failure = resplit(key, room[key])
            if failure:
                stuck.add(key)
            else:
                stuck.clear()  # after a move the others' room changed: they may fit now
        return failure

    failure = make_room()
    if not fits():  # every auto model within its share of each stage, then make room again
        fixed = [sum(totals[key][s] for key in totals if key not in auto) for s in stages]
        auto_use = [sum(totals[key][s] for key in auto) for s in stages]
        shares = {key: [totals[key][s] * (device_budget - fixed[s]) / auto_use[s] if auto_use[s] else 0.0 for s in stages]
                  for key in auto}
        for key in auto:
            resplit(key, shares[key])
        failure = make_room() or failure
    if fits():
        return plans
    raise AutoPartsError(
        f"{what} share each rank's {format_bytes(device_budget)} and no "
        f"\"auto\" split of them fits together (now {', '.join(f'stage {s} ~{format_bytes(t)}' for s, t in enumerate(together()))})"
        + (f"; {failure}" if failure else ": use more pipeline stages, ZeRO stage 1 or offload_optimizer, use_grad_ckpt, "
           "or a smaller micro-batch / max_seq_len") + hint)


def log_co_resident(specs: dict, plans: dict, label: str) -> None:
    """Each model's split and memory estimate (but the first's: the recipe logs it with its data), and
    each stage's total over all of them."""
    totals = [0.0] * next(iter(specs.values())).cfg.model_topo.pipe
    for i, (key, plan) in enumerate(plans.items()):
        stage_cfg = specs[key].cfg
        if i:
            logger.info("%s %s: %s\n%s", label, key, plan.model_path, plan.describe(stage_cfg))
        totals = [t + s for t, s in zip(totals, plan.stage_totals(stage_cfg))]
    logger.info("%s: the %d models together: %s", label, len(plans),
                ", ".join(f"stage {s} ~{format_bytes(t)}" for s, t in enumerate(totals)))
