"""Training memory of each pipeline stage on its device, for `parts: "auto"` and the split report.

Per stage s of P (bytes; N = the stage's parameters, B micro-batch, T sequence length):
  weights      N x (4 fp32 | 2 bf16/fp16)
  gradients    N x (4 fp32 | 2 + 4 bf16/fp16: DeepSpeed's BF16_Optimizer / ZeRO keep an fp32 copy)
  optimizer    N x (fp32 master copy for 16-bit training + optimizer states: Adam 8, Lion 4, SGD 4 with
               momentum else 0), divided by D under ZeRO-1, 0 when offloaded to the CPU
  activations  1F1B keeps P - s micro-batches in flight on stage s, each holding what its blocks save
               for backward: B x T x (elements per token, models.activation_memory) x activation bytes;
               with activation checkpointing only each block's input (H per token) per micro-batch in
               flight, plus one block's full activations while it is recomputed
  head         the last stage's LM head: logits B x T x V in the activation dtype (and their fp32 copy
               in 16-bit training), the loss's log-softmax and its gradient, the logits' gradient (fp32):
               16 bytes per logit at the peak of the micro-batch being processed; with SFT's chunked
               loss two fp32 chunks of trainer.losses.CHUNK_BYTES instead; a value head's output is
               negligible
A frozen model (PPO's reference and reward model: forward-only passes, no optimizer) holds its
weights and the working set of the micro-batch being processed: one block's activations, the
stage's input and output, and on an LM head two fp32 chunks of logits (forward_only's
deferred_logits: log-probs chunk by chunk); with chunked_loss off, the logits of the two
micro-batches the pipeline keeps, normalised one fp32 chunk at a time. PPO's four models share
each device: trainer.engine.plan.plan_co_resident fits their "auto" splits together.
The activation dtype is the training precision's (fp32 on fp32 runs). Not counted: the optimizer
step's temporaries (torch's foreach AdamW: one parameter-sized buffer), which exist only after the
backward has freed the activations, and the communication buffers (a few micro-batch activations).
Measured on 2 CPU ranks (bench/memory.py, docs/benchmarks.md): the estimate is within 25% of the
peak live memory of each stage.
"""
import os
from dataclasses import dataclass
from typing import Optional

from compat.private_api import attn_implementation
from models.dtypes import bytes_per_param
from models.registry import get_architecture
from trainer.losses import CHUNK_BYTES

ADAM_LIKE = ("adam", "adamw", "fusedadam", "cpuadam", "deepspeedcpuadam", "onebitadam", "zerooneadam", "lamb")
ONE_STATE = ("lion", "lionpytorch", "lion_pytorch", "lion-pytorch", "adagrad")


@dataclass(frozen=True)
class MemorySettings:
    param_bytes: int          # weights and activations: 4 fp32, 2 bf16/fp16
    grad_bytes: float         # per parameter
    optimizer_bytes: float    # per parameter on the device (master copy + states, ZeRO-1 / offload applied)
    micro_batch: int
    seq_len: int
    stages: int
    grad_ckpt: bool
    attn_implementation: str
    chunked_head: bool = False  # the loss computes the LM head chunk by chunk (chunked_loss: SFT, DPO, PPO)
    frozen: bool = False        # forward-only, no gradients or optimizer (PPO's reference and reward model)
    # the rollouts this model generates (PPO's actor), per replica: rows in flight, prompt and answer tokens
    generation_rows: int = 0
    generation_prompt: int = 0
    generation_new: int = 0


def optimizer_state_bytes(optimizer: dict, precision: str) -> float:
    """Optimizer state per parameter before ZeRO/offload: states (fp32) + the fp32 master copy of
    16-bit training."""
    kind = str(optimizer.get("type", "adamw")).lower().replace(" ", "")
    params = optimizer.get("params", {}) or {}
    if kind in ADAM_LIKE:
        states = 8.0
    elif kind in ONE_STATE:
        states = 4.0
    elif kind == "sgd":
        states = 4.0 if params.get("momentum", 0) else 0.0
    else:
        states = 8.0  # unknown: assume Adam's two states
    return states + (4.0 if precision in ("bf16", "fp16") else 0.0)


def memory_settings(cfg, model_config, frozen: bool = False, generates: bool = False) -> MemorySettings:
    """The memory-relevant settings of a model trained (or, frozen, only run forward) with cfg;
    generates: it also generates the recipe's rollouts (cfg.options.generation_shape)."""
    precision = cfg.precision
    ds = cfg.ds_config
    zero = ds.get("zero_optimization", {}) or {}
    optimizer = optimizer_state_bytes(ds.get("optimizer", {}) or {}, precision)
    if (zero.get("offload_optimizer") or {}).get("device") in ("cpu", "nvme"):
        optimizer = 0.0
    elif zero.get("stage", 0) >= 1:
        optimizer /= cfg.model_topo.data
    grads = 4.0 if precision == "fp32" else 2.0 + 4.0
    rows, seq_len = cfg.micro_batch_shape()
    if frozen:
        grads, optimizer = 0.0, 0.0
    generation = cfg.options.generation_shape(cfg) if generates else None
    return MemorySettings(bytes_per_param(precision), grads, optimizer, rows, seq_len,
                          cfg.model_topo.pipe, cfg.use_grad_ckpt, attn_implementation(model_config) or "sdpa",
                          chunked_head=cfg.options.lm_head_loss and cfg.chunked_loss,
                          frozen=frozen, **(dict(zip(("generation_rows", "generation_prompt", "generation_new"), generation))
                                            if generation else {}))


def stage_memory(model_config, layer_names: list, layer_params: list, tied_head: bool, start: int, stop: int,
                 stage: int, settings: MemorySettings) -> dict:
    """Bytes of stage `stage` holding pipe layers [start, stop): weights, gradients, optimizer,
    activations, head (see the module docstring). layer_params counts a tied head's embedding on
    the head's stage (DeepSpeed keeps a copy there); a stage holding both shares one copy."""
    arch = get_architecture(model_config.model_type)
    names = layer_names[start:stop]
    params = sum(layer_params[start:stop])
    if tied_head and start == 0 and stop == len(layer_params):
        params -= layer_params[-1]
    tokens = settings.micro_batch * settings.seq_len
    hidden = model_config.hidden_size
    act_bytes = settings.param_bytes
    in_flight = settings.stages - stage
    n_blocks = sum(1 for n in names if n.startswith("block."))
    per_block = 0.0
    if arch.block_activation_elements is not None:
        per_block = arch.block_activation_elements(model_config, settings.attn_implementation, settings.seq_len) * tokens * act_bytes
    if settings.frozen:  # no_grad: only the micro-batch being processed, one block at a time
        activations = (per_block + 2 * hidden * tokens * act_bytes) if n_blocks else 0.0
    elif settings.grad_ckpt:
        activations = n_blocks * hidden * tokens * act_bytes * in_flight + (per_block if n_blocks else 0.0)
    else:
        activations = n_blocks * per_block * in_flight
    if "final_norm" in names:
        activations += 2 * hidden * tokens * act_bytes * (1 if settings.frozen else in_flight)
    head = 0.0
    if "lm_head" in names:
        chunk = min(tokens, max(1, CHUNK_BYTES // (4 * model_config.vocab_size)))
        if settings.frozen and not settings.chunked_head:  # the pipeline keeps two micro-batches' logits
            head = 2 * tokens * model_config.vocab_size * act_bytes + 2.0 * chunk * model_config.vocab_size * 4
        elif settings.chunked_head:  # one fp32 chunk of logits in the loss's forward and backward, and a temporary
            head = 2.0 * chunk * model_config.vocab_size * 4
        else:
            head = tokens * model_config.vocab_size * (act_bytes + 4 + 4 + 4 + (2 if act_bytes != 4 else 0))
    out = {"weights": params * settings.param_bytes, "gradients": params * settings.grad_bytes,
           "optimizer": params * settings.optimizer_bytes, "activations": activations, "head": head}
    if settings.generation_rows:  # the rollout's generation runs while no training activation is live
        out["generation"] = max(0.0, generation_bytes(model_config, names, n_blocks, settings) - activations - head)
    return out


def generation_bytes(model_config, names: list, n_blocks: int, settings: MemorySettings) -> float:
    """Peak bytes of generating the recipe's rollout on a stage (trainer.generation.decoding), beside the
    weights: the KV cache of every row in flight (all the replica's rows; K and V per block, in the
    activation dtype) plus the larger of two moments: the prefill of one micro-batch (P micro-batches in
    flight; no grad, one block's transients at a time: its hidden states and MLP intermediates) over the
    prompts' cache, and the last decoding step over the full cache with the last stage's sampling buffers
    (a few fp32 [rows, V]). Only the newest position reaches the head. Checked against measured peaks by
    bench/memory.py --generate (docs/benchmarks.md)."""
    rows = settings.generation_rows
    if not rows or not n_blocks and "lm_head" not in names:
        return 0.0
    act = settings.param_bytes
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
    kv_heads = getattr(model_config, "num_key_value_heads", None) or model_config.num_attention_heads
    kv_per_token = n_blocks * rows * 2 * kv_heads * head_dim * act
    micro_rows = -(-rows // max(1, min(settings.stages, rows)))
    hidden = model_config.hidden_size
    intermediate = getattr(model_config, "intermediate_size", None) or 4 * hidden
    prefill = micro_rows * settings.generation_prompt * (4 * hidden + 2 * intermediate) * act if n_blocks else 0.0
    sampling = 4 * rows * model_config.vocab_size * 4 if "lm_head" in names else 0.0
    return max(kv_per_token * settings.generation_prompt + prefill,
               kv_per_token * (settings.generation_prompt + settings.generation_new) + sampling)


def memory_budget(local_ranks: Optional[int] = None) -> Optional[float]:
    """Bytes one rank may use: 90% of its GPU's memory less 1 GiB for the CUDA context and
    allocator slack; on the CPU, 90% of the machine's RAM shared by its local ranks."""
    import torch

    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        return 0.9 * (total - 2**30)
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None
    local = local_ranks or int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", 1)))
    return 0.9 * ram / max(local, 1)
