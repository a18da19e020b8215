"""The PPO recipe's loss_fns (what the last stage computes inside train_batch) and scoring reducers
(what it keeps of each micro-batch in a forward-only pass).

Token tensors are aligned with the *shifted* sequence: for a rollout row of S columns, column t of a
[b, S-1] tensor is about token ids[:, t+1], which the logits at column t predict (and whose state's
value is the critic's output at column t). `answer` float[b, S-1] is 1 on the generated tokens.

Normalisation (as SFT's, trainer.batches): each micro-batch's loss is
    sum over its answer tokens / N_minibatch * grad_accum * D
(`token_scale` = grad_accum * D / N_minibatch, N over all micro-batches and data-parallel ranks of the
minibatch), so after DeepSpeed's mean over micro-batches and replicas a minibatch's loss is the mean
over its answer tokens, however it is split.

DeepSpeed's train_batch returns only the loss, so the actor's loss_fn also adds each micro-batch's
sums (float64, detached) to `stats`; the recipe takes them after the step and all-reduces them.
"""
import torch

from models.heads import sequence_scores
from trainer.losses import at_temperature, shifted_token_logps
from trainer.rl.ppo_math import kl_estimate, masked_mean, policy_loss, value_loss

# sums over the update's answer tokens: policy_loss is the clipped surrogate alone, kl_loss the KL
# estimate of the loss term (0 with the KL in the reward), entropy the policy's entropy
ACTOR_STATS = ("tokens", "policy_loss", "clip_frac", "approx_kl", "entropy", "kl_loss")


class ActorLoss:
    """labels: (tokens int64[b,S-1], answer float32[b,S-1], old log-probs float32[b,S-1], advantages
    float32[b,S-1], reference log-probs float32[b,S-1], token_scale float64[]).
    loss = clipped surrogate - entropy_coef * entropy (+ kl_coef * KL when the KL is a loss term).
    outputs: logits float[b,S,V] or the head's DeferredLogits (chunked_loss: the head's matmul, the
    log-probs and the entropy chunk by chunk, trainer.losses.shifted_token_logps)."""

    def __init__(self, opts):
        self.opts = opts
        self.stats = torch.zeros(len(ACTOR_STATS), dtype=torch.float64)

    def __call__(self, outputs, labels) -> torch.Tensor:
        tokens, answer, old_logp, advantages, ref_logp, token_scale = labels
        logp, entropy = shifted_token_logps(at_temperature(outputs, self.opts.logprob_temperature), tokens, with_entropy=True)
        device = logp.device
        answer, old_logp, advantages, ref_logp = (x.to(device) for x in (answer, old_logp, advantages, ref_logp))
        n_tokens = 1.0 / float(token_scale)  # N_minibatch / (grad_accum * D)
        pg_loss, pg_stats = policy_loss(logp, old_logp, advantages, answer, self.opts.clip_range, n_tokens)
        loss = pg_loss
        if self.opts.entropy_coef > 0:
            loss = loss - self.opts.entropy_coef * masked_mean(entropy, answer, n_tokens)
        entropy = entropy.detach()
        kl_sum = 0.0
        if not self.opts.kl_in_reward:
            kl = kl_estimate(logp, ref_logp, self.opts.kl_estimator)
            loss = loss + self.opts.kl_coef * masked_mean(kl, answer, n_tokens)
            kl_sum = float((kl.detach() * answer).sum())
        with torch.no_grad():
            n = float(answer.sum())
            scale = n_tokens  # stats: sums over tokens (policy_loss, clip_frac, approx_kl are means x n_tokens)
            self.stats += torch.tensor([n, float(pg_loss.detach()) * scale, float(pg_stats["clip_frac"]) * scale,
                                        float(pg_stats["approx_kl"]) * scale, float((entropy * answer).sum()), kl_sum],
                                       dtype=torch.float64)
        return loss

    def take_stats(self) -> torch.Tensor:
        out, self.stats = self.stats, torch.zeros_like(self.stats)
        return out


class CriticLoss:
    """labels: (answer float32[b,S-1], old values float32[b,S-1], returns float32[b,S-1], token_scale
    float64[]); outputs: the value head's float[b,S] (column t: the value of the state after token t)."""

    def __init__(self, opts):
        self.opts = opts

    def __call__(self, outputs, labels) -> torch.Tensor:
        answer, old_values, returns, token_scale = labels
        values = outputs[:, :-1].float()
        device = values.device
        n_tokens = 1.0 / float(token_scale)
        return value_loss(values, old_values.to(device), returns.to(device), answer.to(device), self.opts.value_clip, n_tokens)


# Reducers for trainer.engine.forward_only: (outputs, labels) -> what the last stage keeps of a micro-batch.

def reduce_token_logps(logits, labels, temperature: float = 1.0) -> torch.Tensor:
    """labels (tokens int64[b,S-1],) -> float32[b,S-1] on the CPU: log-probs of logits / temperature."""
    return shifted_token_logps(at_temperature(logits, temperature), labels[0]).cpu()


def reduce_values(values, labels) -> torch.Tensor:
    """-> float32[b,S-1]: the value of each token's state (column t predicts from tokens <= t)."""
    return values[:, :-1].float().cpu()


def reduce_scores(values, labels) -> torch.Tensor:
    """labels (last real token index int64[b],) -> float32[b]: the reward model's score there."""
    return sequence_scores(values, labels[0]).cpu()
