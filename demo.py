"""Talk to a trained model with the prompt format used in training (the exported chat_template).

  python demo.py --model-path runs/quickstart/hf                       # interactive chat
  python demo.py --model-path runs/quickstart/hf --prompt "What is the capital of France?"
  python demo.py --model-path runs/quickstart/ckpt --prompts-file q.jsonl --output a.jsonl --greedy
  deepspeed --num_gpus 2 demo.py --model-path runs/quickstart/hf      # AutoTP over 2 devices
  deepspeed --num_gpus 2 demo.py --model-path runs/quickstart/ckpt --pipeline-stages 2   # pipeline split

--model-path is a Hugging Face folder (a `convert_model.py pp_to_hg` output, or any LLaMA/BLOOM
folder) or a pipeline checkpoint (a `hg_to_pp` output, a training save_path, a global_stepN folder),
which is converted in memory: no files are written.

Chat commands: /reset (forget the conversation), /exit (or Ctrl-D). A line ending in "\\" continues
on the next line. The conversation is kept within --max-context tokens (prompt + --max-new-tokens);
the oldest turns are dropped, with a notice, when it no longer fits.

--prompts-file: a JSONL file, one input per line: a JSON string (one user message), {"prompt": ...},
{"rounds": [["ask", ...], ["ans", ...], ...]}, or a training record with "type" (instruct, conversation,
ref_qa, pairwise, prompt; "output"/answers after the last question are not shown to the model and are
written back as "reference"). Each output line: {"prompt", "response", "tokens", "seconds",
"finish_reason"} (+ "id", "reference" when the input has them). See docs/inference.md.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import IO

from inference.errors import InferenceError
from inference.loading import DEFAULT_CONTEXT

EXIT_USER_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", required=True,
                   help="HF folder (pp_to_hg output) or pipeline checkpoint (hg_to_pp output, training save_path, global_stepN)")
    inputs = p.add_mutually_exclusive_group()
    inputs.add_argument("--prompt", help="one user message; the reply is printed (no --prompt/--prompts-file/--record: interactive chat)")
    inputs.add_argument("--record", help='one input as JSON, like a --prompts-file line, e.g. \'{"type": "instruct", "instruct": "..."}\'')
    inputs.add_argument("--prompts-file", help="JSONL inputs, one per line (see above); replies go to --output")
    p.add_argument("--output", help="JSONL file for --prompts-file results (default: standard output)")
    p.add_argument("--save-token-ids", action="store_true", help="also write the generated token ids (\"token_ids\") to --output")
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--greedy", action="store_true", help="greedy decoding (ignores temperature/top-p/top-k)")
    g.add_argument("--temperature", type=float, default=0.7)
    g.add_argument("--top-p", type=float, default=0.9)
    g.add_argument("--top-k", type=int, default=50, help="0 disables top-k")
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0,
                   help="sampling seed; in batch mode every input is sampled from this seed (order-independent)")
    g.add_argument("--max-context", type=int,
                   help="tokens of prompt + reply (default: the model's max_position_embeddings, else %d)" % DEFAULT_CONTEXT)
    r = p.add_argument_group("runtime")
    r.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: the checkpoint's dtype")
    r.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA when available")
    r.add_argument("--ds-inference", action="store_true",
                   help="use deepspeed.init_inference in a single process too (always used under the deepspeed launcher)")
    r.add_argument("--kernel-inject", default="auto", choices=["auto", "on", "off"],
                   help="DeepSpeed kernel injection; auto: on for CUDA + llama/bloom + float16/bfloat16, off otherwise")
    r.add_argument("--pipeline-stages", type=int, metavar="P",
                   help="split a pipeline checkpoint over P ranks (deepspeed --num_gpus P x D) and generate with the KV-cached "
                        "pipelined generator instead of AutoTP (see docs/inference.md)")
    r.add_argument("--show-prompt", action="store_true", help="print each rendered prompt (exactly what the model sees) to stderr")
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    return p


def check_args(args) -> None:
    checks = [
        (args.max_new_tokens >= 1, "--max-new-tokens must be at least 1"),
        (args.greedy or args.temperature > 0, "--temperature must be > 0 (use --greedy for deterministic replies)"),
        (0 < args.top_p <= 1, "--top-p must be in (0, 1]"),
        (args.top_k >= 0, "--top-k must be >= 0 (0 disables it)"),
        (args.repetition_penalty > 0, "--repetition-penalty must be > 0 (1.0 disables it)"),
        (args.max_context is None or args.max_context > args.max_new_tokens,
         "--max-context must be larger than --max-new-tokens (the prompt needs room too)"),
        (args.output is None or args.prompts_file is not None, "--output goes with --prompts-file"),
    ]
    for ok, message in checks:
        if not ok:
            raise InferenceError(message)


def read_inputs(args):
    """The --prompts-file / --record / --prompt inputs as Items; None for the chat REPL."""
    from inference.inputs import message_item, parse_record_arg, read_prompts_file

    if args.prompts_file:
        return read_prompts_file(args.prompts_file)
    if args.record:
        return [parse_record_arg(args.record)]
    if args.prompt is not None:
        if not args.prompt.strip():
            raise InferenceError("--prompt is empty")
        return [message_item(args.prompt, "--prompt")]
    return None


def run(args, stdin: IO[str], stdout: IO[str], stderr: IO[str]) -> int:
    import torch

    from inference.batch import run_batch
    from inference.chat import run_repl, run_single
    from inference.hf_chat import ChatModel
    from inference.loading import context_length, load_model
    from inference.parallel import NullIO, init_ranks, pick_device, setup_engine

    check_args(args)
    items = read_inputs(args)  # before loading the model: bad input fails fast
    if args.pipeline_stages is not None:
        from inference.pipeline import run_pipeline

        return run_pipeline(args, items, stdin, stdout, stderr)
    device_kind = pick_device(args.device)
    ranks = init_ranks(device_kind == "cuda")
    out, err = (stdout, stderr) if ranks.is_main else (NullIO(), NullIO())
    device = f"cuda:{ranks.local_rank}" if device_kind == "cuda" else "cpu"
    if device_kind == "cpu" and args.dtype == "float16":
        err.write("[warning: float16 on CPU is slow and often unsupported; bfloat16 or float32 is better]\n")

    torch.manual_seed(args.seed)
    if not ranks.is_main:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    # Library prints while loading (DeepSpeed's "AutoTP: ...") must not mix with replies on stdout.
    with contextlib.redirect_stdout(err):
        model, tokenizer = load_model(args.model_path, args.dtype)
        model, engine_name = setup_engine(model, tokenizer, args, ranks, device,
                                          reload=lambda: load_model(args.model_path, args.dtype))
    max_context = context_length(model.config, tokenizer, args.max_context)
    if max_context <= args.max_new_tokens:
        raise InferenceError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in the model's context of "
                             f"{max_context} tokens: lower it (or set --max-context)")
    chat = ChatModel(model, tokenizer, args, device, max_context)
    err.write(f"[{args.model_path}: {model.config.model_type}, {model.dtype}, {device}, {engine_name}, "
              f"{ranks.world_size} rank{'s' if ranks.world_size > 1 else ''}]\n")

    if args.prompts_file:
        if args.output and ranks.is_main:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            with open(args.output, "w", encoding="utf-8") as fh:
                run_batch(chat, items, fh, err, args.seed, args.save_token_ids, args.show_prompt)
        else:
            run_batch(chat, items, out, err, args.seed, args.save_token_ids, args.show_prompt)
    elif items is not None:
        run_single(chat, items[0], out, err, args.seed, ranks.is_main, args.show_prompt)
    else:
        run_repl(chat, ranks, stdin, out, err, args.seed, args.show_prompt)
    return 0


def main(argv=None, stdin: IO[str] = None, stdout: IO[str] = None, stderr: IO[str] = None) -> int:
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    args = build_parser().parse_args(argv)
    try:
        return run(args, stdin, stdout, stderr)
    except InferenceError as e:
        if int(os.environ.get("RANK", "0")) == 0:
            stderr.write(f"error: {e}\n")
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        stderr.write("\n")
        return 130


if __name__ == "__main__":
    try:
        status = main()
    finally:
        from trainer.engine.distributed import finish

        finish()  # barrier + destroy_process_group: without it gloo ranks sometimes abort at exit
    sys.exit(status)
