"""`compile`: torch.compile of each block gives the same loss and gradients as eager; config checks."""
import pytest
import torch
from conftest import REPO
from transformers import AutoConfig

from models.pipeline import SequentialPipe, build_layers, prepare_config
from models.registry import get_architecture
from trainer.config import ConfigError
from trainer.recipes import validate_config as validate

BASE = {"model_path": "m", "save_path": "s", "data_path": "d.json", "train_steps": 1, "train_micro_batch_size_per_gpu": 1,
        "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [1, 1]}, "parts": "auto"}}


def loss_and_grads(pipe, ids, mask):
    for p in pipe.parameters():
        p.grad = None
    logits = pipe((ids, mask))
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), ids[:, 1:].reshape(-1))
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in pipe.parameters()]


def compiled_vs_eager(model_type: str, options: dict, n_blocks: int):
    torch.manual_seed(0)
    config = prepare_config(AutoConfig.from_pretrained(REPO / "configs" / f"tiny-{model_type}"))
    layers = build_layers(config)
    pipe = SequentialPipe(layers)
    ids = torch.randint(3, config.vocab_size, (2, 24))
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0
    eager = loss_and_grads(pipe, ids, mask)
    block = get_architecture(model_type).block
    compiled = [layer for layer in layers if isinstance(layer, block)][:n_blocks]
    for layer in compiled:
        layer.compile(**options)
    again = loss_and_grads(pipe, ids, mask)
    assert all(layer._compiled_call_impl is not None for layer in compiled)  # really compiled
    return eager, again


@pytest.mark.parametrize("model_type", ["llama", "bloom"])
def test_compiled_blocks_same_loss_and_gradients(model_type):
    """Graph capture by dynamo (aot_eager backend: fast on CPU) over every block."""
    (loss, grads), (loss_c, grads_c) = compiled_vs_eager(model_type, {"backend": "aot_eager"}, n_blocks=4)
    torch.testing.assert_close(loss_c, loss, rtol=0, atol=1e-6)
    for a, b in zip(grads, grads_c):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_inductor_compiled_block_same_loss():
    """The default backend (inductor's C++ code on CPU) on one block: ~30-70 s of compilation."""
    (loss, grads), (loss_c, grads_c) = compiled_vs_eager("llama", {}, n_blocks=1)
    torch.testing.assert_close(loss_c, loss, rtol=0, atol=1e-5)
    for a, b in zip(grads, grads_c):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_compile_config_values():
    assert validate({**BASE, "compile": True}, world_size=1).compile is True
    assert validate({**BASE, "compile": {"mode": "max-autotune", "dynamic": False}}, world_size=1).compile == {"mode": "max-autotune", "dynamic": False}
    assert validate(BASE, world_size=1).compile is False
    with pytest.raises(ConfigError) as info:
        validate({**BASE, "compile": {"modes": "x"}}, world_size=1)
    assert info.value.problems == ["compile: unknown torch.compile options ['modes']; use ['backend', 'mode', 'fullgraph', 'dynamic', 'options']"]
    with pytest.raises(ConfigError) as info:
        validate({**BASE, "compile": "yes"}, world_size=1)
    assert info.value.problems[0].startswith("compile must be true, false or an object of torch.compile options")
