"""Pipe layers run in sequence in one process equal the HF model, are causal, handle packing,
and are built as the right DeepSpeed specs."""
import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from models.pipeline import (
    SequentialPipe,
    build_layer_specs,
    build_layers,
    hf_key_to_pipe,
    layer_key_rules,
    normalise_hf_keys,
    pipe_layer_names,
    prepare_config,
)
from models.registry import UnsupportedModelError, get_architecture

CASES = [("llama", False), ("llama", True), ("bloom", None)]


def load_pipe(hf_dir, head="lm", attn=None):
    """Pipe layers with the HF folder's weights, mapped by the declarative key rules."""
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    config = prepare_config(hf.config, attn)
    layers = build_layers(config, head)
    rules = layer_key_rules(config, head)
    per_layer = {}
    for key, value in hf.state_dict().items():
        where = hf_key_to_pipe(rules, key)
        if where is not None:
            per_layer.setdefault(where[0], {})[where[1]] = value
    for i, layer in enumerate(layers):
        if isinstance(layer, torch.nn.Module):
            layer.load_state_dict(per_layer.get(i, {}), strict=True)
    return hf.eval(), SequentialPipe(layers).eval()


def right_padded_batch(vocab, lengths=(16, 11, 5), seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (len(lengths), max(lengths)), generator=gen)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("model_type,tied", CASES)
def test_logits_equal_hf_on_right_padded_batch(tiny_hf, model_type, tied):
    hf, pipe = load_pipe(tiny_hf(model_type, tied))
    assert hf.config._attn_implementation in ("sdpa", "eager")
    ids, mask = right_padded_batch(hf.config.vocab_size)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).logits
        got = pipe((ids, mask))
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=0, atol=1e-5)


def test_llama_gqa_and_rope_scaling_pass_through(tiny_hf):
    rope = {"rope_type": "linear", "factor": 2.0, "rope_theta": 50000.0}
    hf, pipe = load_pipe(tiny_hf("llama", False, rope_parameters=rope))
    assert hf.config.num_key_value_heads < hf.config.num_attention_heads  # grouped-query attention
    block = pipe.layers[1]
    assert block.rotary_emb.rope_type == "linear"
    ids, mask = right_padded_batch(hf.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(pipe((ids, mask))[mask.bool()], hf(input_ids=ids, attention_mask=mask).logits[mask.bool()], rtol=0, atol=1e-5)
    # And the scaling changes the numbers (so the test would catch it being dropped).
    _, plain = load_pipe(tiny_hf("llama", False))
    with torch.no_grad():
        assert not torch.allclose(plain((ids, mask)), pipe((ids, mask)))


@pytest.mark.parametrize("model_type,attn", [("llama", "sdpa"), ("llama", "eager"), ("bloom", "eager")])
def test_causal(tiny_hf, model_type, attn):
    """Changing a later token leaves every earlier position's logits unchanged."""
    _, pipe = load_pipe(tiny_hf(model_type), attn=attn)
    ids, mask = right_padded_batch(1024, lengths=(12, 12))
    changed = ids.clone()
    changed[:, 8] = (changed[:, 8] + 7) % 1000 + 4
    with torch.no_grad():
        a, b = pipe((ids, mask)), pipe((changed, mask))
    torch.testing.assert_close(a[:, :8], b[:, :8], rtol=0, atol=0)
    assert (a[:, 8:] - b[:, 8:]).abs().max() > 1e-3


@pytest.mark.parametrize("model_type", ["llama", "bloom"])
def test_packed_rows_equal_separate_rows(tiny_hf, model_type):
    """Two records packed in one row with segment ids give each record's own logits."""
    _, pipe = load_pipe(tiny_hf(model_type))
    gen = torch.Generator().manual_seed(3)
    first, second = torch.randint(4, 1000, (1, 7), generator=gen), torch.randint(4, 1000, (1, 5), generator=gen)
    packed = torch.cat([first, second, torch.zeros(1, 4, dtype=torch.long)], dim=1)  # 7 + 5 + 4 pad
    segments = torch.tensor([[1] * 7 + [2] * 5 + [0] * 4])
    with torch.no_grad():
        out = pipe((packed, (segments > 0).long(), segments))
        alone_1 = pipe((first, torch.ones_like(first)))
        alone_2 = pipe((second, torch.ones_like(second)))
    torch.testing.assert_close(out[:, :7], alone_1, rtol=0, atol=1e-5)
    torch.testing.assert_close(out[:, 7:12], alone_2, rtol=0, atol=1e-5)


def test_unknown_model_type_lists_supported():
    with pytest.raises(UnsupportedModelError, match=r"'gpt2' is not supported; supported: bloom, gemma3_text, llama, mistral, qwen2, qwen3"):
        get_architecture("gpt2")


def test_attention_implementation_is_always_explicit(monkeypatch):
    import transformers.utils

    config = AutoConfig.from_pretrained("configs/tiny-llama")
    assert getattr(config, "_attn_implementation", None) in (None, "eager", "sdpa")
    with pytest.raises(ValueError, match="no attention implementation"):
        build_layers(config if config._attn_implementation is None else _unset(config))
    assert prepare_config(config)._attn_implementation == "sdpa"
    bloom = AutoConfig.from_pretrained("configs/tiny-bloom")
    assert prepare_config(bloom)._attn_implementation == "eager"
    with pytest.raises(ValueError, match="not supported for model_type 'bloom'"):
        prepare_config(bloom, "sdpa")
    # flash_attention_2 where flash-attn is usable (a CUDA machine with the package); a clear error elsewhere.
    if transformers.utils.is_flash_attn_2_available():
        assert prepare_config(config, "flash_attention_2")._attn_implementation == "flash_attention_2"
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: False)
    with pytest.raises(RuntimeError, match="flash_attn package is not usable"):
        prepare_config(config, "flash_attention_2")


def _unset(config):
    config = copy.deepcopy(config)
    config._attn_implementation = None
    return config


@pytest.mark.parametrize("model_type,tied", CASES)
def test_layer_specs(model_type, tied):
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    config = AutoConfig.from_pretrained(f"configs/tiny-{model_type}")
    if tied is not None:
        config.tie_word_embeddings = tied
    config = prepare_config(config)
    specs = build_layer_specs(config)
    n = config.num_hidden_layers
    assert len(specs) == len(pipe_layer_names(config)) == n + 3
    tied = config.tie_word_embeddings
    assert isinstance(specs[0], TiedLayerSpec) == tied
    assert isinstance(specs[-1], TiedLayerSpec) == tied
    assert all(type(s) is LayerSpec for s in specs[1:-1])
    if tied:
        assert specs[-1].forward_fn is not None and specs[0].key == specs[-1].key
    # The value head is never tied, whatever the embeddings do.
    assert type(build_layer_specs(config, head="value")[-1]) is LayerSpec


def test_value_head_gives_one_value_per_token(tiny_hf):
    config = prepare_config(AutoConfig.from_pretrained(tiny_hf("llama")))
    pipe = SequentialPipe(build_layers(config, head="value"))
    ids, mask = right_padded_batch(1024)
    assert pipe((ids, mask)).shape == ids.shape
    assert pipe_layer_names(config, "value")[-1] == "value_head"


def test_bare_base_model_keys_get_prefix():
    config = AutoConfig.from_pretrained("configs/tiny-bloom")
    canon = normalise_hf_keys(config, ["word_embeddings.weight", "h.0.mlp.dense_4h_to_h.bias", "ln_f.weight"])
    assert canon["h.0.mlp.dense_4h_to_h.bias"] == "transformer.h.0.mlp.dense_4h_to_h.bias"
    rules = layer_key_rules(config)
    assert hf_key_to_pipe(rules, canon["h.0.mlp.dense_4h_to_h.bias"]) == (1, "mlp.dense_4h_to_h.bias")
    assert hf_key_to_pipe(rules, "transformer.word_embeddings_layernorm.bias") == (0, "word_embeddings_layernorm.bias")
    assert hf_key_to_pipe(rules, canon["ln_f.weight"]) == (config.n_layer + 1, "ln_f.weight")
