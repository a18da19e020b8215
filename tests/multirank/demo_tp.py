"""Run under `deepspeed --num_gpus 2` (CPU/gloo): demo.py's own `main` (AutoTP via init_inference)
for several models in one launch, since each launch costs ~15 s.

  --batch MODEL_PATH:PROMPTS_JSONL:OUT_JSONL    batch mode, greedy, with token ids
  --chat MODEL_PATH:INPUT_TXT:OUT_TXT           the chat REPL; rank 0 reads INPUT_TXT as its stdin
                                                and its stdout (the streamed replies) goes to OUT_TXT
"""
import argparse
import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import demo  # noqa: E402
from trainer.engine.distributed import finish  # noqa: E402

COMMON = ["--greedy", "--max-new-tokens", "10"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", action="append", default=[])
    parser.add_argument("--chat", action="append", default=[])
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    rank = int(__import__("os").environ.get("RANK", "0"))
    try:
        for case in args.batch:
            model, prompts, out = case.split(":")
            status = demo.main(["--model-path", model, "--prompts-file", prompts, "--output", out, "--save-token-ids", *COMMON])
            assert status == 0, f"batch {case}: exit {status}"
        for case in args.chat:
            model, stdin_path, out = case.split(":")
            stdin = open(stdin_path) if rank == 0 else io.StringIO("")  # only rank 0 may read
            stdout = io.StringIO()
            status = demo.main(["--model-path", model, *COMMON], stdin=stdin, stdout=stdout)
            assert status == 0, f"chat {case}: exit {status}"
            if rank == 0:
                Path(out).write_text(stdout.getvalue())
    finally:
        finish()


if __name__ == "__main__":
    main()
