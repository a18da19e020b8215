"""The chunked LM-head cross-entropy equals logits -> cross-entropy, in loss and gradients."""
import pytest
import torch

from trainer.losses import chunked_lm_head_loss_sum, shifted_token_losses


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_head_loss_equals_full_logits(chunk):
    torch.manual_seed(0)
    hidden = torch.randn(3, 20, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (3, 20))
    labels[0, :5] = -100
    labels[2] = -100  # a row without targets
    loss, count = shifted_token_losses(hidden @ weight.t(), labels)
    loss.backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    chunked, chunked_count = chunked_lm_head_loss_sum(hidden, weight, labels, chunk_tokens=chunk)
    chunked.backward()
    assert chunked_count == count
    torch.testing.assert_close(chunked.double(), loss.double(), rtol=1e-6, atol=1e-6)  # a sum of ~40 fp32 losses
    torch.testing.assert_close(hidden.grad, grads[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(weight.grad, grads[1], rtol=1e-6, atol=1e-6)


def test_chunked_head_loss_fp32_and_scaled_gradient():
    torch.manual_seed(1)
    hidden = torch.randn(2, 33, 32, requires_grad=True)
    weight = torch.randn(97, 32, requires_grad=True)
    labels = torch.randint(0, 97, (2, 33))
    loss, _ = shifted_token_losses(hidden @ weight.t(), labels)
    (loss * 0.25).backward()
    expected = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    chunked, _ = chunked_lm_head_loss_sum(hidden, weight, labels, chunk_tokens=16)
    (chunked * 0.25).backward()
    torch.testing.assert_close(chunked, loss, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(hidden.grad, expected[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weight.grad, expected[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_type, tied", [("llama", False), ("llama", True), ("bloom", True)])
def test_deferred_head_in_the_pipe_layers_equals_full_logits(model_type, tied):
    """set_defer_logits: while training, the head hands (hidden, weight) to the loss, which gives the
    same loss and gradients (tied embedding included); under no_grad the head still returns logits."""
    from conftest import REPO
    from transformers import AutoConfig

    from models.heads import DeferredLogits, set_defer_logits
    from models.pipeline import SequentialPipe, build_layers, prepare_config
    from trainer.losses import global_token_mean_loss

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(REPO / "configs" / f"tiny-{model_type}", tie_word_embeddings=tied)
    pipe = SequentialPipe(build_layers(prepare_config(config)))
    ids = torch.randint(3, config.vocab_size, (2, 24))
    mask = torch.ones_like(ids)
    labels = ids.masked_fill(torch.rand(ids.shape) < 0.3, -100)
    scale = torch.tensor(1.0 / 30, dtype=torch.float64)

    def step():
        for p in pipe.parameters():
            p.grad = None
        out = pipe((ids, mask))
        loss = global_token_mean_loss(out, (labels, scale))
        loss.backward()
        return out, loss.detach(), [p.grad.clone() for p in pipe.parameters()]

    full_out, loss, grads = step()
    assert set_defer_logits(pipe) >= 1
    deferred_out, loss_d, grads_d = step()
    assert isinstance(deferred_out, DeferredLogits) and not isinstance(full_out, DeferredLogits)
    torch.testing.assert_close(loss_d, loss, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads, grads_d):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        assert torch.equal(pipe((ids, mask)), full_out.detach())
    # forward-only scoring (forward_only(..., deferred_logits=True)): deferred under no_grad too, the
    # same log-probs as the logits give, and plain logits again afterwards (generation needs them)
    from models.heads import deferring_without_grad
    from trainer.losses import shifted_token_logps

    tokens = ids[:, 1:]
    set_defer_logits(pipe, False)
    with torch.no_grad(), deferring_without_grad(pipe):
        scored = pipe((ids, mask))
        assert isinstance(scored, DeferredLogits)
        deferred_logps = shifted_token_logps(scored, tokens, chunk_tokens=5)
    with torch.no_grad():
        plain = pipe((ids, mask))
        assert not isinstance(plain, DeferredLogits)
        torch.testing.assert_close(deferred_logps, shifted_token_logps(plain, tokens), rtol=0, atol=1e-5)


@pytest.mark.parametrize("chunk, use", [(1, "both"), (7, "both"), (1000, "both"), (7, "logp"), (7, "entropy")])
def test_chunked_token_logps_and_entropy_equal_full_logits(chunk, use):
    """PPO's / DPO's per-token log-probs (and PPO's entropy) through DeferredLogits: the same values and
    gradients as log_softmax of the full logits, for either output alone or both weighted."""
    from models.heads import DeferredLogits
    from trainer.losses import shifted_token_logps

    torch.manual_seed(2)
    hidden = torch.randn(3, 12, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(40, 16, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 40, (3, 11))
    w_logp, w_entropy = torch.randn(3, 11, dtype=torch.float64), torch.randn(3, 11, dtype=torch.float64)

    def objective(logp, entropy):
        return (logp * w_logp * (use != "entropy")).sum() + (entropy * w_entropy * (use != "logp")).sum()

    log_probs = torch.log_softmax(hidden @ weight.t(), -1)[:, :-1]  # written out, not the function under test
    logp = log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    objective(logp, entropy).backward()
    expected = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    got_logp, got_entropy = shifted_token_logps(DeferredLogits(hidden, weight), tokens, with_entropy=True, chunk_tokens=chunk)
    if use == "logp":
        (got_logp * w_logp).sum().backward()
    elif use == "entropy":
        (got_entropy * w_entropy).sum().backward()
    else:
        objective(got_logp, got_entropy).backward()
    torch.testing.assert_close(got_logp.double(), logp, rtol=0, atol=1e-5)  # fp32 inside
    torch.testing.assert_close(got_entropy.double(), entropy, rtol=0, atol=1e-5)
    torch.testing.assert_close(hidden.grad, expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weight.grad, expected[1], rtol=1e-5, atol=1e-5)
    plain_logp, plain_entropy = shifted_token_logps(hidden @ weight.t(), tokens, with_entropy=True)
    torch.testing.assert_close(plain_logp.double(), logp, rtol=0, atol=1e-5)
    torch.testing.assert_close(plain_entropy.double(), entropy, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logps_without_grad_normalise_a_chunk_at_a_time_with_the_same_values(monkeypatch, dtype):
    """Forward-only scoring (a frozen reference, PPO's old log-probs) gets plain logits under no_grad:
    the fp32 log-softmax exists one chunk of positions at a time, values equal to the one-piece ones."""
    from trainer.losses import shifted_token_logps

    torch.manual_seed(3)
    logits = (4 * torch.randn(3, 13, 50)).to(dtype)
    tokens = torch.randint(0, 50, (3, 12))
    log_probs = torch.log_softmax(logits[:, :-1].float(), -1)  # written out: one piece
    expected_logp = log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    expected_entropy = -(log_probs.exp() * log_probs).sum(-1)
    seen_rows = []
    real_log_softmax = torch.log_softmax

    def spy(x, *args, **kwargs):
        seen_rows.append(x.numel() // x.shape[-1])
        return real_log_softmax(x, *args, **kwargs)

    monkeypatch.setattr(torch, "log_softmax", spy)
    with torch.no_grad():
        logp, entropy = shifted_token_logps(logits, tokens, with_entropy=True, chunk_tokens=5)
    assert logp.dtype == torch.float32 and max(seen_rows) <= 5 and len(seen_rows) == 3 * 3  # 12 positions: 5 + 5 + 2
    torch.testing.assert_close(logp, expected_logp, rtol=0, atol=1e-6)
    torch.testing.assert_close(entropy, expected_entropy, rtol=0, atol=1e-5)
    seen_rows.clear()
    with torch.no_grad():
        assert torch.equal(shifted_token_logps(logits, tokens), shifted_token_logps(logits, tokens, chunk_tokens=1))
    assert max(seen_rows) > 1  # the default chunk (CHUNK_BYTES of fp32) holds all 12 positions of a row here
