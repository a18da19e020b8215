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
