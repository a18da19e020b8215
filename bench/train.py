"""Training throughput benchmark: the pipeline engine vs a plain single-process PyTorch/HF loop.

    python bench/train.py [--model tiny|small|1b] [--seq-len N] [--micro-batch B] [--micro-batches 8]
                          [--steps S] [--warmup W] [--dtype fp32|bf16] [--stages 2] [--grad-ckpt]
                          [--threads-per-rank 1] [--breakdown] [--work-dir DIR] [--keep]

One invocation builds a LLaMA with seeded random weights (HF's own init), saves it as an HF folder and
converts it with `convert_model.py hg_to_pp` logic, then measures, side by side, on the same weights
and the same synthetic batches (fixed-length random token ids, every position trained, fixed seed):

  1. plain loop, block 1: AutoModelForCausalLM (sdpa) in this process; per step `--micro-batches`
     forward/backward passes accumulating gradients, clip_grad_norm_(1.0), torch AdamW step;
  2. pipeline: `python -m deepspeed.launcher.runner --num_gpus <stages> bench/train.py --worker DIR`,
     each rank building the engine with trainer.recipes.validate_config + trainer.engine.build.build_engine
     (weights="load", explicit "auto" stage split, global-token loss) and calling engine.train_batch;
  3. plain loop, block 2 (the same as 1 again, to show drift of the machine during the run).

Each block times `--steps` steps after `--warmup` untimed steps. tokens/s counts every input token
(micro-batches x micro-batch x seq-len per step). The first-step losses of both paths are printed:
they agree (fp32: to ~1e-6), which shows both ran the same model on the same tokens.

Fairness: on a CPU the plain loop gets `stages x threads-per-rank` torch threads and each pipeline rank
`threads-per-rank` (default 1): the same core budget. With one accelerator, stages must be 1 (a note
is printed). bf16: the pipeline uses DeepSpeed's bf16 config (bf16 weights + fp32 master weights and
fp32 gradient accumulation), the plain loop pure bf16 (`model.to(bfloat16)` + torch AdamW), so the
pipeline does extra work and the ratio is conservative. With a GPU, MFU is printed for both paths
(trainer.metrics: 6N + 12 L H T FLOPs per token, N = matmul parameters; peak by device name).

`--breakdown` times each pipeline instruction per rank (forward, backward, send/recv, optimizer, ...;
with CUDA it synchronises after each one, which costs some throughput).
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

# Model presets. "tiny" is configs/tiny-llama; the others are built in code (no files needed).
PRESETS = {
    "tiny": {"config_dir": "configs/tiny-llama", "seq_len": 64, "micro_batch": 2},
    "small": {"llama": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=8, num_attention_heads=8,
                            num_key_value_heads=4, vocab_size=4096, max_position_embeddings=1024),
              "seq_len": 256, "micro_batch": 1},
    # ~1.1B parameters (TinyLlama-1.1B's shape).
    "1b": {"llama": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                         num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5),
           "seq_len": 2048, "micro_batch": 1},
}
OPTIMIZER = {"lr": 1e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}
CLIP = 1.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(PRESETS), default="small", help="model preset (default small)")
    p.add_argument("--seq-len", type=int, help="tokens per row (default: tiny 64, small 256, 1b 2048)")
    p.add_argument("--micro-batch", type=int, help="rows per micro-batch (default: tiny 2, small 1, 1b 1)")
    p.add_argument("--micro-batches", type=int, default=8, help="micro-batches per step = gradient accumulation (8)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per block (10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before each block (2)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], help="training dtype (default: bf16 with CUDA, else fp32)")
    p.add_argument("--stages", type=int, default=2, help="pipeline stages (default 2; forced to 1 with one GPU)")
    p.add_argument("--threads-per-rank", type=int, default=1,
                   help="CPU only: torch threads per pipeline rank; the plain loop gets stages x this (1)")
    p.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing on both paths (off)")
    p.add_argument("--compile", action="store_true", help="the pipeline's config \"compile\": true (torch.compile per block)")
    p.add_argument("--full-logits", action="store_true", help="the pipeline's chunked_loss false (default: the chunked head loss)")
    p.add_argument("--torch-adam", action="store_true",
                   help="pipeline: torch.optim.AdamW instead of DeepSpeed's FusedAdam (for machines that cannot build it)")
    p.add_argument("--breakdown", action="store_true", help="per-rank time per pipeline instruction")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--work-dir", help="where the model folders go (default: a temporary folder, removed at the end)")
    p.add_argument("--keep", action="store_true", help="keep the work dir")
    p.add_argument("--worker", metavar="DIR", help=argparse.SUPPRESS)  # pipeline rank mode (set by the launch)
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # set by the DeepSpeed launcher
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Shared by both paths.

def model_config(settings: dict):
    from transformers import AutoConfig, LlamaConfig

    preset = PRESETS[settings["model"]]
    if "config_dir" in preset:
        config = AutoConfig.from_pretrained(REPO / preset["config_dir"])
    else:
        config = LlamaConfig(**preset["llama"], tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
                             initializer_range=0.02, attention_dropout=0.0, bos_token_id=1, eos_token_id=2)
    config.max_position_embeddings = max(config.max_position_embeddings, settings["seq_len"])
    config.use_cache = False
    return config


def make_batches(settings: dict, n_steps: int) -> list:
    """[(micro-batches [(input_ids, attention_mask), labels], n_target_tokens)] per step: random
    token ids, full attention mask, labels = input ids (every position trained), seeded."""
    import torch

    gen = torch.Generator().manual_seed(settings["seed"])
    m, b, t, vocab = settings["micro_batches"], settings["micro_batch"], settings["seq_len"], settings["vocab_size"]
    steps = []
    for _ in range(n_steps):
        micro = []
        for _ in range(m):
            ids = torch.randint(0, vocab, (b, t), generator=gen, dtype=torch.int64)
            micro.append(((ids, torch.ones_like(ids)), ids.clone()))
        steps.append((micro, m * b * (t - 1)))
    return steps


def matmul_params(config) -> int:
    """All parameters but the input embedding lookup (as trainer.engine.plan.ModelPlan.n_matmul_params counts for MFU)."""
    from models.pipeline import prepare_config
    from trainer.engine.plan import layer_param_counts

    return sum(layer_param_counts(prepare_config(config, "sdpa"))[1:])


def accel_info() -> dict:
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    name = accel.device_name()
    info = {"accelerator": name, "backend": accel.communication_backend_name(), "device_count": 0, "device_name": name}
    if name != "cpu":
        info["device_count"] = accel.device_count()
        if name == "cuda":
            import torch

            info["device_name"] = torch.cuda.get_device_name()
    return info


def sync() -> None:
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    if accel.device_name() != "cpu":
        accel.synchronize()


def summarise(step_seconds: list[float], tokens_per_step: int) -> dict:
    total = sum(step_seconds)
    return {"seconds": total, "step_s": step_seconds, "median_step_s": statistics.median(step_seconds),
            "tokens_s": tokens_per_step * len(step_seconds) / total, "loadavg_1min_after": os.getloadavg()[0]}


# ---------------------------------------------------------------------------------------------
# Plain loop (this process).

def plain_block(settings: dict, hf_dir: Path, batches: list) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from trainer.config import DEFAULT_NO_DECAY
    from trainer.engine.optim import param_groups
    from trainer.losses import global_token_mean_loss

    info = accel_info()
    device = torch.device("cpu") if info["accelerator"] == "cpu" else torch.device(info["accelerator"], 0)
    if info["accelerator"] == "cpu":
        torch.set_num_threads(settings["plain_threads"])
    dtype = torch.bfloat16 if settings["dtype"] == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.to(device=device, dtype=dtype)
    model.config.use_cache = False
    if settings["grad_ckpt"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    opt = torch.optim.AdamW(param_groups(model, DEFAULT_NO_DECAY), **OPTIMIZER)
    tokens_per_step = settings["micro_batches"] * settings["micro_batch"] * settings["seq_len"]
    losses, times = [], []
    for i, (micro, n_global) in enumerate(batches):
        if i == settings["warmup"]:
            sync()
        start = time.perf_counter()
        factor = torch.tensor(1.0 / n_global, dtype=torch.float64)
        total = torch.zeros((), device=device)
        for (ids, mask), labels in micro:
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            loss = global_token_mean_loss(logits, (labels.to(device), factor))
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(total))  # a device sync per step, as the pipeline's loss broadcast is
        if i >= settings["warmup"]:
            times.append(time.perf_counter() - start)
    result = summarise(times, tokens_per_step)
    result.update(losses=losses, threads=torch.get_num_threads() if info["accelerator"] == "cpu" else None,
                  optimizer=type(opt).__name__, param_dtype=str(next(model.parameters()).dtype))
    if info["accelerator"] != "cpu":
        result["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9 if info["accelerator"] == "cuda" else None
    del model, opt
    if info["accelerator"] == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return result


# ---------------------------------------------------------------------------------------------
# Pipeline (one process per stage, started by the DeepSpeed launcher).

def pipeline_config(settings: dict, work: Path) -> dict:
    """The training config as a user would write it (validated by trainer.recipes.validate_config)."""
    cfg = {
        "model_path": str(work / "pp"), "save_path": str(work / "save"), "data_path": "synthetic (bench/train.py)",
        "max_seq_len": settings["seq_len"], "train_steps": settings["warmup"] + settings["steps"],
        "seed": settings["seed"], "resume": "never", "use_grad_ckpt": settings["grad_ckpt"],
        "compile": settings.get("compile", False), "chunked_loss": settings.get("chunked_loss", True),
        "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [settings["stages"], 1]}, "parts": "auto"},
        "train_micro_batch_size_per_gpu": settings["micro_batch"],
        "gradient_accumulation_steps": settings["micro_batches"],
        "steps_per_print": 10**9, "gradient_clipping": CLIP,
        "optimizer": {"type": "AdamW", "params": dict(OPTIMIZER, **({"torch_adam": True} if settings["torch_adam"] else {}))},
    }
    if settings["dtype"] == "bf16":
        cfg["bf16"] = {"enabled": True}
    return cfg


def instrument(engine) -> dict:
    """Per-instruction wall time on this rank (wraps the engine instance's instruction map)."""
    from deepspeed.accelerator import get_accelerator

    from compat.private_api import time_pipe_instructions

    totals: dict[str, float] = {}
    on_device = get_accelerator().device_name() != "cpu"

    def wrap(name, fn):
        def timed(self, **kwargs):
            start = time.perf_counter()
            out = fn(self, **kwargs)
            if on_device:
                sync()
            totals[name] = totals.get(name, 0.0) + time.perf_counter() - start
            return out
        return timed

    time_pipe_instructions(engine, wrap)
    return totals


def worker(work: Path) -> int:
    import torch

    settings = json.loads((work / "settings.json").read_text())
    from trainer.engine.distributed import finish, report_crash, world

    rank, world_size, local_rank = world()
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    if accel.device_name() == "cpu":
        torch.set_num_threads(settings["threads_per_rank"])
    else:
        accel.set_device(local_rank)
    deepspeed.init_distributed(dist_backend=accel.communication_backend_name())
    try:
        from models.heads import set_defer_logits
        from trainer.batches import with_normaliser
        from trainer.engine.build import build_engine
        from trainer.engine.plan import plan_model
        from trainer.engine.topology import Topology
        from trainer.losses import global_token_mean_loss
        from trainer.recipes import validate_config as validate

        cfg = validate(pipeline_config(settings, work), str(work / "settings.json"), world_size=world_size,
                       device_supports_fp16=accel.is_fp16_supported())
        plan = plan_model(cfg, head="lm")
        total_steps = settings["warmup"] + settings["steps"]
        engine = build_engine(cfg, plan, Topology.from_config(cfg, rank, world_size), total_steps, weights="load",
                              loss_fn=global_token_mean_loss)
        set_defer_logits(engine.module, cfg.chunked_loss)  # as the SFT recipe does
        stage = engine.stage_id
        batches = make_batches(settings, total_steps)
        totals = instrument(engine) if settings["breakdown"] else None
        scale = float(cfg.grad_accum * cfg.model_topo.data)
        tokens_per_step = settings["micro_batches"] * settings["micro_batch"] * settings["seq_len"]
        losses, times = [], []
        for i, (micro, n_global) in enumerate(batches):
            if i == settings["warmup"]:
                sync()
                torch.distributed.barrier()
                if totals is not None:
                    totals.clear()
            start = time.perf_counter()
            it = with_normaliser(micro, n_global, scale) if stage in (0, engine.num_stages - 1) else None
            losses.append(float(engine.train_batch(data_iter=it)))  # the loss broadcast syncs the stages
            if i >= settings["warmup"]:
                times.append(time.perf_counter() - start)
        sync()
        torch.distributed.barrier()
        result = summarise(times, tokens_per_step)
        result.update(losses=losses, rank=rank, stage=stage, threads=torch.get_num_threads(), parts=plan.parts,
                      optimizer=type(engine.optimizer).__name__ + (f"({type(engine.optimizer.optimizer).__name__})"
                                                                   if hasattr(engine.optimizer, "optimizer") else ""),
                      breakdown=totals,
                      params=sum(p.numel() for p in engine.module.parameters()))
        if accel.device_name() == "cuda":
            result["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
        gathered = [None] * world_size
        torch.distributed.all_gather_object(gathered, result)
        if rank == 0:
            (work / "pipeline.json").write_text(json.dumps(gathered))
    except BaseException as e:  # noqa: BLE001 - the peers only see a closed connection
        report_crash(rank, e)
        return 1
    finish()
    return 0


def launch_pipeline(settings: dict, work: Path, log: Path) -> list:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    if settings["accelerator"] == "cpu":
        env["OMP_NUM_THREADS"] = str(settings["threads_per_rank"])
    from trainer.engine.distributed import deepspeed_safe_cuda_arch_list

    before = env.get("TORCH_CUDA_ARCH_LIST")
    fixed = deepspeed_safe_cuda_arch_list(env)  # rewrites env in place
    if fixed is not None:
        print(f"  note: TORCH_CUDA_ARCH_LIST={before!r} -> {fixed!r} for the launch (DeepSpeed 0.19's "
              "JIT op builder cannot parse arch suffixes such as '9.0a': int('0a') fails in compute_capability_args)")
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(settings["stages"]), "--master_addr",
           "127.0.0.1", "--master_port", str(port), str(Path(__file__).resolve()), "--worker", str(work)]
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    out = work / "pipeline.json"
    if proc.returncode != 0 or not out.is_file():
        tail = log.read_text()[-6000:]
        raise SystemExit(f"the pipeline launch failed (exit {proc.returncode}); log {log}:\n{tail}")
    return json.loads(out.read_text())


# ---------------------------------------------------------------------------------------------
# The driver.

def build_model(settings: dict, work: Path) -> tuple[Path, Path, object]:
    import torch
    from transformers import AutoModelForCausalLM

    from convert.hg_to_pp import hg_to_pp

    config = model_config(settings)
    torch.manual_seed(settings["seed"])
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # bf16 runs: both paths start from the same bf16-rounded weights (and the files are half the size).
    if settings["dtype"] == "bf16":
        model.to(torch.bfloat16)
    hf_dir, pp_dir = work / "hf", work / "pp"
    model.save_pretrained(hf_dir)
    n_params = sum(p.numel() for p in model.parameters())
    del model
    hg_to_pp(hf_dir, pp_dir, progress=False)
    return hf_dir, pp_dir, (config, n_params)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "bench/train.py"], cwd=REPO, capture_output=True,
                               text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + (" (bench/train.py modified)" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def fmt_mfu(value) -> str:
    return f"{value:.1%}" if value is not None else "-"


def main(argv=None) -> int:
    args = parse_args(argv)
    # The repo root first; drop bench/ (python puts the script's folder first), whose data.py would
    # shadow the `data` package.
    here = str(Path(__file__).resolve().parent)
    sys.path[:] = [str(REPO)] + [p for p in sys.path if p not in (str(REPO), here) and Path(p or ".").resolve() != Path(here)]
    if args.worker:
        return worker(Path(args.worker))
    import torch

    info = accel_info()
    preset = PRESETS[args.model]
    settings = {
        "model": args.model, "seq_len": args.seq_len or preset["seq_len"], "micro_batch": args.micro_batch or preset["micro_batch"],
        "micro_batches": args.micro_batches, "steps": args.steps, "warmup": args.warmup,
        "dtype": args.dtype or ("bf16" if info["accelerator"] == "cuda" else "fp32"), "stages": args.stages,
        "threads_per_rank": args.threads_per_rank, "grad_ckpt": args.grad_ckpt, "torch_adam": args.torch_adam,
        "compile": args.compile, "chunked_loss": not args.full_logits,
        "breakdown": args.breakdown, "seed": args.seed, "accelerator": info["accelerator"],
    }
    if min(settings["seq_len"], settings["micro_batch"], settings["micro_batches"], settings["steps"], settings["stages"]) < 1 or args.warmup < 0:
        raise SystemExit("error: --seq-len, --micro-batch, --micro-batches, --steps and --stages must be >= 1, --warmup >= 0")
    notes = []
    if info["accelerator"] != "cpu" and settings["stages"] > info["device_count"]:
        notes.append(f"{info['device_count']} {info['accelerator']} device(s): {settings['stages']} stages need as many; "
                     f"running {info['device_count']} stage(s) (a 1-stage pipeline is the engine's overhead alone, no bubbles)")
        settings["stages"] = info["device_count"]
    settings["plain_threads"] = settings["stages"] * settings["threads_per_rank"]
    if info["accelerator"] == "cpu" and settings["plain_threads"] > (os.cpu_count() or 1):
        notes.append(f"only {os.cpu_count()} CPU cores for {settings['plain_threads']} threads: the comparison is oversubscribed")

    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="bench-train-"))
    work.mkdir(parents=True, exist_ok=True)
    for stale in ("pipeline.json", "hf", "pp", "save"):
        target = work / stale
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    try:
        load_before = os.getloadavg()[0]
        t0 = time.perf_counter()
        if info["accelerator"] == "cpu":
            torch.set_num_threads(max(settings["plain_threads"], 1))
        hf_dir, _, (config, n_params) = build_model(settings, work)
        settings["vocab_size"] = config.vocab_size
        (work / "settings.json").write_text(json.dumps(settings, indent=1))
        n_matmul = matmul_params(config)
        print(f"model: {args.model} LLaMA, {n_params / 1e6:.1f}M parameters ({n_matmul / 1e6:.1f}M in matmuls), hidden "
              f"{config.hidden_size}, {config.num_hidden_layers} layers, {config.num_attention_heads}/{config.num_key_value_heads} "
              f"heads, vocab {config.vocab_size}; built and converted in {time.perf_counter() - t0:.1f} s", flush=True)
        batches = make_batches(settings, settings["warmup"] + settings["steps"])
        tokens_per_step = settings["micro_batches"] * settings["micro_batch"] * settings["seq_len"]

        print("plain loop, block 1 ...", flush=True)
        plain1 = plain_block(settings, hf_dir, batches)
        print(f"  {plain1['tokens_s']:.1f} tokens/s", flush=True)
        print(f"pipeline, {settings['stages']} stage(s) (launch; log in {work / 'pipeline.log'}) ...", flush=True)
        t_launch = time.perf_counter()
        ranks = launch_pipeline(settings, work, work / "pipeline.log")
        launch_s = time.perf_counter() - t_launch
        pipe = ranks[0]  # every rank timed the same synchronised steps; rank 0 reports
        print(f"  {pipe['tokens_s']:.1f} tokens/s (launch to exit {launch_s:.1f} s)", flush=True)
        print("plain loop, block 2 ...", flush=True)
        if info["accelerator"] == "cpu":
            torch.set_num_threads(settings["plain_threads"])
        plain2 = plain_block(settings, hf_dir, batches)
        print(f"  {plain2['tokens_s']:.1f} tokens/s", flush=True)

        plain_tokens_s = tokens_per_step * (len(plain1["step_s"]) + len(plain2["step_s"])) / (plain1["seconds"] + plain2["seconds"])
        ratio = pipe["tokens_s"] / plain_tokens_s
        from trainer.metrics import flops_per_token, mfu, peak_flops

        flops_tok = flops_per_token(n_matmul, config.num_hidden_layers, config.hidden_size, settings["seq_len"])
        peak = peak_flops(info["device_name"] if info["accelerator"] == "cuda" else None, settings["dtype"])
        mfu_plain = mfu(plain_tokens_s, flops_tok, 1, peak)
        mfu_pipe = mfu(pipe["tokens_s"], flops_tok, settings["stages"], peak)

        import deepspeed
        import transformers

        print()
        print(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; commit {git_commit()}")
        cpu_desc = f"{os.cpu_count()} CPU cores"
        device_desc = info["device_name"] if info["accelerator"] != "cpu" else "no accelerator"
        print(f"machine: {platform.machine()}, {cpu_desc}, {device_desc}; python {platform.python_version()}, torch "
              f"{torch.__version__}, deepspeed {deepspeed.__version__}, transformers {transformers.__version__}")
        print(f"settings: seq {settings['seq_len']}, micro-batch {settings['micro_batch']}, {settings['micro_batches']} "
              f"micro-batches/step ({tokens_per_step} tokens/step), {settings['steps']} timed steps after {settings['warmup']} "
              f"warm-up per block, {settings['dtype']}, grad ckpt {'on' if settings['grad_ckpt'] else 'off'}, sdpa attention, "
              f"AdamW, clip {CLIP}")
        if info["accelerator"] == "cpu":
            print(f"threads: plain loop torch.set_num_threads({plain1['threads']}); pipeline {settings['stages']} rank(s) x "
                  f"{pipe['threads']} thread(s) (OMP_NUM_THREADS={settings['threads_per_rank']}): equal core budget")
        print(f"pipeline: {settings['stages']} stage(s), layers per stage {pipe['parts']} (auto split; embedding + "
              f"{config.num_hidden_layers} blocks + norm + head), optimizer {pipe['optimizer']}; plain: {plain1['optimizer']}"
              f" on {plain1['param_dtype']} weights")
        if settings["dtype"] == "bf16":
            print("bf16: the pipeline keeps fp32 master weights and accumulates gradients in fp32 (DeepSpeed bf16); the "
                  "plain loop is pure bf16 weights + AdamW: the pipeline does more work, the ratio is conservative")
        if peak is None:
            print("MFU: no peak FLOPs known for this device (CPU): not reported")
        else:
            print(f"MFU: {flops_tok / 1e9:.2f} GFLOPs/token (6N + 12LHT, N = {n_matmul / 1e6:.1f}M), peak {peak / 1e12:.0f} "
                  f"TFLOPs/s ({settings['dtype']}) per device")
        for note in notes:
            print(f"note: {note}")
        print(f"first-step loss: plain {plain1['losses'][0]:.6f}, pipeline {pipe['losses'][0]:.6f}; last: plain "
              f"{plain1['losses'][-1]:.6f}, pipeline {pipe['losses'][-1]:.6f}")
        print(f"1-min load average: before {load_before:.2f}; after plain 1 {plain1['loadavg_1min_after']:.2f}, pipeline "
              f"{pipe['loadavg_1min_after']:.2f}, plain 2 {plain2['loadavg_1min_after']:.2f} (expect ~{settings['plain_threads']} "
              f"on a CPU run; much more means other processes shared the cores)")
        print()
        print("| path | tokens/s | vs plain | MFU | median step s | timed s |")
        print("|---|---|---|---|---|---|")
        for name, r, util in (("plain HF loop, block 1", plain1, mfu(plain1["tokens_s"], flops_tok, 1, peak)),
                              (f"pipeline, {settings['stages']} stage(s)", pipe, mfu_pipe),
                              ("plain HF loop, block 2", plain2, mfu(plain2["tokens_s"], flops_tok, 1, peak))):
            print(f"| {name} | {r['tokens_s']:.1f} | {r['tokens_s'] / plain_tokens_s:.3f} | {fmt_mfu(util)} | "
                  f"{r['median_step_s']:.3f} | {r['seconds']:.1f} |")
        print(f"| plain HF loop, both blocks | {plain_tokens_s:.1f} | 1.000 | {fmt_mfu(mfu_plain)} | "
              f"{statistics.median(plain1['step_s'] + plain2['step_s']):.3f} | {plain1['seconds'] + plain2['seconds']:.1f} |")
        print()
        s, m = settings["stages"], settings["micro_batches"]
        print(f"ratio pipeline / plain: {ratio:.3f} (goal >= 0.85 at 8 micro-batches: {'met' if ratio >= 0.85 else 'missed'}); "
              f"1F1B bubble in theory (S-1)/(M+S-1) = {(s - 1) / (m + s - 1):.3f} of a step")
        if "peak_mem_gb" in pipe:
            print(f"peak device memory: plain {plain1.get('peak_mem_gb') or 0:.1f} GB, pipeline (rank 0) {pipe['peak_mem_gb']:.1f} GB")
        if settings["breakdown"]:
            print()
            print("pipeline time per instruction over the timed steps (s; Recv* includes waiting for the peer stage):")
            names = sorted({k for r in ranks for k in (r["breakdown"] or {})})
            print("| rank (stage, layers) | " + " | ".join(names) + " | sum | timed |")
            print("|---" * (len(names) + 3) + "|")
            for r in ranks:
                b = r["breakdown"] or {}
                print(f"| {r['rank']} ({r['stage']}, {r['parts'][r['stage']]}) | " + " | ".join(f"{b.get(n, 0.0):.2f}" for n in names)
                      + f" | {sum(b.values()):.2f} | {r['seconds']:.2f} |")
        return 0
    finally:
        if args.keep or args.work_dir:
            print(f"work dir kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
