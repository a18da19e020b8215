"""train_ds.py / trainer on real 2-rank launches (CPU, gloo): the loss falls; 2 stages, 1 stage x 2
data-parallel ranks and a single-process HF loop take the same steps; bf16, lion-pytorch, ZeRO-1 +
CPU offload and activation checkpointing run; a run killed during a save resumes exactly.

Launches are grouped (each costs ~10-15 s of start-up): one launch trains most configs in sequence
(tests/multirank/train_runs.py), and the kill/resume test needs two more.
"""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO
from conftest import launch_ranks as launch

from convert.hg_to_pp import hg_to_pp
from convert.pp_to_hg import pp_to_hg

pytestmark = pytest.mark.multirank

DATA = str(REPO / "data" / "samples" / "mixed.json")
SEQ = 64
ADAMW = {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}}
SGD = {"type": "SGD", "params": {"lr": 0.5, "momentum": 0.9, "weight_decay": 0.0}}


def make_config(tmp: Path, name: str, pp_dir: Path, **over) -> Path:
    cfg = {
        "model_path": str(pp_dir), "save_path": str(tmp / name), "data_path": DATA, "max_seq_len": SEQ,
        "train_steps": 3, "seed": 7, "resume": "never", "keep_last": 3,
        "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [2, 1]}, "parts": [2, 5]},
        "train_batch_size": 6, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 3,
        "steps_per_print": 10**6, "optimizer": ADAMW,
    }
    cfg.update(over)
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(cfg, indent=1))
    return path






def exported_weights(save_path: Path, out: Path) -> dict:
    from safetensors.torch import load_file

    hf = pp_to_hg(save_path, out, progress=False)
    tensors = {}
    for f in hf.glob("*.safetensors"):
        tensors.update(load_file(f))
    return tensors


def hf_reference(hf_dir: Path, pp_dir: Path, steps: int, optimizer: dict, micro: int = 2, accum: int = 3, seed: int = 7,
                 clip: float = 1.0):
    """Single-process HF training on the same global batches: loss = sum of token losses / N_global,
    micro-batches accumulated like the pipeline's; same optimizer, weight-decay groups and gradient
    clipping (DeepSpeed's default gradient_clipping is 1.0; these steps' norms are 1.4-2.4, so it bites)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from data.dataset import build_dataset
    from trainer.batches import GlobalBatches
    from trainer.config import DEFAULT_NO_DECAY

    tok = AutoTokenizer.from_pretrained(pp_dir)
    data = build_dataset(DATA, tok, SEQ, kind="lm", seed=seed)
    batches = GlobalBatches(data.train, micro, accum, 0, 1, seed)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="sdpa")
    decay = [p for n, p in model.named_parameters() if not n.endswith(DEFAULT_NO_DECAY)]
    no_decay = [p for n, p in model.named_parameters() if n.endswith(DEFAULT_NO_DECAY)]
    groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    params = dict(optimizer["params"])
    opt = torch.optim.AdamW(groups, **params) if optimizer["type"] == "AdamW" else torch.optim.SGD(groups, **params)
    losses = []
    for _ in range(steps):
        micro_batches, n_global, _ = batches.next_step()
        total = 0.0
        for (ids, mask), labels in micro_batches:
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum") / n_global
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()
        losses.append(total)
    return {k: v.detach() for k, v in model.state_dict().items()}, losses


@pytest.fixture(scope="module")
def model_dirs(tiny_hf, tmp_path_factory):
    hf_dir = tiny_hf("llama", False)
    pp_dir = hg_to_pp(hf_dir, tmp_path_factory.mktemp("pp") / "pp", progress=False)
    return hf_dir, pp_dir


@pytest.fixture(scope="module")
def runs(model_dirs, tmp_path_factory):
    """One launch, many configs; returns {name: (summary, save_path)}."""
    _, pp = model_dirs
    tmp = tmp_path_factory.mktemp("runs")
    names = {
        "falls": make_config(tmp, "falls", pp, train_steps=None, n_epochs=8, train_batch_size=4, gradient_accumulation_steps=2,
                             eval_fraction=0.15, eval_interval=10, parts=None, optimizer={**ADAMW, "params": {**ADAMW["params"], "lr": 3e-3}},
                             scheduler={"type": "WarmupDecayLR", "params": {"warmup_max_lr": 3e-3, "warmup_num_steps": 5}},
                             csv_monitor={"enabled": True, "output_path": str(tmp / "falls-logs"), "job_name": "falls"}),
        "two_stage_adamw": make_config(tmp, "two_stage_adamw", pp),
        "one_stage_dp2_adamw": make_config(tmp, "one_stage_dp2_adamw", pp, train_micro_batch_size_per_gpu=1,
                                           model_topo={"process_topology": {"axes": ["pipe", "data"], "dims": [1, 2]}, "parts": [7]}),
        "two_stage_sgd": make_config(tmp, "two_stage_sgd", pp, optimizer=SGD),
        "grad_ckpt": make_config(tmp, "grad_ckpt", pp, use_grad_ckpt=True, train_steps=2),
        # torch.compile of each block inside DeepSpeed's pipeline (aot_eager: dynamo's graph capture
        # without inductor's minute of C++ compilation on CPU; tests/test_compile.py covers inductor).
        "compiled": make_config(tmp, "compiled", pp, compile={"backend": "aot_eager"}),
        "bf16": make_config(tmp, "bf16", pp, bf16={"enabled": True}, train_steps=2),
        "lion_pytorch": make_config(tmp, "lion_pytorch", pp, train_steps=2,
                                    optimizer={"type": "LionPytorch", "params": {"lr": 1e-4, "weight_decay": 0.1, "use_triton": True}}),
        "zero1_offload": make_config(tmp, "zero1_offload", pp, train_steps=2,
                                     zero_optimization={"stage": 1, "offload_optimizer": {"device": "cpu"}}),
        # An RM initialised from the "falls" SFT run's save_path (its `latest`), lr 0: every layer but the
        # new value head must come out equal to the SFT checkpoint's.
        "rm_from_sft_save_path": make_config(tmp, "rm_from_sft_save_path", tmp / "falls", stage="rm", train_steps=2,
                                             data_path=str(REPO / "data" / "samples" / "pairwise.json"),
                                             train_batch_size=2, train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=2,
                                             optimizer={"type": "SGD", "params": {"lr": 0.0}}),
        # from_scratch: model_path only needs config.json + tokenizer; the seeded init must not depend
        # on the partition (2 stages vs 1 stage x 2 data-parallel ranks take the same first step).
        "scratch_two_stage": make_config(tmp, "scratch_two_stage", REPO / "configs" / "tiny-llama", from_scratch=True, train_steps=2),
        "scratch_one_stage": make_config(tmp, "scratch_one_stage", REPO / "configs" / "tiny-llama", from_scratch=True, train_steps=2,
                                         train_micro_batch_size_per_gpu=1,
                                         model_topo={"process_topology": {"axes": ["pipe", "data"], "dims": [1, 2]}, "parts": [7]}),
        # keep_last (issue 11.8), three runs on one save_path: 5 saves keep 2; resume the older
        # global_step4 and save 6, 7 (step 5 is now stale); resume latest and save 8, 9.
        "prune": make_config(tmp, "prune", pp, train_steps=5, save_interval=1, keep_last=2),
        "prune_resume_older": make_config(tmp, "prune_resume_older", pp, save_path=str(tmp / "prune"), train_steps=7,
                                          save_interval=2, keep_last=2, resume=str(tmp / "prune" / "global_step4")),
        "prune_resume_left": make_config(tmp, "prune_resume_left", pp, save_path=str(tmp / "prune"), train_steps=9,
                                         save_interval=1, keep_last=2, resume="auto"),
        "resume_reference": make_config(tmp, "resume_reference", pp, train_steps=6,
                                        scheduler={"type": "WarmupDecayLR", "params": {"warmup_max_lr": 1e-3, "warmup_num_steps": 2}}),
    }
    # "falls" uses the auto split: drop the explicit parts.
    cfg = json.loads(names["falls"].read_text())
    cfg["model_topo"]["parts"] = "auto"
    del cfg["parts"]
    names["falls"].write_text(json.dumps(cfg))
    out = tmp / "results.jsonl"
    args = [a for p in names.values() for a in ("--config", str(p))]
    launch(str(REPO / "tests" / "multirank" / "train_runs.py"), *args, "--out", str(out))
    results = [json.loads(l) for l in out.read_text().splitlines()]
    return {name: (r, tmp / name) for name, r in zip(names, results)}, tmp


def losses(summary):
    return [loss for _, loss in summary["history"]]


def test_loss_falls_with_eval_logs_and_curve(runs):
    runs, tmp = runs
    summary, save = runs["falls"]
    trained = losses(summary)
    assert len(trained) >= 40
    assert sum(trained[-5:]) / 5 < trained[0] - 1.0, trained
    evals = [e["loss"] for _, e in summary["evals"]]
    assert len(evals) >= 3 and evals[-1] < evals[0]
    assert summary["evals"][-1][1]["perplexity"] == pytest.approx(math.exp(evals[-1]))
    assert (save / "loss_curve.png").stat().st_size > 10_000
    assert (save / "latest").read_text() == f"global_step{summary['step']}"
    csv = (tmp / "falls-logs" / "falls" / "Train_loss.csv").read_text().splitlines()
    assert len(csv) >= len(trained)  # one row per step (plus a header)
    assert (tmp / "falls-logs" / "falls" / "Train_tokens_per_s.csv").is_file()
    assert (tmp / "falls-logs" / "falls" / "Eval_perplexity.csv").is_file()


@pytest.mark.parametrize("name,optimizer", [("two_stage_adamw", ADAMW), ("one_stage_dp2_adamw", ADAMW), ("two_stage_sgd", SGD)])
def test_parity_with_single_process_hf_loop(runs, model_dirs, tmp_path, name, optimizer):
    runs, _ = runs
    hf_dir, pp_dir = model_dirs
    summary, save = runs[name]
    expected_weights, expected_losses = hf_reference(hf_dir, pp_dir, 3, optimizer)
    torch.testing.assert_close(torch.tensor(losses(summary)), torch.tensor(expected_losses), rtol=0, atol=2e-6)
    got = exported_weights(save, tmp_path / "hf")
    assert got.keys() == expected_weights.keys()
    worst = max((got[k] - expected_weights[k]).abs().max().item() for k in got)
    assert worst <= 2e-5, f"max weight difference {worst}"
    # And training moved the weights far beyond that noise.
    start = exported_weights(pp_dir, tmp_path / "start")
    assert max((got[k] - start[k]).abs().max().item() for k in got) > 1e-3


def test_variants_take_the_same_first_steps(runs):
    """Activation checkpointing and ZeRO-1 + CPU offload change memory, not math; bf16 and Lion run."""
    runs, _ = runs
    reference = losses(runs["two_stage_adamw"][0])
    torch.testing.assert_close(torch.tensor(losses(runs["grad_ckpt"][0])), torch.tensor(reference[:2]), rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.tensor(losses(runs["zero1_offload"][0])), torch.tensor(reference[:2]), rtol=0, atol=1e-5)
    bf16 = losses(runs["bf16"][0])
    assert abs(bf16[0] - reference[0]) < 0.05 and all(map(lambda x: x == x, bf16))
    lion = losses(runs["lion_pytorch"][0])
    assert lion[0] == pytest.approx(reference[0], abs=1e-6) and lion[1] != pytest.approx(lion[0], abs=1e-7)
    layer = torch.load(runs["bf16"][1] / "global_step2" / "layer_01-model_states.pt", weights_only=True)
    assert {t.dtype for t in layer.values()} == {torch.bfloat16}


def test_from_scratch_init_is_seeded_and_partition_independent(runs):
    runs, _ = runs
    two, one = losses(runs["scratch_two_stage"][0]), losses(runs["scratch_one_stage"][0])
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=0, atol=2e-6)
    assert abs(two[0] - math.log(1024)) < 0.05  # HF-style init (std 0.02): near-uniform predictions
    assert two[0] != pytest.approx(losses(runs["two_stage_adamw"][0])[0], abs=1e-4)  # not the loaded weights


def test_rm_starts_from_an_sft_training_save_path(runs):
    runs, tmp = runs
    summary, save = runs["rm_from_sft_save_path"]
    assert len(summary["history"]) == 2 and all(math.isfinite(l) for _, l in summary["history"])
    sft = tmp / "falls" / (tmp / "falls" / "latest").read_text()
    rm = save / "global_step2"
    n = json.loads((save / "pipetune.json").read_text())["num_pipe_layers"]
    for i in range(n - 1):
        a = torch.load(sft / f"layer_{i:02d}-model_states.pt", weights_only=True)
        b = torch.load(rm / f"layer_{i:02d}-model_states.pt", weights_only=True)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), i
    head = torch.load(rm / f"layer_{n - 1:02d}-model_states.pt", weights_only=True)
    assert list(head) == ["score.weight"] and head["score.weight"].shape == (1, 64)


def test_compiled_blocks_take_the_same_steps(runs):
    runs, _ = runs
    compiled, eager = losses(runs["compiled"][0]), losses(runs["two_stage_adamw"][0])
    assert len(compiled) == 3
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=0, atol=1e-6)


def test_keep_last_prunes_by_save_order_and_keeps_the_resumed_checkpoint(runs):
    runs, tmp = runs
    first, older, left = (runs[name][0] for name in ("prune", "prune_resume_older", "prune_resume_left"))
    assert first["tags"] == ["global_step4", "global_step5"]  # 5 saves, keep_last 2
    # Resumed from 4, saved 6 and 7: the stale 5 (not this lineage) is gone, 4 (resumed from) stays.
    assert older["tags"] == ["global_step4", "global_step6", "global_step7"]
    assert [s for s, _ in older["history"]] == list(range(1, 8))
    assert older["history"][:4] == first["history"][:4]
    # Resumed from what was left (latest = 7): 8, 9 saved; 4 and 6 pruned now; 7 (resumed from) stays.
    assert left["tags"] == ["global_step7", "global_step8", "global_step9"]
    assert left["history"][:7] == older["history"] and [s for s, _ in left["history"]] == list(range(1, 10))
    assert (tmp / "prune" / "latest").read_text() == "global_step9"
    state = json.loads((tmp / "prune" / "global_step9" / "trainer_state.json").read_text())
    assert state["saved_tags"] == [f"global_step{s}" for s in (1, 2, 3, 4, 6, 7, 8, 9)]


def test_killed_during_save_resumes_exactly(runs, model_dirs):
    runs, tmp = runs
    _, pp = model_dirs
    reference, reference_save = runs["resume_reference"]
    config = make_config(tmp, "killed", pp, train_steps=6, save_interval=2,
                         scheduler={"type": "WarmupDecayLR", "params": {"warmup_max_lr": 1e-3, "warmup_num_steps": 2}})
    # SIGKILL after DeepSpeed wrote global_step4 but before `latest` moved.
    proc = launch("train_ds.py", "--config", str(config), env_extra={"PIPETUNE_TEST_KILL_DURING_SAVE_AT_STEP": "4"}, check=False)
    assert proc.returncode != 0
    save = tmp / "killed"
    assert (save / "latest").read_text() == "global_step2"
    assert (save / "global_step4" / "layer_00-model_states.pt").is_file()  # the partial save is there, unused
    cfg = json.loads(config.read_text())
    cfg["resume"] = "auto"
    config.write_text(json.dumps(cfg))
    launch("train_ds.py", "--config", str(config))
    assert (save / "latest").read_text() == "global_step6"
    state = json.loads((save / "global_step6" / "trainer_state.json").read_text())
    assert [s for s, _ in state["history"]] == [1, 2, 3, 4, 5, 6]
    torch.testing.assert_close(torch.tensor([l for _, l in state["history"]]), torch.tensor(losses(reference)), rtol=0, atol=1e-6)
    for f in sorted((reference_save / "global_step6").glob("layer_*-model_states.pt")):
        a = torch.load(f, weights_only=True)
        b = torch.load(save / "global_step6" / f.name, weights_only=True)
        worst = max((a[k] - b[k]).abs().max().item() for k in a)
        assert worst <= 1e-6, (f.name, worst)


def test_non_finite_loss_stops_without_saving_bad_weights(runs, model_dirs):
    """A diverging run (SGD with lr 1e30, no clipping) stops with a clear message at the first
    non-finite loss or weights, keeps the last good checkpoint, and writes none after it."""
    _, tmp = runs
    _, pp = model_dirs
    config = make_config(tmp, "diverges", pp, train_steps=4, save_interval=1, gradient_clipping=0.0,
                         optimizer={"type": "SGD", "params": {"lr": 1e30}})
    proc = launch("train_ds.py", "--config", str(config), check=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out
    assert "error: step " in out and ("hold NaN/inf; not saving" in out or "the training loss is nan" in out)
    save = tmp / "diverges"
    saved = sorted(p.name for p in save.glob("global_step*"))
    for tag in saved:  # every checkpoint written has finite weights
        for f in (save / tag).glob("layer_*-model_states.pt"):
            assert all(torch.isfinite(t).all() for t in torch.load(f, weights_only=True).values()), (tag, f.name)
    if saved:
        assert (save / "latest").read_text() == saved[-1]
