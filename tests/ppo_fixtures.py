"""Toy models for the PPO tests: an actor whose answers are not uniform noise, and a reward model,
built by hand (no training), whose score rises with the share of one marker token in the sequence.

The reward model (LLaMA, value head). Every token embeds to a constant in hidden dim 2; the marker
also has 1 in dim 0. Block 0's attention has zero queries and keys, so it averages over the real
(unmasked) positions up to the scored one; its value and output projections copy dim 0 into dim 1.
Every other weight of the blocks is zero (the residual passes through), so at the scored (last real)
token hidden = [marker is last, c * share of marker tokens, 1, 0, ...] and the score head reads
dim 1 after the final RMSNorm: a score increasing with the marker's share (about 1 for a tenth).
"""
import shutil
from collections import Counter
from pathlib import Path

import torch

MARKER_SCORE_SCALE = 0.25


def copy_tokenizer(src: Path, dst: Path) -> None:
    from models.pipe_dir import TOKENIZER_FILES

    for name in TOKENIZER_FILES + ("generation_config.json",):
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)


def marker_reward_hf(base_hf: Path, out: Path, marker: int, pad_id: int) -> Path:
    """An HF LlamaForSequenceClassification (num_labels 1) scoring the marker's share; see the module doc."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(base_hf)
    config.num_labels, config.pad_token_id = 1, pad_id
    config.architectures = ["LlamaForSequenceClassification"]
    model = AutoModelForSequenceClassification.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
        emb = model.model.embed_tokens.weight
        emb[:, 2] = 1.0
        emb[marker, 0] = 1.0
        attn = model.model.layers[0].self_attn
        attn.v_proj.weight[0, 0] = 1.0      # kv head 0, dim 0 <- hidden dim 0 (the marker)
        attn.o_proj.weight[1, 0] = 1.0      # hidden dim 1 <- attention head 0, dim 0
        model.score.weight[0, 1] = MARKER_SCORE_SCALE
    model.save_pretrained(out)
    copy_tokenizer(base_hf, out)
    return out


def peaked_actor_hf(base_hf: Path, out: Path, head_scale: float = 12.0) -> Path:
    """The random base with its LM head scaled: answers drawn from a few dozen likely tokens (with
    the init's 0.02 std every token is about equally likely: a marker would almost never appear)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_hf, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)
    model.save_pretrained(out)
    copy_tokenizer(base_hf, out)
    return out


def choose_marker(actor_hf: Path, prompts: list[list[int]], exclude: set, max_new_tokens: int, share: float = 0.03,
                  seed: int = 0) -> tuple[int, float]:
    """A token that the actor samples for about `share` of its answer tokens (so PPO has something to
    raise): (token id, its share)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(actor_hf, dtype=torch.float32)
    counts, total = Counter(), 0
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in prompts:
            out = model.generate(torch.tensor([p]), do_sample=True, max_new_tokens=max_new_tokens, top_k=0,
                                 pad_token_id=0, eos_token_id=None)
            answer = out[0, len(p):].tolist()
            counts.update(answer)
            total += len(answer)
    candidates = [(abs(n / total - share), t, n / total) for t, n in counts.items() if t not in exclude]
    _, token, got = min(candidates)
    return token, got
