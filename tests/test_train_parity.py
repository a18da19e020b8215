"""Training features against independent single-process references, over several steps, so that
each test fails when its feature is silently off (step 1's loss is computed before any update and
proves nothing about an optimizer):

  Lion (lion-pytorch; DeepSpeed's Lion with ZeRO-1 + CPU offload)  vs a Lion update written here
  bf16 (ZeRO 0: bf16 accumulation; ZeRO-1 + fp32 accumulation)      vs an HF loop with fp32 masters
  activation checkpointing     blocks run twice per micro-batch; gradients equal the plain run
  ZeRO-1 + CPU offload         DeepSpeedCPUAdam, state on the CPU; equals ZeRO-1 without offload and HF
  BLOOM, tied-embedding LLaMA  tied-gradient sync and the whole-pipeline clip norm (tied weight once)
  pack: true                   equals HF on each packed record computed separately
  RM eval                      accuracy and mean scores equal the exported *ForSequenceClassification
  SFT eval loss                equals HF's mean over all eval target tokens (2 stages; 1 stage x 2 DP)

Every run is in one launch (tests/multirank/parity_runs.py); probes inside the ranks report what the
engine holds (fp32 master weights, the gradients handed to the optimizer, gradient norms, block
forward counts, optimizer state).
Where a tolerance is stated, the test also computes the reference with the feature off and checks
that it lies far outside that tolerance, so the tolerance is shown to be tight enough.
"""
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO
from test_train_multirank import ADAMW, DATA, SEQ, SGD, exported_weights, launch, make_config

from convert.hg_to_pp import hg_to_pp
from convert.pp_to_hg import pp_to_hg


def multirank(test):
    """Tests that read the launch's runs."""
    return pytest.mark.multirank(pytest.mark.slow(test))


LION = {"lr": 2e-4, "betas": [0.9, 0.99], "weight_decay": 0.1}
OFFLOAD = {"stage": 1, "offload_optimizer": {"device": "cpu"}}
PAIRS = str(REPO / "data" / "samples" / "pairwise.json")
TOPO_DP2 = {"process_topology": {"axes": ["pipe", "data"], "dims": [1, 2]}, "parts": [7]}
BF16 = {"bf16": {"enabled": True}}
PRECISION_KEYS = ("bf16", "zero_optimization", "data_types", "communication_data_type")
# configs/ds_config_pp.json's precision (bf16, ZeRO-1, fp32 accumulation); SGD under ZeRO needs
# DeepSpeed's "untested optimizer" switch.
SHIPPED = json.loads((REPO / "configs" / "ds_config_pp.json").read_text())
FP32_ACCUM = {**{k: SHIPPED[k] for k in PRECISION_KEYS if k in SHIPPED}, "zero_allow_untested_optimizer": True}
TIED_CLIP = 0.5       # these runs' gradient norms are 1.1-2.2: clipping at 0.5 bites at every step
PACK_SEQ = 128        # 34 records in 18 rows (2 or 3 records in most)
RM_SEQ = 128          # no eval pair is truncated (the longest side is 64 tokens)
EVAL_FRACTION = 0.35  # 10 eval rows: two eval calls of 6 rows, the second with 2 filler rows


# ------------------------------------------------------------------------------------ references

def hf_model(hf_dir):
    """The HF causal LM in fp32 with the pipeline's attention implementation (BLOOM: eager only)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    attn = "eager" if AutoConfig.from_pretrained(hf_dir).model_type == "bloom" else "sdpa"
    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation=attn)


def lm_data(pp_dir, seq=SEQ, seed=7, **kw):
    """The dataset a run of `make_config(...)` trains on (trainer.batches.build_data's arguments)."""
    from transformers import AutoTokenizer

    from data.dataset import build_dataset

    return build_dataset(DATA, AutoTokenizer.from_pretrained(pp_dir), seq, kind="lm", seed=seed, **kw)


def global_batches(dataset, micro=2, accum=3, seed=7):
    """The global batches of the pipeline's steps, as one data-parallel rank would take them."""
    from trainer.batches import GlobalBatches

    return GlobalBatches(dataset, micro, accum, 0, 1, seed)


def token_loss_sum(model, ids, mask, labels):
    """Summed fp32 cross-entropy of the shifted targets, HF forward."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")


def padded_loss(model, micro_batch):
    (ids, mask, *_), labels = micro_batch
    return token_loss_sum(model, ids, mask, labels)


def per_record_loss(model, micro_batch):
    """A packed micro-batch with every record of every row run alone through HF (its own row,
    positions from 0, no other record to attend to); returns the summed token loss."""
    (ids, _, seg), labels = micro_batch
    total = 0.0
    for row in range(ids.shape[0]):
        for k in seg[row].unique().tolist():
            if k == 0:
                continue
            where = seg[row] == k
            one = ids[row][where][None]
            total = total + token_loss_sum(model, one, torch.ones_like(one), labels[row][where][None])
    return total


def n_targets_per_record(micro_batch) -> int:
    (_, _, seg), labels = micro_batch
    return sum(int((labels[row][seg[row] == k][1:] != -100).sum())
               for row in range(labels.shape[0]) for k in seg[row].unique().tolist() if k)


class Lion:
    """The Lion update (Chen et al. 2023, Algorithm 2 with decoupled weight decay), written out:
        p <- p * (1 - lr * wd);  p <- p - lr * sign(beta1 * m + (1 - beta1) * g);  m <- beta2 * m + (1 - beta2) * g"""

    def __init__(self, groups, lr, betas, weight_decay):
        self.groups = [(g["params"], g.get("weight_decay", weight_decay)) for g in groups]
        self.lr, (self.b1, self.b2) = lr, betas
        self.m = {}

    @torch.no_grad()
    def step(self):
        for params, wd in self.groups:
            for p in params:
                m = self.m.setdefault(id(p), torch.zeros_like(p))
                p.mul_(1 - self.lr * wd)
                p.add_(torch.sign(m * self.b1 + p.grad * (1 - self.b1)), alpha=-self.lr)
                m.mul_(self.b2).add_(p.grad, alpha=1 - self.b2)


def make_optimizer(spec: dict, named_masters: dict, lion=Lion):
    """The run's optimizer on the reference's fp32 masters, with trainer's weight-decay groups."""
    from trainer.config import DEFAULT_NO_DECAY

    decay = [t for n, t in named_masters.items() if not n.endswith(DEFAULT_NO_DECAY)]
    no_decay = [t for n, t in named_masters.items() if n.endswith(DEFAULT_NO_DECAY)]
    groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    params = {k: v for k, v in spec["params"].items() if k != "use_triton"}
    if spec["type"] in ("Lion", "LionPytorch"):
        return lion(groups, **params)
    return {"AdamW": torch.optim.AdamW, "SGD": torch.optim.SGD}[spec["type"]](groups, **params)


@dataclass
class Reference:
    masters: dict
    weights: dict
    losses: list
    norms: list
    grads: list


def reference_train(model, batches, steps: int, optimizer: dict, *, accum: int = 3, clip: float = 1.0,
                    bf16: bool = False, accum_dtype=torch.float32, reduce_dtype=None, fp32_master: bool = True,
                    loss=padded_loss, n_targets=None, tied_norm_once: bool = True, lion=Lion):
    """Single-process HF training with the pipeline's semantics:
    - the loss of a step is sum(token losses) / N_global, each micro-batch contributing
      sum * (grad_accum / N_global) / grad_accum (trainer.batches' normaliser, DeepSpeed's 1/gas);
    - bf16: parameters in bf16 (buffers such as RoPE's inv_freq stay fp32, as DeepSpeed casts them),
      each micro-batch's gradient computed in bf16 and added into an `accum_dtype` buffer, fp32 master
      weights (initialised from the bf16 copy, as DeepSpeed's BF16_Optimizer does) updated by the
      optimizer and copied back to bf16. reduce_dtype: the accumulated gradient rounded to it and back
      (DeepSpeed's data-parallel all-reduce runs in communication_data_type, bf16 by default under
      bf16, even with one replica). fp32_master=False keeps the weights in bf16 only (a "feature off"
      variant);
    - gradient clipping by the global norm of all gradients (a tied weight counted once; twice with
      tied_norm_once=False, a "feature off" variant for tied models), coefficient clip / (norm + 1e-6)
      as DeepSpeed and torch use.
    Returns a Reference: fp32 masters and model weights {hf name: tensor}, and per step the loss,
    the gradient norm and the accumulated gradients (before clipping, in the accumulation dtype)."""
    named = dict(model.named_parameters())  # a tied weight appears once
    if bf16:
        for p in named.values():
            p.data = p.data.to(torch.bfloat16)
    masters = {n: p.detach().float().clone() for n, p in named.items()}
    if not fp32_master:
        masters = {n: p.detach().clone() for n, p in named.items()}
    opt = make_optimizer(optimizer, masters, lion)
    tied = [n for n in named if n.endswith(("embed_tokens.weight", "word_embeddings.weight"))]  # for tied models
    out = Reference({}, {}, [], [], [])
    for _ in range(steps):
        micro, n_global, _ = batches.next_step()
        if n_targets is not None:
            n_global = sum(n_targets(m) for m in micro)
        scale = torch.tensor(accum / max(n_global, 1), dtype=torch.float64).to(torch.float32)
        acc = {n: torch.zeros_like(p, dtype=accum_dtype if bf16 else torch.float32) for n, p in named.items()}
        total = 0.0
        for mb in micro:
            model.zero_grad(set_to_none=True)
            micro_loss = loss(model, mb) * scale / accum
            micro_loss.backward()
            total += micro_loss.item()
            for n, p in named.items():
                if p.grad is not None:
                    acc[n] += p.grad.to(acc[n].dtype)
        if reduce_dtype is not None:
            acc = {n: g.to(reduce_dtype).to(g.dtype) for n, g in acc.items()}
        out.grads.append({n: g.clone() for n, g in acc.items()})
        squares = sum(g.float().norm() ** 2 for g in acc.values())
        if not tied_norm_once:
            squares = squares + sum(acc[n].float().norm() ** 2 for n in tied)
        norm = squares.sqrt()
        coef = clip / (norm + 1e-6)
        if clip > 0 and coef < 1:
            for g in acc.values():
                g.mul_(coef)
        for n, t in masters.items():
            t.grad = acc[n].to(t.dtype)
        opt.step()
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(masters[n])
        out.losses.append(total)
        out.norms.append(float(norm))
    out.weights.update({k: v.detach().clone() for k, v in model.state_dict().items()})
    out.masters.update({n: t.detach().float() for n, t in masters.items()})
    return out


# ---------------------------------------------------------------------------- pipeline side

def probe_outputs(save: Path) -> list[dict]:
    return [torch.load(f, weights_only=False) for f in sorted(save.glob("probe_rank*.pt"))]


def pipe_to_hf_names(pp_dir, head="lm"):
    from transformers import AutoConfig

    from models.pipeline import layer_key_rules, pipe_key_to_hf, prepare_config

    rules = layer_key_rules(prepare_config(AutoConfig.from_pretrained(pp_dir)), head)

    def name(key: str) -> str:
        if key.startswith("tied:"):
            return pipe_key_to_hf(rules, 0, key.split(":", 2)[2])
        index, layer_key = key.split(":", 1)
        return pipe_key_to_hf(rules, int(index), layer_key)

    return name


def pipeline_tensors(save: Path, pp_dir, what: str = "masters", head: str = "lm") -> tuple[dict, dict]:
    """What the probes saved on every rank, by HF name: ({name: tensor} of the layers each stage owns,
    {name: [the tied module's copy on each stage holding it]})."""
    name = pipe_to_hf_names(pp_dir, head)
    owned, tied_copies = {}, {}
    for probe in probe_outputs(save):
        for key, t in probe[what].items():
            if key.startswith("tied:"):
                tied_copies.setdefault(name(key), []).append(t)
            else:
                owned[name(key)] = t
    return owned, tied_copies


def pipeline_grads(save: Path, pp_dir) -> list[dict]:
    """Per step, {hf name: the gradient the engine handed to optimizer.step} over all stages."""
    name = pipe_to_hf_names(pp_dir)
    probes = probe_outputs(save)
    return [{name(k): g for p in probes for k, g in p["grads"][step].items()} for step in range(len(probes[0]["grads"]))]


def max_diff(a: dict, b: dict, keys=None) -> float:
    keys = keys if keys is not None else a.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in keys)


def losses(summary) -> list:
    return [loss for _, loss in summary["history"]]


# ------------------------------------------------------------------------------------ the launch

def eval_pairs(path: Path) -> Path:
    """15 pairwise records (an odd count: the last eval call has a filler pair; accuracy cannot be 1/2)."""
    subjects = ["the sun", "a river", "the moon", "an old bridge", "a red fox", "the city", "winter rain",
                "a violin", "the library", "green tea", "a mountain path", "the harbour", "a small robot", "spring",
                "a lighthouse"]
    records = [{"type": "pairwise", "prompt": f"Describe {s} in one sentence.",
                "chosen": f"{s.capitalize()} is quiet and beautiful{'!' * (i % 3)}",
                "rejected": "I do not know." if i % 2 else f"{s} {s} {s}."} for i, s in enumerate(subjects)]
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1))
    return path


@pytest.fixture(scope="module")
def dirs(tiny_hf, tmp_path_factory):
    base = tmp_path_factory.mktemp("parity_models")
    out = {}
    for name, (model_type, tied) in {"llama": ("llama", False), "llama_tied": ("llama", True), "bloom": ("bloom", None)}.items():
        hf = tiny_hf(model_type, tied)
        out[name] = (hf, hg_to_pp(hf, base / name, progress=False))
    return out


@pytest.fixture(scope="module")
def runs(dirs, tmp_path_factory):
    """One launch; {name: (summary, save_path)}."""
    tmp = tmp_path_factory.mktemp("parity_runs")
    pp, pp_tied, pp_bloom = dirs["llama"][1], dirs["llama_tied"][1], dirs["bloom"][1]
    specs = {
        "lion_pytorch": (make_config(tmp, "lion_pytorch", pp, optimizer={"type": "LionPytorch", "params": LION}), "masters"),
        "ds_lion": (make_config(tmp, "ds_lion", pp, optimizer={"type": "Lion", "params": LION}, zero_optimization=OFFLOAD),
                    "masters,optimizer"),
        "bf16": (make_config(tmp, "bf16", pp, **BF16, optimizer=SGD), "masters,grads,optimizer,full_logits"),
        "bf16_zero1_fp32_accum": (make_config(tmp, "bf16_zero1_fp32_accum", pp, **FP32_ACCUM, optimizer=SGD),
                                  "masters,grads,optimizer,full_logits"),
        "bf16_zero1_fp32_accum_fp32_comm": (make_config(tmp, "bf16_zero1_fp32_accum_fp32_comm", pp, optimizer=SGD,
                                                        **{**FP32_ACCUM, "communication_data_type": "fp32"}), "masters,grads,full_logits"),
        "bf16_default_head": (make_config(tmp, "bf16_default_head", pp, **BF16, optimizer=SGD), "grads"),
        "grad_ckpt": (make_config(tmp, "grad_ckpt", pp, use_grad_ckpt=True, train_steps=2, optimizer=SGD), "count_blocks,grads,masters"),
        "no_grad_ckpt": (make_config(tmp, "no_grad_ckpt", pp, train_steps=2, optimizer=SGD), "count_blocks,grads,masters"),
        "zero1_offload": (make_config(tmp, "zero1_offload", pp, zero_optimization=OFFLOAD), "masters,optimizer"),
        "zero1": (make_config(tmp, "zero1", pp, zero_optimization={"stage": 1}), "masters,optimizer"),
        "bloom": (make_config(tmp, "bloom", pp_bloom, optimizer=SGD, gradient_clipping=TIED_CLIP), "masters"),
        "llama_tied": (make_config(tmp, "llama_tied", pp_tied, optimizer=SGD, gradient_clipping=TIED_CLIP), "masters"),
        "pack": (make_config(tmp, "pack", pp, pack=True, max_seq_len=PACK_SEQ, train_batch_size=4, gradient_accumulation_steps=2,
                             optimizer=SGD), "masters"),
        "rm_eval": (make_config(tmp, "rm_eval", pp, stage="rm", data_path=PAIRS, eval_data_path=str(eval_pairs(tmp / "eval_pairs.json")),
                                max_seq_len=RM_SEQ, train_steps=2, train_batch_size=2, train_micro_batch_size_per_gpu=1,
                                gradient_accumulation_steps=2, optimizer=SGD), ""),
        "sft_eval_two_stage": (make_config(tmp, "sft_eval_two_stage", pp, eval_fraction=EVAL_FRACTION, train_steps=2), ""),
        "sft_eval_dp2": (make_config(tmp, "sft_eval_dp2", pp, eval_fraction=EVAL_FRACTION, train_steps=2,
                                     train_micro_batch_size_per_gpu=1, model_topo=TOPO_DP2), ""),
    }
    out = tmp / "results.jsonl"
    launch(str(REPO / "tests" / "multirank" / "parity_runs.py"),
           *[a for path, probes in specs.values() for a in ("--run", f"{path}:{probes}")], "--out", str(out))
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(results) == len(specs)
    return {name: (r, tmp / name) for name, r in zip(specs, results)}


# ------------------------------------------------------------------------------------------ Lion

def llama_reference(dirs, steps=3, optimizer=ADAMW, **kw) -> Reference:
    hf, pp = dirs["llama"]
    return reference_train(hf_model(hf), global_batches(lm_data(pp).train), steps, optimizer, **kw)


def assert_off_variants_are_far(got: dict, tolerance: float, variants: dict) -> None:
    """Each feature-off reference ({name: masters}) misses the pipeline by far more than `tolerance`."""
    for name, masters in variants.items():
        assert max_diff(got, masters) > 20 * tolerance, f"the {name!r} reference is within 20x the tolerance"


@multirank
def test_lion_pytorch_three_steps_equal_reference_lion(runs, dirs):
    """lion-pytorch on 2 stages: 3 steps with clipping (norms 1.8-2.3 > 1) equal the Lion update
    written out above on the HF model. Tolerance 1e-6 on the fp32 weights (measured: 0.0): every
    element with a non-zero update moves by exactly lr = 2e-4 per step, so one flipped update
    direction is >= 4e-4 away, and AdamW instead of Lion, no clipping or no weight decay are 4e-4 to 3e-3 away."""
    summary, save = runs["lion_pytorch"]
    got, _ = pipeline_tensors(save, dirs["llama"][1])
    spec = {"type": "LionPytorch", "params": LION}
    ref = llama_reference(dirs, optimizer=spec)
    assert min(ref.norms) > 1.0  # the clip bites at every step
    assert max_diff(got, ref.masters) <= 1e-6
    torch.testing.assert_close(torch.tensor(losses(summary)), torch.tensor(ref.losses), rtol=0, atol=2e-6)
    assert_off_variants_are_far(got, 1e-6, {
        "AdamW": llama_reference(dirs, optimizer=ADAMW).masters,
        "no clipping": llama_reference(dirs, optimizer=spec, clip=0.0).masters,
        "no weight decay": llama_reference(dirs, optimizer={**spec, "params": {**LION, "weight_decay": 0.0}}).masters,
    })


class CopysignLion(Lion):
    """Lion as DeepSpeed's CPU kernel computes it: the update is -lr * copysign(1, u), so an element
    whose u = beta1 * m + (1 - beta1) * g is exactly +0 (a zero gradient and zero momentum) still
    moves by -lr (deepspeed/ops/csrc/lion/cpu_lion_impl.cpp, `-std::copysignf(alpha, tmp)`)."""

    @torch.no_grad()
    def step(self):
        for params, wd in self.groups:
            for p in params:
                m = self.m.setdefault(id(p), torch.zeros_like(p))
                p.mul_(1 - self.lr * wd)
                p.add_(torch.copysign(torch.ones_like(p), m * self.b1 + p.grad * (1 - self.b1)), alpha=-self.lr)
                m.mul_(self.b2).add_(p.grad, alpha=1 - self.b2)


def test_copysign_lion_differs_from_lion_only_at_zero_updates():
    torch.manual_seed(0)
    grads = torch.randn(6)
    grads[[1, 4]] = 0.0
    a, b = torch.zeros(6), torch.zeros(6)
    for cls, p in ((Lion, a), (CopysignLion, b)):
        p.grad = grads
        cls([{"params": [p]}], lr=0.1, betas=(0.9, 0.99), weight_decay=0.0).step()
    torch.testing.assert_close(a, -0.1 * torch.sign(grads))
    assert torch.equal(a != b, grads == 0) and torch.equal(b[[1, 4]], torch.tensor([-0.1, -0.1]))


@multirank
def test_deepspeed_lion_zero1_offload_equals_reference_lion_with_deepspeed_sign(runs, dirs):
    """DeepSpeed's own Lion (DeepSpeedCPULion under ZeRO-1 + CPU offload), 3 clipped steps on 2
    stages: equals the reference Lion up to DeepSpeed's sign(0) (CopysignLion; measured 1.5e-8),
    tolerance 1e-6 as for lion-pytorch. The test below holds it to Lion's definition."""
    summary, save = runs["ds_lion"]
    info = probe_outputs(save)[0]["optimizer"]
    assert info["basic"].endswith("DeepSpeedCPULion") and info["zero_cpu_offload"], info
    got, _ = pipeline_tensors(save, dirs["llama"][1])
    spec = {"type": "Lion", "params": LION}
    ref = llama_reference(dirs, optimizer=spec, lion=CopysignLion)
    assert max_diff(got, ref.masters) <= 1e-6
    torch.testing.assert_close(torch.tensor(losses(summary)), torch.tensor(ref.losses), rtol=0, atol=2e-6)
    assert_off_variants_are_far(got, 1e-6, {"no clipping": llama_reference(dirs, optimizer=spec, clip=0.0, lion=CopysignLion).masters,
                                            "AdamW": llama_reference(dirs, optimizer=ADAMW).masters})


@multirank
@pytest.mark.xfail(strict=True, reason="DeepSpeed's CPU Lion moves every element whose Lion update is exactly 0 (zero gradient and "
                                       "momentum: embedding rows of tokens not yet seen, the padding row) by -lr per step "
                                       "(copysign(lr, +0)); lion-pytorch and the Lion paper leave them unchanged")
def test_deepspeed_lion_equals_lion_definition(runs, dirs):
    _, save = runs["ds_lion"]
    got, _ = pipeline_tensors(save, dirs["llama"][1])
    ref = llama_reference(dirs, optimizer={"type": "Lion", "params": LION})
    assert max_diff(got, ref.masters) <= 1e-6


# ------------------------------------------------------------------------------------------ bf16

def bf16_reference(dirs, **kw) -> Reference:
    return llama_reference(dirs, optimizer=SGD, **kw)


def bf16_variants(dirs) -> dict:
    return {
        "fp32 training": bf16_reference(dirs).masters,
        "bf16 without fp32 masters": bf16_reference(dirs, bf16=True, accum_dtype=torch.bfloat16, fp32_master=False).masters,
    }


@multirank
def test_bf16_zero0_equals_hf_loop_with_fp32_masters_and_bf16_accumulation(runs, dirs):
    """bf16 + ZeRO 0 is DeepSpeed's BF16_Optimizer accumulating the micro-batch gradients in bf16 (its
    warning says so), with fp32 masters: the reference does exactly that. SGD (momentum 0.9, lr 0.5,
    clipping at 1.0 biting at every step), whose arithmetic is DeepSpeed's own (torch.optim.SGD), so
    the runs agree bit for bit (measured: gradients, fp32 masters and bf16 weights identical after 3
    steps); DeepSpeed's FusedAdam differs from torch's AdamW in the last bit, which after one step
    flips bf16 roundings of a few weights. Tolerances 1e-6 on each step's gradient and on the fp32
    masters; fp32 accumulation, fp32 training and bf16 weights without fp32 masters are 3.5e-4 to 5e-3 away."""
    summary, save = runs["bf16"]
    info = probe_outputs(save)[0]["optimizer"]
    assert info["wrapper"] == "BF16_Optimizer" and info["state_dtypes"] == ["torch.float32"], info
    ref = bf16_reference(dirs, bf16=True, accum_dtype=torch.bfloat16)
    assert min(ref.norms) > 1.0
    grads = pipeline_grads(save, dirs["llama"][1])
    assert len(grads) == 3
    for got, expected in zip(grads, ref.grads, strict=True):
        assert max_diff(got, expected) <= 1e-6
    got, _ = pipeline_tensors(save, dirs["llama"][1])
    assert max_diff(got, ref.masters) <= 1e-6
    params, _ = pipeline_tensors(save, dirs["llama"][1], what="params")
    assert {t.dtype for t in params.values()} == {torch.bfloat16}
    torch.testing.assert_close(torch.tensor(losses(summary)), torch.tensor(ref.losses), rtol=0, atol=2e-6)
    fp32_accum = bf16_reference(dirs, bf16=True, accum_dtype=torch.float32)
    assert max_diff(grads[0], fp32_accum.grads[0]) > 100 * 1e-6
    assert_off_variants_are_far(got, 1e-6, {**bf16_variants(dirs), "fp32 accumulation": fp32_accum.masters})


@multirank
@pytest.mark.parametrize("name", ["bf16_zero1_fp32_accum", "bf16_zero1_fp32_accum_fp32_comm"])
def test_bf16_zero1_fp32_accumulation_equals_hf_loop(runs, dirs, name):
    """bf16 + ZeRO-1 + grad_accum_dtype fp32 (the shipped configs): micro-batch gradients (bf16)
    summed in fp32, fp32 masters. DeepSpeed's data-parallel all-reduce then runs in
    communication_data_type (default bf16 under bf16), which rounds the fp32 sum to bf16 even with
    one replica; with "communication_data_type": "fp32" it reaches the optimizer unrounded. Each run
    is compared with the reference of its own semantics (measured: gradients identical, masters
    within 1.5e-8; tolerances 1e-6 as for ZeRO 0); the other run's semantics, bf16 accumulation, fp32
    training and no fp32 masters are 3.5e-4 to 5e-3 away."""
    summary, save = runs[name]
    assert FP32_ACCUM["bf16"]["enabled"] and FP32_ACCUM["zero_optimization"]["stage"] == 1
    assert FP32_ACCUM["data_types"]["grad_accum_dtype"] == "fp32"
    comm = json.loads((save.parent / f"{name}.json").read_text()).get("communication_data_type")
    reduce_dtype = None if comm in ("fp32", "float32") else torch.bfloat16
    ref = bf16_reference(dirs, bf16=True, accum_dtype=torch.float32, reduce_dtype=reduce_dtype)
    grads = pipeline_grads(save, dirs["llama"][1])
    assert len(grads) == 3
    for got, expected in zip(grads, ref.grads, strict=True):
        assert max_diff(got, expected) <= 1e-6
    got, _ = pipeline_tensors(save, dirs["llama"][1])
    assert max_diff(got, ref.masters) <= 1e-6
    torch.testing.assert_close(torch.tensor(losses(summary)), torch.tensor(ref.losses), rtol=0, atol=2e-6)
    other = bf16_reference(dirs, bf16=True, accum_dtype=torch.float32, reduce_dtype=torch.bfloat16 if reduce_dtype is None else None)
    bf16_accum = bf16_reference(dirs, bf16=True, accum_dtype=torch.bfloat16)
    assert max_diff(grads[0], other.grads[0]) > 100 * 1e-6 and max_diff(grads[0], bf16_accum.grads[0]) > 100 * 1e-6
    assert_off_variants_are_far(got, 1e-6, {**bf16_variants(dirs), "bf16 accumulation": bf16_accum.masters, "other reduce": other.masters})


@multirank
def test_shipped_bf16_config_gives_the_optimizer_fp32_accumulated_gradients(runs, dirs):
    """The shipped configs' precision keys (bf16, ZeRO-1, fp32 accumulation and, found by this test,
    an fp32 communication_data_type: DeepSpeed's all-reduce casts to bf16 otherwise)."""
    _, save = runs["bf16_zero1_fp32_accum"]
    ref = bf16_reference(dirs, steps=1, bf16=True, accum_dtype=torch.float32)
    assert max_diff(pipeline_grads(save, dirs["llama"][1])[0], ref.grads[0]) <= 1e-6


@multirank
def test_bf16_with_the_default_lm_head_loss_trains_every_weight(runs, dirs):
    """bf16 with SFT's default head loss (the chunked loss where the trainer has it, full logits
    otherwise): every weight gets a non-zero gradient at every step, the first step's gradients are
    within 5% of each weight's largest HF gradient element and the 3 losses within 5e-4 of the HF
    loop's. The chunked loss keeps the logits' gradient in fp32 where HF rounds it to bf16: measured
    in one process, 1.1% at step 1 and 9e-5 in loss; an LM head left untrained is 100% and 2.6e-2 away."""
    summary, save = runs["bf16_default_head"]
    ref = bf16_reference(dirs, bf16=True, accum_dtype=torch.bfloat16)
    grads = pipeline_grads(save, dirs["llama"][1])
    assert len(grads) == 3
    for step_grads in grads:
        assert not [name for name, g in step_grads.items() if not g.abs().max() > 0], "zero gradients"
    for name, g in grads[0].items():
        assert (g.float() - ref.grads[0][name].float()).abs().max() <= 0.05 * ref.grads[0][name].float().abs().max(), name
    torch.testing.assert_close(torch.tensor(losses(summary)), torch.tensor(ref.losses), rtol=0, atol=5e-4)


# ------------------------------------------------------------------------ activation checkpointing

@multirank
def test_activation_checkpointing_recomputes_blocks_and_keeps_gradients(runs, dirs):
    """use_grad_ckpt: every block runs twice per micro-batch (forward, then recomputed in the
    backward), the others once; gradients (after clipping) of both steps and the weights after
    them equal the plain run's (measured bit-identical; tolerance 1e-7) and the HF loop's."""
    ckpt, plain = probe_outputs(runs["grad_ckpt"][1]), probe_outputs(runs["no_grad_ckpt"][1])
    blocks_per_rank = [1, 3]  # parts [2, 5]: embedding + block 0 | blocks 1-3 + norm + head
    accum = 3
    assert [p["counts"] for p in plain] == [[b * accum] * 2 for b in blocks_per_rank]
    assert [p["counts"] for p in ckpt] == [[2 * b * accum] * 2 for b in blocks_per_rank]
    pp = dirs["llama"][1]
    for got, expected in zip(pipeline_grads(runs["grad_ckpt"][1], pp), pipeline_grads(runs["no_grad_ckpt"][1], pp), strict=True):
        assert got.keys() == expected.keys() and max_diff(got, expected) <= 1e-7
    a, _ = pipeline_tensors(runs["grad_ckpt"][1], pp)
    b, _ = pipeline_tensors(runs["no_grad_ckpt"][1], pp)
    assert max_diff(a, b) <= 1e-7
    ref = llama_reference(dirs, steps=2, optimizer=SGD)
    assert max_diff(a, ref.masters) <= 2e-6
    assert max_diff(a, llama_reference(dirs, steps=0).masters) > 1e-3  # and the steps moved the weights


# ----------------------------------------------------------------------------- ZeRO-1 + CPU offload

@multirank
def test_zero1_cpu_offload_keeps_optimizer_state_on_cpu_and_the_math(runs, dirs):
    """ZeRO-1 + offload_optimizer cpu: the engine reports the offload, the optimizer is
    DeepSpeedCPUAdam and its state and fp32 partitions live on the CPU; 3 AdamW steps equal ZeRO-1
    without offload (measured identical; tolerance 1e-6) and the HF loop (measured 1.2e-7; 2e-5)."""
    offload = [p["optimizer"] for p in probe_outputs(runs["zero1_offload"][1])]
    plain = [p["optimizer"] for p in probe_outputs(runs["zero1"][1])]
    for info in offload:
        assert info["zero_cpu_offload"] and info["zero_stage"] == 1, info
        assert info["basic"] == "deepspeed.ops.adam.cpu_adam.DeepSpeedCPUAdam", info
        assert info["n_state_tensors"] > 0 and info["state_devices"] == ["cpu"] and info["master_devices"] == ["cpu"], info
    for info in plain:  # what the assertions above would see with the offload off
        assert not info["zero_cpu_offload"] and info["zero_stage"] == 1 and "DeepSpeedCPUAdam" not in info["basic"], info
    pp = dirs["llama"][1]
    got, _ = pipeline_tensors(runs["zero1_offload"][1], pp)
    assert max_diff(got, pipeline_tensors(runs["zero1"][1], pp)[0]) <= 1e-6
    ref = llama_reference(dirs)
    assert max_diff(got, ref.masters) <= 2e-5
    torch.testing.assert_close(torch.tensor(losses(runs["zero1_offload"][0])), torch.tensor(ref.losses), rtol=0, atol=2e-6)


# ---------------------------------------------------------------------- tied embeddings and BLOOM

@multirank
@pytest.mark.parametrize("kind", ["bloom", "llama_tied"])
def test_tied_embedding_training_equals_hf_loop(runs, dirs, tmp_path, kind):
    """2 stages (embedding on stage 0, the tied head on stage 1), SGD with clipping at 0.5: the
    pipeline's gradient norm equals HF's with the tied weight counted once, the tied weight's two
    copies stay equal, and after 3 steps the weights equal the HF loop's (tolerance 1e-5; measured
    <= 3e-7). Counting the tied weight twice in the clip norm is 1.7e-2 to 3.6e-2 away; without the
    tied-gradient all-reduce the copies part and the weights miss by far more."""
    hf, pp = dirs[kind]
    summary, save = runs[kind]
    ref = reference_train(hf_model(hf), global_batches(lm_data(pp).train), 3, SGD, clip=TIED_CLIP)
    assert min(ref.norms) > 1.5 * TIED_CLIP
    norms = [p["norms"] for p in probe_outputs(save)]
    for rank_norms in norms:
        torch.testing.assert_close(torch.tensor(rank_norms), torch.tensor(ref.norms), rtol=1e-5, atol=0)
    got, copies = pipeline_tensors(save, pp)
    tied = [k for k in copies if k.endswith(("embed_tokens.weight", "word_embeddings.weight"))]
    assert len(tied) == 1 and len(copies[tied[0]]) == 2
    assert all(torch.equal(c, got[tied[0]]) for c in copies[tied[0]])
    assert got.keys() == ref.masters.keys()
    assert max_diff(got, ref.masters) <= 1e-5
    torch.testing.assert_close(torch.tensor(losses(summary)), torch.tensor(ref.losses), rtol=0, atol=2e-6)
    exported = exported_weights(save, tmp_path / "hf")
    assert max((exported[k] - ref.weights[k]).abs().max().item() for k in exported) <= 1e-5
    twice = reference_train(hf_model(hf), global_batches(lm_data(pp).train), 3, SGD, clip=TIED_CLIP, tied_norm_once=False)
    assert_off_variants_are_far(got, 1e-5, {"tied weight counted twice": twice.masters})


# ---------------------------------------------------------------------------------------- packing

@multirank
def test_packed_training_equals_each_record_alone_in_hf(runs, dirs):
    """pack: true, 2 stages, 3 SGD steps: the loss and weights equal HF run on every record of every
    packed row separately (its own row: positions from 0, nothing else to attend to), with the
    normaliser counted per record. Tolerance 1e-5 (measured 1.2e-7); the packed rows run whole
    through HF (records attending to each other) are 2.7e-2 away."""
    hf, pp = dirs["llama"]
    summary, save = runs["pack"]
    data = lm_data(pp, seq=PACK_SEQ, pack=True)
    assert sum(int(data.train[i][0][2].max() > 1) for i in range(len(data.train))) >= len(data.train) // 2  # it packs
    batches = lambda: global_batches(data.train, micro=2, accum=2)
    ref = reference_train(hf_model(hf), batches(), 3, SGD, accum=2, loss=per_record_loss, n_targets=n_targets_per_record)
    got, _ = pipeline_tensors(save, pp)
    assert max_diff(got, ref.masters) <= 1e-5
    torch.testing.assert_close(torch.tensor(losses(summary)), torch.tensor(ref.losses), rtol=0, atol=2e-6)
    crossing = reference_train(hf_model(hf), batches(), 3, SGD, accum=2)
    assert_off_variants_are_far(got, 1e-5, {"packed rows without segment masks": crossing.masters})


# ---------------------------------------------------------------------------------------- RM eval

def hf_pair_scores(model, rows) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) float64[n]: the exported classifier on each side alone, unpadded; its score
    is the logit at the last token (the answer's EOS)."""
    scores = []
    with torch.no_grad():
        for i in range(len(rows)):
            (ids, mask), _, _ = rows[i]
            scores.append([model(input_ids=ids[side, :int(mask[side].sum())][None]).logits[0, 0].item() for side in range(2)])
    scores = torch.tensor(scores, dtype=torch.float64)
    return scores[:, 0], scores[:, 1]


@multirank
def test_rm_eval_equals_exported_sequence_classifier(runs, dirs, tmp_path):
    """The RM recipe's eval (15 untruncated pairs, 2 micro-batches of 1 pair per call: the 8th call
    has a filler pair) after 2 steps: accuracy exactly, mean scores and loss within 1e-5 of the
    pp_to_hg export run as AutoModelForSequenceClassification (also batched with padding, which
    relies on the exported pad id). Scoring the token before EOS instead moves the scores by > 1e-3."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from data.dataset import build_dataset

    pp = dirs["llama"][1]
    summary, save = runs["rm_eval"]
    data = build_dataset(PAIRS, AutoTokenizer.from_pretrained(pp), RM_SEQ, kind="pairwise", seed=7,
                         eval_paths=str(save.parent / "eval_pairs.json"))
    assert len(data.eval) == 15 and data.stats["eval"]["truncated"] == 0 and not data.stats["eval"]["dropped"]
    model = AutoModelForSequenceClassification.from_pretrained(pp_to_hg(save, tmp_path / "rm_hf", progress=False),
                                                               dtype=torch.float32).eval()
    chosen, rejected = hf_pair_scores(model, data.eval)
    expected = {"accuracy": (chosen > rejected).double().mean().item(), "chosen_score": chosen.mean().item(),
                "rejected_score": rejected.mean().item(), "loss": (-F.logsigmoid(chosen - rejected)).mean().item()}
    step, got = summary["evals"][-1]
    assert step == 2
    assert got["accuracy"] == expected["accuracy"]
    for key in ("chosen_score", "rejected_score", "loss"):
        assert got[key] == pytest.approx(expected[key], abs=1e-5), key
    ids = torch.cat([data.eval[i][0][0] for i in range(len(data.eval))])
    mask = torch.cat([data.eval[i][0][1] for i in range(len(data.eval))])
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask).logits[:, 0].double()
    torch.testing.assert_close(batched[0::2], chosen, rtol=0, atol=1e-5)
    torch.testing.assert_close(batched[1::2], rejected, rtol=0, atol=1e-5)
    with torch.no_grad():  # feature off: the score read one token early
        early = torch.tensor([model(input_ids=data.eval[i][0][0][0, :int(data.eval[i][0][1][0].sum()) - 1][None]).logits[0, 0].item()
                              for i in range(len(data.eval))], dtype=torch.float64)
    assert abs(early.mean().item() - expected["chosen_score"]) > 1e-3


# ---------------------------------------------------------------------------------------- SFT eval

@multirank
@pytest.mark.parametrize("name", ["sft_eval_two_stage", "sft_eval_dp2"])
def test_sft_eval_loss_equals_hf_mean_over_eval_targets(runs, dirs, tmp_path, name):
    """The SFT recipe's final eval loss (10 eval rows: two calls of 6, the second with 2 filler rows;
    2 stages, and 1 stage x 2 data-parallel ranks) equals the exported model's summed token loss over
    every eval row divided by the number of eval targets (HF, each row unpadded). Tolerance 1e-5
    (measured 5e-8); the mean of per-row means and of per-call means are > 1e-3 away."""
    pp = dirs["llama"][1]
    summary, save = runs[name]
    rows = lm_data(pp, eval_fraction=EVAL_FRACTION).eval
    assert len(rows) == 10
    model = hf_model(pp_to_hg(save, tmp_path / "hf", progress=False)).eval()
    sums, counts = [], []
    with torch.no_grad():
        for i in range(len(rows)):
            (ids, mask), labels = rows[i]
            n = int(mask.sum())
            sums.append(token_loss_sum(model, ids[:n][None], mask[:n][None], labels[:n][None]).item())
            counts.append(int((labels[1:n] != -100).sum()))
    expected = sum(sums) / sum(counts)
    step, got = summary["evals"][-1]
    assert step == 2 and got["loss"] == pytest.approx(expected, abs=1e-5)
    row_means = sum(s / c for s, c in zip(sums, counts)) / len(rows)
    call_means = (sum(sums[:6]) / sum(counts[:6]) + sum(sums[6:]) / sum(counts[6:])) / 2
    assert abs(row_means - expected) > 50 * 1e-5 and abs(call_means - expected) > 50 * 1e-5


# ------------------------------------------------------------------------------------- test models

def test_tiny_models_have_random_norms_and_biases(tiny_hf):
    from transformers import AutoModelForCausalLM

    for model_type, expected in (("llama", {"norm weights"}), ("bloom", {"norm weights", "biases"})):
        model = AutoModelForCausalLM.from_pretrained(tiny_hf(model_type), dtype=torch.float32)
        seen = set()
        for name, p in model.named_parameters():
            if p.dim() == 1:
                seen.add("biases" if name.endswith("bias") else "norm weights")
                default = 0.0 if name.endswith("bias") else 1.0
                assert (p - default).abs().min() > 0 and p.std() > 0.05, name
        assert seen == expected
