"""The pad token: Llama-3-style tokenizers (no pad, no unk) build datasets, the pad is never EOS, an
explicit choice is honoured, and a tokenizer with nothing safe to pad with is a clear error."""
import copy
import subprocess
import sys

import pytest
import torch
from data_fixtures import LLAMA3_EOS, LLAMA3_RESERVED, MIXED, ROOT, llama3_style_tokenizer, load_tokenizer, write_json

from data.batching import collate_pairs
from data.dataset import build_dataset
from data.errors import DataError, TokenizerError
from data.tokenize import choose_pad, pad_token_id

T = 96


def hf_sequence_classification_index(ids, pad_id):
    """Where HF *ForSequenceClassification reads the score: the last token that is not pad_token_id."""
    positions = torch.arange(ids.shape[-1])
    return (positions * (ids != pad_id)).argmax(-1)


def test_llama3_style_tokenizer_pads_with_a_reserved_token():
    tok = llama3_style_tokenizer()
    assert tok.pad_token is None and tok.unk_token is None
    reserved = tok.convert_tokens_to_ids(LLAMA3_RESERVED[0])
    for pack in (False, True):
        built = build_dataset(MIXED, tok, T, pack=pack)
        assert built.stats["pad"] == {"id": reserved, "token": LLAMA3_RESERVED[0], "source": "spare_special"}
        for i in range(len(built.train)):
            (ids, mask, *_), labels = built.train[i]
            n = int(mask.sum())
            assert (ids[n:] == reserved).all() and (labels[n:] == -100).all()  # pads are masked out of the loss
            assert (labels[mask.bool()] != reserved).all()
    pairs = build_dataset(MIXED, tok, T, kind="pairwise")
    (ids, mask), _, _ = collate_pairs([pairs.train[i] for i in range(len(pairs.train))])
    last = mask.sum(-1) - 1
    assert (ids[torch.arange(len(ids)), last] == tok.eos_token_id).all()  # every scored row ends with EOS
    assert torch.equal(hf_sequence_classification_index(ids, reserved), last)  # HF would score the same token
    ids, mask = build_dataset(MIXED, tok, 48, kind="prompt").train[0]
    assert (ids[~mask.bool()] == reserved).all() and ids[mask.bool()][0] == tok.bos_token_id  # left padding


def test_pad_is_never_eos():
    tok = copy.deepcopy(llama3_style_tokenizer())
    tok.pad_token = LLAMA3_EOS  # what many fine-tuned Llama-3 tokenizers ship
    assert tok.pad_token_id == tok.eos_token_id
    assert choose_pad(tok).token == LLAMA3_RESERVED[0]


def test_without_a_spare_token_bos_pads():
    tok = llama3_style_tokenizer(reserved=False)
    choice = choose_pad(tok)
    assert (choice.id, choice.source) == (tok.bos_token_id, "bos_token") and choice.id != tok.eos_token_id
    pairs = build_dataset(MIXED, tok, T, kind="pairwise")
    (ids, mask), _, _ = collate_pairs([pairs.train[i] for i in range(len(pairs.train))])
    # BOS is only ever a row's first token, so the last non-pad token is still the answer's EOS.
    assert torch.equal(hf_sequence_classification_index(ids, choice.id), mask.sum(-1) - 1)


def test_explicit_pad_token():
    tok = llama3_style_tokenizer()
    second = tok.convert_tokens_to_ids(LLAMA3_RESERVED[1])
    for choice in (LLAMA3_RESERVED[1], second):
        built = build_dataset(MIXED, tok, T, pad_token=choice)
        assert built.stats["pad"] == {"id": second, "token": LLAMA3_RESERVED[1], "source": "explicit"}
        (ids, mask), _ = built.train[0]
        assert (ids[~mask.bool()] == second).all()
    assert pad_token_id(load_tokenizer("llama"), "<s>") == 1


def test_bad_pad_choices_are_clear_errors():
    tok = llama3_style_tokenizer()
    with pytest.raises(TokenizerError, match="is the EOS token: pads must differ from EOS"):
        build_dataset(MIXED, tok, T, pad_token=LLAMA3_EOS)
    with pytest.raises(TokenizerError, match="'<nope>' is not a token of tokenizer"):
        build_dataset(MIXED, tok, T, pad_token="<nope>")
    with pytest.raises(TokenizerError, match=r"pad_token 100000: not a token id .*ids 0\.\.599"):
        build_dataset(MIXED, tok, T, pad_token=100000)
    nothing = llama3_style_tokenizer(reserved=False, bos=LLAMA3_EOS)  # BOS == EOS, no pad, no unk, no spare token
    with pytest.raises(TokenizerError, match='no pad token, no unk token, no spare .* set "pad_token"') as e:
        build_dataset(MIXED, nothing, T)
    assert isinstance(e.value, DataError) and e.value.lines == [str(e.value)]  # reported like data errors


def test_cli_without_a_safe_pad_is_an_error_not_a_traceback(tmp_path):
    nothing = llama3_style_tokenizer(reserved=False, bos=LLAMA3_EOS)
    nothing.save_pretrained(tmp_path / "tok")
    cmd = [sys.executable, "-m", "data.inspect", MIXED, "--tokenizer-path", str(tmp_path / "tok")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: tokenizer ") and 'set "pad_token"' in proc.stderr
    word = nothing.convert_ids_to_tokens(300)
    ok = subprocess.run(cmd + ["--pad-token", word], cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert f"pad: {word!r} (id 300, explicit)" in ok.stdout


def test_pad_choice_is_in_the_cache_key(tmp_path):
    tok = llama3_style_tokenizer()
    path = write_json(tmp_path / "d.json", [{"type": "pretrain", "text": "one"}])
    keys = {build_dataset(path, tok, T, cache_dir=str(tmp_path / "c"), pad_token=p).stats["cache"]["key"]
            for p in (None, LLAMA3_RESERVED[1])}
    assert len(keys) == 2
