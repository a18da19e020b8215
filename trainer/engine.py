"""Build the DeepSpeed pipeline engine for a validated TrainConfig.

Order matters: layers are built, weights are loaded strictly from model_path (DeepSpeed's own
`load_state_dir`), and only then is `deepspeed.initialize` called. Loading after initialize is
silently undone in bf16, where the optimizer's fp32 master weights overwrite the module at the
first step (DESIGN.md section 5).
"""
import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from models.pipeline import build_layer_specs, pipe_layer_names, prepare_config
from models.registry import get_architecture
from models.pipe_dir import read_metadata, resolve_checkpoint_dir

from .auto_parts import auto_parts, stage_report
from .config import TrainConfig
from .losses import global_token_mean_loss
from .optim import build_lion_pytorch, check_deepspeed_lion, is_lion_pytorch, param_groups
from .partition import boundaries_from_parts
from .pipe_module import PartitionedPipelineModule

logger = logging.getLogger(__name__)


@dataclass
class Built:
    engine: object
    module: PartitionedPipelineModule
    model_config: object
    parts: list[int]
    layer_names: list[str]
    head: str


def layer_param_counts(model_config, head: str = "lm") -> list[int]:
    """Parameters per pipe layer (a tied head counts the embedding it shares), on the meta device."""
    from models.pipeline import build_layers

    with torch.device("meta"):
        layers = build_layers(model_config, head)
    counts = [sum(p.numel() for p in l.parameters()) if isinstance(l, nn.Module) else 0 for l in layers]
    if counts[-1] == 0:
        counts[-1] = counts[0]
    return counts


def resolve_parts(cfg: TrainConfig, model_config, head: str = "lm") -> list[int]:
    names = pipe_layer_names(model_config, head)
    counts = layer_param_counts(model_config, head)
    if cfg.model_topo.parts == "auto":
        parts = auto_parts(counts, model_config.hidden_size, cfg.max_seq_len, cfg.model_topo.pipe)
    else:
        parts = list(cfg.model_topo.parts)
    boundaries_from_parts(parts, cfg.model_topo.pipe, names)  # raises with the layer list when wrong
    return parts


def describe_split(cfg: TrainConfig, model_config, parts: list[int], head: str = "lm") -> str:
    bytes_per_param = {"fp32": 4, "bf16": 2, "fp16": 2}[cfg.precision]
    return stage_report(parts, pipe_layer_names(model_config, head), layer_param_counts(model_config, head),
                        bytes_per_param, model_config.hidden_size, cfg.max_seq_len, cfg.micro_batch,
                        model_config.num_attention_heads)


def init_head(module: PartitionedPipelineModule, model_config, seed: int, head_index: int) -> None:
    """Seeded normal(0, initializer_range) init of a new head (e.g. the RM's value head)."""
    std = getattr(model_config, "initializer_range", 0.02)
    local = head_index - module._local_start
    if not 0 <= local < len(module.forward_funcs) or not isinstance(module.forward_funcs[local], nn.Module):
        return
    gen = torch.Generator().manual_seed(seed * 100003 + head_index)
    with torch.no_grad():
        for p in module.forward_funcs[local].parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def init_from_scratch(module: PartitionedPipelineModule, model_config, seed: int) -> None:
    """HF-style init (normal(0, initializer_range) for linear/embedding weights, zero biases, unit
    norms), seeded per global layer index so the weights do not depend on the partition."""
    std = getattr(model_config, "initializer_range", 0.02)
    for local, layer in enumerate(module.forward_funcs):
        if not isinstance(layer, nn.Module):
            continue
        gen = torch.Generator().manual_seed(seed * 100003 + module._local_start + local)
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
    module._synchronize_tied_weights()


def build_engine(cfg: TrainConfig, hf_config, total_steps: int, weights: str, head: str = "lm",
                 loss_fn=global_token_mean_loss) -> Built:
    """weights: "load" (strictly from cfg.model_path), "init" (from_scratch) or "checkpoint" (the
    caller resumes with engine.load_checkpoint, which restores module and optimizer together).

    Loading a value-head pipeline (RM, PPO critic) from an LM checkpoint takes every layer but the
    head, whose weights are then the seeded init; from a value-head checkpoint, every layer."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

    get_architecture(hf_config.model_type)
    model_config = prepare_config(hf_config, "flash_attention_2" if cfg.use_flash_attn else None)
    parts = resolve_parts(cfg, model_config, head)
    names = pipe_layer_names(model_config, head)
    arch = get_architecture(model_config.model_type)
    module = PartitionedPipelineModule(
        build_layer_specs(model_config, head),
        boundaries=boundaries_from_parts(parts, cfg.model_topo.pipe, names),
        topology=PipeDataParallelTopology(num_pp=cfg.model_topo.pipe, num_dp=cfg.model_topo.data),
        loss_fn=loss_fn,
        activation_checkpoint_interval=1 if cfg.use_grad_ckpt else 0,
        # Only blocks: checkpointing the embedding fails (its input needs no grad).
        checkpointable_layers=[arch.block.__name__] if cfg.use_grad_ckpt else None,
    )
    if weights == "load":
        # model_path: a hg_to_pp folder, or a training save_path (its `latest` tag) / global_stepN.
        layer_dir, search = resolve_checkpoint_dir(Path(cfg.model_path))
        source_head = read_metadata(search).get("head", "lm")
        if source_head == head:
            module.load_state_dir(str(layer_dir), checkpoint_engine=TorchCheckpointEngine(), strict=True)
        else:
            init_head(module, model_config, cfg.seed, len(names) - 1)
            module.load_state_dir_except(str(layer_dir), TorchCheckpointEngine(), skip={len(names) - 1})
    elif weights == "init":
        init_from_scratch(module, model_config, cfg.seed)
    # fp16/bf16: deepspeed.initialize casts parameters (buffers such as RoPE's inv_freq stay fp32).

    ds_config = copy.deepcopy(cfg.ds_config)
    _fill_scheduler_steps(ds_config, total_steps)
    groups = param_groups(module, cfg.no_decay)
    check_deepspeed_lion(ds_config, on_cuda=get_accelerator().device_name() == "cuda")
    optimizer = None
    if is_lion_pytorch(ds_config):
        optimizer = build_lion_pytorch(groups, ds_config.pop("optimizer").get("params", {}))
        if ds_config.get("zero_optimization", {}).get("stage", 0) >= 1:
            ds_config.setdefault("zero_allow_untested_optimizer", True)
    engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=groups, optimizer=optimizer, config=ds_config)
    _record_grad_norm(engine)
    return Built(engine, module, model_config, parts, names, head)


def _fill_scheduler_steps(ds_config: dict, total_steps: int) -> None:
    """DeepSpeed's decaying schedules need the run length: computed from the data and epochs."""
    sched = ds_config.get("scheduler")
    if sched and sched.get("type") in ("WarmupDecayLR", "WarmupCosineLR"):
        params = sched.setdefault("params", {})
        params.setdefault("total_num_steps", max(total_steps, 1))
        params["warmup_num_steps"] = min(params.get("warmup_num_steps", 0), max(total_steps - 1, 0))


def _record_grad_norm(engine) -> None:
    """Gradient clipping in plain fp32 over the *whole* pipeline, and the norm kept for logging.

    DeepSpeed 0.19's fp32 path (`clip_fp32_gradients` -> `runtime.utils.clip_grad_norm_`) counts only
    the gradients of parameters on the rank whose model-parallel rank is 0 (with a pipeline grid that
    is the first stage) before summing over the stages, so the clipping norm ignores every later stage
    (measured: 2-stage SGD drifted from the single-process loop by 4e-3 in loss after one clipped
    step). It also keeps no norm to log. This wraps that one method of this engine instance: the
    squared norms of each stage's gradients (a tied weight counted once, on its first stage) are
    summed over the pipeline group, and gradients are scaled like torch.nn.utils.clip_grad_norm_.
    Data-parallel replicas hold identical, already averaged gradients at this point.
    DeepSpeed's fp16/bf16/ZeRO optimizers compute and keep their own norms.
    """
    import deepspeed.comm as dist

    from .distributed import collective_device

    if engine.fp16_enabled() or engine.bfloat16_enabled() or engine.zero_optimization():
        return
    module = engine.module
    rank = dist.get_rank()
    counted_elsewhere = set()
    for key, comm in module.tied_comms.items():
        if rank != min(comm["ranks"]):
            for attr in comm["weight_attr"]:
                counted_elsewhere.add(id(module._recursive_getattr(module.tied_modules[key], attr)))

    def clip_and_record():
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        local = torch.zeros((), dtype=torch.float32, device=grads[0].device if grads else collective_device())
        for p in module.parameters():
            if p.grad is not None and id(p) not in counted_elsewhere:
                local += p.grad.detach().float().pow(2).sum()
        dist.all_reduce(local, group=engine.grid.get_pipe_parallel_group())
        norm = float(local.sqrt())
        coef = engine.gradient_clipping() / (norm + 1e-6)
        if coef < 1.0:
            for g in grads:
                g.mul_(coef)
        engine._global_grad_norm = norm

    engine.clip_fp32_gradients = clip_and_record
