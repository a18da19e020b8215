"""Fast in-process tests of the trainer's pure pieces: config validation, explicit and auto stage
splits, optimizer parameter groups, LionPytorch on CPU, and the train_ds.py config-error exit.
No DeepSpeed launch, no torch.distributed."""
import copy
import json
import logging
import os
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from trainer.config import ConfigError
from trainer.engine.auto_parts import auto_parts, layer_costs
from trainer.engine.partition import PartitionError, boundaries_from_parts
from trainer.recipes import load_config
from trainer.recipes import validate_config as validate

REPO = Path(__file__).resolve().parent.parent

BASE = {
    "model_path": "runs/m", "save_path": "runs/s", "data_path": "data/x.json", "n_epochs": 1,
    "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [2, 2]}, "parts": [3, 4]},
    "train_micro_batch_size_per_gpu": 2,
}


def cfg(drop=(), **changes) -> dict:
    raw = copy.deepcopy(BASE)
    raw.update(changes)
    for key in drop:
        raw.pop(key)
    return raw


def problems(raw, world_size=4, device_supports_fp16=True) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate(raw, "cfg.json", world_size=world_size, device_supports_fp16=device_supports_fp16)
    return info.value.problems


def topo(dims, parts="auto", axes=("pipe", "data")):
    return {"process_topology": {"axes": list(axes), "dims": dims}, "parts": parts}


# ---------------------------------------------------------------------------------------------- config

def test_valid_config_fills_defaults_and_batch_triple():
    c = validate(cfg(seed=7, no_decay=["bias"]), "cfg.json", world_size=4)
    assert (c.model_topo.pipe, c.model_topo.data, c.model_topo.parts) == (2, 2, [3, 4])
    # Only micro batch given: DeepSpeed's filling gives grad_accum 1 and train_batch_size = 2 x 1 x D=2.
    assert (c.micro_batch, c.grad_accum, c.global_batch) == (2, 1, 4)
    assert c.ds_config == {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_batch_size": 4}
    assert (c.seed, c.no_decay, c.overflow, c.max_seq_len, c.resume, c.stage) == (7, ("bias",), "truncate", 512, "auto", "sft")
    assert c.precision == "fp32"
    assert c.data_cache_dir() == os.path.join("runs/s", ".data_cache")
    assert c.config_path == "cfg.json"


@pytest.mark.parametrize("given, expected", [
    ({"train_batch_size": 12}, (12, 2, 3)),                                  # grad_accum = 12 / (2 x 2)
    ({"gradient_accumulation_steps": 4}, (16, 2, 4)),                         # train_batch_size = 2 x 4 x 2
    ({"train_batch_size": 8, "gradient_accumulation_steps": 2}, (8, 2, 2)),  # all three consistent
])
def test_batch_triple_filled_like_deepspeed(given, expected):
    c = validate(cfg(**given), world_size=4)
    assert (c.global_batch, c.micro_batch, c.grad_accum) == expected


def test_batch_sizes_that_do_not_multiply_out():
    assert problems(cfg(train_batch_size=8, gradient_accumulation_steps=3)) == [
        "batch sizes do not multiply out: train_batch_size 8 != train_micro_batch_size_per_gpu 2 x "
        "gradient_accumulation_steps 3 x data-parallel size 2 = 12"]
    assert problems(cfg(train_batch_size=10)) == [
        "train_batch_size 10 is not a multiple of train_micro_batch_size_per_gpu 2 x data-parallel size 2"]
    assert problems(cfg(gradient_accumulation_steps=0)) == ["gradient_accumulation_steps must be a positive integer, got 0"]
    assert problems(cfg(train_batch_size=True)) == ["train_batch_size must be a positive integer, got true"]
    assert problems(cfg(drop=["train_micro_batch_size_per_gpu"])) == [
        "give train_micro_batch_size_per_gpu (rows per micro-batch) and/or train_batch_size"]
    # DeepSpeed's rule: train_batch_size alone means gradient_accumulation_steps 1.
    c = validate(cfg(drop=["train_micro_batch_size_per_gpu"], train_batch_size=8), world_size=4)
    assert (c.global_batch, c.micro_batch, c.grad_accum) == (8, 4, 1)


def test_micro_batch_filled_from_batch_and_accum_like_deepspeed():
    c = validate(cfg(drop=["train_micro_batch_size_per_gpu"], train_batch_size=8, gradient_accumulation_steps=2), world_size=4)
    assert (c.global_batch, c.micro_batch, c.grad_accum) == (8, 2, 2)


def test_unknown_keys_with_suggestion():
    assert problems(cfg(train_micro_batch_size=2, lerning_rate=1.0, n_epoch=3)) == [
        "unknown key 'lerning_rate' (see trainer/config.py for the project keys)",
        "unknown key 'n_epoch': did you mean 'n_epochs'?",
        "unknown key 'train_micro_batch_size': did you mean 'train_micro_batch_size_per_gpu'?",
    ]


def test_required_keys_and_types():
    assert problems(cfg(drop=["model_path", "model_topo"])) == [
        "missing required key 'model_path'", "missing required key 'model_topo'"]
    assert problems(cfg(max_seq_len="512", pack=1, n_epochs=1.5, seed=True, no_decay="bias")) == [
        'max_seq_len must be an integer, got "512"',
        "pack must be true or false, got 1",
        "n_epochs must be an integer, got 1.5",
        "seed must be an integer, got true",
        'no_decay must be a list, got "bias"',
    ]


def test_model_topo_shape():
    assert problems(cfg(model_topo=[2, 2])) == [
        'model_topo must be an object: {"process_topology": {"axes": ["pipe", "data"], "dims": [P, D]}, "parts": [...]}']
    assert problems(cfg(model_topo=topo([2, 2], axes=("data", "pipe")))) == [
        'model_topo.process_topology.axes must be ["pipe", "data"]']
    assert problems(cfg(model_topo=topo([4]))) == [
        "model_topo.process_topology.dims must be two positive integers [P, D], got [4]"]
    assert problems(cfg(model_topo=topo([2, 0]))) == [
        "model_topo.process_topology.dims must be two positive integers [P, D], got [2, 0]"]
    assert problems(cfg(model_topo={**topo([2, 2]), "partition": "uniform"})) == [
        "model_topo: unknown keys ['partition'] (use process_topology and parts)"]
    assert problems(cfg(model_topo=topo([2, 2], parts="even"))) == [
        'model_topo.parts must be a list of layer counts (one per stage) or "auto", got "even"']
    assert validate(cfg(model_topo={"process_topology": {"axes": ["pipe", "data"], "dims": [2, 2]}}), world_size=4).model_topo.parts == "auto"


def test_world_size_parts_length_and_empty_stage():
    assert problems(cfg(), world_size=2) == [
        "model_topo.process_topology.dims [2, 2]: pipe x data = 4 but the job has 2 ranks (WORLD_SIZE); "
        "make P x D = 2 or launch 4 ranks"]
    assert problems(cfg(model_topo=topo([2, 2], parts=[3, 0, 4]))) == [
        "model_topo.parts has 3 entries but dims[0] says 2 pipeline stages",
        "model_topo.parts [3, 0, 4]: every stage needs at least one layer",
    ]
    # world_size unknown (None): the product is not checked.
    assert validate(cfg(), world_size=None).model_topo.pipe == 2


def test_precision_and_zero():
    assert problems(cfg(fp16={"enabled": True}), device_supports_fp16=False) == [
        "fp16 is enabled but this device cannot train in fp16 (DeepSpeed's CPU accelerator): use bf16 or fp32"]
    assert validate(cfg(fp16={"enabled": True}), world_size=4).precision == "fp16"
    assert validate(cfg(bf16={"enabled": True}), world_size=4, device_supports_fp16=False).precision == "bf16"
    assert problems(cfg(fp16={"enabled": True}, bf16={"enabled": True})) == ["fp16 and bf16 are both enabled: choose one"]
    for stage in (2, 3):
        assert problems(cfg(zero_optimization={"stage": stage})) == [
            f"zero_optimization.stage {stage}: the pipeline engine supports ZeRO stage 0 or 1 only (stage 2/3 partition "
            "gradients/parameters, which pipeline parallelism does not allow); use stage 1, optionally with offload_optimizer"]
    assert validate(cfg(zero_optimization={"stage": 1}), world_size=4).ds_config["zero_optimization"] == {"stage": 1}


    assert problems(cfg(zero_optimization=1))


def test_bf16_accumulation_warns_unless_zero1_fp32_and_shipped_configs_accumulate_in_fp32():
    """Issue 11.3: bf16 + ZeRO 0 accumulates gradients in bf16 (DeepSpeed's BF16_Optimizer); one
    clear warning line; ZeRO 1 + grad_accum_dtype fp32 + communication_data_type fp32 is the fix (the
    all-reduce casts to bf16 otherwise: tests/test_train_parity.py), ZeRO 0 + fp32 is refused."""
    bf16 = {"bf16": {"enabled": True}, "gradient_accumulation_steps": 4}
    fix = ('add "zero_optimization": {"stage": 1}, "data_types": {"grad_accum_dtype": "fp32"} and '
           '"communication_data_type": "fp32"')
    (warning,) = validate(cfg(**bf16), world_size=4).warnings
    assert warning.startswith("bf16 with gradient_accumulation_steps 4 accumulates gradients in bf16") and "\n" not in warning
    assert warning.endswith(fix)
    assert validate(cfg(**bf16, zero_optimization={"stage": 1}), world_size=4).warnings  # ZeRO 1 alone: still bf16
    # fp32 accumulation, but the all-reduce still casts the sums to bf16:
    assert validate(cfg(**bf16, zero_optimization={"stage": 1}, data_types={"grad_accum_dtype": "fp32"}), world_size=4).warnings
    fixed = validate(cfg(**bf16, zero_optimization={"stage": 1}, data_types={"grad_accum_dtype": "fp32"},
                         communication_data_type="fp32"), world_size=4)
    assert fixed.warnings == () and fixed.ds_config["data_types"] == {"grad_accum_dtype": "fp32"}
    assert validate(cfg(bf16={"enabled": True}, gradient_accumulation_steps=1), world_size=4).warnings == ()
    assert validate(cfg(gradient_accumulation_steps=4), world_size=4).warnings == ()  # fp32
    assert problems(cfg(**bf16, data_types={"grad_accum_dtype": "fp32"})) == [
        'data_types.grad_accum_dtype "fp32" with bf16 needs zero_optimization {"stage": 1} (DeepSpeed has no fp32 '
        "accumulation for bf16 at ZeRO stage 0)"]
    for name in ("ds_config_pp.json", "ds_config_rm.json", "ds_config_dpo.json"):
        shipped = load_config(str(REPO / "configs" / name), world_size=8)
        assert shipped.precision == "bf16" and shipped.grad_accum > 1 and shipped.warnings == (), name
        assert shipped.ds_config["zero_optimization"]["stage"] == 1 and shipped.ds_config["communication_data_type"] == "fp32"


def test_zero1_with_an_untested_optimizer_is_a_config_error_and_cpu_lion_warns():
    """DeepSpeed asserts (a traceback) on an optimizer it has not tested with ZeRO, e.g. SGD."""
    sgd = {"type": "SGD", "params": {"lr": 0.1}}
    assert problems(cfg(optimizer=sgd, zero_optimization={"stage": 1})) == [
        "optimizer type 'SGD' with zero_optimization stage 1: DeepSpeed refuses optimizers it has not tested with ZeRO; "
        'add "zero_allow_untested_optimizer": true to use it anyway, or use AdamW, Adam, Adagrad or Lion']
    assert validate(cfg(optimizer=sgd, zero_optimization={"stage": 1}, zero_allow_untested_optimizer=True), world_size=4)
    assert validate(cfg(optimizer={"type": "LionPytorch", "params": {"lr": 1e-4}}, zero_optimization={"stage": 1}), world_size=4)
    offload = {"stage": 1, "offload_optimizer": {"device": "cpu"}}
    (warning,) = validate(cfg(optimizer={"type": "Lion", "params": {"lr": 1e-4}}, zero_optimization=offload), world_size=4).warnings
    assert warning.startswith("DeepSpeed's CPU Lion (offload_optimizer) moves every parameter whose update is zero")
    assert warning.endswith('use "type": "LionPytorch"')


def test_flash_attention_with_packing_is_accepted():
    """Issue 16.2: packed rows reach flash attention padding-free as cu_seqlens (tests/test_flash_varlen.py)."""
    assert validate(cfg(use_flash_attn=True, pack=True), world_size=4).pack
    assert validate(cfg(use_flash_attn=True), world_size=4).use_flash_attn


def test_eval_length_and_values():
    assert problems(cfg(eval_fraction=0.1, eval_data_path="data/eval.json")) == ["give eval_data_path or eval_fraction, not both"]
    assert problems(cfg(eval_fraction=1.0)) == ["eval_fraction must be in [0, 1)"]
    assert problems(cfg(drop=["n_epochs"])) == [
        "say how long to train: n_epochs and/or train_steps (train_steps wins when both are given)"]
    assert problems(cfg(n_epochs=0, train_steps=0)) == [
        "say how long to train: n_epochs and/or train_steps (train_steps wins when both are given)"]
    assert validate(cfg(drop=["n_epochs"], train_steps=5), world_size=4).train_steps == 5
    assert problems(cfg(overflow="cut", stage="grpo", keep_last=0, max_seq_len=0, save_interval=-1)) == [
        "overflow must be \"truncate\", \"drop\" or \"chunk\", got 'cut'",
        "stage 'grpo' is not available; use one of ['sft', 'rm', 'dpo', 'ppo']",
        "max_seq_len must be at least 1",
        "keep_last must be at least 1",
        "save_interval must not be negative",
    ]
    assert validate(cfg(overflow="drop"), world_size=4).overflow == "drop"


def test_problems_from_several_checks_reported_together():
    raw = cfg(overflow="cut", train_batch_size=7, zero_optimization={"stage": 3})
    with pytest.raises(ConfigError) as info:
        validate(raw, "cfg.json", world_size=2)
    assert len(info.value.problems) == 4
    text = str(info.value)
    assert text.startswith("cfg.json: 4 problem(s) in the training config:\n  - ")
    assert text.count("\n  - ") == 4




def test_load_config_file_errors(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path / "missing.json"))
    assert info.value.problems == ["file not found"]
    bad = tmp_path / "bad.json"
    bad.write_text('{"model_path": "m",\n  "seed": }')
    with pytest.raises(ConfigError) as info:
        load_config(str(bad))
    assert info.value.problems == ["invalid JSON at line 2 column 11: Expecting value"]
    bad.write_text("[1, 2]")
    with pytest.raises(ConfigError) as info:
        load_config(str(bad))
    assert info.value.problems == ["the top level must be a JSON object"]
    good = tmp_path / "good.json"
    good.write_text(json.dumps(cfg()))
    assert load_config(str(good), world_size=4).config_path == str(good)


def test_quickstart_config_validates():
    c = load_config(str(REPO / "configs" / "quickstart.json"), world_size=2)
    assert (c.model_topo.pipe, c.model_topo.data, c.model_topo.parts) == (2, 1, [3, 4])
    assert (c.global_batch, c.micro_batch, c.grad_accum) == (4, 2, 2)
    assert c.ds_config["optimizer"]["type"] == "AdamW"


# ---------------------------------------------------------------------------------------------- partition

TINY_NAMES = ["embedding", "block.0", "block.1", "block.2", "block.3", "final_norm", "lm_head"]


def test_boundaries_from_parts():
    assert boundaries_from_parts([3, 4], 2, TINY_NAMES) == [0, 3, 7]
    assert boundaries_from_parts([1] * 7, 7, TINY_NAMES) == list(range(8))


def test_boundaries_errors_name_the_layers():
    with pytest.raises(PartitionError) as info:
        boundaries_from_parts([3, 3], 2, TINY_NAMES)
    assert str(info.value) == (
        "model_topo.parts sums to 6 but the model has 7 pipe layers (embedding, 4 blocks, final norm, head): "
        "0:embedding, 1:block.0, 2:block.1, 3:block.2, 4:block.3, 5:final_norm, 6:lm_head")
    with pytest.raises(PartitionError, match=r"^model_topo.parts has 3 entries but the pipeline has 2 stages"):
        boundaries_from_parts([2, 2, 3], 2, TINY_NAMES)
    with pytest.raises(PartitionError, match=r"^model_topo.parts gives stage\(s\) \[1\] no layers"):
        boundaries_from_parts([7, 0], 2, TINY_NAMES)
    with pytest.raises(PartitionError, match=r"^model_topo.parts must be a list of integers"):
        boundaries_from_parts([3.0, 4], 2, TINY_NAMES)


# ---------------------------------------------------------------------------------------------- auto parts

def _tiny_counts(name="tiny-llama"):
    from transformers import AutoConfig

    from models.pipeline import prepare_config
    from trainer.engine.plan import layer_param_counts

    return layer_param_counts(prepare_config(AutoConfig.from_pretrained(str(REPO / "configs" / name))))


# LLaMA-7B-like: embedding 32000 x 4096, 32 blocks (4*4096^2 attention + 3*4096*11008 MLP + 2 norms), norm, head.
BLOCK_7B = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096
LLAMA_7B = [32000 * 4096] + [BLOCK_7B] * 32 + [4096, 32000 * 4096]
# LLaMA-3-8B-like: the head (128256 x 4096) costs about two blocks.
BLOCK_8B = 4096 * 4096 * 2 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096
LLAMA3_8B = [128256 * 4096] + [BLOCK_8B] * 32 + [4096, 128256 * 4096]


def _stage_costs(costs, parts):
    out, start = [], 0
    for n in parts:
        out.append(sum(costs[start:start + n]))
        start += n
    return out


def _minimax(costs, stages) -> float:
    """Brute-force optimum: the smallest possible cost of the most expensive stage."""
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    @lru_cache(maxsize=None)
    def best(i, j):  # the first i layers in j non-empty stages
        if j == 1:
            return prefix[i]
        return min(max(best(k, j - 1), prefix[i] - prefix[k]) for k in range(j - 1, i))

    return best(len(costs), stages)


def test_layer_costs_weight_the_head():
    costs = layer_costs(LLAMA_7B, 4096, 2048, 32)
    assert len(costs) == 35
    assert costs[0] == 4096.0                                   # embedding: a lookup
    assert costs[1] == 2.0 * BLOCK_7B + 4.0 * 2048 * 4096       # matmuls + attention scores
    assert costs[-2] == 4096.0                                  # final norm
    assert costs[-1] == 2.0 * 32000 * 4096                      # head: a vocab x hidden matmul
    # A tied head (0 own params) costs the embedding's matmul.
    assert layer_costs([100, 10, 10, 1, 0], 4, 8, 2)[-1] == 200.0


@pytest.mark.parametrize("model, stages, expected", [
    (LLAMA_7B, 4, [9, 8, 8, 10]),
    (LLAMA_7B, 8, [5, 4, 4, 4, 4, 4, 4, 6]),
    (LLAMA3_8B, 4, [9, 9, 9, 8]),
    (LLAMA3_8B, 8, [5, 5, 5, 4, 4, 4, 4, 4]),
])
def test_auto_parts_large_models(model, stages, expected):
    parts = auto_parts(model, 4096, 2048, stages)
    assert [int(p) for p in parts] == expected
    assert sum(parts) == len(model) and min(parts) >= 1
    costs = layer_costs(model, 4096, 2048, 32)
    # The split is the optimal one for the cost model (the most expensive stage is as cheap as possible).
    assert max(_stage_costs(costs, parts)) == pytest.approx(_minimax(costs, stages), rel=1e-12)
    last_blocks = parts[-1] - 2  # the last stage holds the final norm and the head
    uniform = 32 // stages
    # The head is weighted: the last stage never gets more blocks than a uniform block split;
    # with LLaMA-3's 128k vocabulary (head ~2 blocks) it gets strictly fewer.
    assert last_blocks <= uniform
    if model is LLAMA3_8B:
        assert last_blocks < uniform


def test_auto_parts_tiny_llama():
    counts = _tiny_counts("tiny-llama")
    assert counts == [65536, 46208, 46208, 46208, 46208, 64, 65536]
    assert [int(p) for p in auto_parts(counts, 64, 128, 2)] == [4, 3]
    assert [int(p) for p in auto_parts(counts, 64, 128, 4)] == [2, 2, 2, 1]
    assert [int(p) for p in auto_parts(counts, 64, 128, 7)] == [1] * 7
    for stages in range(1, 8):
        parts = auto_parts(counts, 64, 128, stages)
        assert len(parts) == stages and sum(parts) == 7 and min(parts) >= 1
    with pytest.raises(ValueError) as info:
        auto_parts(counts, 64, 128, 8)
    assert str(info.value) == "8 pipeline stages but only 7 pipe layers: reduce dims[0]"


def test_auto_parts_are_python_ints_accepted_by_resolve_parts():
    """DeepSpeed's partition_balanced yields numpy.int64 bounds, which boundaries_from_parts rejects
    (not an int): auto_parts must hand back Python ints or parts "auto" fails in resolve_parts."""
    from transformers import AutoConfig

    from models.pipeline import prepare_config
    from trainer.engine.plan import resolve_parts

    counts = _tiny_counts("tiny-llama")
    assert all(type(p) is int for p in auto_parts(counts, 64, 128, 2))
    c = validate(cfg(max_seq_len=128, model_topo=topo([2, 1])), world_size=2)
    assert resolve_parts(c, prepare_config(AutoConfig.from_pretrained(str(REPO / "configs" / "tiny-llama")))) == [4, 3]


# ---------------------------------------------------------------------------------------------- optimizer

def _pipe(name):
    from transformers import AutoConfig

    from models.pipeline import SequentialPipe, build_layers, prepare_config

    torch.manual_seed(0)
    return SequentialPipe(build_layers(prepare_config(AutoConfig.from_pretrained(str(REPO / "configs" / name)))))


@pytest.mark.parametrize("name, n_decay, n_no_decay", [("tiny-llama", 30, 9), ("tiny-bloom", 17, 36)])
def test_param_groups_no_decay_for_biases_and_norms(name, n_decay, n_no_decay):
    from trainer.config import DEFAULT_NO_DECAY
    from trainer.engine.optim import param_groups

    module = _pipe(name)
    names = {id(p): n for n, p in module.named_parameters()}
    groups = param_groups(module, DEFAULT_NO_DECAY)
    assert [g["name"] for g in groups] == ["decay", "no_decay"]
    assert "weight_decay" not in groups[0] and groups[1]["weight_decay"] == 0.0
    decayed = [names[id(p)] for p in groups[0]["params"]]
    not_decayed = [names[id(p)] for p in groups[1]["params"]]
    assert (len(decayed), len(not_decayed)) == (n_decay, n_no_decay)
    assert len(decayed) + len(not_decayed) == len(names)

    def is_norm_or_bias(n):
        return n.endswith(".bias") or "norm" in n.split(".")[-2] or n.split(".")[-2] == "ln_f"

    assert all(is_norm_or_bias(n) for n in not_decayed), not_decayed
    assert not any(is_norm_or_bias(n) for n in decayed), decayed
    assert all(n.endswith(".weight") for n in decayed)
    if name == "tiny-llama":
        assert {"modules_.0.embed_tokens.weight", "modules_.6.lm_head.weight", "modules_.1.mlp.gate_proj.weight"} <= set(decayed)
        assert {"modules_.1.input_layernorm.weight", "modules_.1.post_attention_layernorm.weight",
                "modules_.5.norm.weight"} <= set(not_decayed)
    else:
        assert {"modules_.0.word_embeddings.weight", "modules_.1.self_attention.query_key_value.weight"} <= set(decayed)
        assert {"modules_.0.word_embeddings_layernorm.weight", "modules_.0.word_embeddings_layernorm.bias",
                "modules_.5.ln_f.weight", "modules_.5.ln_f.bias", "modules_.1.mlp.dense_h_to_4h.bias"} <= set(not_decayed)


def test_param_groups_skips_frozen_and_omits_empty_group():
    from trainer.engine.optim import param_groups

    lin = torch.nn.Linear(3, 2)
    lin.bias.requires_grad_(False)
    groups = param_groups(lin, ("bias",))
    assert len(groups) == 1 and groups[0]["name"] == "decay" and groups[0]["params"] == [lin.weight]


def test_lion_pytorch_use_triton_on_cpu_does_not_exit(caplog, monkeypatch):
    """use_triton where triton cannot run (no CUDA, or no triton package): the plain PyTorch Lion with a
    warning, never lion-pytorch's exit(). triton_usable is forced off so that this holds on a CUDA
    machine with triton too (the optimizer below steps CPU tensors)."""
    from lion_pytorch import Lion

    import trainer.engine.optim
    from trainer.engine.optim import build_lion_pytorch, is_lion_pytorch, param_groups

    monkeypatch.setattr(trainer.engine.optim, "triton_usable", lambda: False)

    assert is_lion_pytorch({"optimizer": {"type": "LionPytorch"}}) and not is_lion_pytorch({"optimizer": {"type": "Lion"}})
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    with caplog.at_level(logging.WARNING, logger="trainer.engine.optim"):
        opt = build_lion_pytorch(param_groups(lin, ("bias",)), {"lr": 1e-4, "use_triton": True})
    assert type(opt) is Lion
    assert "use_triton needs CUDA and triton" in caplog.text
    before = [p.detach().clone() for p in lin.parameters()]
    lin(torch.randn(5, 4)).pow(2).sum().backward()
    grads = [p.grad.clone() for p in lin.parameters()]
    opt.step()
    # Lion's first step (zero momentum, no weight decay): p -= lr * sign(grad).
    for p, b, g in zip(lin.parameters(), before, grads):
        assert not torch.equal(p, b)
        torch.testing.assert_close(p.detach(), b - 1e-4 * torch.sign(g))
    with pytest.raises(ValueError, match=r"^optimizer.params for LionPytorch: .*unexpected keyword argument 'eps'"):
        build_lion_pytorch(param_groups(lin, ("bias",)), {"lr": 1e-4, "eps": 1e-8})


# ---------------------------------------------------------------------------------------------- CLI

def _run_cli(config_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.run([sys.executable, "train_ds.py", "--config", str(config_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_bad_config_exits_2_with_error_lines(tmp_path):
    bad = tmp_path / "BAD.json"
    # World size 1 (no launcher) but dims [2, 1]; batch sizes do not multiply out; ZeRO 2.
    bad.write_text(json.dumps(cfg(model_topo=topo([2, 1], parts=[3, 4]), train_batch_size=8, gradient_accumulation_steps=2,
                                  zero_optimization={"stage": 2})))
    proc = _run_cli(bad)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "Traceback" not in out
    assert f"error: {bad}: 3 problem(s) in the training config:" in proc.stderr
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("  - ")]
    assert len(error_lines) == 3
    assert error_lines[0].startswith("  - model_topo.process_topology.dims [2, 1]: pipe x data = 2 but the job has 1 ranks")
    assert error_lines[1].startswith("  - batch sizes do not multiply out: train_batch_size 8 != ")
    assert error_lines[2].startswith("  - zero_optimization.stage 2: the pipeline engine supports ZeRO stage 0 or 1 only")


def test_pad_token_and_chunk_overflow_keys():
    c = validate(cfg(pad_token="<|finetune_right_pad_id|>", overflow="chunk"), world_size=4)
    assert (c.pad_token, c.overflow) == ("<|finetune_right_pad_id|>", "chunk")
    assert validate(cfg(pad_token=0), world_size=4).pad_token == 0
    assert validate(cfg(), world_size=4).pad_token is None
    assert problems(cfg(pad_token=["<pad>"])) == ['pad_token must be a string or an integer, got ["<pad>"]']
