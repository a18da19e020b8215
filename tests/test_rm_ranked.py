"""Reward model on ranked records (InstructGPT's K-wise comparisons): the loss is each record's mean
over its K(K-1)/2 ordered pairs (hand-computed here), averaged over records, whatever the micro-batch
split; pairs alone take the original pairwise path bit for bit; eval accuracy counts ordered pairs;
and a tiny 2-stage RM trained on a mixed pairwise + ranked toy ranking orders held-out responses."""
import itertools
import json
import random
import time

import pytest
import torch
import torch.nn.functional as F
from conftest import launch_ranks

from convert.hg_to_pp import hg_to_pp
from trainer.recipes.rm import (
    pair_sums,
    pairwise_loss,
    ranked_loss,
    ranked_pairs,
    ranked_sums,
    reward_loss,
    with_score_labels,
)

T = 6


def synthetic_batch(n_responses: list[int], margins: list[float], K: int, seed: int = 0):
    """A collated ranked batch (``collate_ranked``'s layout, row k*B + b = response k of record b) with
    random right-padded lengths, and random values [K*B, T]: -> (batch, values, scores float[K, B])."""
    gen = torch.Generator().manual_seed(seed)
    B = len(n_responses)
    lengths = torch.randint(1, T + 1, (K * B,), generator=gen)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()  # [K*B, T]
    ids = torch.randint(4, 100, (K * B, T), generator=gen) * mask
    values = torch.randn(K * B, T, generator=gen)
    scores = values.gather(1, (lengths - 1)[:, None]).squeeze(1).view(K, B)  # the value at each row's last token
    batch = ((ids, mask), torch.full((K * B, T), -100), torch.tensor(margins), torch.tensor(n_responses))
    return batch, values, scores


def hand_loss(scores: torch.Tensor, n_responses: list[int], margins: list[float]) -> torch.Tensor:
    """Mean over records of the mean over each record's ordered pairs (i before j: i is better)."""
    per_record = []
    for b, n in enumerate(n_responses):
        pairs = [-F.logsigmoid(scores[i, b] - scores[j, b] - margins[b]) for i, j in itertools.combinations(range(n), 2)]
        assert len(pairs) == n * (n - 1) // 2
        per_record.append(torch.stack(pairs).mean())
    return torch.stack(per_record).mean()


def test_ranked_loss_is_the_mean_of_the_pairwise_losses_over_all_pairs():
    """One ranking of 4: the 6 pairs' losses, each as the pairwise loss computes it, averaged."""
    batch, values, scores = synthetic_batch([4], [0.0], K=4)
    _, labels = with_score_labels(batch)
    assert len(labels) == 5  # the ranked labels: positions, better, worse, margin, weight
    loss = reward_loss(values, labels)
    pair_values = []  # each pair as a pairwise micro-batch: rows (better, worse)
    for i, j in itertools.combinations(range(4), 2):
        rows = torch.stack([values[i], values[j]])
        index = torch.stack([labels[0][i], labels[0][j]])
        pair_values.append(pairwise_loss(rows, (index, torch.zeros(1))))
    torch.testing.assert_close(loss, torch.stack(pair_values).mean())
    torch.testing.assert_close(loss, hand_loss(scores, [4], [0.0]))


def test_mixed_batch_weights_each_record_equally_with_margins_and_fillers():
    n_responses, margins = [4, 2, 3, 2], [0.0, 1.5, 0.0, -0.5]  # two pairwise records (with margins), two rankings
    batch, values, scores = synthetic_batch(n_responses, margins, K=4, seed=1)
    _, labels = with_score_labels(batch)
    better, worse = labels[1], labels[2]
    assert len(better) == 6 + 1 + 3 + 1  # every ordered pair once; filler rows are in no pair
    B = 4
    assert all((w // B) < n_responses[w % B] for w in worse.tolist())
    torch.testing.assert_close(ranked_loss(values, labels), hand_loss(scores, n_responses, margins))


def test_global_batch_loss_does_not_depend_on_the_micro_batch_split():
    """DeepSpeed averages micro-batch losses; every micro-batch holds B records, so the step's loss is
    the mean over the global batch's records for any B."""
    n_responses, margins = [4, 2, 3, 2, 4, 3, 2, 2], [0.0, 0.3, 0.0, 1.0, 0.0, 0.0, -1.0, 0.0]
    batch, values, scores = synthetic_batch(n_responses, margins, K=4, seed=2)
    whole = hand_loss(scores, n_responses, margins)
    K, N = 4, len(n_responses)
    for B in (1, 2, 4, 8):
        losses = []
        for start in range(0, N, B):
            rows = torch.tensor([k * N + b for k in range(K) for b in range(start, start + B)])  # response-major
            (ids, mask), lab, _, _ = batch
            micro = ((ids[rows], mask[rows]), lab[rows], torch.tensor(margins[start:start + B]),
                     torch.tensor(n_responses[start:start + B]))
            losses.append(reward_loss(values[rows], with_score_labels(micro)[1]))
        torch.testing.assert_close(torch.stack(losses).mean(), whole)


def test_pairs_alone_take_the_pairwise_path_bit_for_bit():
    batch, values, _ = synthetic_batch([2, 2, 2], [0.5, 0.0, -1.0], K=2, seed=3)
    _, labels = with_score_labels(batch)
    assert len(labels) == 2 and torch.equal(labels[1], batch[2])  # (score positions, margins) as before
    assert torch.equal(reward_loss(values, labels), pairwise_loss(values, labels))
    # The ranked formula on the same pairs gives the same number (not bit for bit: a weighted sum).
    ranked = (labels[0], *ranked_pairs(batch[3], batch[2]))
    torch.testing.assert_close(ranked_loss(values, ranked), pairwise_loss(values, labels))


def test_eval_sums_count_ordered_pairs_and_skip_filler_records():
    n_responses, margins = [3, 2], [0.0, 0.0]
    batch, values, _ = synthetic_batch(n_responses, margins, K=3, seed=4)
    _, labels = with_score_labels(batch)
    index = labels[0]
    # Scores 3 > 1 > 2 for record 0 (pairs (0,1) right, (0,2) right, (1,2) wrong); record 1 is filler.
    for row, score in ((0, 3.0), (2, 1.0), (4, 2.0)):
        values[row, index[row]] = score
    sums = ranked_sums(values, (*labels, torch.tensor([True, False])))
    pairs, correct, hi, lo, record_loss, records = sums.tolist()
    assert (pairs, correct, records) == (3, 2, 1)
    assert hi == pytest.approx(3 + 3 + 1) and lo == pytest.approx(1 + 2 + 2)
    expected = (F.softplus(torch.tensor(-2.0)) + F.softplus(torch.tensor(-1.0)) + F.softplus(torch.tensor(1.0))) / 3
    assert record_loss == pytest.approx(float(expected))
    # The pairwise eval sums have the same layout: a pair is one record.
    pair_batch, pair_values, _ = synthetic_batch([2, 2], [0.0, 0.0], K=2, seed=5)
    _, pair_labels = with_score_labels(pair_batch)
    p = pair_sums(pair_values, (*pair_labels, torch.tensor([True, True])))
    assert p.shape == (6,) and p[0] == p[5] == 2


# ---------------------------------------------------------------------------------------------
# A real 2-stage RM on CPU, trained on a toy ranking: the more often the marker word appears in a
# response (fixed word count), the better it is.

MARKER = "gladly"
WORDS = ("river", "mountain", "apple", "music", "garden", "window", "yellow", "simple", "quiet", "market", "teacher",
         "morning", "paper", "story")
ANSWER_WORDS = 6


def answer(rng: random.Random, markers: int) -> str:
    words = [MARKER] * markers + [rng.choice(WORDS) for _ in range(ANSWER_WORDS - markers)]
    rng.shuffle(words)
    return " ".join(words) + "."


def toy_records(n: int, seed: int, mixed: bool) -> list[dict]:
    """Rankings of 3 or 4 responses (marker counts from 0..4, best first); with ``mixed`` every third
    record is a pairwise one (so batches mix K = 2 records, fillers and rankings)."""
    rng = random.Random(seed)
    out = []
    for r in range(n):
        prompt = "Tell me about " + " ".join(rng.sample(WORDS, 2)) + "."
        if mixed and r % 3 == 2:
            hi, lo = sorted(rng.sample(range(5), 2), reverse=True)
            out.append({"type": "pairwise", "prompt": prompt, "chosen": answer(rng, hi), "rejected": answer(rng, lo)})
            continue
        counts = sorted(rng.sample(range(5), rng.choice((3, 4))), reverse=True)
        responses = [answer(rng, c) for c in counts]
        if len(set(responses)) == len(responses):
            out.append({"type": "ranked", "prompt": prompt, "responses": responses})
    return out


@pytest.mark.multirank
def test_rm_trained_on_rankings_orders_held_out_responses(tiny_hf, tmp_path):
    """One launch: 2 pipeline stages, pairwise + ranked training records, held-out rankings of 4 and 3
    scored after training (pair accuracy; chance is 0.5) and at the first eval (it must improve)."""
    pp = hg_to_pp(tiny_hf("llama", False), tmp_path / "sft-pp", progress=False)
    train = toy_records(240, 1, mixed=True)
    assert {"pairwise", "ranked"} == {r["type"] for r in train} and {3, 4} <= {len(r.get("responses", ())) for r in train}
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in train) + "\n")
    (tmp_path / "eval.jsonl").write_text("\n".join(json.dumps(r) for r in toy_records(40, 2, mixed=False)) + "\n")
    config = {
        "stage": "rm", "model_path": str(pp), "save_path": str(tmp_path / "rm"),
        "data_path": str(tmp_path / "train.jsonl"), "eval_data_path": str(tmp_path / "eval.jsonl"),
        "max_seq_len": 64, "n_epochs": 2, "seed": 3, "eval_interval": 20, "resume": "never",
        "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [2, 1]}, "parts": [3, 4]},
        "train_batch_size": 8, "train_micro_batch_size_per_gpu": 4, "steps_per_print": 10**6,
        "optimizer": {"type": "AdamW", "params": {"lr": 2e-3, "weight_decay": 0.0, "torch_adam": True}},
    }
    (tmp_path / "rm.json").write_text(json.dumps(config))
    start = time.perf_counter()
    launch_ranks("train_ds.py", "--config", tmp_path / "rm.json", timeout=900)
    print(f"ranked RM launch: {time.perf_counter() - start:.1f} s")
    save = tmp_path / "rm"
    state = json.loads((save / (save / "latest").read_text() / "trainer_state.json").read_text())
    first, final = state["evals"][0][1], state["evals"][-1][1]
    assert state["step"] == 2 * (len(train) // 8)  # every record fits max_seq_len (none dropped)
    assert final["accuracy"] >= 0.85, state["evals"]  # of the held-out ordered pairs; chance is 0.5
    assert final["chosen_score"] > final["rejected_score"] and final["loss"] < first["loss"], state["evals"]
