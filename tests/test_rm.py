"""Reward-model stage: the score-index rule, the pairwise loss, a tiny 2-stage RM that learns a
synthetic preference, and its export to / import from HF *ForSequenceClassification."""
import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, launch_ranks

from convert.hg_to_pp import hg_to_pp
from convert.pp_to_hg import pp_to_hg
from models.heads import last_token_index, sequence_scores
from models.pipeline import SequentialPipe, build_layers, prepare_config
from trainer.recipes.rm import pairwise_loss


def test_last_token_index_right_and_left_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [1, 0, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [2, 4, 4, 0]


def test_pairwise_loss_is_mean_negative_logsigmoid_of_score_margin():
    values = torch.tensor([[0.1, 2.0, 9.0], [0.3, 0.5, 9.0], [1.0, -1.0, 9.0], [0.2, 0.4, 9.0]])  # 2 pairs
    index = torch.tensor([1, 1, 1, 0])  # chosen rows 0, 1; rejected rows 2, 3
    chosen, rejected = torch.tensor([2.0, 0.5]), torch.tensor([-1.0, 0.2])
    expected = -F.logsigmoid(chosen - rejected).mean()
    torch.testing.assert_close(pairwise_loss(values, (index, torch.zeros(2))), expected)
    margin = torch.tensor([1.0, 0.0])  # the first pair must win by at least 1 to cost as little
    torch.testing.assert_close(pairwise_loss(values, (index, margin)), -F.logsigmoid(chosen - rejected - margin).mean())


def test_margins_travel_from_records_to_batches(tmp_path):
    from transformers import AutoTokenizer

    from data.batching import collate_pairs
    from data.dataset import build_dataset
    from data.errors import DataError

    records = [{"type": "pairwise", "prompt": "Pick one.", "chosen": "Yes.", "rejected": "No.", "margin": m}
               for m in (2.5, 0, -1)] + [{"type": "pairwise", "prompt": "Again.", "chosen": "Yes.", "rejected": "No."}]
    (tmp_path / "p.json").write_text(json.dumps(records))
    tok = AutoTokenizer.from_pretrained(REPO / "configs" / "tiny-llama")
    built = build_dataset(str(tmp_path / "p.json"), tok, 32, kind="pairwise")
    assert [float(built.train[i][2]) for i in range(4)] == [2.5, 0.0, -1.0, 0.0]
    assert collate_pairs([built.train[i] for i in range(4)])[2].tolist() == [2.5, 0.0, -1.0, 0.0]
    (tmp_path / "bad.json").write_text(json.dumps([{**records[0], "margin": "big"}, {**records[0], "margin": True}]))
    with pytest.raises(DataError) as err:
        build_dataset(str(tmp_path / "bad.json"), tok, 32, kind="pairwise")
    assert len(err.value.lines) == 2 and all("field 'margin': must be a finite number" in line for line in err.value.lines)


def load_layers(pp_dir: Path, head: str, config_dir: Path):
    from transformers import AutoConfig

    config = prepare_config(AutoConfig.from_pretrained(config_dir))
    layers = build_layers(config, head)
    for i, layer in enumerate(layers):
        if isinstance(layer, torch.nn.Module):
            layer.load_state_dict(torch.load(pp_dir / f"layer_{i:02d}-model_states.pt", weights_only=True), strict=True)
    return SequentialPipe(layers).eval()


@pytest.mark.parametrize("model_type", ["llama", "bloom"])
def test_score_does_not_depend_on_right_padding(tiny_hf, model_type, tmp_path):
    pipe_layers = build_layers(prepare_config(__import__("transformers").AutoConfig.from_pretrained(tiny_hf(model_type))), "value")
    torch.manual_seed(0)
    for layer in pipe_layers:
        if isinstance(layer, torch.nn.Module):
            for p in layer.parameters():
                p.data.normal_(0, 0.05)
    pipe = SequentialPipe(pipe_layers).eval()
    ids = torch.randint(4, 1000, (1, 9))
    scores = []
    for pad in (0, 3, 11):
        padded = torch.cat([ids, torch.full((1, pad), 3)], dim=1)
        mask = torch.cat([torch.ones(1, 9, dtype=torch.long), torch.zeros(1, pad, dtype=torch.long)], dim=1)
        with torch.no_grad():
            scores.append(sequence_scores(pipe((padded, mask)), last_token_index(mask)))
    torch.testing.assert_close(scores[1], scores[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(scores[2], scores[0], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# A real 2-stage RM on CPU.

WORDS = ("river mountain apple music garden window yellow simple quiet market teacher morning paper "
         "story planet ocean forest bridge winter summer").split()


def preference_records(n: int, seed: int) -> list[dict]:
    """Chosen answers start with "Yes, gladly:"; rejected ones with "No." (a rule a tiny model learns)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = "Tell me about " + " ".join(rng.sample(WORDS, 3)) + "."
        body = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))
        other = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))
        out.append({"type": "pairwise", "prompt": prompt, "chosen": f"Yes, gladly: {body}.", "rejected": f"No. {other}."})
    return out


@pytest.fixture(scope="module")
def trained_rm(tiny_hf, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rm")
    pp = hg_to_pp(tiny_hf("llama", False), tmp / "sft-pp", progress=False)
    (tmp / "train.jsonl").write_text("\n".join(json.dumps(r) for r in preference_records(192, 1)) + "\n")
    (tmp / "eval.jsonl").write_text("\n".join(json.dumps(r) for r in preference_records(48, 2)) + "\n")
    config = {
        "stage": "rm", "model_path": str(pp), "save_path": str(tmp / "rm"), "data_path": str(tmp / "train.jsonl"),
        "eval_data_path": str(tmp / "eval.jsonl"), "max_seq_len": 48, "n_epochs": 4, "seed": 3, "eval_interval": 24,
        "resume": "never",
        "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [2, 1]}, "parts": [3, 4]},
        "train_batch_size": 8, "train_micro_batch_size_per_gpu": 4, "steps_per_print": 10**6,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.0, "torch_adam": True}},
        "csv_monitor": {"enabled": True, "output_path": str(tmp / "logs"), "job_name": "rm"},
    }
    (tmp / "rm.json").write_text(json.dumps(config))
    launch_ranks("train_ds.py", "--config", tmp / "rm.json", timeout=900)
    return tmp, pp


@pytest.mark.multirank
def test_rm_learns_synthetic_preference(trained_rm):
    tmp, _ = trained_rm
    save = tmp / "rm"
    state = json.loads((save / (save / "latest").read_text() / "trainer_state.json").read_text())
    final = state["evals"][-1][1]
    assert final["accuracy"] >= 0.9, state["evals"]
    assert final["chosen_score"] > final["rejected_score"]
    assert state["evals"][0][1]["loss"] > final["loss"]
    logs = tmp / "logs" / "rm"
    assert (logs / "Eval_accuracy.csv").is_file() and (logs / "Eval_chosen_score.csv").is_file()
    metadata = json.loads((save / "pipetune.json").read_text())
    assert metadata["head"] == "value" and metadata["pad_token_id"] == 0  # the pad the data used (tiny LLaMA: unk)


@pytest.mark.multirank
def test_rm_exports_to_hf_sequence_classification_and_back(trained_rm):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tmp, _ = trained_rm
    save = tmp / "rm"
    tag_dir = save / (save / "latest").read_text()
    hf_dir = pp_to_hg(save, tmp / "rm-hf", progress=False)
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and len(config["id2label"]) == 1  # num_labels 1
    assert config["pad_token_id"] == 0  # tiny LLaMA has no pad token: training pads with unk
    model = AutoModelForSequenceClassification.from_pretrained(hf_dir).eval()
    tok = AutoTokenizer.from_pretrained(hf_dir)
    record = preference_records(1, 5)[0]
    texts = []
    for side in ("chosen", "rejected"):
        messages = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record[side]}]
        texts.append(tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
    width = max(map(len, texts)) + 3
    ids = torch.tensor([t + [0] * (width - len(t)) for t in texts])
    mask = torch.tensor([[1] * len(t) + [0] * (width - len(t)) for t in texts])
    assert texts[0][-1] == tok.eos_token_id  # the scored token is the answer's EOS
    with torch.no_grad():
        hf_scores = model(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
        # The pipeline's own layer files, value head included.
        pipe = load_layers(tag_dir, "value", save)
        pipe_scores = sequence_scores(pipe((ids, mask)), last_token_index(mask))
    torch.testing.assert_close(hf_scores, pipe_scores, rtol=0, atol=1e-5)
    assert hf_scores[0] > hf_scores[1]  # it prefers the chosen answer
    # HF -> pipeline again: the same layer files, bit for bit.
    back = hg_to_pp(hf_dir, tmp / "rm-pp-again", progress=False)
    assert json.loads((back / "pipetune.json").read_text())["head"] == "value"
    for f in sorted(tag_dir.glob("layer_*-model_states.pt")):
        a, b = torch.load(f, weights_only=True), torch.load(back / f.name, weights_only=True)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f.name
