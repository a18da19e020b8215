#!/usr/bin/env bash
# The GPU measurements, prepared to run in one go on a lent machine (one H100: about 8 minutes; never part
# of CI). It prints a dated header (GPU, commit) and the tables to copy into docs/benchmarks.md:
#   SFT throughput and MFU of the 1B shape, micro-batch 1 and 4, chunked head loss, torch.compile off and on
#   (bench/train.py: the pipeline engine next to a plain HF loop); generated tokens/s of the pipeline's
#   KV-cached decoder next to HF generate (bench/generate.py); the memory model against the measured peak
#   with a rollout's generation (bench/memory.py --generate); a GRPO and a PPO step's split (generate /
#   score / train) with generated tokens/s on the 1B shape (bench/rl_step.py).
#     bash bench/gpu.sh [all|train|rl]     (train: the first four parts; rl: the RL steps; all: both)
# Without a CUDA device it says so and exits 0.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if ! $PY -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "bench/gpu.sh: no CUDA device here (torch.cuda.is_available() is false): nothing measured."
  echo "Run it on a GPU machine set up as README's GPU section says; it prints the figures for docs/benchmarks.md."
  exit 0
fi
echo "## $(date -u +%F), $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1), commit $(git rev-parse --short HEAD)"
PART=${1:-all}
run() {  # one measurement, at most LIMIT s (default 100), so each part stays within about 6 minutes
  echo; echo "### $*"
  timeout "${LIMIT:-100}" "$@" || echo "(stopped: exit status $?)"
}
if [ "$PART" = all ] || [ "$PART" = train ]; then
run $PY bench/train.py --model 1b --micro-batch 1 --micro-batches 8 --steps 6 --warmup 2 --stages 1
run $PY bench/train.py --model 1b --micro-batch 4 --micro-batches 4 --steps 6 --warmup 2 --stages 1
run $PY bench/train.py --model 1b --micro-batch 4 --micro-batches 4 --steps 6 --warmup 2 --stages 1 --compile
run $PY bench/generate.py --model 1b --batch 32 --new-tokens 128 --stages 1 --repeats 2 --no-engine-baseline
run $PY bench/memory.py --hidden 2048 --layers 16 --intermediate 5504 --heads 16 --vocab 32000 --seq-len 512 \
    --micro-batch 1 --micro-batches 4 --steps 2 --stages 1 --generate 64 --new-tokens 256
fi
if [ "$PART" = all ] || [ "$PART" = rl ]; then
# the 1B actor (bf16), 8 prompts x 8 answers of up to 256 tokens per GRPO step; PPO: 16 prompts x 1, four models
LIMIT=170 run $PY bench/rl_step.py --recipe grpo --model 1b --ranks 1 --stages 1 --steps 4 --rollout 8 --samples 8 \
    --new-tokens 256 --max-seq-len 256
LIMIT=170 run $PY bench/rl_step.py --recipe ppo --model 1b --ranks 1 --stages 1 --steps 4 --rollout 16 \
    --new-tokens 256 --max-seq-len 256
fi
