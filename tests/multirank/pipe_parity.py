"""Run under `deepspeed --num_gpus 2` (CPU/gloo): for each model folder given, build the
PipelineModule split by --parts, load the hg_to_pp shards strictly with DeepSpeed's own loader,
and compare the pipeline's loss on a fixed batch with the HF model's loss on the same batch.

Writes one JSON line per model to --out (rank 0): {"model", "pipe_loss", "hf_loss", "stage_layers"}.
"""
import argparse
import json

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", action="append", required=True, help="HF_DIR:PP_DIR:PARTS (parts comma-separated)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    import deepspeed
    import deepspeed.comm as dist
    from compat.checkpoint_files import weights_only_checkpoint_engine
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology
    from transformers import AutoConfig, AutoModelForCausalLM

    from compat.private_api import partitioned_pipeline_module_class
    from models.pipeline import build_layer_specs, pipe_layer_names, prepare_config
    from trainer.engine.distributed import init_process_group
    from trainer.engine.partition import boundaries_from_parts
    from trainer.losses import shifted_token_losses

    def causal_lm_loss(logits, labels):  # HF's per-micro-batch loss: the mean over its target tokens
        total, count = shifted_token_losses(logits, labels)
        return total / count

    init_process_group("gloo")
    rank = dist.get_rank()
    results = []
    try:
        for case in args.case:
            hf_dir, pp_dir, parts = case.split(":")
            parts = [int(p) for p in parts.split(",")]
            config = prepare_config(AutoConfig.from_pretrained(pp_dir))
            names = pipe_layer_names(config)
            module = partitioned_pipeline_module_class()(
                build_layer_specs(config), boundaries=boundaries_from_parts(parts, len(parts), names),
                topology=PipeDataParallelTopology(num_pp=len(parts), num_dp=1), loss_fn=causal_lm_loss,
            )
            module.load_state_dir(pp_dir, checkpoint_engine=weights_only_checkpoint_engine(), strict=True)
            engine, *_ = deepspeed.initialize(
                model=module, model_parameters=[p for p in module.parameters() if p.requires_grad],
                config={"train_batch_size": 2, "train_micro_batch_size_per_gpu": 2, "steps_per_print": 10**9,
                        "optimizer": {"type": "SGD", "params": {"lr": 0.0}}},
            )
            gen = torch.Generator().manual_seed(1)
            ids = torch.randint(4, config.vocab_size, (2, 16), generator=gen)
            mask = torch.ones_like(ids)
            mask[1, 11:] = 0  # right padding
            labels = ids.masked_fill(mask == 0, -100)
            loss = engine.eval_batch(iter([((ids, mask), labels)]))
            hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
            with torch.no_grad():
                hf_loss = hf(input_ids=ids, attention_mask=mask, labels=labels).loss
            results.append({"model": hf_dir, "pipe_loss": float(loss), "hf_loss": float(hf_loss),
                            "stage_layers": [module._local_start, module._local_stop]})
            del engine, module
        dist.barrier()
        if rank == 0:
            with open(args.out, "w") as f:
                for r in results:
                    f.write(json.dumps(r) + "\n")
    finally:
        if dist.is_initialized():
            dist.barrier()
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
