"""PPO stage (trainer/recipes/ppo.py, trainer/rl/ppo_losses.py, trainer/rl/rollout.py, trainer/rl/ppo_options.py).

Pure functions (the math itself: tests/test_ppo_math.py): the loss_fns against sums written out here
token by token, their normalisation over micro-batches, the fixed-width rollout layout, the prompt
sampler's resume, config validation. Real runs (CPU, gloo), three launches in all:
  A (tests/multirank/train_runs.py, several configs): a toy task (a hand-built reward model that
    scores the share of a marker token, tests/ppo_fixtures.py): step 1 (reference = actor) has KL 0
    and a generation / training-forward log-prob gap <= 1e-5, the reward rises while the KL stays
    bounded, every PPO/ metric is in the CSV monitor, the exports load in HF and the critic's
    export scores as the pipeline does; 1 stage x 2 replicas takes the same first step as 2 stages
    x 1 replica; an uninterrupted 6-step run with every option on; a run scored by a reward function
    alone (no reward model built), its records' column reaching it through the data path.
  B, C: the same 6-step run SIGKILLed during its step-4 save, rerun: it resumes from step 2 and ends
    with the uninterrupted run's actor and critic weights and metrics.
"""
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import REPO
from conftest import launch_ranks as launch

from trainer.config import ConfigError
from trainer.recipes import load_config
from trainer.recipes import validate_config as validate
from trainer.rl.ppo_losses import ACTOR_STATS, ActorLoss, CriticLoss
from trainer.rl.ppo_options import PPOOptions
from trainer.rl.rollout import PromptSampler, fixed_width_rollout

PREFS = str(REPO / "data" / "samples" / "preferences.jsonl")
SEQ, NEW = 48, 16


# ------------------------------------------------------------------------------------ loss_fns

def by_hand_token_logp(logits, tokens, b, t) -> float:
    row = logits[b, t].double()
    return float(row[tokens[b, t]] - torch.logsumexp(row, 0))


def make_actor_micro(seed: int, b: int = 3, S: int = 7, V: int = 11):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, S, V, generator=gen)
    tokens = torch.randint(0, V, (b, S - 1), generator=gen)
    answer = (torch.rand(b, S - 1, generator=gen) > 0.4).float()
    old = torch.log_softmax(logits[:, :-1], -1).gather(-1, tokens[..., None]).squeeze(-1) + 0.3 * torch.randn(b, S - 1, generator=gen)
    advantages = torch.randn(b, S - 1, generator=gen)
    ref = old + 0.2 * torch.randn(b, S - 1, generator=gen)
    return logits, tokens, answer, old, advantages, ref


@pytest.mark.parametrize("options", [{}, {"kl_in_reward": False, "kl_coef": 0.5, "kl_estimator": "k3"}, {"entropy_coef": 0.3}])
def test_actor_loss_is_the_clipped_surrogate_mean_over_the_minibatch_answer_tokens(options):
    """Two micro-batches (grad_accum 2): their mean (DeepSpeed's accumulation) equals the token mean
    over both, term by term as written here; the stats give clip fraction and approx KL."""
    opts = PPOOptions(clip_range=0.2, **options)
    micro = [make_actor_micro(1), make_actor_micro(2)]
    n = sum(float(m[2].sum()) for m in micro)
    token_scale = torch.tensor(2 * 1 / n, dtype=torch.float64)  # grad_accum * D / N_minibatch
    loss_fn = ActorLoss(opts)
    losses = [loss_fn(logits, (tokens, answer, old, adv, ref, token_scale)).item() for logits, tokens, answer, old, adv, ref in micro]

    total = surrogate = clipped = approx_kl = entropy = kl_term = 0.0
    for logits, tokens, answer, old, adv, ref in micro:
        for b in range(tokens.shape[0]):
            for t in range(tokens.shape[1]):
                if answer[b, t] == 0:
                    continue
                logp = by_hand_token_logp(logits, tokens, b, t)
                ratio = math.exp(logp - float(old[b, t]))
                a = float(adv[b, t])
                term = max(-a * ratio, -a * min(max(ratio, 0.8), 1.2))
                surrogate += term
                clipped += (ratio < 0.8 and a < 0) or (ratio > 1.2 and a > 0)  # the clip is active: no gradient
                approx_kl += ratio - 1 - math.log(ratio)
                p = torch.softmax(logits[b, t].double(), 0)
                h = float(-(p * p.log()).sum())
                entropy += h
                d = logp - float(ref[b, t])
                kl = math.exp(-d) - 1 + d
                kl_term += 0 if opts.kl_in_reward else kl
                total += term - opts.entropy_coef * h + (0 if opts.kl_in_reward else opts.kl_coef * kl)
    assert sum(losses) / 2 == pytest.approx(total / n, rel=1e-5, abs=1e-6)
    stats = dict(zip(ACTOR_STATS, loss_fn.take_stats().tolist()))
    assert stats["tokens"] == n
    assert stats["policy_loss"] / n == pytest.approx(surrogate / n, rel=1e-5, abs=1e-6)
    assert stats["clip_frac"] / n == pytest.approx(clipped / n, abs=1e-6)
    assert stats["approx_kl"] / n == pytest.approx(approx_kl / n, rel=1e-5)
    assert stats["entropy"] / n == pytest.approx(entropy / n, rel=1e-5)
    assert stats["kl_loss"] / n == pytest.approx(kl_term / n, rel=1e-5, abs=1e-9)
    assert loss_fn.take_stats().abs().sum() == 0


def test_actor_loss_gradient_raises_the_log_prob_of_positive_advantage_tokens():
    logits, tokens, answer, old, adv, ref = make_actor_micro(3)
    answer = torch.ones_like(answer)
    old = torch.log_softmax(logits[:, :-1], -1).gather(-1, tokens[..., None]).squeeze(-1)  # ratio 1: unclipped
    adv = torch.where(torch.arange(adv.numel()).view(adv.shape) % 2 == 0, 1.0, -1.0)
    logits = logits.clone().requires_grad_(True)
    ActorLoss(PPOOptions())(logits, (tokens, answer, old, adv, ref, torch.tensor(1.0, dtype=torch.float64))).backward()
    grad_at_token = logits.grad[:, :-1].gather(-1, tokens[..., None]).squeeze(-1)
    assert bool((grad_at_token[adv > 0] < 0).all()) and bool((grad_at_token[adv < 0] > 0).all())


def test_critic_loss_is_the_clipped_value_loss_mean_over_answer_tokens():
    gen = torch.Generator().manual_seed(4)
    b, S = 3, 6
    micro = []
    for _ in range(2):
        values = torch.randn(b, S, generator=gen)
        old = values[:, :-1] + 0.4 * torch.randn(b, S - 1, generator=gen)
        returns = torch.randn(b, S - 1, generator=gen)
        answer = (torch.rand(b, S - 1, generator=gen) > 0.3).float()
        micro.append((values, answer, old, returns))
    n = sum(float(m[1].sum()) for m in micro)
    scale = torch.tensor(2 / n, dtype=torch.float64)
    losses = [CriticLoss(PPOOptions(value_clip=0.2))(values, (answer, old, ret, scale)).item() for values, answer, old, ret in micro]
    expected = 0.0
    for values, answer, old, ret in micro:
        for i in range(b):
            for t in range(S - 1):
                if answer[i, t]:
                    v, vo, r = float(values[i, t]), float(old[i, t]), float(ret[i, t])
                    clipped = vo + min(max(v - vo, -0.2), 0.2)
                    expected += 0.5 * max((v - r) ** 2, (clipped - r) ** 2)
    assert sum(losses) / 2 == pytest.approx(expected / n, rel=1e-5)


# ------------------------------------------------------------------------------------ rollout layout

def test_fixed_width_rollout_aligns_tokens_answers_and_generation_log_probs():
    from trainer.generation.decoding import Generation

    pad = 0
    # prompt_len 2: row 0 prompt [5, 6], answer [7, 8] (hit the length limit); row 1 prompt [9], answer [2] (EOS)
    gen = Generation(ids=torch.tensor([[5, 6, 7, 8], [0, 9, 2, 0]]), attention_mask=torch.tensor([[1, 1, 1, 1], [0, 1, 1, 0]]),
                     answer_mask=torch.tensor([[0, 0, 1, 1], [0, 0, 1, 0]]), prompt_len=2, n_new=torch.tensor([2, 1]),
                     finish_reason=["length", "stop"], seconds=[0.0, 0.0], logprobs=torch.tensor([[-1.0, -2.0], [-3.0, -9.0]]))
    ro = fixed_width_rollout(gen, prompt_width=3, answer_width=3, pad_id=pad)
    assert ro.ids.tolist() == [[0, 5, 6, 7, 8, 0], [0, 0, 9, 2, 0, 0]]
    assert ro.mask.tolist() == [[0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 0, 0]]
    assert ro.tokens.tolist() == [[5, 6, 7, 8, 0], [0, 9, 2, 0, 0]]
    assert ro.answer.tolist() == [[0, 0, 1, 1, 0], [0, 0, 1, 0, 0]]
    # column t of the shifted tensors is token ids[:, t + 1]: the log-prob of each answer token
    assert ro.gen_logps.tolist() == [[0, 0, -1, -2, 0], [0, 0, -3, 0, 0]]
    assert ro.ended.tolist() == [False, True] and ro.n_new.tolist() == [2, 1]


def test_prompt_sampler_rolls_over_epochs_and_resumes_where_it_was():
    a = PromptSampler(5, seed=3)
    first = a.take(3) + a.take(3)  # crosses into epoch 1
    assert sorted(first[:5]) == [0, 1, 2, 3, 4] and a.epoch == 1
    state = a.state_dict()
    b = PromptSampler(5, seed=3)
    b.load_state_dict(state)
    assert b.take(4) == a.take(4)


# ------------------------------------------------------------------------------------ config

def ppo_raw(**changes) -> dict:
    raw = {"stage": "ppo", "actor_path": "sft", "critic_path": "rm", "save_path": "out", "data_path": PREFS, "train_steps": 2,
           "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [2, 1]}, "parts": [3, 4]},
           "train_batch_size": 4, "train_micro_batch_size_per_gpu": 2}
    raw.update(changes)
    return raw


def problems_of(raw) -> list[str]:
    try:
        validate(raw)
    except ConfigError as e:
        return e.problems
    return []


def test_ppo_config_defaults_and_validation():
    cfg = validate(ppo_raw(ppo={"lambda": 0.9}))
    opts = cfg.options
    assert cfg.model_path == "sft" and opts.lam == 0.9 and opts.kl_coef == 0.1 and opts.reward_clip == 5.0
    assert (opts.clip_range, opts.value_clip, opts.gamma, opts.kl_estimator, opts.kl_in_reward) == (0.2, 0.2, 1.0, "k1", True)
    assert opts.rollout_rows(4) == 4
    assert any("critic_path" in p for p in problems_of({k: v for k, v in ppo_raw().items() if k != "critic_path"}))
    assert any("not a multiple of train_batch_size 4" in p for p in problems_of(ppo_raw(ppo={"rollout_batch_size": 6})))
    assert any("unknown keys ['rolout_batch_size']" in p for p in problems_of(ppo_raw(ppo={"rolout_batch_size": 8})))
    assert any("ppo.kl_estimator" in p for p in problems_of(ppo_raw(ppo={"kl_estimator": "k4"})))
    assert any("ppo.critic.parts has 1 entries" in p for p in problems_of(ppo_raw(ppo={"critic": {"parts": [7]}})))
    assert any("PPO keys, but stage is 'sft'" in p for p in problems_of({**ppo_raw(), "stage": "sft", "model_path": "m"}))
    assert any("DPO keys, but stage is 'ppo'" in p for p in problems_of(ppo_raw(beta=0.2)))
    k1_loss = problems_of(ppo_raw(ppo={"kl_in_reward": False}))  # k1, the default estimator, as a loss term
    assert any('"k1" has a zero gradient' in p and '"k2"' in p and '"k3"' in p for p in k1_loss), k1_loss
    assert problems_of(ppo_raw(ppo={"kl_in_reward": False, "kl_estimator": "k2"})) == []


def test_a_prompts_samples_stay_on_one_replica():
    """Prompts are shared among the data-parallel replicas before their samples are repeated: with D = 2
    and k = 4 samples per prompt, each prompt's 4 rows land on one replica, prompts alternating."""
    from trainer.generation.decoding import replica_rows

    k, prompts = 4, ["p0", "p1", "p2", "p3", "p4", "p5"]
    rows = [p for p in prompts for _ in range(k)]  # step_prompt_records' global list: each prompt k times in a row
    shares = [[rows[i] for i in replica_rows(len(rows), r, 2, group=k)] for r in range(2)]
    assert shares == [["p0"] * 4 + ["p2"] * 4 + ["p4"] * 4, ["p1"] * 4 + ["p3"] * 4 + ["p5"] * 4]
    assert replica_rows(10, 1, 2) == [1, 3, 5, 7, 9]  # group 1: rows[r::D], as before
    # the recipe's config check: a step's prompts must split evenly over the replicas
    raw = ppo_raw(train_batch_size=8, train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=2,
                  ppo={"rollout_batch_size": 3, "n_samples_per_prompt": 8})
    raw["model_topo"] = {"process_topology": {"axes": ["pipe", "data"], "dims": [1, 2]}, "parts": "auto"}
    assert any("cannot be shared evenly by the 2 data-parallel replicas" in p for p in problems_of(raw))


def test_reward_functions_keys_and_when_a_reward_model_is_built():
    """Without reward_funcs nothing changes (the reward model defaults to the critic's start); with them the
    reward model is built only when reward_path is given. The reward keys are GRPO's, checked by one function
    whose messages name the "ppo" section."""
    from trainer.rl.ppo_models import model_configs

    plain = validate(ppo_raw()).options
    assert plain.builds_reward_model and plain.reward_model_path == "rm" and plain.weights() == ()
    funcs = validate(ppo_raw(ppo={"reward_funcs": ["math_answer", "format"], "reward_weights": [1, 0.5]}))
    o = funcs.options
    assert o.reward_funcs == ("math_answer", "format") and o.weights() == (1, 0.5) and o.reward_model_weight == 1.0
    assert not o.builds_reward_model and o.reward_model_path is None
    assert list(model_configs(funcs, o)) == ["actor_path", "critic_path", "ref_path"]
    both = validate(ppo_raw(reward_path="my_rm", ppo={"reward_funcs": ["format"], "reward_model_weight": 0.5}))
    assert both.options.reward_model_path == "my_rm" and model_configs(both, both.options)["reward_path"].path == "my_rm"
    assert list(model_configs(validate(ppo_raw()), plain)) == ["actor_path", "critic_path", "ref_path", "reward_path"]
    for ppo, message in [
        ({"reward_funcs": ["nosuch"]}, "ppo.reward_funcs: 'nosuch' is not a built-in"),
        ({"reward_funcs": ["format"], "reward_weights": [1, 2]}, "ppo.reward_weights must be a list of 1 number(s)"),
        ({"reward_funcs": ["format"], "reward_timeout_s": 0}, "ppo.reward_timeout_s must be positive"),
        ({"reward_funcs": ["format"], "reward_kwargs": {"overlong": {}}}, "'overlong' is not a built-in reward function in "
                                                                          "ppo.reward_funcs"),
        ({"reward_funcs": ["format"], "reward_model_weight": 2}, "ppo.reward_model_weight set, but with ppo.reward_funcs the "
                                                                "reward model is built only when reward_path is given"),
        ({"reward_funcs": "format"}, "ppo.reward_funcs must be a list of names"),
        ({"reward_model_weight": "1"}, "ppo.reward_model_weight must be a finite number"),
    ]:
        assert any(message in p for p in problems_of(ppo_raw(ppo=ppo))), (ppo, problems_of(ppo_raw(ppo=ppo)))


def test_shipped_ppo_configs_validate():
    real = load_config(str(REPO / "configs" / "ds_config_ppo.json"), world_size=8)
    opts = real.options
    assert real.precision == "bf16" and opts.rollout_rows(real.global_batch) % real.global_batch == 0
    tiny = load_config(str(REPO / "configs" / "ppo_tiny.json"), world_size=2)
    assert tiny.stage == "ppo" and tiny.precision == "fp32"


@pytest.fixture(scope="module")
def random_pp(tmp_path_factory):
    from convert.hg_to_pp import hg_to_pp
    from models.random_init import save_random_model

    tmp = tmp_path_factory.mktemp("ppo-plans")
    hf = save_random_model(REPO / "configs" / "tiny-llama", tmp / "hf", seed=0, tie_word_embeddings=False)
    return hg_to_pp(hf, tmp / "pp", progress=False)


def test_auto_parts_fit_the_four_models_together_on_each_stage(random_pp):
    """Actor, critic, reference and reward share every rank: "auto" parts must fit their sum, not
    each model alone."""
    from trainer.engine.auto_parts import AutoPartsError
    from trainer.rl.ppo_models import model_configs, plan_models

    def plans_for(budget, **over):
        raw = {"stage": "ppo", "actor_path": str(random_pp), "critic_path": str(random_pp), "save_path": "s",
               "data_path": PREFS, "max_seq_len": 64, "train_steps": 1, "train_batch_size": 8,
               "train_micro_batch_size_per_gpu": 4,
               "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [2, 1]}, "parts": "auto"},
               "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, "ppo": {"max_new_tokens": 16}, **over}
        cfg = validate(raw, world_size=2)
        opts = cfg.options
        plans = plan_models(cfg, opts, budget)
        configs = model_configs(cfg, opts)
        per_model = {key: plan.stage_totals(configs[key][0]) for key, plan in plans.items()}
        return {key: plan.parts for key, plan in plans.items()}, [sum(t[s] for t in per_model.values()) for s in range(2)]

    alone, alone_totals = plans_for(None)  # each compute-balanced
    assert alone_totals[0] > 1.2 * alone_totals[1]  # the balanced splits crowd stage 0
    assert plans_for(10 * max(alone_totals))[0] == alone  # room for all: unchanged
    budget = 0.92 * max(alone_totals)  # the balanced splits do not fit together; moving layers does
    shared, totals = plans_for(budget)
    assert shared != alone and max(totals) <= budget
    assert max(alone_totals) > budget
    assert shared["ref_path"] == alone["ref_path"] and shared["reward_path"] == alone["reward_path"]  # few moves
    without_rm, _ = plans_for(budget, ppo={"max_new_tokens": 16, "reward_funcs": ["format"]})  # reward functions alone
    assert list(without_rm) == ["actor_path", "critic_path", "ref_path"]
    tight = 0.85 * max(alone_totals)  # one model at a time cannot make room: every model within its share first
    _, totals = plans_for(tight)
    assert max(totals) <= tight
    fixed_actor, totals = plans_for(budget, model_topo={"process_topology": {"axes": ["pipe", "data"], "dims": [2, 1]},
                                                        "parts": [4, 3]},
                                    ppo={"max_new_tokens": 16, "critic": {"parts": "auto"}, "ref_parts": "auto",
                                         "reward_parts": "auto"})
    assert fixed_actor["actor_path"] == [4, 3]  # given parts are kept; the others make room around them
    with pytest.raises(AutoPartsError, match=r"ppo: the actor, critic, reference and reward model share each rank's .* "
                                             r"no \"auto\" split of them fits together .*frozen_bf16"):
        plans_for(0.5 * max(alone_totals))


# ------------------------------------------------------------------------------------ real runs





ADAMW = {"type": "AdamW", "params": {"lr": 3e-5, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.0, "torch_adam": True}}
CRITIC = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.0, "torch_adam": True}}}
WARMUP = {"type": "WarmupDecayLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 3e-5, "warmup_num_steps": 3}}


def make_config(tmp: Path, name: str, models: dict, **over) -> Path:
    cfg = {
        "stage": "ppo", "actor_path": str(models["actor"]), "critic_path": str(models["rm"]), "save_path": str(tmp / name),
        "data_path": PREFS, "max_seq_len": SEQ, "train_steps": 2, "seed": 11, "resume": "never", "keep_last": 3,
        "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [2, 1]}, "parts": [3, 4]},
        "train_batch_size": 8, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "gradient_clipping": 1.0,
        "steps_per_print": 10**6, "optimizer": ADAMW,
        "ppo": {"rollout_batch_size": 16, "max_new_tokens": NEW, "critic": CRITIC},
    }
    cfg.update(over)
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(cfg, indent=1))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The toy task's models as pipeline folders: {"actor", "rm", "actor_hf", "rm_hf", "marker"}."""
    from ppo_fixtures import choose_marker, marker_reward_hf, peaked_actor_hf
    from transformers import AutoTokenizer

    from convert.hg_to_pp import hg_to_pp
    from data.dataset import build_dataset
    from models.random_init import save_random_model

    tmp = tmp_path_factory.mktemp("ppo-models")
    base = save_random_model(REPO / "configs" / "tiny-llama", tmp / "base-hf", seed=0, tie_word_embeddings=False)
    actor_hf = peaked_actor_hf(base, tmp / "actor-hf")
    tok = AutoTokenizer.from_pretrained(actor_hf)
    built = build_dataset(PREFS, tok, SEQ, kind="prompt", cache_dir=str(tmp / "cache"))
    prompts = [built.train[i][0][built.train[i][1].bool()].tolist() for i in range(16)]
    marker, _ = choose_marker(actor_hf, prompts, {tok.eos_token_id, tok.bos_token_id}, NEW)
    rm_hf = marker_reward_hf(base, tmp / "rm-hf", marker, pad_id=0)
    return {"actor": hg_to_pp(actor_hf, tmp / "actor-pp", progress=False), "rm": hg_to_pp(rm_hf, tmp / "rm-pp", progress=False),
            "actor_hf": actor_hf, "rm_hf": rm_hf, "marker": marker}


FULL = dict(train_steps=6, save_interval=2, train_batch_size=4, train_micro_batch_size_per_gpu=2, scheduler=WARMUP,
            ppo={"rollout_batch_size": 4, "n_samples_per_prompt": 2, "ppo_epochs": 2, "max_new_tokens": 8, "entropy_coef": 0.01,
                 "kl_in_reward": False, "kl_estimator": "k3", "missing_eos_penalty": 0.5, "temperature": 0.9, "logprobs_at_temperature": True, "top_p": 0.95,
                 "ptx_coef": 0.5, "ptx_data_path": str(REPO / "data" / "samples" / "mixed.json"), "ema_decay": 0.9,
                 "frozen_bf16": True,
                 "critic": {**CRITIC, "scheduler": {**WARMUP, "params": {**WARMUP["params"], "warmup_max_lr": 1e-3}}}})
EMA_DECAY = 0.75
ONE_STEP = dict(train_steps=1, train_batch_size=4, train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=2,
                ppo={"rollout_batch_size": 4, "max_new_tokens": 8, "critic": CRITIC, "ema_decay": EMA_DECAY})  # one minibatch


MARKER_FUNCTION = """
def marker_count(prompts, completions, completion_ids, marker, **kwargs):
    assert all(p.startswith("Tell me about") for p in prompts), prompts  # the records' prompts, as the data gave them
    return [float(sum(1 for t in ids if t == int(m))) for ids, m in zip(completion_ids, marker)]
"""
FUNCTION_WEIGHT = 2.0


def functions_only_config(tmp: Path, models: dict) -> dict:
    """Reward functions alone (no reward_path: no reward model): a column `marker` in every prompt record,
    counted in the answers by a function from a file; 1 stage x 2 replicas (the records shared as the rows)."""
    prompts_file = REPO / "data" / "samples" / "rlhf_prompts.jsonl"
    data = tmp / "marker_prompts.jsonl"
    data.write_text("".join(json.dumps({**json.loads(line), "marker": str(models["marker"])}) + "\n"
                            for line in prompts_file.read_text().splitlines()))
    (tmp / "marker_rewards.py").write_text(MARKER_FUNCTION)
    return dict(train_steps=3, data_path=str(data), train_batch_size=4, train_micro_batch_size_per_gpu=2,
                gradient_accumulation_steps=1,
                model_topo={"process_topology": {"axes": ["pipe", "data"], "dims": [1, 2]}, "parts": [7]},
                ppo={"rollout_batch_size": 4, "max_new_tokens": 8, "critic": {**CRITIC, "parts": [7]},
                     "reward_funcs": [f"{tmp / 'marker_rewards.py'}:marker_count"], "reward_weights": [FUNCTION_WEIGHT]})


@pytest.fixture(scope="module")
def runs(models, tmp_path_factory):
    """Launch A: {name: (summary, save_path)}, the launch's output, tmp."""
    tmp = tmp_path_factory.mktemp("ppo-runs")
    names = {
        "toy": make_config(tmp, "toy", models, train_steps=30,
                           csv_monitor={"enabled": True, "output_path": str(tmp / "toy-logs"), "job_name": "toy"}),
        "two_stages": make_config(tmp, "two_stages", models, **ONE_STEP),
        "two_replicas": make_config(tmp, "two_replicas", models, **{**ONE_STEP, "train_micro_batch_size_per_gpu": 1,
                                                                     "ppo": {**ONE_STEP["ppo"], "critic": {**CRITIC, "parts": [7]}}},
                                    model_topo={"process_topology": {"axes": ["pipe", "data"], "dims": [1, 2]}, "parts": [7]}),
        "full": make_config(tmp, "full", models, **FULL),
        "functions": make_config(tmp, "functions", models, **functions_only_config(tmp, models)),
    }
    out = tmp / "results.jsonl"
    proc = launch(str(REPO / "tests" / "multirank" / "train_runs.py"), *[a for p in names.values() for a in ("--config", str(p))],
                  "--out", str(out))
    results = [json.loads(line) for line in out.read_text().splitlines()]
    return {name: (r, tmp / name) for name, r in zip(names, results)}, proc.stdout + proc.stderr, tmp


def metric(summary, name: str) -> list[float]:
    return [m[name] for _, m in summary["train_metrics"]]


@pytest.mark.multirank
def test_first_step_with_reference_equal_to_actor_has_zero_kl_and_matching_log_probs(runs):
    runs, _, _ = runs
    for name in ("toy", "two_stages", "two_replicas", "full"):
        summary, _ = runs[name]
        # generation (KV cache) and the training forward: the same weights, fp32
        assert max(metric(summary, "PPO/logprob_gap")) <= 1e-5, name
        if name != "full":
            assert metric(summary, "PPO/kl")[0] == 0.0, name
    # frozen_bf16: the reference is the actor's start rounded to bf16, a small KL but not 0
    assert 0 < abs(metric(runs["full"][0], "PPO/kl")[0]) < 0.5


@pytest.mark.multirank
def test_reward_functions_alone_train_without_a_reward_model(runs, models):
    """No reward_path with reward_funcs: the reward model is not built (the run's models), the score is the
    function's weighted value, the per-function mean is logged as GRPO logs it, and the actor trains."""
    runs, _, _ = runs
    summary, save = runs["functions"]
    assert summary["models"] == ["actor_path", "critic_path", "ref_path"]
    assert runs["toy"][0]["models"] == ["actor_path", "critic_path", "ref_path", "reward_path"]
    assert summary["step"] == 3 and summary["tags"] == ["global_step3"]
    for _, m in summary["train_metrics"]:
        assert m["PPO/score_mean"] == pytest.approx(FUNCTION_WEIGHT * m["PPO/rewards/marker_count/mean"], rel=1e-9, abs=1e-12)
        assert "PPO/rm_score_mean" not in m and math.isfinite(m["PPO/value_loss"])
    assert sum(m["PPO/rewards/marker_count/mean"] for _, m in summary["train_metrics"]) > 0  # the marker was sampled
    assert metric(summary, "PPO/kl")[0] == 0.0 and max(metric(summary, "PPO/logprob_gap")) <= 1e-5
    changed = 0
    for f in sorted((save / "global_step3").glob("layer_*-model_states.pt")):
        start, trained = torch.load(models["actor"] / f.name, weights_only=True), torch.load(f, weights_only=True)
        changed += any(not torch.equal(start[k], trained[k]) for k in start)
    assert changed > 0  # the actor trained


@pytest.mark.multirank
def test_toy_reward_rises_while_kl_stays_bounded(runs):
    runs, _, tmp = runs
    summary, _ = runs["toy"]
    reward, score, kl = (metric(summary, k) for k in ("PPO/reward_mean", "PPO/score_mean", "PPO/kl"))
    start, end = reward[0], sum(reward[-10:]) / 10
    assert end > start + 0.04, (start, end, reward)
    assert sum(score[-10:]) / 10 > 2 * score[0], score
    assert max(kl) < 10, kl
    logs = tmp / "toy-logs" / "toy"
    for name in ("reward_mean", "reward_std", "score_mean", "kl", "policy_loss", "value_loss", "clip_frac", "approx_kl",
                 "entropy", "response_length", "logprob_gap", "gen_tokens_per_s", "train_tokens_per_s", "time_generate_s",
                 "time_score_s", "time_train_s"):
        rows = (logs / f"PPO_{name}.csv").read_text().splitlines()
        assert len(rows) == 31, name  # header + 30 steps


@pytest.mark.multirank
def test_two_replicas_take_the_same_first_step_as_two_stages(runs):
    """Rows, sampling seeds, whitening and the token normalisation do not depend on the (P, D) split:
    with the rollout one minibatch (minibatches are drawn within each replica's rows, as each
    DeepSpeed-Chat rank trains on its own experience), 1 stage x 2 replicas updates the actor and
    the critic as 2 stages x 1 replica do."""
    runs, _, _ = runs
    (a, a_save), (b, b_save) = runs["two_stages"], runs["two_replicas"]
    a, b = a["train_metrics"][0][1], b["train_metrics"][0][1]
    assert a["PPO/response_length"] == b["PPO/response_length"]
    for key in ("PPO/score_mean", "PPO/reward_mean", "PPO/policy_loss", "PPO/value_loss", "PPO/entropy", "PPO/approx_kl"):
        assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    # Gradients summed over replicas in another order: AdamW's first step amplifies that rounding
    # (tests/test_dpo.py measured 3e-6 on the same model).
    assert_same_weights(a_save / "global_step1", b_save / "global_step1", tol=2e-5)
    assert_same_weights(a_save / "critic" / "global_step1", b_save / "critic" / "global_step1", tol=2e-5)


@pytest.mark.multirank
def test_ema_of_the_actor_is_saved_and_exports(runs, models, tmp_path):
    """One optimizer step: ema = decay * start + (1 - decay) * trained, layer by layer; pp_to_hg exports it."""
    from transformers import AutoModelForCausalLM

    from convert.pp_to_hg import pp_to_hg

    runs, _, _ = runs
    _, save = runs["two_stages"]
    assert (save / "ema" / "latest").read_text() == "global_step1"
    files = sorted((save / "global_step1").glob("layer_*-model_states.pt"))
    assert len(files) == 7
    for f in files:
        start, trained = torch.load(models["actor"] / f.name, weights_only=True), torch.load(f, weights_only=True)
        ema = torch.load(save / "ema" / "global_step1" / f.name, weights_only=True)
        assert ema.keys() == trained.keys() and any(not torch.equal(start[k], trained[k]) for k in ema)
        for k in ema:
            torch.testing.assert_close(ema[k], EMA_DECAY * start[k] + (1 - EMA_DECAY) * trained[k], rtol=0, atol=1e-7)
    AutoModelForCausalLM.from_pretrained(pp_to_hg(save / "ema", tmp_path / "ema", progress=False))


@pytest.mark.multirank
def test_exports_load_in_hf_and_the_critic_scores_as_the_pipeline(runs, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from convert.pp_to_hg import pp_to_hg

    runs, _, _ = runs
    _, save = runs["toy"]
    actor = AutoModelForCausalLM.from_pretrained(pp_to_hg(save, tmp_path / "actor", progress=False), dtype=torch.float32)
    critic_dir = pp_to_hg(save / "critic", tmp_path / "critic", progress=False)
    critic = AutoModelForSequenceClassification.from_pretrained(critic_dir, dtype=torch.float32)
    assert json.loads((critic_dir / "config.json").read_text())["architectures"] == ["LlamaForSequenceClassification"]
    pad = critic.config.pad_token_id
    ids = torch.tensor([[1, 40, 41, 42, 43, 2], [1, 50, 51, 2, pad, pad]])
    mask = (torch.arange(6)[None] < torch.tensor([[6], [4]])).long()
    tag = (save / "latest").read_text()
    with torch.no_grad():
        pipe_values = load_pipe(save / "critic", tag, "value")((ids, mask))
        torch.testing.assert_close(critic(input_ids=ids, attention_mask=mask).logits.squeeze(-1),
                                   pipe_values[torch.arange(2), torch.tensor([5, 3])], rtol=0, atol=1e-5)
        real = mask.bool()  # pad positions' logits are nobody's concern
        torch.testing.assert_close(actor(input_ids=ids, attention_mask=mask).logits[real],
                                   load_pipe(save, tag, "lm")((ids, mask))[real], rtol=0, atol=1e-5)


def load_pipe(save_path: Path, tag: str, head: str):
    """The pipeline of a training checkpoint's layer files (save_path/tag), in one process."""
    from transformers import AutoConfig

    from models.pipeline import SequentialPipe, build_layers, prepare_config

    layers = build_layers(prepare_config(AutoConfig.from_pretrained(save_path)), head)
    for i, layer in enumerate(layers):
        if isinstance(layer, torch.nn.Module):
            layer.load_state_dict(torch.load(save_path / tag / f"layer_{i:02d}-model_states.pt", weights_only=True), strict=True)
    return SequentialPipe(layers).eval()


def assert_same_weights(a_dir: Path, b_dir: Path, tol: float = 1e-6) -> None:
    files = sorted(a_dir.glob("layer_*-model_states.pt"))
    assert files
    for f in files:
        a, b = torch.load(f, weights_only=True), torch.load(b_dir / f.name, weights_only=True)
        worst = max((a[k] - b[k]).abs().max().item() for k in a)
        assert worst <= tol, (f.name, worst)


@pytest.mark.multirank
def test_killed_during_save_resumes_exactly(runs, models):
    runs, _, tmp = runs
    reference, reference_save = runs["full"]
    config = make_config(tmp, "killed", models, **{**FULL, "resume": "auto"})
    proc = launch("train_ds.py", "--config", str(config), check=False,
                  env_extra={"PIPETUNE_TEST_KILL_DURING_SAVE_AT_STEP": "4"})
    assert proc.returncode != 0
    save = tmp / "killed"
    assert (save / "latest").read_text() == "global_step2"
    proc = launch("train_ds.py", "--config", str(config))
    assert "resumed from" in proc.stdout + proc.stderr
    state = json.loads((save / "global_step6" / "trainer_state.json").read_text())
    assert [s for s, _ in state["train_metrics"]] == [1, 2, 3, 4, 5, 6]
    for (_, got), (_, want) in zip(state["train_metrics"], reference["train_metrics"]):
        for key in ("PPO/reward_mean", "PPO/kl", "PPO/policy_loss", "PPO/value_loss", "PPO/response_length"):
            assert got[key] == pytest.approx(want[key], rel=0, abs=1e-6), key
    assert_same_weights(reference_save / "global_step6", save / "global_step6")
    assert_same_weights(reference_save / "critic" / "global_step6", save / "critic" / "global_step6")
    assert_same_weights(reference_save / "ema" / "global_step6", save / "ema" / "global_step6")
    assert all(math.isfinite(m["PPO/ptx_loss"]) for _, m in state["train_metrics"])


def test_disable_dropout_turns_off_every_dropout_of_the_pipe_layers():
    """A BLOOM config with dropout: after disable_dropout, two training-mode forwards agree."""
    from conftest import CONFIGS
    from transformers import AutoConfig

    from models.pipeline import SequentialPipe, build_layers, prepare_config
    from trainer.engine.build import disable_dropout

    config = AutoConfig.from_pretrained(CONFIGS["bloom"])
    config.hidden_dropout, config.attention_dropout = 0.3, 0.3
    pipe = SequentialPipe(build_layers(prepare_config(config), "lm")).train()
    ids = torch.randint(0, config.vocab_size, (2, 9))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        assert not torch.equal(pipe((ids, mask)), pipe((ids, mask)))  # dropout is on
        assert disable_dropout(pipe) > 0
        torch.testing.assert_close(pipe((ids, mask)), pipe((ids, mask)), rtol=0, atol=0)


def test_logprobs_at_temperature_make_the_sampled_kl_unbiased():
    """Tokens sampled at T = 1.3: with the raw (T = 1) log-probs (DeepSpeed-Chat's convention, the default)
    the k1 estimate's expectation is not KL(pi || ref) (nor KL(pi_T || ref_T)); with
    logprobs_at_temperature the recipe's scoring reducer gives log-probs of logits / T, whose k1 expectation is
    exactly KL(pi_T || ref_T). The generator returns the same log-prob for the token it chose."""
    from trainer.generation.token_sampling import SamplingConfig, choose_next
    from trainer.rl.ppo_losses import reduce_token_logps
    from trainer.rl.ppo_math import kl_estimate

    T, V = 1.3, 6
    policy = torch.tensor([2.0, 1.0, 0.5, -0.5, -1.0, 0.3], dtype=torch.float64)
    ref = torch.tensor([1.8, 1.3, 0.1, -0.2, -1.4, 0.6], dtype=torch.float64)
    sampled_from = torch.softmax(policy / T, 0)
    tokens = torch.arange(V)[:, None]  # every token once: an exact expectation

    def logps(logits, temperature):  # [V, 2, V] rows: position 0 predicts the token
        return reduce_token_logps(logits.expand(V, 2, V).clone(), (tokens,), temperature).double()[:, 0]

    def expected_k1(temperature):
        return float((sampled_from * kl_estimate(logps(policy, temperature), logps(ref, temperature), "k1")).sum())

    def kl(p, q):
        return float((torch.softmax(p, 0) * (torch.log_softmax(p, 0) - torch.log_softmax(q, 0))).sum())

    biased = expected_k1(1.0)  # the default
    assert abs(biased - kl(policy, ref)) > 0.1 * kl(policy, ref) and abs(biased - kl(policy / T, ref / T)) > 0.1 * biased
    assert expected_k1(T) == pytest.approx(kl(policy / T, ref / T), rel=2e-5)  # fp32 log-probs
    opts = PPOOptions(temperature=T, logprobs_at_temperature=True)
    assert opts.logprob_temperature == T and PPOOptions(temperature=T).logprob_temperature == 1.0
    ids, raw, _ = choose_next(policy[None].float(), None, SamplingConfig(greedy=False, temperature=T, logprob_temperature=T),
                              [torch.Generator().manual_seed(0)])
    assert raw.item() == pytest.approx(float(logps(policy, T)[ids.item()]), abs=1e-6)
    assert any("logprobs_at_temperature must be true or false" in p for p in problems_of(ppo_raw(ppo={"logprobs_at_temperature": 1})))
