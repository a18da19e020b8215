"""Prompt records for PPO/GRPO (build_dataset(kind="prompt")): GSM8K question/answer records, chats ending
with a user message (a system message first allowed), TRL's prompt column (strings or message lists, in
.jsonl and .parquet); each item's record keeps the prompt as the data gave it, and the same files keep a
clear meaning for SFT (kind="lm")."""
import json

import pytest
from data_fixtures import ROOT, TOKENIZER_DIRS, items, load_tokenizer, msg, write_json, write_jsonl

from data.dataset import build_dataset
from data.errors import DataError
from data.records import load_records, validate_record

T = 96
SYSTEM = "Think step by step, then give the answer after ####."




def records(built):
    return [built.train.record(i) for i in range(len(built.train))]


GSM8K = [
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How "
                 "many clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether "
               "in April and May.\n#### 72"},
    {"question": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much "
                 "did she earn?", "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\n#### 10", "level": 2},
]


def test_gsm8k_records_are_prompts_with_their_answer(tmp_path):
    from trainer.rl.rewards import math_answer

    tok = load_tokenizer("llama")
    path = write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K)
    built = build_dataset(path, tok, T, kind="prompt")
    assert built.stats["formats"] == {path: "qa"} and built.stats["types"] == {"prompt": 2}
    assert records(built) == [{"prompt": GSM8K[0]["question"], "answer": GSM8K[0]["answer"]},
                              {"prompt": GSM8K[1]["question"], "answer": GSM8K[1]["answer"], "level": 2}]
    unified = write_json(tmp_path / "u.json", [{"type": "prompt", "prompt": r["question"]} for r in GSM8K])
    assert items(built) == items(build_dataset(unified, tok, T, kind="prompt"))
    # what GRPO's math_answer makes of the answer column
    answers = [r["answer"] for r in records(built)]
    assert math_answer(None, ["So 72 clips.", "She earned \\boxed{10}"], answer=answers) == [1.0, 1.0]
    assert math_answer(None, ["24", "$0.2"], answer=answers) == [0.0, 0.0]


def test_gsm8k_for_sft_trains_question_to_answer(tmp_path):
    """The same file given to SFT: instruct records (question -> answer with its reasoning); other fields
    ignored, as every format ignores columns it does not read."""
    tok = load_tokenizer("bloom")
    path = write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K)
    unified = write_json(tmp_path / "u.json", [{"type": "instruct", "instruct": r["question"], "output": r["answer"]}
                                               for r in GSM8K])
    built, ref = build_dataset(path, tok, 160), build_dataset(unified, tok, 160)
    assert built.stats["types"] == {"instruct": 2} and built.stats["formats"] == {path: "qa"}
    assert items(built) == items(ref)
    assert [r.type for r in load_records(path).records] == ["instruct", "instruct"]
    assert [r.type for r in load_records(path, prompts=True).records] == ["prompt", "prompt"]


def test_gsm8k_problems_name_the_field(tmp_path):
    tok = load_tokenizer("llama")
    path = write_jsonl(tmp_path / "q.jsonl", [GSM8K[0], {"question": "  ", "answer": "1"}, {"question": "Q?", "answers": "1"}])
    for kind in ("prompt", "lm"):
        with pytest.raises(DataError) as e:
            build_dataset({"path": path, "format": "qa"}, tok, T, kind=kind)
        assert e.value.lines == [f"{path}: record 1 (line 2): field 'question': is empty",
                                 f"{path}: record 2 (line 3): field 'answers': unknown field for the qa format: did you "
                                 "mean 'answer'? (other unknown fields are ignored)",
                                 f"{path}: record 2 (line 3): field 'answer': missing (required by the qa format)"], kind


CHATS = [
    {"messages": [msg("user", "What is 2+3?")], "answer": "5"},
    {"messages": [msg("system", SYSTEM), msg("user", "What is 6x7?")], "answer": "42", "source": "gen"},
    {"messages": [msg("user", "Hi"), msg("assistant", "Hello!"), msg("user", "What is 1+1?")], "answer": "2"},
]
CHATS_UNIFIED = [
    {"type": "prompt", "prompt": "What is 2+3?"},
    {"type": "prompt", "rounds": [["system", SYSTEM], ["ask", "What is 6x7?"]]},
    {"type": "prompt", "rounds": [["ask", "Hi"], ["ans", "Hello!"], ["ask", "What is 1+1?"]]},
]


@pytest.mark.parametrize("name", ["llama", "bloom"])
def test_chats_ending_with_a_user_message_are_prompts(tmp_path, name):
    tok = load_tokenizer(name)
    path = write_jsonl(tmp_path / "chats.jsonl", CHATS)
    built = build_dataset(path, tok, T, kind="prompt")
    assert built.stats["types"] == {"prompt": 3} and built.stats["formats"] == {path: "messages"}
    assert records(built) == [{k: v for k, v in r.items() if k != "messages"} | {"prompt": r["messages"]} for r in CHATS]
    assert items(built) == items(build_dataset(write_json(tmp_path / "u.json", CHATS_UNIFIED), tok, T,
                                                             kind="prompt"))
    # pipetune's template renders the system message as ref_qa's reference
    ids, mask = built.train[1]
    text = tok.decode(ids[mask.bool()].tolist(), skip_special_tokens=True)
    assert text.endswith(f"Reference:\n{SYSTEM}\n\nHuman:\nWhat is 6x7?\n\nAssistant:\n")
    # ShareGPT: the same prompts (roles as messages' names in the record)
    sharegpt = [{"conversations": [{"from": "system", "value": SYSTEM}, {"from": "human", "value": "What is 6x7?"}],
                 "answer": "42"}]
    sg = build_dataset(write_jsonl(tmp_path / "sg.jsonl", sharegpt), tok, T, kind="prompt")
    assert records(sg) == [{"prompt": CHATS[1]["messages"], "answer": "42"}]
    assert items(sg) == items(built)[1:2]


def test_a_chat_without_an_answer_is_still_an_error_for_sft(tmp_path):
    tok = load_tokenizer("llama")
    path = write_jsonl(tmp_path / "chats.jsonl", [{"messages": [msg("user", "Hi"), msg("assistant", "Hey")]}] + CHATS)
    with pytest.raises(DataError) as e:
        build_dataset(path, tok, T)
    assert e.value.lines[0] == (f"{path}: record 1 (line 2): field 'messages': has no answer: add an assistant message "
                                "(nothing would be trained on); as a prompt ending with a user message it serves "
                                "PPO/GRPO (kind \"prompt\")")
    assert len(e.value.lines) == 2  # records 1 and 2; record 3 has an answer (its last user message is context)
    skipped = build_dataset(path, tok, T, strict=False)
    assert skipped.stats["invalid"] == {"no_answer": 2} and skipped.stats["types"] == {"conversation": 2}
    # as prompts, a chat ending with an answer is a conversation: not used by kind="prompt", with the reason
    with pytest.raises(ValueError, match="kind=\"prompt\" reads prompt records .*messages ending with a user message"):
        build_dataset(write_jsonl(tmp_path / "c.jsonl", [{"messages": [msg("user", "Hi"), msg("assistant", "Hey")]}]),
                      tok, T, kind="prompt")


def test_trl_prompt_column_in_jsonl_and_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    tok = load_tokenizer("llama")
    as_lists = [{"prompt": [msg("user", "What is 2+3?")], "answer": "5"},
                {"prompt": [msg("system", SYSTEM), msg("user", "What is 6x7?")], "answer": "42"}]
    as_strings = [{"prompt": "What is 2+3?", "answer": "5"}, {"prompt": "What is 6x7?", "answer": "42"}]
    want_ids = None
    for rows in (as_lists, as_strings):
        table = pa.table({"prompt": [r["prompt"] for r in rows], "answer": [r["answer"] for r in rows]})
        pq.write_table(table, tmp_path / "p.parquet")
        for path in (write_jsonl(tmp_path / "p.jsonl", rows), str(tmp_path / "p.parquet")):
            built = build_dataset(path, tok, T, kind="prompt")
            assert records(built) == rows, path
            if rows is as_lists:
                want_ids = want_ids or items(built)
                assert items(built) == want_ids
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [as_strings[0], as_lists[1]])
    assert records(build_dataset(mixed, tok, T, kind="prompt")) == [as_strings[0], as_lists[1]]


def test_pairwise_prompts_as_given(tmp_path):
    tok = load_tokenizer("llama")
    rows = [{"prompt": [msg("user", "Capital?")], "chosen": [msg("assistant", "Paris.")],
             "rejected": [msg("assistant", "Rome.")]},
            {"prompt": "\n\nHuman: Hi\n\nAssistant:", "chosen": " Hey", "rejected": " No"}]
    built = build_dataset(write_jsonl(tmp_path / "p.jsonl", rows), tok, T, kind="prompt")
    assert records(built) == [{"prompt": [msg("user", "Capital?")]}, {"prompt": "\n\nHuman: Hi\n\nAssistant:"}]


def test_cached_prompt_records_keep_their_message_lists(tmp_path):
    tok = load_tokenizer("llama")
    path = write_jsonl(tmp_path / "chats.jsonl", CHATS)
    first = build_dataset(path, tok, T, kind="prompt", cache_dir=str(tmp_path / "cache"))
    again = build_dataset(path, tok, T, kind="prompt", cache_dir=str(tmp_path / "cache"))
    assert again.stats["cache"]["hit"] and records(again) == records(first)
    assert again.train.record(1)["prompt"] == CHATS[1]["messages"]


def test_unified_prompt_system_round_validation():
    ok, problems = validate_record({"type": "prompt", "rounds": [["system", "S"], ["ask", "Q"]], "answer": "1"}, "f", 0)
    assert problems == [] and ok.fields == {"rounds": [("system", "S"), ("ask", "Q")], "answer": "1"}
    cases = [
        ({"type": "prompt", "rounds": [["ask", "Q"], ["system", "S"]]},
         "field 'rounds[1][0]': a 'system' round is allowed first in a prompt record's rounds; use 'ask' or 'ans' here"),
        ({"type": "prompt", "rounds": [["system", "S"]]},
         "field 'rounds': has only a system round: add the prompt's [\"ask\", text] round"),
        ({"type": "conversation", "rounds": [["system", "S"], ["ask", "Q"], ["ans", "A"]]},
         "field 'rounds[0][0]': a 'system' round is allowed in prompt records only (as their first round); use 'ask' "
         "or 'ans' here"),
        ({"type": "prompt", "rounds": [["system", " "], ["ask", "Q"]]}, "field 'rounds[0][1]': is empty"),
    ]
    for obj, message in cases:
        rec, problems = validate_record(obj, "f", 3)
        assert rec is None and [str(p) for p in problems] == [f"f: record 3: {message}"], obj


def test_system_message_survives_a_context_cut(tmp_path):
    tok = load_tokenizer("llama")
    long = {"messages": [msg("system", "Be brief."), msg("user", "Tell me about pipelines " * 8), msg("assistant", "Sure."),
                         msg("user", "What is 2+3?")], "answer": "5"}
    built = build_dataset(write_jsonl(tmp_path / "l.jsonl", [long]), tok, 48, kind="prompt")
    assert built.stats["train"]["context_cut"] == 1
    ids, mask = built.train[0]
    text = tok.decode(ids[mask.bool()].tolist(), skip_special_tokens=True)
    assert text.startswith("Reference:\nBe brief.\n\nHuman:\n") and text.endswith("2+3?\n\nAssistant:\n")
    assert "pipelines" not in text


def test_inspect_shows_prompts_and_their_records(tmp_path, capsys):
    from data.inspect import main

    path = write_jsonl(tmp_path / "chats.jsonl", CHATS[1:2] + GSM8K[1:])
    assert main([path, "--format", "messages", "--kind", "prompt", "--skip-bad"]) == 0  # GSM8K line: not messages
    assert "types: {\"prompt\": 1}" in capsys.readouterr().out
    gsm = write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K)
    assert main([gsm, "--kind", "prompt", "--tokenizer-path", TOKENIZER_DIRS["bloom"], "--show", "2"]) == 0
    out = capsys.readouterr().out
    assert f"{gsm}: qa format" in out and "prompt columns (reward functions get them): answer, level" in out
    assert "[record] " + json.dumps({"prompt": GSM8K[1]["question"], "answer": GSM8K[1]["answer"], "level": 2}) in out
    assert main([gsm, "--kind", "lm", "--tokenizer-path", TOKENIZER_DIRS["bloom"]]) == 0
    assert "types used: {\"instruct\": 2}" in capsys.readouterr().out
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi", "answer": "x"}])
    assert main([prompts, "--kind", "lm", "--tokenizer-path", TOKENIZER_DIRS["bloom"]]) == 1
    assert "prompt records have no answer to train on: they are PPO/GRPO prompts" in capsys.readouterr().err


def test_inspect_a_grpo_config(tmp_path, capsys):
    """--config of a GRPO run: its prompts (kind prompt), with the actor's tokenizer and the config's template."""
    from data.inspect import main

    data = write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K)
    cfg = {"stage": "grpo", "actor_path": f"{ROOT}/configs/tiny-llama3", "save_path": str(tmp_path / "out"),
           "data_path": data, "template": "model", "max_seq_len": 512, "train_steps": 2,
           "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [1, 1]}},
           "train_batch_size": 4, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
           "grpo": {"reward_funcs": ["math_answer"], "n_samples_per_prompt": 4}}
    (tmp_path / "grpo.json").write_text(json.dumps(cfg))
    assert main(["--config", str(tmp_path / "grpo.json"), "--show", "1"]) == 0
    out = capsys.readouterr().out
    assert "kind: prompt" in out and "template: the tokenizer's chat template" in out
    assert "<|start_header_id|>user<|end_header_id|>" in out and "[record] {\"prompt\": \"Natalia" in out
