"""PPO (InstructGPT step 3) on the pipeline engine: actor, critic, reference and reward model as four
PipelineModules on the same (P, D) ranks.

    deepspeed train_ds.py --config configs/ds_config_ppo.json      ("stage": "ppo")

Models (trainer/rl/ppo_options.py has every key): the actor (`actor_path`, LM head) and the critic
(`critic_path`, value head) are trained, each with its own optimizer and scheduler (the critic's
from "ppo": {"critic": {...}}, else the actor's); the reference (`ref_path`, default the actor's
start) and the reward model (`reward_path`, default the critic's start) are frozen engines with no
optimizer. Each may have its own parts; all four share the topology, so stage s of every model is
on the same ranks and the last stage of each replica holds every model's outputs.

One step (every replica works on its own rows; only sums cross replicas):
  1. rollout: rank 0 picks `rollout_batch_size` prompts (trainer.rl.rollout), each replica generates
     its share with the actor's current weights (trainer.generation.decoding: KV-cached, micro-batches in
     flight across the stages), laid out at one fixed width S = max_seq_len + max_new_tokens.
  2. score, pipelined forward-only passes (trainer.engine.forward_only) over micro-batches of the rows: the
     actor's log-probs recomputed with the training forward (the "old" log-probs of the ratio), the
     reference's log-probs, the critic's values, and the reward model's score at each row's last
     real token (models.heads.last_token_index: the RM recipe's rule).
  3. rewards (trainer.rl.ppo_math, on the last stage): -kl_coef * KL_t per answer token (or a KL loss
     term), the clipped score (minus missing_eos_penalty) at the last answer token; GAE; returns =
     advantages + values; advantages whitened over the whole rollout (sums all-reduced).
  4. update: ppo_epochs x minibatches of train_batch_size rows (a seeded shuffle, the same on every
     stage), each one train_batch of the actor (clipped surrogate) and one of the critic (clipped
     value loss), the tensors riding in the labels tuple to the last stage (trainer.rl.ppo_losses),
     normalised over the minibatch's answer tokens as SFT normalises. Minibatches are drawn within
     each replica's own rows (as each DeepSpeed-Chat rank trains on its own experience). Optional:
     PPO-ptx (`ptx_coef`: after each actor step, one more on LM records of `ptx_data_path`, at the
     rollout width so the pipeline's shapes stay fixed) and an EMA of the actor (`ema_decay`,
     trainer.rl.ema, updated after every actor step).

Metrics (rank 0; DeepSpeed's monitor: CSV / TensorBoard / W&B as configured, and the progress bar):
PPO/reward_mean, PPO/reward_std (per row: sum of its token rewards), PPO/score_mean (the raw RM
score), PPO/kl (per row: sum of the KL estimate over its answer), PPO/policy_loss, PPO/value_loss,
PPO/clip_frac, PPO/approx_kl, PPO/entropy (means over the update's answer tokens),
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
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from models.heads import last_token_index, set_defer_logits
from models.pipe_dir import CheckpointError, read_metadata, resolve_checkpoint_dir
from trainer.batches import build_data_rank0_first
from trainer.config import ModelTopo
from trainer.engine import checkpoint
from trainer.engine.auto_parts import AutoPartsError, format_bytes
from trainer.engine.build import build_engine, disable_dropout
from trainer.engine.distributed import all_reduce_sum, broadcast_object
from trainer.engine.forward_only import forward_only
from trainer.engine.guards import check_finite_loss
from trainer.engine.memory import memory_budget
from trainer.engine.plan import plan_model
from trainer.engine.preflight import preflight
from trainer.generation.decoding import generate, replica_share
from trainer.generation.token_sampling import SamplingConfig
from trainer.metrics import log_plan, write_events
from trainer.rl.ema import ActorEMA
from trainer.rl.ppo_losses import ACTOR_STATS, ActorLoss, CriticLoss, reduce_scores, reduce_token_logps, reduce_values
from trainer.rl.ppo_math import gae, kl_estimate, token_rewards
from trainer.rl.reference_logps import frozen_reference_engine
from trainer.rl.rollout import PromptSampler, fixed_width_rollout, step_prompts

logger = logging.getLogger("pipetune")
CRITIC_DIR = "critic"
EMA_DIR = "ema"
MONITOR_KEYS = ("tensorboard", "csv_monitor", "wandb", "comet")


def run(cfg, topo, device_name: str) -> dict:
    """Train; returns {"step", "history" ([step, policy loss]), "evals" ([]), "train_metrics"
    ([step, {PPO/...}])} on every rank. Collective: every rank calls it."""
    from transformers import AutoTokenizer

    hosts = preflight(cfg, topo.rank, topo.world_size)
    opts = cfg.options
    plans = plan_models(cfg, opts, memory_budget())
    actor_plan, critic_plan, ref_plan, reward_plan = plans.values()
    tokenizer = AutoTokenizer.from_pretrained(actor_plan.side_dir)
    check_models(cfg, opts, tokenizer, plans)

    # Prompts: rank 0 only (it broadcasts each step's); a data error stops every rank.
    data = build_data_rank0_first(cfg, tokenizer, "prompt", topo, build_here=False)
    n_prompts, pad_id = broadcast_object((len(data.train), data.stats["pad"]["id"]) if data is not None else None)
    prompts_per_step = opts.rollout_batch_size or cfg.global_batch
    rows = opts.rollout_rows(cfg.global_batch)
    minibatches = rows // cfg.global_batch
    total_steps = cfg.train_steps or max(1, cfg.n_epochs * n_prompts // prompts_per_step)
    # What the schedulers count: one actor and one critic step per minibatch (+ one ptx step of the actor).
    optimizer_steps = total_steps * opts.ppo_epochs * minibatches
    actor_steps = optimizer_steps * (2 if opts.ptx_coef else 1)
    sampler = PromptSampler(n_prompts, cfg.seed) if topo.rank == 0 else None

    resume_from = checkpoint.decide_resume(cfg.save_path, cfg.resume)
    if topo.rank == 0:
        log_plan("ppo actor", cfg, actor_plan, data.stats)
        log_co_resident_plans(cfg, opts, plans)
        logger.info("ppo: %d prompts per step x %d samples = %d rows, %d minibatch(es) x %d epoch(s) = %d optimizer "
                    "steps per PPO step, %d PPO steps", prompts_per_step, opts.n_samples_per_prompt, rows, minibatches,
                    opts.ppo_epochs, opts.ppo_epochs * minibatches, total_steps)
    weights = "checkpoint" if resume_from else "load"
    actor_loss = ActorLoss(opts)
    actor = build_engine(cfg, actor_plan, topo, actor_steps, weights=weights, loss_fn=actor_loss)
    critic = build_engine(critic_config(cfg, opts), critic_plan, topo, optimizer_steps, weights=weights, loss_fn=CriticLoss(opts))
    set_defer_logits(actor.module, cfg.chunked_loss)  # the actor's loss computes the head chunk by chunk
    if opts.disable_dropout:
        disable_dropout(actor.module)
        disable_dropout(critic.module)
    ema = ActorEMA(actor.module, opts.ema_decay, topo.dp_rank) if opts.ema_decay else None
    companions = {CRITIC_DIR: critic, **({EMA_DIR: ema} if ema else {})}
    ptx = load_ptx_batches(cfg, opts, tokenizer, topo) if opts.ptx_coef else None
    frozen_cfg = frozen_config(cfg, opts)
    with frozen_reference_engine(frozen_cfg, ref_plan, topo) as ref, frozen_reference_engine(frozen_cfg, reward_plan, topo) as reward:
        if topo.rank == 0:
            checkpoint.prepare_save_path(cfg.save_path, actor_plan, cfg.config_path, cfg.precision, pad_id)
            checkpoint.prepare_save_path(f"{cfg.save_path}/{CRITIC_DIR}", critic_plan, cfg.config_path, cfg.precision, pad_id)
            if ema:
                checkpoint.prepare_save_path(f"{cfg.save_path}/{EMA_DIR}", actor_plan, cfg.config_path, cfg.precision, pad_id)
            checkpoint.write_topology(cfg.save_path, actor_plan, topo, hosts)
        state = checkpoint.start_or_resume(actor, resume_from, sampler, companions={CRITIC_DIR: critic})
        saved = broadcast_object(saved_trainer_state(resume_from) if topo.rank == 0 else None)
        train_metrics = saved.get("train_metrics", [])
        if ptx is not None and saved.get("ptx_data"):
            ptx.load_state_dict(saved["ptx_data"])
        if ema and resume_from:
            resume_ema(ema, resume_from, topo)

        sampling = SamplingConfig(greedy=opts.greedy, temperature=opts.temperature, top_k=opts.top_k, top_p=opts.top_p,
                                  repetition_penalty=opts.repetition_penalty)
        stop_ids = answer_stop_ids(tokenizer, actor_plan)
        bar = tqdm(total=total_steps, initial=state.step, desc="ppo", unit="step", disable=topo.rank != 0, dynamic_ncols=True)
        last_saved = state.step if resume_from else None
        for step in range(state.step + 1, total_steps + 1):
            # 1. Rollout: this replica's share of the step's prompts, generated by the actor.
            t0 = time.perf_counter()
            prompts, seeds = step_prompts(sampler, data.train if data else None, prompts_per_step,
                                          opts.n_samples_per_prompt, cfg.seed, step)
            gen = generate(actor.module, actor_plan.model_config, replica_share(prompts, actor.module),
                           max_new_tokens=opts.max_new_tokens, stop_ids=stop_ids, pad_id=pad_id, sampling=sampling,
                           seeds=replica_share(seeds, actor.module), max_context=cfg.max_seq_len + opts.max_new_tokens)
            ro = fixed_width_rollout(gen, cfg.max_seq_len, opts.max_new_tokens, pad_id)
            t1 = time.perf_counter()

            # 2. Score: pipelined forward-only passes; results on the last stage.
            n_micro = ro.n_rows // cfg.micro_batch
            micro_rows = ro.micro_batches(torch.arange(ro.n_rows), cfg.micro_batch)
            feed = [(ro.ids[r], ro.mask[r]) for r in micro_rows]
            token_feed = [(inputs, (ro.tokens[r],)) for inputs, r in zip(feed, micro_rows)]
            old_logps = forward_only(actor, token_feed, n_micro, reduce_token_logps, deferred_logits=cfg.chunked_loss)
            ref_logps = forward_only(ref, token_feed, n_micro, reduce_token_logps, deferred_logits=cfg.chunked_loss)
            old_values = forward_only(critic, token_feed, n_micro, reduce_values)
            scores = forward_only(reward, [(inputs, (last_token_index(inputs[1]),)) for inputs in feed], n_micro, reduce_scores)
            t2 = time.perf_counter()

            # 3. Rewards, advantages, returns (last stage); whitening over the whole rollout.
            scored = None
            if topo.is_last_stage:
                old_logps, ref_logps, old_values, scores = (torch.cat(x) for x in (old_logps, ref_logps, old_values, scores))
                kl = kl_estimate(old_logps, ref_logps, opts.kl_estimator) * ro.answer
                rewards = token_rewards(kl if opts.kl_in_reward else torch.zeros_like(kl), scores, ro.answer, opts.kl_coef,
                                        opts.reward_clip, ro.ended, opts.missing_eos_penalty)
                advantages, returns = gae(rewards, old_values * ro.answer, ro.answer, opts.gamma, opts.lam)
                scored = {"old_logps": old_logps, "ref_logps": ref_logps, "old_values": old_values, "advantages": advantages,
                          "returns": returns, "kl": kl, "rewards": rewards, "scores": scores}
            rollout_stats = rollout_sums(ro, scored)
            if opts.whiten_advantages:
                n, mean, var = whitening_moments(rollout_stats)
                if scored is not None:
                    scored["advantages"] = (scored["advantages"] - mean) * torch.rsqrt(torch.tensor(var + 1e-8)) * ro.answer

            # 4. Update: ppo_epochs x minibatches, one optimizer step of each model per minibatch.
            rows_per_minibatch = cfg.micro_batch * cfg.grad_accum
            orders = [torch.randperm(ro.n_rows, generator=torch.Generator().manual_seed(cfg.seed * 7919 + step * 131 + epoch))
                      for epoch in range(opts.ppo_epochs)]
            chunks = [order[k:k + rows_per_minibatch] for order in orders for k in range(0, ro.n_rows, rows_per_minibatch)]
            # answer tokens of each minibatch over its replicas (counted once per replica: on its last stage)
            n_tokens = all_reduce_sum(torch.tensor([float(ro.answer[c].sum()) if topo.is_last_stage else 0.0 for c in chunks],
                                                   dtype=torch.float64))
            policy_losses, value_losses, ptx_losses = [], [], []
            for chunk, n_global in zip(chunks, n_tokens.tolist()):
                token_scale = torch.tensor(cfg.grad_accum * topo.data / max(n_global, 1.0), dtype=torch.float64)
                micro = ro.micro_batches(chunk, cfg.micro_batch)
                policy_losses.append(float(actor.train_batch(data_iter=iter(
                    [actor_batch(ro, scored, r, token_scale) for r in micro]))))
                value_losses.append(float(critic.train_batch(data_iter=iter(
                    [critic_batch(ro, scored, r, token_scale) for r in micro]))))
                if ptx is not None:
                    ptx_losses.append(ptx_step(actor, ptx, opts.ptx_coef, cfg.grad_accum * topo.data))
                if ema:
                    ema.update()
                for loss in policy_losses[-1:] + value_losses[-1:] + ptx_losses[-1:]:
                    check_finite_loss(loss, step)
            t3 = time.perf_counter()

            metrics = step_metrics(rollout_stats, all_reduce_sum(actor_loss.take_stats()),
                                   policy_losses, value_losses, logprob_gap(ro, scored), opts, t1 - t0, t2 - t1, t3 - t2)
            if ptx_losses:
                metrics["PPO/ptx_loss"] = sum(ptx_losses) / len(ptx_losses)
            state.step = step
            state.history.append([step, metrics["PPO/policy_loss"]])
            train_metrics.append([step, metrics])
            if topo.rank == 0:
                write_events(actor, [(k, v, step) for k, v in metrics.items()])
                bar.set_postfix({"reward": f"{metrics['PPO/reward_mean']:.3g}", "score": f"{metrics['PPO/score_mean']:.3g}",
                                 "kl": f"{metrics['PPO/kl']:.3g}", "len": f"{metrics['PPO/response_length']:.3g}"})
                bar.update(1)
            if cfg.save_interval and step % cfg.save_interval == 0:
                checkpoint.save_training(actor, cfg.save_path, state, sampler, cfg.keep_last, companions,
                                         extra_state=extra_state(train_metrics, ptx, topo))
                last_saved = step
        bar.close()
        if last_saved != state.step:
            checkpoint.save_training(actor, cfg.save_path, state, sampler, cfg.keep_last, companions,
                                     extra_state=extra_state(train_metrics, ptx, topo))
    return {"step": state.step, "history": state.history, "evals": state.evals, "train_metrics": train_metrics}


# ---------------------------------------------------------------------------------------------
# Setup.

def with_parts(cfg, parts):
    """cfg with another model's layers per stage (None: cfg's own)."""
    if parts is None:
        return cfg
    return dataclasses.replace(cfg, model_topo=ModelTopo(cfg.model_topo.pipe, cfg.model_topo.data, parts))


def model_configs(cfg, opts) -> dict:
    """key -> (the config each model is built with, head, path, frozen) for the four models."""
    critic_parts = opts.critic.get("parts")
    frozen = frozen_config(cfg, opts)
    return {"actor_path": (cfg, "lm", opts.actor_path, False),
            "critic_path": (critic_config(cfg, opts), "value", opts.critic_path, False),
            "ref_path": (with_parts(frozen, opts.ref_parts), "lm", opts.reference_path, True),
            "reward_path": (with_parts(frozen, opts.reward_parts or critic_parts), "value",
                            opts.reward_model_path, True)}


def plan_models(cfg, opts, device_budget) -> dict:
    """The four models' plans (actor, critic, reference, reward, in that order). They share every
    rank's device, so "auto" parts must fit the four together on each stage. From the
    compute-balanced splits (kept when they fit together):
    1. while some "auto" model does not fit, the one that needs most is re-split within what the
       other three leave on each stage (trainer.engine.auto_parts with a budget per stage), until the four
       fit or none can move (few models move, the rest stay compute-balanced);
    2. if that is not enough: each "auto" model re-split within its share of every stage (its usage
       scaled so that the stage's total meets the budget; when all fit their shares, the four fit
       together), then 1. again from there.
    device_budget None: no memory limit."""
    configs = model_configs(cfg, opts)
    stages = range(cfg.model_topo.pipe)
    auto = [key for key, (c, *_) in configs.items() if c.model_topo.parts == "auto"]
    plans = {key: plan_model(c, head, path, budget=None, frozen=frozen) for key, (c, head, path, frozen) in configs.items()}
    if not auto or device_budget is None:
        return plans
    totals = {key: plan.stage_totals(configs[key][0]) for key, plan in plans.items()}

    def together() -> list[float]:
        return [sum(t[s] for t in totals.values()) for s in stages]

    def resplit(key, room) -> Optional[str]:  # None when it fits `room`, else why not
        c, head, path, frozen = configs[key]
        try:
            plans[key] = plan_model(c, head, path, budget=room, frozen=frozen)
        except AutoPartsError as e:
            return f"{key}: {e}"
        totals[key] = plans[key].stage_totals(c)
        return None

    def fits() -> bool:
        return all(t <= device_budget for t in together())

    def make_room() -> Optional[str]:  # re-split, needing most first, within what the others leave
        failure, stuck = None, set()  # stuck: cannot fit in what the others leave now
        for _ in range(4 * len(auto)):
            room = {key: [device_budget - sum(totals[o][s] for o in totals if o != key) for s in stages] for key in auto}
            over = [key for key in auto if key not in stuck and any(t > r for t, r in zip(totals[key], room[key]))]
            if fits() or not over:
                break
            key = max(over, key=lambda k: max(totals[k]))
            failure = resplit(key, room[key])
            if failure:
                stuck.add(key)
            else:
                stuck.clear()  # after a move the others' room changed: they may fit now
        return failure

    failure = make_room()
    if not fits():  # every auto model within its share of each stage, then make room again
        fixed = [sum(totals[key][s] for key in totals if key not in auto) for s in stages]
        auto_use = [sum(totals[key][s] for key in auto) for s in stages]
        shares = {key: [totals[key][s] * (device_budget - fixed[s]) / auto_use[s] if auto_use[s] else 0.0 for s in stages]
                  for key in auto}
        for key in auto:
            resplit(key, shares[key])
        failure = make_room() or failure
    if fits():
        return plans
    raise AutoPartsError(
        f"ppo: the actor, critic, reference and reward model share each rank's {format_bytes(device_budget)} and no "
        f"\"auto\" split of them fits together (now {', '.join(f'stage {s} ~{format_bytes(t)}' for s, t in enumerate(together()))})"
        + (f"; {failure}" if failure else ": use more pipeline stages, ZeRO stage 1 or offload_optimizer, use_grad_ckpt, "
           "or a smaller micro-batch / max_seq_len") + ". ppo.frozen_bf16 halves the reference and reward model")


def log_co_resident_plans(cfg, opts, plans: dict) -> None:
    """Each model's split and memory estimate, and each stage's total over the four models."""
    configs = model_configs(cfg, opts)
    totals = [0.0] * cfg.model_topo.pipe
    for key, plan in plans.items():
        stage_cfg = configs[key][0]
        if key != "actor_path":
            logger.info("ppo %s: %s\n%s", key, plan.model_path, plan.describe(stage_cfg))
        totals = [t + s for t, s in zip(totals, plan.stage_totals(stage_cfg))]
    logger.info("ppo: the four models together: %s", ", ".join(f"stage {s} ~{format_bytes(t)}" for s, t in enumerate(totals)))


def critic_config(cfg, opts):
    """The critic engine's config: the actor's DeepSpeed config with the critic's optimizer /
    scheduler / clipping overrides and no monitor (every PPO metric goes through the actor's)."""
    ds = {k: v for k, v in cfg.ds_config.items() if k not in MONITOR_KEYS}
    ds.update({k: v for k, v in opts.critic.items() if k != "parts"})
    return dataclasses.replace(with_parts(cfg, opts.critic.get("parts")), ds_config=ds)


def frozen_config(cfg, opts):
    """The frozen engines' config: cfg's precision, or bf16 with ppo.frozen_bf16."""
    if not opts.frozen_bf16:
        return cfg
    ds = {k: v for k, v in cfg.ds_config.items() if k not in ("fp16", "bf16", "bfloat16")}
    return dataclasses.replace(cfg, ds_config={**ds, "bf16": {"enabled": True}})


def check_models(cfg, opts, tokenizer, plans: dict) -> None:
    """Before any engine exists: heads as PPO needs them, one vocabulary, and room for the answers."""
    from transformers import AutoTokenizer

    for key, plan in plans.items():
        _, search = resolve_checkpoint_dir(plan.model_path)
        head = read_metadata(search).get("head", "lm")
        if key in ("actor_path", "ref_path") and head != "lm":
            raise CheckpointError(f"{key} {plan.model_path} has a {head} head; the actor and the reference need an LM "
                                  "head (an SFT run's save_path or a hg_to_pp folder)")
        if key == "reward_path" and head != "value":
            raise CheckpointError(f"reward_path {plan.model_path} has an LM head; the reward model must be a trained "
                                  "reward model (stage \"rm\"'s save_path)")
        if plan.model_config.vocab_size != plans["actor_path"].model_config.vocab_size:
            raise CheckpointError(f"{key} {plan.model_path} has a vocabulary of {plan.model_config.vocab_size} tokens, "
                                  f"actor_path {plans['actor_path'].model_path} has {plans['actor_path'].model_config.vocab_size}: "
                                  "PPO scores the actor's token ids with every model, so all four need the same tokenizer")
        if plan.side_dir != plans["actor_path"].side_dir and AutoTokenizer.from_pretrained(plan.side_dir).get_vocab() != tokenizer.get_vocab():
            raise CheckpointError(f"{key} {plan.model_path}: its tokenizer differs from actor_path's; PPO needs one "
                                  "tokenizer for all four models (train them from the same base)")
    context = getattr(plans["actor_path"].model_config, "max_position_embeddings", None)
    if context and cfg.max_seq_len + opts.max_new_tokens > context:
        raise CheckpointError(f"max_seq_len {cfg.max_seq_len} (prompt tokens) + ppo.max_new_tokens {opts.max_new_tokens} > the "
                              f"actor's {context} positions: lower either")


def answer_stop_ids(tokenizer, plan) -> list[int]:
    """Where an answer ends: the tokenizer's EOS and every eos_token_id of the actor's config and
    generation_config.json (chat models list their end-of-turn token there, e.g. Llama 3's <|eot_id|>)."""
    from transformers import GenerationConfig

    ids = {tokenizer.eos_token_id}
    sources = [plan.model_config.eos_token_id]
    if (plan.side_dir / "generation_config.json").is_file():
        sources.append(GenerationConfig.from_pretrained(plan.side_dir).eos_token_id)
    for eos in sources:
        ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    return sorted(i for i in ids if i is not None)


def saved_trainer_state(resume_from) -> dict:
    """Rank 0: the resumed checkpoint's trainer_state.json ({} for a fresh run)."""
    if not resume_from:
        return {}
    root, tag = resume_from
    return json.loads((Path(root) / tag / "trainer_state.json").read_text())


def extra_state(train_metrics: list, ptx, topo) -> dict:
    """Collective: what PPO adds to trainer_state.json: the metrics so far and rank 0's ptx data position."""
    return {"train_metrics": train_metrics,
            "ptx_data": broadcast_object(ptx.state_dict() if ptx is not None and topo.rank == 0 else None)}


def resume_ema(ema, resume_from, topo) -> None:
    """The EMA of the resumed checkpoint, or (a run that enables ema_decay on resume) the current weights."""
    folder = Path(resume_from[0]) / EMA_DIR / resume_from[1]
    if folder.is_dir():
        ema.load(folder)
    elif topo.rank == 0:
        logger.warning("ppo: %s has no EMA; the average starts from the resumed actor's weights", folder)


# ---------------------------------------------------------------------------------------------
# PPO-ptx: LM batches of ptx_data_path at the rollout width, one extra actor step each.

def load_ptx_batches(cfg, opts, tokenizer, topo):
    """Collective: GlobalBatches of the ptx records on the data stages (None elsewhere); rows at the
    rollout width S, so the pipeline's activation shapes stay the same."""
    from trainer.batches import collate, load_data

    ptx_cfg = dataclasses.replace(cfg, data_path=opts.ptx_data_path, max_seq_len=opts.rollout_width(cfg.max_seq_len),
                                  eval_fraction=0.0, eval_data_path=None, data_split=None, split_index=0, pack=False)
    return load_data(ptx_cfg, tokenizer, "lm", topo, collate).batches


def ptx_step(engine, batches, coef: float, scale: float) -> float:
    """Collective: one train_batch of the actor on the next ptx batch with loss coef x (token-mean LM
    loss over the global batch, normalised as SFT's); returns the LM loss (without coef)."""
    from trainer.batches import with_normaliser
    from trainer.losses import global_token_mean_loss

    feed = None
    if batches is not None:
        micro, n_global, _ = batches.next_step()
        feed = with_normaliser(micro, n_global, scale)
    module = engine.module
    ppo_loss_fn = module.loss_fn
    module.loss_fn = lambda outputs, labels: coef * global_token_mean_loss(outputs, labels)
    try:
        loss = float(engine.train_batch(data_iter=feed))
    finally:
        module.loss_fn = ppo_loss_fn
    return loss / coef


# ---------------------------------------------------------------------------------------------
# Feeding train_batch: inputs for the first stage, labels (tensors) for the last.

def actor_batch(ro, scored, rows, token_scale) -> tuple:
    labels = None
    if scored is not None:
        labels = (ro.tokens[rows], ro.answer[rows], scored["old_logps"][rows], scored["advantages"][rows],
                  scored["ref_logps"][rows], token_scale)
    return (ro.ids[rows], ro.mask[rows]), labels


def critic_batch(ro, scored, rows, token_scale) -> tuple:
    labels = None
    if scored is not None:
        labels = (ro.answer[rows], scored["old_values"][rows], scored["returns"][rows], token_scale)
    return (ro.ids[rows], ro.mask[rows]), labels


# ---------------------------------------------------------------------------------------------
# Metrics: sums on the last stage (zeros elsewhere), all-reduced over every rank.

ROLLOUT_SUMS = ("rows", "reward", "reward_sq", "score", "kl", "answer_tokens", "real_tokens", "adv", "adv_sq")


def rollout_sums(ro, scored) -> dict:
    """Collective: sums over the whole rollout (every replica) as float64."""
    sums = torch.zeros(len(ROLLOUT_SUMS), dtype=torch.float64)
    if scored is not None:
        per_row = scored["rewards"].double().sum(1)
        adv = scored["advantages"].double() * ro.answer.double()
        sums = torch.stack([torch.tensor(float(ro.n_rows), dtype=torch.float64), per_row.sum(), per_row.pow(2).sum(),
                            scored["scores"].double().sum(), scored["kl"].double().sum(), ro.answer.double().sum(),
                            ro.mask.double().sum(), adv.sum(), adv.pow(2).sum()])
    return dict(zip(ROLLOUT_SUMS, all_reduce_sum(sums).tolist()))


def whitening_moments(sums: dict) -> tuple[float, float, float]:
    """(answer tokens, mean, variance) of the advantages over the whole rollout."""
    n = max(sums["answer_tokens"], 1.0)
    mean = sums["adv"] / n
    return n, mean, max(sums["adv_sq"] / n - mean * mean, 0.0)


def logprob_gap(ro, scored) -> float:
    """Collective: max |generation log-prob - training-forward log-prob| over every answer token."""
    gap = torch.zeros((), dtype=torch.float64)
    if scored is not None:
        gap = ((ro.gen_logps - scored["old_logps"]).abs() * ro.answer).max().double()
    torch.distributed.all_reduce(gap, op=torch.distributed.ReduceOp.MAX)
    return float(gap)


def step_metrics(sums: dict, actor_stats, policy_losses, value_losses, gap, opts,
                 gen_s: float, score_s: float, train_s: float) -> dict:
    rows = max(sums["rows"], 1.0)
    actor = dict(zip(ACTOR_STATS, actor_stats.tolist()))
    reward_mean = sums["reward"] / rows
    n_update = max(actor["tokens"], 1.0)
    answer_tokens = sums["answer_tokens"]  # generated tokens of the rollout
    return {
        "PPO/reward_mean": reward_mean,
        "PPO/reward_std": max(sums["reward_sq"] / rows - reward_mean ** 2, 0.0) ** 0.5,
        "PPO/score_mean": sums["score"] / rows,
        "PPO/kl": sums["kl"] / rows,
        "PPO/policy_loss": sum(policy_losses) / len(policy_losses),
        "PPO/value_loss": sum(value_losses) / len(value_losses),
        "PPO/clip_frac": actor["clip_frac"] / n_update,
        "PPO/approx_kl": actor["approx_kl"] / n_update,
        "PPO/entropy": actor["entropy"] / n_update,
        "PPO/response_length": answer_tokens / rows,
        "PPO/logprob_gap": gap,
        "PPO/gen_tokens_per_s": answer_tokens / max(gen_s, 1e-9),
        "PPO/train_tokens_per_s": sums["real_tokens"] * opts.ppo_epochs / max(train_s, 1e-9),
        "PPO/time_generate_s": gen_s,
        "PPO/time_score_s": score_s,
        "PPO/time_train_s": train_s,
    }


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
    return {**reward_trend(result["curve"]), "reward_curve": str(Path(cfg.save_path) / REWARD_CURVE)}


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
            f"steps; RM score {fmt(s['score_start'])} -> {fmt(s['score_end'])}), KL {fmt(s['kl_end'])}; "
            f"curve {s['reward_curve']}")


def write_plots(result: dict, numbers: dict) -> None:
    """The reward curve (reward, raw RM score, KL per step) where the headline names it."""
    from trainer.metrics import write_metric_curves

    curve = result["curve"]
    write_metric_curves(numbers["reward_curve"], {"PPO/reward_mean": [(s, r) for s, r, _, _ in curve],
                                                  "PPO/score_mean (raw RM)": [(s, c) for s, _, c, _ in curve],
                                                  "PPO/kl": [(s, k) for s, _, _, k in curve]},
                        "PPO step", "per answer (mean over the rollout)", "PPO reward")
