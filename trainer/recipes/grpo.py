"""GRPO and its critic-free relatives (Dr. GRPO, DAPO's loss, RLOO, REINFORCE++) on the pipeline engine,
with verifiable rewards: the actor generates with the weights being trained, no critic.

    deepspeed train_ds.py --config my_grpo.json        ("stage": "grpo"; keys: trainer/rl/grpo_options.py)

Models: the actor (`actor_path`, LM head, trained); the reference (`ref_path`, default the actor's start)
only when grpo.kl_coef > 0; a reward model (`reward_path`, value head) only when given. All share the
(P, D) topology, so the last stage of each replica holds every model's outputs.

One step (every replica works on whole groups of its own rows; only sums cross replicas):
  1. rollout: rank 0 picks `rollout_batch_size` prompts with their records (trainer.rl.grpo_rollout),
     each replica generates n_samples_per_prompt answers for its share of them (a prompt's group on one
     replica: decoding.replica_share), at one fixed width S = max_seq_len + max_new_tokens; the reward
     model's score and the reward functions on the decoded answers (trainer.rl.rewards; a failure stops
     every rank). With grpo.max_refill_rounds, further rounds replace the groups without a reward signal
     (DAPO's dynamic sampling: trainer.rl.dynamic_sampling).
  2. score: the actor's log-probs recomputed by the training forward at the sampling temperature (the
     ratio's old log-probs: the generator's own, logprob_gap ~0), the reference's.
  3. advantages (trainer.rl.advantages, by grpo.advantage) per group, batch moments summed over replicas;
     the loss mask (mask_truncated_completions).
  4. update: num_iterations x minibatches of train_batch_size rows (a seeded shuffle within each replica's
     rows), each one train_batch of the actor with GRPOLoss (trainer.rl.grpo_losses), its tokens weighted
     by grpo.loss_type over the whole minibatch.
  5. metrics (trainer.rl.grpo_metrics: TRL's names under GRPO/) and checkpoints (as PPO's actor:
     SAVE_PATH/global_stepN with the prompt sampler's position and the metrics).
"""
import contextlib
import functools
import time
from pathlib import Path

import torch

from models.heads import last_token_index, set_defer_logits
from trainer.batches import build_data_rank0_first
from trainer.engine import checkpoint
from trainer.engine.build import build_engine, disable_dropout, frozen_engine
from trainer.engine.distributed import all_reduce_sum, broadcast_object
from trainer.engine.forward_only import forward_only
from trainer.engine.guards import check_finite_loss
from trainer.engine.memory import memory_budget
from trainer.engine.plan import ModelSpec, log_co_resident, plan_co_resident
from trainer.engine.preflight import preflight
from trainer.generation.decoding import replica_share
from trainer.generation.stop_ids import answer_stop_ids
from trainer.generation.token_sampling import SamplingConfig
from trainer.metrics import StepMeter, log_plan
from trainer.rl.dynamic_sampling import ScoredRound, sample_groups
from trainer.rl.grpo_losses import GRPOLoss
from trainer.rl.grpo_metrics import rollout_sums, step_metrics
from trainer.rl.grpo_rollout import actor_batch, make_experience, minibatch_weights
from trainer.rl.ppo_losses import reduce_scores, reduce_token_logps
from trainer.rl.ppo_metrics import logprob_gap
from trainer.rl.ppo_models import check_models, frozen_config, with_parts
from trainer.rl.rewards import load_reward_functions, metric_names, reward_trainer_state, score_rows
from trainer.rl.rollout import PromptSampler, generate_rollout, step_prompt_records

SHOWN = {"reward": "GRPO/reward_mean", "kl": "GRPO/kl", "len": "GRPO/completions/mean_length"}


def run(cfg, topo, device_name: str) -> dict:
    """Train; returns {"step", "history" ([step, loss]), "evals" ([]), "train_metrics" ([step, {GRPO/...}])}
    on every rank. Collective: every rank calls it."""
    from transformers import AutoTokenizer

    hosts = preflight(cfg, topo.rank, topo.world_size)
    opts = cfg.options
    specs = model_specs(cfg, opts)
    plans = plan_co_resident(specs, memory_budget(), "grpo: the actor, reference and reward model")
    actor_plan = plans["actor_path"]
    tokenizer = AutoTokenizer.from_pretrained(actor_plan.side_dir)
    check_models(cfg, opts, tokenizer, plans, label="GRPO")
    funcs = load_reward_functions(opts)

    data = build_data_rank0_first(cfg, tokenizer, "prompt", topo, build_here=False)
    n_prompts, pad_id = broadcast_object((len(data.train), data.stats["pad"]["id"]) if data is not None else None)
    prompts_per_step = opts.rollout_batch_size or cfg.global_batch
    minibatches = opts.rollout_rows(cfg.global_batch) // cfg.global_batch
    total_steps = cfg.train_steps or max(1, cfg.n_epochs * n_prompts // prompts_per_step)
    sampler = PromptSampler(n_prompts, cfg.seed) if topo.rank == 0 else None
    resume_from = checkpoint.decide_resume(cfg.save_path, cfg.resume)
    if topo.rank == 0:
        log_plan("grpo actor", cfg, actor_plan, data.stats)
        log_co_resident(specs, plans, "grpo")
    loss_fn = GRPOLoss(opts)
    actor = build_engine(cfg, actor_plan, topo, total_steps * opts.num_iterations * minibatches,
                         weights="checkpoint" if resume_from else "load", loss_fn=loss_fn)
    set_defer_logits(actor.module, cfg.chunked_loss)
    if opts.disable_dropout:
        disable_dropout(actor.module)
    with contextlib.ExitStack() as frozen:
        ref, reward = (frozen.enter_context(frozen_engine(frozen_config(cfg, opts), plans[key], topo)) if key in plans
                       else None for key in ("ref_path", "reward_path"))
        if topo.rank == 0:
            checkpoint.prepare_save_path(cfg.save_path, actor_plan, cfg.config_path, cfg.precision, pad_id)
            checkpoint.write_topology(cfg.save_path, actor_plan, topo, hosts)
        state = checkpoint.start_or_resume(actor, resume_from, sampler)
        train_metrics = list(state.extra.get("train_metrics", []))
        stop_ids = answer_stop_ids(tokenizer, actor_plan.model_config, actor_plan.side_dir)
        meter = StepMeter(cfg, actor_plan, actor, topo, device_name, total_steps, state.step, desc="grpo")
        last_saved = state.step if resume_from else None
        for step in range(state.step + 1, total_steps + 1):
            # 1. Rollout: this replica's prompt groups, generated by the actor's current weights, and their rewards;
            #    with max_refill_rounds, more rounds until the groups have a reward signal.
            spent = {"generate": 0.0, "score": 0.0, "tokens": 0.0}  # over the step's rounds (generate_round)
            one_round = functools.partial(generate_round, actor, actor_plan, reward, sampler, data.train if data else None,
                                          funcs, tokenizer, stop_ids, pad_id, cfg, opts, topo, spent,
                                          reward_trainer_state(step, total_steps), step)
            batch, rounds, first_rewards = sample_groups(one_round, opts.n_samples_per_prompt, opts.max_refill_rounds,
                                                         topo.dp_rank, topo.data, all_reduce_sum)
            ro = batch.ro
            # 2. Score: the actor's log-probs (the ratio's old ones) and the reference's.
            t1 = time.perf_counter()
            old_logps, ref_logps = score_logps(ro, actor, ref, cfg, opts)
            t2 = time.perf_counter()
            # 3. Advantages: group-relative (batch moments over every replica); the loss mask.
            exp = make_experience(ro, old_logps, ref_logps, batch.rewards, batch.per_function, batch.rm_scores, opts,
                                  all_reduce_sum)
            sums = rollout_sums(ro, exp, opts.n_samples_per_prompt, len(funcs), first_rewards, spent["tokens"])
            # 4. Update: num_iterations x minibatches, one optimizer step each.
            losses = update(actor, ro, exp, cfg, opts, topo, step)
            t3 = time.perf_counter()
            # 5. Log and save.
            seconds = {"generate": spent["generate"], "score": spent["score"] + t2 - t1, "train": t3 - t2}
            metrics = step_metrics(sums, all_reduce_sum(loss_fn.take_stats()), losses, metric_names(funcs), reward is not None,
                                   logprob_gap(ro, exp), seconds, rounds if opts.max_refill_rounds else None)
            state.step = step
            state.history.append([step, metrics["GRPO/loss"]])
            train_metrics.append([step, metrics])
            meter.log_metrics(step, metrics, SHOWN)
            if cfg.save_interval and step % cfg.save_interval == 0:
                save(actor, cfg, state, sampler, train_metrics)
                last_saved = step
        meter.close()
        if last_saved != state.step:
            save(actor, cfg, state, sampler, train_metrics)
    return {"step": state.step, "history": state.history, "evals": state.evals, "train_metrics": train_metrics}


# ---------------------------------------------------------------------------------------------
# The step's parts.

def model_specs(cfg, opts) -> dict:
    """The models this run builds: the actor; the reference with kl_coef > 0; the reward model when given."""
    specs = {"actor_path": ModelSpec(cfg, "lm", opts.actor_path, False)}
    frozen = frozen_config(cfg, opts)
    if opts.needs_reference:
        specs["ref_path"] = ModelSpec(with_parts(frozen, opts.ref_parts), "lm", opts.reference_path, True)
    if opts.reward_path:
        specs["reward_path"] = ModelSpec(with_parts(frozen, opts.reward_parts), "value", opts.reward_path, True)
    return specs


def sampling_of(opts) -> SamplingConfig:
    """How the actor samples a group's answers (never greedy: the group needs different answers); the
    log-probs at the sampling temperature, as the loss takes them."""
    return SamplingConfig(greedy=False, temperature=opts.temperature, top_k=opts.top_k, top_p=opts.top_p,
                          repetition_penalty=opts.repetition_penalty, logprob_temperature=opts.logprob_temperature)


def generate_round(actor, actor_plan, reward, sampler, dataset, funcs, tokenizer, stop_ids, pad_id: int, cfg, opts, topo,
                   spent: dict, trainer_state, step: int, round_: int) -> ScoredRound:
    """Collective: round round_ of the step's rollout: rollout_batch_size prompts from rank 0's sampler,
    this replica's share generated, the reward model's scores and the reward functions' rewards. Adds its
    seconds to spent["generate"] (prompts and generation) and spent["score"] (rewards), and on the last
    stage its answer tokens to spent["tokens"]."""
    t0 = time.perf_counter()
    prompts, seeds, records = step_prompt_records(sampler, dataset, opts.rollout_batch_size or cfg.global_batch,
                                                  opts.n_samples_per_prompt, cfg.seed, step, round_)
    ro = generate_rollout(actor, actor_plan, prompts, seeds, cfg, opts, sampling_of(opts), stop_ids, pad_id)
    t1 = time.perf_counter()
    rm_scores = reward_model_scores(ro, reward, cfg)
    rewards = score_rewards(ro, replica_share(records, actor.module, opts.n_samples_per_prompt), rm_scores, funcs,
                            tokenizer, cfg, opts, topo, trainer_state)
    spent["generate"] += t1 - t0
    spent["score"] += time.perf_counter() - t1
    spent["tokens"] += float(ro.answer.sum()) if topo.is_last_stage else 0.0
    return ScoredRound(ro, *rewards, rm_scores)


def micro_feed(ro, cfg) -> tuple[list, list]:
    """The rollout's scoring micro-batches: (row indices, (ids, mask)) per micro-batch."""
    micro_rows = ro.micro_batches(torch.arange(ro.n_rows), cfg.micro_batch)
    return micro_rows, [(ro.ids[r], ro.mask[r]) for r in micro_rows]


def score_logps(ro, actor, ref, cfg, opts) -> tuple:
    """Collective: (actor log-probs, reference log-probs or None), per-micro-batch lists, on the last
    stage (None elsewhere)."""
    micro_rows, feed = micro_feed(ro, cfg)
    token_feed = [(inputs, (ro.tokens[r],)) for inputs, r in zip(feed, micro_rows)]
    token_logps = functools.partial(reduce_token_logps, temperature=opts.logprob_temperature)
    old = forward_only(actor, token_feed, len(feed), token_logps, deferred_logits=cfg.chunked_loss)
    ref_logps = forward_only(ref, token_feed, len(feed), token_logps, deferred_logits=cfg.chunked_loss) if ref else None
    return old, ref_logps


def reward_model_scores(ro, reward, cfg):
    """Collective: the reward model's scores float32[R] on the last stage; None elsewhere or without one."""
    if reward is None:
        return None
    _, feed = micro_feed(ro, cfg)
    scores = forward_only(reward, [(inputs, (last_token_index(inputs[1]),)) for inputs in feed], len(feed), reduce_scores)
    return torch.cat(scores) if scores is not None else None


def score_rewards(ro, records, rm_scores, funcs, tokenizer, cfg, opts, topo, trainer_state=None) -> tuple:
    """Collective: (rewards float64[R], per function float64[R,F]) on the last stage, (None, None)
    elsewhere; a reward function's failure on any replica stops every rank with its message.
    trainer_state: what the functions get as TRL's trainer_state (trainer.rl.rewards.reward_trainer_state)."""
    return score_rows(ro, records, rm_scores, funcs, tokenizer, cfg.max_seq_len, opts.reward_model_weight, opts.section,
                      opts.reward_timeout_s, topo.is_last_stage, trainer_state)


def update(actor, ro, exp, cfg, opts, topo, step: int) -> list:
    """Collective: num_iterations passes over the rollout in minibatches of train_batch_size rows (a
    seeded shuffle, the same on every stage, within each replica's rows); one train_batch each."""
    rows_per_minibatch = cfg.micro_batch * cfg.grad_accum
    orders = [torch.randperm(ro.n_rows, generator=torch.Generator().manual_seed(cfg.seed * 7919 + step * 131 + it))
              for it in range(opts.num_iterations)]
    chunks = [order[k:k + rows_per_minibatch] for order in orders for k in range(0, ro.n_rows, rows_per_minibatch)]
    n_tokens = all_reduce_sum(torch.tensor([float(exp.loss_mask[c].sum()) if exp is not None else 0.0 for c in chunks],
                                           dtype=torch.float64))
    accum_x_replicas = cfg.grad_accum * topo.data
    losses = []
    for chunk, n_global in zip(chunks, n_tokens.tolist()):
        weights = minibatch_weights(exp, chunk, opts, n_global, rows_per_minibatch * topo.data, accum_x_replicas) \
            if exp is not None else None
        micro = ro.micro_batches(torch.arange(len(chunk)), cfg.micro_batch)
        feed = [actor_batch(ro, exp, chunk[r], weights[r] if weights is not None else None) for r in micro]
        losses.append(float(actor.train_batch(data_iter=iter(feed))))
        check_finite_loss(losses[-1], step)
    return losses


def save(actor, cfg, state, sampler, train_metrics: list) -> None:
    checkpoint.save_training(actor, cfg.save_path, state, sampler, cfg.keep_last, extra_state={"train_metrics": train_metrics})


# ---------------------------------------------------------------------------------------------
# The RLHF chain's hooks (trainer/recipes/__init__.py lists them).

REWARD_CURVE = "reward_curve.png"


def state_result(summary: dict) -> dict:
    """The reward curve [[step, reward_mean, kl]]."""
    return {"curve": [[s, m["GRPO/reward_mean"], m["GRPO/kl"]] for s, m in summary["train_metrics"]]}


def headline(result: dict, cfg) -> dict:
    curve = result["curve"]
    window = max(1, min(5, len(curve) // 4))
    mean = lambda rows, col: sum(r[col] for r in rows) / len(rows) if rows else None  # noqa: E731
    return {"window": window, "reward_start": mean(curve[:window], 1), "reward_end": mean(curve[-window:], 1),
            "kl_end": mean(curve[-window:], 2), "reward_curve": str(Path(cfg.save_path) / REWARD_CURVE)}


def headline_text(numbers: dict) -> str:
    from trainer.metrics import format_number as fmt

    s = numbers
    return (f"reward {fmt(s['reward_start'])} -> {fmt(s['reward_end'])} (means of the first / last {s['window']} "
            f"steps), KL {fmt(s['kl_end'])}; curve {s['reward_curve']}")


def write_plots(result: dict, numbers: dict) -> None:
    from trainer.metrics import write_metric_curves

    curve = result["curve"]
    write_metric_curves(numbers["reward_curve"], {"GRPO/reward_mean": [(s, r) for s, r, _ in curve],
                                                  "GRPO/kl": [(s, k) for s, _, k in curve]},
                        "GRPO step", "per answer (mean over the rollout)", "GRPO reward")
