"""Run under `deepspeed --num_gpus 2`: training configs one after another in one launch, each through
its recipe (trainer.recipes), with optional probes that look inside the engine the recipe builds.

    --run CONFIG[:PROBE,PROBE...]   (repeatable)   --out results.jsonl

The recipe's `build_engine` is wrapped for the duration of a run, so the recipe itself is unchanged;
the wrapper keeps the engine and installs the probes:
  count_blocks  forward calls of the transformer blocks of this rank, per train_batch (a checkpointed
                block runs twice per micro-batch: once in the forward, once recomputed in the backward)
  grads         every local parameter's gradient when the engine calls optimizer.step, per step
                (deepspeed.utils.safe_get_full_grad: the fp32 or bf16 accumulation buffer of
                DeepSpeed's BF16/ZeRO optimizers, before their clipping; p.grad of a plain fp32
                engine, which clips before the step)
  masters       after the run, every local parameter's fp32 master copy
                (deepspeed.utils.safe_get_full_fp32_param; the parameter itself when there is none)
                and the parameter as the module holds it; the tied module's weights of the last stage too
  optimizer     after the run: engine.zero_cpu_offload(), the optimizer classes, and the device and
                dtype of every optimizer-state tensor
  full_logits   (not a probe) the LM head returns full logits, whatever the config's chunked_loss
                (where the trainer has that key), so that bf16 numerics match an HF forward/backward
Probe outputs go to <save_path>/probe_rank<R>.pt (keys are "<pipe layer>:<key in the layer file>",
tied-module replicas "tied:<key>:<name>"). Rank 0 writes one JSON line per run to --out:
{"config", "history", "evals", "step"}.
"""
import argparse
import json
import os
import time
from pathlib import Path

import torch


class Probes:
    def __init__(self, names: set):
        self.names = names
        self.engine = None
        self.counts = []      # block forwards per train_batch
        self.norms = []       # engine.get_global_grad_norm() after each train_batch
        self.grads = []       # per step {key: grad}
        self._calls = 0

    def install(self, engine, plan) -> None:
        from compat.private_api import local_layers
        from models.registry import get_architecture

        self.engine = engine
        self.keys = {}
        for index, layer in local_layers(engine.module):
            if isinstance(layer, torch.nn.Module):
                for name, p in layer.named_parameters():
                    self.keys.setdefault(id(p), f"{index}:{name}")
        if "count_blocks" in self.names:
            block_type = get_architecture(plan.model_config.model_type).block
            for module in engine.module.modules():
                if isinstance(module, block_type):
                    module.register_forward_hook(self._count)
        train_batch = engine.train_batch

        def probed_train_batch(*args, **kwargs):
            before = self._calls
            out = train_batch(*args, **kwargs)
            self.counts.append(self._calls - before)
            norm = engine.get_global_grad_norm()
            self.norms.append(None if norm is None else float(norm))
            return out

        engine.train_batch = probed_train_batch
        if "grads" in self.names:
            from deepspeed.utils import safe_get_full_grad

            step = engine.optimizer.step
            params = [p for p in engine.module.parameters() if id(p) in self.keys]

            def recorded_step(*args, **kwargs):
                grads = {self.keys[id(p)]: safe_get_full_grad(p) for p in params}  # collective (ZeRO, BF16)
                self.grads.append({k: g.detach().cpu().clone() for k, g in grads.items() if g is not None})
                return step(*args, **kwargs)

            engine.optimizer.step = recorded_step

    def _count(self, module, inputs, output) -> None:
        self._calls += 1

    def finish(self, save_path: str, rank: int) -> None:
        from deepspeed.utils import safe_get_full_fp32_param

        out = {"counts": self.counts, "norms": self.norms, "grads": self.grads}
        engine = self.engine
        if "masters" in self.names:
            masters, params = {}, {}
            named = [(key, p) for p in engine.module.parameters() if (key := self.keys.get(id(p)))]
            for key, module in getattr(engine.module, "tied_modules", {}).items():
                named += [(f"tied:{key}:{name}", p) for name, p in module.named_parameters()]
            seen = set()
            for key, p in named:
                if key in seen:
                    continue
                seen.add(key)
                master = safe_get_full_fp32_param(p)  # collective within the data-parallel group
                masters[key] = (master if master is not None else p).detach().float().cpu().clone()
                params[key] = p.detach().cpu().clone()
            out["masters"], out["params"] = masters, params
        if "optimizer" in self.names:
            basic = getattr(engine.optimizer, "optimizer", engine.optimizer)
            states = [t for state in basic.state.values() for t in state.values() if torch.is_tensor(t) and t.dim() > 0]
            masters = [p for g in basic.param_groups for p in g["params"]]
            out["optimizer"] = {
                "zero_cpu_offload": bool(engine.zero_cpu_offload()),
                "zero_stage": int(engine.zero_optimization_stage()),
                "wrapper": type(engine.optimizer).__name__,
                "basic": f"{type(basic).__module__}.{type(basic).__name__}",
                "state_devices": sorted({t.device.type for t in states}),
                "state_dtypes": sorted({str(t.dtype) for t in states}),
                "n_state_tensors": len(states),
                "master_devices": sorted({p.device.type for p in masters}),
                "model_devices": sorted({p.device.type for p in engine.module.parameters()}),
            }
        torch.save(out, Path(save_path) / f"probe_rank{rank}.pt")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", action="append", required=True, help="CONFIG[:probe,probe]")
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from deepspeed.accelerator import get_accelerator

    import trainer.engine.build
    from trainer.engine.distributed import finish, report_crash, world
    from trainer.engine.topology import Topology
    from trainer.recipes import get_recipe, load_config, rm, sft

    rank, world_size, _ = world()
    from trainer.engine.distributed import init_process_group

    init_process_group("gloo")
    results = []
    try:
        for spec in args.run:
            start = time.perf_counter()
            path, _, names = spec.partition(":")
            probes = Probes(set(filter(None, names.split(","))))

            def build_engine(*args, probes=probes, **kwargs):  # the recipe's call, passed through
                engine = trainer.engine.build.build_engine(*args, **kwargs)
                probes.install(engine, kwargs["plan"] if "plan" in kwargs else args[1])
                return engine

            cfg = load_config(path, world_size=world_size, device_supports_fp16=get_accelerator().is_fp16_supported())
            if "full_logits" in probes.names and hasattr(cfg, "chunked_loss"):
                cfg.chunked_loss = False
            sft.build_engine = rm.build_engine = build_engine
            try:
                summary = get_recipe(cfg.stage)(cfg, Topology.from_config(cfg, rank, world_size), "cpu")
            finally:
                sft.build_engine = rm.build_engine = trainer.engine.build.build_engine
            probes.finish(cfg.save_path, rank)
            results.append({"config": path, **summary})
            torch.distributed.barrier()
            if rank == 0:
                print(f"parity_runs: {os.path.basename(path)} took {time.perf_counter() - start:.1f} s", flush=True)
    except BaseException as e:
        report_crash(rank, e)
        raise
    if rank == 0:
        with open(args.out, "w") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
    finish()


if __name__ == "__main__":
    main()
