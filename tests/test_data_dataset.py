"""build_dataset: item shapes, padding, length policy, kinds, strict/skip, splits and the cache."""
import os

import numpy as np
import pytest
import torch
from data_fixtures import MIXED, load_tokenizer, tok, write_json  # noqa: F401

from data import cache as cache_mod
from data.batching import collate_pairs
from data.dataset import build_dataset
from data.errors import DataError
from data.split import eval_split, split_shares
from data.tokenize import pad_token_id

T = 96


def test_lm_items_fixed_shape_and_padding(tok):
    built = build_dataset(MIXED, tok, T)
    pad = pad_token_id(tok)
    assert pad == (3 if tok.pad_token_id == 3 else tok.unk_token_id) and pad != tok.eos_token_id
    assert built.eval is None and len(built.train) == 34  # 39 records - 5 prompt records
    for i in range(len(built.train)):
        (ids, mask), labels = built.train[i]
        assert ids.shape == mask.shape == labels.shape == (T,)
        assert ids.dtype == mask.dtype == labels.dtype == torch.int64
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()  # right padding
        assert (ids[n:] == pad).all() and (labels[n:] == -100).all()
        trained = labels != -100
        assert (labels[trained] == ids[trained]).all() and trained.any() and not trained[0]
    batch = torch.utils.data.default_collate([built.train[i] for i in range(4)])
    assert batch[0][0].shape == (4, T) and batch[1].shape == (4, T)


def test_stats_counts(tok):
    built = build_dataset(MIXED, tok, T)
    st = built.stats
    assert st["records"] == 39
    assert st["types"] == {"pretrain": 6, "instruct": 8, "conversation": 8, "ref_qa": 6, "pairwise": 6, "prompt": 5}
    tr = st["train"]
    assert tr["types"] == {"pretrain": 6, "instruct": 8, "conversation": 8, "ref_qa": 6, "pairwise": 6}
    assert tr["unused"] == {"prompt": 5} and st["invalid"] == {}
    assert tr["real_tokens"] == sum(int(mask.sum()) for (_, mask), _ in built.train)
    assert tr["target_tokens"] == sum(int((labels != -100).sum()) for _, labels in built.train)
    assert tr["computed_tokens"] == tr["rows"] * T


def long_records():
    return [{"type": "instruct", "instruct": "word " * 40, "output": "short answer"},  # answer cut off entirely
            {"type": "instruct", "instruct": "Say it.", "output": "many words " * 30},  # truncated, answer kept
            {"type": "pretrain", "text": "tiny"}]


def test_truncate_policy(tmp_path):
    tok = load_tokenizer("bloom")
    built = build_dataset(write_json(tmp_path / "d.json", long_records()), tok, 32)
    tr = built.stats["train"]
    assert tr["dropped"] == {"no_target_tokens": 1} and tr["truncated"] == 1 and len(built.train) == 2
    (ids, mask), labels = built.train[0]
    assert mask.all() and labels[-1] != -100  # truncated on the right, still trained to the end
    assert tok.eos_token_id not in ids.tolist()  # its EOS was cut off


def test_drop_policy(tmp_path):
    built = build_dataset(write_json(tmp_path / "d.json", long_records()), load_tokenizer("llama"), 32,
                          overflow="drop")
    assert built.stats["train"]["dropped"] == {"too_long": 2} and built.stats["train"]["truncated"] == 0
    assert len(built.train) == 1


def test_pairwise_items_and_collate(tok):
    built = build_dataset(MIXED, tok, T, kind="pairwise")
    assert len(built.train) == 6
    (ids, mask), labels, margin = built.train[0]
    assert ids.shape == mask.shape == labels.shape == (2, T)
    assert margin.dtype == torch.float32 and margin.item() == 0.0  # no margin field: 0
    chosen = tok.decode(labels[0][labels[0] != -100].tolist())
    rejected = tok.decode(labels[1][labels[1] != -100].tolist())
    assert chosen == "The capital of France is Paris." + tok.eos_token
    assert rejected == "France is a country in Europe." + tok.eos_token
    last = mask.sum(-1) - 1  # reward is read at the last real token: EOS
    assert ids[0, last[0]] == ids[1, last[1]] == tok.eos_token_id
    (bids, bmask), blabels, bmargins = collate_pairs([built.train[i] for i in range(3)])
    assert bids.shape == (6, T) and bmargins.shape == (3,)
    for i in range(3):  # chosen rows first, then rejected rows, same pair order
        assert torch.equal(bids[i], built.train[i][0][0][0]) and torch.equal(bids[3 + i], built.train[i][0][0][1])
        assert torch.equal(blabels[3 + i], built.train[i][1][1])


def test_prompt_items_left_padded(tok):
    built = build_dataset(MIXED, tok, 48, kind="prompt")
    assert len(built.train) == 11 and built.stats["train"]["types"] == {"pairwise": 6, "prompt": 5}
    ids, mask = built.train[0]
    n = int(mask.sum())
    assert not mask[:48 - n].any() and mask[48 - n:].all()
    text = tok.decode(ids[mask.bool()].tolist(), skip_special_tokens=True)
    assert text.endswith("What is the capital of France?\n\nAssistant:\n")


def test_prompt_truncation_keeps_tail_and_bos(tmp_path):
    tok = load_tokenizer("llama")
    path = write_json(tmp_path / "p.json", [{"type": "prompt", "prompt": "word " * 50 + "END"}])
    built = build_dataset(path, tok, 16, kind="prompt")
    ids, mask = built.train[0]
    assert mask.all() and ids[0] == tok.bos_token_id and built.stats["train"]["truncated"] == 1
    assert tok.decode(ids[1:].tolist()).endswith("END\n\nAssistant:\n")


def bad_mixed(tmp_path):
    return write_json(tmp_path / "bad.json", [{"type": "pretrain", "text": "ok"}, {"type": "pretrain"},
                                              {"type": "instruct", "instruct": "a", "output": "b</s>"}])


def test_strict_raises_with_every_problem(tmp_path):
    path = bad_mixed(tmp_path)
    with pytest.raises(DataError) as e:
        build_dataset(path, load_tokenizer("bloom"), T)
    assert e.value.lines == [f"{path}: record 1: field 'text': missing (required for type 'pretrain')",
                             f"{path}: record 2: field 'output': contains the special token text '</s>', which the "
                             "tokenizer would turn into a control token; remove or escape it"]


def test_skip_mode_counts(tmp_path):
    built = build_dataset(bad_mixed(tmp_path), load_tokenizer("bloom"), T, strict=False)
    assert built.stats["invalid"] == {"missing_field": 1, "special_token": 1}
    assert len(built.train) == 1


def test_splits_disjoint_and_deterministic():
    shares = split_shares(100, "2,4,4", seed=7)
    assert [len(s) for s in shares] == [20, 40, 40]
    assert sorted(np.concatenate(shares).tolist()) == list(range(100))
    assert all(np.array_equal(a, b) for a, b in zip(shares, split_shares(100, [2, 4, 4], seed=7)))
    assert not np.array_equal(shares[0], split_shares(100, "2,4,4", seed=8)[0])
    tr, ev = eval_split(shares[1], 0.1, seed=7)
    assert len(ev) == 4 and set(tr) | set(ev) == set(shares[1]) and not set(tr) & set(ev)
    with pytest.raises(ValueError, match="use comma-separated numbers"):
        split_shares(10, "2;4", 0)


def test_eval_fraction_and_data_split_in_builder(tok):
    full = build_dataset(MIXED, tok, T, eval_fraction=0.2, seed=3)
    st = full.stats
    assert st["train"]["types"] and st["eval"]["rows"] == len(full.eval) > 0
    used = sum(st[s]["samples"] + sum(st[s]["unused"].values()) for s in ("train", "eval"))
    assert used == 39  # every record lands in exactly one split
    parts = [build_dataset(MIXED, tok, T, data_split="2,4,4", split_index=i, seed=3).stats for i in range(3)]
    assert [p["data_split"]["records"] for p in parts] == [8, 15, 16]


def test_eval_paths(tmp_path, tok):
    ev = write_json(tmp_path / "ev.json", [{"type": "pretrain", "text": "hello"}])
    built = build_dataset(MIXED, tok, T, eval_paths=ev)
    assert len(built.eval) == 1 and len(built.train) == 34


def test_cache_reuse(tmp_path, monkeypatch):
    tok = load_tokenizer("llama")
    cache_dir = str(tmp_path / "cache")
    first = build_dataset(MIXED, tok, T, pack=True, cache_dir=cache_dir)
    assert first.stats["cache"]["hit"] is False and os.path.exists(first.stats["cache"]["path"])

    def no_tokenizing(*a, **k):
        raise AssertionError("re-tokenized despite a cache hit")
    monkeypatch.setattr("data.dataset.tokenize_records", no_tokenizing)
    second = build_dataset(MIXED, tok, T, pack=True, cache_dir=cache_dir)
    assert second.stats["cache"] == dict(first.stats["cache"], hit=True)
    assert len(second.train) == len(first.train)
    for i in range(len(first.train)):
        a, b = first.train[i], second.train[i]
        assert all(torch.equal(x, y) for x, y in zip(a[0] + (a[1],), b[0] + (b[1],)))
    # a different key (max_seq_len, packing, tokenizer, data) needs a rebuild
    keys = {first.stats["cache"]["key"]}
    monkeypatch.undo()
    for kw in (dict(max_seq_len=64, pack=True), dict(max_seq_len=T, pack=False)):
        keys.add(build_dataset(MIXED, tok, cache_dir=cache_dir, **kw).stats["cache"]["key"])
    keys.add(build_dataset(MIXED, load_tokenizer("bloom"), T, pack=True, cache_dir=cache_dir).stats["cache"]["key"])
    assert len(keys) == 4


def test_cache_key_follows_file_content(tmp_path):
    tok = load_tokenizer("bloom")
    path = write_json(tmp_path / "d.json", [{"type": "pretrain", "text": "one"}])
    a = build_dataset(path, tok, T, cache_dir=str(tmp_path / "c")).stats["cache"]
    write_json(tmp_path / "d.json", [{"type": "pretrain", "text": "two"}])
    b = build_dataset(path, tok, T, cache_dir=str(tmp_path / "c")).stats["cache"]
    assert a["key"] != b["key"] and not b["hit"]


def test_cache_lock_one_builder(tmp_path):
    """Two processes race for the same key: one builds, the other waits and loads the file."""
    import multiprocessing as mp
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_race, args=(str(tmp_path), q)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    results = sorted(q.get(timeout=5) for _ in procs)
    assert results == [(False, 42), (True, 42)]


def _race(cache_dir, q):
    import time

    def build():
        time.sleep(0.5)  # long enough for the other process to hit the lock
        return {"x": 42}
    payload, hit = cache_mod.load_or_build(cache_dir, "k", build)
    q.put((hit, payload["x"]))


def test_nothing_to_train_on_is_an_error(tmp_path):
    """One message (a DataMessage: the entry points print it as one line, exit status 2) that says what was
    not used and, when records were dropped as too long, that max_seq_len is what to raise."""
    from data.errors import DataMessage, NoSamplesError

    path = write_json(tmp_path / "p.json", [{"type": "prompt", "prompt": "hi"}])
    with pytest.raises(NoSamplesError, match=r"no lm samples left to train on .*'prompt': 1") as e:
        build_dataset(path, load_tokenizer("bloom"), T)
    assert isinstance(e.value, DataMessage) and isinstance(e.value, ValueError) and "max_seq_len 96" not in str(e.value)
    long = write_json(tmp_path / "long.json", [{"type": "pretrain", "text": "word " * 400}])
    with pytest.raises(NoSamplesError, match=r"dropped: \{'too_long': 1\}\); 1 record\(s\) do not fit max_seq_len 96 "
                       r"tokens \(overflow \"drop\"\): raise max_seq_len"):
        build_dataset(long, load_tokenizer("bloom"), T, overflow="drop")


def test_cache_key_covers_the_data_building_code(tmp_path, monkeypatch):
    """Editing how data is rendered/tokenized/cut must not reuse a cache built by the old code."""
    tok = load_tokenizer("bloom")
    path = write_json(tmp_path / "d.json", [{"type": "pretrain", "text": "one"}])
    first = build_dataset(path, tok, T, cache_dir=str(tmp_path / "c")).stats["cache"]
    monkeypatch.setattr(cache_mod, "data_code_version", lambda: "edited")
    second = build_dataset(path, tok, T, cache_dir=str(tmp_path / "c")).stats["cache"]
    assert second["key"] != first["key"] and not second["hit"]


def test_data_code_version_follows_the_source(tmp_path):
    import shutil

    src = os.path.dirname(cache_mod.__file__)
    code = tmp_path / "data"
    shutil.copytree(src, code, ignore=shutil.ignore_patterns("__pycache__", "samples"))
    before = cache_mod.data_code_version(str(code))
    assert before == cache_mod.data_code_version(src) == cache_mod.data_code_version()
    (code / "inspect.py").write_text((code / "inspect.py").read_text() + "\n# the CLI only\n")
    assert cache_mod.data_code_version.__wrapped__(str(code)) == before  # not part of a built dataset
    (code / "tokenize.py").write_text((code / "tokenize.py").read_text() + "\n# changed\n")
    assert cache_mod.data_code_version.__wrapped__(str(code)) != before


def test_builds_without_hashlib_file_digest(tmp_path, monkeypatch):
    """setup.py allows Python 3.10, which has no hashlib.file_digest (3.11)."""
    import hashlib

    from data.hashing import file_sha256

    monkeypatch.delattr(hashlib, "file_digest", raising=False)
    path = write_json(tmp_path / "d.json", [{"type": "pretrain", "text": "x" * 1_500_000}])
    built = build_dataset(path, load_tokenizer("bloom"), T, cache_dir=str(tmp_path / "c"))
    assert built.stats["cache"]["hit"] is False
    with open(path, "rb") as fh:
        assert file_sha256(path) == hashlib.sha256(fh.read()).hexdigest()
