"""Generation on the training pipeline (trainer/generation/decoding.py, trainer/generation/token_sampling.py): the sampling
functions equal transformers' processors; the generator's greedy tokens equal HF `generate` and its
log-probs HF's full forward, in one process and over 2 pipeline stages (LLaMA GQA, tied LLaMA, BLOOM;
ragged prompts; M = 1, 2, 3); seeded sampling does not depend on M or on the row order; rows stop
independently; forward_only returns every micro-batch's logits; SFT eval_samples and
`demo.py --pipeline-stages 2` work on real launches.

The multi-rank cases run in three launches: 2 ranks for every generator case and an SFT run
(tests/multirank/generate_runs.py), 4 ranks for P = 4 and P = 2 x D = 2 (same script), 2 for the demo.
"""
import json
import types

import pytest
import torch
from conftest import REPO, launch_ranks
from test_models import load_pipe
from transformers import AutoModelForCausalLM
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from trainer.generation.decoding import GenerationError, _place, generate
from trainer.generation.token_sampling import SamplingConfig, apply_repetition_penalty, choose_next, draw, row_seeds, warp

MAX_NEW = 10
SAMPLING = dict(greedy=False, temperature=0.8, top_k=50, top_p=0.9, repetition_penalty=1.2, seed=5)


def ragged_prompts(n_lengths=(7, 3, 12, 5, 9), seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 1000, (n,), generator=gen).tolist() for n in n_lengths]


def hf_greedy(hf, prompt, max_new=MAX_NEW, eos=None, **kw):
    """HF generate on one unpadded prompt; the answer up to and including the first stop id."""
    ids = torch.tensor([prompt])
    eos = hf.config.eos_token_id if eos is None else eos
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                          eos_token_id=eos, pad_token_id=0, **kw)
    answer = out[0, len(prompt):].tolist()
    stops = set(eos if isinstance(eos, list) else [eos])
    for k, token in enumerate(answer):
        if token in stops:
            return answer[:k + 1]
    return answer


def hf_logprobs(hf, prompt, answer) -> torch.Tensor:
    """log_softmax of HF's full forward over prompt + answer, at the answer's tokens (fp32)."""
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor([prompt + answer])).logits.float()
    lp = torch.log_softmax(logits, -1)[0, len(prompt) - 1:len(prompt) - 1 + len(answer)]
    return lp.gather(-1, torch.tensor(answer)[:, None]).squeeze(-1)


# ---------------------------------------------------------------------------------------------
# Sampling functions (one process, fast).

def random_logits(b=4, v=50, seed=0):
    return torch.randn(b, v, generator=torch.Generator().manual_seed(seed)) * 3


def test_repetition_penalty_matches_hf():
    logits = random_logits()
    seen_ids = torch.tensor([[1, 5, 5, 9], [0, 2, 3, 4], [7, 7, 7, 7], [10, 20, 30, 49]])
    seen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, seen_ids, True)
    expected = RepetitionPenaltyLogitsProcessor(1.3)(seen_ids, logits.clone())
    torch.testing.assert_close(apply_repetition_penalty(logits, seen, 1.3), expected, rtol=0, atol=0)
    assert apply_repetition_penalty(logits, seen, 1.0) is logits


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.0, 5, 1.0), (1.0, 0, 0.8), (0.6, 10, 0.9), (1.3, 1, 0.5)])
def test_warpers_match_hf_in_hf_order(temperature, top_k, top_p):
    logits = random_logits(seed=3)
    expected = logits.clone()
    ids = torch.zeros(4, 1, dtype=torch.long)
    if temperature != 1.0:
        expected = TemperatureLogitsWarper(temperature)(ids, expected)
    if top_k:
        expected = TopKLogitsWarper(top_k)(ids, expected)
    if top_p < 1.0:
        expected = TopPLogitsWarper(top_p)(ids, expected)
    got = warp(logits, SamplingConfig(greedy=False, temperature=temperature, top_k=top_k, top_p=top_p))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_draw_follows_the_distribution_and_never_picks_removed_tokens():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.25, 0.25, 0.0]]).repeat(20000, 1)
    u = torch.rand(20000, generator=torch.Generator().manual_seed(0))
    ids = draw(probs, u)
    counts = torch.bincount(ids, minlength=6).float() / len(ids)
    assert counts[[0, 2, 5]].sum() == 0
    torch.testing.assert_close(counts[[1, 3, 4]], torch.tensor([0.5, 0.25, 0.25]), rtol=0, atol=0.02)
    edge = draw(torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.5, 0.5]]), torch.tensor([0.0, 0.5]))
    assert edge.tolist() == [1, 2]


def test_choose_next_log_probs_raw_and_sampling():
    logits = random_logits(seed=7)
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    cfg = SamplingConfig(greedy=False, temperature=0.5, top_k=5)
    ids, raw, samp = choose_next(logits, None, cfg, gens)
    torch.testing.assert_close(raw, torch.log_softmax(logits, -1).gather(1, ids[:, None]).squeeze(1))
    torch.testing.assert_close(samp, torch.log_softmax(warp(logits, cfg), -1).gather(1, ids[:, None]).squeeze(1))
    _, raw_k, samp_k = choose_next(logits, None, SamplingConfig(greedy=False, top_k=5), gens)
    assert bool((samp_k > raw_k).all())  # top-k alone renormalises over fewer tokens
    g_ids, g_raw, g_samp = choose_next(logits, None, SamplingConfig(), [])
    assert g_ids.tolist() == logits.argmax(-1).tolist() and g_samp.abs().sum() == 0
    # Each row's draw depends only on its own generator.
    again, _, _ = choose_next(logits[[2]], None, cfg, [torch.Generator().manual_seed(2)])
    assert again.item() == ids[2].item()


def test_row_seeds_follow_the_prompt_not_its_position():
    a, b = [5, 6, 7], [8, 9]
    s = row_seeds(0, [a, b, a])
    assert s[0] != s[2] and len(set(s)) == 3  # a repeated prompt gets a new stream
    assert row_seeds(0, [b, a, a]) == [s[1], s[0], s[2]]
    assert row_seeds(1, [a])[0] != s[0]


def test_sampling_config_errors_say_what_to_do():
    for bad, words in [(dict(greedy=False, temperature=0.0), "temperature must be > 0"), (dict(top_k=-1), "top_k must be >= 0"),
                       (dict(top_p=0.0), "top_p must be in (0, 1]"), (dict(repetition_penalty=0.0), "repetition_penalty must be > 0")]:
        with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
            SamplingConfig(**bad).check()


# ---------------------------------------------------------------------------------------------
# The generator in one process (P = 1): cache handling, positions, masks, alibi, stopping.

@pytest.fixture(scope="module")
def pipes(tiny_hf):
    rope = {"rope_type": "linear", "factor": 2.0, "rope_theta": 50000.0}
    dirs = {"llama": tiny_hf("llama", False), "llama_tied": tiny_hf("llama", True), "bloom": tiny_hf("bloom"),
            "llama_rope": tiny_hf("llama", False, rope_parameters=rope)}
    return {name: load_pipe(d) for name, d in dirs.items()}


@pytest.mark.parametrize("name", ["llama", "llama_tied", "bloom", "llama_rope"])
def test_one_process_greedy_equals_hf_generate_and_log_probs_hf_forward(pipes, name):
    hf, pipe = pipes[name]
    config = pipe.layers[1].config
    prompts = ragged_prompts()
    expected = [hf_greedy(hf, p) for p in prompts]
    for m in (1, 2, 3):
        out = generate(pipe, config, prompts, max_new_tokens=MAX_NEW, n_micro=m)
        assert [out.answer(i) for i in range(len(prompts))] == expected, m
    nocache = generate(pipe, config, prompts, max_new_tokens=MAX_NEW, n_micro=2, use_cache=False)
    assert [nocache.answer(i) for i in range(len(prompts))] == expected
    for i, p in enumerate(prompts):
        n = len(expected[i])
        torch.testing.assert_close(out.logprobs[i, :n], hf_logprobs(hf, p, expected[i]), rtol=0, atol=1e-5)
    # Layout: prompts right-aligned, answers from prompt_len, masks on the real tokens.
    assert out.prompt_len == max(map(len, prompts)) and out.ids.shape[1] == out.prompt_len + MAX_NEW
    for i, p in enumerate(prompts):
        assert out.ids[i, out.prompt_len - len(p):out.prompt_len].tolist() == p
        assert int(out.attention_mask[i].sum()) == len(p) + len(expected[i]) and int(out.answer_mask[i].sum()) == len(expected[i])


def test_one_process_repetition_penalty_equals_hf(pipes):
    hf, pipe = pipes["llama"]
    prompts = ragged_prompts()
    out = generate(pipe, pipe.layers[1].config, prompts, max_new_tokens=MAX_NEW, n_micro=2,
                   sampling=SamplingConfig(repetition_penalty=1.3))
    assert [out.answer(i) for i in range(5)] == [hf_greedy(hf, p, repetition_penalty=1.3) for p in prompts]
    assert [out.answer(i) for i in range(5)] != [hf_greedy(hf, p) for p in prompts]


def test_one_process_sampling_is_seeded_and_independent_of_micro_batches_and_order(pipes):
    _, pipe = pipes["llama"]
    config, prompts = pipe.layers[1].config, ragged_prompts()
    cfg = SamplingConfig(**SAMPLING)
    runs = [generate(pipe, config, prompts, max_new_tokens=MAX_NEW, n_micro=m, sampling=cfg) for m in (1, 2, 3)]
    answers = [[r.answer(i) for i in range(5)] for r in runs]
    assert answers[0] == answers[1] == answers[2]
    reversed_run = generate(pipe, config, prompts[::-1], max_new_tokens=MAX_NEW, n_micro=2, sampling=cfg)
    assert [reversed_run.answer(i) for i in range(5)][::-1] == answers[0]
    other_seed = generate(pipe, config, prompts, max_new_tokens=MAX_NEW, sampling=SamplingConfig(**{**SAMPLING, "seed": 6}))
    assert [other_seed.answer(i) for i in range(5)] != answers[0]
    assert answers[0] != [r for r in [generate(pipe, config, prompts, max_new_tokens=MAX_NEW).answer(i) for i in range(5)]]


def test_one_process_rows_stop_independently_and_the_batch_ends_when_all_have(pipes):
    hf, pipe = pipes["llama"]
    config, prompts = pipe.layers[1].config, ragged_prompts()
    base = generate(pipe, config, prompts, max_new_tokens=MAX_NEW, n_micro=2)
    stop = sorted({base.answer(0)[3], base.answer(2)[5]})
    out = generate(pipe, config, prompts, max_new_tokens=MAX_NEW, n_micro=2, stop_ids=stop, pad_id=0)
    expected = [hf_greedy(hf, p, eos=stop) for p in prompts]
    assert [out.answer(i) for i in range(5)] == expected
    assert [out.finish_reason[i] == "stop" for i in range(5)] == [a[-1] in stop for a in expected]
    assert len(out.answer(0)) <= 4 and len(out.answer(2)) <= 6 and out.ids.shape[1] == out.prompt_len + MAX_NEW
    for i in range(5):  # after a row's stop token: pad ids, masks 0
        n = len(expected[i])
        assert out.ids[i, out.prompt_len + n:].eq(0).all() and out.attention_mask[i, out.prompt_len + n:].eq(0).all()
    every_first = sorted({base.answer(i)[0] for i in range(5)})
    done = generate(pipe, config, prompts, max_new_tokens=MAX_NEW, n_micro=2, stop_ids=every_first)
    assert done.n_new.tolist() == [1] * 5 and done.ids.shape[1] == done.prompt_len + 1


def test_one_process_clear_errors(pipes):
    _, pipe = pipes["llama"]
    config = pipe.layers[1].config
    with pytest.raises(GenerationError, match="max_new_tokens must be an integer >= 1"):
        generate(pipe, config, [[5, 6]], max_new_tokens=0)
    with pytest.raises(GenerationError, match="prompt 1 has 600 tokens.*context of 512: shorten the prompt or lower max_new_tokens"):
        generate(pipe, config, [[5, 6], [7] * 600], max_new_tokens=4)
    with pytest.raises(GenerationError, match="prompt 0 is empty"):
        generate(pipe, config, [[]], max_new_tokens=4)
    assert generate(pipe, config, [], max_new_tokens=4).ids.shape == (0, 0)


def test_topology_not_matching_the_world_is_an_error():
    class Topo:
        def get_dim(self, axis):
            return {"pipe": 2, "data": 2}[axis]

    module = types.SimpleNamespace(topology=lambda: Topo())
    with pytest.raises(GenerationError, match=r"2 stages x 2 data-parallel replicas = 4 ranks, but the world has 1"):
        _place(module)


# ---------------------------------------------------------------------------------------------
# 2 ranks: pipeline stages, data-parallel replicas, engine, SFT eval_samples, demo.

def launch(script, *args, ranks=2, timeout=1200):
    return launch_ranks(script, *args, ranks=ranks, timeout=timeout)


@pytest.fixture(scope="module")
def model_dirs(tiny_hf, tmp_path_factory):
    from convert.hg_to_pp import hg_to_pp

    tmp = tmp_path_factory.mktemp("gen_models")
    hf = {"llama": tiny_hf("llama", False), "llama_tied": tiny_hf("llama", True), "bloom": tiny_hf("bloom")}
    return {name: (d, hg_to_pp(d, tmp / name, progress=False)) for name, d in hf.items()}


@pytest.fixture(scope="module")
def runs(model_dirs, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gen_runs")
    sft = {
        "model_path": str(model_dirs["llama"][1]), "save_path": str(tmp / "sft"), "data_path": str(REPO / "data" / "samples" / "mixed.json"),
        "max_seq_len": 64, "train_steps": 3, "seed": 7, "resume": "never", "eval_fraction": 0.3, "eval_interval": 2,
        "eval_samples": {"n": 2, "max_new_tokens": 6},
        "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [2, 1]}, "parts": "auto"},
        "train_batch_size": 4, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
        "steps_per_print": 10**6, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
    }
    (tmp / "sft.json").write_text(json.dumps(sft))
    spec = {"models": {name: str(pp) for name, (_, pp) in model_dirs.items()}, "prompts": ragged_prompts(),
            "max_new": MAX_NEW, "sft_config": str(tmp / "sft.json")}
    (tmp / "spec.json").write_text(json.dumps(spec))
    proc = launch(REPO / "tests" / "multirank" / "generate_runs.py", "--spec", tmp / "spec.json", "--out", tmp / "out.json")
    return json.loads((tmp / "out.json").read_text()), tmp, proc


@pytest.fixture(scope="module")
def hf_models(model_dirs):
    return {name: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval() for name, (d, _) in model_dirs.items()}


@pytest.mark.multirank
@pytest.mark.parametrize("name", ["llama", "llama_tied", "bloom"])
def test_two_stages_greedy_equals_hf_and_log_probs_hf_forward(runs, hf_models, name):
    results, _, _ = runs
    hf, prompts = hf_models[name], ragged_prompts()
    expected = [hf_greedy(hf, p) for p in prompts]
    keys = ["greedy_m1", "greedy_m2", "greedy_nocache"] + (["greedy_m3"] if name == "llama" else [])
    for key in keys:
        r = results[f"{name}/{key}"]
        assert r["answers"] == expected, key
        assert r["same_ids_on_every_rank"], key  # both stages hold the ids and masks
    r = results[f"{name}/greedy_m2"]
    for i, p in enumerate(prompts):
        n = len(expected[i])
        torch.testing.assert_close(torch.tensor(r["logprobs"][i][:n]), hf_logprobs(hf, p, expected[i]), rtol=0, atol=1e-5)


@pytest.mark.multirank
def test_two_stages_sampling_reproducible_and_independent_of_m_and_order(runs):
    results, _, _ = runs
    base = results["llama/sample_m1"]["answers"]
    assert results["llama/sample_m1_again"]["answers"] == base
    assert results["llama/sample_m2"]["answers"] == base
    assert results["llama/sample_m2_reversed"]["answers"][::-1] == base
    assert base != results["llama/greedy_m1"]["answers"]


@pytest.mark.multirank
def test_two_stages_penalty_stop_ids_and_errors(runs, hf_models):
    results, _, _ = runs
    hf, prompts = hf_models["llama"], ragged_prompts()
    assert results["llama/greedy_penalty"]["answers"] == [hf_greedy(hf, p, repetition_penalty=1.3) for p in prompts]
    stop = results["stop_ids"]
    r = results["llama/greedy_stop"]
    assert r["answers"] == [hf_greedy(hf, p, eos=stop) for p in prompts]
    assert r["finish"][0] == "stop" and r["finish"][2] == "stop" and "length" in r["finish"]
    every = results["llama/greedy_all_stop"]
    assert [len(a) for a in every["answers"]] == [1] * 5 and every["width"] == every["prompt_len"] + 1
    assert "max_new_tokens must be an integer >= 1" in results["errors"]["max_new_0"]
    assert "more than the context of 12" in results["errors"]["too_long"]


@pytest.mark.multirank
def test_two_stages_bf16_runs_and_follows_fp32(runs):
    results, _, _ = runs
    bf16, fp32 = results["llama/bf16_greedy_m2"], results["llama/greedy_m2"]
    assert all(len(a) == MAX_NEW for a in bf16["answers"])
    assert all(x == x and x <= 0 for row in bf16["logprobs"] for x in row)
    agree = sum(a[:3] == b[:3] for a, b in zip(bf16["answers"], fp32["answers"]))
    assert agree >= 3, (bf16["answers"], fp32["answers"])


@pytest.mark.multirank
def test_two_data_parallel_replicas_generate_their_own_shares(runs, hf_models):
    results, _, _ = runs
    hf, prompts = hf_models["llama"], ragged_prompts()
    shares = results["llama/dp2"]["shares"]
    assert shares[0] == [hf_greedy(hf, p) for p in prompts[0::2]]
    assert shares[1] == [hf_greedy(hf, p) for p in prompts[1::2]]


@pytest.mark.multirank
def test_forward_only_returns_every_micro_batch_equal_to_hf_and_generation_uses_the_engine_module(runs, hf_models):
    results, _, _ = runs
    hf, prompts = hf_models["llama"], ragged_prompts()
    r = results["llama/forward_only"]
    ids, mask = torch.tensor(r["ids"]), torch.tensor(r["mask"])
    assert len(r["logits"]) == 2
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).logits
    for k in range(2):
        got = torch.tensor(r["logits"][k])
        real = mask[2 * k:2 * k + 2].bool()
        torch.testing.assert_close(got[real], expected[2 * k:2 * k + 2][real], rtol=0, atol=1e-5)
    assert r["engine_answers"] == [hf_greedy(hf, p, max_new=4) for p in prompts]
    assert r["module_is_training_after"] is True  # generation restored the engine's train mode


@pytest.mark.multirank
def test_sft_eval_samples_written_with_the_step(runs):
    results, tmp, proc = runs
    assert results["sft"]["step"] == 3 and [s for s, _ in results["sft"]["evals"]] == [2, 3]
    lines = [json.loads(l) for l in (tmp / "sft" / "eval_samples.jsonl").read_text().splitlines()]
    assert [(l["step"], l["index"]) for l in lines] == [(2, 0), (2, 1), (3, 0), (3, 1)]
    for line in lines:
        assert set(line) == {"step", "index", "prompt", "response", "reference", "tokens", "finish_reason"}
        assert 1 <= line["tokens"] <= 6 and line["prompt"] and line["reference"]
    assert "[eval sample, step 2]" in proc.stdout


@pytest.mark.multirank
def test_demo_pipeline_stages_2_gives_hf_greedy_tokens(model_dirs, hf_models, tmp_path):
    from inference.inputs import read_prompts_file
    from inference.loading import load_tokenizer

    hf_dir, pp = model_dirs["llama"]
    prompts = ["What is the capital of France?", {"type": "instruct", "instruct": "Name a colour.", "id": 7},
               {"rounds": [["ask", "Hi"], ["ans", "Hello!"], ["ask", "How are you?"]]}]
    pfile = tmp_path / "prompts.jsonl"
    pfile.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    out = tmp_path / "answers.jsonl"
    proc = launch(REPO / "demo.py", "--model-path", pp, "--pipeline-stages", 2, "--prompts-file", pfile, "--output", out,
                  "--greedy", "--max-new-tokens", 8, "--save-token-ids")
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(rows) == 3 and rows[1]["id"] == 7 and "pipelined generation (2 stages x 1 replica" in proc.stderr
    tokenizer = load_tokenizer(pp, training_template=True)
    eos = sorted({tokenizer.eos_token_id, hf_models["llama"].generation_config.eos_token_id})
    for row, item in zip(rows, read_prompts_file(str(pfile))):  # rendered as demo renders them
        ids = list(tokenizer.apply_chat_template(item.messages, add_generation_prompt=True, tokenize=True, return_dict=False))
        expected = hf_greedy(hf_models["llama"], ids, max_new=8, eos=eos)
        assert row["token_ids"] == expected and row["tokens"] == len(expected)
        assert row["finish_reason"] == ("eos" if expected[-1] in eos else "length")


@pytest.mark.multirank
def test_four_ranks_middle_stages_and_replicas_equal_hf_and_the_two_rank_samples(model_dirs, hf_models, runs, tmp_path):
    """P = 4 (stages 1 and 2 get the ids from the last stage to stop in step) and P = 2 x D = 2: greedy
    tokens equal HF's, sampled ones equal the 2-stage run's (sampling does not depend on the layout)."""
    two_rank, _, _ = runs
    spec = {"models": {name: str(pp) for name, (_, pp) in model_dirs.items()}, "prompts": ragged_prompts(),
            "max_new": MAX_NEW, "layouts": True}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    launch(REPO / "tests" / "multirank" / "generate_runs.py", "--spec", tmp_path / "spec.json", "--out", tmp_path / "out.json",
           ranks=4)
    results = json.loads((tmp_path / "out.json").read_text())
    for name in ("llama", "bloom"):
        expected = [hf_greedy(hf_models[name], p) for p in ragged_prompts()]
        for stages, parts_len in ((4, 4), (2, 2)):
            greedy, sample = results[f"{name}/p{stages}/greedy"], results[f"{name}/p{stages}/sample"]
            assert len(greedy["parts"]) == parts_len and greedy["stages_agree"] and sample["stages_agree"]
            assert greedy["answers"] == expected, (name, stages)
            if name == "llama":
                assert sample["answers"] == two_rank["llama/sample_m1"]["answers"], stages


def test_eval_samples_config_values():
    from trainer.generation.eval_samples import EvalSamples, config_problems

    assert config_problems(4) == [] and config_problems({"n": 2, "max_new_tokens": 8, "greedy": False, "temperature": 0.7}) == []
    assert EvalSamples.from_config(3).sampling.greedy and EvalSamples.from_config(3).max_new_tokens == 64
    assert not EvalSamples.from_config({"n": 1, "greedy": False}).sampling.greedy
    assert "eval_samples must not be negative" in config_problems(-1)[0]
    assert "unknown keys ['tempreature']" in config_problems({"n": 1, "tempreature": 0.5})[0]
    assert "max_new_tokens must be an integer >= 1" in config_problems({"n": 1, "max_new_tokens": 0})[0]
    assert "temperature must be > 0" in config_problems({"n": 1, "greedy": False, "temperature": 0})[0]
    assert "must be a number of prompts or an object" in config_problems(True)[0]
