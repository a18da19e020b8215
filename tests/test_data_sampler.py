"""ResumableSampler: DP sharding and exact save/restore (2 data-parallel ranks simulated in one process)."""
import pytest
import torch
from torch.utils.data import DataLoader

from data.sampler import ResumableSampler

N, B = 23, 3  # samples, micro-batch size


def loader(rank, state=None, n=N, dp=2, seed=5):
    sampler = ResumableSampler(n, dp_rank=rank, dp_size=dp, seed=seed)
    if state is not None:
        sampler.load_state_dict(state)
    return sampler, DataLoader(torch.arange(n), batch_size=B, sampler=sampler)


def take(dl, k):
    """k batches, continuing across epochs like a repeating loader."""
    out = []
    while len(out) < k:
        for batch in dl:
            out.append(batch.tolist())
            if len(out) == k:
                break
    return out


def test_epoch_shards_are_disjoint_and_reshuffled():
    s0, s1 = ResumableSampler(N, 0, 2, seed=5), ResumableSampler(N, 1, 2, seed=5)
    e0 = list(s0) + list(s1)
    assert len(e0) == 22 and len(set(e0)) == 22  # drop_last: 23 -> 22, no index twice
    assert list(s0) != e0[:11]  # second epoch reshuffled
    assert s0.epoch == 1
    ws = ResumableSampler(N, 1, 2, seed=5, drop_last=False)
    assert len(ws) == 12 and len(list(ws)) == 12


@pytest.mark.parametrize("stop", [1, 3, 4, 5, 9])  # mid-epoch, at the epoch end (11 samples = 3 full + 2), later
def test_save_restore_two_ranks(stop):
    ref = [take(loader(r)[1], 12) for r in range(2)]  # uninterrupted run
    states = []
    for r in range(2):
        sampler, dl = loader(r)
        assert take(dl, stop) == ref[r][:stop]
        states.append(sampler.state_dict())
    assert states[0] == states[1]  # both ranks at the same global position
    resumed = [take(loader(r, states[r])[1], 12 - stop) for r in range(2)]
    assert resumed == [ref[r][stop:] for r in range(2)]


def test_set_epoch_after_restore_keeps_position():
    s, dl = loader(0)
    take(dl, 2)
    st = s.state_dict()
    s2, _ = loader(0, st)
    s2.set_epoch(st["epoch"])
    assert s2.position == 6
    s2.set_epoch(st["epoch"] + 1)
    assert s2.position == 0


def test_resume_with_other_dp_size():
    s0, s1 = ResumableSampler(N, 0, 2, seed=5), ResumableSampler(N, 1, 2, seed=5)
    it0, it1 = iter(s0), iter(s1)
    consumed = [next(it) for _ in range(3) for it in (it0, it1)]  # 6 samples globally
    single = ResumableSampler(N, 0, 1, seed=5)
    single.load_state_dict(s0.state_dict())
    rest = list(single)
    assert sorted(consumed + rest) == sorted(single.global_order(0)[:23].tolist())
    assert rest == single.global_order(0)[6:].tolist()


def test_mismatched_state_is_refused():
    st = ResumableSampler(N, 0, 2, seed=5).state_dict()
    with pytest.raises(ValueError, match="num_samples=23 but this sampler has 24"):
        ResumableSampler(24, 0, 2, seed=5).load_state_dict(st)


def test_explicit_consumed_count():
    s = ResumableSampler(N, 0, 2, seed=5)
    it = iter(s)
    for _ in range(5):
        next(it)  # e.g. a prefetching loader ran ahead
    assert s.state_dict(consumed=2)["global_position"] == 4
