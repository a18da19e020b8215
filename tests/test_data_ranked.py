"""Ranked preference records (InstructGPT's K-wise comparisons): validation lines, the RM dataset
(kind="ranked": K rows per record, fillers, pairwise records as K = 2), the prompt and lm kinds,
left context cuts shared by all responses, and data.inspect."""
import json

import pytest
import torch
from data_fixtures import TOKENIZER_DIRS, load_tokenizer, write_json, write_jsonl

from data.batching import collate_pairs, collate_ranked
from data.dataset import build_dataset
from data.errors import DataError
from data.inspect import main as inspect_main
from data.records import load_records

T = 48
RANKED = {"type": "ranked", "prompt": "Which is best?", "responses": ["Great answer.", "Fine answer.", "Poor.", "No."]}
PAIR = {"type": "pairwise", "prompt": "Pick one.", "chosen": "Yes.", "rejected": "No.", "margin": 1.5}


@pytest.fixture(params=sorted(TOKENIZER_DIRS))
def tok(request):
    """Each shipped tokenizer (LLaMA's SentencePiece with BOS, BLOOM's byte-level BPE without)."""
    return load_tokenizer(request.param)


def real(tokenizer, ids, mask):
    return tokenizer.decode(ids[mask.bool()].tolist())


@pytest.mark.parametrize("record, field, words, reason", [
    ({"type": "ranked", "prompt": "p"}, "responses", "missing (required for type 'ranked'", "missing_field"),
    ({"type": "ranked", "prompt": "p", "responses": "a"}, "responses", "must be a list of answer strings",
     "bad_value"),
    ({"type": "ranked", "prompt": "p", "responses": ["one"]}, "responses", "a ranking needs at least 2",
     "too_few_responses"),
    ({"type": "ranked", "prompt": "p", "responses": []}, "responses", "has 0 answer(s)", "too_few_responses"),
    ({"type": "ranked", "prompt": "p", "responses": ["a", "b", " a "]}, "responses[2]", "repeats responses[0]",
     "duplicate_response"),
    ({"type": "ranked", "prompt": "p", "responses": ["a", "  "]}, "responses[1]", "is empty", "empty_text"),
    ({"type": "ranked", "prompt": "p", "responses": ["a", 3]}, "responses[1]", "must be a string, got a JSON number",
     "bad_value"),
    ({"type": "ranked", "prompt": "", "responses": ["a", "b"]}, "prompt", "is empty", "empty_text"),
    ({"type": "ranked", "responses": ["a", "b"]}, "prompt", "give exactly one of 'prompt'", "missing_field"),
    ({"type": "ranked", "prompt": "p", "rounds": [["ask", "q"]], "responses": ["a", "b"]}, "prompt",
     "give exactly one of 'prompt'", "bad_value"),
    ({"type": "ranked", "prompt": "p", "responses": ["a", "b"], "margin": 1}, "margin", "unknown field for type",
     "unknown_field"),
])
def test_bad_ranked_record_line(tmp_path, record, field, words, reason):
    path = write_json(tmp_path / "d.json", [RANKED, record, RANKED])
    res = load_records(path)
    lines = [str(p) for p in res.problems]
    assert len(res.records) == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"{path}: record 1: field '{field}': ") and words in lines[0], lines[0]
    assert res.problems[0].reason == reason


def test_every_problem_of_a_ranking_is_reported_and_skip_mode_drops_it(tmp_path):
    bad = {"type": "ranked", "rounds": [["ask", "q"]], "responses": ["a", "", "a", "b", "b"]}
    path = write_jsonl(tmp_path / "d.jsonl", [RANKED, bad, PAIR])
    tokenizer = load_tokenizer("llama")
    with pytest.raises(DataError) as err:
        build_dataset(path, tokenizer, T, kind="ranked")
    repeats = "repeats responses[{}]; the answers of a ranking must differ (equal answers cannot be ordered)"
    assert err.value.lines == [f"{path}: record 1 (line 2): field 'responses[1]': is empty",
                               f"{path}: record 1 (line 2): field 'responses[2]': " + repeats.format(0),
                               f"{path}: record 1 (line 2): field 'responses[4]': " + repeats.format(3)]
    built = build_dataset(path, tokenizer, T, kind="ranked", strict=False)  # skip_bad_records
    assert built.stats["invalid"] == {"empty_text": 1, "duplicate_response": 2} and len(built.train) == 2


def test_special_token_text_in_a_response_is_reported(tmp_path, tok):
    path = write_json(tmp_path / "d.json", [{**RANKED, "responses": ["Good.", "Bad" + tok.eos_token]}])
    with pytest.raises(DataError, match=r"record 0: field 'responses\[1\]': contains the special token text"):
        build_dataset(path, tok, T, kind="ranked")


def test_ranked_items_hold_every_response_best_first_with_fillers(tmp_path, tok):
    three = {"type": "ranked", "rounds": [["ask", "Hi"], ["ans", "Hey"], ["ask", "Rank?"]], "responses": ["x", "y", "z"]}
    path = write_json(tmp_path / "d.json", [RANKED, PAIR, three, {"type": "instruct", "instruct": "i", "output": "o"}])
    built = build_dataset(path, tok, T, kind="ranked")
    st = built.stats
    assert st["max_responses"] == 4 and st["train"]["types"] == {"ranked": 2, "pairwise": 1}
    assert st["train"]["unused"] == {"instruct": 1}
    assert (st["train"]["pairs"], st["train"]["filler_rows"], st["train"]["rows"]) == (6 + 1 + 3, 0 + 2 + 1, 3)
    assert st["train"]["computed_tokens"] == 3 * 4 * T
    (ids, mask), labels, margin, n = built.train[2]
    assert ids.shape == mask.shape == labels.shape == (4, T) and int(n) == 3 and float(margin) == 0.0
    for k, answer in enumerate(three["responses"]):
        assert real(tok, ids[k], mask[k]).endswith("Rank?\n\nAssistant:\n" + answer + tok.eos_token)
        assert tok.decode(labels[k][labels[k] != -100].tolist()) == answer + tok.eos_token
    assert torch.equal(ids[3], ids[0]) and torch.equal(mask[3], mask[0]) and bool((labels[3] == -100).all())  # filler
    (ids, mask), labels, margins, n_responses = collate_ranked([built.train[i] for i in range(3)])
    assert ids.shape == (4 * 3, T) and margins.tolist() == [0.0, 1.5, 0.0] and n_responses.tolist() == [4, 2, 3]
    # row k*B + b is response k of record b
    assert real(tok, ids[1 * 3 + 0], mask[1 * 3 + 0]).endswith("Fine answer." + tok.eos_token)
    assert real(tok, ids[1 * 3 + 1], mask[1 * 3 + 1]).endswith("No." + tok.eos_token)
    assert real(tok, ids[3 * 3 + 0], mask[3 * 3 + 0]).endswith("No." + tok.eos_token)


def test_pairs_only_build_the_same_tensors_as_the_pairwise_kind(tmp_path, tok):
    """The RM recipe builds kind="ranked": on pairwise data it must feed exactly what it fed before."""
    records = [PAIR, {"type": "pairwise", "rounds": [["ask", "a"], ["ans", "b"], ["ask", "c"]], "chosen": "d",
                      "rejected": "e"}, {"type": "ranked", "prompt": "q", "responses": ["r", "s"]}]
    path = write_json(tmp_path / "d.json", records)
    ranked, pairs = build_dataset(path, tok, T, kind="ranked"), build_dataset(path, tok, T, kind="pairwise")
    assert ranked.stats["max_responses"] == 2 and ranked.stats["train"]["filler_rows"] == 0
    (ids, mask), labels, margins, n = collate_ranked([ranked.train[i] for i in range(2)])
    (pids, pmask), plabels, pmargins = collate_pairs([pairs.train[i] for i in range(2)])
    assert torch.equal(ids, pids) and torch.equal(mask, pmask) and torch.equal(labels, plabels)
    assert torch.equal(margins, pmargins) and n.tolist() == [2, 2]
    assert pairs.stats["train"]["unused"] == {"ranked": 1}  # DPO's kind does not take rankings
    assert ranked.stats["train"]["computed_tokens"] == pairs.stats["train"]["computed_tokens"] + 2 * T


def test_eval_part_sets_k_for_both_parts(tmp_path, tok):
    train = write_json(tmp_path / "t.json", [PAIR, PAIR])
    held = write_json(tmp_path / "e.json", [RANKED])
    built = build_dataset(train, tok, T, kind="ranked", eval_paths=held)
    assert built.stats["max_responses"] == 4
    assert built.train[0][0][0].shape == built.eval[0][0][0].shape == (4, T)
    assert built.stats["train"]["filler_rows"] == 4 and built.stats["eval"]["filler_rows"] == 0


def test_ranked_records_give_prompts_and_sft_answers(tmp_path, tok):
    path = write_json(tmp_path / "d.json", [RANKED, {"type": "prompt", "prompt": RANKED["prompt"]}])
    prompts = build_dataset(path, tok, T, kind="prompt")
    assert prompts.stats["train"]["types"] == {"ranked": 1, "prompt": 1}
    assert torch.equal(prompts.train[0][0], prompts.train[1][0])  # a ranking contributes its prompt
    lm = build_dataset(path, tok, T, kind="lm")
    _inputs, labels = lm.train[0]
    assert tok.decode(labels[labels != -100].tolist()) == "Great answer." + tok.eos_token  # the best response


def test_long_context_is_cut_once_for_every_response(tmp_path, tok):
    long_prompt = "Please read this. " + "The river runs past the old mill. " * 12 + "Which answer is better?"
    responses = ["The first one, because it is short and clear.", "The second.", "Neither, really."]
    path = write_json(tmp_path / "d.json", [{"type": "ranked", "prompt": long_prompt, "responses": responses},
                                            {"type": "ranked", "prompt": "Hi", "responses": ["ok", "word " * 80]}])
    built = build_dataset(path, tok, T, kind="ranked")
    st = built.stats["train"]
    assert (st["truncated"], st["context_cut"], st["dropped"]) == (1, 1, {"answer_too_long": 1})
    (ids, mask), _labels, _margin, n = built.train[0]
    assert int(n) == 3 and int(mask.sum(-1).max()) == T  # the longest response fills its row
    texts = [real(tok, ids[k], mask[k]) for k in range(3)]
    for k, answer in enumerate(responses):
        assert ids[k, mask[k].sum() - 1] == tok.eos_token_id  # the score is read at the answer's EOS
        assert texts[k].endswith("Which answer is better?\n\nAssistant:\n" + answer + tok.eos_token)
        assert long_prompt not in texts[k]
    assert len({t.split("\n\nAssistant:\n")[0] for t in texts}) == 1  # one context for all responses


def test_inspect_shows_rankings_like_pairs(tmp_path, capsys):
    path = write_json(tmp_path / "d.json", [RANKED, PAIR])
    assert inspect_main([path]) == 0
    assert json.loads(capsys.readouterr().out.split("types: ")[1]) == {"ranked": 1, "pairwise": 1}
    assert inspect_main([path, "--tokenizer-path", TOKENIZER_DIRS["llama"], "--kind", "ranked", "--show", "2"]) == 0
    out = capsys.readouterr().out
    assert "responses per record (K): 4  ordered pairs: 7  filler rows: 2" in out
    assert "[responses[0]: rank 1 of 4 (best)]" in out and "[responses[3]: rank 4 of 4 (worst)]" in out
    assert "Assistant:\n⟦Poor.</s>⟧" in out
    assert "[responses[1]: rank 2 of 2 (worst)]\n<s>Human:\nPick one.\n\nAssistant:\n⟦No.</s>⟧" in out
    assert out.count("rank ") == 6  # no filler rows shown


def test_model_template_cuts_the_same_oldest_messages_for_every_response(tmp_path):
    from data_fixtures import chat_tokenizer

    tokenizer = chat_tokenizer("llama3")
    rounds = [["ask", "Tell me a long story. " * 8], ["ans", "Once upon a time " * 10], ["ask", "Shorter?"]]
    path = write_json(tmp_path / "d.json", [{"type": "ranked", "rounds": rounds, "responses": ["Yes.", "Maybe.", "No."]}])
    built = build_dataset(path, tokenizer, 60, kind="ranked", template="model")
    assert built.stats["train"]["context_cut"] == 1 and built.stats["max_responses"] == 3
    (ids, mask), labels, _, _ = built.train[0]
    header = "<|start_header_id|>assistant<|end_header_id|>\n\n"
    for k, response in enumerate(["Yes.", "Maybe.", "No."]):
        text = real(tokenizer, ids[k], mask[k])
        assert text.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nShorter?<|eot_id|>")
        assert text.endswith(header + response + "<|eot_id|>")
        assert tokenizer.decode(labels[k][labels[k] != -100].tolist()) == response + "<|eot_id|>"
