#!/usr/bin/env bash
# The GRPO quickstart: tiny LLaMA (seeded random weights, shipped tokenizer) -> pipeline layer files
# -> `rlhf.py`: SFT -> GRPO on 2 CPU ranks (a 2-stage pipeline). SFT learns answers that open with
# "Yes, gladly:" about 3 times in 10, "No." otherwise (data/samples/rlhf_sft.jsonl); GRPO's reward is a
# rule on the answer's text (the built-in "format" reward with the pattern "Yes.*": 1 when the answer
# opens with "Yes"), so the reward is the share of answers that open that way. Ends with the summary, the reward curve and a greedy reply of
# the SFT model beside the GRPO actor's. Everything goes under runs/grpo-quickstart/ (removed first).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=runs/grpo-quickstart
export OMP_NUM_THREADS=1
command -v nvidia-smi >/dev/null || export DS_ACCELERATOR=cpu  # no GPU: DeepSpeed's runner then does not warn about it
rm -rf "$OUT"

python -m models.random_init --config-dir configs/tiny-llama --out "$OUT/base-hf" --seed 0
python convert_model.py hg_to_pp --input-path "$OUT/base-hf" --save-path "$OUT/base-pp" --quiet
deepspeed --quiet --num_gpus 2 --master_addr 127.0.0.1 --master_port "${MASTER_PORT:-29500}" rlhf.py --config configs/grpo_quickstart.json
for step in sft grpo; do  # the same prompt, greedy: the SFT model's usual answer, then the GRPO actor's
  echo "--- $step:"
  python demo.py --model-path "$OUT/$step/hf" --prompt "Tell me about river garden music." --max-new-tokens 24 --greedy
done

echo
cat "$OUT/summary.txt"
cat <<MSG

grpo quickstart done:
  summary:                        $OUT/summary.json
  GRPO reward curve:              $OUT/grpo/reward_curve.png
  per-step metrics (CSV monitor): $OUT/logs/{sft,grpo}/
  exports (Hugging Face):         $OUT/sft/hf  $OUT/grpo/hf
  rerun only the chain (finished steps are skipped, the running one resumes), in a shell with
  the venv activated (source .venv/bin/activate):
    deepspeed --quiet --num_gpus 2 --master_addr 127.0.0.1 --master_port 29500 rlhf.py --config configs/grpo_quickstart.json
MSG
