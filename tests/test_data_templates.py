"""Rendering of every type, mask exactness on both tokenizers, and the chat-template equality."""

import numpy as np
from data_fixtures import MIXED, load_tokenizer, tok  # noqa: F401  (tok is a fixture)

from data.records import load_records
from data.templates import (
    CHAT_TEMPLATE,
    join_pieces,
    record_messages,
    render_record,
    rounds_to_messages,
    set_chat_template,
    tokenizer_adds_bos,
)
from data.tokenize import tokenize_records

EOS = "</s>"


def text_and_trained(rtype, fields, side="chosen"):
    text, spans = join_pieces(render_record(rtype, fields, EOS, side))
    return text, [text[a:b] for a, b in spans]


def test_render_pretrain():
    assert text_and_trained("pretrain", {"text": "Hello world."}) == ("Hello world.</s>", ["Hello world.</s>"])


def test_render_instruct_with_and_without_input():
    assert text_and_trained("instruct", {"instruct": "Translate.", "input": "你好", "output": "Hello."}) == (
        "Human:\nTranslate.\n\n你好\n\nAssistant:\nHello.</s>", ["Hello.</s>"])
    assert text_and_trained("instruct", {"instruct": "Count.", "output": "1 2 3"}) == (
        "Human:\nCount.\n\nAssistant:\n1 2 3</s>", ["1 2 3</s>"])


def test_render_conversation_repeated_roles():
    rounds = [("ask", "Hi"), ("ask", "Help?"), ("ans", "Sure."), ("ans", "What?"), ("ask", "2+2"), ("ans", "4")]
    text, trained = text_and_trained("conversation", {"rounds": rounds})
    assert text == ("Human:\nHi\n\nHuman:\nHelp?\n\nAssistant:\nSure.</s>\n\nAssistant:\nWhat?</s>\n\n"
                    "Human:\n2+2\n\nAssistant:\n4</s>")
    assert trained == ["Sure.</s>", "What?</s>", "4</s>"]


def test_render_ref_qa():
    text, trained = text_and_trained("ref_qa", {"reference": "Sky is blue.", "rounds": [("ask", "Color?"),
                                                                                         ("ans", "Blue.")]})
    assert text == "Reference:\nSky is blue.\n\nHuman:\nColor?\n\nAssistant:\nBlue.</s>"
    assert trained == ["Blue.</s>"]


def test_render_pairwise_and_prompt():
    f = {"rounds": [("ask", "Hi"), ("ans", "Hello"), ("ask", "2+2?")], "chosen": "4", "rejected": "5"}
    ctx = "Human:\nHi\n\nAssistant:\nHello</s>\n\nHuman:\n2+2?\n\nAssistant:\n"
    assert text_and_trained("pairwise", f, "chosen") == (ctx + "4</s>", ["4</s>"])  # context answer not trained
    assert text_and_trained("pairwise", f, "rejected") == (ctx + "5</s>", ["5</s>"])
    assert text_and_trained("prompt", {"prompt": "Tell a joke."}) == ("Human:\nTell a joke.\n\nAssistant:\n", [])


def expected_answers(rec):
    f = rec.fields
    if rec.type == "pretrain":
        return [f["text"]]
    if rec.type == "instruct":
        return [f["output"]]
    if rec.type == "pairwise":
        return [f["chosen"]]
    return [t for r, t in f["rounds"] if r == "ans"]


def test_mask_exactness_on_samples(tok):
    """The trained tokens decode exactly to the answers, each followed by EOS, for every sample record."""
    records = [r for r in load_records(MIXED).records if r.type != "prompt"]
    samples, problems = tokenize_records([(r, "chosen") for r in records], tok)
    assert problems == []
    for rec, (ids, target) in zip(records, samples):
        answers = expected_answers(rec)
        # runs of consecutive trained tokens
        edges = np.flatnonzero(np.diff(np.concatenate([[0], target.astype(int), [0]])))
        runs = [ids[a:b].tolist() for a, b in zip(edges[::2], edges[1::2])]
        if rec.type == "pretrain":  # all tokens but position 0 (never predicted)
            assert target[1:].all() and not target[0]
            first = 1 if tokenizer_adds_bos(tok) else 0
            assert ids[1:].tolist() == ids[target].tolist()
            assert tok.decode(ids[first:].tolist()) == answers[0] + tok.eos_token
            continue
        assert [tok.decode(r) for r in runs] == [a + tok.eos_token for a in answers], rec
        assert all(r[-1] == tok.eos_token_id for r in runs)


def test_first_token_is_bos_only_for_llama():
    llama, bloom = load_tokenizer("llama"), load_tokenizer("bloom")
    assert tokenizer_adds_bos(llama) and not tokenizer_adds_bos(bloom)
    rec = load_records(MIXED).records[0]
    (ids_l, _), = tokenize_records([(rec, "")], llama)[0]
    (ids_b, _), = tokenize_records([(rec, "")], bloom)[0]
    assert ids_l[0] == llama.bos_token_id and ids_l[-1] == llama.eos_token_id
    assert ids_b[0] != bloom.bos_token_id and ids_b[-1] == bloom.eos_token_id


def test_special_token_text_is_reported(tok):
    rec = load_records(MIXED).records[6]  # an instruct record
    rec.fields = dict(rec.fields, output="fine</s>then more")
    samples, problems = tokenize_records([(rec, "")], tok)
    assert samples == [None]
    assert str(problems[0]) == (f"{MIXED}: record 6: field 'output': contains the special token text '</s>', which "
                                "the tokenizer would turn into a control token; remove or escape it")


def test_rounds_to_messages():
    assert rounds_to_messages([["ask", "q"], ["ans", "a"]], reference="R") == [
        {"role": "system", "content": "R"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


def test_chat_template_reproduces_training_prompt(tok):
    """apply_chat_template(add_generation_prompt=True) == the training text up to each answer (text and ids)."""
    tok = type(tok).from_pretrained(tok.name_or_path)  # a private copy: we set its template
    set_chat_template(tok)
    bos = tok.bos_token if tokenizer_adds_bos(tok) else ""
    if not bos:
        assert tok.chat_template == CHAT_TEMPLATE
    checked = 0
    for rec in load_records(MIXED).records:
        if rec.type == "pretrain":
            continue
        pieces = render_record(rec.type, rec.fields, tok.eos_token)
        messages = record_messages(rec.type, rec.fields)
        text, _ = join_pieces(pieces)
        if rec.type == "prompt":  # the whole record is a generation prompt
            assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == bos + text
            (train_ids, _), = tokenize_records([(rec, "")], tok)[0]
            assert train_ids.tolist() == tok.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
            continue
        # every assistant turn: the conversation before it + generation prompt == training text before its answer
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = tok.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True)
            full = tok.apply_chat_template(messages[:k + 1], tokenize=False)
            assert prompt == bos + text[:len(prompt) - len(bos)]
            assert full.startswith(prompt) and full[len(prompt):] == m["content"] + tok.eos_token
            ids = tok.apply_chat_template(messages[:k], tokenize=True, add_generation_prompt=True)["input_ids"]
            assert ids == tok(prompt, add_special_tokens=False)["input_ids"]
            checked += 1
        # the training ids of the whole record are the chat template's ids
        (train_ids, _), = tokenize_records([(rec, "chosen")], tok)[0]
        assert train_ids.tolist() == tok.apply_chat_template(messages, tokenize=True)["input_ids"]
        assert tok.apply_chat_template(messages, tokenize=False) == bos + text
    assert checked > 30
