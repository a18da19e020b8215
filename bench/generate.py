"""Generation throughput: pipelined, KV-cached generation on the training pipeline vs HF `generate`.

    python bench/generate.py [--model tiny|small|medium|1b] [--batch 8] [--new-tokens 64] [--stages 2]
                             [--repeats 3] [--threads-per-rank 1] [--work-dir DIR]

One invocation builds a LLaMA with seeded random weights (HF's own init), saves it as an HF folder and
converts it to a pipeline checkpoint, makes `--batch` ragged prompts (seeded, 16-48 tokens), and then
measures greedy generation of exactly `--new-tokens` tokens per row (no stop token) on the same
weights and prompts:

  1. HF: `AutoModelForCausalLM.generate` (sdpa, KV cache, the batch left-padded) in one process with
     stages x threads-per-rank torch threads (the pipeline's total core budget); timed before and
     after the pipeline block (the fastest run of both is the reference; both are printed); then HF
     with one thread, a reference that a busy machine does not distort (an oversubscribed OpenMP pool
     can be many times slower than one thread);
  2. pipelined, M = 1: `trainer.generation.decoding.generate` over `--stages` ranks (deepspeed launcher, one
     process per stage, threads-per-rank threads each), one micro-batch: one stage busy at a time;
  3. pipelined, M = P and M = 2P micro-batches in flight, round robin;
  4. no cache: the whole sequence recomputed at every token through DeepSpeed's engine
     (`trainer.engine.forward_only`, i.e. `engine.eval_batch`, M = P micro-batches; the ids broadcast back
     to stage 0 after each token), which is what generating with the engine alone amounts to.

tokens/s = batch x new tokens / wall seconds (prefill included) of the fastest of `--repeats` timed
runs after one untimed warm-up (other jobs on a shared machine only add time); medians and every
run's seconds are printed too. Greedy tokens of every path are compared with HF's (they agree unless
two logits tie to ~1e-6). Goal: (3) / (1) >= 0.8 on 2 CPU stages.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

PRESETS = {
    "tiny": {},  # configs/tiny-llama: hidden 64, 4 layers, vocab 1024
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=4096, max_position_embeddings=1024, head_dim=32),
    "medium": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                   num_key_value_heads=4, vocab_size=32000, max_position_embeddings=1024, head_dim=64),
    # ~1.1B parameters (TinyLlama-1.1B's shape).
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5, head_dim=64),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(PRESETS), default="small", help="model preset (default small)")
    p.add_argument("--batch", type=int, default=8, help="prompts (default 8)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per prompt (default 64)")
    p.add_argument("--stages", type=int, default=2, help="pipeline stages (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per path (median reported; default 3)")
    p.add_argument("--threads-per-rank", type=int, default=1, help="torch threads per pipeline rank; HF gets stages x this")
    p.add_argument("--parts", help="layers per stage, e.g. 5,6 (default: the balanced split of parts \"auto\")")
    p.add_argument("--no-engine-baseline", action="store_true", help="skip (4), the no-cache engine baseline")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", help="where the model folders go (default: a temporary folder, removed after)")
    p.add_argument("--keep", action="store_true", help="keep --work-dir's model folders")
    p.add_argument("--worker", metavar="DIR", help=argparse.SUPPRESS)     # pipeline rank mode (set by the launch)
    p.add_argument("--hf-worker", metavar="DIR", help=argparse.SUPPRESS)  # HF block in a fresh process
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def make_prompts(settings: dict) -> list[list[int]]:
    import torch

    gen = torch.Generator().manual_seed(settings["seed"])
    lengths = torch.randint(16, 49, (settings["batch"],), generator=gen).tolist()
    return [torch.randint(4, settings["vocab_size"], (n,), generator=gen).tolist() for n in lengths]


def timed_runs(fn, repeats: int, sync=lambda: None) -> tuple[list[float], object]:
    fn()  # warm-up (allocations, kernels, first p2p connections)
    seconds, result = [], None
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        result = fn()
        sync()
        seconds.append(time.perf_counter() - start)
    return seconds, result


# ---------------------------------------------------------------------------------------------
# (1) HF generate, in a fresh process with the pipeline's total thread budget.

def hf_worker(work: Path) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    settings = json.loads((work / "settings.json").read_text())
    torch.set_num_threads(settings["hf_threads"])
    model = AutoModelForCausalLM.from_pretrained(work / "hf", dtype=torch.float32, attn_implementation="sdpa").eval()
    prompts = json.loads((work / "prompts.json").read_text())
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):  # left padding, as for batched generation
        ids[r, width - len(p):] = torch.tensor(p)
        mask[r, width - len(p):] = 1
    n = settings["new_tokens"]

    def run():
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                  pad_token_id=0, eos_token_id=None)

    seconds, out = timed_runs(run, settings["repeats"])
    answers = out[:, width:].tolist()
    (work / f"hf-{settings['hf_block']}.json").write_text(json.dumps({"seconds": seconds, "answers": answers}))
    return 0


def run_hf(settings: dict, work: Path, block, threads: int) -> dict:
    settings = {**settings, "hf_block": block, "hf_threads": threads}
    (work / "settings.json").write_text(json.dumps(settings, indent=1))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--hf-worker", str(work)], cwd=REPO, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"the HF block failed:\n{proc.stderr[-4000:]}")
    return json.loads((work / f"hf-{block}.json").read_text())


# ---------------------------------------------------------------------------------------------
# (2)-(4) the pipeline, one process per stage.

def worker(work: Path) -> int:
    import deepspeed
    import torch
    import torch.distributed as dist

    from inference.pipeline import load_pipeline_module
    from trainer.engine.distributed import finish
    from trainer.generation.decoding import generate

    settings = json.loads((work / "settings.json").read_text())
    torch.set_num_threads(settings["threads_per_rank"])
    deepspeed.init_distributed(dist_backend="gloo")
    prompts = json.loads((work / "prompts.json").read_text())
    P, n = settings["stages"], settings["new_tokens"]
    module, plan, _ = load_pipeline_module(work / "pp", P, parts=settings["parts"])
    results = {"parts": plan.parts}
    for m in (1, P, 2 * P):
        if f"m{m}" in results:
            continue
        seconds, gen = timed_runs(lambda: generate(module, plan.model_config, prompts, max_new_tokens=n, stop_ids=[],
                                                   n_micro=m), settings["repeats"], dist.barrier)
        results[f"m{m}"] = {"seconds": seconds, "answers": [gen.answer(i) for i in range(len(prompts))]}
    if not settings["no_engine_baseline"]:
        results["engine_nocache"] = engine_no_cache(module, plan, prompts, n, P, settings)
    if dist.get_rank() == 0:
        (work / "pipeline.json").write_text(json.dumps(results))
    finish()
    return 0


def engine_no_cache(module, plan, prompts, n: int, m: int, settings: dict) -> dict:
    """(4): every token recomputes the whole (left-padded) sequence through engine.eval_batch."""
    import deepspeed
    import torch
    import torch.distributed as dist

    from trainer.engine.forward_only import forward_only

    rows = len(prompts)
    if rows % m:
        m = 1
    engine, *_ = deepspeed.initialize(model=module, model_parameters=[p for p in module.parameters()], config={
        "train_batch_size": rows, "train_micro_batch_size_per_gpu": rows // m, "gradient_accumulation_steps": m,
        "optimizer": {"type": "SGD", "params": {"lr": 0.0}}, "steps_per_print": 10**9})
    width = max(map(len, prompts))
    ids0 = torch.zeros(rows, width, dtype=torch.long)
    mask0 = torch.zeros_like(ids0)
    for r, p in enumerate(prompts):
        ids0[r, width - len(p):] = torch.tensor(p)
        mask0[r, width - len(p):] = 1
    last = engine.grid.stage_to_global(engine.num_stages - 1)
    b = rows // m

    def run():
        ids, mask = ids0.clone(), mask0.clone()
        for _ in range(n):
            engine.reset_activation_shape()  # the sequence grows by one every step
            micro = [((ids[k * b:(k + 1) * b], mask[k * b:(k + 1) * b]), ids[k * b:(k + 1) * b]) for k in range(m)]
            out = forward_only(engine, micro, m, lambda logits, labels: logits[:, -1].float().argmax(-1))
            new = torch.cat(out) if out is not None else torch.zeros(rows, dtype=torch.long)
            dist.broadcast(new, src=last)
            ids = torch.cat([ids, new[:, None]], 1)
            mask = torch.cat([mask, torch.ones(rows, 1, dtype=torch.long)], 1)
        return ids[:, width:]

    seconds, out = timed_runs(run, max(1, settings["repeats"] - 1), dist.barrier)
    return {"seconds": seconds, "answers": out.tolist(), "micro_batches": m}


def launch_pipeline(settings: dict, work: Path) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": str(settings["threads_per_rank"]), "PYTHONPATH": str(REPO)}
    (work / "settings.json").write_text(json.dumps(settings, indent=1))
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(settings["stages"]), "--master_addr",
           "127.0.0.1", "--master_port", str(port), str(Path(__file__).resolve()), "--worker", str(work)]
    log = work / "pipeline.log"
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    if proc.returncode != 0 or not (work / "pipeline.json").is_file():
        raise SystemExit(f"the pipeline launch failed (exit {proc.returncode}); log {log}:\n{log.read_text()[-6000:]}")
    return json.loads((work / "pipeline.json").read_text())


# ---------------------------------------------------------------------------------------------
# The driver.

def build_model(settings: dict, work: Path):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from convert.hg_to_pp import hg_to_pp
    from models.random_init import COPIED_FILES

    config_dir = REPO / "configs" / "tiny-llama"
    config = AutoConfig.from_pretrained(config_dir)
    for key, value in PRESETS[settings["model"]].items():
        setattr(config, key, value)
    torch.manual_seed(settings["seed"])
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    hf_dir = work / "hf"
    model.save_pretrained(hf_dir)
    for name in COPIED_FILES:
        if (config_dir / name).is_file() and not (hf_dir / name).exists():
            shutil.copy2(config_dir / name, hf_dir / name)
    n_params = sum(p.numel() for p in model.parameters())
    del model
    hg_to_pp(hf_dir, work / "pp", progress=False)
    return config, n_params


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "bench/generate.py", "trainer/generation/decoding.py"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + (" (bench/generate.py or trainer/generation/decoding.py modified)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def main(argv=None) -> int:
    args = parse_args(argv)
    here = str(Path(__file__).resolve().parent)  # bench/data_pipeline.py would shadow the `data` package
    sys.path[:] = [str(REPO)] + [p for p in sys.path if p not in (str(REPO), here) and Path(p or ".").resolve() != Path(here)]
    if args.worker:
        return worker(Path(args.worker))
    if args.hf_worker:
        return hf_worker(Path(args.hf_worker))
    if min(args.batch, args.new_tokens, args.stages, args.repeats, args.threads_per_rank) < 1:
        raise SystemExit("error: --batch, --new-tokens, --stages, --repeats and --threads-per-rank must be >= 1")
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="bench-generate-"))
    work.mkdir(parents=True, exist_ok=True)
    for stale in ("hf", "pp", "pipeline.json"):
        target = work / stale
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    settings = {"model": args.model, "batch": args.batch, "new_tokens": args.new_tokens, "stages": args.stages,
                "repeats": args.repeats, "threads_per_rank": args.threads_per_rank, "seed": args.seed,
                "no_engine_baseline": args.no_engine_baseline,
                "parts": [int(x) for x in args.parts.split(",")] if args.parts else None}
    try:
        settings["load_start"] = os.getloadavg()[0]
        t0 = time.perf_counter()
        config, n_params = build_model(settings, work)
        settings["vocab_size"] = config.vocab_size
        prompts = make_prompts(settings)
        (work / "prompts.json").write_text(json.dumps(prompts))
        print(f"model: {args.model} LLaMA, {n_params / 1e6:.1f}M parameters, hidden {config.hidden_size}, "
              f"{config.num_hidden_layers} layers, {config.num_attention_heads}/{config.num_key_value_heads} heads, vocab "
              f"{config.vocab_size}; {args.batch} prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens, "
              f"{args.new_tokens} new tokens each; built in {time.perf_counter() - t0:.1f} s", flush=True)
        threads = args.stages * args.threads_per_rank
        print("HF generate, block 1 ...", flush=True)
        hf1 = run_hf(settings, work, 1, threads)
        print(f"pipeline, {args.stages} stages (launch; log in {work / 'pipeline.log'}) ...", flush=True)
        pipe = launch_pipeline(settings, work)
        print("HF generate, block 2 ...", flush=True)
        hf2 = run_hf(settings, work, 2, threads)
        hf_one = run_hf(settings, work, "1thread", 1) if threads > 1 else None
        report(settings, config, n_params, hf1, hf2, pipe, hf_one)
    finally:
        if not args.keep:
            for name in ("hf", "pp"):
                shutil.rmtree(work / name, ignore_errors=True)
            if not args.work_dir:
                shutil.rmtree(work, ignore_errors=True)
    return 0


def report(settings: dict, config, n_params: int, hf1: dict, hf2: dict, pipe: dict, hf_one=None) -> None:
    tokens = settings["batch"] * settings["new_tokens"]
    # The fastest run of each path: on a shared machine other jobs only ever add time (an oversubscribed
    # OpenMP pool can make a run 10x slower), so the minimum is the robust figure; medians are printed too.
    tps = lambda seconds: tokens / min(seconds)
    median_tps = lambda seconds: tokens / statistics.median(seconds)
    hf = tps(hf1["seconds"] + hf2["seconds"])
    reference = hf1["answers"]
    P = settings["stages"]
    rows = [("(1) HF generate, 1 process, %d threads" % (P * settings["threads_per_rank"]), hf, reference,
             hf1["seconds"] + hf2["seconds"])]
    for m, label in ((1, "(2) pipelined, M = 1"), (P, f"(3) pipelined, M = P = {P}"), (2 * P, f"(3) pipelined, M = 2P = {2 * P}")):
        rows.append((label, tps(pipe[f"m{m}"]["seconds"]), pipe[f"m{m}"]["answers"], pipe[f"m{m}"]["seconds"]))
    if hf_one is not None:  # one thread: a reference that oversubscription on a shared machine does not distort
        rows.append(("HF generate, 1 process, 1 thread (reference)", tps(hf_one["seconds"]), hf_one["answers"], hf_one["seconds"]))
    if "engine_nocache" in pipe:
        e = pipe["engine_nocache"]
        rows.append((f"(4) no cache, engine.eval_batch per token, M = {e['micro_batches']}", tps(e["seconds"]), e["answers"],
                     e["seconds"]))
    print()
    print(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; machine: {platform.machine()}, "
          f"{os.cpu_count()} CPUs, python {platform.python_version()}; commit {git_commit()}")
    print(f"model {settings['model']} ({n_params / 1e6:.1f}M params, hidden {config.hidden_size}, {config.num_hidden_layers} layers, "
          f"vocab {config.vocab_size}); batch {settings['batch']}, {settings['new_tokens']} new tokens; {P} stages, parts {pipe['parts']}, "
          f"{settings['threads_per_rank']} thread(s) per rank; median of {settings['repeats']} runs")
    print(f"HF blocks (fastest run): {tps(hf1['seconds']):.1f} and {tps(hf2['seconds']):.1f} tokens/s (before / after the pipeline); "
          f"load average at the start / end: {settings.get('load_start', 0):.2f} / {os.getloadavg()[0]:.2f}")
    print()
    print("| path | tokens/s (fastest run) | / HF | tokens/s (median) | greedy tokens == HF | runs (s) |")
    print("|---|---|---|---|---|---|")
    for label, value, answers, seconds in rows:
        same = sum(a == b for a, b in zip(answers, reference))
        print(f"| {label} | {value:.1f} | {value / hf:.2f} | {median_tps(seconds):.1f} | {same}/{len(reference)} rows | "
              f"{' '.join(f'{x:.2f}' for x in seconds)} |")
    best = max(tps(pipe[f"m{m}"]["seconds"]) for m in (P, 2 * P))
    print()
    print(f"goal (3) / (1) >= 0.8: {'met' if best / hf >= 0.8 else 'missed'} ({best / hf:.2f})")


if __name__ == "__main__":
    sys.exit(main())
