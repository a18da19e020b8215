"""SFT's `eval_samples`: at each eval, generate answers to the first N prompts of the eval split on
the training pipeline itself (`trainer.generation.decoding`, the engine's current weights) and append them to
SAVE_PATH/eval_samples.jsonl with the step; rank 0 prints the first two.

    "eval_samples": 4                                      greedy, up to 64 new tokens
    "eval_samples": {"n": 4, "max_new_tokens": 128, "greedy": false, "temperature": 0.7, "top_p": 0.9, "seed": 0}

A prompt is an eval row's tokens before its first trained token (the rendered question and the
assistant header, exactly as training saw them); the trained tokens after it, up to the end of
that answer, are written back as "reference". Rows without prompt text (pretrain) are skipped.
Each line: {"step", "index", "prompt", "response", "reference", "tokens", "finish_reason"}.
"""
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from trainer.engine.distributed import broadcast_object
from trainer.generation.stop_ids import answer_stop_ids, generation_pad_id
from trainer.generation.token_sampling import SamplingConfig

FILE_NAME = "eval_samples.jsonl"
KEYS = ("n", "max_new_tokens", "greedy", "temperature", "top_k", "top_p", "repetition_penalty", "seed")


@dataclass(frozen=True)
class EvalSamples:
    n: int = 0
    max_new_tokens: int = 64
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    @classmethod
    def from_config(cls, value) -> "EvalSamples":
        if isinstance(value, dict):
            sampling = SamplingConfig(**{k: value[k] for k in KEYS[2:] if k in value})
            return cls(value.get("n", 0), value.get("max_new_tokens", 64), sampling)
        return cls(int(value or 0))


def config_problems(value) -> list[str]:
    """Problems with an `eval_samples` config value (for trainer.config's validation)."""
    if isinstance(value, bool) or not isinstance(value, (int, dict)):
        return [f"eval_samples must be a number of prompts or an object {{\"n\": N, \"max_new_tokens\": ..., \"greedy\": ...}}, got {json.dumps(value)}"]
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(KEYS))
        if unknown:
            return [f"eval_samples: unknown keys {unknown} (use {', '.join(KEYS)})"]
    try:
        spec = EvalSamples.from_config(value)
        spec.sampling.check()
    except (TypeError, ValueError) as e:
        return [f"eval_samples: {e}"]
    problems = []
    if spec.n < 0:
        problems.append(f"eval_samples must not be negative, got {spec.n}")
    if not isinstance(spec.max_new_tokens, int) or spec.max_new_tokens < 1:
        problems.append(f"eval_samples.max_new_tokens must be an integer >= 1, got {spec.max_new_tokens!r}")
    return problems


def eval_prompts(dataset, n: int, tokenizer) -> list[tuple[list[int], str]]:
    """The first n eval rows that have a prompt -> [(prompt ids, reference text)]."""
    out = []
    for i in range(len(dataset)):
        if len(out) == n:
            break
        (ids, mask, *_), labels = dataset[i]
        trained = (labels != -100).nonzero().flatten()
        if len(trained) == 0 or int(trained[0]) == 0:
            continue
        start = int(trained[0])
        if not tokenizer.decode(ids[:start].tolist(), skip_special_tokens=True).strip():
            continue  # pretrain text: only BOS comes before the trained tokens
        end = start
        while end < len(labels) and int(labels[end]) != -100:
            end += 1
        out.append((ids[:start].tolist(), tokenizer.decode(ids[start:end].tolist(), skip_special_tokens=True)))
    return out


def sample_generations(engine, cfg, plan, tokenizer, data, topo, step: int) -> Optional[list[dict]]:
    """Collective. Generate for the eval_samples prompts (shared among the data-parallel replicas),
    append the lines to SAVE_PATH/eval_samples.jsonl; returns them on rank 0 (None elsewhere)."""
    from trainer.generation.decoding import generate, replica_share

    spec = cfg.options.samples
    if spec.n <= 0:
        return None
    rows = broadcast_object(eval_prompts(data.eval, spec.n, tokenizer) if topo.rank == 0 else None)
    if not rows:
        return None
    context = getattr(plan.model_config, "max_position_embeddings", None) or (cfg.max_seq_len + spec.max_new_tokens)
    max_new = max(1, min(spec.max_new_tokens, context - max(len(p) for p, _ in rows)))
    stop = answer_stop_ids(tokenizer, plan.model_config, plan.side_dir)
    pad = generation_pad_id(tokenizer)
    gen = generate(engine.module, plan.model_config, replica_share([p for p, _ in rows], engine.module),
                   max_new_tokens=max_new, stop_ids=stop, pad_id=pad, sampling=spec.sampling, max_context=context)
    mine = [(gen.answer(k), gen.finish_reason[k]) for k in range(len(gen.n_new))] if topo.is_first_stage else None
    shares = [None] * topo.world_size
    torch.distributed.all_gather_object(shares, mine)
    if topo.rank != 0:
        return None
    replicas = [s for s in shares if s is not None]  # stage-0 ranks in replica order
    lines = []
    for i, (prompt, reference) in enumerate(rows):
        answer, finish = replicas[i % len(replicas)][i // len(replicas)]
        lines.append({"step": step, "index": i, "prompt": tokenizer.decode(prompt, skip_special_tokens=True),
                      "response": tokenizer.decode(answer, skip_special_tokens=True), "reference": reference,
                      "tokens": len(answer), "finish_reason": finish})
    with open(Path(cfg.save_path) / FILE_NAME, "a", encoding="utf-8") as fh:
        for line in lines:
            fh.write(json.dumps(line, ensure_ascii=False) + "\n")
    for line in lines[:2]:
        print(f"[eval sample, step {step}] {line['prompt'][-200:]!r} -> {line['response'][:200]!r}", flush=True)
    return lines
