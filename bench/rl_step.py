"""An RL step's time split (generate / score / train) and generated tokens/s, PPO or GRPO, on the pipeline.

    python bench/rl_step.py [--recipe ppo|grpo] [--model tiny|1b] [--ranks 2] [--stages 2] [--steps 12]
                            [--rollout 16] [--samples 1] [--new-tokens 16] [--max-seq-len 48] [--work-dir DIR]

One invocation builds the models, runs `--steps` steps of the recipe with the deepspeed launcher on
`--ranks` ranks (`--stages` pipeline stages x ranks/stages replicas; on CPU one torch thread per rank,
gloo) and reads the recipe's own time metrics (PPO/time_*_s or GRPO/time_*_s) from the CSV monitor.
Printed: the median over the steps after the first (the first warms caches up) of each phase's seconds
and share of the step, and the generated answer tokens/s. Shares, not absolute seconds, are the figure on
a shared machine: other jobs stretch every phase.

Models. "tiny": the toy task of tests/test_ppo.py and tests/test_grpo_run.py (configs/tiny-llama with
seeded random weights and a peaked LM head; for PPO a hand-built marker reward model as critic and
reward; for GRPO a reward function counting the marker token in the answer ids). "1b": TinyLlama-1.1B's
shape (bench/train.py's preset) with the tiny tokenizer's 1024-token vocabulary, random weights, bf16 on a
GPU; PPO's critic and reward model are the actor's checkpoint with a fresh value head, GRPO's reward
function counts token id 7. The reward values mean nothing there: the figure is time.
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PHASES = ("time_generate_s", "time_score_s", "time_train_s")
REWARD_FILE = """
def marker_count(prompts, completions, completion_ids, **kwargs):
    return [float(sum(1 for t in ids if t == {marker})) for ids in completion_ids]
"""
ADAMW = {"type": "AdamW", "params": {"lr": 3e-5, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.0, "torch_adam": True}}
PROMPTS = REPO / "data" / "samples" / "rlhf_prompts.jsonl"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_models(work: Path, args) -> dict:
    """{"actor": pipeline folder, "rm": pipeline folder (PPO), "marker": token id}."""
    sys.path[:0] = [str(REPO), str(REPO / "tests")]  # before bench/ (its convert.py would shadow the package)
    from ppo_fixtures import choose_marker, marker_reward_hf, peaked_actor_hf
    from transformers import AutoTokenizer

    from convert.hg_to_pp import hg_to_pp
    from data.dataset import build_dataset
    from models.random_init import save_random_model

    overrides = None
    if args.model == "1b":
        sys.path.insert(0, str(REPO / "bench"))
        from train import PRESETS

        overrides = {**PRESETS["1b"]["llama"], "vocab_size": 1024, "max_position_embeddings": 4096}
    base = save_random_model(REPO / "configs" / "tiny-llama", work / "base-hf", seed=0, tie_word_embeddings=False,
                             overrides=overrides)
    actor_hf = peaked_actor_hf(base, work / "actor-hf")
    out = {"actor": hg_to_pp(actor_hf, work / "actor-pp", progress=False), "marker": 7}
    if args.model == "tiny":
        tok = AutoTokenizer.from_pretrained(actor_hf)
        built = build_dataset(str(PROMPTS), tok, args.max_seq_len, kind="prompt", cache_dir=str(work / "cache"))
        prompts = [built.train[i][0][built.train[i][1].bool()].tolist() for i in range(16)]
        out["marker"], _ = choose_marker(actor_hf, prompts, {tok.eos_token_id, tok.bos_token_id}, args.new_tokens)
    if args.recipe == "ppo":
        out["rm"] = (hg_to_pp(marker_reward_hf(base, work / "rm-hf", out["marker"], pad_id=0), work / "rm-pp", progress=False)
                     if args.model == "tiny" else out["actor"])
    return out


def run_config(work: Path, args, models: dict, cuda: bool) -> dict:
    replicas = args.ranks // args.stages
    micro = 4
    train_batch = micro * 2 * replicas  # 2 micro-batches per replica per minibatch
    config = {
        "stage": args.recipe, "actor_path": str(models["actor"]), "save_path": str(work / "run"),
        "data_path": str(PROMPTS), "max_seq_len": args.max_seq_len, "train_steps": args.steps, "seed": 11,
        "resume": "never", "save_interval": 0,
        "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [args.stages, replicas]}, "parts": "auto"},
        "train_batch_size": train_batch, "train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 2,
        "gradient_clipping": 1.0, "steps_per_print": 10**6, "optimizer": ADAMW,
        "csv_monitor": {"enabled": True, "output_path": str(work / "logs"), "job_name": "bench"},
    }
    if cuda:
        config["bf16"] = {"enabled": True}
    section = {"rollout_batch_size": args.rollout, "n_samples_per_prompt": args.samples, "max_new_tokens": args.new_tokens}
    if args.recipe == "ppo":
        config["critic_path"] = str(models["rm"])
        config["ppo"] = section
    else:
        (work / "bench_rewards.py").write_text(REWARD_FILE.format(marker=models["marker"]))
        config["grpo"] = {**section, "reward_funcs": [f"{work / 'bench_rewards.py'}:marker_count"]}
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", choices=("ppo", "grpo"), default="ppo")
    parser.add_argument("--model", choices=("tiny", "1b"), default="tiny")
    parser.add_argument("--ranks", type=int, default=2, help="deepspeed --num_gpus (CPU: processes)")
    parser.add_argument("--stages", type=int, default=2, help="pipeline stages (ranks / stages replicas)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rollout", type=int, default=16, help="prompts per step (a multiple of the replicas)")
    parser.add_argument("--samples", type=int, help="answers per prompt (default: PPO 1, GRPO 8)")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--max-seq-len", type=int, default=48)
    parser.add_argument("--work-dir", default=None)
    args = parser.parse_args()
    args.samples = args.samples or (1 if args.recipe == "ppo" else 8)
    if args.ranks % args.stages:
        sys.exit(f"--ranks {args.ranks} is not a multiple of --stages {args.stages}")
    import torch

    cuda = torch.cuda.is_available()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix=f"bench-{args.recipe}-"))
    work.mkdir(parents=True, exist_ok=True)
    models = build_models(work, args)
    path = work / f"{args.recipe}.json"
    path.write_text(json.dumps(run_config(work, args, models, cuda), indent=1))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if not cuda:
        env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.ranks), "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "train_ds.py", "--config", str(path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"the {args.recipe} run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    prefix = args.recipe.upper()

    def series(name: str) -> list[float]:
        rows = (work / "logs" / "bench" / f"{prefix}_{name}.csv").read_text().splitlines()[1:]
        return [float(r.split(",")[1]) for r in rows][1:]  # step 1 warms up

    median = {p: statistics.median(series(p)) for p in PHASES}
    step = sum(median.values())
    device = torch.cuda.get_device_name(0) if cuda else "CPU"
    print(f"{prefix} step, {args.model} LLaMA on {args.ranks} {device} rank(s) ({args.stages} stage(s)), {args.rollout} "
          f"prompts x {args.samples} samples x {args.new_tokens} new tokens, prompts <= {args.max_seq_len} tokens; "
          f"median of steps 2..{args.steps}:")
    for p in PHASES:
        print(f"  {p[5:-2]:<9} {median[p]:8.3f} s  {median[p] / step:6.1%} of the step")
    print(f"  step      {step:8.3f} s")
    print(f"  generation {statistics.median(series('gen_tokens_per_s')):.0f} answer tokens/s"
          + (f", training {statistics.median(series('train_tokens_per_s')):.0f} tokens/s (actor + critic, per epoch)"
             if args.recipe == "ppo" else ""))


if __name__ == "__main__":
    main()
