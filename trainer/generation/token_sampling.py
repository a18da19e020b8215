"""Choosing the next token from the last stage's logits: greedy, temperature, top-k, top-p and a
repetition penalty, each explicit, with one random stream per row.

Order (as transformers' `generate` applies its processors): repetition penalty on the raw logits, then
(sampling only) temperature, top-k, top-p; greedy takes the argmax of the penalised logits.

Two log-probabilities come back for every chosen token, both fp32:
- `raw`: log_softmax of the model's own logits, before any penalty or warper. This is what a training
  forward computes for the same token, so PPO's old log-probs and ratios use it.
- `sampling`: under the distribution the token was actually drawn from (after penalty, temperature,
  top-k and top-p); 0 for greedy (a point mass). For importance weights against the sampler itself.

Randomness: each row owns a `torch.Generator` seeded by `row_seed(seed, prompt ids, occurrence)` and
draws exactly one uniform per generated token (inverse-CDF sampling), so a row's tokens do not depend
on which micro-batch it lands in, on the number of micro-batches, nor on the order of the rows.
"""
import hashlib
from dataclasses import dataclass
from typing import Optional, Sequence

import torch


@dataclass(frozen=True)
class SamplingConfig:
    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0            # 0: off
    top_p: float = 1.0        # 1.0: off
    repetition_penalty: float = 1.0  # 1.0: off; > 1 discourages tokens already in the row (prompt included)
    seed: int = 0
    # the temperature of the log-probs returned beside each id: 1 (the model's raw distribution,
    # DeepSpeed-Chat's convention) or the sampling temperature (TRL's and verl's: PPO's logprobs_at_temperature)
    logprob_temperature: float = 1.0

    def check(self) -> None:
        problems = []
        if not self.greedy and not self.temperature > 0:
            problems.append(f"temperature must be > 0 (got {self.temperature}); use greedy for deterministic output")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1] (1 disables it), got {self.top_p}")
        if not self.repetition_penalty > 0:
            problems.append(f"repetition_penalty must be > 0 (1.0 disables it), got {self.repetition_penalty}")
        if problems:
            raise ValueError("; ".join(problems))


def row_seed(seed: int, prompt: Sequence[int], occurrence: int = 0) -> int:
    """A 63-bit seed from the run's seed, the prompt's token ids and how many identical prompts came
    before it (so repeated prompts, e.g. several PPO samples per prompt, get different streams)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{seed}:{occurrence}:".encode())
    h.update(torch.as_tensor(list(prompt), dtype=torch.int64).numpy().tobytes())
    return int.from_bytes(h.digest(), "little") >> 1


def row_seeds(seed: int, prompts: Sequence[Sequence[int]]) -> list[int]:
    seen: dict[tuple, int] = {}
    out = []
    for p in prompts:
        key = tuple(p)
        out.append(row_seed(seed, key, seen.get(key, 0)))
        seen[key] = seen.get(key, 0) + 1
    return out


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits float[b,V], seen bool[b,V] (tokens already in the row) -> penalised logits (HF's rule:
    negative logits times the penalty, positive ones divided by it)."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def warp(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Temperature, then top-k, then top-p (removed tokens -> -inf), as transformers' warpers do."""
    if cfg.temperature != 1.0:
        logits = logits / cfg.temperature
    if cfg.top_k > 0:
        k = min(cfg.top_k, logits.shape[-1])
        kth = torch.topk(logits, k).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove_sorted = cumulative <= (1 - cfg.top_p)
        remove_sorted[..., -1:] = False  # keep at least one token
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def draw(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: probs float[b,V] (unnormalised is fine), uniforms float[b] in [0, 1) ->
    int64[b]. A token of probability 0 is never chosen (`right=True` skips flat runs of the CDF)."""
    cdf = probs.cumsum(-1)
    target = (uniforms.to(cdf.dtype) * cdf[:, -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


def choose_next(logits: torch.Tensor, seen: Optional[torch.Tensor], cfg: SamplingConfig,
                generators: Sequence[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits float[b,V] (any dtype; computed in fp32), seen bool[b,V] or None, one generator per row
    (used only when sampling) -> (ids int64[b], raw log-probs float32[b] (of logits / cfg.logprob_temperature),
    sampling log-probs float32[b])."""
    logits = logits.float()
    raw = torch.log_softmax(logits if cfg.logprob_temperature == 1.0 else logits / cfg.logprob_temperature, -1)
    scores = apply_repetition_penalty(logits, seen, cfg.repetition_penalty) if seen is not None else logits
    if cfg.greedy:
        ids = scores.argmax(-1)
        sampling = torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)
    else:
        warped = warp(scores, cfg)
        probs = torch.softmax(warped, -1)
        uniforms = torch.stack([torch.rand((), generator=g) for g in generators]).to(probs.device)
        ids = draw(probs, uniforms)
        sampling = torch.log_softmax(warped, -1).gather(-1, ids[:, None]).squeeze(-1)
    return ids, raw.gather(-1, ids[:, None]).squeeze(-1), sampling
