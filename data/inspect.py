"""``python -m data.inspect [PATH...] [--config TRAINING_CONFIG] [--format FORMAT] [--tokenizer-path DIR] [--template pipetune|model]
[--max-seq-len N] [--show K] [--skip-bad] [--kind lm|pairwise|ranked|prompt] [--overflow truncate|drop|chunk] [--pack]
[--pad-token TOKEN]``

Validates record files (.json, .jsonl, .parquet, save_to_disk folders; any record format of
``data.formats``, detected per file or given with --format): exit 0 when valid; otherwise prints one
line per bad record to stderr and exits 1 (no traceback). ``--skip-bad`` drops bad records instead and
reports counts by reason. It prints each file's record format and the record types it maps to.
With ``--tokenizer-path`` it also tokenizes: per-type counts, token-length statistics, how many samples
would be truncated or dropped at ``--max-seq-len``, and K rendered samples with the trained (unmasked)
tokens marked ⟦like this⟧ (green when the output is a terminal), so you see exactly what is learned,
with pipetune's template or (``--template model``) the tokenizer's own chat template. With ``--kind
prompt`` (PPO/GRPO) the records are read as prompts (GSM8K question/answer records and chats ending with
a user message are prompt records, ``data.formats``); it lists the prompt records' columns (what reward
functions get besides the prompts) and shows each sample's record (the prompt as the data gave it and
its columns), then its prompt as rendered.

``--config`` inspects what a training config trains: its data_path (unless PATHs are given), the
tokenizer of its model_path, and its max_seq_len, pack, overflow, pad_token, template,
skip_bad_records and split, with the kind of its stage (sft lm, rm ranked, dpo pairwise, ppo and grpo
prompt);
options given on the command line win. Without a config, --max-seq-len defaults to the trainer's 512.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
from typing import List, Optional

from data.chat_template import TEMPLATES
from data.errors import DataError, TokenizerError
from data.packing import OVERFLOW_POLICIES
from data.records import load_records
from data.schema import FORMATS


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data.inspect", description=__doc__.split("\n\n")[1])
    p.add_argument("paths", nargs="*", help=".json/.jsonl/.parquet files, save_to_disk folders, globs or folders "
                   "(default with --config: its data_path)")
    p.add_argument("--config", help="a train_ds.py config: inspect its data as that run trains it")
    p.add_argument("--format", choices=("auto",) + FORMATS, default="auto",
                   help="the record format of every path (default: detected per file)")
    p.add_argument("--template", choices=TEMPLATES, default=None,
                   help="pipetune's prompt template, or the tokenizer's own chat template (model)")
    p.add_argument("--tokenizer-path", help="HF tokenizer directory (enables token statistics and --show)")
    p.add_argument("--max-seq-len", type=int, default=None, help="row length (default: the config's, else the trainer's 512)")
    p.add_argument("--show", type=int, default=0, metavar="K", help="render K samples with the trained part marked")
    p.add_argument("--skip-bad", action="store_true", help="drop bad records and count them instead of failing")
    p.add_argument("--kind", choices=("lm", "pairwise", "ranked", "prompt"), default=None,
                   help="what a stage builds: lm (SFT), pairwise (DPO), ranked (RM: pairwise and ranked records), "
                   "prompt (PPO)")
    p.add_argument("--overflow", choices=OVERFLOW_POLICIES, default=None)
    p.add_argument("--pack", action="store_true", default=None)
    p.add_argument("--pad-token", help="token to pad rows with (default: the tokenizer's pad, unk, a spare "
                   "special token or BOS; never EOS)")
    return p


def mark_trained(tokenizer, ids, trained, color: bool = False) -> str:
    """Decode ``ids`` run by run, wrapping trained runs in markers."""
    open_, close = ("\033[32m", "\033[0m") if color else ("⟦", "⟧")
    out, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or bool(trained[i]) != bool(trained[start]):
            text = tokenizer.decode(list(ids[start:i]))
            out.append(open_ + text + close if trained[start] else text)
            start = i
    return "".join(out)


# The record kind each training stage builds (trainer/recipes/*: prepare(..., kind=...)).
STAGE_KINDS = {"sft": "lm", "rm": "ranked", "dpo": "pairwise", "ppo": "prompt", "grpo": "prompt"}
DEFAULTS = {"max_seq_len": 512, "kind": "lm", "overflow": "truncate", "pack": False, "template": "pipetune"}


def _apply_config(args) -> Optional[int]:
    """Fill the options the command line left unset from the training config (--config), then the
    defaults; an exit status when the config cannot be read."""
    extra = {}
    if args.config:
        from trainer.recipes import ConfigError, load_config

        try:
            cfg = load_config(args.config)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if not args.paths:
            args.paths = cfg.data_path if isinstance(cfg.data_path, list) else [cfg.data_path]
        found = {"max_seq_len": cfg.max_seq_len, "kind": STAGE_KINDS.get(cfg.stage, "lm"), "overflow": cfg.overflow,
                 "pack": cfg.pack, "template": cfg.template}
        for key, value in found.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
        args.tokenizer_path = args.tokenizer_path or (cfg.options.actor_path if cfg.stage in ("ppo", "grpo")
                                                      else cfg.model_path)
        args.pad_token = args.pad_token if args.pad_token is not None else cfg.pad_token
        args.skip_bad = args.skip_bad or cfg.skip_bad_records
        extra = {"eval_paths": cfg.eval_data_path, "eval_fraction": cfg.eval_fraction, "seed": cfg.seed,
                 "data_split": cfg.data_split, "split_index": cfg.split_index}
    for key, value in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.pack = args.pack and args.kind == "lm"  # as the trainer: packing is SFT's
    args.split = extra
    if not args.paths:
        print("error: give data files (PATH...) or --config", file=sys.stderr)
        return 2
    return None


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    from trainer.quiet import quiet_deepspeed

    quiet_deepspeed()  # --config's validation imports DeepSpeed: no accelerator line
    status = _apply_config(args)
    if status is not None:
        return status
    paths = [p if isinstance(p, dict) or args.format == "auto" else {"path": p, "format": args.format} for p in args.paths]
    if args.tokenizer_path is None:
        loaded = load_records(paths, prompts=args.kind == "prompt")
        if loaded.problems and not args.skip_bad:
            return _fail(DataError(loaded.problems))
        print(f"files: {len(loaded.files)}  valid records: {len(loaded.records)}")
        _print_formats(dict(loaded.formats))
        print("types:", json.dumps(dict(collections.Counter(r.type for r in loaded.records)), ensure_ascii=False))
        if loaded.problems:
            print("dropped bad records:", json.dumps(dict(collections.Counter(p.reason for p in loaded.problems))))
        return 0

    from transformers import AutoTokenizer  # heavy import only when tokenizing

    from data.dataset import build_dataset, unused_hints
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_path)
    except (OSError, ValueError) as e:
        print(f"error: cannot load tokenizer from {args.tokenizer_path}: {e}", file=sys.stderr)
        return 2
    try:
        built = build_dataset(paths, tokenizer, args.max_seq_len, kind=args.kind, pack=args.pack,
                              overflow=args.overflow, strict=not args.skip_bad, pad_token=args.pad_token,
                              template=args.template, **args.split)
    except TokenizerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except DataError as e:
        return _fail(e)
    except ValueError as e:  # e.g. nothing left to train on
        print(f"error: {e}", file=sys.stderr)
        return 1
    st, tr = built.stats, built.stats["train"]
    print(f"files: {len(st['files'])}  valid records: {st['records']}  kind: {args.kind}  "
          f"max_seq_len: {args.max_seq_len}" + (f"  pack: {args.pack}" if args.pack else "")
          + (f"  (from {args.config})" if args.config else ""))
    _print_formats(st["formats"])
    _print_template(st["template"], tokenizer)
    print("types used:", json.dumps(tr["types"], ensure_ascii=False))
    if tr["unused"]:
        print(f"types not used by kind={args.kind}:", json.dumps(tr["unused"]))
        for hint in unused_hints(args.kind, tr["unused"]):
            print(f"  note: {hint}")
    if args.kind == "prompt":
        names = sorted({k for i in range(len(built.train)) for k in built.train.record(i)} - {"prompt"})
        print("prompt columns (reward functions get them):", ", ".join(names) or "none")
    if st["invalid"]:
        print("dropped bad records:", json.dumps(st["invalid"]))
    print("tokens per sample before fitting:", json.dumps(tr["length_before_fit"]))
    print(f"truncated: {tr['truncated']} (context cut from the left: {tr['context_cut']})  chunked documents: "
          f"{tr['chunked']} (into {tr['chunks']} rows)  dropped: {json.dumps(tr['dropped'])}  ({args.overflow} policy)")
    pad = st["pad"]
    print(f"pad: {pad['token']!r} (id {pad['id']}, {pad['source'].replace('_', ' ')})")
    print(f"rows: {tr['rows']}  real tokens: {tr['real_tokens']}  trained tokens: {tr['target_tokens']}  "
          f"padding efficiency: {tr['efficiency']:.3f}")
    if args.kind == "ranked":
        print(f"responses per record (K): {st['max_responses']}  ordered pairs: {tr['pairs']}  filler rows: "
              f"{tr['filler_rows']} (records with fewer than K responses)")
    color = sys.stdout.isatty()
    ds = built.train
    for i in range(min(args.show, len(ds))):
        print(f"\n--- sample {i} " + "-" * 50)
        item = ds[i]
        if args.kind == "prompt":
            ids, mask = item
            print("[record] " + json.dumps(ds.record(i), ensure_ascii=False))  # what the reward functions get
            print(tokenizer.decode(ids[mask.bool()].tolist()))
            continue
        # lm: (inputs, labels); pairwise: (inputs, labels, margin); ranked: (inputs, labels, margin, n_responses)
        (ids, mask, *_), labels = item[:2]
        n_rows = int(item[3]) if args.kind == "ranked" else ids.shape[0] if ids.dim() == 2 else 1  # no filler rows
        for side in range(n_rows):
            row_ids, row_mask, row_lab = (ids[side], mask[side], labels[side]) if ids.dim() == 2 else (ids, mask, labels)
            keep = row_mask.bool()
            if args.kind == "ranked":
                tag = " (best)" if side == 0 else " (worst)" if side == n_rows - 1 else ""
                print(f"[responses[{side}]: rank {side + 1} of {n_rows}{tag}]")
            elif ids.dim() == 2:
                print(["[chosen]", "[rejected]"][side])
            print(mark_trained(tokenizer, row_ids[keep].tolist(), (row_lab[keep] != -100).tolist(), color))
    return 0


def _print_formats(formats: dict) -> None:
    for path, fmt in formats.items():
        print(f"  {path}: {fmt} format" + ("" if fmt == "pipetune" else " (mapped to the unified record types)"))


def _print_template(st: dict, tokenizer) -> None:
    if st["name"] == "pipetune":
        print("template: pipetune (Human:/Assistant:, data.templates)")
        return
    how = "its {% generation %} blocks" if st["generation_blocks"] else "incremental rendering"
    print(f"template: the tokenizer's chat template; trained: assistant turns (from {how}), each ending with "
          f"{st['end_of_turn']!r}")
    if st["end_of_turn"] != tokenizer.eos_token:
        print(f"  note: turns end with {st['end_of_turn']!r}, not EOS {tokenizer.eos_token!r}: generation must stop "
              "at it (generation_config.json eos_token_id)")
    if not st["prompt_boundary_ok"]:
        print("  note: the tokenizer merges tokens across the end of the assistant header, so a prompt tokenized "
              "alone (demo, serving) differs in its last tokens from the context training saw")


def _fail(err: DataError) -> int:
    for line in err.lines:
        print(line, file=sys.stderr)
    print(f"{len(err.lines)} problem(s) found; fix them, or pass --skip-bad to drop the bad records",
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
