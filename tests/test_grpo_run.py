"""A real GRPO run (trainer/recipes/grpo.py), one launch on 2 CPU ranks (gloo), 2 pipeline stages: a
toy verifiable task. The actor is the random tiny LLaMA with a scaled LM head (tests/ppo_fixtures.py:
its answers come from a few dozen likely tokens); a prompt record's `marker` column names a token the
actor samples for a few percent of its answer tokens, and a reward function from a file counts that
token in `completion_ids`. The columns reach the function through the whole data path (unified prompt
records -> PromptDataset.record -> the rank-0 broadcast -> the replica's share), the reference is built
(kl_coef > 0) and starts equal to the actor (KL 0, the generator's and the training forward's log-probs
equal), and the reward rises."""
import json
from pathlib import Path

import pytest
from conftest import REPO
from conftest import launch_ranks as launch

SEQ, NEW, STEPS = 48, 16, 8
ADAMW = {"type": "AdamW", "params": {"lr": 3e-5, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.0, "torch_adam": True}}
REWARD_FILE = """
def marker_count(prompts, completions, completion_ids, marker, **kwargs):
    return [float(sum(1 for t in ids if t == int(m))) for ids, m in zip(completion_ids, marker)]
"""


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory):
    from ppo_fixtures import choose_marker, peaked_actor_hf
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
    config = tmp / "grpo.json"
    config.write_text(json.dumps(cfg, indent=1))
    out = tmp / "results.jsonl"
    launch(str(REPO / "tests" / "multirank" / "train_runs.py"), "--config", str(config), "--out", str(out))
    return json.loads(out.read_text().splitlines()[0]), tmp


def metric(summary, name: str) -> list[float]:
    return [m[name] for _, m in summary["train_metrics"]]


@pytest.mark.multirank
def test_grpo_toy_reward_rises(grpo_run):
    summary, tmp = grpo_run
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
