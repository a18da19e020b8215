"""The DPO family's math as small pure functions (used by `trainer.recipes.dpo` on the last stage).

Notation, per pair (B pairs; chosen side c, rejected side r):
    pi_c, pi_r     summed log-probs of the answer tokens (answer + end of turn) under the policy
    ref_c, ref_r   the same under the frozen reference (precomputed once, `trainer.rl.reference_logps`)
    n_c, n_r       answer tokens of each side

Losses (each float[B]; the recipe takes the mean over pairs):
    "sigmoid" (DPO, Rafailov et al. 2023), with label smoothing eps (cDPO, Mitchell 2023):
        h = (pi_c - ref_c) - (pi_r - ref_r)
        loss = -(1 - eps) * logsigmoid(beta * h) - eps * logsigmoid(-beta * h)
    "ipo" (Azar et al. 2023), on length-averaged log-probs (as the IPO paper and TRL do):
        h = (pi_c / n_c - ref_c / n_c) - (pi_r / n_r - ref_r / n_r)
        loss = (h - 1 / (2 * beta))^2
    "simpo" (Meng et al. 2024), reference-free, length-normalised, target margin gamma:
        z = beta * (pi_c / n_c - pi_r / n_r) - gamma
        loss = -(1 - eps) * logsigmoid(z) - eps * logsigmoid(-z)

Rewards (TRL's `rewards/*`): beta times the policy-minus-reference log-prob of each side, on the same
quantity the loss uses (sums for sigmoid, per-token averages for ipo, averages with no reference for
simpo). The reference values are detached: gradients reach the policy only.

`DPOLoss` is the training loss_fn DeepSpeed calls on the last stage; `eval_pair_stats` the
forward-only reduce of the evaluation. Both take the labels tuple the recipe feeds
(answer labels int64[2B,T], reference log-probs float[2B], sft scale float64[] | real-pair weights float[B]).
"""
import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from trainer.config import RecipeOptions, type_problems
from trainer.losses import shifted_token_logps

LOSS_TYPES = ("sigmoid", "ipo", "simpo")


@dataclass(frozen=True)
class DPOOptions(RecipeOptions):
    """Stage "dpo"'s keys (top level of the config):
      beta            (0.1) strength of the preference term (SimPO uses ~2)
      loss_type       "sigmoid" (DPO; default), "ipo" (length-averaged log-probs) or "simpo" (reference-free)
      label_smoothing (0) cDPO's assumed share of flipped labels, 0 <= x < 0.5 (sigmoid and simpo)
      simpo_gamma     (0.5) SimPO's target margin
      sft_coef        (0) weight of the chosen answers' LM loss (RPO), mean over the chosen answer tokens
      ref_path        the reference checkpoint (default: model_path); its log-probs are computed once
                      before training and cached in cache_dir
      disable_dropout (true) no dropout in the policy while training (TRL's default): the reference's
                      log-probs are computed without dropout, so the first step's margins are exactly 0"""
    LABEL = "DPO"
    KEYS = ("beta", "loss_type", "label_smoothing", "simpo_gamma", "sft_coef", "ref_path", "disable_dropout")
    TYPES = {"beta": (int, float), "loss_type": str, "label_smoothing": (int, float), "simpo_gamma": (int, float),
             "sft_coef": (int, float), "ref_path": str, "disable_dropout": bool}

    loss_type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    sft_coef: float = 0.0
    ref_path: Optional[str] = None
    disable_dropout: bool = True

    @classmethod
    def from_keys(cls, keys: dict) -> "DPOOptions":
        numbers = {k: float(keys[k]) for k in ("beta", "label_smoothing", "simpo_gamma", "sft_coef") if k in keys}
        return cls(**{**keys, **numbers})

    @classmethod
    def problems(cls, keys: dict, project: dict, ds: dict, pipe) -> list[str]:
        problems = type_problems(keys, cls.TYPES)
        if problems:
            return problems
        for key in ("beta", "label_smoothing", "simpo_gamma", "sft_coef"):
            if key in keys and not math.isfinite(keys[key]):
                return [f"{key} must be a finite number, got {keys[key]}"]
        loss_type = keys.get("loss_type", "sigmoid")
        if loss_type not in LOSS_TYPES:
            problems.append(f"loss_type must be one of {list(LOSS_TYPES)}, got {loss_type!r}")
        if keys.get("beta", 0.1) <= 0:
            problems.append(f"beta must be positive, got {keys['beta']}")
        if not 0 <= keys.get("label_smoothing", 0) < 0.5:
            problems.append("label_smoothing must be in [0, 0.5) (the assumed share of flipped preference labels), "
                            f"got {keys['label_smoothing']}")
        elif keys.get("label_smoothing") and loss_type == "ipo":
            problems.append("label_smoothing applies to loss_type \"sigmoid\" (cDPO) and \"simpo\", not \"ipo\"; remove it")
        if keys.get("sft_coef", 0) < 0:
            problems.append(f"sft_coef must not be negative, got {keys['sft_coef']}")
        if project.get("from_scratch"):
            problems.append("stage \"dpo\" starts from trained weights (model_path, usually an SFT run); from_scratch is not supported")
        return problems

    def micro_batch_shape(self, cfg) -> tuple[int, int]:
        return 2 * cfg.micro_batch, cfg.max_seq_len  # chosen and rejected of each pair in one micro-batch

    @property
    def uses_reference(self) -> bool:
        return self.loss_type != "simpo"


class PairTerms(NamedTuple):
    losses: torch.Tensor            # float[B]
    chosen_rewards: torch.Tensor    # float[B], detached
    rejected_rewards: torch.Tensor  # float[B], detached
    chosen_logps: torch.Tensor      # float[B], detached: the policy quantity the loss uses
    rejected_logps: torch.Tensor


def sequence_logps(logits, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed fp32 log-prob of each row's target tokens float32[N], target tokens per row int64[N]).
    logits float[N,T,V] or the head's DeferredLogits (chunked, trainer.losses.shifted_token_logps),
    labels int64[N,T] unshifted, -100 where not trained (logits at t predict t+1)."""
    shift_labels = labels[:, 1:]
    trained = shift_labels != -100
    token_logps = shifted_token_logps(logits, shift_labels.clamp(min=0))
    return (token_logps * trained.to(token_logps.device)).sum(-1), trained.sum(-1)


def sigmoid_loss(h: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)


def ipo_loss(h: torch.Tensor, beta: float) -> torch.Tensor:
    return (h - 1 / (2 * beta)) ** 2


def simpo_loss(avg_chosen: torch.Tensor, avg_rejected: torch.Tensor, beta: float, gamma: float,
               label_smoothing: float = 0.0) -> torch.Tensor:
    z = beta * (avg_chosen - avg_rejected) - gamma
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def pair_terms(opts: DPOOptions, pi_c: torch.Tensor, pi_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor,
               n_c: torch.Tensor, n_r: torch.Tensor) -> PairTerms:
    """Per-pair losses, rewards and log-probs of `opts.loss_type` (module docstring). All float[B]
    but the counts; ref_* are ignored (may be zeros) for simpo."""
    ref_c, ref_r = ref_c.detach().to(pi_c.dtype), ref_r.detach().to(pi_r.dtype)
    n_c, n_r = n_c.to(pi_c.dtype).clamp(min=1), n_r.to(pi_r.dtype).clamp(min=1)
    if opts.loss_type == "sigmoid":
        c, r = pi_c - ref_c, pi_r - ref_r
        losses, logp_c, logp_r = sigmoid_loss(c - r, opts.beta, opts.label_smoothing), pi_c, pi_r
    elif opts.loss_type == "ipo":
        logp_c, logp_r = pi_c / n_c, pi_r / n_r
        c, r = logp_c - ref_c / n_c, logp_r - ref_r / n_r
        losses = ipo_loss(c - r, opts.beta)
    elif opts.loss_type == "simpo":
        logp_c, logp_r = pi_c / n_c, pi_r / n_r
        c, r = logp_c, logp_r
        losses = simpo_loss(logp_c, logp_r, opts.beta, opts.simpo_gamma, opts.label_smoothing)
    else:
        raise ValueError(f"loss_type {opts.loss_type!r}: use one of {LOSS_TYPES}")
    return PairTerms(losses, (opts.beta * c).detach(), (opts.beta * r).detach(), logp_c.detach(), logp_r.detach())


# Fields of `pair_stats` (float64 sums over a micro-batch's weighted pairs).
STAT_FIELDS = ("pairs", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
               "logps/rejected", "preference_loss", "sft_nll", "sft_tokens")


def pair_stats(terms: PairTerms, chosen_nll: torch.Tensor, chosen_tokens: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """float64[len(STAT_FIELDS)] on the CPU: sums over pairs weighted by `weight` float[B] (0 for filler).
    chosen_nll float[B]: the chosen answers' summed token NLL; chosen_tokens [B]: their token counts."""
    w = weight.to(terms.losses.device, torch.float64)
    c, r = terms.chosen_rewards.double(), terms.rejected_rewards.double()
    columns = (torch.ones_like(w), c, r, c - r, (c > r).double(), terms.chosen_logps.double(),
               terms.rejected_logps.double(), terms.losses.detach().double(), chosen_nll.detach().double(),
               chosen_tokens.double())
    return torch.stack([(x * w).sum() for x in columns]).cpu()


def metrics_from_stats(sums: torch.Tensor, sft_coef: float) -> dict:
    """TRL-named means from summed `pair_stats`: rewards/*, logps/*, and loss = mean preference loss
    + sft_coef * mean NLL per chosen answer token."""
    s = dict(zip(STAT_FIELDS, sums.tolist()))
    n = max(s["pairs"], 1.0)
    out = {k: s[k] / n for k in STAT_FIELDS[1:7]}
    sft = s["sft_nll"] / max(s["sft_tokens"], 1.0)
    out["loss"] = s["preference_loss"] / n + sft_coef * sft
    if sft_coef:
        out["sft_loss"] = sft
    return out


# ---------------------------------------------------------------------------------------------
# The last stage's loss_fn and eval reduce, on these functions.

class DPOLoss:
    """The training loss_fn: labels (answer labels int64[2B,T], reference log-probs float[2B], sft
    scale float64[]) -> mean preference loss over the B pairs (+ sft_coef * the chosen answers'
    summed NLL * sft scale). Records each micro-batch's `pair_stats` for the step's metrics."""

    def __init__(self, opts: DPOOptions):
        self.opts, self.stats = opts, []

    def __call__(self, logits, labels):
        answer_labels, ref_logps, token_scale = labels
        logps, counts = sequence_logps(logits, answer_labels)
        (pi_c, pi_r), (n_c, n_r) = logps.chunk(2), counts.chunk(2)
        terms = pair_terms(self.opts, pi_c, pi_r, *ref_logps.to(logps.device).chunk(2), n_c, n_r)
        loss = terms.losses.mean()
        if self.opts.sft_coef:
            loss = loss - self.opts.sft_coef * pi_c.sum() * token_scale.to(loss.device, loss.dtype)
        self.stats.append(pair_stats(terms, -pi_c, n_c, torch.ones_like(pi_c)))
        return loss

    def take_step_stats(self) -> torch.Tensor:
        """The summed stats of the micro-batches since the last call (zeros off the last stage)."""
        total = torch.stack(self.stats).sum(0) if self.stats else torch.zeros(len(STAT_FIELDS), dtype=torch.float64)
        self.stats = []
        return total


def eval_pair_stats(opts: DPOOptions):
    """forward_only's reduce: labels (answer labels, reference log-probs, real float[B]) -> pair_stats."""
    def reduce(logits, labels):
        answer_labels, ref_logps, real = labels
        logps, counts = sequence_logps(logits, answer_labels)
        (pi_c, pi_r), (n_c, n_r) = logps.chunk(2), counts.chunk(2)
        terms = pair_terms(opts, pi_c, pi_r, *ref_logps.to(logps.device).chunk(2), n_c, n_r)
        return pair_stats(terms, -pi_c, n_c, real)
    return reduce
