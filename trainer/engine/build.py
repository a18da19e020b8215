"""Build the DeepSpeed pipeline engine for a validated TrainConfig and a ModelPlan.

Order matters: layers are built, weights are loaded strictly from the model path (DeepSpeed's own
`load_state_dir`, each file read with weights_only=True: compat.checkpoint_files), and only then is
`deepspeed.initialize` called. Loading after initialize is silently undone in bf16: the optimizer's
fp32 master weights overwrite the module at the first step.
"""
import contextlib
import copy
import gc
import io
import logging

import torch
from torch import nn

from compat.checkpoint_files import load_state_dir_weights_only
from compat.private_api import (
    clip_fp32_gradients_over_whole_pipeline,
    local_layers,
    partitioned_pipeline_module_class,
    synchronize_tied_weights,
)
from models.pipe_dir import layer_file_name, read_metadata, resolve_checkpoint_dir
from models.pipeline import build_layer_specs
from models.registry import get_architecture
from trainer.config import TrainConfig
from trainer.engine.optim import build_lion_pytorch, check_deepspeed_lion, is_lion_pytorch, param_groups
from trainer.engine.plan import ModelPlan
from trainer.engine.topology import Topology
from trainer.files import load_tensors, on_every_rank

logger = logging.getLogger(__name__)


def build_pipeline_module(plan: ModelPlan, topo: Topology, loss_fn=None, grad_ckpt: bool = False, compile=False):
    """The PipelineModule of this rank's stage (layers built on the CPU, weights uninitialised).
    compile: True or torch.compile options: each block of the stage is compiled on its own
    (`nn.Module.compile`, in place), so DeepSpeed's schedule and checkpoint files are unchanged."""
    arch = get_architecture(plan.model_config.model_type)
    with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed prints every stage's layers on each rank (log_plan says it once)
        module = partitioned_pipeline_module_class()(
            build_layer_specs(plan.model_config, plan.head),
            boundaries=plan.boundaries,
            topology=topo.deepspeed_topology(),
            loss_fn=loss_fn,
            activation_checkpoint_interval=1 if grad_ckpt else 0,
            # Only blocks: checkpointing the embedding fails (its input needs no grad).
            checkpointable_layers=[arch.block.__name__] if grad_ckpt else None,
        )
    if compile:
        compile_blocks(module, arch.block, {} if compile is True else dict(compile))
    return module


def compile_blocks(module, block_class: type, options: dict) -> int:
    """torch.compile every block of this stage in place; returns how many were compiled."""
    n = 0
    for _, layer in local_layers(module):
        if isinstance(layer, block_class):
            layer.compile(**options)
            n += 1
    return n


def load_weights(module, plan: ModelPlan, seed: int) -> None:
    """Strictly from plan.model_path (a hg_to_pp folder, a training save_path or a global_stepN).
    A value-head pipeline (RM, PPO critic) loaded from an LM checkpoint takes every layer but the
    head, whose weights are then the seeded init; from a value-head checkpoint, every layer."""
    layer_dir, search = resolve_checkpoint_dir(plan.model_path)
    source_head = read_metadata(search).get("head", "lm")
    if source_head == plan.head:
        load_state_dir_weights_only(module, layer_dir)  # collective: a refused file stops every rank
        return
    init_head(module, plan.model_config, seed, plan.head_index)

    def load_all_but_head():
        for index, layer in local_layers(module):
            if index == plan.head_index or not hasattr(layer, "load_state_dict"):
                continue
            path = layer_dir / layer_file_name(index)
            if not path.is_file():
                raise FileNotFoundError(f"{path}: missing layer file for pipe layer {index} ({plan.layer_names[index]})")
            layer.load_state_dict(load_tensors(path), strict=True)
    on_every_rank(load_all_but_head)
    synchronize_tied_weights(module)


def init_head(module, model_config, seed: int, head_index: int) -> None:
    """Seeded normal(0, initializer_range) init of a new head (e.g. the RM's value head)."""
    std = getattr(model_config, "initializer_range", 0.02)
    for index, layer in local_layers(module):
        if index != head_index or not isinstance(layer, nn.Module):
            continue
        gen = torch.Generator().manual_seed(seed * 100003 + head_index)
        with torch.no_grad():
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def init_from_scratch(module, model_config, seed: int) -> None:
    """HF-style init (normal(0, initializer_range) for linear/embedding weights, zero biases, unit
    norms), seeded per global layer index so the weights do not depend on the partition."""
    std = getattr(model_config, "initializer_range", 0.02)
    for index, layer in local_layers(module):
        if not isinstance(layer, nn.Module):
            continue
        gen = torch.Generator().manual_seed(seed * 100003 + index)
        for sub in layer.modules():
            if isinstance(sub, (nn.Linear, nn.Embedding)):
                with torch.no_grad():
                    sub.weight.copy_(torch.randn(sub.weight.shape, generator=gen) * std)
                    if getattr(sub, "bias", None) is not None:
                        sub.bias.zero_()
            elif hasattr(sub, "weight") and sub.weight is not None and sub.weight.dim() == 1 and "norm" in type(sub).__name__.lower():
                with torch.no_grad():
                    sub.weight.fill_(1.0)
                    if getattr(sub, "bias", None) is not None:
                        sub.bias.zero_()
    synchronize_tied_weights(module)


def build_engine(cfg: TrainConfig, plan: ModelPlan, topo: Topology, total_steps: int, weights: str, loss_fn):
    """The trained pipeline's DeepSpeed engine. weights: "load" (strictly from plan.model_path),
    "init" (from_scratch) or "checkpoint" (the caller resumes with engine.load_checkpoint, which
    restores module and optimizer together)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    module = build_pipeline_module(plan, topo, loss_fn, cfg.use_grad_ckpt, cfg.compile)
    if weights == "load":
        load_weights(module, plan, cfg.seed)
    elif weights == "init":
        init_from_scratch(module, plan.model_config, cfg.seed)
    # fp16/bf16: deepspeed.initialize casts parameters (buffers such as RoPE's inv_freq stay fp32).

    ds_config = copy.deepcopy(cfg.ds_config)
    fill_scheduler_steps(ds_config, total_steps)
    groups = param_groups(module, cfg.no_decay)
    check_deepspeed_lion(ds_config, on_cuda=get_accelerator().device_name() == "cuda")
    optimizer = None
    if is_lion_pytorch(ds_config):
        optimizer = build_lion_pytorch(groups, ds_config.pop("optimizer").get("params", {}))
        if ds_config.get("zero_optimization", {}).get("stage", 0) >= 1:
            ds_config.setdefault("zero_allow_untested_optimizer", True)
    engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=groups, optimizer=optimizer, config=ds_config)
    clip_fp32_gradients_over_whole_pipeline(engine)
    return engine


def disable_dropout(module: nn.Module) -> int:
    """Dropout off in training mode too (PPO: the ratio of the training forward to the rollout's
    log-probs must be 1 before any update, as TRL's disable_dropout and DeepSpeed-Chat's
    --disable_actor_dropout do): every nn.Dropout's p and the float dropout rates transformers' layers
    read at forward time (LLaMA's attention_dropout, BLOOM's hidden_dropout) set to 0. Returns how
    many were set."""
    n = 0
    for sub in module.modules():
        if isinstance(sub, nn.Dropout):
            sub.p = 0.0
            n += 1
        for name in ("attention_dropout", "hidden_dropout"):
            if isinstance(getattr(sub, name, None), float):
                setattr(sub, name, 0.0)
                n += 1
    return n


def fill_scheduler_steps(ds_config: dict, total_steps: int) -> None:
    """DeepSpeed's decaying schedules need the run length: computed from the data and epochs."""
    sched = ds_config.get("scheduler")
    if sched and sched.get("type") in ("WarmupDecayLR", "WarmupCosineLR"):
        params = sched.setdefault("params", {})
        params.setdefault("total_num_steps", max(total_steps, 1))
        params["warmup_num_steps"] = min(params.get("warmup_num_steps", 0), max(total_steps - 1, 0))


def frozen_ds_config(cfg) -> dict:
    """DeepSpeed config of a frozen, forward-only engine: the batch keys and precision only."""
    keep = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "bf16", "bfloat16",
            "fp16", "steps_per_print")
    return {k: v for k, v in cfg.ds_config.items() if k in keep}


@contextlib.contextmanager
def frozen_engine(cfg, plan, topo):
    """Collective: a forward-only pipeline engine of `plan` (weights from plan.model_path, no
    optimizer, no gradients), freed on exit: DPO's reference, PPO's reference and reward model."""
    import deepspeed

    module = build_pipeline_module(plan, topo)
    load_weights(module, plan, cfg.seed)
    module.requires_grad_(False)
    engine, _, _, _ = deepspeed.initialize(model=module, config=frozen_ds_config(cfg))
    try:
        yield engine
    finally:
        del engine, module
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
