"""Fast in-process tests of global batches (data-parallel slicing, epochs, resume, eval padding) and of
the global-token-mean loss (HF Trainer's num_items_in_batch semantics), with DeepSpeed's averaging simulated by hand."""
import pytest
import torch
import torch.nn.functional as F

from trainer.batches import GlobalBatches, eval_batches, n_target_tokens, with_normaliser
from trainer.losses import global_token_mean_loss, shifted_token_losses


def causal_lm_loss(logits, labels):
    """Reference: HF's per-micro-batch loss, the mean cross-entropy over its target tokens."""
    total, count = shifted_token_losses(logits, labels[0] if isinstance(labels, (tuple, list)) else labels)
    return total / count

T = 8  # tokens per row


def make_dataset(n: int, seed: int = 0) -> list:
    """n rows ((input_ids[T], attention_mask[T]), labels[T]), int64. input_ids[0] = 1000 + row (the row's id);
    row i has 2 + i % 5 real tokens and 1 + i % 4 of them (at most) as targets, the rest -100."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(3, 50, (T,), generator=g, dtype=torch.int64)
        ids[0] = 1000 + i
        real = 2 + i % 5
        mask = torch.zeros(T, dtype=torch.int64)
        mask[:real] = 1
        labels = torch.full((T,), -100, dtype=torch.int64)
        n_targets = min(1 + i % 4, real - 1)
        labels[real - n_targets:real] = ids[real - n_targets:real]
        rows.append(((ids, mask), labels))
    return rows


def row_ids(micro_batches) -> list[int]:
    return [int(x) - 1000 for inputs, _ in micro_batches for x in inputs[0][:, 0]]


def targets_of(dataset, ids) -> int:
    return sum(int((dataset[i][1][1:] != -100).sum()) for i in ids)


def test_n_target_tokens_after_shift():
    labels = torch.tensor([[5, 6, -100, 7], [-100, -100, 8, -100]])
    assert n_target_tokens(labels) == 3  # position 0 predicts nothing: the 5 is not a target
    assert n_target_tokens(torch.tensor([4, -100, 9])) == 1


def test_two_ranks_cover_one_contiguous_slice_of_the_global_order():
    data = make_dataset(26)
    micro, accum, dp = 2, 3, 2
    ranks = [GlobalBatches(data, micro, accum, r, dp, seed=5) for r in range(dp)]
    assert [b.steps_per_epoch for b in ranks] == [2, 2]  # 13 rows per rank // 6 per step
    order = ranks[0].sampler.global_order(0)
    assert sorted(order.tolist()) == list(range(26))
    for step in range(2):
        outs = [b.next_step() for b in ranks]
        ids = [row_ids(o[0]) for o in outs]
        for (mb, _, _) in outs:
            assert len(mb) == accum
            assert all(inputs[0].shape == (micro, T) and inputs[1].shape == (micro, T) and labels.shape == (micro, T)
                       for inputs, labels in mb)
            assert all(inputs[0].dtype == torch.int64 and labels.dtype == torch.int64 for inputs, labels in mb)
        assert not set(ids[0]) & set(ids[1])
        expected = order[step * 12:(step + 1) * 12]
        assert sorted(ids[0] + ids[1]) == sorted(expected.tolist())
        assert ids[0] == expected[0::2].tolist() and ids[1] == expected[1::2].tolist()
        # N_global: the same on both ranks, the shifted targets of both ranks' rows.
        n_globals = [o[1] for o in outs]
        assert n_globals[0] == n_globals[1] == targets_of(data, ids[0] + ids[1])
        assert n_globals[0] > 0
        # Real tokens: attention-mask ones of the whole global batch.
        assert outs[0][2] == outs[1][2] == sum(2 + i % 5 for i in ids[0] + ids[1])
        # Labels travel with their inputs.
        for mb, _, _ in outs:
            for inputs, labels in mb:
                for row in range(micro):
                    i = int(inputs[0][row, 0]) - 1000
                    assert torch.equal(inputs[0][row], data[i][0][0]) and torch.equal(labels[row], data[i][1])


def test_epoch_rollover_skips_remainder_and_reshuffles():
    data = make_dataset(30)  # 15 rows per rank; steps of 4 per rank -> 3 steps, remainder 3 per rank skipped
    b = GlobalBatches(data, 2, 2, 0, 2, seed=11)
    other = GlobalBatches(data, 2, 2, 1, 2, seed=11)
    assert b.steps_per_epoch == 3
    epoch0 = []
    for _ in range(3):
        epoch0 += row_ids(b.next_step()[0]) + row_ids(other.next_step()[0])
        assert b.epoch == 0
    order0 = b.sampler.global_order(0)
    assert sorted(epoch0) == sorted(order0[:24].tolist())
    assert not set(epoch0) & set(order0[24:].tolist())  # the remainder was skipped, not served
    first1 = row_ids(b.next_step()[0]) + row_ids(other.next_step()[0])
    assert b.epoch == other.epoch == 1
    order1 = b.sampler.global_order(1)
    assert sorted(first1) == sorted(order1[:8].tolist())
    assert order1.tolist() != order0.tolist()
    assert first1 != epoch0[:8]
    assert b.sampler.position == 4


def test_state_dict_resumes_mid_epoch_exactly():
    data = make_dataset(30)
    b = GlobalBatches(data, 2, 2, 1, 2, seed=3)
    b.next_step()
    b.next_step()
    state = b.state_dict()
    assert (state["epoch"], state["global_position"]) == (0, 16)
    rest = [b.next_step() for _ in range(4)]  # the last step of epoch 0 and three of epoch 1
    fresh = GlobalBatches(data, 2, 2, 1, 2, seed=3)
    fresh.load_state_dict(state)
    again = [fresh.next_step() for _ in range(4)]
    for (mb_a, n_a, tok_a), (mb_b, n_b, tok_b) in zip(rest, again):
        assert (n_a, tok_a) == (n_b, tok_b)
        assert len(mb_a) == len(mb_b)
        for (in_a, lab_a), (in_b, lab_b) in zip(mb_a, mb_b):
            assert all(torch.equal(x, y) for x, y in zip(in_a, in_b)) and torch.equal(lab_a, lab_b)
    assert fresh.epoch == b.epoch == 1
    with pytest.raises(ValueError, match="sampler state has seed=3 but this sampler has 4"):
        GlobalBatches(data, 2, 2, 1, 2, seed=4).load_state_dict(state)


def test_too_small_dataset_says_how_to_fix():
    with pytest.raises(ValueError) as info:
        GlobalBatches(make_dataset(7), 2, 2, 0, 2, seed=0)
    assert str(info.value) == ("the training data has 7 rows, fewer than one global batch (8 = micro batch 2 x grad accum 2 x "
                               "data-parallel 2): add data or lower train_batch_size")
    assert GlobalBatches(make_dataset(8), 2, 2, 0, 2, seed=0).steps_per_epoch == 1


def test_eval_batches_cover_rows_once_and_pad_with_no_targets():
    data = make_dataset(11)
    micro, accum, dp = 2, 1, 2  # 4 rows per global batch: 3 batches, the last with 3 real rows + 1 padding row
    feeds = [list(eval_batches(data, micro, accum, r, dp)) for r in range(dp)]
    assert [len(f) for f in feeds] == [3, 3]
    seen = []
    for step in range(3):
        real_ids = []
        for r in range(dp):
            mb, n_global = feeds[r][step]
            assert len(mb) == accum
            for inputs, labels in mb:
                assert inputs[0].shape == (micro, T)
                for row in range(micro):
                    i = int(inputs[0][row, 0]) - 1000
                    if (labels[row] == -100).all():  # padding: a copy of row 0 without targets
                        assert i == 0 and torch.equal(inputs[0][row], data[0][0][0])
                    else:
                        assert torch.equal(labels[row], data[i][1])
                        real_ids.append(i)
        assert feeds[0][step][1] == feeds[1][step][1] == targets_of(data, real_ids)
        seen += real_ids
    assert sorted(seen) == list(range(11))  # every eval row once (row 0 is never all -100 here)
    last_rows = [int(x) - 1000 for r in range(dp) for inputs, _ in feeds[r][2][0] for x in inputs[0][:, 0]]
    assert sorted(last_rows) == [0, 8, 9, 10]
    assert sum(n for _, n in feeds[0]) == targets_of(data, range(11))


def test_with_normaliser_scale():
    mb = [((torch.zeros(1, T, dtype=torch.int64),), torch.zeros(1, T, dtype=torch.int64))] * 3
    out = list(with_normaliser(mb, 40, 6.0))
    assert len(out) == 3
    for inputs, (labels, scale) in out:
        assert scale.dtype == torch.float64 and scale.item() == 6.0 / 40
    assert list(with_normaliser(mb, 0, 6.0))[0][1][1].item() == 6.0  # no targets: no division by zero


# ---------------------------------------------------------------------------------------------- loss

V = 13


def _micro(n_targets_per_row: list[int], good: bool, g: torch.Generator):
    """A micro-batch whose rows have the given numbers of targets; logits favour the targets (good)
    or not, so per-token losses differ systematically between micro-batches."""
    B = len(n_targets_per_row)
    labels = torch.full((B, T), -100, dtype=torch.int64)
    for b, k in enumerate(n_targets_per_row):
        labels[b, T - k:] = torch.randint(0, V, (k,), generator=g)
    logits = torch.randn(B, T, V, generator=g)
    tgt = labels[:, 1:].clamp(min=0)
    logits[:, :-1].scatter_add_(-1, tgt.unsqueeze(-1), torch.full(tgt.unsqueeze(-1).shape, 4.0 if good else -2.0))
    return logits, labels


def _ranks():
    """D=2 ranks x grad_accum=3 micro-batches of 2 rows with very different target counts: many
    well-predicted targets in some micro-batches, a single badly predicted one in others."""
    g = torch.Generator().manual_seed(0)
    spec = [[([7, 7], True), ([1, 0], False), ([6, 7], True)],
            [([0, 1], False), ([7, 5], True), ([1, 1], False)]]
    return [[_micro(n, good, g) for n, good in rank] for rank in spec]


def _reference(ranks):
    logits = torch.cat([lg[:, :-1].reshape(-1, V) for rank in ranks for lg, _ in rank])
    labels = torch.cat([lb[:, 1:].reshape(-1) for rank in ranks for _, lb in rank])
    return F.cross_entropy(logits, labels, ignore_index=-100)  # mean over all target tokens of the global batch


def test_global_token_mean_equals_deepspeed_averaging_of_scaled_losses():
    ranks = _ranks()
    accum, dp = 3, 2
    n_global = sum(n_target_tokens(lb) for rank in ranks for _, lb in rank)
    assert n_global == 14 + 1 + 13 + 1 + 12 + 2  # targets sit after position 0, so the shift drops none
    ds_loss = torch.zeros((), dtype=torch.float32)
    for rank in ranks:
        fed = list(with_normaliser([((lg,), lb) for lg, lb in rank], n_global, float(accum * dp)))
        # DeepSpeed: the engine's loss is the mean over micro-batches, then the mean over DP ranks.
        ds_loss += sum(global_token_mean_loss(inputs[0], target) for inputs, target in fed) / accum / dp
    ref = _reference(ranks)
    torch.testing.assert_close(ds_loss, ref)
    # The per-micro-batch mean ("mean of means", HF's per-batch loss) is clearly different.
    mean_of_means = sum(causal_lm_loss(lg, lb) for rank in ranks for lg, lb in rank if n_target_tokens(lb)) / 6
    assert abs(float(mean_of_means) - float(ref)) > 0.5, (float(mean_of_means), float(ref))


def test_global_token_mean_gradients():
    ranks = _ranks()
    accum, dp = 3, 2
    n_global = sum(n_target_tokens(lb) for rank in ranks for _, lb in rank)
    leaves = [[lg.clone().requires_grad_(True) for lg, _ in rank] for rank in ranks]
    ref_leaves = [[lg.clone().requires_grad_(True) for lg, _ in rank] for rank in ranks]
    for r, rank in enumerate(ranks):
        scale = next(with_normaliser([(None, rank[0][1])], n_global, float(accum * dp)))[1][1]
        for m, (_, lb) in enumerate(rank):
            # DeepSpeed: backward of loss / grad_accum per micro-batch; gradients averaged over D ranks.
            (global_token_mean_loss(leaves[r][m], (lb, scale)) / accum / dp).backward()
    _reference([[(lf, lb) for lf, (_, lb) in zip(lr, rank)] for lr, rank in zip(ref_leaves, ranks)]).backward()
    for lr, rr in zip(leaves, ref_leaves):
        for a, b in zip(lr, rr):
            torch.testing.assert_close(a.grad, b.grad)
    # Per-micro-batch means would give the lone target of a 1-token micro-batch a far larger gradient.
    lone = leaves[0][1]
    mb_mean = lone.detach().clone().requires_grad_(True)
    (causal_lm_loss(mb_mean, ranks[0][1][1]) / accum / dp).backward()
    assert mb_mean.grad.abs().sum() > 3 * lone.grad.abs().sum()


def test_global_batches_feed_the_loss_end_to_end():
    """GlobalBatches + with_normaliser + global_token_mean_loss over D=2 ranks: the token mean of the global batch."""
    data = make_dataset(24)
    accum, dp = 3, 2
    vocab = 64  # label ids are < 50; input_ids[0] (row ids >= 1000) only index the table
    table = torch.randn(1100, vocab, generator=torch.Generator().manual_seed(1))  # logits = table[input_ids]
    ranks = [GlobalBatches(data, 2, accum, r, dp, seed=9) for r in range(dp)]
    outs = [b.next_step() for b in ranks]
    ds_loss, all_logits, all_labels = 0.0, [], []
    for mb, n_global, _ in outs:
        for inputs, (labels, scale) in with_normaliser(mb, n_global, float(accum * dp)):
            logits = table[inputs[0]]
            ds_loss += float(global_token_mean_loss(logits, (labels, scale))) / accum / dp
            all_logits.append(logits[:, :-1].reshape(-1, vocab))
            all_labels.append(labels[:, 1:].reshape(-1))
    ref = F.cross_entropy(torch.cat(all_logits), torch.cat(all_labels), ignore_index=-100)
    assert ds_loss == pytest.approx(float(ref), rel=1e-5)


def test_causal_lm_loss_accepts_label_tuple():
    g = torch.Generator().manual_seed(2)
    logits, labels = _micro([3, 5], True, g)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(causal_lm_loss(logits, labels), expected)
    torch.testing.assert_close(causal_lm_loss(logits, (labels, torch.tensor(1.0))), expected)
    # global_token_mean_loss with scale 1/N is the same mean.
    n = n_target_tokens(labels)
    torch.testing.assert_close(global_token_mean_loss(logits, (labels, torch.tensor(1.0 / n, dtype=torch.float64))), expected)


def test_cuda_arch_list_suffixes_are_dropped_for_deepspeed():
    from trainer.engine.distributed import deepspeed_safe_cuda_arch_list

    env = {"TORCH_CUDA_ARCH_LIST": "8.0;9.0a+PTX 10.0f"}
    assert deepspeed_safe_cuda_arch_list(env) == "8.0 9.0+PTX 10.0"
    assert env["TORCH_CUDA_ARCH_LIST"] == "8.0 9.0+PTX 10.0"
    assert deepspeed_safe_cuda_arch_list(env) is None  # already plain: unchanged
    assert deepspeed_safe_cuda_arch_list({}) is None
