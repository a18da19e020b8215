#!/usr/bin/env bash
# The RLHF quickstart: tiny LLaMA (seeded random weights, shipped tokenizer) -> pipeline layer files
# -> `rlhf.py`: SFT -> reward model -> PPO on 2 CPU ranks (a 2-stage pipeline), each step exported
# to a Hugging Face folder -> the summary and the PPO reward curve, then a reply of the PPO actor.
# Everything goes under runs/rlhf-quickstart/ (removed first, so every run starts fresh).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=runs/rlhf-quickstart
export OMP_NUM_THREADS=1
command -v nvidia-smi >/dev/null || export DS_ACCELERATOR=cpu  # no GPU: DeepSpeed's runner then does not warn about it
rm -rf "$OUT"

python -m models.random_init --config-dir configs/tiny-llama --out "$OUT/base-hf" --seed 0
python convert_model.py hg_to_pp --input-path "$OUT/base-hf" --save-path "$OUT/base-pp" --quiet
deepspeed --quiet --num_gpus 2 --master_addr 127.0.0.1 --master_port "${MASTER_PORT:-29500}" rlhf.py --config configs/rlhf_quickstart.json
for step in sft ppo; do  # the same prompt, greedy: the SFT model's usual answer, then the PPO actor's
  echo "--- $step:"
  python demo.py --model-path "$OUT/$step/hf" --prompt "Tell me about river garden music." --max-new-tokens 24 --greedy
done

echo
cat "$OUT/summary.txt"
cat <<MSG

rlhf quickstart done:
  summary:                        $OUT/summary.json
  PPO reward curve:               $OUT/ppo/reward_curve.png
  per-step metrics (CSV monitor): $OUT/logs/{sft,rm,ppo}/
  exports (Hugging Face):         $OUT/sft/hf  $OUT/rm/hf  $OUT/ppo/hf  $OUT/ppo/critic_hf
  rerun only the chain (finished steps are skipped, the running one resumes), in a shell with
  the venv activated (source .venv/bin/activate):
    deepspeed --quiet --num_gpus 2 --master_addr 127.0.0.1 --master_port 29500 rlhf.py --config configs/rlhf_quickstart.json
MSG
