"""A Hugging Face model folder with seeded random weights, built from a config folder.

Used by the quickstart and the tests (no weights are downloaded or committed):

    python -m models.random_init --config-dir configs/tiny-llama --out runs/tiny-llama-hf --seed 0
"""
import argparse
import shutil
from pathlib import Path
from typing import Optional

from models.pipe_dir import SIDE_FILES

# Copied from the config folder unless save_pretrained wrote them (config.json always is).
COPIED_FILES = tuple(name for name in SIDE_FILES if name != "config.json")
# Copied over what save_pretrained wrote: the config folder's generation_config.json is the family's
# (chat models list several eos ids there, e.g. Qwen's <|im_end|> and <|endoftext|>); the one
# save_pretrained derives from config.json knows only config.json's eos_token_id.
REPLACED_FILES = ("generation_config.json",)


def save_random_model(config_dir: str | Path, out_dir: str | Path, seed: int = 0, dtype: str = "float32",
                      tie_word_embeddings: Optional[bool] = None, overrides: Optional[dict] = None) -> Path:
    """Write `out_dir` = config (+ overrides) + random weights (HF's own init, seeded) + tokenizer files."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config_dir, out_dir = Path(config_dir), Path(out_dir)
    config = AutoConfig.from_pretrained(config_dir)
    if tie_word_embeddings is not None:
        config.tie_word_embeddings = tie_word_embeddings
    for key, value in (overrides or {}).items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(out_dir)
    for name in COPIED_FILES:
        if (config_dir / name).is_file() and (name in REPLACED_FILES or not (out_dir / name).exists()):
            shutil.copy2(config_dir / name, out_dir / name)
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-dir", required=True, help="folder with config.json and tokenizer files")
    parser.add_argument("--out", required=True, help="output Hugging Face folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    print(f"wrote {save_random_model(args.config_dir, args.out, args.seed, args.dtype)}")


if __name__ == "__main__":
    main()
