"""data.split: DeepSpeed-Chat-style data_split shares (disjoint, covering, seeded, proportional),
their validation, and applying them to lists and record files (the records build_dataset uses)."""
import collections
import itertools

import numpy as np
import pytest
from data_fixtures import MIXED, load_tokenizer, write_json

from data.errors import DataError
from data.split import load_share, parse_data_split, share_of, split_shares


@pytest.mark.parametrize("n, spec", [(100, "2,4,4"), (7, "2,4,4"), (1, "1,1,1"), (0, "2,4,4"), (1001, [1, 0, 3.5]),
                                     (10, "0,0,1"), (13, "1"), (50, "0.2,0.8")])
def test_shares_are_disjoint_cover_the_data_and_are_proportional(n, spec):
    shares = split_shares(n, spec, seed=11)
    weights = np.asarray(parse_data_split(spec))
    assert len(shares) == len(weights)
    every = np.concatenate(shares)
    assert sorted(every.tolist()) == list(range(n))  # disjoint and covering: each index exactly once
    for share, w in zip(shares, weights):
        assert abs(len(share) - w / weights.sum() * n) <= 1.0  # within one record of its proportion
        assert share.dtype == np.int64 and np.all(np.diff(share) > 0)  # sorted, no repeats


def test_same_seed_same_split_other_seed_other_split():
    a = split_shares(200, "2,4,4", seed=5)
    assert all(np.array_equal(x, y) for x, y in zip(a, split_shares(200, [2, 4, 4], seed=5)))  # str == list spec
    assert all(np.array_equal(x, y) for x, y in zip(a, split_shares(200, "1,2,2", seed=5)))  # only proportions count
    b = split_shares(200, "2,4,4", seed=6)
    assert [len(x) for x in a] == [len(x) for x in b] == [40, 80, 80]
    assert not all(np.array_equal(x, y) for x, y in zip(a, b))


def test_shares_are_a_seeded_permutation_not_blocks():
    first = split_shares(1000, "1,1", seed=0)[0]
    assert 200 < int((first < 500).sum()) < 300  # about half of the first share comes from each half of the data


@pytest.mark.parametrize("spec, n_shares, words", [
    ("2;4", None, "use comma-separated numbers"),
    ("2,,4", None, "use comma-separated numbers"),
    ([2, "4"], None, "use comma-separated numbers"),
    ([True, 1], None, "use comma-separated numbers"),
    (5, None, "use comma-separated numbers"),
    ([], None, "has no weights"),
    ("2,4", 3, "has 2 weight(s), expected 3 (one per share), e.g. \"1,1,1\""),
    ("2,4,4,1", 3, "has 4 weight(s), expected 3"),
    ("2,-1,4", None, "must be finite and >= 0 (got -1)"),
    ("2,nan,4", None, "must be finite and >= 0 (got nan)"),
    ([1, float("inf")], None, "must be finite and >= 0 (got inf)"),
    ("0,0,0", None, "the weights are all zero"),
])
def test_bad_specs_are_clear_value_errors(spec, n_shares, words):
    with pytest.raises(ValueError) as err:
        split_shares(10, spec, 0, n_shares=n_shares)
    assert words in str(err.value) and repr(spec) in str(err.value)


def test_bad_record_count_and_split_index():
    with pytest.raises(ValueError, match="number of records must be an int >= 0"):
        split_shares(-1, "1,1", 0)
    with pytest.raises(ValueError, match=r"split_index 3 is out of range for data_split '2,4,4' \(0..2\)"):
        share_of(list("abcdefghij"), "2,4,4", 3, seed=0)


def test_share_of_keeps_order_and_matches_the_indices():
    items = [f"record {i}" for i in range(30)]
    parts = [share_of(items, "2,4,4", i, seed=9) for i in range(3)]
    assert [len(p) for p in parts] == [6, 12, 12]
    for part, index in zip(parts, split_shares(len(items), "2,4,4", seed=9)):
        assert part == [items[i] for i in index]  # original order
    assert sorted(itertools.chain(*parts)) == sorted(items)


def test_load_share_gives_the_records_build_dataset_uses(tmp_path):
    """The helper's share of a file is the share build_dataset trains on: the same records by type."""
    from data.dataset import build_dataset

    tok = load_tokenizer("llama")
    for i in range(3):
        share = load_share(MIXED, "2,4,4", i, seed=3)
        built = build_dataset(MIXED, tok, 256, data_split="2,4,4", split_index=i, seed=3)
        assert len(share) == built.stats["data_split"]["records"]
        assert collections.Counter(r.type for r in share) == built.stats["types"]
    assert [len(load_share(MIXED, "2,4,4", i, seed=3)) for i in range(3)] == [8, 15, 16]
    bad = write_json(tmp_path / "bad.json", [{"type": "pretrain", "text": "ok"}, {"type": "pretrain"}])
    with pytest.raises(DataError, match="record 1: field 'text': missing"):
        load_share(bad, "1,1", 0, seed=0)
    assert sum(len(load_share(bad, "1,1", i, seed=0, strict=False)) for i in range(2)) == 1
