"""trainer/engine/memory.py and the memory-aware `parts: "auto"`: the activation counts against what
autograd really saves, optimizer/ZeRO/offload accounting, the constrained split (against brute
force) and its error when nothing fits."""
import itertools

import pytest
import torch
from conftest import REPO
from transformers import AutoConfig

from models.pipeline import build_layers, prepare_config
from models.registry import get_architecture
from trainer.engine.auto_parts import AutoPartsError, auto_parts, layer_costs, stage_report
from trainer.engine.memory import memory_settings, optimizer_state_bytes, stage_memory
from trainer.recipes import validate_config as validate


def saved_activation_bytes(layer, inputs) -> int:
    """Bytes of the tensors autograd saves in one forward of `layer`, weights excluded."""
    seen, total = {p.data_ptr() for p in layer.parameters()}, [0]  # weights are saved by reference

    def pack(t):
        if t.data_ptr() not in seen and t.is_floating_point():
            seen.add(t.data_ptr())
            total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(inputs)
    return total[0]


@pytest.mark.parametrize("model_type, attn, changes", [
    ("llama", "sdpa", {"hidden_size": 256, "intermediate_size": 688, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64}),
    ("llama", "sdpa", {"hidden_size": 128, "intermediate_size": 512, "num_attention_heads": 8, "num_key_value_heads": 8, "head_dim": 16}),
    ("llama", "eager", {"hidden_size": 128, "intermediate_size": 352, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32}),
    ("bloom", "eager", {"hidden_size": 256, "n_head": 4}),
])
def test_block_activation_elements_match_what_autograd_saves(model_type, attn, changes):
    config = AutoConfig.from_pretrained(REPO / "configs" / f"tiny-{model_type}", **changes)
    config = prepare_config(config, attn)
    layers = build_layers(config)
    batch, seq = 2, 96
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    mask = torch.ones_like(ids)
    hidden = layers[0]((ids, mask))[0].detach().requires_grad_()
    measured = saved_activation_bytes(layers[1], (hidden, mask))
    estimate = get_architecture(model_type).block_activation_elements(config, attn, seq) * batch * seq * 4
    assert abs(estimate - measured) / measured < 0.08, (estimate, measured)


def test_optimizer_bytes_by_type_precision_zero_and_offload():
    assert optimizer_state_bytes({"type": "AdamW"}, "fp32") == 8
    assert optimizer_state_bytes({"type": "AdamW"}, "bf16") == 12  # + fp32 master weights
    assert optimizer_state_bytes({"type": "SGD", "params": {"lr": 1}}, "fp32") == 0
    assert optimizer_state_bytes({"type": "SGD", "params": {"momentum": 0.9}}, "fp32") == 4
    assert optimizer_state_bytes({"type": "LionPytorch"}, "bf16") == 8
    base = {"model_path": "m", "save_path": "s", "data_path": "d.json", "train_steps": 1, "train_micro_batch_size_per_gpu": 2,
            "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [2, 4]}, "parts": "auto"},
            "bf16": {"enabled": True}, "optimizer": {"type": "AdamW", "params": {"lr": 1e-5}}}
    config = prepare_config(AutoConfig.from_pretrained(REPO / "configs" / "tiny-llama"))
    s = memory_settings(validate(base, world_size=8), config)
    assert (s.param_bytes, s.grad_bytes, s.optimizer_bytes) == (2, 6.0, 12.0)
    s = memory_settings(validate({**base, "zero_optimization": {"stage": 1}}, world_size=8), config)
    assert s.optimizer_bytes == 3.0  # 12 / D
    s = memory_settings(validate({**base, "zero_optimization": {"stage": 1, "offload_optimizer": {"device": "cpu"}}}, world_size=8), config)
    assert s.optimizer_bytes == 0.0


def _brute_force(costs, stages, stage_bytes, budget):
    n, best = len(costs), None
    limits = budget if isinstance(budget, list) else [budget] * stages
    for cuts in itertools.combinations(range(1, n), stages - 1):
        bounds = (0, *cuts, n)
        if any(stage_bytes(bounds[k], bounds[k + 1], k) > limits[k] for k in range(stages)):
            continue
        worst = max(sum(costs[bounds[k]:bounds[k + 1]]) for k in range(stages))
        best = worst if best is None else min(best, worst)
    return best


def test_memory_aware_split_moves_layers_off_the_stages_that_do_not_fit():
    # 8 equal blocks; activations cost 10 per block per micro-batch in flight (P - s on stage s).
    params = [1] + [100] * 8 + [1, 1]
    costs = layer_costs(params, 1, 1, 8)

    def stage_bytes(start, stop, stage):
        blocks = sum(1 for i in range(start, stop) if 1 <= i <= 8)
        return blocks * 10 * (4 - stage)

    assert auto_parts(params, 1, 1, 4) == [3, 2, 2, 4]  # compute-balanced: stage 0 would need 3 * 40 = 120
    fitted = auto_parts(params, 1, 1, 4, stage_bytes, budget=80)
    assert sum(fitted) == 11 and min(fitted) >= 1
    start = 0
    for stage, n in enumerate(fitted):
        assert stage_bytes(start, start + n, stage) <= 80
        start += n
    stage_costs, start = [], 0
    for n in fitted:
        stage_costs.append(sum(costs[start:start + n]))
        start += n
    assert max(stage_costs) == pytest.approx(_brute_force(costs, 4, stage_bytes, 80))
    assert auto_parts(params, 1, 1, 4, stage_bytes, budget=10**9) == [3, 2, 2, 4]  # fits: unchanged
    with pytest.raises(AutoPartsError, match=r"no split of the 11 pipe layers into 4 stages fits in .* per rank .*"
                                             r"use more pipeline stages, ZeRO stage 1 or offload_optimizer, use_grad_ckpt"):
        auto_parts(params, 1, 1, 4, stage_bytes, budget=25)


def test_a_budget_per_stage_is_met_stage_by_stage():
    """Other models on the same ranks (PPO) leave each stage a different room."""
    params = [1] + [100] * 8 + [1, 1]
    costs = layer_costs(params, 1, 1, 8)

    def stage_bytes(start, stop, stage):
        return 10 * sum(1 for i in range(start, stop) if 1 <= i <= 8)

    assert auto_parts(params, 1, 1, 4, stage_bytes, budget=[100, 100, 100, 100]) == [3, 2, 2, 4]  # fits: balanced
    room = [10, 100, 100, 30]  # stage 0 has room for one block, stage 3 for three
    fitted = auto_parts(params, 1, 1, 4, stage_bytes, budget=room)
    bounds = [0, *itertools.accumulate(fitted)]
    assert all(stage_bytes(bounds[s], bounds[s + 1], s) <= room[s] for s in range(4))
    assert fitted[0] <= 2 and fitted != [3, 2, 2, 4]
    worst = max(sum(costs[bounds[s]:bounds[s + 1]]) for s in range(4))
    assert worst == pytest.approx(_brute_force(costs, 4, stage_bytes, room))
    with pytest.raises(AutoPartsError, match=r"fits in the room per stage \("):
        auto_parts(params, 1, 1, 4, stage_bytes, budget=[0, 10, 10, 10])


def test_stage_memory_of_tiny_llama_by_hand():
    """fp32 AdamW, micro-batch 2, seq 128, 2 stages [4, 3] of tiny LLaMA (H 64, I 176, 4 heads of 16, 2 kv)."""
    config = prepare_config(AutoConfig.from_pretrained(REPO / "configs" / "tiny-llama"))
    raw = {"model_path": "m", "save_path": "s", "data_path": "d.json", "train_steps": 1, "train_micro_batch_size_per_gpu": 2,
           "max_seq_len": 128, "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [2, 1]}, "parts": [4, 3]},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
    settings = memory_settings(validate(raw, world_size=2), config)
    names = ["embedding", "block.0", "block.1", "block.2", "block.3", "final_norm", "lm_head"]
    counts = [65536, 46208, 46208, 46208, 46208, 64, 65536]
    per_token = 7 * 64 + 2 * 32 + 4 * 176 + 4 * 16 + 4  # sdpa: + one log-sum-exp per head
    tokens = 2 * 128
    s0 = stage_memory(config, names, counts, False, 0, 4, 0, settings)
    p0 = 65536 + 3 * 46208
    assert s0 == {"weights": 4 * p0, "gradients": 4 * p0, "optimizer": 8 * p0,
                  "activations": 3 * per_token * tokens * 4 * 2, "head": 0.0}  # 2 micro-batches in flight
    s1 = stage_memory(config, names, counts, False, 4, 7, 1, settings)
    p1 = 46208 + 64 + 65536
    assert s1["weights"] == 4 * p1 and s1["optimizer"] == 8 * p1
    assert s1["activations"] == per_token * tokens * 4 + 2 * 64 * tokens * 4  # a block + the final norm
    assert s1["head"] == 2 * tokens * 1024 * 4  # chunked loss (SFT default): 2 fp32 chunks, here the whole 256 tokens
    full = memory_settings(validate({**raw, "chunked_loss": False}, world_size=2), config)
    s1_full = stage_memory(config, names, counts, False, 4, 7, 1, full)
    assert s1_full["head"] == tokens * 1024 * 16  # logits, log-softmax, its gradient, the logits' gradient (fp32)
    report = stage_report([4, 3], names, counts, 4, lambda a, b, s: stage_memory(config, names, counts, False, a, b, s, settings))
    line0 = report.split("\n")[0]
    assert line0.startswith(f"  stage 0: layers 0-3 (embedding .. block.2), {p0 * 4 / 2**20:.1f} MiB params, "
                            f"~{sum(s0.values()) / 2**20:.1f} MiB training memory (weights ")


def test_frozen_model_holds_weights_and_one_micro_batch():
    """PPO's reference / reward model: forward-only, so no gradients, no optimizer, no micro-batches
    kept for a backward; the LM head two fp32 chunks of logits (or, with chunked_loss off, the logits of
    the two micro-batches the pipeline keeps as well)."""
    config = prepare_config(AutoConfig.from_pretrained(REPO / "configs" / "tiny-llama"))
    raw = {"model_path": "m", "save_path": "s", "data_path": "d.json", "train_steps": 1, "train_micro_batch_size_per_gpu": 2,
           "max_seq_len": 128, "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [2, 1]}, "parts": [4, 3]},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, "bf16": {"enabled": True}}
    settings = memory_settings(validate(raw, world_size=2), config, frozen=True)
    assert settings.frozen and settings.chunked_head and settings.grad_bytes == 0 and settings.optimizer_bytes == 0
    names = ["embedding", "block.0", "block.1", "block.2", "block.3", "final_norm", "lm_head"]
    counts = [65536, 46208, 46208, 46208, 46208, 64, 65536]
    per_token = 7 * 64 + 2 * 32 + 4 * 176 + 4 * 16 + 4
    tokens = 2 * 128
    s0 = stage_memory(config, names, counts, False, 0, 4, 0, settings)
    p0 = 65536 + 3 * 46208
    assert s0 == {"weights": 2 * p0, "gradients": 0.0, "optimizer": 0.0,
                  "activations": per_token * tokens * 2 + 2 * 64 * tokens * 2, "head": 0.0}  # one block at a time
    s1 = stage_memory(config, names, counts, False, 4, 7, 1, settings)
    assert s1["activations"] == per_token * tokens * 2 + 2 * 64 * tokens * 2 + 2 * 64 * tokens * 2  # + the final norm
    assert s1["head"] == 2 * tokens * 1024 * 4  # deferred logits: 2 fp32 chunks (here all 256 tokens)
    full = memory_settings(validate({**raw, "chunked_loss": False}, world_size=2), config, frozen=True)
    s1_full = stage_memory(config, names, counts, False, 4, 7, 1, full)
    assert s1_full["head"] == 2 * tokens * 1024 * 2 + 2 * tokens * 1024 * 4  # 2 micro-batches' bf16 logits + 2 chunks
    trained = memory_settings(validate(raw, world_size=2), config)
    assert stage_memory(config, names, counts, False, 0, 4, 0, trained)["activations"] > s0["activations"]


def test_micro_batch_shape_follows_the_recipe():
    """The RM and DPO hold both sides of each pair per micro-batch; PPO's rows carry the answer too."""
    raw = {"model_path": "m", "save_path": "s", "data_path": "d.json", "train_steps": 1, "train_micro_batch_size_per_gpu": 2,
           "max_seq_len": 128, "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [2, 1]}, "parts": [4, 3]}}
    assert validate(raw, world_size=2).micro_batch_shape() == (2, 128)
    assert validate({**raw, "stage": "rm"}, world_size=2).micro_batch_shape() == (4, 128)
    assert validate({**raw, "stage": "dpo"}, world_size=2).micro_batch_shape() == (4, 128)
    ppo = {**{k: v for k, v in raw.items() if k != "model_path"}, "stage": "ppo", "actor_path": "a", "critic_path": "c",
           "ppo": {"max_new_tokens": 32}}
    assert validate(ppo, world_size=2).micro_batch_shape() == (2, 160)
    config = prepare_config(AutoConfig.from_pretrained(REPO / "configs" / "tiny-llama"))
    assert memory_settings(validate({**raw, "stage": "dpo"}, world_size=2), config).chunked_head


def test_ppo_actor_counts_its_rollout_generation():
    """PPO's actor generates every row of its replica's rollout with a KV cache: K and V per block for
    rows x (prompt + answer) tokens, or, when larger, the prompts' cache and one micro-batch's prefill; the
    part beyond the training activations is the stage's "generation" (bench/memory.py --generate: within
    3% of the measured CPU peak, docs/benchmarks.md). The critic and the frozen models generate nothing."""
    from models.pipeline import pipe_layer_names

    raw = {"stage": "ppo", "actor_path": "a", "critic_path": "c", "save_path": "s", "data_path": "d.json", "train_steps": 1,
           "train_batch_size": 8, "train_micro_batch_size_per_gpu": 1, "max_seq_len": 96,
           "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [2, 2]}, "parts": [4, 3]},
           "ppo": {"max_new_tokens": 32, "rollout_batch_size": 16, "n_samples_per_prompt": 4}}
    cfg = validate(raw, world_size=4)
    config = prepare_config(AutoConfig.from_pretrained(REPO / "configs" / "tiny-llama"))
    actor = memory_settings(cfg, config, generates=True)
    assert (actor.generation_rows, actor.generation_prompt, actor.generation_new) == (32, 96, 32)  # 16 x 4 / D = 2
    assert memory_settings(cfg, config).generation_rows == 0 and memory_settings(cfg, config, frozen=True).generation_rows == 0
    names = pipe_layer_names(config, "lm")
    counts = [1] * len(names)
    parts = stage_memory(config, names, counts, False, 0, 4, 0, actor)
    blocks, act = 3, 4  # stage 0: the embedding and 3 blocks, fp32
    kv_heads, head_dim = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    full_cache = blocks * 32 * (96 + 32) * 2 * kv_heads * head_dim * act
    prefill = blocks * 32 * 96 * 2 * kv_heads * head_dim * act + 16 * 96 * (4 * config.hidden_size + 2 * config.intermediate_size) * act
    assert parts["generation"] == pytest.approx(max(full_cache, prefill) - parts["activations"] - parts["head"])
    without = stage_memory(config, names, counts, False, 0, 4, 0, memory_settings(cfg, config))
    assert "generation" not in without and {k: v for k, v in parts.items() if k != "generation"} == without
