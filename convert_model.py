"""Convert checkpoints between Hugging Face folders and pipeline layer files.

  python convert_model.py hg_to_pp --input-path HF_DIR --save-path PP_DIR [--dtype auto|fp32|bf16|fp16]
  python convert_model.py pp_to_hg --input-path PP_CKPT --save-path HF_DIR [--max-shard-size 5GB] [--overwrite]

Both directions stream one pipe layer at a time, so converting a 70B model needs memory for one
layer, not for the model.
"""
import argparse
import sys

from trainer.op_cache import venv_op_cache
from trainer.quiet import quiet_deepspeed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{hg_to_pp,pp_to_hg}")

    h2p = sub.add_parser(
        "hg_to_pp", help="HF folder -> pipeline layer files",
        description="Split a Hugging Face model folder (safetensors, sharded or not, or pytorch_model*.bin) into "
        "one DeepSpeed layer file per pipe layer (embedding, each block, final norm, head), plus config.json, "
        "generation_config.json, tokenizer files and pipetune.json metadata.",
    )
    h2p.add_argument("--input-path", required=True, help="local Hugging Face model folder (config.json + weights)")
    h2p.add_argument("--save-path", required=True, help="output folder for layer_NN-model_states.pt files")
    h2p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                     help="weight dtype to write (default: auto, keep the checkpoint's)")
    h2p.add_argument("--overwrite", action="store_true", help="replace a non-empty --save-path")

    p2h = sub.add_parser(
        "pp_to_hg", help="pipeline layer files -> HF folder",
        description="Gather pipeline layer files (a hg_to_pp output, a training save_path, which follows DeepSpeed's "
        "'latest', or one global_stepN folder) into a Hugging Face folder: sharded safetensors + "
        "model.safetensors.index.json, config.json, generation_config.json and tokenizer files.",
    )
    p2h.add_argument("--input-path", required=True, help="hg_to_pp output, training save_path, or a global_stepN folder")
    p2h.add_argument("--save-path", required=True, help="output Hugging Face folder")
    p2h.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    p2h.add_argument("--overwrite", action="store_true", help="replace a non-empty --save-path")
    for p in (h2p, p2h):
        p.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv=None) -> int:
    venv_op_cache()  # DeepSpeed's ops built once per venv (trainer/op_cache.py)
    quiet_deepspeed()  # before DeepSpeed is imported: no CPU-alarming lines (trainer/quiet.py)
    args = build_parser().parse_args(argv)
    from convert.errors import ConversionError
    from models.registry import UnsupportedModelError

    try:
        if args.command == "hg_to_pp":
            from convert.hg_to_pp import hg_to_pp

            out = hg_to_pp(args.input_path, args.save_path, dtype=args.dtype, overwrite=args.overwrite, progress=not args.quiet)
        else:
            from convert.pp_to_hg import pp_to_hg

            out = pp_to_hg(args.input_path, args.save_path, max_shard_size=args.max_shard_size,
                           overwrite=args.overwrite, progress=not args.quiet)
    except (ConversionError, UnsupportedModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
