"""Talk to a model exported with `convert_model.py pp_to_hg` (or any HF folder), with the prompt
format used in training (the tokenizer's chat_template).

  python demo.py --model-path runs/quickstart/hf --prompt "What is the capital of France?"
"""
import argparse
import sys
import time


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", required=True, help="Hugging Face folder (e.g. a pp_to_hg output)")
    p.add_argument("--prompt", required=True, help="one user message; the reply is printed")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--greedy", action="store_true", help="greedy decoding (ignores the sampling options)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    return p


def generate_reply(model, tokenizer, messages: list[dict], args) -> tuple[str, int]:
    """Render `messages` with the chat template, generate, return (reply text, new token count)."""
    import torch

    from data.templates import set_chat_template

    if not tokenizer.chat_template:
        set_chat_template(tokenizer)  # a folder exported before templates were stored
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    torch.manual_seed(args.seed)
    sampling = {} if args.greedy else {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k}
    out = model.generate(
        **ids, max_new_tokens=args.max_new_tokens, do_sample=not args.greedy, repetition_penalty=args.repetition_penalty,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        **sampling,
    )
    new = out[0, ids["input_ids"].shape[1]:]
    return tokenizer.decode(new, skip_special_tokens=True), int(new.numel())


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from pathlib import Path

    if not Path(args.model_path).is_dir():
        print(f"error: --model-path {args.model_path}: not a local folder (export one with convert_model.py pp_to_hg)", file=sys.stderr)
        return 2
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model_path)
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=dtype).eval()
    start = time.perf_counter()
    reply, n_tokens = generate_reply(model, tokenizer, [{"role": "user", "content": args.prompt}], args)
    print(reply)
    print(f"[{n_tokens} tokens in {time.perf_counter() - start:.2f} s]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
