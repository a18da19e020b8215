"""PPO (InstructGPT step 3) on the pipeline engine: actor, critic, reference and reward model as four
PipelineModules on the same (P, D) ranks.

    deepspeed train_ds.py --config configs/ds_config_ppo.json      ("stage": "ppo")

Models (trainer/rl/ppo_options.py has every key): the actor (`actor_path`, LM head) and the critic
(`critic_path`, value head) are trained, each with its own optimizer and scheduler (the critic's
from "ppo": {"critic": {...}}, else the actor's); the reference (`ref_path`, default the actor's
start) and the reward model (`reward_path`, default the critic's start; with ppo.reward_funcs only
when given) are frozen engines with no optimizer. Each may have its own parts; all share the
topology, so stage s of every model is on the same ranks and the last stage of each replica holds
every model's outputs.

One step (every replica works on its own rows; only sums cross replicas):
  1. rollout: rank 0 picks `rollout_batch_size` prompts with their records (trainer.rl.rollout), each
     replica generates its share of them, n_samples_per_prompt answers each, with the actor's current
     weights (trainer.generation.decoding: KV-cached, micro-batches in flight across the stages), laid
     out at one fixed width S = max_seq_len + max_new_tokens (PPOOptions.rollout_width).
  2. score, pipelined forward-only passes (trainer.engine.forward_only) over micro-batches of the rows: the
     actor's log-probs recomputed with the training forward (the "old" log-probs of the ratio), the
     reference's log-probs, the critic's values, and the reward model's score at each row's last
     real token (models.heads.last_token_index: the RM recipe's rule); the reward functions on the
     decoded answers (trainer.rl.rewards, GRPO's: a failure stops every rank). A row's score =
     sum_f w_f r_f (None skipped) + reward_model_weight x the RM score.
  3. advantages (trainer.rl.rollout.make_experience with trainer.rl.ppo_math, on the last stage):
     -kl_coef * KL_t per answer token (or a KL loss term), the clipped score (then minus missing_eos_penalty)
     at the last answer token; GAE; returns = advantages + values; advantages whitened over the whole
     rollout (sums all-reduced).
  4. update: ppo_epochs x minibatches of train_batch_size rows (a seeded shuffle, the same on every
     stage), each one train_batch of the actor (clipped surrogate) and one of the critic (clipped
     value loss), the tensors riding in the labels tuple to the last stage (trainer.rl.ppo_losses),
     normalised over the minibatch's answer tokens as SFT normalises. Minibatches are drawn within
     each replica's own rows (as each DeepSpeed-Chat rank trains on its own experience). Optional:
     PPO-ptx (`ptx_coef`, trainer.rl.ptx: after each actor step, one more on LM records of
     `ptx_data_path`, at the rollout width so the pipeline's shapes stay fixed) and an EMA of the actor (`ema_decay`,
     trainer.rl.ema, updated after every actor step).

Setup (trainer.rl.ppo_models): the four models' configs, their joint "auto" split, their checks.

Metrics (trainer.rl.ppo_metrics; rank 0; DeepSpeed's monitor: CSV / TensorBoard / W&B as configured, and the progress bar):
PPO/reward_mean, PPO/reward_std (per row: sum of its token rewards), PPO/score_mean (the rows' score
before the clip: the RM's and/or the reward functions' weighted sum), PPO/rewards/<function>/mean (over
the rows it applied to), PPO/rm_score_mean (the RM's raw score, with both an RM and functions),
PPO/kl (per row: sum of the KL estimate over its answer; of KL(pi || ref) at T = 1 by default,
of KL(pi_T || ref_T) with logprobs_at_temperature, see trainer/rl/ppo_options.py), PPO/loss (the actor's whole loss),
PPO/policy_loss (the clipped surrogate alone), PPO/kl_loss (the KL loss term's estimate, kl_in_reward
false), PPO/value_loss, PPO/clip_frac (tokens whose clip is active), PPO/approx_kl, PPO/entropy (means
over the update's answer tokens),
PPO/response_length, PPO/logprob_gap (max |generation log-prob - training-forward log-prob| over
the answer tokens: ~1e-6 in fp32, the same weights), PPO/gen_tokens_per_s (answer tokens generated
/ generation seconds), PPO/train_tokens_per_s (real rollout tokens x ppo_epochs / update seconds,
actor and critic together), PPO/time_generate_s, PPO/time_score_s, PPO/time_train_s.

Checkpoints: SAVE_PATH is the actor's save_path (layer files, side files, trainer_state with the
prompt sampler's position and the metrics, every rank's RNG); the critic is saved with it in
SAVE_PATH/critic/global_stepN (and the EMA in SAVE_PATH/ema/global_stepN); SAVE_PATH/latest moves
last, once all are complete. Export:
    python convert_model.py pp_to_hg --input-path SAVE_PATH --save-path actor_hf          (*ForCausalLM)
    python convert_model.py pp_to_hg --input-path SAVE_PATH/critic --save-path critic_hf  (*ForSequenceClassification)
    python convert_model.py pp_to_hg --input-path SAVE_PATH/ema --save-path actor_ema_hf  (with ema_decay)
"""
import contextlib
import functools
import logging
import time
from pathlib import Path

import torch

from models.heads import last_token_index, set_defer_logits
from trainer.batches import build_data_rank0_first, token_scale
from trainer.engine import checkpoint
from trainer.engine.build import build_engine, disable_dropout, frozen_engine
from trainer.engine.distributed import all_reduce_sum, broadcast_object
from trainer.engine.forward_only import forward_only
from trainer.engine.guards import check_finite_loss
from trainer.engine.memory import memory_budget
from trainer.engine.preflight import preflight
from trainer.generation.decoding import replica_share
from trainer.generation.stop_ids import answer_stop_ids
from trainer.generation.token_sampling import SamplingConfig
from trainer.metrics import StepMeter, log_plan
from trainer.rl.ema import ActorEMA
from trainer.rl.ppo_losses import ActorLoss, CriticLoss, reduce_scores, reduce_token_logps, reduce_values
from trainer.rl.ppo_metrics import logprob_gap, rollout_sums, step_metrics, whitening_moments
from trainer.rl.ppo_models import check_models, critic_config, frozen_config, log_plans, model_configs, plan_models
from trainer.rl.ptx import load_ptx_batches, ptx_step
from trainer.rl.rewards import load_reward_functions, metric_names, reward_trainer_state, score_rows
from trainer.rl.rollout import (
    PromptSampler,
    actor_batch,
    critic_batch,
    generate_rollout,
    make_experience,
    step_prompt_records,
    whiten_advantages,
)

logger = logging.getLogger("pipetune")
CRITIC_DIR = "critic"
EMA_DIR = "ema"
SHOWN = {"reward": "PPO/reward_mean", "score": "PPO/score_mean", "kl": "PPO/kl", "len": "PPO/response_length"}


def run(cfg, topo, device_name: str) -> dict:
    """Train; returns {"step", "history" ([step, policy loss]), "evals" ([]), "train_metrics"
    ([step, {PPO/...}]), "models" (the config keys of the models built)} on every rank. Collective: every
    rank calls it."""
    from transformers import AutoTokenizer

    hosts = preflight(cfg, topo.rank, topo.world_size)
    opts = cfg.options
    specs = model_configs(cfg, opts)
    plans = plan_models(cfg, opts, memory_budget(), specs)
    actor_plan, critic_plan, ref_plan, reward_plan = (plans.get(k) for k in ("actor_path", "critic_path", "ref_path", "reward_path"))
    tokenizer = AutoTokenizer.from_pretrained(actor_plan.side_dir)
    check_models(cfg, opts, tokenizer, plans)
    funcs = load_reward_functions(opts)

    # Prompts: rank 0 only (it broadcasts each step's); a data error stops every rank.
    data = build_data_rank0_first(cfg, tokenizer, "prompt", topo, build_here=False)
    n_prompts, pad_id = broadcast_object((len(data.train), data.stats["pad"]["id"]) if data is not None else None)
    prompts_per_step = opts.rollout_batch_size or cfg.global_batch
    minibatches = opts.rollout_rows(cfg.global_batch) // cfg.global_batch
    total_steps = cfg.train_steps or max(1, cfg.n_epochs * n_prompts // prompts_per_step)
    # What the schedulers count: one actor and one critic step per minibatch (+ one ptx step of the actor).
    optimizer_steps = total_steps * opts.ppo_epochs * minibatches
    sampler = PromptSampler(n_prompts, cfg.seed) if topo.rank == 0 else None

    resume_from = checkpoint.decide_resume(cfg.save_path, cfg.resume)
    if topo.rank == 0:
        log_plan("ppo actor", cfg, actor_plan, data.stats)
        log_plans(specs, plans)
        logger.info("ppo: %d prompts per step x %d samples = %d rows, %d minibatch(es) x %d epoch(s) = %d optimizer "
                    "steps per PPO step, %d PPO steps", prompts_per_step, opts.n_samples_per_prompt,
                    opts.rollout_rows(cfg.global_batch), minibatches, opts.ppo_epochs, opts.ppo_epochs * minibatches, total_steps)
    weights = "checkpoint" if resume_from else "load"
    actor_loss = ActorLoss(opts)
    actor = build_engine(cfg, actor_plan, topo, optimizer_steps * (2 if opts.ptx_coef else 1), weights=weights, loss_fn=actor_loss)
    critic = build_engine(critic_config(cfg, opts), critic_plan, topo, optimizer_steps, weights=weights, loss_fn=CriticLoss(opts))
    set_defer_logits(actor.module, cfg.chunked_loss)  # the actor's loss computes the head chunk by chunk
    if opts.disable_dropout:
        disable_dropout(actor.module)
        disable_dropout(critic.module)
    ema = ActorEMA(actor.module, opts.ema_decay, topo.dp_rank) if opts.ema_decay else None
    companions = {CRITIC_DIR: critic, **({EMA_DIR: ema} if ema else {})}
    ptx = load_ptx_batches(cfg, opts, tokenizer, topo) if opts.ptx_coef else None
    frozen_cfg = frozen_config(cfg, opts)
    with frozen_engine(frozen_cfg, ref_plan, topo) as ref, frozen_or_none(frozen_cfg, reward_plan, topo) as reward:
        if topo.rank == 0:
            prepare_save_paths(cfg, actor_plan, critic_plan, ema is not None, pad_id, topo, hosts)
        state = checkpoint.start_or_resume(actor, resume_from, sampler, companions={CRITIC_DIR: critic})
        train_metrics = resume_extras(state, ptx, ema, resume_from, topo)
        stop_ids = answer_stop_ids(tokenizer, actor_plan.model_config, actor_plan.side_dir)
        meter = StepMeter(cfg, actor_plan, actor, topo, device_name, total_steps, state.step, desc="ppo")
        last_saved = state.step if resume_from else None
        for step in range(state.step + 1, total_steps + 1):
            # 1. Rollout: this replica's share of the step's prompts (all samples of a prompt together), by the actor.
            t0 = time.perf_counter()
            prompts, seeds, records = step_prompt_records(sampler, data.train if data else None, prompts_per_step,
                                                          opts.n_samples_per_prompt, cfg.seed, step)
            ro = generate_rollout(actor, actor_plan, prompts, seeds, cfg, opts, sampling_of(opts), stop_ids, pad_id)
            t1 = time.perf_counter()
            # 2. Score: the models' forward-only passes; the reward functions; results on the last stage.
            old_logps, ref_logps, values, rm_scores = score_rollout(ro, actor, ref, critic, reward, cfg, opts)
            scores, per_function = score_rewards(ro, replica_share(records, actor.module, opts.n_samples_per_prompt),
                                                 rm_scores, funcs, tokenizer, cfg, opts, topo,
                                                 reward_trainer_state(step, total_steps))
            t2 = time.perf_counter()
            # 3. Advantages: token rewards, GAE, returns (last stage); whitened over the whole rollout.
            exp = make_experience(ro, old_logps, ref_logps, values, scores, per_function, rm_scores, opts) \
                if topo.is_last_stage else None
            rollout_stats = rollout_sums(ro, exp, len(funcs))
            if opts.whiten_advantages:
                whiten_advantages(exp, ro, *whitening_moments(rollout_stats)[1:])
            # 4. Update: ppo_epochs x minibatches, one optimizer step of each model per minibatch.
            losses = update(actor, critic, ro, exp, cfg, opts, topo, step, ptx, ema)
            t3 = time.perf_counter()
            # 5. Log and save.
            metrics = step_metrics(rollout_stats, all_reduce_sum(actor_loss.take_stats()), losses, logprob_gap(ro, exp),
                                   opts.ppo_epochs, {"generate": t1 - t0, "score": t2 - t1, "train": t3 - t2},
                                   metric_names(funcs), reward is not None and bool(funcs))
            state.step = step
            state.history.append([step, metrics["PPO/loss"]])
            train_metrics.append([step, metrics])
            meter.log_metrics(step, metrics, SHOWN)
            if cfg.save_interval and step % cfg.save_interval == 0:
                save(actor, cfg, state, sampler, companions, train_metrics, ptx, topo)
                last_saved = step
        meter.close()
        if last_saved != state.step:
            save(actor, cfg, state, sampler, companions, train_metrics, ptx, topo)
    return {"step": state.step, "start_step": meter.start_step, "history": state.history, "evals": state.evals,
            "train_metrics": train_metrics, "models": list(plans)}


# ---------------------------------------------------------------------------------------------
# The step's parts.

def frozen_or_none(cfg, plan, topo):
    """The reward model's frozen engine; None (no engine) when the reward functions score alone (plan None)."""
    return frozen_engine(cfg, plan, topo) if plan is not None else contextlib.nullcontext()


def sampling_of(opts) -> SamplingConfig:
    """How the actor samples its answers (and at which temperature its log-probs are taken)."""
    return SamplingConfig(greedy=opts.greedy, temperature=opts.temperature, top_k=opts.top_k, top_p=opts.top_p,
                          repetition_penalty=opts.repetition_penalty, logprob_temperature=opts.logprob_temperature)


def score_rollout(ro, actor, ref, critic, reward, cfg, opts) -> tuple:
    """Collective: (actor log-probs, reference log-probs, critic values: each a list of per-micro-batch
    tensors; the reward model's scores float32[R] or None without one) on the last stage (None elsewhere)."""
    n_micro = ro.n_rows // cfg.micro_batch
    micro_rows = ro.micro_batches(torch.arange(ro.n_rows), cfg.micro_batch)
    feed = [(ro.ids[r], ro.mask[r]) for r in micro_rows]
    token_feed = [(inputs, (ro.tokens[r],)) for inputs, r in zip(feed, micro_rows)]
    token_logps = functools.partial(reduce_token_logps, temperature=opts.logprob_temperature)
    old = forward_only(actor, token_feed, n_micro, token_logps, deferred_logits=cfg.chunked_loss)
    ref_logps = forward_only(ref, token_feed, n_micro, token_logps, deferred_logits=cfg.chunked_loss)
    values = forward_only(critic, token_feed, n_micro, reduce_values)
    rm_scores = None
    if reward is not None:
        rm_scores = forward_only(reward, [(inputs, (last_token_index(inputs[1]),)) for inputs in feed], n_micro, reduce_scores)
        rm_scores = torch.cat(rm_scores) if rm_scores is not None else None
    return old, ref_logps, values, rm_scores


def score_rewards(ro, records: list, rm_scores, funcs: list, tokenizer, cfg, opts, topo, trainer_state=None) -> tuple:
    """Collective: (each row's score float64[R] = sum_f w_f r_f (None skipped) + reward_model_weight x the
    RM score, each function's rewards float64[R,F]) on the last stage, (None, None) elsewhere; a reward
    function's failure on any replica stops every rank with its message. records: this replica's rows';
    trainer_state: what the functions get as TRL's trainer_state (trainer.rl.rewards.reward_trainer_state)."""
    return score_rows(ro, records, rm_scores, funcs, tokenizer, cfg.max_seq_len, opts.reward_model_weight, opts.section,
                      opts.reward_timeout_s, topo.is_last_stage, trainer_state)


def update(actor, critic, ro, exp, cfg, opts, topo, step: int, ptx, ema) -> dict:
    """Collective: ppo_epochs passes over the rollout in minibatches of train_batch_size rows (a seeded
    shuffle, the same on every stage, within each replica's own rows); per minibatch one train_batch
    of the actor, one of the critic (+ ptx, + EMA update). Returns each minibatch's losses by model."""
    rows_per_minibatch = cfg.micro_batch * cfg.grad_accum
    orders = [torch.randperm(ro.n_rows, generator=torch.Generator().manual_seed(cfg.seed * 7919 + step * 131 + epoch))
              for epoch in range(opts.ppo_epochs)]
    chunks = [order[k:k + rows_per_minibatch] for order in orders for k in range(0, ro.n_rows, rows_per_minibatch)]
    # answer tokens of each minibatch over its replicas (counted once per replica: on its last stage)
    n_tokens = all_reduce_sum(torch.tensor([float(ro.answer[c].sum()) if topo.is_last_stage else 0.0 for c in chunks],
                                           dtype=torch.float64))
    losses = {"policy": [], "value": [], "ptx": []}
    for chunk, n_global in zip(chunks, n_tokens.tolist()):
        scale = token_scale(n_global, cfg.grad_accum * topo.data)
        micro = ro.micro_batches(chunk, cfg.micro_batch)
        losses["policy"].append(float(actor.train_batch(data_iter=iter([actor_batch(ro, exp, r, scale) for r in micro]))))
        losses["value"].append(float(critic.train_batch(data_iter=iter([critic_batch(ro, exp, r, scale) for r in micro]))))
        if ptx is not None:
            losses["ptx"].append(ptx_step(actor, ptx, opts.ptx_coef, cfg.grad_accum * topo.data))
        if ema:
            ema.update()
        for name in losses:
            for loss in losses[name][-1:]:
                check_finite_loss(loss, step)
    return losses


# ---------------------------------------------------------------------------------------------
# Checkpoints: the actor's save_path holds the critic (and the EMA) beside it.

def prepare_save_paths(cfg, actor_plan, critic_plan, with_ema: bool, pad_id: int, topo, hosts) -> None:
    """Rank 0: the side files of the actor's, the critic's (and the EMA's) checkpoint folders."""
    checkpoint.prepare_save_path(cfg.save_path, actor_plan, cfg.config_path, cfg.precision, pad_id)
    checkpoint.prepare_save_path(f"{cfg.save_path}/{CRITIC_DIR}", critic_plan, cfg.config_path, cfg.precision, pad_id)
    if with_ema:
        checkpoint.prepare_save_path(f"{cfg.save_path}/{EMA_DIR}", actor_plan, cfg.config_path, cfg.precision, pad_id)
    checkpoint.write_topology(cfg.save_path, actor_plan, topo, hosts)


def resume_extras(state, ptx, ema, resume_from, topo) -> list:
    """Collective: what PPO adds to a resumed checkpoint (the metrics so far, returned; the ptx data
    position; the EMA), from the trainer state checkpoint.start_or_resume broadcast."""
    if ptx is not None and state.extra.get("ptx_data"):
        ptx.load_state_dict(state.extra["ptx_data"])
    if ema and resume_from:
        folder = Path(resume_from[0]) / EMA_DIR / resume_from[1]
        if folder.is_dir():
            ema.load(folder)
        elif topo.rank == 0:  # a run that enables ema_decay on resume: the average starts from the actor
            logger.warning("ppo: %s has no EMA; the average starts from the resumed actor's weights", folder)
    return list(state.extra.get("train_metrics", []))


def save(actor, cfg, state, sampler, companions: dict, train_metrics: list, ptx, topo) -> None:
    """Collective: the actor with its companions, the metrics so far and rank 0's ptx data position."""
    extra = {"train_metrics": train_metrics,
             "ptx_data": broadcast_object(ptx.state_dict() if ptx is not None and topo.rank == 0 else None)}
    checkpoint.save_training(actor, cfg.save_path, state, sampler, cfg.keep_last, companions, extra_state=extra)



# ---------------------------------------------------------------------------------------------
# The RLHF chain's hooks (listed in trainer/recipes/__init__.py; trainer/chain.py calls them).

REWARD_CURVE = "reward_curve.png"  # in save_path, drawn by the chain from the state file's curve


def exports(cfg) -> list[tuple[Path, Path]]:
    """The actor -> save_path/hf (*ForCausalLM), the critic -> critic_hf (*ForSequenceClassification),
    with ema_decay the actor's EMA -> ema_hf."""
    save = Path(cfg.save_path)
    pairs = [(save, save / "hf"), (save / CRITIC_DIR, save / f"{CRITIC_DIR}_hf")]
    if cfg.options.ema_decay:
        pairs.append((save / EMA_DIR, save / f"{EMA_DIR}_hf"))
    return pairs


def state_result(summary: dict) -> dict:
    """The reward curve [[step, reward_mean, score_mean, kl]]."""
    return {"curve": [[s, m["PPO/reward_mean"], m["PPO/score_mean"], m["PPO/kl"]] for s, m in summary["train_metrics"]]}


def headline(result: dict, cfg) -> dict:
    return {**reward_trend(result["curve"]), "reward_curve": str(Path(cfg.save_path) / REWARD_CURVE),
            "score_name": score_name(cfg.options)}


def score_name(opts) -> str:
    """What PPO/score_mean is, in words: the reward model's score, the reward functions' or both."""
    if not opts.reward_funcs:
        return "RM score"
    return "score (RM + reward functions)" if opts.reward_path else "reward functions' score"


def reward_trend(curve: list) -> dict:
    """PPO's start and end: means over the first and the last `window` steps (a quarter of the run,
    1 to 5 steps: one rollout's mean is noisy)."""
    window = max(1, min(5, len(curve) // 4))
    first, last = curve[:window], curve[-window:]

    def mean(rows: list, column: int):
        return sum(r[column] for r in rows) / len(rows) if rows else None

    return {"window": window, "reward_start": mean(first, 1), "reward_end": mean(last, 1),
            "score_start": mean(first, 2), "score_end": mean(last, 2), "kl_end": mean(last, 3)}


def headline_text(numbers: dict) -> str:
    from trainer.metrics import format_number as fmt

    s = numbers
    return (f"reward {fmt(s['reward_start'])} -> {fmt(s['reward_end'])} (means of the first / last {s['window']} "
            f"steps; {s.get('score_name', 'RM score')} {fmt(s['score_start'])} -> {fmt(s['score_end'])}), "
            f"KL {fmt(s['kl_end'])}; "
            f"curve {s['reward_curve']}")


def write_plots(result: dict, numbers: dict) -> None:
    """The reward curve (reward, raw score, KL per step) where the headline names it."""
    from trainer.metrics import write_metric_curves

    curve = result["curve"]
    score = numbers.get("score_name", "RM score")
    write_metric_curves(numbers["reward_curve"], {f"reward ({score} - KL penalty)": [(s, r) for s, r, _, _ in curve],
                                                  score: [(s, c) for s, _, c, _ in curve]},
                        "PPO step", "reward per answer (mean over the rollout)", "PPO reward",
                        right={"KL to the reference": [(s, k) for s, _, _, k in curve]},
                        right_ylabel="KL (nats per answer)")
