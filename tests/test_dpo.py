"""DPO stage (trainer/recipes/dpo.py, trainer/rl/dpo.py, trainer/rl/reference_logps.py).

Pure functions: each loss type on fixed log-probs equals its formula computed by hand; gradients reach
the policy only; the loss_fn's normalisation over micro-batches; the reference cache key; config
validation. Real 2-stage runs (CPU, gloo), three launches in all:
  A (tests/multirank/dpo_runs.py, many configs): step 1 with policy == reference has loss ln 2 and
    zero margins; sigmoid, cDPO + RPO, IPO, SimPO and a separate ref_path take the same 3 steps as a
    single-process HF implementation written here; toy preferences are learnt (eval accuracy), the
    export loads with AutoModelForCausalLM and scores the eval pairs as the pipeline did; a resume
    whose reference cache is gone recomputes it from ref_path (a frozen engine), not the policy.
  B, C: a run SIGKILLed during a save resumes, reuses the cached reference log-probs and ends with
    the weights of an uninterrupted run.
"""
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO
from conftest import launch_ranks as launch

from data.batching import collate_dpo
from trainer.config import ConfigError
from trainer.recipes import load_config
from trainer.recipes import validate_config as validate
from trainer.rl.dpo import DPOLoss, DPOOptions, metrics_from_stats, pair_stats, pair_terms, sequence_logps
from trainer.rl.reference_logps import WithReference, checkpoint_fingerprint

PREFS = str(REPO / "data" / "samples" / "preferences.jsonl")
SEQ = 64
EVAL_FRACTION = 0.2
SEED = 7
ADAMW = {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}}
# Weights after 3 AdamW steps, pipeline vs the HF loop below. Measured with full logits
# (chunked_loss false): 2 stages 5e-8 (sigmoid) .. 3e-7 (SimPO). With the default chunked head (the
# head's matmul over chunks of positions: its logits round differently from HF's one matmul, ~1e-7):
# 2 stages 2e-6 .. 5e-6; 1 stage x 2 data-parallel ranks 3e-6 (gradients summed over ranks in another
# order). AdamW's normalisation amplifies such rounding on near-zero gradients; training moves the
# weights by > 1e-3 (asserted); SFT's parity test allows 2e-5.
WEIGHT_TOL = {"2 stages": 1e-5, "full logits": 2e-6, "data-parallel": 2e-5}


# ------------------------------------------------------------------------------------ pure math

PI_C, PI_R, REF_C, REF_R, N_C, N_R = -10.0, -12.0, -11.0, -11.0, 5, 4


def terms_for(**opts):
    t = lambda x: torch.tensor([x], dtype=torch.float32)
    return pair_terms(DPOOptions(**opts), t(PI_C), t(PI_R), t(REF_C), t(REF_R), torch.tensor([N_C]), torch.tensor([N_R]))


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_sigmoid_and_cdpo_losses_by_hand():
    # h = (-10 + 11) - (-12 + 11) = 2; beta h = 0.2; -logsigmoid(x) = log(1 + e^-x)
    out = terms_for(beta=0.1)
    assert out.losses.item() == pytest.approx(softplus(-0.2), abs=1e-7)
    assert (out.chosen_rewards.item(), out.rejected_rewards.item()) == pytest.approx((0.1, -0.1), abs=1e-7)
    assert (out.chosen_logps.item(), out.rejected_logps.item()) == (PI_C, PI_R)
    cdpo = terms_for(beta=0.1, label_smoothing=0.1)
    assert cdpo.losses.item() == pytest.approx(0.9 * softplus(-0.2) + 0.1 * softplus(0.2), abs=1e-7)


def test_ipo_loss_by_hand():
    # per-token averages: chosen -10/5 = -2 vs ref -11/5 = -2.2; rejected -12/4 = -3 vs -11/4 = -2.75
    # h = 0.2 - (-0.25) = 0.45; 1 / (2 beta) = 5; loss = (0.45 - 5)^2 = 20.7025
    out = terms_for(loss_type="ipo", beta=0.1)
    assert out.losses.item() == pytest.approx(20.7025, abs=1e-5)
    assert (out.chosen_rewards.item(), out.rejected_rewards.item()) == pytest.approx((0.02, -0.025), abs=1e-7)
    assert (out.chosen_logps.item(), out.rejected_logps.item()) == (-2.0, -3.0)


def test_simpo_loss_by_hand_ignores_the_reference():
    # z = beta (-2 - (-3)) - gamma = 2 * 1 - 0.5 = 1.5
    out = terms_for(loss_type="simpo", beta=2.0, simpo_gamma=0.5)
    assert out.losses.item() == pytest.approx(softplus(-1.5), abs=1e-7)
    assert (out.chosen_rewards.item(), out.rejected_rewards.item()) == pytest.approx((-4.0, -6.0), abs=1e-6)
    smoothed = terms_for(loss_type="simpo", beta=2.0, simpo_gamma=0.5, label_smoothing=0.2)
    assert smoothed.losses.item() == pytest.approx(0.8 * softplus(-1.5) + 0.2 * softplus(1.5), abs=1e-7)
    other_ref = pair_terms(DPOOptions(loss_type="simpo", beta=2.0), torch.tensor([PI_C]), torch.tensor([PI_R]),
                           torch.tensor([123.0]), torch.tensor([-7.0]), torch.tensor([N_C]), torch.tensor([N_R]))
    assert other_ref.losses.item() == out.losses.item()


def test_policy_equal_to_reference_gives_ln2_and_zero_margins():
    logps = torch.tensor([-30.5, -8.25, -17.0])
    out = pair_terms(DPOOptions(), logps, logps - 3, logps.clone(), logps - 3, torch.tensor([9, 2, 5]), torch.tensor([4, 4, 4]))
    assert torch.equal(out.losses, torch.full((3,), math.log(2.0)))
    stats = metrics_from_stats(pair_stats(out, -logps, torch.tensor([9, 2, 5]), torch.ones(3)), 0.0)
    assert stats["rewards/margins"] == 0 and stats["rewards/accuracies"] == 0 and stats["loss"] == pytest.approx(math.log(2))


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "simpo"])
def test_gradients_reach_the_policy_only(loss_type):
    pi = torch.tensor([-10.0, -12.0, -6.0, -9.0], requires_grad=True)
    ref = torch.tensor([-11.0, -11.0, -7.0, -7.0], requires_grad=True)
    n = torch.tensor([5, 4, 3, 6])
    out = pair_terms(DPOOptions(loss_type=loss_type, beta=0.5), pi[:2], pi[2:], ref[:2], ref[2:], n[:2], n[2:])
    out.losses.sum().backward()
    assert ref.grad is None
    assert pi.grad is not None and bool((pi.grad[:2] < 0).all()) and bool((pi.grad[2:] > 0).all())  # chosen up, rejected down
    assert not any(x.requires_grad for x in out[1:])


def test_sequence_logps_sums_the_answer_tokens():
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 11)
    labels = torch.full((3, 6), -100)
    labels[0, 3:] = torch.tensor([4, 5, 6])
    labels[1, 1:] = torch.tensor([1, 2, 3, 4, 5])
    labels[2, 5] = 10
    sums, counts = sequence_logps(logits, labels)
    logp = torch.log_softmax(logits, -1)
    expected = [sum(logp[r, t - 1, labels[r, t]].item() for t in range(1, 6) if labels[r, t] != -100) for r in range(3)]
    torch.testing.assert_close(sums, torch.tensor(expected), rtol=0, atol=1e-5)
    assert counts.tolist() == [3, 5, 1]


def test_loss_fn_normalises_over_the_global_batch():
    """Two micro-batches (grad_accum 2) of 2 pairs with different chosen-token counts: their mean
    (DeepSpeed's accumulation) = mean preference loss over the 4 pairs + sft_coef * NLL per chosen token."""
    torch.manual_seed(1)
    opts = DPOOptions(beta=0.3, sft_coef=0.7)
    vocab, T = 13, 8
    micro, chosen_nll, pref = [], 0.0, []
    for n_answer in ((2, 5), (7, 1)):
        logits = torch.randn(4, T, vocab)
        labels = torch.full((4, T), -100)
        for row, n in enumerate(n_answer * 2):
            labels[row, T - n:] = torch.randint(0, vocab, (n,))
        ref = torch.randn(4) * 3 - 10
        micro.append((logits, labels, ref))
        (pc, pr), (nc, nr) = [x.chunk(2) for x in sequence_logps(logits, labels)]
        chosen_nll += -pc.sum().item()
        pref += pair_terms(opts, pc, pr, *ref.chunk(2), nc, nr).losses.tolist()
    n_chosen = 2 + 5 + 7 + 1
    loss_fn = DPOLoss(opts)
    scale = torch.tensor(2 * 1 / n_chosen, dtype=torch.float64)  # grad_accum * D / N_chosen_global
    losses = [loss_fn(logits, (labels, ref, scale)).item() for logits, labels, ref in micro]
    assert sum(losses) / 2 == pytest.approx(sum(pref) / 4 + 0.7 * chosen_nll / n_chosen, rel=1e-6)
    metrics = metrics_from_stats(loss_fn.take_step_stats(), opts.sft_coef)
    assert metrics["loss"] == pytest.approx(sum(losses) / 2, rel=1e-6)
    assert metrics["sft_loss"] == pytest.approx(chosen_nll / n_chosen, rel=1e-6)
    assert loss_fn.take_step_stats().abs().sum() == 0  # taken: the next step starts from zero


def test_collate_dpo_keeps_each_pair_with_its_reference():
    items = [((torch.full((2, 3), i), torch.ones(2, 3, dtype=torch.long)), torch.full((2, 3), i), torch.tensor(0.0),
              torch.tensor([-i - 0.5, -i - 0.25], dtype=torch.float64)) for i in range(3)]
    (ids, _), labels, ref = collate_dpo(items)
    assert ids[:, 0].tolist() == [0, 1, 2, 0, 1, 2]
    assert ref.tolist() == [-0.5, -1.5, -2.5, -0.25, -1.25, -2.25]  # chosen (row i) then rejected (row 3 + i)
    pairs = WithReference([it[:3] for it in items], torch.stack([it[3] for it in items]))
    assert torch.equal(pairs[2][3], items[2][3])


def test_reference_fingerprint_follows_the_layer_files(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for i in range(3):
        (ckpt / f"layer_{i:02d}-model_states.pt").write_bytes(os.urandom(3 << 20))
    (ckpt / "config.json").write_text("{}")
    first = checkpoint_fingerprint(ckpt)
    assert [f[0] for f in first] == [f"layer_{i:02d}-model_states.pt" for i in range(3)]
    assert checkpoint_fingerprint(ckpt) == first
    copy = tmp_path / "copy"
    shutil.copytree(ckpt, copy)  # copy2: same bytes, same times -> same identity
    assert checkpoint_fingerprint(copy) == first
    layer = ckpt / "layer_01-model_states.pt"
    data = bytearray(layer.read_bytes())
    data[-10] ^= 0xFF
    layer.write_bytes(bytes(data))
    os.utime(layer, ns=(os.stat(copy / layer.name).st_atime_ns, os.stat(copy / layer.name).st_mtime_ns))
    changed = checkpoint_fingerprint(ckpt)
    assert changed[1] != first[1] and changed[0] == first[0]  # same size and time, the tail hash differs
    # A training save_path resolves through `latest`.
    save = tmp_path / "save"
    shutil.copytree(copy, save / "global_step3")
    (save / "latest").write_text("global_step3")
    assert checkpoint_fingerprint(save) == first


# ------------------------------------------------------------------------------------ config

def dpo_config(**changes) -> dict:
    raw = {"stage": "dpo", "model_path": "m", "save_path": "s", "data_path": "d", "train_steps": 3,
           "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [2, 1]}, "parts": "auto"},
           "train_batch_size": 4, "train_micro_batch_size_per_gpu": 2}
    raw.update(changes)
    return raw


def config_problems(raw) -> list[str]:
    try:
        validate(raw, world_size=2)
    except ConfigError as e:
        return e.problems
    return []


def test_dpo_config_defaults_and_validation():
    c = validate(dpo_config(), world_size=2)
    o = c.options
    assert (c.stage, o.beta, o.loss_type, o.label_smoothing, o.simpo_gamma, o.sft_coef, o.ref_path) == \
        ("dpo", 0.1, "sigmoid", 0.0, 0.5, 0.0, None)
    assert c.options == DPOOptions()
    c = validate(dpo_config(loss_type="simpo", beta=2, simpo_gamma=1, label_smoothing=0.1, sft_coef=1, ref_path="r"), world_size=2)
    assert (c.options.loss_type, c.options.beta, c.options.ref_path) == ("simpo", 2, "r") and not c.options.uses_reference
    assert config_problems(dpo_config(loss_type="hinge", beta=0, label_smoothing=0.5, sft_coef=-1, from_scratch=True)) == [
        "loss_type must be one of ['sigmoid', 'ipo', 'simpo'], got 'hinge'",
        "beta must be positive, got 0",
        "label_smoothing must be in [0, 0.5) (the assumed share of flipped preference labels), got 0.5",
        "sft_coef must not be negative, got -1",
        'stage "dpo" starts from trained weights (model_path, usually an SFT run); from_scratch is not supported']
    assert config_problems(dpo_config(loss_type="ipo", label_smoothing=0.1)) == [
        'label_smoothing applies to loss_type "sigmoid" (cDPO) and "simpo", not "ipo"; remove it']
    assert config_problems(dpo_config(beta=float("nan"))) == ["beta must be a finite number, got nan"]
    assert config_problems(dpo_config(beta="big")) == ['beta must be a number, got "big"']
    assert config_problems(dpo_config(stage="sft", beta=0.2, ref_path="r")) == [
        'beta, ref_path: DPO keys, but stage is \'sft\' (set "stage": "dpo" or remove them)']


def test_shipped_dpo_configs_validate():
    real = load_config(str(REPO / "configs" / "ds_config_dpo.json"), world_size=8)
    assert real.stage == "dpo" and real.precision == "bf16" and real.warnings == ()
    assert real.ds_config["zero_optimization"]["stage"] == 1 and real.ds_config["data_types"] == {"grad_accum_dtype": "fp32"}
    tiny = load_config(str(REPO / "configs" / "dpo_tiny.json"), world_size=2)
    assert (tiny.stage, tiny.model_topo.pipe, tiny.data_path) == ("dpo", 2, "data/samples/preferences.jsonl")


# ------------------------------------------------------------------------------------ 2-stage runs





def make_config(tmp: Path, name: str, pp_dir: Path, **over) -> Path:
    cfg = {
        "stage": "dpo", "model_path": str(pp_dir), "save_path": str(tmp / name), "data_path": PREFS,
        "eval_fraction": EVAL_FRACTION, "max_seq_len": SEQ, "train_steps": 3, "seed": SEED, "resume": "never", "keep_last": 3,
        "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [2, 1]}, "parts": [3, 4]},
        "train_batch_size": 4, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
        "steps_per_print": 10**6, "optimizer": ADAMW,
    }
    cfg.update(over)
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(cfg, indent=1))
    return path


def exported_weights(save_path: Path, out: Path) -> dict:
    from safetensors.torch import load_file

    from convert.pp_to_hg import pp_to_hg

    tensors = {}
    for f in pp_to_hg(save_path, out, progress=False).glob("*.safetensors"):
        tensors.update(load_file(f))
    return tensors


def hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")


def hf_logps(model, ids, mask, labels):
    """Summed log-probs of each row's answer tokens, written independently of trainer.rl.dpo."""
    logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
    target = labels[:, 1:]
    taken = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (target != -100)
    return taken.sum(-1), (target != -100).sum(-1)


def hf_dpo_reference(policy_dir, ref_dir, tok_dir, run: dict, steps: int = 3):
    """Single-process DPO on the HF model: the pipeline's batches (same sampler and seed), fp32,
    micro-batches accumulated (each micro-batch's pair mean / grad_accum, SFT term / N chosen tokens
    of the step), AdamW with the same decay groups, gradient clipping 1.0 (DeepSpeed's default)."""
    from transformers import AutoTokenizer

    from data.batching import collate_pairs
    from data.dataset import build_dataset
    from trainer.batches import GlobalBatches
    from trainer.config import DEFAULT_NO_DECAY

    beta, kind = run.get("beta", 0.1), run.get("loss_type", "sigmoid")
    eps, gamma, sft_coef = run.get("label_smoothing", 0.0), run.get("simpo_gamma", 0.5), run.get("sft_coef", 0.0)
    data = build_dataset(PREFS, AutoTokenizer.from_pretrained(tok_dir), SEQ, kind="pairwise", eval_fraction=EVAL_FRACTION, seed=SEED)
    batches = GlobalBatches(data.train, 2, 2, 0, 1, SEED, collate=collate_pairs)
    policy, reference = hf_model(policy_dir), hf_model(ref_dir).eval()
    decay = [p for n, p in policy.named_parameters() if not n.endswith(DEFAULT_NO_DECAY)]
    no_decay = [p for n, p in policy.named_parameters() if n.endswith(DEFAULT_NO_DECAY)]
    opt = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], **ADAMW["params"])
    losses = []
    for _ in range(steps):
        micro_batches, _, _ = batches.next_step()
        n_chosen = sum(int((labels[: len(labels) // 2, 1:] != -100).sum()) for _, labels, _ in micro_batches)
        total = 0.0
        for (ids, mask), labels, _ in micro_batches:
            b = len(ids) // 2
            with torch.no_grad():
                ref, _ = hf_logps(reference, ids, mask, labels)
            pol, n = hf_logps(policy, ids, mask, labels)
            if kind == "sigmoid":
                h = beta * ((pol[:b] - ref[:b]) - (pol[b:] - ref[b:]))
                pref = -(1 - eps) * F.logsigmoid(h) - eps * F.logsigmoid(-h)
            elif kind == "ipo":
                avg, ref_avg = pol / n, ref / n
                pref = ((avg[:b] - ref_avg[:b]) - (avg[b:] - ref_avg[b:]) - 1 / (2 * beta)) ** 2
            else:  # simpo
                z = beta * (pol[:b] / n[:b] - pol[b:] / n[b:]) - gamma
                pref = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
            loss = pref.mean() / 2 + sft_coef * -pol[:b].sum() / n_chosen
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(total)
    return {k: v.detach() for k, v in policy.state_dict().items()}, losses


PARITY = {
    "sigmoid": {},
    "cdpo_rpo": {"label_smoothing": 0.1, "sft_coef": 0.5},
    "ipo": {"loss_type": "ipo", "beta": 0.5},
    "simpo": {"loss_type": "simpo", "beta": 2.0, "simpo_gamma": 0.5},
}
WARMUP = {"type": "WarmupLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 1e-3, "warmup_num_steps": 2}}


@pytest.fixture(scope="module")
def model_dirs(tiny_hf, tmp_path_factory):
    from convert.hg_to_pp import hg_to_pp
    from models.random_init import save_random_model

    tmp = tmp_path_factory.mktemp("dpo-models")
    hf_dir = tiny_hf("llama", False)
    other_hf = save_random_model(REPO / "configs" / "tiny-llama", tmp / "other-hf", seed=5, tie_word_embeddings=False)
    dropout_hf = save_random_model(REPO / "configs" / "tiny-llama", tmp / "dropout-hf", seed=0, tie_word_embeddings=False,
                                   overrides={"attention_dropout": 0.3})
    return (hf_dir, hg_to_pp(hf_dir, tmp / "pp", progress=False), other_hf, hg_to_pp(other_hf, tmp / "other-pp", progress=False),
            hg_to_pp(dropout_hf, tmp / "dropout-pp", progress=False))


@pytest.fixture(scope="module")
def runs(model_dirs, tmp_path_factory):
    """Launch A: one launch, every config in turn; {name: (summary, save_path)}, the launch's output, tmp."""
    _, pp, _, other_pp, dropout_pp = model_dirs
    tmp = tmp_path_factory.mktemp("dpo-runs")
    names = {name: make_config(tmp, name, pp, **over) for name, over in PARITY.items()}
    # A model with attention dropout: disable_dropout (the default) makes the first step the reference's forward.
    names["dropout_off"] = make_config(tmp, "dropout_off", dropout_pp, train_steps=1)
    names["dropout_on"] = make_config(tmp, "dropout_on", dropout_pp, train_steps=1, disable_dropout=False)
    names["other_ref"] = make_config(tmp, "other_ref", pp, ref_path=str(other_pp))
    names["full_logits_sigmoid"] = make_config(tmp, "full_logits_sigmoid", pp, **PARITY["sigmoid"], chunked_loss=False)
    # 1 stage x 2 data-parallel ranks, 1 pair per micro-batch: the same 4 pairs per step.
    names["dp2_cdpo_rpo"] = make_config(tmp, "dp2_cdpo_rpo", pp, **PARITY["cdpo_rpo"], train_micro_batch_size_per_gpu=1,
                                        model_topo={"process_topology": {"axes": ["pipe", "data"], "dims": [1, 2]}, "parts": [7]})
    # bf16 (the shipped config's ZeRO-1 + fp32 accumulation): the reference pass on the policy, and on a
    # frozen engine of a copy of the same weights (new file times: another reference to the cache key).
    fresh_copy = shutil.copytree(pp, tmp / "pp-copy", copy_function=shutil.copy)
    bf16 = dict(train_steps=2, bf16={"enabled": True}, zero_optimization={"stage": 1}, data_types={"grad_accum_dtype": "fp32"})
    names["bf16"] = make_config(tmp, "bf16", pp, **bf16)
    names["bf16_copy_ref"] = make_config(tmp, "bf16_copy_ref", pp, **bf16, ref_path=str(fresh_copy))
    names["toy"] = make_config(tmp, "toy", pp, train_steps=None, n_epochs=2, eval_interval=8, train_batch_size=8,
                               train_micro_batch_size_per_gpu=4, optimizer={**ADAMW, "params": {**ADAMW["params"], "lr": 2e-3}},
                               csv_monitor={"enabled": True, "output_path": str(tmp / "toy-logs"), "job_name": "toy"})
    # Resume with the reference cache gone (another cache_dir): recomputed from ref_path, not the policy.
    resume = dict(train_steps=6, save_interval=2, scheduler=WARMUP)
    names["resume_reference"] = make_config(tmp, "resume_reference", pp, **resume)
    names["first_part"] = make_config(tmp, "first_part", pp, **{**resume, "train_steps": 4})
    names["second_part"] = make_config(tmp, "second_part", pp, **resume, save_path=str(tmp / "first_part"), resume="auto",
                                       cache_dir=str(tmp / "other-cache"))
    out = tmp / "results.jsonl"
    proc = launch(str(REPO / "tests" / "multirank" / "dpo_runs.py"), *[a for p in names.values() for a in ("--config", str(p))],
                  "--out", str(out))
    results = [json.loads(line) for line in out.read_text().splitlines()]
    return {name: (r, tmp / name) for name, r in zip(names, results)}, proc.stdout + proc.stderr, tmp


def losses(summary) -> list[float]:
    return [loss for _, loss in summary["history"]]


@pytest.mark.multirank
def test_first_step_with_policy_as_reference_is_ln2_with_zero_margins(runs):
    runs, _, _ = runs
    summary, _ = runs["sigmoid"]
    first = summary["train_metrics"][0][1]
    assert abs(summary["history"][0][1] - math.log(2)) < 1e-6, summary["history"][0]
    assert first["rewards/margins"] == pytest.approx(0, abs=1e-6) and first["rewards/chosen"] == pytest.approx(0, abs=1e-6)
    assert first["rewards/accuracies"] == 0  # ties: no pair is preferred yet
    assert first["logps/chosen"] < 0 and first["logps/rejected"] < 0


@pytest.mark.multirank
def test_dropout_is_off_while_training_by_default(runs):
    """The reference's log-probs come from an eval-mode forward: with the model's attention dropout left on
    (disable_dropout false), the first step's margins are no longer 0."""
    runs, _, _ = runs
    off, on = (runs[name][0]["train_metrics"][0][1] for name in ("dropout_off", "dropout_on"))
    assert off["rewards/margins"] == pytest.approx(0, abs=1e-6) and off["rewards/chosen"] == pytest.approx(0, abs=1e-6)
    assert abs(on["rewards/chosen"]) > 1e-4


@pytest.mark.multirank
@pytest.mark.parametrize("name", [*PARITY, "other_ref", "dp2_cdpo_rpo", "full_logits_sigmoid"])
def test_three_steps_equal_a_single_process_hf_implementation(runs, model_dirs, tmp_path, name):
    runs, _, _ = runs
    hf_dir, pp_dir, other_hf, _, _ = model_dirs
    summary, save = runs[name]
    options = PARITY.get(name.replace("dp2_", "").replace("full_logits_", ""), {})
    expected, expected_losses = hf_dpo_reference(hf_dir, other_hf if name == "other_ref" else hf_dir, pp_dir, options)
    torch.testing.assert_close(torch.tensor(losses(summary)), torch.tensor(expected_losses), rtol=0, atol=2e-5)
    got = exported_weights(save, tmp_path / "hf")
    assert got.keys() == expected.keys()
    worst = max((got[k] - expected[k]).abs().max().item() for k in got)
    print(f"{name}: max weight difference {worst:.2e}")
    tol = WEIGHT_TOL["data-parallel" if name.startswith("dp2") else "full logits" if name.startswith("full_logits") else "2 stages"]
    assert worst <= tol, f"max weight difference {worst}"
    moved = max((got[k] - hf_model(hf_dir).state_dict()[k]).abs().max().item() for k in got)
    assert moved > 1e-3  # training moved the weights far beyond the tolerance
    if name == "other_ref":
        assert abs(losses(summary)[0] - math.log(2)) > 1e-2  # a different reference: not a tie at step 1


@pytest.mark.multirank
def test_bf16_reference_pass_on_the_policy_or_a_frozen_engine_agree(runs):
    runs, output, _ = runs
    policy, _ = runs["bf16"]
    frozen, save = runs["bf16_copy_ref"]
    assert f"computed on a frozen copy of {save.parent / 'pp-copy'}; cached in {save}" in output
    assert f"computed on the policy's starting weights; cached in {save.parent / 'bf16'}" in output
    print("bf16 losses", losses(policy), losses(frozen))
    assert abs(losses(policy)[0] - math.log(2)) < 1e-3  # bf16 forward of different batch compositions
    torch.testing.assert_close(torch.tensor(losses(frozen)), torch.tensor(losses(policy)), rtol=0, atol=1e-6)
    layer = torch.load(save / "global_step2" / "layer_01-model_states.pt", weights_only=True)
    assert {t.dtype for t in layer.values()} == {torch.bfloat16}


@pytest.mark.multirank
def test_toy_preferences_are_learnt_with_trl_metrics(runs):
    runs, _, tmp = runs
    summary, save = runs["toy"]
    evals = summary["evals"]
    assert len(evals) >= 3
    final = evals[-1][1]
    assert final["rewards/accuracies"] >= 0.9, evals
    assert final["rewards/margins"] > 0 and final["rewards/chosen"] > final["rewards/rejected"]
    assert evals[-1][1]["loss"] < evals[0][1]["loss"] < math.log(2)
    trained = losses(summary)
    assert sum(trained[-4:]) / 4 < 0.5 * trained[0]
    logs = tmp / "toy-logs" / "toy"
    for name in ("Train_rewards_margins", "Train_rewards_accuracies", "Train_logps_chosen", "Eval_rewards_accuracies",
                 "Eval_rewards_chosen", "Eval_rewards_rejected", "Eval_logps_rejected", "Eval_loss", "Train_loss"):
        assert (logs / f"{name}.csv").is_file(), name
    assert len((logs / "Train_rewards_margins.csv").read_text().splitlines()) == len(trained) + 1
    assert (save / "loss_curve.png").is_file()


@pytest.mark.multirank
def test_export_loads_in_hf_and_scores_the_eval_pairs_as_the_pipeline_did(runs, model_dirs, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from convert.pp_to_hg import pp_to_hg
    from data.batching import collate_pairs
    from data.dataset import build_dataset

    runs, _, _ = runs
    hf_dir, _, _, _, _ = model_dirs
    summary, save = runs["toy"]
    exported = pp_to_hg(save, tmp_path / "hf", progress=False)
    assert json.loads((exported / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    policy = AutoModelForCausalLM.from_pretrained(exported).eval()
    reference = hf_model(hf_dir).eval()
    data = build_dataset(PREFS, AutoTokenizer.from_pretrained(exported), SEQ, kind="pairwise", eval_fraction=EVAL_FRACTION, seed=SEED)
    (ids, mask), labels, _ = collate_pairs([data.eval[i] for i in range(len(data.eval))])
    b = len(data.eval)
    with torch.no_grad():
        pol, _ = hf_logps(policy, ids, mask, labels)
        ref, _ = hf_logps(reference, ids, mask, labels)
    chosen, rejected = 0.1 * (pol[:b] - ref[:b]), 0.1 * (pol[b:] - ref[b:])
    final = summary["evals"][-1][1]
    assert pol[:b].mean().item() == pytest.approx(final["logps/chosen"], abs=1e-3)
    assert (chosen - rejected).mean().item() == pytest.approx(final["rewards/margins"], abs=1e-4)
    assert (chosen > rejected).double().mean().item() == final["rewards/accuracies"]


@pytest.mark.multirank
def test_resume_without_the_cache_recomputes_the_reference_from_ref_path(runs, model_dirs):
    runs, output, tmp = runs
    reference, reference_save = runs["resume_reference"]
    resumed, _ = runs["second_part"]
    # Scored with the step-4 policy instead of ref_path, the reference log-probs (and so steps 5 and 6)
    # would differ from the uninterrupted run's.
    _, pp, _, _, _ = model_dirs
    assert f"computed on a frozen copy of {pp}; cached in {tmp / 'other-cache'}" in output
    torch.testing.assert_close(torch.tensor(losses(resumed)), torch.tensor(losses(reference)), rtol=0, atol=1e-6)
    assert_same_weights(reference_save / "global_step6", tmp / "first_part" / "global_step6")


def assert_same_weights(a_dir: Path, b_dir: Path, tol: float = 1e-6) -> None:
    files = sorted(a_dir.glob("layer_*-model_states.pt"))
    assert files
    for f in files:
        a, b = torch.load(f, weights_only=True), torch.load(b_dir / f.name, weights_only=True)
        worst = max((a[k] - b[k]).abs().max().item() for k in a)
        assert worst <= tol, (f.name, worst)


@pytest.mark.multirank
def test_killed_during_save_resumes_exactly_reusing_the_reference_cache(runs, model_dirs):
    runs, _, tmp = runs
    _, pp, _, _, _ = model_dirs
    reference, reference_save = runs["resume_reference"]
    config = make_config(tmp, "killed", pp, train_steps=6, save_interval=2, scheduler=WARMUP, resume="auto")
    proc = launch("train_ds.py", "--config", str(config), check=False,
                  env_extra={"PIPETUNE_TEST_KILL_DURING_SAVE_AT_STEP": "4"})
    assert proc.returncode != 0
    save = tmp / "killed"
    assert (save / "latest").read_text() == "global_step2"
    (cache,) = (save / ".data_cache").glob("ref_logps-*.pt")
    stamp = cache.stat().st_mtime_ns
    proc = launch("train_ds.py", "--config", str(config))
    out = proc.stdout + proc.stderr
    assert "resumed from" in out and f"reference log-probs: reused {cache}" in out and "computed on" not in out
    assert cache.stat().st_mtime_ns == stamp
    state = json.loads((save / "global_step6" / "trainer_state.json").read_text())
    assert [s for s, _ in state["history"]] == [1, 2, 3, 4, 5, 6]
    torch.testing.assert_close(torch.tensor([l for _, l in state["history"]]), torch.tensor(losses(reference)), rtol=0, atol=1e-6)
    assert_same_weights(reference_save / "global_step6", save / "global_step6")


def test_reference_cache_key_follows_the_code_the_versions_and_the_device(tmp_path):
    """A change in models/ (or the log-prob code), another torch / transformers or another device type
    must not reuse cached reference log-probs."""
    import shutil

    from trainer.rl.reference_logps import log_prob_code_version, runtime_identity

    for part in ("models", "trainer/rl"):
        shutil.copytree(REPO / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "trainer" / "losses.py", tmp_path / "trainer" / "losses.py")
    before = log_prob_code_version(tmp_path)
    assert before == log_prob_code_version(REPO)
    llama = tmp_path / "models" / "llama.py"
    llama.write_text(llama.read_text() + "\n# a change\n")
    assert log_prob_code_version(tmp_path) != before
    runtime = runtime_identity()
    assert runtime["code"] == before and runtime["device"] == "cpu"
    assert runtime["torch"] == torch.__version__ and runtime["transformers"]
