#!/usr/bin/env bash
# The quickstart: tiny LLaMA (seeded random weights, shipped tokenizer) -> pipeline layer files ->
# Hugging Face folder -> a generated reply. Everything goes under runs/quickstart/.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=runs/quickstart
export OMP_NUM_THREADS=1

python -m models.random_init --config-dir configs/tiny-llama --out "$OUT/base-hf" --seed 0
python convert_model.py hg_to_pp --input-path "$OUT/base-hf" --save-path "$OUT/pp" --overwrite
python convert_model.py pp_to_hg --input-path "$OUT/pp" --save-path "$OUT/hf" --overwrite
python demo.py --model-path "$OUT/hf" --prompt "What is the capital of France?" --max-new-tokens 24 --greedy

cat <<MSG

quickstart done:
  base HF model (random weights):  $OUT/base-hf
  pipeline layer files:            $OUT/pp
  exported HF model:               $OUT/hf
MSG
