"""Ecosystem record formats and file types: each loads to the same samples as the equivalent unified
records; a malformed record in each gives one line naming file, record (and line) and the user's field;
.json / .jsonl / .parquet / save_to_disk folders give the same samples; stated and detected formats."""
import json
import os
import subprocess
import sys

import pytest
from data_fixtures import MIXED, ROOT, items, load_tokenizer, msg, tok, write_json, write_jsonl  # noqa: F401 (tok: a fixture)

from data.dataset import build_dataset
from data.errors import DataError
from data.records import RecordStream, load_records

T = 96




def same_samples(tmp_path, tok, source, unified, kinds=("lm",), name="src.jsonl", **kw):
    """``source`` (ecosystem records, or a path) builds exactly the items of ``unified`` for every kind."""
    path = source if isinstance(source, (str, dict)) else write_jsonl(tmp_path / name, source)
    ref = write_json(tmp_path / "unified.json", unified)
    for kind in kinds:
        assert items(build_dataset(path, tok, T, kind=kind, **kw)) == items(build_dataset(ref, tok, T, kind=kind, **kw)), kind


# ----------------------------------------------------------------------------------------------
# Each format == its unified records (both tokenizers)

MESSAGES = [
    {"messages": [msg("user", "Hi!"), msg("assistant", "Hello."), msg("user", "2+2?"), msg("assistant", "4.")]},
    {"messages": [msg("system", "熊猫主要吃竹子。"), msg("user", "熊猫吃什么？"), msg("assistant", "竹子。")], "id": 7},
    {"messages": [msg("system", ""), msg("user", "Hi"), msg("assistant", "Hey")], "source": "x"},  # empty system
]
MESSAGES_UNIFIED = [
    {"type": "conversation", "rounds": [["ask", "Hi!"], ["ans", "Hello."], ["ask", "2+2?"], ["ans", "4."]]},
    {"type": "ref_qa", "reference": "熊猫主要吃竹子。", "rounds": [["ask", "熊猫吃什么？"], ["ans", "竹子。"]]},
    {"type": "conversation", "rounds": [["ask", "Hi"], ["ans", "Hey"]]},
]
SHAREGPT = [
    {"id": "a1", "conversations": [{"from": "human", "value": "Hi!"}, {"from": "gpt", "value": "Hello."},
                                   {"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4."}]},
    {"conversations": [{"from": "system", "value": "熊猫主要吃竹子。"}, {"from": "user", "value": "熊猫吃什么？"},
                       {"from": "assistant", "value": "竹子。"}]},
    {"system": "Be brief.", "conversations": [{"from": "human", "value": "Hi"}, {"from": "chatgpt", "value": "Hey"}]},
]
SHAREGPT_UNIFIED = MESSAGES_UNIFIED[:2] + [
    {"type": "ref_qa", "reference": "Be brief.", "rounds": [["ask", "Hi"], ["ans", "Hey"]]}]
ALPACA = [
    {"instruction": "Translate into Chinese.", "input": "Good morning!", "output": "早上好！"},
    {"instruction": "What is two plus three?", "input": "", "output": "Five.", "text": "a rendered copy: ignored"},
    {"instruction": "And times two?", "input": "", "output": "Ten.", "history": [["What is two plus three?", "Five."]],
     "system": "You are a calculator."},
]
ALPACA_UNIFIED = [
    {"type": "instruct", "instruct": "Translate into Chinese.", "input": "Good morning!", "output": "早上好！"},
    {"type": "instruct", "instruct": "What is two plus three?", "output": "Five."},
    {"type": "ref_qa", "reference": "You are a calculator.",
     "rounds": [["ask", "What is two plus three?"], ["ans", "Five."], ["ask", "And times two?"], ["ans", "Ten."]]},
]
COMPLETION = [
    {"prompt": "Capital of France?", "completion": "Paris."},
    {"prompt": [msg("user", "Hi"), msg("assistant", "Hello."), msg("user", "2+2?")], "completion": [msg("assistant", "4.")]},
]
COMPLETION_UNIFIED = [
    {"type": "instruct", "instruct": "Capital of France?", "output": "Paris."},
    {"type": "conversation", "rounds": [["ask", "Hi"], ["ans", "Hello."], ["ask", "2+2?"], ["ans", "4."]]},
]
HH = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: What is 2 + 2?\n\nAssistant:"
PREFERENCE = [
    {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "London."},                     # strings
    {"chosen": HH + " 2 + 2 is 4.", "rejected": HH + " 2 + 2 is 5."},                                 # Anthropic HH
    {"prompt": HH, "chosen": " 2 + 2 is 4.", "rejected": " 2 + 2 is 5."},                             # Dahoas
    {"prompt": [msg("user", "中国的首都是哪里？")], "chosen": [msg("assistant", "北京。")],              # TRL explicit
     "rejected": [msg("assistant", "我不知道。")]},
    {"chosen": [msg("user", "Hi"), msg("assistant", "Hey"), msg("user", "Joke?"), msg("assistant", "Knock knock.")],
     "rejected": [msg("user", "Hi"), msg("assistant", "Hey"), msg("user", "Joke?"), msg("assistant", "No.")]},  # TRL implicit
    {"prompt": "Say hi.", "chosen": [msg("user", "Say hi."), msg("assistant", "Hi!")],              # UltraFeedback
     "rejected": [msg("user", "Say hi."), msg("assistant", "No.")], "score_chosen": 8.0, "score_rejected": 2.0},
]
HH_ROUNDS = [["ask", "Hi there"], ["ans", "Hello! How can I help?"], ["ask", "What is 2 + 2?"]]
PREFERENCE_UNIFIED = [
    {"type": "pairwise", "prompt": "Capital of France?", "chosen": "Paris.", "rejected": "London."},
    {"type": "pairwise", "rounds": HH_ROUNDS, "chosen": "2 + 2 is 4.", "rejected": "2 + 2 is 5."},
    {"type": "pairwise", "rounds": HH_ROUNDS, "chosen": "2 + 2 is 4.", "rejected": "2 + 2 is 5."},
    {"type": "pairwise", "prompt": "中国的首都是哪里？", "chosen": "北京。", "rejected": "我不知道。"},
    {"type": "pairwise", "rounds": [["ask", "Hi"], ["ans", "Hey"], ["ask", "Joke?"]], "chosen": "Knock knock.",
     "rejected": "No."},
    {"type": "pairwise", "prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."},
]
PROMPTS = [{"prompt": "Tell me a story."}, {"prompt": [msg("user", "Hi"), msg("assistant", "Hey"), msg("user", "Joke?")]},
           {"prompt": "\n\nHuman: Hi\n\nAssistant: Hey\n\nHuman: Joke?\n\nAssistant:"}]
PROMPTS_UNIFIED = [{"type": "prompt", "prompt": "Tell me a story."},
                   {"type": "prompt", "rounds": [["ask", "Hi"], ["ans", "Hey"], ["ask", "Joke?"]]},
                   {"type": "prompt", "rounds": [["ask", "Hi"], ["ans", "Hey"], ["ask", "Joke?"]]}]
QA = [{"question": "Tom has 3 apples and buys 4 more. How many?", "answer": "3 + 4 = 7\n#### 7"},  # GSM8K
      {"question": "What is 6 x 7?", "answer": "#### 42", "id": 5}]
QA_UNIFIED = [{"type": "instruct", "instruct": "Tom has 3 apples and buys 4 more. How many?", "output": "3 + 4 = 7\n#### 7"},
              {"type": "instruct", "instruct": "What is 6 x 7?", "output": "#### 42"}]  # read as prompts: tests/test_data_prompts.py
CASES = {"messages": (MESSAGES, MESSAGES_UNIFIED, ("lm",)), "qa": (QA, QA_UNIFIED, ("lm",)), "sharegpt": (SHAREGPT, SHAREGPT_UNIFIED, ("lm",)),
         "alpaca": (ALPACA, ALPACA_UNIFIED, ("lm",)), "completion": (COMPLETION, COMPLETION_UNIFIED, ("lm",)),
         "preference": (PREFERENCE, PREFERENCE_UNIFIED, ("lm", "pairwise", "prompt")),
         "prompt-only": (PROMPTS, PROMPTS_UNIFIED, ("prompt",))}


@pytest.mark.parametrize("case", sorted(CASES))
def test_format_loads_to_the_unified_samples(tmp_path, tok, case):
    source, unified, kinds = CASES[case]
    loaded = load_records(write_jsonl(tmp_path / "src.jsonl", source))
    assert loaded.problems == []
    ref = load_records(write_json(tmp_path / "ref.json", unified)).records
    assert [(r.type, r.fields) for r in loaded.records] == [(r.type, r.fields) for r in ref]
    assert {r.format for r in loaded.records} == {"preference" if case == "prompt-only" else case}
    same_samples(tmp_path, tok, source, unified, kinds)


def test_formats_detected_per_file_and_stated(tmp_path):
    tok = load_tokenizer("llama")
    paths = [write_jsonl(tmp_path / f"{name}.jsonl", CASES[name][0]) for name in ("messages", "sharegpt", "alpaca")]
    built = build_dataset(paths, tok, T)
    assert built.stats["formats"] == dict(zip(paths, ("messages", "sharegpt", "alpaca")))
    unified = write_json(tmp_path / "u.json", MESSAGES_UNIFIED + SHAREGPT_UNIFIED + ALPACA_UNIFIED)
    assert items(built) == items(build_dataset(unified, tok, T))
    # stated: a ShareGPT file whose first record would not tell (no "conversations" key yet: a typo)
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"dialog": 1}] + SHAREGPT)
    with pytest.raises(DataError) as e:
        build_dataset(odd, tok, T)
    assert e.value.lines[0].startswith(f"{odd}: cannot tell the record format from the first record's keys (dialog)")
    with pytest.raises(DataError) as e:
        build_dataset({"path": odd, "format": "sharegpt"}, tok, T)
    assert e.value.lines == [f"{odd}: record 0 (line 1): field 'conversations': missing (required by the sharegpt format)"]
    good = build_dataset([{"path": odd, "format": "sharegpt"}], tok, T, strict=False)
    assert good.stats["invalid"] == {"missing_field": 1} and good.stats["formats"] == {odd: "sharegpt"}
    # a file's records all follow the file's format: an Alpaca record in a messages file is reported
    mixed = write_jsonl(tmp_path / "mixed.jsonl", MESSAGES[:1] + ALPACA[:1])
    assert [str(p) for p in load_records(mixed).problems] == [
        f"{mixed}: record 1 (line 2): field 'messages': missing (required by the messages format)"]


def test_bad_data_path_entries(tmp_path):
    res = load_records([{"path": str(tmp_path / "x.jsonl"), "format": "chatml"}, {"file": "y"}])
    assert [p.reason for p in res.problems] == ["bad_path", "bad_path"]
    assert "format \"chatml\": use one of pipetune, messages, sharegpt, alpaca, preference, completion" in str(res.problems[0])
    assert "unknown keys ['file']" in str(res.problems[1])


# ----------------------------------------------------------------------------------------------
# A malformed record in each format: one line, file + record (+ line) + the user's field

BAD = {
    "messages": [
        ({"messages": [msg("user", "Hi"), msg("assistant", "   ")]}, "field 'messages[1].content': is empty"),
        ({"messages": [msg("user", "Hi"), msg("tool", "x")]},
         "field 'messages[1].role': unknown role \"tool\"; use 'user', 'assistant', 'system'"),
        ({"messages": [msg("user", "Hi")]},
         "field 'messages': has no answer: add an assistant message (nothing would be trained on); as a prompt "
         "ending with a user message it serves PPO/GRPO (kind \"prompt\")"),
        ({"messages": [msg("user", "Hi"), msg("system", "late"), msg("assistant", "x")]},
         "field 'messages[1]': a system message must be the first message"),
        ({"messages": [msg("user", 3), msg("assistant", "x")]}, "field 'messages[0].content': must be a string, got a JSON number"),
        ({"messages": "Hi"}, "field 'messages': must be a list of messages ({\"role\": ..., \"content\": ...}), got a JSON string"),
    ],
    "sharegpt": [
        ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "x"}]},
         "field 'conversations[1].from': unknown role \"bot\"; use 'human', 'user', 'gpt', 'assistant', 'chatgpt', 'system'"),
        ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt"}]}, "field 'conversations[1]': missing \"value\""),
        ({"conversation": [{"from": "human", "value": "Hi"}], "conversations": [{"from": "gpt", "value": "x"}]},
         "field 'conversation': unknown field for the sharegpt format: did you mean 'conversations'? (other unknown "
         "fields are ignored)"),
    ],
    "alpaca": [
        ({"instruction": "Add.", "input": "1 1"}, "field 'output': missing (required by the alpaca format)"),
        ({"instruction": "Add.", "inputs": "1 1", "output": "2"},
         "field 'inputs': unknown field for the alpaca format: did you mean 'input'? (other unknown fields are ignored)"),
        ({"instruction": "", "output": "2"}, "field 'instruction': is empty"),
        ({"instruction": "Add.", "output": "2", "history": [["q"]]}, "field 'history': must be a list of [instruction, output] pairs"),
    ],
    "preference": [
        ({"prompt": "Q", "chosen": "A"}, "field 'rejected': missing (required by the preference format)"),
        ({"prompt": "Q", "chosen": 1, "rejected": "B"}, "field 'chosen': must be a string or a list of messages, got a JSON number"),
        ({"chosen": [msg("user", "Q"), msg("assistant", "A")], "rejected": [msg("user", "Q"), msg("assistant", "B"), msg("user", "C")]},
         "field 'rejected': must end in one assistant answer after the turns it shares with 'chosen' (got 2 different "
         "messages: assistant, user)"),
        ({"chosen": "A", "rejected": "B"}, "field 'prompt': missing: give \"prompt\", or chosen and rejected conversations "
         "that start with the same prompt turns"),
        ({"prompt": [msg("system", "S"), msg("user", "Q")], "chosen": "A", "rejected": "B"},
         "field 'prompt[0]': system messages are not supported here (pairwise records have no system turn)"),
        ({"prompt": "Q", "chosen": "", "rejected": "B"}, "field 'chosen': is empty"),
        ({"chosen": HH + " ", "rejected": HH + " 5"}, "field 'chosen (turn 4)': is empty"),
    ],
    "qa": [
        ({"question": "Q?", "answer": ""}, "field 'answer': is empty"),
        ({"question": ["Q?"], "answer": "A"}, "field 'question': must be a string, got a JSON list"),
        ({"question": "Q?", "answer": "A", "questions": "x"},
         "field 'questions': unknown field for the qa format: did you mean 'question'? (other unknown fields are ignored)"),
    ],
    "completion": [
        ({"prompt": [msg("user", "Q")], "completion": [msg("user", "A")]},
         "field 'completion': must be assistant messages (the part that is trained)"),
        ({"prompt": "Q", "completion": "  "}, "field 'completion': is empty"),
    ],
}
GOOD = {"messages": MESSAGES[0], "sharegpt": SHAREGPT[0], "alpaca": ALPACA[0], "preference": PREFERENCE[0],
        "completion": COMPLETION[0], "qa": QA[0]}


@pytest.mark.parametrize("fmt", sorted(BAD))
def test_malformed_record_names_file_record_line_and_field(tmp_path, fmt):
    tok = load_tokenizer("bloom")
    for record, message in BAD[fmt]:
        path = write_jsonl(tmp_path / f"{fmt}.jsonl", [GOOD[fmt], record])
        with pytest.raises(DataError) as e:
            build_dataset(path, tok, T, kind="pairwise" if fmt == "preference" else "lm")
        assert e.value.lines == [f"{path}: record 1 (line 2): {message}"], record
        json_path = write_json(tmp_path / f"{fmt}.json", [GOOD[fmt], GOOD[fmt], record])
        assert [str(p) for p in load_records(json_path).problems] == [f"{json_path}: record 2: {message}"]


def test_special_token_text_names_the_source_field(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": [msg("user", "Hi"), msg("assistant", "Bye</s>")]}])
    with pytest.raises(DataError) as e:
        build_dataset(path, load_tokenizer("llama"), T)
    assert e.value.lines == [f"{path}: record 0 (line 1): field 'messages[1].content': contains the special token text "
                             "'</s>', which the tokenizer would turn into a control token; remove or escape it"]


# ----------------------------------------------------------------------------------------------
# File types: .json, .jsonl, JSON lines in .json, .parquet, save_to_disk folders

def unified_mixed():
    with open(MIXED, encoding="utf-8") as fh:
        return json.load(fh)


def columns(records):
    keys = list(dict.fromkeys(k for r in records for k in r))
    return {k: [r.get(k) for r in records] for k in keys}


def write_parquet(path, records):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns(records)), path, row_group_size=7)  # several row groups
    return str(path)


def save_to_disk(path, records):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict(columns(records)).save_to_disk(str(path))
    return str(path)


@pytest.mark.parametrize("kind", ["lm", "pairwise", "prompt"])
def test_file_types_give_the_same_samples(tmp_path, kind):
    tok = load_tokenizer("llama")
    records = unified_mixed()
    ref = items(build_dataset(MIXED, tok, T, kind=kind))
    lines_in_json = tmp_path / "lines.json"  # what datasets' to_json writes
    lines_in_json.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n", encoding="utf-8")
    for path in (write_jsonl(tmp_path / "m.jsonl", records), str(lines_in_json),
                 write_parquet(tmp_path / "m.parquet", records), save_to_disk(tmp_path / "saved", records)):
        built = build_dataset(path, tok, T, kind=kind)
        assert items(built) == ref, path
        assert built.stats["formats"] == {path: "pipetune"}


def test_ecosystem_formats_in_parquet_and_save_to_disk(tmp_path):
    """Nested message structs: a key present in some messages only is null in the others (= absent)."""
    tok = load_tokenizer("bloom")
    source = [dict(MESSAGES[0], messages=[dict(MESSAGES[0]["messages"][0], name="alice")] + MESSAGES[0]["messages"][1:])]
    source += MESSAGES[1:]
    ref = items(build_dataset(write_json(tmp_path / "u.json", MESSAGES_UNIFIED), tok, T))
    assert items(build_dataset(write_parquet(tmp_path / "m.parquet", source), tok, T)) == ref
    assert items(build_dataset(save_to_disk(tmp_path / "m_saved", source), tok, T)) == ref
    pref = items(build_dataset(write_json(tmp_path / "p.json", PREFERENCE_UNIFIED[:1] + PREFERENCE_UNIFIED[3:4]), tok, T,
                               kind="pairwise"))
    assert items(build_dataset(write_parquet(tmp_path / "p.parquet", PREFERENCE[:1]), tok, T, kind="pairwise")) == pref[:1]
    assert items(build_dataset(save_to_disk(tmp_path / "p_saved", [PREFERENCE[3]]), tok, T, kind="pairwise")) == pref[1:]


def test_bad_records_in_columnar_files_name_the_row(tmp_path):
    pytest.importorskip("datasets")
    rows = [ALPACA[0], {"instruction": "Add.", "input": "", "output": ""}, ALPACA[1]]
    for path in (write_parquet(tmp_path / "a.parquet", rows), save_to_disk(tmp_path / "a_saved", rows)):
        assert [str(p) for p in load_records(path).problems] == [f"{path}: record 1: field 'output': is empty"]


def test_folders_globs_and_datasetdict(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "data"
    folder.mkdir()
    write_parquet(folder / "a.parquet", ALPACA)
    write_jsonl(folder / "b.jsonl", SHAREGPT)
    save_to_disk(folder / "saved", MESSAGES)  # a save_to_disk folder inside a folder is not read by the folder
    res = load_records(str(folder))
    assert [f for f, _ in res.formats] == [str(folder / "a.parquet"), str(folder / "b.jsonl")] and not res.problems
    assert len(load_records([str(folder), str(folder / "saved")]).records) == len(ALPACA) + len(SHAREGPT) + len(MESSAGES)
    assert len(load_records(str(folder / "*")).records) == len(ALPACA) + len(SHAREGPT) + len(MESSAGES)
    dd = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(columns(MESSAGES))}).save_to_disk(str(dd))
    res = load_records(str(dd))
    assert [str(p) for p in res.problems] == [
        f"{dd}: a DatasetDict folder (DatasetDict.save_to_disk): give one split's folder, e.g. {dd / 'train'} (splits "
        "here: train)"]
    assert len(load_records(str(dd / "train")).records) == len(MESSAGES)
    not_parquet = tmp_path / "x.parquet"
    not_parquet.write_text("hello")
    assert load_records(str(not_parquet)).problems[0].reason == "bad_file"


def test_missing_pyarrow_is_one_problem(tmp_path, monkeypatch):
    path = tmp_path / "a.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow -> ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (problem,) = load_records(str(path)).problems
    assert problem.reason == "missing_dependency" and "pip install 'pipetune[hf]'" in str(problem)


def test_json_data_never_imports_datasets_or_pyarrow(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", MESSAGES)
    code = ("import sys; from transformers import AutoTokenizer; from data.dataset import build_dataset; "
            f"build_dataset({path!r}, AutoTokenizer.from_pretrained({os.path.join(ROOT, 'configs', 'tiny-bloom')!r}), 64); "
            "print(sorted(m for m in ('datasets', 'pyarrow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_jsonl_is_streamed(tmp_path):
    """Records come out before the file is read to its end: a bad byte on the last line is found after
    the first records were yielded (and ends that file with one problem)."""
    path = tmp_path / "s.jsonl"
    path.write_bytes(b"\n".join(json.dumps(r).encode() for r in MESSAGES) + b"\n{\"messages\": \"caf\xe9\"}\n")
    stream = RecordStream(str(path))
    it = iter(stream)
    first = next(it)
    assert first.index == 0 and stream.problems == []
    assert len([first, *it]) == len(MESSAGES)
    assert [str(p) for p in stream.problems] == [
        f"{path}: line 4: file is not UTF-8 (bad byte 0xe9 at byte {path.read_bytes().index(b'caf') + 3}); re-save it as UTF-8"]


# ----------------------------------------------------------------------------------------------
# The training config accepts {"path", "format"} entries and a template

def test_config_data_path_entries_and_template():
    from trainer.config import ConfigError
    from trainer.recipes import validate_config as validate

    base = {"model_path": "m", "save_path": "s", "model_topo": {"process_topology": {"axes": ["pipe", "data"],
            "dims": [1, 1]}}, "train_micro_batch_size_per_gpu": 1, "n_epochs": 1}
    cfg = validate(dict(base, data_path=["a.jsonl", {"path": "b.parquet", "format": "sharegpt"}], template="model"))
    assert cfg.template == "model" and cfg.data_path[1] == {"path": "b.parquet", "format": "sharegpt"}
    assert validate(dict(base, data_path={"path": "saved_dir"})).template == "pipetune"
    with pytest.raises(ConfigError) as e:
        validate(dict(base, data_path=["a.jsonl", {"path": "b", "format": "chatml"}, 3], eval_data_path=[{"file": "x"}],
                      template="llama3"))
    assert e.value.problems == [
        "template must be 'pipetune' or 'model', got 'llama3'",
        'data_path[1]: format "chatml": use one of pipetune, messages, sharegpt, alpaca, preference, completion, qa (or '
        '"auto")',
        'data_path[2] must be a path (a string) or {"path": ..., "format": ...}, got 3',
        "eval_data_path[0]: unknown keys ['file'] (use \"path\" and \"format\")",
        'eval_data_path[0]: "path" must be a string (a file, glob or folder), got null']
