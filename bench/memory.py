"""Training memory per pipeline stage: trainer.engine.memory's estimate vs the measured peak.

    python bench/memory.py [--hidden 512] [--layers 8] [--vocab 16000] [--seq-len 256] [--micro-batch 2]
                           [--micro-batches 4] [--steps 3] [--grad-ckpt] [--frozen] [--work-dir DIR]

Launches `--stages` (default 2) ranks with DeepSpeed's launcher; each rank builds a seeded LLaMA of the
given shape from scratch through the trainer (trainer.recipes.validate_config, trainer.engine.plan.plan_model,
engine.build_engine; parts "auto" with no memory limit), records its resident memory just before
the engine is built, trains `--steps` steps on random tokens (fp32, AdamW) and records its peak.
Measured = peak RSS (getrusage ru_maxrss) - RSS before the build: the model, its gradients,
optimizer state and activations, plus whatever the allocator and DeepSpeed add; "after the build"
is the peak of the steps alone (VmHWM reset after the build), without the build's own transients
(a seeded init holds a second copy of some weights for a moment). Printed per stage
next to the estimate and its parts, with the ratio estimate / measured (the acceptance band of the
memory-aware split is 0.75-1.25 for a model whose memory dominates the process's own).
--frozen measures a frozen model instead (PPO's reference: no optimizer, forward-only passes of
`--micro-batches` micro-batches scored to per-token log-probs as PPO does) against the frozen estimate.
--generate ROWS [--new-tokens N] adds, after the training steps, what PPO's actor does next: generating
ROWS rows (prompts of seq-len random tokens, N new tokens each, greedy, P micro-batches in flight, KV
cache) with trainer.generation.decoding on the trained engine's module; the estimate then includes
the memory model's "generation" part for that rollout shape (its KV cache beyond the training activations).
On a GPU it reads torch.cuda.max_memory_allocated instead (the allocator's own count).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def reset_peak_rss() -> bool:
    """Start a new peak: Linux resets VmHWM when 5 is written to clear_refs. False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_since_reset() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(work: Path) -> int:
    import torch

    settings = json.loads((work / "settings.json").read_text())
    torch.set_num_threads(1)
    from deepspeed.accelerator import get_accelerator

    from models.heads import set_defer_logits
    from trainer.batches import with_normaliser
    from trainer.engine.build import build_engine, build_pipeline_module, frozen_ds_config, init_from_scratch
    from trainer.engine.distributed import finish, world
    from trainer.engine.forward_only import forward_only
    from trainer.engine.plan import plan_model
    from trainer.engine.topology import Topology
    from trainer.losses import global_token_mean_loss
    from trainer.recipes import validate_config as validate
    from trainer.rl.ppo_losses import reduce_token_logps

    rank, world_size, _ = world()
    accel = get_accelerator()
    from trainer.engine.distributed import init_process_group

    init_process_group(accel.communication_backend_name())
    cfg = validate(settings["config"], str(work / "settings.json"), world_size=world_size,
                   device_supports_fp16=accel.is_fp16_supported())
    frozen = settings.get("frozen", False)
    plan = plan_model(cfg, head="lm", budget=None, frozen=frozen)
    topo = Topology.from_config(cfg, rank, world_size)
    on_gpu = accel.device_name() == "cuda"
    before = torch.cuda.memory_allocated() if on_gpu else current_rss()
    if frozen:  # as trainer.engine.build.frozen_engine builds PPO's reference (seeded weights here)
        import deepspeed

        module = build_pipeline_module(plan, topo)
        init_from_scratch(module, plan.model_config, cfg.seed)
        module.requires_grad_(False)
        engine, *_ = deepspeed.initialize(model=module, config=frozen_ds_config(cfg))
    else:
        engine = build_engine(cfg, plan, topo, settings["steps"], weights="init", loss_fn=global_token_mean_loss)
        set_defer_logits(engine.module, cfg.chunked_loss)  # as the SFT recipe does
    trace = [("built", current_rss() - before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before)]
    build_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    running_peak_known = not on_gpu and reset_peak_rss()  # the steps' own peak, without the build's transients
    gen = torch.Generator().manual_seed(0)
    mb, seq, n_micro = cfg.micro_batch, cfg.max_seq_len, cfg.grad_accum
    for _ in range(settings["steps"]):  # the training steps (or, frozen, scoring passes)
        micro = []
        for _ in range(n_micro):
            ids = torch.randint(3, plan.model_config.vocab_size, (mb, seq), generator=gen)
            micro.append(((ids, torch.ones_like(ids)), (ids[:, 1:].clone(),) if frozen else ids.clone()))
        if frozen:
            forward_only(engine, micro if topo.is_data_stage else None, n_micro, reduce_token_logps,
                         deferred_logits=cfg.chunked_loss)
        else:
            feed = with_normaliser(micro, n_micro * mb * (seq - 1), float(n_micro)) if topo.is_data_stage else None
            engine.train_batch(data_iter=feed)
        trace.append(("step", current_rss() - before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before))
    rows, new_tokens = settings.get("generate", 0), settings.get("new_tokens", 0)
    if rows:  # PPO's rollout after the update: KV-cached pipelined decoding of every row of the replica
        from trainer.generation.decoding import generate

        prompts = torch.randint(3, plan.model_config.vocab_size, (rows, seq), generator=gen).tolist()
        generate(engine.module, plan.model_config, prompts, max_new_tokens=new_tokens, stop_ids=[plan.model_config.vocab_size],
                 pad_id=0, max_context=seq + new_tokens)
        trace.append(("generate", current_rss() - before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before))
    peak = torch.cuda.max_memory_allocated() if on_gpu else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    running_peak = peak_rss_since_reset() if running_peak_known else peak
    peak = max(peak, build_peak) if not on_gpu else peak  # the reset also lowered ru_maxrss
    bounds = plan.boundaries
    if rows:  # the memory model with this rollout shape (what PPOOptions.generation_shape gives the actor)
        import dataclasses

        from models.pipeline import head_is_tied
        from trainer.engine.memory import memory_settings, stage_memory

        shaped = dataclasses.replace(memory_settings(cfg, plan.model_config), generation_rows=rows, generation_prompt=seq,
                                     generation_new=new_tokens)
        estimate = stage_memory(plan.model_config, plan.layer_names, plan.layer_params, head_is_tied(plan.model_config, "lm"),
                                bounds[topo.stage], bounds[topo.stage + 1], topo.stage, shaped)
    else:
        estimate = plan.stage_memory(cfg, bounds[topo.stage], bounds[topo.stage + 1], topo.stage)
    result = {"rank": rank, "stage": topo.stage, "parts": plan.parts, "measured": peak - before,
              "running": running_peak - before, "estimate": estimate, "trace": trace}
    gathered = [None] * world_size
    torch.distributed.all_gather_object(gathered, result)
    if rank == 0:
        (work / "result.json").write_text(json.dumps(gathered))
    finish()
    return 0


def main(argv=None) -> int:
    # bench/data_pipeline.py would shadow the data package: the repository root, not bench/, goes first.
    here = str(Path(__file__).resolve().parent)
    sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() != Path(here)]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=1376)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=16000)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--micro-batches", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--grad-ckpt", action="store_true")
    p.add_argument("--full-logits", action="store_true", help="chunked_loss false: the head's full logits")
    p.add_argument("--frozen", action="store_true", help="a frozen model's forward-only scoring (PPO's reference)")
    p.add_argument("--generate", type=int, default=0, help="then generate this many rows (PPO's rollout on the actor)")
    p.add_argument("--new-tokens", type=int, default=64, help="with --generate: new tokens per row")
    p.add_argument("--work-dir")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(Path(args.worker))

    from transformers import LlamaConfig

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="pipetune-bench-memory-"))
    model_dir = work / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=args.vocab,
                max_position_embeddings=max(args.seq_len + args.new_tokens, 512), tie_word_embeddings=False).save_pretrained(model_dir)
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        if (REPO / "configs" / "tiny-llama" / name).is_file():
            (model_dir / name).write_bytes((REPO / "configs" / "tiny-llama" / name).read_bytes())
    config = {
        "model_path": str(model_dir), "from_scratch": True, "save_path": str(work / "save"), "data_path": "unused.json",
        "train_steps": args.steps, "max_seq_len": args.seq_len, "use_grad_ckpt": args.grad_ckpt,
        "chunked_loss": not args.full_logits,
        "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [args.stages, 1]}, "parts": "auto"},
        "train_micro_batch_size_per_gpu": args.micro_batch, "gradient_accumulation_steps": args.micro_batches,
        "steps_per_print": 10**9, "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
    }
    (work / "settings.json").write_text(json.dumps({"config": config, "steps": args.steps, "frozen": args.frozen,
                                                    "generate": args.generate, "new_tokens": args.new_tokens}))
    # A fixed mmap threshold: tensors above 128 KiB get their own mapping, returned to the OS when freed,
    # so peak RSS follows live memory instead of what glibc keeps in its heap after activations are freed.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "MALLOC_MMAP_THRESHOLD_": "131072"}
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.stages), "--master_addr", "127.0.0.1",
           "--master_port", os.environ.get("MASTER_PORT") or str(free_port()), str(Path(__file__).resolve()), "--worker", str(work)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
        return 1
    results = sorted(json.loads((work / "result.json").read_text()), key=lambda r: r["rank"])
    mib = 2**20
    print(f"LLaMA hidden {args.hidden}, {args.layers} blocks, vocab {args.vocab}; seq {args.seq_len}, micro-batch "
          f"{args.micro_batch} x {args.micro_batches}; {'frozen, forward-only' if args.frozen else 'fp32 AdamW'}; grad ckpt {'on' if args.grad_ckpt else 'off'}; "
          f"{'full logits' if args.full_logits else 'chunked head loss'}; "
          f"parts {results[0]['parts']}" + (f"; then generating {args.generate} rows x {args.new_tokens} new tokens"
                                            if args.generate else ""))
    print("\n| stage | estimate MiB | weights | grads | optimizer | activations | head | generation | measured MiB | "
          "after the build | estimate / after the build |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        e = r["estimate"]
        total = sum(e.values())
        print(f"| {r['stage']} | {total / mib:.0f} | {e['weights'] / mib:.0f} | {e['gradients'] / mib:.0f} | "
              f"{e['optimizer'] / mib:.0f} | {e['activations'] / mib:.0f} | {e['head'] / mib:.0f} | "
              f"{e.get('generation', 0) / mib:.0f} | {r['measured'] / mib:.0f} | {r['running'] / mib:.0f} | "
              f"{total / r['running']:.2f} |")
    if os.environ.get("PIPETUNE_BENCH_TRACE"):
        for r in results:
            print(r["stage"], [(name, round(now / mib), round(top / mib)) for name, now, top in r["trace"]])
    return 0


if __name__ == "__main__":
    sys.exit(main())
