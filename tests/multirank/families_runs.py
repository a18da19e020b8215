"""Run under `deepspeed --num_gpus N` (CPU/gloo): the multi-rank checks of tests/test_families_multirank.py
in one launch (starting ranks costs ~10 s each time). --spec is a JSON file written by the test:

    {"stages": P, "parts": [layers per stage], "prompts": [[ids]], "max_new": int,
     "batch": {"ids": [[...]], "mask": [[...]]},          right-padded rows, 2 per micro-batch
     "models": {name: {"pp": pipeline checkpoint, "stop_ids": [ids]}},
     "train_configs": [config paths]}                     run in order through their recipes

For each model, on a P-stage pipeline split by `parts`: the logits of `batch` (trainer.forward_only,
every micro-batch, last stage) and greedy generation of `prompts` with 2 and 3 micro-batches in flight.
Rank 0 writes {"models": {name: {"logits", "greedy_m2", "greedy_m3"}}, "train": [summaries], "seconds": {case: s}}
to --out.
"""
import argparse
import json
import time
import traceback

import torch
import torch.distributed as dist


def gather_from_last(value):
    """The value the last stage holds (None elsewhere), on every rank."""
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, value)
    return next(p for p in parts if p is not None)


def model_case(pp: str, stop_ids: list, spec: dict) -> dict:
    import deepspeed

    from inference.pipeline import load_pipeline_module
    from trainer.engine.forward_only import forward_only
    from trainer.generation.decoding import generate

    out = {}
    module, plan, _ = load_pipeline_module(pp, spec["stages"], parts=spec["parts"])
    is_last = module.stage_id == spec["stages"] - 1
    for m in (2, 3):
        gen = generate(module, plan.model_config, spec["prompts"], max_new_tokens=spec["max_new"], stop_ids=stop_ids,
                       n_micro=m)
        out[f"greedy_m{m}"] = [gen.answer(i) for i in range(len(gen.n_new))]
    ids, mask = torch.tensor(spec["batch"]["ids"]), torch.tensor(spec["batch"]["mask"])
    n_micro = ids.shape[0] // 2
    engine, *_ = deepspeed.initialize(model=module, model_parameters=[p for p in module.parameters()], config={
        "train_batch_size": ids.shape[0], "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": n_micro,
        "optimizer": {"type": "SGD", "params": {"lr": 0.0}}, "steps_per_print": 10**6})
    micro = [((ids[k:k + 2], mask[k:k + 2]), ids[k:k + 2].clone()) for k in range(0, ids.shape[0], 2)]
    logits = forward_only(engine, micro, n_micro, lambda output, labels: output.detach().float().clone())
    out["logits"] = gather_from_last(torch.cat(logits).tolist() if is_last and logits is not None else None)
    return out


def run_config(path: str) -> dict:
    from deepspeed.accelerator import get_accelerator

    from trainer.recipes import load_config
    from trainer.recipes import get_recipe
    from trainer.engine.topology import Topology

    cfg = load_config(path, world_size=dist.get_world_size(), device_supports_fp16=get_accelerator().is_fp16_supported())
    summary = get_recipe(cfg.stage)(cfg, Topology.from_config(cfg, dist.get_rank(), dist.get_world_size()), "cpu")
    dist.barrier()
    return {"config": path, **summary}


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
    results = {"models": {}, "train": [], "seconds": {}}
    try:
        for name, model in spec["models"].items():
            start = time.perf_counter()
            results["models"][name] = model_case(model["pp"], model["stop_ids"], spec)
            results["seconds"][name] = round(time.perf_counter() - start, 1)
        for path in spec.get("train_configs", []):
            start = time.perf_counter()
            results["train"].append(run_config(path))
            results["seconds"][path.rsplit("/", 1)[-1]] = round(time.perf_counter() - start, 1)
    except BaseException:
        traceback.print_exc()
        raise
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(results, f)
    finish()


if __name__ == "__main__":
    main()
