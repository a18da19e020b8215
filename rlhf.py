"""One command for InstructGPT's three steps on the pipeline engine: SFT -> reward model -> PPO, or
SFT -> DPO. The recipes of trainer/recipes run one after another in this one process per rank (one
allocation, the ranks launched once), each handing its checkpoint to the next.

    deepspeed rlhf.py --config configs/rlhf.json                           # one node
    deepspeed --hostfile ./hostfile rlhf.py --config configs/rlhf.json     # several nodes

The config is one JSON file: the keys every step shares at the top level (train_ds.py's keys:
model_path of the base model, save_path (the root of the chain), model_topo, DeepSpeed's batch,
precision and optimizer keys, seed, ...), the chain's own keys, and a section per step holding what
differs (data_path, optimizer, parts, train_steps / n_epochs, "ppo": {...} settings, ...):

    {"pipeline": ["sft", "rm", "ppo"],    the default; or ["sft", "dpo"]
     "rm_init": "sft",                    the RM starts from SFT's result (default) or "base" (model_path)
     "model_path": "...", "save_path": "runs/rlhf", "model_topo": {...}, "train_batch_size": 8, ...,
     "sft": {"data_path": "...", "n_epochs": 2},
     "rm":  {"data_path": "...", "optimizer": {"params": {"lr": 1e-4}}},
     "ppo": {"data_path": "...", "train_steps": 30, "ppo": {"rollout_batch_size": 16}}}

(a section holds what a train_ds.py config of that stage holds: the ppo section's "ppo" object is
PPO's settings, trainer/rl/ppo_options.py).

A step's config = `merge(shared, section)` (the section wins; objects merge key by key, except an
object whose "type" differs from the shared one's, e.g. another optimizer or scheduler, which
replaces it whole; null removes a shared key), plus what the chain sets (trainer/chain.py `step_config`):

    step  stage  save_path   starts from
    sft   sft    ROOT/sft    model_path (the base model)
    rm    rm     ROOT/rm     ROOT/sft (rm_init "sft") or model_path (rm_init "base")
    ppo   ppo    ROOT/ppo    actor_path ROOT/sft (the reference by default), critic_path ROOT/rm (the reward model by default)
    dpo   dpo    ROOT/dpo    model_path ROOT/sft (the reference by default)

and resume "auto"; split_index = the step's position in the pipeline (sft 0, rm 1, ppo 2; sft 0,
dpo 1) when its config has data_split (one mixed dataset, disjoint shares: data/split.py); the
csv_monitor / tensorboard job_name = the step's name (after the shared job_name, if any), so each
step's metrics land in OUTPUT_PATH/<step>/. Every step is validated (trainer.config.validate)
before the first one starts; problems name the section and the key, exit status 2.

save_path (ROOT) afterwards:
    configs/<step>.json   each step's config as train_ds.py would take it (copied to ROOT/<step>/train_config.json)
    sft/ rm/ dpo/         the steps' save_paths (checkpoints, loss_curve.png), each with hf/: its pp_to_hg export
    ppo/                  the actor (hf/: *ForCausalLM), ppo/critic (critic_hf/: *ForSequenceClassification),
                          ppo/ema (ema_hf/, with ppo.ema_decay), reward_curve.png
    rlhf_state.json       the steps done and their results; a step is marked done only once its exports are complete
    summary.json          SFT eval loss, RM eval accuracy, PPO reward start -> end and KL, DPO eval rewards
    summary.txt           the same as printed at the end

Rerunning the command skips the steps marked done and resumes the running one from its `latest`.
"""
import argparse
import os
import sys


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the RLHF config: shared keys + a section per step")
    parser.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)), help="set by the launcher")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    """Every rank: the chain of trainer/chain.py; exit status 0, 1 (a step failed) or 2 (the config,
    the inputs or the data)."""
    args = parse_args(argv)
    from trainer import chain

    return chain.run(args.config)


if __name__ == "__main__":
    sys.exit(main())
