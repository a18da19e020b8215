"""python -m data.inspect: exit codes, error lines without traceback, marked rendering."""
import subprocess
import sys

from data_fixtures import MIXED, ROOT, TOKENIZER_DIRS, write_json

from data.inspect import main


def test_valid_without_tokenizer(capsys):
    assert main([MIXED]) == 0
    out = capsys.readouterr().out
    assert "valid records: 39" in out and '"prompt": 5' in out


def test_bad_file_exits_nonzero_without_traceback(tmp_path):
    path = write_json(tmp_path / "bad.json", [{"type": "pretrain", "text": "ok"}, {"type": "conversation",
                                                                                   "rounds": [["ask", "q"]]}])
    proc = subprocess.run([sys.executable, "-m", "data.inspect", path], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[0] == (f"{path}: record 1: field 'rounds': has no answer: add at least one "
                                           "[\"ans\", text] turn (nothing would be trained on)")
    assert "Traceback" not in proc.stderr and "--skip-bad" in proc.stderr
    skip = subprocess.run([sys.executable, "-m", "data.inspect", path, "--skip-bad"], cwd=ROOT, capture_output=True,
                          text=True)
    assert skip.returncode == 0 and 'dropped bad records: {"no_answer": 1}' in skip.stdout


def test_with_tokenizer_shows_trained_part(capsys):
    assert main([MIXED, "--tokenizer-path", TOKENIZER_DIRS["bloom"], "--max-seq-len", "64", "--show", "8"]) == 0
    out = capsys.readouterr().out
    assert "truncated:" in out and "tokens per sample before fitting" in out
    assert "Human:\nSummarize the following text." in out
    assert "Assistant:\n⟦Language models learn from text and can answer, code and translate.</s>⟧" in out


def test_bad_with_tokenizer(tmp_path, capsys):
    path = write_json(tmp_path / "bad.json", [{"type": "instruct", "instruct": "a", "output": "x</s>"}])
    assert main([path, "--tokenizer-path", TOKENIZER_DIRS["llama"]]) == 1
    assert "field 'output': contains the special token text '</s>'" in capsys.readouterr().err


def test_show_pairwise_and_prompt_samples(capsys):
    """--show on pairwise items ((inputs, labels, margin)) crashed with "too many values to unpack"."""
    assert main([MIXED, "--tokenizer-path", TOKENIZER_DIRS["llama"], "--kind", "pairwise", "--show", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("[chosen]") == out.count("[rejected]") == 2
    assert "Assistant:\n⟦The capital of France is Paris.</s>⟧" in out
    assert "Assistant:\n⟦France is a country in Europe.</s>⟧" in out  # the rejected answer, marked as scored
    assert main([MIXED, "--tokenizer-path", TOKENIZER_DIRS["llama"], "--kind", "prompt", "--show", "1"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("Assistant:")


def test_reports_truncation_chunking_and_pad(capsys):
    assert main([MIXED, "--tokenizer-path", TOKENIZER_DIRS["bloom"], "--max-seq-len", "40", "--overflow", "chunk"]) == 0
    out = capsys.readouterr().out
    assert "chunked documents: " in out and "context cut from the left" in out
    assert "pad: '<pad>' (id 3, pad token)" in out


def test_formats_and_model_template(tmp_path, capsys):
    from data_fixtures import chat_tokenizer

    samples = [f"{ROOT}/data/samples/{n}" for n in ("messages.jsonl", "sharegpt.json", "alpaca.json", "preference.jsonl",
                                                   "completion.jsonl", "messages.parquet")]
    assert main(samples) == 0
    out = capsys.readouterr().out
    assert f"{samples[1]}: sharegpt format (mapped to the unified record types)" in out
    assert f"{samples[5]}: messages format" in out and "valid records: 19" in out
    assert main([samples[1], "--format", "messages"]) == 1  # stated wrongly: every record is reported
    assert "field 'messages': missing (required by the messages format)" in capsys.readouterr().err
    tok_dir = tmp_path / "tok"
    chat_tokenizer("llama3").save_pretrained(tok_dir)
    assert main([samples[0], "--tokenizer-path", str(tok_dir), "--template", "model", "--show", "1"]) == 0
    out = capsys.readouterr().out
    assert "template: the tokenizer's chat template; trained: assistant turns (from incremental rendering), each " \
           "ending with '<|eot_id|>'" in out
    assert "<|start_header_id|>assistant<|end_header_id|>\n\n⟦It splits a model into stages" in out
    assert "pad: '<|reserved_special_token_0|>'" in out
