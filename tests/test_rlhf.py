"""The RLHF command (rlhf.py): one config -> SFT -> RM -> PPO (or SFT -> DPO) in one launch.

Config (no launch): merging shared keys with a section, the hand-off paths, data_split shares per
step, validation naming the section and the key, exit status 2 without a traceback. Real runs (CPU,
gloo, the tiny LLaMA with random weights, configs/rlhf_quickstart.json with fewer steps), two
launches in all:
  A (tests/multirank/rlhf_runs.py): an uninterrupted SFT -> RM -> PPO chain, an SFT -> DPO chain on one
    file split by data_split, then the first chain again under another root, SIGKILLed during its RM
    step's step-4 save (SFT saves only at its end, step 8).
  B (rlhf.py, the command itself): the killed chain rerun: SFT is skipped (its files untouched), RM
    resumes from step 2, PPO runs; RM, PPO actor and critic end with the uninterrupted chain's weights.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO
from conftest import launch_ranks as launch

from trainer import chain
from trainer.config import ConfigError

QUICKSTART = REPO / "configs" / "rlhf_quickstart.json"
PREFS = str(REPO / "data" / "samples" / "preferences.jsonl")
TOPO = {"process_topology": {"axes": ["pipe", "data"], "dims": [2, 1]}, "parts": [3, 4]}


def quickstart_raw(**changes) -> dict:
    raw = json.loads(QUICKSTART.read_text())
    raw.update(changes)
    return raw


def problems_of(raw: dict, world_size=2) -> list[str]:
    try:
        chain.validate_steps(chain.plan_steps(raw), "rlhf.json", world_size)
    except ConfigError as e:
        return e.problems
    return []


# ------------------------------------------------------------------------------------ config

def test_merge_sections_over_shared_keys():
    shared = {"seed": 1, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.95]}},
              "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_num_steps": 10, "total_num_steps": 100}},
              "model_topo": TOPO, "eval_fraction": 0.1}
    section = {"optimizer": {"params": {"lr": 3e-5}}, "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 5}},
               "model_topo": {"parts": [4, 3]}, "eval_fraction": None, "seed": 2}
    merged = chain.merge(shared, section)
    assert merged["optimizer"] == {"type": "AdamW", "params": {"lr": 3e-5, "betas": [0.9, 0.95]}}  # key by key
    assert merged["scheduler"] == {"type": "WarmupLR", "params": {"warmup_num_steps": 5}}  # another type: replaced whole
    assert merged["model_topo"] == {"process_topology": TOPO["process_topology"], "parts": [4, 3]}
    assert "eval_fraction" not in merged and merged["seed"] == 2  # null removes; values replace
    assert shared["optimizer"]["params"]["lr"] == 1e-3  # the shared keys are not modified


def test_hand_off_paths_stages_and_monitors():
    steps = chain.plan_steps(quickstart_raw(save_path="out", csv_monitor={"enabled": True, "output_path": "logs"}))
    by = {s.name: s.raw for s in steps}
    assert [s.name for s in steps] == ["sft", "rm", "ppo"]
    assert {n: (r["stage"], r["save_path"], r["resume"]) for n, r in by.items()} == {
        "sft": ("sft", "out/sft", "auto"), "rm": ("rm", "out/rm", "auto"), "ppo": ("ppo", "out/ppo", "auto")}
    assert by["sft"]["model_path"] == "runs/rlhf-quickstart/base-pp"
    assert by["rm"]["model_path"] == "out/sft"
    assert (by["ppo"]["actor_path"], by["ppo"]["critic_path"], by["ppo"]["model_path"]) == ("out/sft", "out/rm", "out/sft")
    assert "ref_path" not in by["ppo"] and "reward_path" not in by["ppo"]  # defaults: the actor's / the critic's start
    assert [r["csv_monitor"]["job_name"] for r in by.values()] == ["sft", "rm", "ppo"]
    assert [s.config_file for s in steps] == [Path("out/configs/sft.json"), Path("out/configs/rm.json"), Path("out/configs/ppo.json")]
    assert by["rm"]["optimizer"]["params"]["lr"] == 1e-3 and by["sft"]["optimizer"]["params"]["lr"] == 3e-3
    base = {s.name: s.raw for s in chain.plan_steps(quickstart_raw(save_path="out", rm_init="base"))}
    assert base["rm"]["model_path"] == "runs/rlhf-quickstart/base-pp"
    named = {s.name: s.raw for s in chain.plan_steps(quickstart_raw(csv_monitor={"enabled": True, "job_name": "qs"}))}
    assert named["ppo"]["csv_monitor"]["job_name"] == "qs-ppo"

    dpo = chain.plan_steps({**quickstart_raw(save_path="out"), "pipeline": ["sft", "dpo"], "dpo": {"data_path": PREFS}})
    assert [(s.name, s.raw["stage"], s.raw["model_path"]) for s in dpo] == [
        ("sft", "sft", "runs/rlhf-quickstart/base-pp"), ("dpo", "dpo", "out/sft")]


def test_validated_steps_and_their_exports():
    steps = chain.load_steps(str(QUICKSTART), world_size=2)
    assert [s.cfg.stage for s in steps] == ["sft", "rm", "ppo"]
    ppo = steps[2]
    assert ppo.cfg.options.actor_path == "runs/rlhf-quickstart/sft" and ppo.cfg.options.rollout_batch_size == 32
    assert ppo.cfg.config_path == "runs/rlhf-quickstart/configs/ppo.json"
    assert [(str(a), str(b)) for a, b in ppo.exports] == [("runs/rlhf-quickstart/ppo", "runs/rlhf-quickstart/ppo/hf"),
                                                          ("runs/rlhf-quickstart/ppo/critic", "runs/rlhf-quickstart/ppo/critic_hf")]
    assert [str(b) for _, b in steps[1].exports] == ["runs/rlhf-quickstart/rm/hf"]


def test_shipped_rlhf_configs_validate():
    real = chain.load_steps(str(REPO / "configs" / "rlhf.json"), world_size=8)
    assert [s.name for s in real] == ["sft", "rm", "ppo"] and all(s.cfg.precision == "bf16" for s in real)
    assert [s.cfg.split_index for s in real] == [0, 1, 2] and len({s.cfg.data_split for s in real}) == 1
    assert [s.name for s in chain.load_steps(str(QUICKSTART), world_size=2)] == ["sft", "rm", "ppo"]


def test_data_split_gives_each_step_its_own_disjoint_share():
    """split_index is the step's position: the shares the recipes then read are disjoint and cover the file."""
    from collections import Counter

    from transformers import AutoTokenizer

    from data.dataset import build_dataset

    tok = AutoTokenizer.from_pretrained(REPO / "configs" / "tiny-llama")

    def prompts(kind: str, **split) -> Counter:
        """The prompt text of every train row of `kind` (SFT: the chosen answer's row; RM: the chosen row)."""
        built = build_dataset(PREFS, tok, 96, kind=kind, **split)
        out = Counter()
        for i in range(len(built.train)):
            item = built.train[i]
            ids, mask = item[0] if kind != "prompt" else item
            ids, mask = (ids[0], mask[0]) if kind == "pairwise" else (ids, mask)
            out[tok.decode(ids[mask.bool()]).split("Assistant:")[0]] += 1
        return out

    everything = prompts("prompt")
    assert sum(everything.values()) == 240
    raw = {k: v for k, v in quickstart_raw().items() if k not in ("sft", "rm", "ppo")}
    for pipeline, split, kinds in ((["sft", "rm", "ppo"], "2,4,4", ("lm", "pairwise", "prompt")),
                                   (["sft", "dpo"], "4,6", ("lm", "pairwise"))):
        steps = chain.load_steps_from(dict(raw, pipeline=pipeline, data_path=PREFS, data_split=split, n_epochs=1), world_size=2)
        assert [s.cfg.split_index for s in steps] == list(range(len(pipeline)))
        shares = [prompts(kind, data_split=s.cfg.data_split, split_index=s.cfg.split_index, seed=s.cfg.seed)
                  for s, kind in zip(steps, kinds)]
        assert sum(shares, Counter()) == everything, [sum(c.values()) for c in shares]


def test_problems_name_the_section_and_the_key():
    raw = quickstart_raw()
    raw["rm"] = {**raw["rm"], "lr": 1e-4, "train_steps": -1}
    raw["ppo"] = {**raw["ppo"], "ppo": {**raw["ppo"]["ppo"], "rolout_batch_size": 8}}
    raw["train_micro_batch_size_per_gpu"] = 3  # 8 != 3 x 2 x 1, in every step
    found = problems_of(raw)
    assert "shared keys (every step): batch sizes do not multiply out: train_batch_size 8 != train_micro_batch_size_per_gpu 3 x " \
           "gradient_accumulation_steps 2 x data-parallel size 1 = 6" in found
    assert "section 'rm' (shared keys + its own): unknown key 'lr' (see trainer/config.py for the project keys)" in found
    assert "section 'rm' (shared keys + its own): train_steps must not be negative" in found
    assert any(p.startswith("section 'ppo' (shared keys + its own): ppo: unknown keys ['rolout_batch_size']") for p in found)
    assert not any(p.startswith("section 'sft'") for p in found)
    assert any("pipe x data = 2 but the job has 4 ranks" in p and p.startswith("shared keys") for p in problems_of(quickstart_raw(), 4))


@pytest.mark.parametrize("change, expected", [
    ({"pipeline": ["sft", "ppo"]}, 'pipeline must be ["sft", "rm", "ppo"] or ["sft", "dpo"], got ["sft", "ppo"]'),
    ({"pipeline": "sft,dpo"}, 'pipeline must be ["sft", "rm", "ppo"] or ["sft", "dpo"], got "sft,dpo"'),
    ({"rm_init": "sfts"}, 'rm_init must be "sft"'),
    ({"rm": {"save_path": "x"}}, "section 'rm': save_path is set by the RLHF command"),
    ({"sft": {"stage": "rm"}}, "section 'sft': stage is set by the RLHF command"),
    ({"split_index": 1}, "the top level: split_index is set by the RLHF command"),
    ({"ppo": {"actor_path": "x"}}, "section 'ppo': actor_path is set by the RLHF command"),
    ({"rm": {"model_path": "x"}}, "section 'rm': model_path is set by the RLHF command"),
    ({"resume": "never"}, 'the top level: resume "never": the RLHF command always resumes'),
    ({"from_scratch": True}, "the top level: from_scratch applies to the SFT step only"),
    ({"dpo": [1]}, "section 'dpo' must be an object of config keys, got [1]"),
    ({"save_path": None}, "missing save_path"),
])
def test_chain_key_problems(change, expected):
    raw = {**quickstart_raw(), **change}
    if change.get("save_path", 1) is None:
        raw.pop("save_path")
    with pytest.raises(ConfigError) as e:
        chain.plan_steps(raw, "rlhf.json")
    assert any(p.startswith(expected) for p in e.value.problems), e.value.problems


def test_missing_inputs_are_found_before_step_one(tmp_path):
    raw = quickstart_raw(save_path=str(tmp_path), model_path=str(tmp_path / "nope"))
    raw["ppo"] = {**raw["ppo"], "data_path": str(tmp_path / "prompts.jsonl"), "reward_path": str(tmp_path / "other-rm")}
    found = chain.missing_inputs(chain.load_steps_from(raw, world_size=2))
    assert f"section 'sft': model_path {tmp_path / 'nope'} does not exist" in found
    assert any(p.startswith(f"section 'ppo': data_path: {tmp_path / 'prompts.jsonl'}") for p in found)
    assert f"section 'ppo': reward_path {tmp_path / 'other-rm'} does not exist" in found
    assert not any("actor_path" in p or "section 'rm'" in p for p in found)  # the chain's own results


def test_a_bad_config_exits_2_without_a_traceback(tmp_path):
    raw = quickstart_raw()
    raw["rm"] = {**raw["rm"], "optimiser": {}}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(raw))
    proc = subprocess.run([sys.executable, "rlhf.py", "--config", str(path)], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "section 'rm' (shared keys + its own): unknown key 'optimiser': did you mean 'optimizer'?" in proc.stderr


def test_reward_trend_means_the_first_and_last_quarter():
    curve = [[s, float(s), 10.0 * s, 0.5] for s in range(1, 21)]  # [step, reward, score, kl]
    from trainer.recipes.ppo import reward_trend

    trend = reward_trend(curve)
    assert trend["window"] == 5 and trend["reward_start"] == 3.0 and trend["reward_end"] == 18.0
    assert trend["score_end"] == 180.0 and trend["kl_end"] == 0.5
    assert reward_trend(curve[:3])["window"] == 1


# ------------------------------------------------------------------------------------ real runs

SFT_STEPS, RM_STEPS, PPO_STEPS, KILL_AT = 8, 6, 3, 4  # RM saves at 2, 4, 6; SFT only at 8


def chain_config(tmp: Path, name: str, base_pp: Path) -> Path:
    raw = quickstart_raw(model_path=str(base_pp), save_path=str(tmp / name), keep_last=2,
                         csv_monitor={"enabled": True, "output_path": str(tmp / name / "logs")})
    raw["sft"] = {**raw["sft"], "train_steps": SFT_STEPS}
    raw["rm"] = {**raw["rm"], "train_steps": RM_STEPS, "save_interval": 2}
    raw["ppo"] = {**raw["ppo"], "train_steps": PPO_STEPS, "ppo": {**raw["ppo"]["ppo"], "rollout_batch_size": 8, "max_new_tokens": 8}}
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(raw, indent=1))
    return path


def dpo_chain_config(tmp: Path, name: str, base_pp: Path) -> Path:
    """SFT -> DPO on one pairwise file split 4:6 (SFT trains on the chosen answers of its share)."""
    raw = {k: v for k, v in quickstart_raw(model_path=str(base_pp), save_path=str(tmp / name)).items() if k not in ("sft", "rm", "ppo")}
    raw.update(pipeline=["sft", "dpo"], data_path=PREFS, data_split="4,6", eval_fraction=0.2,
               sft={"train_steps": 6}, dpo={"train_steps": 4, "optimizer": {"params": {"lr": 1e-3}}})
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(raw, indent=1))
    return path




def mtimes(folder: Path) -> dict:
    return {str(p): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def chains(tmp_path_factory):
    from convert.hg_to_pp import hg_to_pp
    from models.random_init import save_random_model

    tmp = tmp_path_factory.mktemp("rlhf")
    base = hg_to_pp(save_random_model(REPO / "configs" / "tiny-llama", tmp / "base-hf", seed=0), tmp / "base-pp", progress=False)
    configs = {"uninterrupted": chain_config(tmp, "uninterrupted", base), "dpo": dpo_chain_config(tmp, "dpo", base),
               "killed": chain_config(tmp, "killed", base)}
    first = launch(str(REPO / "tests" / "multirank" / "rlhf_runs.py"), *[a for p in configs.values() for a in ("--config", str(p))],
                   "--kill-last-at-step", str(KILL_AT), check=False)
    killed = tmp / "killed"
    after_kill = {"returncode": first.returncode, "rm_latest": (killed / "rm" / "latest").read_text(),
                  "done": sorted(json.loads((killed / chain.STATE_FILE).read_text())["done"]), "sft_files": mtimes(killed / "sft"),
                  "log": first.stdout + first.stderr}
    rerun = launch("rlhf.py", "--config", str(configs["killed"]))
    return {"tmp": tmp, "after_kill": after_kill, "rerun": rerun.stdout + rerun.stderr}


def assert_same_weights(a_dir: Path, b_dir: Path, tol: float = 1e-6) -> None:
    files = sorted(a_dir.glob("layer_*-model_states.pt"))
    assert len(files) == 7
    for f in files:
        a, b = torch.load(f, weights_only=True), torch.load(b_dir / f.name, weights_only=True)
        worst = max((a[k] - b[k]).abs().max().item() for k in a)
        assert worst <= tol, (f.name, worst)


@pytest.mark.multirank
def test_killed_during_rm_rerun_skips_sft_resumes_rm_and_ends_as_an_uninterrupted_run(chains):
    tmp, after_kill, rerun = chains["tmp"], chains["after_kill"], chains["rerun"]
    killed, whole = tmp / "killed", tmp / "uninterrupted"
    assert after_kill["returncode"] != 0
    assert after_kill["rm_latest"] == "global_step2" and after_kill["done"] == ["sft"], after_kill["log"][-3000:]
    assert "rlhf: step sft is done" in rerun and "rlhf: step 1/3 sft" not in rerun
    assert mtimes(killed / "sft") == after_kill["sft_files"]  # not rerun, not re-exported
    assert f"resumed from {killed}/rm/global_step2 at step 2" in rerun
    assert sorted(json.loads((killed / chain.STATE_FILE).read_text())["done"]) == ["ppo", "rm", "sft"]
    assert_same_weights(whole / "rm" / f"global_step{RM_STEPS}", killed / "rm" / f"global_step{RM_STEPS}")
    assert_same_weights(whole / "ppo" / f"global_step{PPO_STEPS}", killed / "ppo" / f"global_step{PPO_STEPS}")
    assert_same_weights(whole / "ppo" / "critic" / f"global_step{PPO_STEPS}", killed / "ppo" / "critic" / f"global_step{PPO_STEPS}")
    ours, theirs = (json.loads((root / chain.SUMMARY_FILE).read_text())["steps"] for root in (killed, whole))
    assert ours["ppo"]["reward_end"] == pytest.approx(theirs["ppo"]["reward_end"], abs=1e-6)
    assert ours["rm"]["eval_accuracy"] == theirs["rm"]["eval_accuracy"]


@pytest.mark.multirank
def test_exports_load_and_the_summary_has_every_step(chains):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    tmp, rerun = chains["tmp"], chains["rerun"]
    root = tmp / "uninterrupted"
    for path, auto in (("sft/hf", AutoModelForCausalLM), ("rm/hf", AutoModelForSequenceClassification),
                       ("ppo/hf", AutoModelForCausalLM), ("ppo/critic_hf", AutoModelForSequenceClassification)):
        model = auto.from_pretrained(root / path, dtype=torch.float32)
        assert model.config.architectures == [f"Llama{auto.__name__[len('AutoModel'):]}"], path
    summary = json.loads((root / chain.SUMMARY_FILE).read_text())
    assert summary["pipeline"] == ["sft", "rm", "ppo"]
    sft, rm, ppo = (summary["steps"][n] for n in ("sft", "rm", "ppo"))
    assert sft["steps"] == SFT_STEPS and 0 < sft["eval_loss"] < 7
    assert rm["steps"] == RM_STEPS and 0 <= rm["eval_accuracy"] <= 1
    assert ppo["steps"] == PPO_STEPS and ppo["window"] == 1 and ppo["kl_end"] is not None
    assert Path(ppo["reward_curve"]).is_file() and ppo["exports"] == [str(root / "ppo" / "hf"), str(root / "ppo" / "critic_hf")]
    assert "RLHF summary" in rerun and "reward" in rerun
    for step, metric in (("sft", "Eval_loss"), ("rm", "Eval_accuracy"), ("ppo", "PPO_reward_mean"), ("ppo", "PPO_kl")):
        assert (root / "logs" / step / f"{metric}.csv").is_file(), (step, metric)
    for step in ("sft", "rm", "ppo"):  # the config each recipe ran with, where train_ds.py would keep it
        assert json.loads((root / "configs" / f"{step}.json").read_text()) == json.loads((root / step / "train_config.json").read_text())


@pytest.mark.multirank
def test_sft_then_dpo_on_data_split_shares(chains):
    from transformers import AutoModelForCausalLM

    root = chains["tmp"] / "dpo"
    configs = [json.loads((root / "configs" / f"{s}.json").read_text()) for s in ("sft", "dpo")]
    assert [(c["stage"], c["data_split"], c["split_index"]) for c in configs] == [("sft", "4,6", 0), ("dpo", "4,6", 1)]
    assert configs[1]["model_path"] == str(root / "sft")
    summary = json.loads((root / chain.SUMMARY_FILE).read_text())
    assert summary["pipeline"] == ["sft", "dpo"] and summary["steps"]["dpo"]["steps"] == 4
    assert 0 <= summary["steps"]["dpo"]["eval_rewards/accuracies"] <= 1
    AutoModelForCausalLM.from_pretrained(root / "dpo" / "hf")
