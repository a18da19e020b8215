#!/usr/bin/env bash
# The quickstart: tiny LLaMA (seeded random weights, shipped tokenizer) -> pipeline layer files ->
# 2-stage pipeline training on data/samples (2 CPU ranks) -> Hugging Face folder -> a reply.
# Everything goes under runs/quickstart/ (removed first, so every run starts fresh).
# TINY_MODEL=configs/tiny-qwen2 (or tiny-qwen3, tiny-mistral, tiny-llama3, tiny-bloom) runs it on
# another family's tiny model.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=runs/quickstart
export OMP_NUM_THREADS=1
rm -rf "$OUT"

python -m models.random_init --config-dir "${TINY_MODEL:-configs/tiny-llama}" --out "$OUT/base-hf" --seed 0
python convert_model.py hg_to_pp --input-path "$OUT/base-hf" --save-path "$OUT/pp" --quiet
deepspeed --num_gpus 2 --master_addr 127.0.0.1 --master_port "${MASTER_PORT:-29500}" train_ds.py --config configs/quickstart.json
python convert_model.py pp_to_hg --input-path "$OUT/ckpt" --save-path "$OUT/hf" --quiet
python demo.py --model-path "$OUT/hf" --prompt "What is the capital of France?" --max-new-tokens 24 --greedy

cat <<MSG

quickstart done:
  base model (random weights):   $OUT/base-hf
  pipeline layer files:          $OUT/pp
  training checkpoints:          $OUT/ckpt   (latest, global_stepN/, loss_curve.png, train_config.json)
  training logs (CSV monitor):   $OUT/logs
  exported Hugging Face model:   $OUT/hf
MSG
