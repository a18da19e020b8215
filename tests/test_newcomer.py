"""A newcomer's path through README.md (issue 23): the commands it gives work in a fresh shell with
its activation line, the suite's duration and fast subset are there, the hub download command is one
the pinned packages install, `make clean` keeps checkpoints, the licence is there. No launch: seconds."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

README = (REPO / "README.md").read_text()


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def activation_line() -> str:
    """The README's line that activates the venv: the first command after the two make targets."""
    setup = README.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    blocks = bash_blocks(setup)
    assert "make quickstart" in blocks[0] and "make test" in blocks[0]
    lines = [line for block in blocks[1:] for line in block.splitlines() if "activate" in line]
    assert lines, "README Set-up: no line activates .venv after the two make targets"
    return lines[0].strip()


def fresh_shell(script: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """bash in the repo with a login-like environment: no venv on PATH, no VIRTUAL_ENV, no PYTHONPATH.
    The README's `.venv` is this test run's venv (make test's is REPO/.venv; elsewhere sys.prefix)."""
    venv = Path(sys.prefix)
    if venv != REPO / ".venv":
        script = script.replace(".venv/", f"{venv}/")
    env = {"HOME": str(tmp_path), "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_readme_activation_line_makes_the_later_commands_work(tmp_path):
    """Point 1: without the activation line `python -m data.inspect` has no torch; with it the
    README's own commands run (data.inspect, deepspeed and hf on PATH)."""
    line = activation_line()
    assert line == "source .venv/bin/activate"
    inspect = next(l for b in bash_blocks(README) for l in b.splitlines() if l.startswith("python -m data.inspect data/samples/mixed.json"))
    without = fresh_shell("python3 -c 'import torch' 2>&1 || echo NO_TORCH; command -v deepspeed || echo NO_DEEPSPEED", tmp_path)
    assert "NO_DEEPSPEED" in without.stdout
    proc = fresh_shell(f"set -e\n{line}\n{inspect}\ncommand -v deepspeed\nhf download --help >/dev/null\n", tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "padding efficiency" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1].endswith("/bin/deepspeed")


def test_quickstart_scripts_end_with_the_activation_line():
    """Point 1: the quickstarts' closing messages say how to get the commands in a new shell."""
    line = activation_line()
    for script in ("tools/quickstart.sh", "tools/rlhf_quickstart.sh", "tools/grpo_quickstart.sh"):
        closing = (REPO / script).read_text().rsplit("<<MSG", 1)[1]
        assert line in closing, script


def test_readme_gives_the_suite_duration_and_the_fast_subset():
    """Point 5: the duration of `make test`, and the fast subset as a command that selects tests."""
    setup = README.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    assert re.search(r"`make test` runs the whole suite, about \d+ minutes", setup)
    assert '`make test-fast` (`pytest -m "not multirank"`' in setup
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r'^test-fast: install\n\t\$\(PY\) -m pytest -m "not multirank"$', makefile, flags=re.M)
    assert "multirank:" in (REPO / "pytest.ini").read_text()


def test_hub_download_command_is_installed():
    """Point 6: the README's download command is `hf download` (the pinned huggingface_hub's CLI);
    `huggingface-cli` is no longer installed and not recommended anywhere."""
    bindir = Path(sys.executable).parent
    assert (bindir / "hf").exists() and not (bindir / "huggingface-cli").exists()
    assert "hf download ORG/NAME --local-dir NAME" in README and "huggingface-cli" not in README.replace(
        "no longer installs `huggingface-cli`", "")
    assert "huggingface-cli" not in (REPO / "convert" / "hg_to_pp.py").read_text()


def modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)) or ".": p.stat().st_mode & 0o777 for p in [folder, *folder.rglob("*")]}


def test_exports_and_caches_honour_the_umask(tiny_hf, tmp_path):
    """Point 10: hg_to_pp / pp_to_hg folders and the dataset cache get the umask's modes (0755/0644
    under 022, 0750/0640 under 027), not mkdtemp's 0700 / mkstemp's 0600."""
    from convert.hg_to_pp import hg_to_pp
    from convert.pp_to_hg import pp_to_hg
    from data.cache import load_or_build

    src = tiny_hf("llama")
    for umask, folder_mode, file_mode in ((0o022, 0o755, 0o644), (0o027, 0o750, 0o640)):
        old = os.umask(umask)
        try:
            pp = hg_to_pp(src, tmp_path / f"pp-{umask:o}", progress=False)
            hf = pp_to_hg(pp, tmp_path / f"hf-{umask:o}", progress=False)
            load_or_build(str(tmp_path / f"cache-{umask:o}"), "k", lambda: {"x": 1})
        finally:
            os.umask(old)
        for folder in (pp, hf):
            got = modes(Path(folder))
            assert got.pop(".") == folder_mode, folder
            # files written here get the umask's mode; tokenizer files copied from the source keep theirs (0644)
            assert set(got.values()) <= {file_mode, 0o644} and file_mode in got.values(), (folder, got)
        assert (tmp_path / f"cache-{umask:o}" / "k.pt").stat().st_mode & 0o777 == file_mode


def test_make_clean_keeps_user_runs(tmp_path):
    """Point 9: `make clean` removes the quickstarts' outputs and caches, not other runs (the README's
    examples keep real checkpoints in runs/)."""
    (tmp_path / "Makefile").write_text((REPO / "Makefile").read_text())
    for d in ("runs/quickstart/ckpt", "runs/rlhf-quickstart/sft", "runs/llama-7b-sft/global_step10", "data/.cache", ".pytest_cache"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "runs/llama-7b-sft/latest").write_text("global_step10")
    proc = subprocess.run(["make", "clean"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "runs/llama-7b-sft/latest").read_text() == "global_step10"
    for gone in ("runs/quickstart", "runs/rlhf-quickstart", "data/.cache", ".pytest_cache"):
        assert not (tmp_path / gone).exists(), gone


def test_license_is_apache_2():
    """Point 15: a LICENSE (Apache-2.0, as DeepSpeed and transformers), named in setup.py and README."""
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    assert 'license="Apache-2.0"' in (REPO / "setup.py").read_text()
    assert "Apache-2.0 (`LICENSE`)" in README


def test_demo_refuses_a_sequence_classification_export(tmp_path):
    """Point 3: a *ForSequenceClassification export (rlhf.py's rm/hf, ppo/critic_hf) is refused with one
    error line and status 2, instead of generating with a random LM head and exiting 0."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    config = AutoConfig.from_pretrained(REPO / "configs" / "tiny-llama")
    config.num_labels = 1
    rm = tmp_path / "rm-hf"
    AutoModelForSequenceClassification.from_config(config).save_pretrained(rm)
    AutoTokenizer.from_pretrained(REPO / "configs" / "tiny-llama").save_pretrained(rm)
    proc = subprocess.run([sys.executable, str(REPO / "demo.py"), "--model-path", str(rm), "--prompt", "Hello", "--max-new-tokens", "4"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout + proc.stderr[-2000:]
    assert proc.stderr.splitlines()[-1] == (
        f"error: --model-path {rm}: config.json's architectures ['LlamaForSequenceClassification'] have no LM head to generate "
        "with (a reward/value model export, e.g. rlhf.py's rm/hf or ppo/critic_hf); give a *ForCausalLM export (sft/hf, ppo/hf) "
        "or load it with AutoModelForSequenceClassification to score text")
    assert "Traceback" not in proc.stderr


def config_with(**over) -> dict:
    raw = json.loads((REPO / "configs" / "quickstart.json").read_text())
    raw.update(over)
    return raw


def nested_problems(**over) -> list[str]:
    from trainer.recipes import ConfigError, validate_config

    try:
        validate_config(config_with(**over), "cfg.json", world_size=2)
    except ConfigError as e:
        return e.problems
    return []


def test_deepspeed_nested_params_typos_are_caught_before_launch():
    """Point 8: optimizer.params / scheduler.params against what the class DeepSpeed builds for the
    type accepts, one line with the closest key; DeepSpeed's own config-only keys pass."""
    adamw = {"type": "AdamW", "params": {"lr": 1e-3, "weight_decy": 0.01, "torch_adam": True}}
    assert nested_problems(optimizer=adamw) == [
        "optimizer.params: unknown key 'weight_decy' for optimizer type 'AdamW' (torch.optim.adamw.AdamW): did you mean 'weight_decay'?"]
    fused = {"type": "Adam", "params": {"lr": 1e-3, "betas": [0.9, 0.95], "adam_w_mode": False, "fp32_optimizer_states": True}}
    assert nested_problems(optimizer=fused) == []
    offload = {"type": "AdamW", "params": {"lr": 1e-3, "ams_grad": True}}
    assert nested_problems(optimizer=offload, zero_optimization={"stage": 1, "offload_optimizer": {"device": "cpu"}}) == [
        "optimizer.params: unknown key 'ams_grad' for optimizer type 'AdamW' (deepspeed.ops.adam.cpu_adam.DeepSpeedCPUAdam): "
        "did you mean 'amsgrad'?"]
    assert nested_problems(optimizer={"type": "SGD", "params": {"lr": 0.1, "momentun": 0.9}}) == [
        "optimizer.params: unknown key 'momentun' for optimizer type 'SGD' (torch.optim.sgd.SGD): did you mean 'momentum'?"]
    assert nested_problems(optimizer={"type": "LionPytorch", "params": {"lr": 1e-4, "use_trition": True}}) == [
        "optimizer.params: unknown key 'use_trition' for optimizer type 'LionPytorch' (lion_pytorch.Lion): did you mean 'use_triton'?"]
    scheduler = {"type": "WarmupDecayLR", "params": {"warmup_max_lr": 1e-3, "warmup_num_step": 10}}
    assert nested_problems(scheduler=scheduler) == [
        "scheduler.params: unknown key 'warmup_num_step' for scheduler type 'WarmupDecayLR' "
        "(deepspeed.runtime.lr_schedules.WarmupDecayLR): did you mean 'warmup_num_steps'?"]
    assert nested_problems(scheduler={"type": "WarmupDecay", "params": {}}) == [
        "scheduler type 'WarmupDecay' is neither one of DeepSpeed's (WarmupLR, WarmupDecayLR, WarmupCosineLR, OneCycle, "
        "LRRangeTest) nor a torch.optim.lr_scheduler class"]
    for name in ("quickstart.json", "ds_config_pp.json", "ds_config_rm.json", "ppo_tiny.json", "dpo_tiny.json"):
        raw = json.loads((REPO / "configs" / name).read_text())
        from trainer.recipes import validate_config
        validate_config(raw, name)  # the shipped configs pass


def test_ppo_critic_optimizer_params_are_checked_too():
    """Point 8: the critic's own optimizer (ppo.critic.optimizer replaces the actor's) is checked as well."""
    from trainer.recipes import ConfigError, load_config, validate_config

    raw = json.loads((REPO / "configs" / "ppo_tiny.json").read_text())
    raw["ppo"]["critic"] = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "betas": [0.9, 0.95], "eps_": 1e-8, "torch_adam": True}}}
    try:
        validate_config(raw, "ppo.json", world_size=2)
    except ConfigError as e:
        assert e.problems == ["ppo.critic.optimizer.params: unknown key 'eps_' for optimizer type 'AdamW' "
                              "(torch.optim.adamw.AdamW): did you mean 'eps'?"]
    else:
        raise AssertionError("no problem found")
    load_config(str(REPO / "configs" / "ds_config_ppo.json"), world_size=8)


def test_op_cache_is_per_venv_unless_the_user_set_one(tmp_path):
    """Point 7: every entry point (and the Makefile) points TORCH_EXTENSIONS_DIR into the venv, so two
    venvs or clones do not rebuild each other's ops in ~/.cache/torch_extensions; a set one wins."""
    env = {k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"}
    # main() sets it (no work at import time); --help stops right after
    probe = ("import contextlib, io, os, {m}\nwith contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
             "    {m}.main(['--help'])\nprint(os.environ.get('TORCH_EXTENSIONS_DIR'))")
    for module in ("train_ds", "rlhf", "demo", "convert_model"):
        proc = subprocess.run([sys.executable, "-c", probe.format(m=module)], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=120)
        assert proc.stdout.strip() == str(Path(sys.prefix) / "torch_extensions"), (module, proc.stderr[-1000:])
        proc = subprocess.run([sys.executable, "-c", probe.format(m=module)], cwd=REPO, capture_output=True, text=True,
                              timeout=120, env={**env, "TORCH_EXTENSIONS_DIR": str(tmp_path / "mine")})
        assert proc.stdout.strip() == str(tmp_path / "mine"), module
    (tmp_path / "Makefile").write_text((REPO / "Makefile").read_text() + "\nshow:\n\t@echo $$TORCH_EXTENSIONS_DIR\n")
    make = subprocess.run(["make", "-s", "show"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert make.stdout.strip() == str(tmp_path / ".venv" / "torch_extensions")
    make = subprocess.run(["make", "-s", "show"], cwd=tmp_path, env={**env, "TORCH_EXTENSIONS_DIR": "/x"}, capture_output=True,
                          text=True, timeout=60)
    assert make.stdout.strip() == "/x"


def test_readme_gpu_section_matches_the_pins():
    """Point 2: a "GPUs" section with the pins setup.py has, the wheel index, the build flags, what
    needs a compiler, flash-attn and the TORCH_CUDA_ARCH_LIST workaround, saying it was not checked on
    a GPU; setup.py points to it."""
    gpus = README.split("\n## GPUs\n", 1)[1].split("\n## ", 1)[0]
    setup = (REPO / "setup.py").read_text()
    torch_pin = re.search(r'"torch==([\d.]+)"', setup).group(1)
    ds_pin = re.search(r'"deepspeed==([\d.]+)"', setup).group(1)
    assert f"pip install torch=={torch_pin} --index-url https://download.pytorch.org/whl/cu" in gpus
    assert f"deepspeed=={ds_pin}" in gpus and "DS_BUILD_OPS=0 pip install -e '.[test]'" in gpus
    for needed in ("C++ compiler", "nvcc", "`TORCH_CUDA_ARCH_LIST=9.0a`", "export TORCH_CUDA_ARCH_LIST=9.0",
                   "pip install flash-attn --no-build-isolation", '"torch_adam": true', "no GPU was lent"):
        assert needed in gpus, needed
    # the flash-attn command is the one the run's own message gives
    assert "pip install flash-attn --no-build-isolation" in (REPO / "models" / "stage_io.py").read_text()
    assert 'README "GPUs"' in setup


def test_data_inspect_reads_a_training_config(tmp_path, capsys):
    """Point 11: --max-seq-len defaults to the trainer's 512 (not 2048), and --config inspects what a
    training config trains (its data, tokenizer, max_seq_len, stage kind), command-line options winning."""
    from data.inspect import main

    mixed = str(REPO / "data" / "samples" / "mixed.json")
    assert main([mixed, "--tokenizer-path", str(REPO / "configs" / "tiny-llama")]) == 0
    assert "kind: lm  max_seq_len: 512\n" in capsys.readouterr().out
    cfg = config_with(model_path=str(REPO / "configs" / "tiny-llama"), data_path=mixed, eval_fraction=0, pack=True)
    (tmp_path / "sft.json").write_text(json.dumps(cfg))
    assert main(["--config", str(tmp_path / "sft.json")]) == 0
    out = capsys.readouterr().out
    assert f"kind: lm  max_seq_len: 128  pack: True  (from {tmp_path / 'sft.json'})" in out
    assert "rows: 18  " in out and "padding efficiency: 0.932" in out  # 31 records packed into 128-token rows
    (tmp_path / "rm.json").write_text(json.dumps({**cfg, "stage": "rm", "pack": False}))
    assert main(["--config", str(tmp_path / "rm.json"), "--max-seq-len", "64"]) == 0
    assert "kind: ranked  max_seq_len: 64  (from" in capsys.readouterr().out
    assert main(["--config", str(tmp_path / "missing.json")]) == 2


def test_data_errors_point_at_the_fault(tmp_path, monkeypatch, capsys):
    """Point 12: a JSONL line missing its `}` is reported at its end (column 58, as Python says), not
    column 1; a typo'd record field gets "did you mean"; a missing data file is not told to set
    skip_bad_records (bad records still are)."""
    from data.errors import DataError, NoSamplesError, Problem
    from data.records import load_records
    from trainer import launch

    path = tmp_path / "bad.jsonl"
    path.write_text('{"type": "pretrain", "text": "hello"}\n{"type": "instruct", "instruct": "Say hi", "output": "hi"\n'
                    '{"type": "instruct", "instrcut": "x", "output": "y"}\n')
    lines = [str(p) for p in load_records([str(path)]).problems]
    assert lines[0] == f"{path}: record 1 (line 2): invalid JSON: Expecting ',' delimiter (column 58)"
    assert lines[1] == (f"{path}: record 2 (line 3): field 'instrcut': unknown field for type 'instruct': did you mean "
                        "'instruct'? (allowed: id, input, instruct, meta, output)")

    import trainer.engine.topology as topology
    import trainer.recipes as recipes

    monkeypatch.setattr(topology.Topology, "from_config", staticmethod(lambda cfg, rank, world: None))
    for problems, hint in (([Problem("d.jsonl", "no such file", reason="missing_file")], False),
                           ([Problem("d.jsonl", "bad", record=0, reason="invalid_json")], True)):
        def fail(*args, problems=problems):
            raise DataError(problems)
        monkeypatch.setattr(recipes, "get_recipe", lambda stage, fail=fail: fail)
        status, _ = launch.run_recipe(type("Cfg", (), {"stage": "sft"})(), launch.Rank(0, 1, "cpu"))
        err = capsys.readouterr().err
        assert status == 2 and ("skip_bad_records" in err) == hint, err
        assert err.splitlines()[0] == ("error: the training data has problems (fix them or set \"skip_bad_records\": true):"
                                       if hint else "error: the training data has problems:")

    def nothing_left(*args):
        raise NoSamplesError("no prompt samples left to train on (...): raise max_seq_len")
    monkeypatch.setattr(recipes, "get_recipe", lambda stage: nothing_left)
    status, _ = launch.run_recipe(type("Cfg", (), {"stage": "grpo"})(), launch.Rank(0, 1, "cpu"))
    assert status == 2 and capsys.readouterr().err == "error: no prompt samples left to train on (...): raise max_seq_len\n"


def saved_figures(monkeypatch) -> list:
    import matplotlib.figure

    figures = []
    real = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, path, *a, **k: (figures.append(fig), real(fig, path, *a, **k)))
    return figures


def test_plots_and_endings_say_what_they_show(tmp_path, monkeypatch):
    """Point 13: the RM/DPO loss curves say they average pairs; PPO's reward curve puts KL on its own
    axis with readable names; a standalone PPO run ends with its reward start -> end and writes the
    reward curve; a rerun of a finished config says how to train further."""
    from types import SimpleNamespace

    from trainer.recipes import done_line, rm
    from trainer.recipes.common import finish

    figures = saved_figures(monkeypatch)
    cfg = SimpleNamespace(stage="ppo", save_path=str(tmp_path), options=SimpleNamespace(ema_decay=None, reward_funcs=(),
                                                                                         reward_path=None))
    curve = [[s, -1.0 + s * 0.1, -0.9 + s * 0.1, 0.01 * s] for s in range(1, 21)]
    summary = {"step": 20, "start_step": 0, "history": [[s, 0.5] for s in range(1, 21)], "evals": [],
               "train_metrics": [[s, {"PPO/reward_mean": r, "PPO/score_mean": c, "PPO/kl": k}] for s, r, c, k in curve]}
    line = done_line(cfg, summary)
    assert line == (f"done: 20 steps, final train loss 0.5; reward -0.7 -> 0.8 (means of the first / last 5 steps; RM score "
                    f"-0.6 -> 0.9), KL 0.18; curve {tmp_path / 'reward_curve.png'}; checkpoints in {tmp_path}")
    assert (tmp_path / "reward_curve.png").is_file()
    left, right = figures[-1].axes
    assert [l.get_label() for l in left.get_lines()] == ["reward (RM score - KL penalty)", "RM score"]
    assert [l.get_label() for l in right.get_lines()] == ["KL to the reference"]
    assert right.get_ylabel() == "KL (nats per answer)" and "reward" in left.get_ylabel()
    # PPO scored by reward functions alone: the line and the curve name their score, not an RM's
    cfg.options.reward_funcs = ("math_answer",)
    assert "; reward functions' score -0.6 -> 0.9), KL 0.18" in done_line(cfg, summary)
    assert [l.get_label() for l in figures[-1].axes[0].get_lines()] == ["reward (reward functions' score - KL penalty)",
                                                                         "reward functions' score"]

    rerun = done_line(SimpleNamespace(stage="sft", save_path="runs/x"), {**summary, "start_step": 20})
    assert rerun.startswith("done: nothing to train: runs/x already holds step 20") and "raise train_steps or n_epochs" in rerun

    state = SimpleNamespace(step=3, evals=[], history=[[1, 0.7], [2, 0.6], [3, 0.5]])
    job = SimpleNamespace(data=SimpleNamespace(n_eval_rows=0), plan=SimpleNamespace(hf_config=SimpleNamespace(model_type="llama")))
    meter = SimpleNamespace(close=lambda: None, start_step=0)
    out = finish(SimpleNamespace(save_path=str(tmp_path)), SimpleNamespace(rank=0), job, None, state, meter, None, 3,
                 None, "rm", loss_label=rm.LOSS_LABEL)
    assert out["start_step"] == 0 and figures[-1].axes[0].get_ylabel() == rm.LOSS_LABEL
    assert "pairs" in rm.LOSS_LABEL and "target tokens" not in rm.LOSS_LABEL
    import inspect
    assert "loss_label=LOSS_LABEL" in inspect.getsource(rm.run)


def test_deepspeed_noise_is_dropped(capsys):
    """Point 14: DeepSpeed's CPU-alarming lines are filtered from its logger (set up before DeepSpeed
    configures it), other lines pass; the quickstarts run the deepspeed runner with --quiet."""
    import logging

    from trainer.quiet import quiet_deepspeed

    quiet_deepspeed()
    quiet_deepspeed()
    ds_logger = logging.getLogger("DeepSpeed")
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    ds_logger.addHandler(handler)
    try:
        for message in ("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.",
                        "Unable to find hostfile, will proceed with training with local resources only.",
                        "Setting CUDA_VISIBLE_DEVICES=0,1", "Attempting to get learning rate from scheduler before it has started",
                        "a real warning"):
            ds_logger.warning(message)
    finally:
        ds_logger.removeHandler(handler)
    assert seen == ["a real warning"]
    for script in ("tools/quickstart.sh", "tools/rlhf_quickstart.sh", "tools/grpo_quickstart.sh"):
        text = (REPO / script).read_text()
        assert "deepspeed --quiet --num_gpus 2" in text and "command -v nvidia-smi >/dev/null || export DS_ACCELERATOR=cpu" in text


POINT_14_LINES = ("Setting accelerator to CPU", "Unable to find hostfile", "Setting CUDA_VISIBLE_DEVICES", "stage=0 layers=",
                  "Attempting to get learning rate from scheduler", "SEED_LAYERS=")


@pytest.mark.multirank
def test_your_own_model_walkthrough_runs_as_written(tmp_path):
    """README "Your own model", its commands as written, in a fresh shell with the activation line, in a
    copy of the repo: a local HF folder (models.random_init) in place of `hf download` (no hub here);
    hg_to_pp, the derived config ("parts": "auto"), data.inspect --config, a 2-rank launch, pp_to_hg,
    demo.py. No launch line of issue 23.14 is printed."""
    import shutil

    from conftest import free_port

    section = README.split("\n## Your own model\n", 1)[1].split("\n## ", 1)[0]
    script = bash_blocks(section)[0]
    download = next(line for line in script.splitlines() if line.startswith("hf download "))
    local_dir = download.split("--local-dir ")[1].split()[0]
    script = script.replace(download, f"python -m models.random_init --config-dir configs/tiny-llama --out {local_dir} --seed 0")
    script = script.replace("deepspeed --quiet --num_gpus 2 ", f"deepspeed --quiet --num_gpus 2 --master_port {free_port()} ")
    clone = tmp_path / "clone"
    shutil.copytree(REPO, clone, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "checkpoints", "__pycache__", ".pytest_cache",
                                                               ".cache", "*.egg-info"))
    venv = Path(sys.prefix)
    activate = activation_line().replace(".venv/", f"{venv}/")
    env = {"HOME": str(tmp_path), "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(venv / "torch_extensions"))}
    proc = subprocess.run(["bash", "-c", f"set -e\n{activate}\n{script}"], cwd=clone, env=env, capture_output=True, text=True,
                          timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "kind: lm  max_seq_len: 128  (from configs/my-model.json)" in out
    assert "done: " in out and "checkpoints in runs/my-model/ckpt" in out
    config = json.loads((clone / "configs" / "my-model.json").read_text())
    assert config["model_topo"]["parts"] == "auto" and config["model_path"] == "checkpoints/my-model-pp"
    hf = clone / "runs" / "my-model" / "hf"
    assert (hf / "config.json").is_file() and list(hf.glob("*.safetensors"))
    assert proc.stdout.strip().splitlines()[-1].strip()  # demo.py's reply
    for line in POINT_14_LINES:
        assert line not in out, line


def test_dpo_progress_bar_keeps_one_field_set():
    """Point 14: DPO's bar showed loss/lr/tok_s at each update and only then had acc/margin appended, so
    its fields flipped between two sets; now every update shows one set, acc and margin included."""
    import inspect
    from types import SimpleNamespace

    from trainer.metrics import StepMeter
    from trainer.recipes import dpo

    shown_at_update = []

    class Bar:
        postfix = ""

        def set_postfix(self, d):
            self.postfix = ", ".join(f"{k}={v}" for k, v in d.items())

        def set_postfix_str(self, s):
            self.postfix = s

        def update(self, n):
            shown_at_update.append(self.postfix)

    meter = object.__new__(StepMeter)
    meter.rank, meter.world_size, meter.flops_token, meter.peak, meter.last_eval = 0, 1, 1.0, None, {}
    meter.engine = SimpleNamespace(get_lr=lambda: [1e-3], get_global_grad_norm=lambda: None, monitor=None)
    meter.bar = Bar()
    for step in (1, 2):
        meter.log_step(step, 0.69, 100, 1.0, shown={"acc": 0.5, "margin": 0.01})
    assert shown_at_update == ["loss=0.6900, lr=1.00e-03, tok_s=100, acc=0.5, margin=0.01"] * 2
    assert "set_postfix" not in inspect.getsource(dpo)


def test_input_check_runs_on_the_first_node_only(tmp_path, monkeypatch):
    """Point 4: missing model/data paths are config errors on the first node; the other nodes of a
    multi-node job leave them to the preflight, which names the node (a node stopping alone would
    leave rank 0 waiting)."""
    from trainer.recipes import ConfigError, load_checked_config

    cfg = config_with(model_path=str(tmp_path / "no-model"), data_path=str(tmp_path / "no.jsonl"))
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    monkeypatch.delenv("GROUP_RANK", raising=False)
    for env, raises in (({"CROSS_RANK": "0"}, True), ({"CROSS_RANK": "1"}, False), ({"GROUP_RANK": "2"}, False), ({}, True)):
        monkeypatch.delenv("CROSS_RANK", raising=False)
        monkeypatch.delenv("GROUP_RANK", raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        try:
            load_checked_config(str(tmp_path / "c.json"), world_size=2)
        except ConfigError as e:
            assert raises and e.problems[0].startswith(f"model_path {tmp_path / 'no-model'} does not exist")
            assert e.problems[1].startswith(f"data_path: {tmp_path / 'no.jsonl'}: no such file")
        else:
            assert not raises, env
