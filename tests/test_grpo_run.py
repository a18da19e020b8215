"""A real GRPO run (trainer/recipes/grpo.py), one launch on 2 CPU ranks (gloo), 2 pipeline stages: a
toy verifiable task. The actor is the random tiny LLaMA with a scaled LM head (tests/ppo_fixtures.py:
its answers come from a few dozen likely tokens); a prompt record's `marker` column names a token the
actor samples for a few percent of its answer tokens, and a reward function from a file counts that
token in `completion_ids`. The columns reach the function through the whole data path (unified prompt
records -> PromptDataset.record -> the rank-0 broadcast -> the replica's share), the reference is built
(kl_coef > 0) and starts equal to the actor (KL 0, the generator's and the training forward's log-probs
equal), and the reward rises. In the same launch, one step of 1 stage x 2 replicas and one of 2 stages
x 1 replica on a rollout that is one minibatch: the same rewards, losses and updated weights (groups stay
whole on a replica; the DAPO token normalisation spans both replicas). Last in that launch, a 3-step run on
2 replicas with DAPO's dynamic sampling (a 0/1 reward, max_refill_rounds) after an uninterrupted twin: it
is SIGKILLed during its step-3 save (--kill-last-at-step) and a second launch resumes it (resume "auto").
Also in the first launch: two steps scored by a reward model (tests/ppo_fixtures.py's marker model) and
two reward functions together, weighted: the logged reward is the weighted sum of the logged
per-function means and the reward model's score."""
import json
from pathlib import Path

import pytest
import torch
from conftest import REPO
from conftest import launch_ranks as launch

SEQ, NEW, STEPS = 48, 16, 8
RESUME_STEPS, KILL_AT = 3, 3  # the killed run saved step 2, dies in the (final) save of step 3
REFILL = 2  # DAPO's dynamic sampling in the resumed run: at most 2 more generation rounds per step
RM_WEIGHT, FUNCTION_WEIGHTS = 2.0, (0.5, 0.25)  # the reward model's score and marker_count, overlong
ADAMW = {"type": "AdamW", "params": {"lr": 3e-5, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.0, "torch_adam": True}}
REWARD_FILE = """
def marker_count(prompts, completions, completion_ids, marker, **kwargs):
    return [float(sum(1 for t in ids if t == int(m))) for ids, m in zip(completion_ids, marker)]


def marker_early(prompts, completions, completion_ids, marker, **kwargs):  # 0 or 1: many groups without a signal
    return [float(int(m) in ids[:4]) for ids, m in zip(completion_ids, marker)]
"""


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory):
    from ppo_fixtures import choose_marker, marker_reward_hf, peaked_actor_hf
    from transformers import AutoTokenizer

    from convert.hg_to_pp import hg_to_pp
    from data.dataset import build_dataset
    from models.random_init import save_random_model

    tmp = tmp_path_factory.mktemp("grpo")
    base = save_random_model(REPO / "configs" / "tiny-llama", tmp / "base-hf", seed=0, tie_word_embeddings=False)
    actor_hf = peaked_actor_hf(base, tmp / "actor-hf")
    tok = AutoTokenizer.from_pretrained(actor_hf)
    prompts_file = REPO / "data" / "samples" / "rlhf_prompts.jsonl"
    built = build_dataset(str(prompts_file), tok, SEQ, kind="prompt")
    prompts = [built.train[i][0][built.train[i][1].bool()].tolist() for i in range(16)]
    marker, _ = choose_marker(actor_hf, prompts, {tok.eos_token_id, tok.bos_token_id}, NEW, share=0.05)
    data = tmp / "prompts.jsonl"
    data.write_text("".join(json.dumps({**json.loads(line), "marker": str(marker)}) + "\n"
                            for line in prompts_file.read_text().splitlines()))
    (tmp / "toy_rewards.py").write_text(REWARD_FILE)
    cfg = {
        "stage": "grpo", "actor_path": str(hg_to_pp(actor_hf, tmp / "actor-pp", progress=False)),
        "save_path": str(tmp / "run"), "data_path": str(data), "max_seq_len": SEQ, "train_steps": STEPS, "seed": 3,
        "resume": "never", "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [2, 1]}, "parts": [3, 4]},
        "train_batch_size": 16, "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 2,
        "gradient_clipping": 1.0, "steps_per_print": 10**6, "optimizer": ADAMW,
        "csv_monitor": {"enabled": True, "output_path": str(tmp / "logs"), "job_name": "grpo"},
        "grpo": {"rollout_batch_size": 4, "n_samples_per_prompt": 8, "max_new_tokens": NEW, "kl_coef": 0.02,
                 "epsilon_high": 0.28, "reward_funcs": [f"{tmp / 'toy_rewards.py'}:marker_count"]},
    }
    one_step = {**cfg, "train_steps": 1, "csv_monitor": {"enabled": False},
                "grpo": {**cfg["grpo"], "rollout_batch_size": 2, "num_iterations": 2}}  # 2 prompts x 8 = 16 rows: one
    # minibatch, trained twice: the second pass has ratios != 1, so a non-zero loss and clipping to compare
    rm_pp = hg_to_pp(marker_reward_hf(base, tmp / "rm-hf", marker, pad_id=0), tmp / "rm-pp", progress=False)
    weighted = {**one_step, "save_path": str(tmp / "rm_and_functions"), "train_steps": 2, "reward_path": str(rm_pp),
                "grpo": {**one_step["grpo"], "num_iterations": 1, "reward_model_weight": RM_WEIGHT,
                         "reward_funcs": [*cfg["grpo"]["reward_funcs"], "overlong"],
                         "reward_weights": list(FUNCTION_WEIGHTS), "reward_kwargs": {"overlong": {"buffer": 12}}}}
    two_replicas = {"model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [1, 2]}, "parts": [7]}}
    # RESUME_STEPS steps saved every 2 on 2 replicas (2 prompts x 4 answers each, two minibatches, two passes), with
    # DAPO's dynamic sampling: a 0/1 reward, groups without a signal refilled by up to REFILL more rounds
    resumable = {**cfg, **two_replicas, "train_steps": RESUME_STEPS, "save_interval": 2, "csv_monitor": {"enabled": False},
                 "train_batch_size": 8, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
                 "grpo": {**cfg["grpo"], "n_samples_per_prompt": 4, "num_iterations": 2, "filter_zero_std_groups": True,
                          "max_refill_rounds": REFILL, "reward_funcs": [f"{tmp / 'toy_rewards.py'}:marker_early"]}}
    layouts = {"toy": cfg, "rm_and_functions": weighted,
               "two_stages": {**one_step, "save_path": str(tmp / "two_stages")},
               "two_replicas": {**one_step, **two_replicas, "save_path": str(tmp / "two_replicas"),
                                "gradient_accumulation_steps": 1},
               "refill_two_stages": {**resumable, "save_path": str(tmp / "refill_two_stages"), "train_steps": 1,
                                     "gradient_accumulation_steps": 2, "model_topo": cfg["model_topo"]},
               "uninterrupted": {**resumable, "save_path": str(tmp / "uninterrupted")},
               "killed": {**resumable, "save_path": str(tmp / "killed"), "resume": "auto"}}  # last: the launch dies in it
    configs = []
    for name, c in layouts.items():
        configs += ["--config", str(tmp / f"{name}.json")]
        (tmp / f"{name}.json").write_text(json.dumps(c, indent=1))
    out, resumed = tmp / "results.jsonl", tmp / "resumed.jsonl"
    script = str(REPO / "tests" / "multirank" / "train_runs.py")
    killed = launch(script, *configs, "--out", str(out), "--kill-last-at-step", str(KILL_AT), check=False)
    runs = dict(zip(layouts, (json.loads(line) for line in out.read_text().splitlines())))
    assert killed.returncode != 0 and "killed" not in runs, f"the run was not killed:\n{killed.stderr[-3000:]}"
    latest_after_kill = (tmp / "killed" / "latest").read_text()
    launch(script, "--config", str(tmp / "killed.json"), "--out", str(resumed))  # resume "auto": the same config again
    runs["killed"] = {**json.loads(resumed.read_text()), "latest_after_kill": latest_after_kill}
    return runs, tmp


def metric(summary, name: str) -> list[float]:
    return [m[name] for _, m in summary["train_metrics"]]


@pytest.mark.multirank
def test_grpo_toy_reward_rises(grpo_run):
    runs, tmp = grpo_run
    summary = runs["toy"]
    assert summary["step"] == STEPS and summary["tags"] == [f"global_step{STEPS}"]
    rewards = metric(summary, "GRPO/reward_mean")
    start, end = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert end > start + 1.0 and end > 1.5 * start, rewards
    assert rewards == metric(summary, "GRPO/rewards/marker_count/mean")  # one function, weight 1, always applies
    assert metric(summary, "GRPO/kl")[0] == 0.0  # the reference is the actor's start
    assert max(metric(summary, "GRPO/logprob_gap")) <= 1e-5  # generation and the training forward: the same weights
    assert 0 < metric(summary, "GRPO/kl")[-1] < 2.0
    written = {p.stem for p in Path(tmp / "logs" / "grpo").glob("*.csv")}
    assert {"GRPO_reward_mean", "GRPO_frac_reward_zero_std", "GRPO_clip_ratio_region_mean"} <= written, written


@pytest.mark.multirank
def test_a_reward_model_and_reward_functions_weighted_together(grpo_run):
    """GRPO/reward_mean = sum_f w_f GRPO/rewards/<f>/mean + reward_model_weight x GRPO/rm_score_mean (the RM's
    raw score), each function applying to every row; every term is non-zero."""
    runs, _ = grpo_run
    summary = runs["rm_and_functions"]
    assert summary["step"] == 2
    for _, m in summary["train_metrics"]:
        parts = (FUNCTION_WEIGHTS[0] * m["GRPO/rewards/marker_count/mean"], FUNCTION_WEIGHTS[1] * m["GRPO/rewards/overlong/mean"],
                 RM_WEIGHT * m["GRPO/rm_score_mean"])
        assert m["GRPO/reward_mean"] == pytest.approx(sum(parts), rel=1e-6, abs=1e-9), (m, parts)
    for name in ("GRPO/rewards/marker_count/mean", "GRPO/rewards/overlong/mean", "GRPO/rm_score_mean"):
        assert any(m[name] != 0 for _, m in summary["train_metrics"]), name


@pytest.mark.multirank
def test_two_replicas_take_the_same_first_step_as_two_stages(grpo_run):
    runs, tmp = grpo_run
    a, b = runs["two_stages"]["train_metrics"][0][1], runs["two_replicas"]["train_metrics"][0][1]
    assert a["GRPO/completions/mean_length"] == b["GRPO/completions/mean_length"]
    assert a["GRPO/reward_mean"] == b["GRPO/reward_mean"] and a["GRPO/frac_reward_zero_std"] < 1
    for key in ("GRPO/reward_std", "GRPO/loss", "GRPO/policy_loss", "GRPO/entropy", "GRPO/clip_ratio/region_mean"):
        assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    # gradients summed over replicas in another order: AdamW's first step amplifies the rounding (tests/test_ppo.py)
    for f in sorted((tmp / "two_stages" / "global_step1").glob("layer_*-model_states.pt")):
        x, y = torch.load(f, weights_only=True), torch.load(tmp / "two_replicas" / "global_step1" / f.name, weights_only=True)
        assert max((x[k] - y[k]).abs().max().item() for k in x) <= 2e-5, f.name


@pytest.mark.multirank
def test_killed_during_save_resumes_exactly(grpo_run):
    """SIGKILLed after DeepSpeed wrote step 3's files but before `latest` moved: rerun with resume "auto",
    it takes up at step 2 (the prompt sampler's position after every refill round, the metrics so far, the
    optimizer) and ends with the uninterrupted run's weights and per-step metrics."""
    runs, tmp = grpo_run
    want, got = runs["uninterrupted"], runs["killed"]
    assert got["latest_after_kill"] == "global_step2"
    assert got["step"] == want["step"] == RESUME_STEPS and got["tags"] == want["tags"]
    state = json.loads((tmp / "killed" / f"global_step{RESUME_STEPS}" / "trainer_state.json").read_text())
    assert [s for s, _ in state["train_metrics"]] == [s for s, _ in got["train_metrics"]] == list(range(1, RESUME_STEPS + 1))
    assert got["history"] == want["history"]
    keys = [k for k in want["train_metrics"][0][1] if not k.startswith("GRPO/time_") and k != "GRPO/gen_tokens_per_s"]
    for (_, a), (_, b) in zip(want["train_metrics"], state["train_metrics"]):
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}
    assert len({m["GRPO/reward_mean"] for _, m in want["train_metrics"]}) > 1  # the steps differ: not one step repeated
    for f in sorted((tmp / "uninterrupted" / f"global_step{RESUME_STEPS}").glob("layer_*-model_states.pt")):
        x, y = torch.load(f, weights_only=True), torch.load(tmp / "killed" / f"global_step{RESUME_STEPS}" / f.name, weights_only=True)
        assert max((x[k] - y[k]).abs().max().item() for k in x) <= 1e-6, f.name


@pytest.mark.multirank
def test_dynamic_sampling_trains_on_groups_with_a_signal(grpo_run):
    """max_refill_rounds on 2 replicas: first rounds with groups whose 0/1 rewards are all equal get further
    rounds until both replicas' groups have a signal; then every trained group has a std >= 0.5 (a group of
    4 rewards in {0, 1} that are not all equal), so the mean group std is too."""
    runs, _ = grpo_run
    steps = [m for _, m in runs["uninterrupted"]["train_metrics"]]
    assert any(m["GRPO/frac_reward_zero_std"] > 0 and m["GRPO/num_gen_batches"] > 1 for m in steps), steps
    for m in steps:  # here one more round always found enough signal groups for both replicas
        assert m["GRPO/frac_reward_zero_std_after_refill"] == 0 and m["GRPO/reward_std"] >= 0.5, m
        assert m["GRPO/num_gen_batches"] == (1 if m["GRPO/frac_reward_zero_std"] == 0 else 2), m
    # generated tokens/s counts every round's answers: more tokens than the trained batch's when a round was added
    rows = 2 * 2 * 4  # 2 replicas x 2 prompts x 4 answers
    for m in steps:
        generated = m["GRPO/gen_tokens_per_s"] * m["GRPO/time_generate_s"]
        trained = m["GRPO/completions/mean_length"] * rows
        assert generated == pytest.approx(trained, rel=1e-9) if m["GRPO/num_gen_batches"] == 1 else generated > trained, m


@pytest.mark.multirank
def test_dynamic_sampling_on_two_stages_feeds_the_rows_it_chose(grpo_run):
    """The refill's choice, made from the rewards on the last stage, reaches the first stage (which feeds
    the ids): the generator's log-probs (last stage) and the training forward's of the fed rows agree, and
    the step trains on signal groups only. (Which groups fill a replica's slots depends on the layout: each
    replica refills from its own share, so no equality with the 2-replica run beyond the first round.)"""
    runs, _ = grpo_run
    a, b = runs["refill_two_stages"]["train_metrics"][0][1], runs["uninterrupted"]["train_metrics"][0][1]
    assert a["GRPO/frac_reward_zero_std"] == b["GRPO/frac_reward_zero_std"] > 0  # the same first round
    assert a["GRPO/num_gen_batches"] == 2 and a["GRPO/frac_reward_zero_std_after_refill"] == 0
    assert a["GRPO/reward_std"] >= 0.5 and a["GRPO/logprob_gap"] <= 1e-5
