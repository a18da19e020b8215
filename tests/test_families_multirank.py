"""The LLaMA-shaped families (Qwen2/2.5, Qwen3, Mistral, Llama 3.x) and Gemma 3 on real pipelines, against
transformers: logits on 2 and 3 stages equal HF's bit for bit (tied and untied heads, sliding-window
layers, a stage holding full and sliding layers); pipelined greedy generation equals HF `generate`
(ragged prompts, 2 and 3 micro-batches in flight, the families' several eos ids, sliding windows
shorter than prompt + answer); 3 AdamW steps of a 2-stage SFT equal a single-process HF loop; and the
acceptance path of issue 22: a Qwen2.5-shaped and a Llama-3.1-shaped model go hg_to_pp -> 2-stage SFT
with the model's own chat template -> pp_to_hg, and the export generates in transformers the greedy
tokens `demo.py --pipeline-stages 2` gives from the training checkpoint.

Launches: 2 ranks (every 2-stage case and the SFT runs, tests/multirank/families_runs.py), 3 ranks
(the 3-stage cases, same script), and demo.py twice.
"""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import REPO, launch_ranks
from convert.hg_to_pp import hg_to_pp
from convert.pp_to_hg import pp_to_hg
from test_families import SLIDING, eos_ids
from test_generation import hf_greedy, ragged_prompts
from test_models import right_padded_batch
from test_train_multirank import ADAMW, SGD, exported_weights, hf_reference, make_config

pytestmark = pytest.mark.multirank

MAX_NEW = 10
# name: (family, tied, sliding)
MODELS = {
    "qwen2": ("qwen2", None, None), "qwen2_untied": ("qwen2", False, None), "qwen3": ("qwen3", None, None),
    "mistral": ("mistral", None, None), "mistral_tied": ("mistral", True, None), "llama3": ("llama3", None, None),
    "llama3_untied": ("llama3", False, None), "qwen2_sliding": ("qwen2", None, "qwen2"),
    "mistral_sliding": ("mistral", None, "mistral"), "gemma3": ("gemma3", None, None),
    "gemma3_untied": ("gemma3", False, None),
}
TRAINED = ("qwen2", "qwen3", "mistral", "llama3", "qwen2_sliding", "mistral_sliding", "gemma3")
TEMPLATE_MODEL = ("qwen2", "llama3")  # acceptance: Qwen2.5-shaped and Llama-3.1-shaped
LAYOUTS = {2: [2, 5], 3: [2, 2, 3]}
# 3 stages: one model per family and the sliding variants (tied/untied heads are covered on 2 stages).
GRPO_FAMILIES = ("qwen3", "gemma3")
THREE_STAGES = ("qwen2", "qwen3", "mistral_sliding", "llama3", "qwen2_sliding", "gemma3")   # 2 stages: block 1 (full) and blocks 2-3 (sliding in qwen2_sliding) share stage 1


@pytest.fixture(scope="module")
def model_dirs(tiny_hf, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("families")
    out = {}
    for name, (family, tied, sliding) in MODELS.items():
        hf_dir = tiny_hf(family, tied, **(SLIDING[sliding] if sliding else {}))
        out[name] = (hf_dir, hg_to_pp(hf_dir, tmp / name, progress=False))
    return out


@pytest.fixture(scope="module")
def batch():
    ids, mask = right_padded_batch(800, lengths=(16, 11, 5, 14))
    return ids, mask


def write_spec(tmp, stages, model_dirs, batch, train_configs=()):
    ids, mask = batch
    spec = {"stages": stages, "parts": LAYOUTS[stages], "prompts": ragged_prompts(seed=2), "max_new": MAX_NEW,
            "batch": {"ids": ids.tolist(), "mask": mask.tolist()},
            "models": {name: {"pp": str(pp), "stop_ids": eos_ids(hf)} for name, (hf, pp) in model_dirs.items()},
            "train_configs": [str(p) for p in train_configs]}
    path = tmp / f"spec{stages}.json"
    path.write_text(json.dumps(spec))
    return path


def recipe_configs(tmp, model_dirs) -> list:
    """The other recipes on the families (each 2 stages, 2-3 steps): SFT with packing on a model with
    sliding-window layers (its parity with HF is checked below), RM, DPO (sliding windows), PPO
    with the RM as critic and reward model, and GRPO with a reference on Qwen3 and Gemma 3."""
    from test_train_parity import PACK_SEQ

    pairs = str(REPO / "data" / "samples" / "preferences.jsonl")
    small = dict(train_batch_size=4, train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=2)
    configs = [
        make_config(tmp, "pack_qwen2_sliding", model_dirs["qwen2_sliding"][1], pack=True, max_seq_len=PACK_SEQ,
                    train_batch_size=4, gradient_accumulation_steps=2, optimizer=SGD),
        make_config(tmp, "rm_llama3", model_dirs["llama3"][1], stage="rm", data_path=pairs, train_steps=2, **small),
        make_config(tmp, "dpo_mistral_sliding", model_dirs["mistral_sliding"][1], stage="dpo", data_path=pairs,
                    train_steps=2, beta=0.1, **small),
        make_config(tmp, "rm_gemma3", model_dirs["gemma3"][1], stage="rm", data_path=pairs, train_steps=2, **small),
        make_config(tmp, "dpo_gemma3", model_dirs["gemma3"][1], stage="dpo", data_path=pairs, train_steps=2, beta=0.1, **small),
    ]
    ppo = json.loads((REPO / "configs" / "ppo_tiny.json").read_text())
    ppo.pop("csv_monitor")
    ppo.update(actor_path=str(model_dirs["llama3"][1]), critic_path=str(tmp / "rm_llama3"), save_path=str(tmp / "ppo_llama3"),
               data_path=str(REPO / "data" / "samples" / "rlhf_prompts.jsonl"), train_steps=2, resume="never",
               model_topo={"process_topology": {"axes": ["pipe", "data"], "dims": [2, 1]}, "parts": [2, 5]})
    ppo["ppo"].update(rollout_batch_size=8, max_new_tokens=6)
    (tmp / "ppo_llama3.json").write_text(json.dumps(ppo))
    configs.append(tmp / "ppo_llama3.json")
    for family in GRPO_FAMILIES:  # GRPO with a reference (kl_coef > 0): generation, scoring and training per family
        grpo = json.loads((REPO / "configs" / "grpo_tiny.json").read_text())
        grpo.pop("csv_monitor")
        grpo.update(actor_path=str(model_dirs[family][1]), save_path=str(tmp / f"grpo_{family}"), train_steps=2,
                    resume="never", save_interval=0, model_topo={"process_topology": {"axes": ["pipe", "data"], "dims": [2, 1]},
                                                                 "parts": LAYOUTS[2]})
        grpo["grpo"].update(rollout_batch_size=2, n_samples_per_prompt=4, max_new_tokens=6, kl_coef=0.05,
                            reward_funcs=["overlong"], reward_kwargs={"overlong": {"max_length": 6, "buffer": 4}})
        (tmp / f"grpo_{family}.json").write_text(json.dumps(grpo))
        configs.append(tmp / f"grpo_{family}.json")
    return configs


@pytest.fixture(scope="module")
def runs(model_dirs, batch, tmp_path_factory):
    """{stages: results}: one 2-rank launch (2 stages + every SFT run), one 3-rank launch (3 stages)."""
    tmp = tmp_path_factory.mktemp("family_runs")
    configs = [make_config(tmp, name, model_dirs[name][1]) for name in TRAINED]
    configs += [make_config(tmp, f"{name}_template", model_dirs[name][1], template="model", train_steps=4,
                            optimizer={**ADAMW, "params": {**ADAMW["params"], "lr": 3e-3}}) for name in TEMPLATE_MODEL]
    configs += recipe_configs(tmp, model_dirs)
    results = {}
    for stages, ranks in ((2, 2), (3, 3)):
        models = model_dirs if stages == 2 else {name: model_dirs[name] for name in THREE_STAGES}
        spec = write_spec(tmp, stages, models, batch, configs if stages == 2 else ())
        launch_ranks(REPO / "tests" / "multirank" / "families_runs.py", "--spec", spec, "--out", tmp / f"out{stages}.json",
                     ranks=ranks, timeout=1500)
        results[stages] = json.loads((tmp / f"out{stages}.json").read_text())
        print(f"families_runs ({stages} stages) seconds per case: {results[stages]['seconds']}")
    return results, tmp


@pytest.fixture(scope="module")
def hf_models(model_dirs):
    return {name: AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval() for name, (hf, _) in model_dirs.items()}


LAYOUT_CASES = [(name, 2) for name in MODELS] + [(name, 3) for name in THREE_STAGES]


@pytest.mark.parametrize("name,stages", LAYOUT_CASES)
def test_pipeline_logits_equal_hf_bit_for_bit(runs, hf_models, batch, name, stages):
    ids, mask = batch
    got = torch.tensor(runs[0][stages]["models"][name]["logits"])
    with torch.no_grad():
        expected = hf_models[name](input_ids=ids, attention_mask=mask).logits
    assert torch.equal(got[mask.bool()], expected[mask.bool()])


@pytest.mark.parametrize("name,stages", LAYOUT_CASES)
def test_pipelined_greedy_equals_hf_generate(runs, hf_models, model_dirs, name, stages):
    hf = hf_models[name]
    stops = eos_ids(model_dirs[name][0])
    prompts = ragged_prompts(seed=2)
    expected = [hf_greedy(hf, p, max_new=MAX_NEW, eos=stops) for p in prompts]
    result = runs[0][stages]["models"][name]
    assert result["greedy_m2"] == expected and result["greedy_m3"] == expected
    window = getattr(hf.config, "sliding_window", None)
    if window:  # the window really is shorter than what the cache held
        assert max(len(p) + len(a) for p, a in zip(prompts, expected)) > 2 * window


@pytest.mark.parametrize("name", TRAINED)
def test_two_stage_sft_steps_equal_an_hf_loop(runs, model_dirs, tmp_path, name):
    results, tmp = runs
    summary = next(r for r in results[2]["train"] if r["config"].endswith(f"/{name}.json"))
    hf_dir, pp_dir = model_dirs[name]
    expected_weights, expected_losses = hf_reference(hf_dir, pp_dir, 3, ADAMW)
    torch.testing.assert_close(torch.tensor([loss for _, loss in summary["history"]]), torch.tensor(expected_losses),
                               rtol=0, atol=2e-6)
    got = exported_weights(tmp / name, tmp_path / "hf")
    assert got.keys() == expected_weights.keys() - {"lm_head.weight"} or got.keys() == expected_weights.keys()
    worst = max((got[k] - expected_weights[k]).abs().max().item() for k in got)
    assert worst <= 2e-5, f"max weight difference {worst}"
    start = exported_weights(pp_dir, tmp_path / "start")
    assert max((got[k] - start[k]).abs().max().item() for k in got) > 1e-3  # training moved them far beyond that


@pytest.mark.parametrize("name", TEMPLATE_MODEL)
def test_template_model_sft_export_generates_what_demo_pipeline_stages_2_does(runs, tmp_path, name):
    """hg_to_pp -> 2-stage SFT with the model's own chat template -> pp_to_hg: the export carries the
    template and the stop ids, loads in transformers, and its greedy tokens on chat prompts equal
    `demo.py --pipeline-stages 2` on the training checkpoint."""
    from transformers import AutoTokenizer

    from inference.inputs import read_prompts_file

    results, tmp = runs
    save = tmp / f"{name}_template"
    summary = next(r for r in results[2]["train"] if r["config"].endswith(f"/{name}_template.json"))
    assert summary["step"] == 4
    export = pp_to_hg(save, tmp_path / "hf", progress=False)
    source_template = (model_family_dir(name) / "chat_template.jinja").read_text()
    assert (export / "chat_template.jinja").read_text() == source_template
    assert json.loads((export / "generation_config.json").read_text())["eos_token_id"] == eos_ids(model_family_dir(name))
    tokenizer = AutoTokenizer.from_pretrained(export)
    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    prompts = ["What is pipeline parallelism?", {"type": "instruct", "instruct": "Name a colour."},
               {"rounds": [["ask", "Hi"], ["ans", "Hello!"], ["ask", "How are you?"]]}]
    pfile = tmp_path / "prompts.jsonl"
    pfile.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    out = tmp_path / "answers.jsonl"
    launch_ranks(REPO / "demo.py", "--model-path", save, "--pipeline-stages", 2, "--prompts-file", pfile, "--output", out,
                 "--greedy", "--max-new-tokens", 8, "--save-token-ids", timeout=600)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    stops = sorted(set(eos_ids(export)) | {tokenizer.eos_token_id})
    for row, item in zip(rows, read_prompts_file(str(pfile))):
        ids = list(tokenizer.apply_chat_template(item.messages, add_generation_prompt=True, tokenize=True, return_dict=False))
        assert row["token_ids"] == hf_greedy(model, ids, max_new=8, eos=stops)


def model_family_dir(name):
    from conftest import CONFIGS

    return CONFIGS[MODELS[name][0]]


def summary_of(runs, name):
    return next(r for r in runs[0][2]["train"] if r["config"].endswith(f"/{name}.json"))


def test_packed_sft_with_sliding_windows_equals_each_record_alone_in_hf(runs, model_dirs, tmp_path):
    """pack: true on Qwen2 with sliding-window layers (window 5): 3 SGD steps equal HF run on every
    record alone (the window and the segment mask both apply in each packed row)."""
    from test_train_parity import (PACK_SEQ, global_batches, hf_model, lm_data, max_diff, n_targets_per_record,
                                   per_record_loss, reference_train)

    hf, pp = model_dirs["qwen2_sliding"]
    summary = summary_of(runs, "pack_qwen2_sliding")
    data = lm_data(pp, seq=PACK_SEQ, pack=True)
    assert sum(int(data.train[i][0][2].max() > 1) for i in range(len(data.train))) >= len(data.train) // 2  # it packs
    ref = reference_train(hf_model(hf), global_batches(data.train, micro=2, accum=2), 3, SGD, accum=2,
                          loss=per_record_loss, n_targets=n_targets_per_record)
    got = exported_weights(runs[1] / "pack_qwen2_sliding", tmp_path / "hf")
    assert max_diff(got, ref.masters, keys=got.keys()) <= 1e-5
    # Without the segment masks (records attending to each other) the reference is far away.
    crossing = reference_train(hf_model(hf), global_batches(data.train, micro=2, accum=2), 3, SGD, accum=2)
    assert max_diff(got, crossing.masters, keys=got.keys()) > 1e-3
    torch.testing.assert_close(torch.tensor([loss for _, loss in summary["history"]]), torch.tensor(ref.losses),
                               rtol=0, atol=2e-6)


@pytest.mark.parametrize("name", ["rm_llama3", "rm_gemma3", "dpo_mistral_sliding", "dpo_gemma3", "ppo_llama3"])
def test_rm_dpo_and_ppo_recipes_run_on_the_families(runs, name):
    import math

    summary = summary_of(runs, name)
    assert summary["step"] == 2
    history = summary["history"]
    assert len(history) == 2 and all(math.isfinite(loss) for _, loss in history), history



@pytest.mark.parametrize("family", GRPO_FAMILIES)
def test_grpo_generates_with_the_weights_it_trains_on_the_families(runs, family):
    """Two GRPO steps with a reference: the generator's log-probs equal the training forward's (the KV-cached
    decoder and the pipeline's forward agree on the family's layers: q/k norms, sliding windows, scaled
    embeddings), the reference starts equal to the actor (KL 0), and the update is finite."""
    import math

    summary = summary_of(runs, f"grpo_{family}")
    assert summary["step"] == 2 and all(math.isfinite(loss) for _, loss in summary["history"])
    metrics = [m for _, m in summary["train_metrics"]]
    assert max(m["GRPO/logprob_gap"] for m in metrics) <= 1e-5, metrics
    assert metrics[0]["GRPO/kl"] == 0.0 and metrics[0]["GRPO/completions/mean_length"] > 0