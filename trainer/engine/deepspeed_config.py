"""DeepSpeed's own keys in the training config: passed through to DeepSpeed untouched, but checked
before launch where DeepSpeed would fail late (or not at all): the batch triple, precision and ZeRO
with the pipeline engine, optimizers ZeRO refuses. trainer/config.py calls these for the shared config."""
import json
from typing import Optional

# DeepSpeed's top-level config keys (DeepSpeed 0.19): these pass through untouched.
DEEPSPEED_KEYS = frozenset({
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer", "scheduler",
    "bf16", "bfloat16", "fp16", "amp", "zero_optimization", "gradient_clipping", "steps_per_print", "wall_clock_breakdown",
    "tensorboard", "csv_monitor", "wandb", "comet", "flops_profiler", "activation_checkpointing", "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer", "communication_data_type", "prescale_gradients", "gradient_predivide_factor",
    "sparse_gradients", "dump_state", "data_types", "pipeline", "checkpoint", "aio", "memory_breakdown", "elasticity",
    "autotuning", "compression_training", "data_efficiency", "timers", "torch_autocast", "disable_allgather",
    "seq_parallel_communication_data_type", "graph_harvesting", "use_data_before_expert_parallelism", "sparse_attention",
    "eigenvalue", "progressive_layer_drop", "curriculum_learning", "nebula", "weight_quantization",
    "load_universal_checkpoint", "use_node_local_storage", "hybrid_engine", "dataloader_drop_last",
})

def batch_problems(ds: dict, data_parallel: Optional[int], problems: list[str]) -> None:
    """Fill DeepSpeed's batch triple the way DeepSpeed does, and check it multiplies out."""
    tb, mb, ga = (ds.get(k) for k in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"))
    for name, v in (("train_batch_size", tb), ("train_micro_batch_size_per_gpu", mb), ("gradient_accumulation_steps", ga)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            problems.append(f"{name} must be a positive integer, got {json.dumps(v)}")
            return
    if data_parallel is None:
        return
    d = data_parallel
    # DeepSpeed's rules: any two of the three determine the third; gradient_accumulation_steps
    # alone defaults to 1.
    if mb is None and tb is None:
        problems.append("give train_micro_batch_size_per_gpu (rows per micro-batch) and/or train_batch_size")
        return
    if mb is None:
        ga = ga or 1
        if tb % (ga * d):
            problems.append(f"train_batch_size {tb} is not a multiple of gradient_accumulation_steps {ga} x data-parallel size {d}")
            return
        mb = tb // (ga * d)
    if ga is None and tb is not None:
        if tb % (mb * d):
            problems.append(f"train_batch_size {tb} is not a multiple of train_micro_batch_size_per_gpu {mb} x data-parallel size {d}")
            return
        ga = tb // (mb * d)
    ga = ga or 1
    if tb is None:
        tb = mb * ga * d
    if tb != mb * ga * d:
        problems.append(
            f"batch sizes do not multiply out: train_batch_size {tb} != train_micro_batch_size_per_gpu {mb} x "
            f"gradient_accumulation_steps {ga} x data-parallel size {d} = {mb * ga * d}"
        )
        return
    ds.update(train_batch_size=tb, train_micro_batch_size_per_gpu=mb, gradient_accumulation_steps=ga)


def precision_and_zero_problems(ds: dict, device_supports_fp16: bool, problems: list[str]) -> None:
    not_objects = [key for key in ("fp16", "bf16", "bfloat16", "zero_optimization", "optimizer", "scheduler")
                   if key in ds and not isinstance(ds[key], dict)]
    for key in not_objects:
        problems.append(f"{key} must be an object (e.g. {{\"enabled\": true}} / {{\"stage\": 1}}), got {json.dumps(ds[key])}")
    if not_objects:
        return
    fp16 = ds.get("fp16", {}).get("enabled", False)
    bf16 = ds.get("bf16", {}).get("enabled", False) or ds.get("bfloat16", {}).get("enabled", False)
    if fp16 and bf16:
        problems.append("fp16 and bf16 are both enabled: choose one")
    if fp16 and not device_supports_fp16:
        problems.append("fp16 is enabled but this device cannot train in fp16 (DeepSpeed's CPU accelerator): use bf16 or fp32")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1):
        problems.append(
            f"zero_optimization.stage {stage}: the pipeline engine supports ZeRO stage 0 or 1 only (stage 2/3 partition "
            "gradients/parameters, which pipeline parallelism does not allow); use stage 1, optionally with offload_optimizer"
        )
    optimizer = ds.get("optimizer") or {}
    kind = str(optimizer.get("type", "adamw")).lower()
    if (stage == 1 and kind not in ZERO_TESTED_OPTIMIZERS and kind not in ("lionpytorch", "lion_pytorch", "lion-pytorch")
            and not ds.get("zero_allow_untested_optimizer")):
        problems.append(f'optimizer type {optimizer.get("type")!r} with zero_optimization stage 1: DeepSpeed refuses optimizers '
                        'it has not tested with ZeRO; add "zero_allow_untested_optimizer": true to use it anyway, or use '
                        "AdamW, Adam, Adagrad or Lion")
    if bf16 and stage == 0 and _accumulates_in_fp32(ds):
        problems.append(
            'data_types.grad_accum_dtype "fp32" with bf16 needs zero_optimization {"stage": 1} (DeepSpeed has no fp32 '
            "accumulation for bf16 at ZeRO stage 0)")


def deepspeed_warnings(ds: dict) -> list[str]:
    """One line each: settings DeepSpeed accepts that lose precision or misbehave."""
    return _precision_warnings(ds) + _optimizer_warnings(ds)


def _precision_warnings(ds: dict) -> list[str]:
    """bf16 gradients accumulated in bf16 over several micro-batches lose precision (DeepSpeed warns
    too): measured 0.6-1.6% gradient error over 32 micro-batches. ZeRO-1 with fp32 accumulation avoids
    it, and only with an fp32 communication_data_type: DeepSpeed's gradient all-reduce otherwise casts
    the fp32 sums back to bf16 (even with one replica) before the optimizer sees them."""
    bf16 = ds.get("bf16", {}).get("enabled", False) or ds.get("bfloat16", {}).get("enabled", False)
    accum = ds.get("gradient_accumulation_steps", 1)
    fp32_comm = str(ds.get("communication_data_type", "")).lower() in ("fp32", "float32", "float")
    if bf16 and accum > 1 and not (_accumulates_in_fp32(ds) and fp32_comm):
        return [f"bf16 with gradient_accumulation_steps {accum} accumulates gradients in bf16 (about 1% gradient error over "
                'dozens of micro-batches): add "zero_optimization": {"stage": 1}, "data_types": {"grad_accum_dtype": "fp32"} '
                'and "communication_data_type": "fp32"']
    return []


def _optimizer_warnings(ds: dict) -> list[str]:
    optimizer = ds.get("optimizer") if isinstance(ds.get("optimizer"), dict) else {}
    offload = ((ds.get("zero_optimization") or {}).get("offload_optimizer") or {}).get("device")
    if str(optimizer.get("type", "")).lower() == "lion" and offload == "cpu":
        return ['DeepSpeed\'s CPU Lion (offload_optimizer) moves every parameter whose update is zero (no gradient: the '
                "pad row, embeddings of tokens not in the batch) by lr at every step; lion-pytorch leaves them alone: "
                'use "type": "LionPytorch"']
    return []


# DeepSpeed's config optimizer types it builds as ZeRO-supported classes (deepspeed/runtime/zero/utils.py).
ZERO_TESTED_OPTIMIZERS = ("adam", "adamw", "adagrad", "lion")


def _accumulates_in_fp32(ds: dict) -> bool:
    """data_types.grad_accum_dtype names fp32 (DeepSpeed's spellings of it)."""
    data_types = ds.get("data_types")
    return isinstance(data_types, dict) and str(data_types.get("grad_accum_dtype", "")).lower() in ("fp32", "float32", "float")
