"""The LLaMA-shaped families (Qwen2/2.5, Qwen3, Mistral, Llama 3.x) against transformers, in one
process: pipe layers give HF's logits bit for bit (tied and untied, sdpa and eager, sliding windows
shorter than the sequence), the features that make each family really change the numbers, packed rows
equal separate ones, hg_to_pp/pp_to_hg round trips are bit-exact and export the family's classes
(causal LM and sequence classification, scoring like the pipeline), the activation-memory count
matches what autograd saves, greedy generation equals HF `generate` (ragged prompts, 1-3
micro-batches, several eos ids), and `template: "model"` trains exactly each family's assistant tokens.

The multi-rank checks (2 and 3 stages, training steps, pipelined generation) are in
tests/test_families_multirank.py. Tiny models come from configs/tiny-{qwen2,qwen3,mistral,llama3}.
"""
import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from conftest import CONFIGS
from convert.hg_to_pp import hg_to_pp
from convert.pp_to_hg import pp_to_hg
from models.heads import last_token_index, sequence_scores
from models.pipeline import build_layers, prepare_config
from models.registry import SUPPORTED_MODEL_TYPES, UnsupportedModelError, get_architecture
from test_convert import hf_tensors, load_pipe as load_pipe_dir
from test_models import load_pipe, right_padded_batch

FAMILIES = ("qwen2", "qwen3", "mistral", "llama3", "gemma3")
HF_CLASS = {"qwen2": "Qwen2", "qwen3": "Qwen3", "mistral": "Mistral", "llama3": "Llama", "gemma3": "Gemma3"}
VALUE_CLASS = {**{f: f"{c}ForSequenceClassification" for f, c in HF_CLASS.items()},
               "gemma3": "Gemma3TextForSequenceClassification"}
# Sliding windows shorter than the test sequences (16 tokens; generation: prompts up to 12 + 10 new).
# Mistral v0.1: every layer slides. Qwen2 with use_sliding_window: layers from max_window_layers on.
# tiny-gemma3 ships sliding layers (window 8) with a full one, as Gemma 3 does.
SLIDING = {
    "mistral": {"sliding_window": 5},
    "qwen2": {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 2,
              "layer_types": ["full_attention"] * 2 + ["sliding_attention"] * 2},
}
VARIANTS = [(f, tied, None) for f in FAMILIES for tied in (True, False)] + [(f, None, f) for f in SLIDING]


def family_hf(tiny_hf, family, tied=None, sliding=None):
    return tiny_hf(family, tied, **(SLIDING[sliding] if sliding else {}))


def test_registry_lists_every_family():
    assert set(FAMILIES) - {"llama3", "gemma3"} | {"llama", "bloom", "gemma3_text"} == set(SUPPORTED_MODEL_TYPES)
    with pytest.raises(UnsupportedModelError,
                       match=r"'gemma2' is not supported; supported: bloom, gemma3_text, llama, mistral, qwen2, qwen3"):
        get_architecture("gemma2")


@pytest.mark.parametrize("family,tied,sliding", VARIANTS)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_logits_equal_hf_bit_for_bit(tiny_hf, family, tied, sliding, attn):
    hf, pipe = load_pipe(family_hf(tiny_hf, family, tied, sliding), attn=attn)
    hf.config._attn_implementation = attn
    assert type(hf).__name__ == HF_CLASS[family] + "ForCausalLM"
    if tied is not None:
        assert hf.config.tie_word_embeddings == tied
    ids, mask = right_padded_batch(hf.config.vocab_size)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).logits
        got = pipe((ids, mask))
    assert torch.equal(got[mask.bool()], expected[mask.bool()])


def test_each_family_feature_changes_the_numbers(tiny_hf):
    """The sliding window, Llama 3's rope scaling, Qwen3's q/k norms and Qwen2's q/k/v biases all act:
    dropping one would change the logits the tests above compare."""
    ids, mask = right_padded_batch(1024, lengths=(16, 16))
    with torch.no_grad():
        for family in SLIDING:  # same weights (same seeds and shapes), window 5 vs none
            _, full = load_pipe(family_hf(tiny_hf, family))
            _, windowed = load_pipe(family_hf(tiny_hf, family, sliding=family))
            a, b = full((ids, mask)), windowed((ids, mask))
            torch.testing.assert_close(a[:, :5], b[:, :5], rtol=0, atol=1e-5)  # inside the window: the same
            assert (a[:, 6:] - b[:, 6:]).abs().max() > 1e-3, family
        _, llama3 = load_pipe(family_hf(tiny_hf, "llama3"))
        _, plain = load_pipe(tiny_hf("llama3", rope_parameters={"rope_type": "default", "rope_theta": 500000.0}))
        assert llama3.layers[1].rotary_emb.rope_type == "llama3"
        assert (llama3((ids, mask)) - plain((ids, mask))).abs().max() > 1e-3
        _, qwen3 = load_pipe(family_hf(tiny_hf, "qwen3"))
        out = qwen3((ids, mask))
        for name in ("q_norm", "k_norm"):
            getattr(qwen3.layers[1].self_attn, name).weight.data.mul_(3.0)
        assert (qwen3((ids, mask)) - out).abs().max() > 1e-3
        _, qwen2 = load_pipe(family_hf(tiny_hf, "qwen2"))
        assert qwen2.layers[1].self_attn.q_proj.bias is not None and qwen2.layers[1].self_attn.o_proj.bias is None


@pytest.mark.parametrize("family,sliding", [(f, None) for f in FAMILIES] + [(f, f) for f in SLIDING])
def test_causal_and_packed_rows_equal_separate_rows(tiny_hf, family, sliding):
    _, pipe = load_pipe(family_hf(tiny_hf, family, sliding=sliding))
    gen = torch.Generator().manual_seed(3)
    first, second = torch.randint(4, 800, (1, 9), generator=gen), torch.randint(4, 800, (1, 6), generator=gen)
    packed = torch.cat([first, second, torch.zeros(1, 3, dtype=torch.long)], dim=1)  # 9 + 6 + 3 pad
    segments = torch.tensor([[1] * 9 + [2] * 6 + [0] * 3])
    with torch.no_grad():
        out = pipe((packed, (segments > 0).long(), segments))
        alone_1 = pipe((first, torch.ones_like(first)))
        alone_2 = pipe((second, torch.ones_like(second)))
        changed = first.clone()
        changed[0, 6] = (changed[0, 6] + 7) % 800 + 4
        later = pipe((changed, torch.ones_like(changed)))
    torch.testing.assert_close(out[:, :9], alone_1, rtol=0, atol=1e-5)
    torch.testing.assert_close(out[:, 9:15], alone_2, rtol=0, atol=1e-5)
    assert torch.equal(later[:, :6], alone_1[:, :6]) and (later[:, 6:] - alone_1[:, 6:]).abs().max() > 1e-3


@pytest.mark.parametrize("family,tied", [(f, t) for f in FAMILIES for t in (True, False)])
def test_round_trip_is_bit_exact_and_exports_the_family_class(tiny_hf, tmp_path, family, tied):
    src = tiny_hf(family, tied)
    pp = hg_to_pp(src, tmp_path / "pp", progress=False)
    back = pp_to_hg(pp, tmp_path / "hf", max_shard_size="60KB", progress=False)
    before, after = hf_tensors(src), hf_tensors(back)
    assert sorted(before) == sorted(after) and ("lm_head.weight" in before) == (not tied)
    for key, tensor in before.items():
        assert torch.equal(after[key], tensor), key
    config = json.loads((back / "config.json").read_text())
    assert config["architectures"] == [HF_CLASS[family] + "ForCausalLM"]
    assert config["eos_token_id"] == json.loads((CONFIGS[family] / "config.json").read_text())["eos_token_id"]
    for name in ("generation_config.json", "chat_template.jinja"):
        assert (back / name).is_file(), name
    model = AutoModelForCausalLM.from_pretrained(back, dtype=torch.float32)
    assert type(model).__name__ == HF_CLASS[family] + "ForCausalLM"


def value_head_checkpoint(hf_dir, tmp_path):
    """A value-head pipeline folder: the HF model's layers (hg_to_pp) with a seeded random score head."""
    from models.pipe_dir import layer_file_name, read_metadata, write_metadata

    pp = hg_to_pp(hf_dir, tmp_path / "pp", progress=False)
    config = AutoConfig.from_pretrained(pp)
    n = config.num_hidden_layers
    (pp / layer_file_name(n + 2)).unlink(missing_ok=True)  # the LM head's file (none when tied)
    score = torch.randn(1, config.hidden_size, generator=torch.Generator().manual_seed(0)) * 0.1
    torch.save({"score.weight": score}, pp / layer_file_name(n + 2))
    meta = read_metadata([pp])
    meta.pop("format", None), meta.pop("version", None)
    write_metadata(pp, **{**meta, "head": "value", "layer_names": meta["layer_names"][:-1] + ["value_head"]})
    return pp


@pytest.mark.parametrize("family", FAMILIES)
def test_value_head_exports_as_sequence_classification_scoring_like_the_pipeline(tiny_hf, tmp_path, family):
    """A value-head pipeline (RM / critic) exports to <Family>ForSequenceClassification, whose scores on
    right-padded rows equal the pipeline's at each row's last real token."""
    pp = value_head_checkpoint(tiny_hf(family), tmp_path)
    hf_dir = pp_to_hg(pp, tmp_path / "hf", progress=False)
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["architectures"] == [VALUE_CLASS[family]]
    assert AutoConfig.from_pretrained(hf_dir).num_labels == 1
    tok = AutoTokenizer.from_pretrained(hf_dir)
    pad = config["pad_token_id"]
    eos = config["eos_token_id"]
    assert pad is not None and pad not in (eos if isinstance(eos, list) else [eos]) and tok.pad_token_id == pad
    ids, mask = right_padded_batch(800, lengths=(12, 7, 4))
    ids = ids.masked_fill(mask == 0, pad)
    model = AutoModelForSequenceClassification.from_pretrained(hf_dir, dtype=torch.float32).eval()
    assert type(model).__name__ == VALUE_CLASS[family]
    with torch.no_grad():
        pipe_scores = sequence_scores(load_pipe_dir(pp, "value")((ids, mask)), last_token_index(mask))
        hf_scores = model(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
    torch.testing.assert_close(hf_scores, pipe_scores, rtol=0, atol=1e-6)
    assert pipe_scores.abs().min() > 0


@pytest.mark.parametrize("family,attn,changes", [
    ("qwen2", "sdpa", {}), ("mistral", "sdpa", {}), ("llama3", "sdpa", {}), ("qwen3", "eager", {}), ("gemma3", "sdpa", {}),
    ("gemma3", "sdpa", {"num_attention_heads": 8, "head_dim": 32}),
    ("qwen3", "sdpa", {}),                                                      # heads x head_dim = hidden
    ("qwen3", "sdpa", {"num_attention_heads": 8, "head_dim": 64}),              # = 4 x hidden (Qwen3-0.6B: 2x)
    ("qwen3", "sdpa", {"num_attention_heads": 8, "head_dim": 16, "hidden_size": 256}),  # = hidden / 2
    ("llama", "sdpa", {"num_attention_heads": 8, "head_dim": 64}),
])
def test_block_activation_elements_match_what_autograd_saves(family, attn, changes):
    from test_memory_model import saved_activation_bytes

    changes = {"hidden_size": 128, "intermediate_size": 352, **changes}
    config = prepare_config(AutoConfig.from_pretrained(CONFIGS[family], **changes), attn)
    layers = build_layers(config)
    batch, seq = 2, 96
    ids = torch.randint(0, 800, (batch, seq))
    mask = torch.ones_like(ids)
    hidden = layers[0]((ids, mask))[0].detach().requires_grad_()
    measured = saved_activation_bytes(layers[1], (hidden, mask))
    estimate = get_architecture(config.model_type).block_activation_elements(config, attn, seq) * batch * seq * 4
    assert abs(estimate - measured) / measured < 0.08, (estimate, measured)


# ---------------------------------------------------------------------------------------------
# Greedy generation in one process (P = 1): cache, positions, sliding windows in the KV cache.

def hf_greedy(hf, prompt, max_new, eos):
    from test_generation import hf_greedy as greedy

    return greedy(hf, prompt, max_new=max_new, eos=eos)


def eos_ids(hf_dir) -> list:
    eos = json.loads((hf_dir / "generation_config.json").read_text())["eos_token_id"]
    return eos if isinstance(eos, list) else [eos]


def test_gemma3_refuses_what_its_layers_do_not_implement():
    from models.pipeline import prepare_config

    for key, value in (("final_logit_softcapping", 30.0), ("attn_logit_softcapping", 50.0),
                       ("use_bidirectional_attention", True)):
        with pytest.raises(ValueError, match=key):
            prepare_config(AutoConfig.from_pretrained(CONFIGS["gemma3"], **{key: value}))


def test_gemma3_sliding_layers_and_rope_bases_act(tiny_hf):
    """tiny-gemma3's window (8 < 16 tokens) and its local RoPE base change the logits."""
    ids, mask = right_padded_batch(1024, lengths=(16, 16))
    _, pipe = load_pipe(tiny_hf("gemma3"))
    _, full = load_pipe(tiny_hf("gemma3", layer_types=["full_attention"] * 4))
    local = {"rope_type": "default", "rope_theta": 1000000.0}
    _, one_base = load_pipe(tiny_hf("gemma3", rope_parameters={"sliding_attention": local, "full_attention": local}))
    with torch.no_grad():
        out = pipe((ids, mask))
        assert (out[:, 9:] - full((ids, mask))[:, 9:]).abs().max() > 1e-3
        assert (out - one_base((ids, mask))).abs().max() > 1e-3


@pytest.mark.parametrize("family,sliding", [(f, None) for f in FAMILIES] + [(f, f) for f in SLIDING])
def test_one_process_greedy_equals_hf_generate(tiny_hf, family, sliding):
    from test_generation import ragged_prompts
    from trainer.generation.decoding import generate

    hf_dir = family_hf(tiny_hf, family, sliding=sliding)
    hf, pipe = load_pipe(hf_dir)
    stops = eos_ids(hf_dir)
    prompts = ragged_prompts(seed=2)
    expected = [hf_greedy(hf, p, 10, stops) for p in prompts]
    assert max(len(p) + len(a) for p, a in zip(prompts, expected)) > 2 * (getattr(hf.config, "sliding_window", None) or 0)
    for m in (1, 2, 3):
        out = generate(pipe, pipe.layers[1].config, prompts, max_new_tokens=10, stop_ids=stops, n_micro=m)
        assert [out.answer(i) for i in range(len(prompts))] == expected, m
    # And with the eos ids stopping rows: the first answers' own tokens as extra stop ids.
    extra = sorted({expected[0][2], expected[3][4]})
    out = generate(pipe, pipe.layers[1].config, prompts, max_new_tokens=10, stop_ids=stops + extra, n_micro=2)
    assert [out.answer(i) for i in range(len(prompts))] == [hf_greedy(hf, p, 10, stops + extra) for p in prompts]


# ---------------------------------------------------------------------------------------------
# template: "model" with each family's own chat template.

CHAT = {"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello, friend."},
                     {"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "It is 4."}]}
END_OF_TURN = {"qwen2": "<|im_end|>", "qwen3": "<|im_end|>", "mistral": "</s>", "llama3": "<|eot_id|>",
               "gemma3": "<end_of_turn>"}


@pytest.mark.parametrize("family", FAMILIES)
def test_model_template_trains_exactly_each_familys_assistant_tokens(tmp_path, family):
    from data.dataset import build_dataset

    tok = AutoTokenizer.from_pretrained(CONFIGS[family])
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(CHAT) + "\n")
    built = build_dataset(str(path), tok, 128, template="model")
    (ids, attn), labels = built.train[0]
    n = int(attn.sum())
    ids, trained = ids[:n].tolist(), (labels[:n] != -100).tolist()
    # The sample is the template's rendering tokenized as apply_chat_template(tokenize=True) does.
    assert ids == tok.apply_chat_template(CHAT["messages"], tokenize=True, return_dict=False)
    runs, start = [], None
    for i, t in enumerate(trained + [False]):
        if t and start is None:
            start = i
        elif not t and start is not None:
            runs.append((start, i))
            start = None
    # Exactly the two answers and their end-of-turn token, nothing of the headers.
    eot = END_OF_TURN[family]
    assert [tok.decode(ids[a:b]) for a, b in runs] == [f"Hello, friend.{eot}", f"It is 4.{eot}"]
    assert built.stats["template"]["end_of_turn"] == eot
    assert built.stats["pad"]["id"] != tok.eos_token_id  # Qwen pads with <|endoftext|>, one of its generation eos ids, as released


@pytest.mark.parametrize("family", FAMILIES)
def test_data_inspect_shows_each_familys_trained_tokens(tmp_path, capsys, family):
    from data.inspect import main

    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(CHAT) + "\n")
    assert main([str(path), "--tokenizer-path", str(CONFIGS[family]), "--template", "model", "--show", "1"]) == 0
    out = capsys.readouterr().out
    eot = END_OF_TURN[family]
    assert f"⟦Hello, friend.{eot}⟧" in out and f"⟦It is 4.{eot}⟧" in out and out.count("⟦") == 2
    assert f"each ending with {eot!r}" in out
