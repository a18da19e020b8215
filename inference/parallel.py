"""Where generation runs: one process, or N ranks under `deepspeed --num_gpus N` with the model split
by DeepSpeed's AutoTP (`deepspeed.init_inference`, tp_size N), and the workarounds that needs:

- kernel injection ("auto") is tried on a 2-token warm-up and falls back to plain AutoTP;
- BLOOM gets its all-ones attention mask back, so its ALiBi bias goes through AutoTP's sharded method;
- the CPU shared-memory all-reduce is turned off when not every rank is on this machine
  (`compat.private_api.avoid_shm_allreduce_segfault`).

Only rank 0 reads input and prints; `Ranks.share` hands what it read to the other ranks.
"""
from __future__ import annotations

import dataclasses
import logging
import os

from inference.errors import InferenceError, first_line

# Architectures DeepSpeed's inference kernels have an injection policy for (deepspeed/module_inject/
# replace_policy.py: LLAMALayerPolicy, BLOOMLayerPolicy). The kernels are CUDA-only.
KERNEL_INJECT_TYPES = ("llama", "bloom")


@dataclasses.dataclass
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, obj):
        """Rank 0's `obj` on every rank (a line read from stdin, a command)."""
        if self.world_size == 1:
            return obj
        from trainer.engine.distributed import broadcast_object

        return broadcast_object(obj, src=0)


def init_ranks(use_cuda: bool) -> Ranks:
    """Ranks() alone; under a launcher (WORLD_SIZE > 1) DeepSpeed's process group first."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Ranks()
    import deepspeed.comm as dist

    from compat.private_api import avoid_shm_allreduce_segfault

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        import torch

        torch.cuda.set_device(local_rank)
    from trainer.engine.distributed import init_process_group

    init_process_group("nccl" if use_cuda else "gloo")
    avoid_shm_allreduce_segfault()
    return Ranks(dist.get_rank(), dist.get_world_size(), local_rank)


def pick_device(choice: str) -> str:
    """"cuda" or "cpu" for --device auto|cpu|cuda."""
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        raise InferenceError("--device cuda: no CUDA device visible")
    return "cuda" if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()) else "cpu"


class NullIO:
    """Where the output of ranks other than 0 goes."""

    def write(self, s):
        return len(s)

    def flush(self):
        pass


def setup_engine(model, tokenizer, args, ranks: Ranks, device: str, reload):
    """Move the model to `device`; under several ranks (or --ds-inference) wrap it with
    `deepspeed.init_inference`: AutoTP over all ranks, kernel injection where supported.
    `reload()` gives a fresh (model, tokenizer) if a kernel-injection attempt must be undone.
    Returns (model, a name for the banner)."""
    import torch

    use_ds = ranks.world_size > 1 or args.ds_inference
    inject = args.kernel_inject == "on" or (
        args.kernel_inject == "auto" and device.startswith("cuda") and model.config.model_type in KERNEL_INJECT_TYPES
        and model.dtype in (torch.float16, torch.bfloat16))
    if args.kernel_inject == "on" and not device.startswith("cuda"):
        raise InferenceError("--kernel-inject on needs CUDA: DeepSpeed's inference kernels have no CPU version")
    if args.kernel_inject == "on" and not use_ds:
        raise InferenceError("--kernel-inject on needs DeepSpeed inference: run under the deepspeed launcher or add --ds-inference")
    if not use_ds:
        return model.to(device), "Hugging Face generate"
    if not device.startswith("cuda") and model.dtype == torch.float16:
        raise InferenceError("DeepSpeed inference on CPU does not support float16: use --dtype bfloat16 or float32")
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)

    def init(model, inject: bool):
        engine = deepspeed.init_inference(model, tensor_parallel={"tp_size": ranks.world_size}, dtype=model.dtype,
                                          replace_with_kernel_inject=inject)
        return engine.module

    if inject and args.kernel_inject == "auto":
        # DeepSpeed's injection policies follow older transformers module layouts: try it on a
        # 2-token warm-up, and fall back to plain AutoTP rather than fail.
        try:
            injected = init(model, True)
            warm = torch.tensor([[tokenizer.eos_token_id] * 2], device=device)
            with torch.no_grad():
                injected.generate(input_ids=warm, attention_mask=torch.ones_like(warm), max_new_tokens=2, do_sample=False,
                                  pad_token_id=tokenizer.eos_token_id)
            model = injected
        except Exception as e:  # noqa: BLE001  (any failure: injection is an optimisation)
            print(f"[kernel injection failed ({type(e).__name__}: {first_line(e)}); using AutoTP without it "
                  "(--kernel-inject off skips the attempt)]")
            inject = False
            model, _ = reload()
            model = init(model, False)
    else:
        model = init(model, inject)
    if ranks.world_size > 1 and not inject and model.config.model_type == "bloom":
        keep_bloom_attention_mask(model)
    return model, f"DeepSpeed init_inference (AutoTP tp_size={ranks.world_size}, kernel injection {'on' if inject else 'off'})"


def keep_bloom_attention_mask(model) -> None:
    """Make BLOOM build its ALiBi bias through `build_alibi_tensor` under AutoTP.

    DeepSpeed's AutoTP replaces `model.transformer.build_alibi_tensor` with a version that keeps the
    heads of this rank. transformers 5's `generate` drops an all-ones attention mask, and BLOOM then
    computes the bias for all heads inline, never calling that method: the shapes no longer match the
    sharded attention ("expanded size of the tensor (2) must match the existing size (4)"). Putting
    the all-ones mask back costs nothing and routes the bias through DeepSpeed's method again."""
    import torch

    def restore_mask(module, args, kwargs):
        if kwargs.get("attention_mask") is None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            ref = ids if ids is not None else kwargs["inputs_embeds"]
            past = kwargs.get("past_key_values")
            past_length = past.get_seq_length() if past is not None else 0
            kwargs["attention_mask"] = torch.ones(ref.shape[0], past_length + ref.shape[1], dtype=torch.long, device=ref.device)
        return args, kwargs

    model.transformer.register_forward_pre_hook(restore_mask, with_kwargs=True)
