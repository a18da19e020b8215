"""Over-long samples: pairwise and prompt samples lose context from the left (the scored answer keeps
its EOS, the template its headers); pretrain documents can be chunked so every token is trained once."""
import math

import numpy as np
import pytest
import torch
from data_fixtures import llama3_style_tokenizer, load_tokenizer, tok, write_json  # noqa: F401

from data.dataset import build_dataset
from data.records import Record
from data.tokenize import tokenize_records

T = 48
LONG_PROMPT = "Please read this. " + "The river runs past the old mill. " * 12 + "Which answer is better?"
CHOSEN, REJECTED = "The first one, because it is short and clear.", "The second."


def bos_text(tokenizer):
    return tokenizer.bos_token if tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id else ""


def real(tokenizer, ids, mask):
    return tokenizer.decode(ids[mask.bool()].tolist())


def test_long_pairwise_record_keeps_both_answers_and_their_eos(tmp_path, tok):
    path = write_json(tmp_path / "p.json", [{"type": "pairwise", "prompt": LONG_PROMPT, "chosen": CHOSEN,
                                             "rejected": REJECTED}])
    built = build_dataset(path, tok, T, kind="pairwise")
    st = built.stats["train"]
    assert (st["truncated"], st["context_cut"], st["dropped"]) == (1, 1, {})
    (ids, mask), labels, _ = built.train[0]
    last = mask.sum(-1) - 1
    assert ids[0, last[0]] == ids[1, last[1]] == tok.eos_token_id  # the score is read at the answer's EOS
    assert int(mask[0].sum()) == T  # the longer side fills the row
    texts = [real(tok, ids[s], mask[s]) for s in range(2)]
    for side, (text, answer) in enumerate(zip(texts, (CHOSEN, REJECTED))):
        assert tok.decode(labels[side][labels[side] != -100].tolist()) == answer + tok.eos_token  # whole answer
        # The template's structure survives: BOS, the Human header, the end of the prompt, the answer.
        assert text.startswith(bos_text(tok) + "Human:\n") and LONG_PROMPT not in text
        assert text.endswith("Which answer is better?\n\nAssistant:\n" + answer + tok.eos_token)
    assert texts[0].split("\n\nAssistant:\n")[0] == texts[1].split("\n\nAssistant:\n")[0]  # one context for both


def test_oldest_exchanges_are_dropped_whole(tmp_path, tok):
    rounds = [["ask", "Tell me a long story. " * 8], ["ans", "Once upon a time " * 10], ["ask", "Shorter, please?"]]
    path = write_json(tmp_path / "p.json", [{"type": "pairwise", "rounds": rounds, "chosen": CHOSEN, "rejected": "No."},
                                            {"type": "prompt", "rounds": rounds}])
    (ids, mask), _, _ = build_dataset(path, tok, T, kind="pairwise").train[0]
    for s, answer in enumerate((CHOSEN, "No.")):
        assert real(tok, ids[s], mask[s]) == (bos_text(tok) + "Human:\nShorter, please?\n\nAssistant:\n" + answer
                                              + tok.eos_token)
    prompts = build_dataset(path, tok, T, kind="prompt")
    assert prompts.stats["train"]["context_cut"] == 2
    ids, mask = prompts.train[0]
    assert real(tok, ids, mask) == bos_text(tok) + "Human:\nShorter, please?\n\nAssistant:\n"


def test_long_prompt_keeps_its_header_and_generation_prompt(tmp_path):
    for tokenizer in (load_tokenizer("llama"), load_tokenizer("bloom"), llama3_style_tokenizer()):
        path = write_json(tmp_path / "p.json", [{"type": "prompt", "prompt": "很长的问题。" * 20 + "END"}])
        built = build_dataset(path, tokenizer, 24, kind="prompt")
        ids, mask = built.train[0]
        text = real(tokenizer, ids, mask)
        assert text.startswith(bos_text(tokenizer) + "Human:\n") and text.endswith("END\n\nAssistant:\n")
        assert "\ufffd" not in text  # never cut inside one character's byte tokens
        assert built.stats["train"]["context_cut"] == 1 and int(mask.sum()) <= 24


def test_answer_that_cannot_fit_is_dropped_not_cut(tmp_path, tok):
    path = write_json(tmp_path / "p.json", [{"type": "pairwise", "prompt": "Hi", "chosen": "word " * 80, "rejected": "No."},
                                            {"type": "pairwise", "prompt": LONG_PROMPT, "chosen": CHOSEN, "rejected": "No."}])
    built = build_dataset(path, tok, T, kind="pairwise")
    assert built.stats["train"]["dropped"] == {"answer_too_long": 1} and len(built.train) == 1
    with pytest.raises(ValueError, match=r"dropped: \{'too_long': 2\}"):
        build_dataset(path, tok, T, kind="pairwise", overflow="drop")


def test_chunk_trains_every_token_of_a_long_document_once(tmp_path, tok):
    text = " ".join(f"word{i}" for i in range(150)) + " 中文结尾"
    (full, _), = tokenize_records([(Record("pretrain", {"text": text}, "x", 0), "")], tok)[0]
    n = len(full)
    assert n > 3 * T
    built = build_dataset(write_json(tmp_path / "d.json", [{"type": "pretrain", "text": text}]), tok, T,
                          overflow="chunk")
    n_chunks = math.ceil((n - 1) / (T - 1))  # rows overlap by one token: each row's first is not predicted
    assert len(built.train) == n_chunks and built.stats["train"]["chunks"] == n_chunks
    trained = []
    for i in range(n_chunks):
        (ids, mask), labels = built.train[i]
        start = i * (T - 1)
        assert torch.equal(ids[mask.bool()], torch.from_numpy(full[start:start + T].astype(np.int64)))
        trained.append(labels[labels != -100])
    assert torch.equal(torch.cat(trained), torch.from_numpy(full[1:].astype(np.int64)))  # every token once
    assert tok.decode(torch.cat(trained).tolist()).endswith("word149 中文结尾" + tok.eos_token)


def test_chunk_counts_and_other_records(tmp_path, tok):
    text = " ".join(f"word{i}" for i in range(150))
    path = write_json(tmp_path / "d.json", [{"type": "pretrain", "text": text}, {"type": "pretrain", "text": "tiny"},
                                            {"type": "instruct", "instruct": "Say it.", "output": "many words " * 30}])
    truncated = build_dataset(path, tok, T).stats["train"]
    for pack in (False, True):
        built = build_dataset(path, tok, T, overflow="chunk", pack=pack)
        st = built.stats["train"]
        assert st["chunked"] == 1 and st["truncated"] == 1  # the instruct record is truncated as before
        assert st["samples"] == st["chunks"] + 2 and st["types"] == {"pretrain": 2, "instruct": 1}
        assert st["target_tokens"] > truncated["target_tokens"] + 2 * T


def test_chunk_is_a_known_overflow_policy():
    with pytest.raises(ValueError, match="use one of truncate, drop, chunk"):
        build_dataset([], load_tokenizer("bloom"), T, overflow="split")
