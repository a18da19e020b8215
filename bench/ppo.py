"""A PPO step's time split (generate / score / train) on the tiny CPU setup of tests/test_ppo.py.

    python bench/ppo.py [--steps 12] [--rollout 16] [--new-tokens 16] [--max-seq-len 48] [--work-dir DIR]

One invocation builds the toy task's models (tests/ppo_fixtures.py: the tiny LLaMA with seeded random
weights and a peaked LM head as the actor, a hand-built marker reward model as critic and reward),
runs `--steps` PPO steps on 2 CPU ranks (2 pipeline stages, deepspeed launcher, one torch thread per
rank) and reads the recipe's own PPO/time_* metrics from the CSV monitor. Printed: the median over
the steps after the first (the first one warms caches up) of each phase's seconds and its share of
the step, and the generation / training token rates. Shares, not absolute seconds, are the figure:
other jobs on a shared machine stretch every phase.
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_models(work: Path, max_seq_len: int, new_tokens: int) -> dict:
    sys.path[:0] = [str(REPO), str(REPO / "tests")]  # before bench/ (its convert.py would shadow the package)
    from ppo_fixtures import choose_marker, marker_reward_hf, peaked_actor_hf
    from transformers import AutoTokenizer

    from convert.hg_to_pp import hg_to_pp
    from data.dataset import build_dataset
    from models.random_init import save_random_model

    base = save_random_model(REPO / "configs" / "tiny-llama", work / "base-hf", seed=0, tie_word_embeddings=False)
    actor_hf = peaked_actor_hf(base, work / "actor-hf")
    tok = AutoTokenizer.from_pretrained(actor_hf)
    prefs = str(REPO / "data" / "samples" / "preferences.jsonl")
    built = build_dataset(prefs, tok, max_seq_len, kind="prompt", cache_dir=str(work / "cache"))
    prompts = [built.train[i][0][built.train[i][1].bool()].tolist() for i in range(16)]
    marker, _ = choose_marker(actor_hf, prompts, {tok.eos_token_id, tok.bos_token_id}, new_tokens)
    rm_hf = marker_reward_hf(base, work / "rm-hf", marker, pad_id=0)
    return {"actor": hg_to_pp(actor_hf, work / "actor-pp", progress=False), "rm": hg_to_pp(rm_hf, work / "rm-pp", progress=False)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rollout", type=int, default=16, help="prompts per step (a multiple of 8)")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--max-seq-len", type=int, default=48)
    parser.add_argument("--work-dir", default=None)
    args = parser.parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-ppo-"))
    work.mkdir(parents=True, exist_ok=True)
    models = build_models(work, args.max_seq_len, args.new_tokens)
    adamw = {"type": "AdamW", "params": {"lr": 3e-5, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.0, "torch_adam": True}}
    config = {
        "stage": "ppo", "actor_path": str(models["actor"]), "critic_path": str(models["rm"]), "save_path": str(work / "run"),
        "data_path": str(REPO / "data" / "samples" / "preferences.jsonl"), "max_seq_len": args.max_seq_len,
        "train_steps": args.steps, "seed": 11, "resume": "never",
        "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [2, 1]}, "parts": [3, 4]},
        "train_batch_size": 8, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "gradient_clipping": 1.0,
        "steps_per_print": 10**6, "optimizer": adamw,
        "ppo": {"rollout_batch_size": args.rollout, "max_new_tokens": args.new_tokens},
        "csv_monitor": {"enabled": True, "output_path": str(work / "logs"), "job_name": "bench"},
    }
    path = work / "ppo.json"
    path.write_text(json.dumps(config, indent=1))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "train_ds.py", "--config", str(path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"the PPO run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")

    def series(name: str) -> list[float]:
        rows = (work / "logs" / "bench" / f"PPO_{name}.csv").read_text().splitlines()[1:]
        return [float(r.split(",")[1]) for r in rows][1:]  # step 1 warms up

    median = {p: statistics.median(series(p)) for p in PHASES}
    step = sum(median.values())
    print(f"PPO step on 2 CPU stages (tiny LLaMA, {args.rollout} prompts x {args.new_tokens} new tokens, prompts <= "
          f"{args.max_seq_len} tokens), median of steps 2..{args.steps}:")
    for p in PHASES:
        print(f"  {p[5:-2]:<9} {median[p]:7.3f} s  {median[p] / step:6.1%} of the step")
    print(f"  step      {step:7.3f} s")
    print(f"  generation {statistics.median(series('gen_tokens_per_s')):.0f} answer tokens/s, "
          f"training {statistics.median(series('train_tokens_per_s')):.0f} tokens/s (actor + critic, per epoch)")


if __name__ == "__main__":
    main()
