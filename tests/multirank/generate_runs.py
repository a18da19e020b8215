"""Run under `deepspeed --num_gpus 2`: every pipelined-generation case of tests/test_generation.py in
one launch (launching ranks costs ~10-15 s each time). --spec is a JSON file written by the test:
{"models": {name: pipeline checkpoint}, "prompts": [[ids]], "max_new": int, "sft_config": path|null,
"layouts": true for the 4-rank layouts run}; rank 0 writes {case: result} to --out (answers from stage 0,
log-probs from the last stage).
"""
import argparse
import json
import traceback

import torch
import torch.distributed as dist

SAMPLING = dict(greedy=False, temperature=0.8, top_k=50, top_p=0.9, repetition_penalty=1.2, seed=5)


def gathered(gen, rank_is_last: bool) -> dict:
    """This replica's Generation as plain lists, merged over the ranks (ids from any stage, log-probs
    from the last)."""
    mine = {"answers": [gen.answer(i) for i in range(len(gen.n_new))], "finish": gen.finish_reason,
            "width": int(gen.ids.shape[1]), "prompt_len": gen.prompt_len,
            "ids": gen.ids.tolist(), "attention_mask": gen.attention_mask.tolist(), "answer_mask": gen.answer_mask.tolist()}
    if rank_is_last:
        mine["logprobs"] = gen.logprobs.tolist()
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    merged = dict(parts[0])
    for p in parts:
        merged.update({k: v for k, v in p.items() if "logprobs" in k})
    merged["same_ids_on_every_rank"] = all(p["ids"] == parts[0]["ids"] for p in parts)
    return merged


def run_cases(spec: dict) -> dict:
    from inference.pipeline import load_pipeline_module
    from trainer.generation.decoding import GenerationError, generate, replica_share
    from trainer.generation.token_sampling import SamplingConfig

    prompts, max_new = spec["prompts"], spec["max_new"]
    results = {}
    for name, pp in spec["models"].items():
        module, plan, _ = load_pipeline_module(pp, 2)
        config = plan.model_config
        is_last = module.stage_id == 1

        def run(key, ps=prompts, **kw):
            kw.setdefault("max_new_tokens", max_new)
            kw.setdefault("stop_ids", [config.eos_token_id])
            results[f"{name}/{key}"] = gathered(generate(module, config, ps, **kw), is_last)
            return results[f"{name}/{key}"]

        base = run("greedy_m2", n_micro=2)
        run("greedy_m1", n_micro=1)
        run("greedy_nocache", n_micro=2, use_cache=False)
        if name != "llama":
            continue
        run("greedy_m3", n_micro=3)
        run("greedy_penalty", n_micro=2, sampling=SamplingConfig(repetition_penalty=1.3))
        sampling = SamplingConfig(**SAMPLING)
        run("sample_m1", n_micro=1, sampling=sampling)
        run("sample_m1_again", n_micro=1, sampling=sampling)
        run("sample_m2", n_micro=2, sampling=sampling)
        run("sample_m2_reversed", ps=prompts[::-1], n_micro=2, sampling=sampling)
        # Rows stop independently: stop ids generated at different steps of rows 0 and 2.
        stop = sorted({base["answers"][0][3], base["answers"][2][5]})
        results["stop_ids"] = stop
        run("greedy_stop", n_micro=2, stop_ids=stop)
        first = sorted({a[0] for a in base["answers"]})
        results["all_stop_ids"] = first
        run("greedy_all_stop", n_micro=2, stop_ids=first)
        errors = {}
        for key, kw in {"max_new_0": dict(max_new_tokens=0), "too_long": dict(max_new_tokens=10, max_context=12)}.items():
            try:
                generate(module, config, prompts, stop_ids=[2], **kw)
            except GenerationError as e:
                errors[key] = str(e)
        results["errors"] = errors
        # bf16: runs, and its greedy tokens mostly follow fp32's.
        module.to(torch.bfloat16)
        run("bf16_greedy_m2", n_micro=2)
        module = None  # free it before the next model loads
        # 1 stage x 2 data-parallel replicas: each generates its own share.
        module, plan, _ = load_pipeline_module(pp, 1)
        gen = generate(module, config, replica_share(prompts, module), max_new_tokens=max_new, stop_ids=[config.eos_token_id])
        shares = [None] * dist.get_world_size()
        dist.all_gather_object(shares, [gen.answer(i) for i in range(len(gen.n_new))])
        results[f"{name}/dp2"] = {"shares": shares}
        module = None  # free it before the next model loads
        results[f"{name}/forward_only"] = forward_only_case(pp, prompts)
    return results


def forward_only_case(pp, prompts) -> dict:
    """trainer.engine.forward_only on a 2-stage engine returns every micro-batch's logits (last stage)."""
    import deepspeed

    from inference.pipeline import load_pipeline_module
    from trainer.engine.forward_only import forward_only
    from trainer.generation.decoding import generate

    module, plan, _ = load_pipeline_module(pp, 2)
    module.train()
    engine, *_ = deepspeed.initialize(model=module, model_parameters=[p for p in module.parameters()], config={
        "train_batch_size": 4, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
        "optimizer": {"type": "SGD", "params": {"lr": 0.0}}, "steps_per_print": 10**6})
    T = max(len(p) for p in prompts[:4])
    ids = torch.zeros(4, T, dtype=torch.int64)
    mask = torch.zeros(4, T, dtype=torch.int64)
    for r, p in enumerate(prompts[:4]):  # right-padded, as training feeds it
        ids[r, :len(p)] = torch.tensor(p)
        mask[r, :len(p)] = 1
    micro = [((ids[k:k + 2], mask[k:k + 2]), ids[k:k + 2].clone()) for k in (0, 2)]
    outs = forward_only(engine, micro, 2, lambda out, labels: out.detach().float().clone())
    result = {"ids": ids.tolist(), "mask": mask.tolist()}
    if outs is not None:
        result["logits"] = [o.tolist() for o in outs]
    # And generation runs on the engine's own module (the trained weights, no copy), in eval mode,
    # and gives the module back in the mode it found it (train_batch would set train() itself).
    engine.module.train()
    gen = generate(engine.module, plan.model_config, prompts, max_new_tokens=4, stop_ids=[plan.model_config.eos_token_id])
    result["engine_answers"] = [gen.answer(i) for i in range(len(gen.n_new))]
    result["module_is_training_after"] = engine.module.training
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, result)
    merged = dict(parts[0])
    for p in parts:
        if "logits" in p:
            merged["logits"] = p["logits"]
    return merged


def run_layouts(spec: dict) -> dict:
    """Under 4 ranks: P = 4 (two middle stages, which get the ids from the last stage) and P = 2 x D = 2;
    greedy and sampled answers of every replica, in prompt order."""
    from inference.pipeline import load_pipeline_module
    from trainer.generation.decoding import generate, replica_share
    from trainer.generation.token_sampling import SamplingConfig

    prompts, results = spec["prompts"], {}
    for name in ("llama", "bloom"):
        for stages in (4, 2):
            module, plan, _ = load_pipeline_module(spec["models"][name], stages)
            for key, sampling in (("greedy", SamplingConfig()), ("sample", SamplingConfig(**SAMPLING))):
                gen = generate(module, plan.model_config, replica_share(prompts, module), max_new_tokens=spec["max_new"],
                               stop_ids=[plan.model_config.eos_token_id], sampling=sampling, n_micro=2)
                mine = (module.topology().get_coord(dist.get_rank()).data, [gen.answer(i) for i in range(len(gen.n_new))])
                parts = [None] * dist.get_world_size()
                dist.all_gather_object(parts, mine)
                replicas = dict(parts)  # every stage of a replica holds the same answers
                answers = [replicas[i % len(replicas)][i // len(replicas)] for i in range(len(prompts))]
                results[f"{name}/p{stages}/{key}"] = {"answers": answers, "parts": plan.parts,
                                                      "stages_agree": all(a == replicas[d] for d, a in parts)}
            module = None  # free it before the next model loads
    return results


def run_sft(config_path: str) -> dict:
    from deepspeed.accelerator import get_accelerator

    from trainer.engine.topology import Topology
    from trainer.recipes import get_recipe, load_config

    cfg = load_config(config_path, world_size=dist.get_world_size(), device_supports_fp16=get_accelerator().is_fp16_supported())
    summary = get_recipe(cfg.stage)(cfg, Topology.from_config(cfg, dist.get_rank(), dist.get_world_size()), "cpu")
    return {"step": summary["step"], "evals": summary["evals"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from trainer.engine.distributed import finish, init_process_group

    init_process_group("gloo")
    spec = json.loads(open(args.spec).read())
    try:
        results = run_layouts(spec) if spec.get("layouts") else run_cases(spec)
        if spec.get("sft_config"):
            results["sft"] = run_sft(spec["sft_config"])
    except BaseException:
        traceback.print_exc()
        raise
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(results, f)
    finish()


if __name__ == "__main__":
    main()
