"""hg_to_pp / pp_to_hg: bit-exact round trips, DeepSpeed-compatible layer files, HF-loadable
output, and a clear message (no traceback, nothing written) for each bad input."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CONFIGS, REPO
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from convert.hg_to_pp import hg_to_pp
from convert.pp_to_hg import pp_to_hg
from convert.safetensors_stream import StreamingSafetensorsWriter, TensorSpec
from convert_model import main as cli
from models.heads import last_token_index, sequence_scores
from models.pipeline import SequentialPipe, build_layers, prepare_config

ROUND_TRIPS = [("llama", False, "float32"), ("llama", True, "float32"), ("bloom", None, "float32"),
               ("llama", False, "bfloat16"), ("bloom", None, "bfloat16")]


def hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("model_type,tied,dtype", ROUND_TRIPS)
def test_round_trip_is_bit_exact(tiny_hf, tmp_path, model_type, tied, dtype):
    src = tiny_hf(model_type, tied, dtype)
    pp = hg_to_pp(src, tmp_path / "pp", progress=False)
    back = pp_to_hg(pp, tmp_path / "hf", max_shard_size="60KB", progress=False)
    before, after = hf_tensors(src), hf_tensors(back)
    assert sorted(before) == sorted(after)
    for key, tensor in before.items():
        assert after[key].dtype == tensor.dtype == getattr(torch, dtype), key
        assert torch.equal(after[key], tensor), key
    assert len(list(back.glob("model-*.safetensors"))) > 1  # really sharded
    index = json.loads((back / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(before)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in before.values())
    config = json.loads((back / "config.json").read_text())
    assert config["dtype"] == dtype and config["architectures"] == [("Llama" if model_type == "llama" else "Bloom") + "ForCausalLM"]


@pytest.mark.parametrize("model_type,tied", [("llama", False), ("llama", True), ("bloom", None)])
def test_layer_files_and_metadata(tiny_hf, tmp_path, model_type, tied):
    src = tiny_hf(model_type, tied)
    pp = hg_to_pp(src, tmp_path / "pp", progress=False)
    meta = json.loads((pp / "pipetune.json").read_text())
    n = meta["num_pipe_layers"]
    tied = meta["tie_word_embeddings"]
    assert n == 4 + 3 and meta["model_type"] == model_type and meta["dtype"] == "float32"
    files = sorted(p.name for p in pp.glob("layer_*-model_states.pt"))
    # A tied head has no file of its own (DeepSpeed writes none either): it is the embedding.
    assert files == [f"layer_{i:02d}-model_states.pt" for i in range(n - (1 if tied else 0))]
    for name in ["config.json", "generation_config.json"] + (["tokenizer.model"] if model_type == "llama" else ["tokenizer.json"]):
        assert (pp / name).is_file(), name
    # Each file loads strictly into its pipe layer (what PipelineModule.load_state_dir does per layer).
    from transformers import AutoConfig

    layers = build_layers(prepare_config(AutoConfig.from_pretrained(pp)))
    for i, layer in enumerate(layers):
        if isinstance(layer, torch.nn.Module):
            layer.load_state_dict(torch.load(pp / f"layer_{i:02d}-model_states.pt", weights_only=True), strict=True)
    hf = AutoModelForCausalLM.from_pretrained(src).eval()
    ids = torch.randint(4, 1000, (2, 9))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        torch.testing.assert_close(SequentialPipe(layers).eval()((ids, mask)), hf(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=1e-5)


def test_dtype_option_casts(tiny_hf, tmp_path):
    pp = hg_to_pp(tiny_hf("llama"), tmp_path / "pp", dtype="bf16", progress=False)
    state = torch.load(pp / "layer_01-model_states.pt", weights_only=True)
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    assert json.loads((pp / "pipetune.json").read_text())["dtype"] == "bfloat16"
    back = pp_to_hg(pp, tmp_path / "hf", progress=False)
    assert json.loads((back / "config.json").read_text())["dtype"] == "bfloat16"
    assert (back / "model.safetensors").is_file() and not (back / "model.safetensors.index.json").exists()


def test_reads_sharded_safetensors_and_legacy_bin(tiny_hf, tmp_path):
    src = tiny_hf("llama")
    tensors = hf_tensors(src)
    reference = hg_to_pp(src, tmp_path / "ref", progress=False)

    sharded = tmp_path / "sharded"
    shutil.copytree(src, sharded, ignore=shutil.ignore_patterns("*.safetensors"))
    keys = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2], "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, part in halves.items():
        save_file({k: tensors[k] for k in part}, sharded / name, metadata={"format": "pt"})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {k: n for n, ks in halves.items() for k in ks}}))

    legacy = tmp_path / "legacy"
    shutil.copytree(src, legacy, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(tensors, legacy / "pytorch_model.bin")

    for folder in (sharded, legacy):
        out = hg_to_pp(folder, tmp_path / f"pp-{folder.name}", progress=False)
        for ref_file in reference.glob("layer_*"):
            a, b = torch.load(ref_file, weights_only=True), torch.load(out / ref_file.name, weights_only=True)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (folder.name, ref_file.name)


def test_bloom_checkpoint_saved_from_bare_base_model(tiny_hf, tmp_path):
    """bigscience/bloom-* store `h.0...` rather than `transformer.h.0...`."""
    src = tiny_hf("bloom")
    bare = tmp_path / "bare"
    shutil.copytree(src, bare)
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(src / "model.safetensors").items()}
    save_file(tensors, bare / "model.safetensors", metadata={"format": "pt"})
    back = pp_to_hg(hg_to_pp(bare, tmp_path / "pp", progress=False), tmp_path / "hf", progress=False)
    assert hf_tensors(back).keys() == load_file(src / "model.safetensors").keys()


def test_pp_to_hg_follows_training_save_path_and_global_step(tiny_hf, tmp_path):
    """A training save_path: side files at the top, layer files in global_stepN, `latest` names it."""
    pp = hg_to_pp(tiny_hf("bloom"), tmp_path / "pp", progress=False)
    save = tmp_path / "save"
    (save / "global_step7").mkdir(parents=True)
    for f in pp.iterdir():
        shutil.copy(f, save / ("global_step7" if f.name.startswith("layer_") else "") / f.name)
    (save / "global_step3").mkdir()  # an older, empty tag that `latest` does not name
    (save / "latest").write_text("global_step7")
    expected = hf_tensors(tiny_hf("bloom"))
    for source in (save, save / "global_step7"):
        out = pp_to_hg(source, tmp_path / f"hf-{source.name}", progress=False)
        got = hf_tensors(out)
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


def test_exported_folder_loads_and_generates_like_source(tiny_hf, tmp_path):
    src = tiny_hf("llama")
    out = pp_to_hg(hg_to_pp(src, tmp_path / "pp", progress=False), tmp_path / "hf", progress=False)
    tok = AutoTokenizer.from_pretrained(out)
    # The training prompt format travels with the tokenizer.
    from data.templates import chat_template

    assert tok.chat_template == chat_template(add_bos=True)
    messages = [{"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == "<s>Human:\nHi\n\nAssistant:\n"
    assert tok.decode(tok("hello world 你好", add_special_tokens=False)["input_ids"]) == "hello world 你好"
    ids = tok("The capital of France", return_tensors="pt")
    a = AutoModelForCausalLM.from_pretrained(src).generate(**ids, max_new_tokens=8, do_sample=False)
    b = AutoModelForCausalLM.from_pretrained(out).generate(**ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(a, b)


def test_streaming_writer_output_reads_back(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.tensor(2.5, dtype=torch.float16),
               "d": torch.arange(6).reshape(2, 3)[:, 1:]}  # non-contiguous view
    specs = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    with StreamingSafetensorsWriter(tmp_path / "x.safetensors", specs) as w:
        for k, v in tensors.items():
            w.write(k, v)
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        for k, v in tensors.items():
            assert torch.equal(f.get_tensor(k), v)
    with pytest.raises(ValueError, match="expected"):
        StreamingSafetensorsWriter(tmp_path / "y.safetensors", specs).write("b", tensors["b"])


def test_one_dtype_table_agrees_with_torch_and_safetensors(tmp_path):
    """models.dtypes is the only dtype table (converters' --dtype, safetensors headers both ways, the
    trainer's bytes per parameter): its names and sizes are those of torch and the safetensors library."""
    from convert.hf_reader import HFCheckpoint
    from models.dtypes import TABLE, bytes_per_param, element_size, precision_dtype

    tensors = {d.safetensors: torch.zeros(3, dtype=d.torch) for d in TABLE}
    save_file(tensors, tmp_path / "model.safetensors")
    raw = (tmp_path / "model.safetensors").read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    ckpt = HFCheckpoint(tmp_path)
    for d in TABLE:
        assert header[d.safetensors]["dtype"] == d.safetensors and ckpt.dtype(d.safetensors) == d.torch
        assert element_size(d.torch) == torch.empty((), dtype=d.torch).element_size() == d.nbytes
    specs = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    with StreamingSafetensorsWriter(tmp_path / "ours.safetensors", specs) as w:
        for k, v in tensors.items():
            w.write(k, v)
    assert load_file(tmp_path / "ours.safetensors").keys() == tensors.keys()
    assert [bytes_per_param(p) for p in ("fp32", "bf16", "fp16")] == [4, 2, 2]
    assert precision_dtype("bf16") == torch.bfloat16
    with pytest.raises(ValueError, match="precision 'int8': use one of fp32, bf16, fp16"):
        bytes_per_param("int8")


def test_one_tokenizer_file_list():
    """The tokenizer files a random model gets from its config folder are the ones checkpoints carry."""
    from models import pipe_dir, random_init

    assert set(pipe_dir.TOKENIZER_FILES) < set(pipe_dir.SIDE_FILES)
    assert set(random_init.COPIED_FILES) == set(pipe_dir.SIDE_FILES) - {"config.json"}


# ---------------------------------------------------------------------------------------------
# Export of a value head (reward model / critic) whose source config pads with EOS (single process).

def load_pipe(pp_dir: Path, head: str) -> SequentialPipe:
    """The pipeline of a folder's layer files, in one process."""
    from transformers import AutoConfig

    layers = build_layers(prepare_config(AutoConfig.from_pretrained(pp_dir)), head)
    for i, layer in enumerate(layers):
        if isinstance(layer, torch.nn.Module):
            layer.load_state_dict(torch.load(pp_dir / f"layer_{i:02d}-model_states.pt", weights_only=True), strict=True)
    return SequentialPipe(layers).eval()


def _value_head_checkpoint(out: Path, model_type: str, tokenizer_dir: Path, special: dict, metadata: dict) -> Path:
    """A pipeline folder with random value-head layer files whose config.json has pad_token_id == EOS."""
    from transformers import AutoConfig

    from models.pipe_dir import layer_file_name, write_metadata

    config = AutoConfig.from_pretrained(CONFIGS[model_type], **special)
    assert config.pad_token_id == config.eos_token_id
    torch.manual_seed(0)
    layers = build_layers(prepare_config(AutoConfig.from_pretrained(CONFIGS[model_type], **special)), "value")
    out.mkdir()
    for i, layer in enumerate(layers):
        if isinstance(layer, torch.nn.Module):
            for p in layer.parameters():
                p.data.normal_(0, 0.05)
            torch.save(layer.state_dict(), out / layer_file_name(i))
    config.save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        if f.name != "config.json":
            (out / f.name).write_bytes(f.read_bytes())
    write_metadata(out, model_type=model_type, head="value", **metadata)
    return out


@pytest.mark.parametrize("model_type,tokenizer,explicit", [("llama", "tiny-llama", False), ("bloom", "tiny-bloom", False),
                                                           ("llama", "llama3-style", False), ("llama", "llama3-style", True)])
def test_value_head_export_scores_like_the_pipeline_when_source_pads_with_eos(tmp_path, model_type, tokenizer, explicit):
    from data_fixtures import LLAMA3_RESERVED, llama3_style_tokenizer
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from data.batching import collate_pairs
    from data.dataset import build_dataset

    if tokenizer == "llama3-style":
        tok = llama3_style_tokenizer()
        tok.save_pretrained(tmp_path / "tok")
        tok_dir, special = tmp_path / "tok", {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    else:
        tok_dir = CONFIGS[model_type]
        tok = AutoTokenizer.from_pretrained(tok_dir)
        special = {}
    special["pad_token_id"] = tok.eos_token_id  # the source config pads with EOS (common)
    pad_token = LLAMA3_RESERVED[1] if explicit else None  # a training-time choice, recorded by the trainer
    records = [{"type": "pairwise", "prompt": f"Tell me about the {w}.", "chosen": f"Yes, gladly: the {w} is {a}.",
                "rejected": "No."} for w, a in (("river", "long and quiet"), ("garden", "green"), ("market", "busy"),
                                                 ("planet", "far away in the dark"), ("bridge", "old"), ("ocean", "deep"))]
    (tmp_path / "p.json").write_text(json.dumps(records))
    built = build_dataset(str(tmp_path / "p.json"), tok, 128, kind="pairwise", pad_token=pad_token)
    assert built.stats["train"]["truncated"] == 0
    pad = built.stats["pad"]["id"]
    pp = _value_head_checkpoint(tmp_path / "pp", model_type, tok_dir, special,
                                {"pad_token_id": pad} if explicit else {})
    hf_dir = pp_to_hg(pp, tmp_path / "hf", progress=False)
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["pad_token_id"] == pad != tok.eos_token_id  # the pad training used, not the source's EOS
    exported_tok = AutoTokenizer.from_pretrained(hf_dir)
    assert exported_tok.pad_token_id == pad  # HF-side batching pads with the same token

    (ids, mask), _, _ = collate_pairs([built.train[i] for i in range(len(built.train))])
    assert (mask.sum(-1) < mask.shape[1]).all()  # every row has pads after its EOS
    model = AutoModelForSequenceClassification.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        pipe = load_pipe(pp, "value")
        pipe_scores = sequence_scores(pipe((ids, mask)), last_token_index(mask))
        hf_scores = model(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
        torch.testing.assert_close(hf_scores, pipe_scores, rtol=0, atol=1e-5)
        # The same through the exported tokenizer: chat template + right padding with its pad token.
        exported_tok.padding_side = "right"
        texts = [exported_tok.decode(row[m.bool()].tolist()) for row, m in zip(ids, mask)]
        enc = exported_tok(texts, padding=True, add_special_tokens=False, return_tensors="pt")
        assert torch.equal(enc["input_ids"][:, :ids.shape[1]][enc["attention_mask"].bool()], ids[mask.bool()])
        torch.testing.assert_close(model(**enc).logits.squeeze(-1), pipe_scores, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Error paths: one clear line, exit code 2, no traceback, nothing written.

def run_cli(capsys, *argv):
    code = cli(list(argv) + ["--quiet"])
    err = capsys.readouterr().err
    return code, err


def assert_nothing_written(dest: Path):
    assert not dest.exists()
    assert not list(dest.parent.glob(f".{dest.name}.tmp-*"))


def test_error_input_not_local_dir(capsys, tmp_path):
    code, err = run_cli(capsys, "hg_to_pp", "--input-path", "meta-llama/Llama-2-7b-hf", "--save-path", str(tmp_path / "out"))
    assert code == 2 and "is not a local directory" in err and "huggingface-cli download" in err
    assert_nothing_written(tmp_path / "out")


def test_error_unknown_model_type(capsys, tiny_hf, tmp_path):
    src = tmp_path / "gpt"
    shutil.copytree(tiny_hf("llama"), src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt_neox"}))
    code, err = run_cli(capsys, "hg_to_pp", "--input-path", str(src), "--save-path", str(tmp_path / "out"))
    assert code == 2 and "'gpt_neox' is not supported; supported: bloom, gemma3_text, llama, mistral, qwen2, qwen3" in err
    assert_nothing_written(tmp_path / "out")


def test_error_missing_and_unexpected_weights(capsys, tiny_hf, tmp_path):
    src = tmp_path / "bad"
    shutil.copytree(tiny_hf("llama"), src)
    tensors = load_file(src / "model.safetensors")
    del tensors["model.layers.2.mlp.up_proj.weight"]
    tensors["model.layers.2.mlp.extra.weight"] = torch.zeros(2)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    code, err = run_cli(capsys, "hg_to_pp", "--input-path", str(src), "--save-path", str(tmp_path / "out"))
    assert code == 2
    assert "missing weights (1): model.layers.2.mlp.up_proj.weight" in err
    assert "unexpected weights (1): model.layers.2.mlp.extra.weight" in err
    assert_nothing_written(tmp_path / "out")


def test_error_shape_mismatch_both_directions(capsys, tiny_hf, tmp_path):
    src = tiny_hf("llama")
    bad_cfg = tmp_path / "badcfg"
    shutil.copytree(src, bad_cfg)
    cfg = json.loads((bad_cfg / "config.json").read_text())
    (bad_cfg / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 128}))
    code, err = run_cli(capsys, "hg_to_pp", "--input-path", str(bad_cfg), "--save-path", str(tmp_path / "out"))
    assert code == 2 and "model.layers.0.mlp.up_proj.weight: checkpoint [176, 64], config expects [128, 64]" in err
    assert_nothing_written(tmp_path / "out")

    pp = hg_to_pp(src, tmp_path / "pp", progress=False)
    shutil.copy(bad_cfg / "config.json", pp / "config.json")
    code, err = run_cli(capsys, "pp_to_hg", "--input-path", str(pp), "--save-path", str(tmp_path / "hf"))
    assert code == 2 and "layer_01-model_states.pt: mlp.up_proj.weight has shape [176, 64], config expects [128, 64]" in err
    assert_nothing_written(tmp_path / "hf")


def test_error_missing_layer_file(capsys, tiny_hf, tmp_path):
    pp = hg_to_pp(tiny_hf("llama"), tmp_path / "pp", progress=False)
    (pp / "layer_03-model_states.pt").unlink()
    code, err = run_cli(capsys, "pp_to_hg", "--input-path", str(pp), "--save-path", str(tmp_path / "hf"))
    assert code == 2 and "missing layer files for pipe layers 3 (block.2)" in err
    assert_nothing_written(tmp_path / "hf")


def test_error_non_empty_save_path_and_overwrite(capsys, tiny_hf, tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "keep.txt").write_text("x")
    code, err = run_cli(capsys, "hg_to_pp", "--input-path", str(tiny_hf("llama")), "--save-path", str(dest))
    assert code == 2 and "is not empty: choose another folder or pass --overwrite" in err
    assert (dest / "keep.txt").read_text() == "x"
    code, _ = run_cli(capsys, "hg_to_pp", "--input-path", str(tiny_hf("llama")), "--save-path", str(dest), "--overwrite")
    assert code == 0 and not (dest / "keep.txt").exists() and (dest / "layer_00-model_states.pt").is_file()


def test_cli_prints_no_traceback_and_documents_both_commands(tmp_path):
    """The real entry point: a user error is one line on stderr, exit code 2."""
    proc = subprocess.run([sys.executable, str(REPO / "convert_model.py"), "pp_to_hg", "--input-path", str(tmp_path),
                           "--save-path", str(tmp_path / "hf")], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ") and "no layer_NN-model_states.pt files" in proc.stderr
    help_text = subprocess.run([sys.executable, str(REPO / "convert_model.py"), "--help"], capture_output=True, text=True).stdout
    assert "hg_to_pp" in help_text and "pp_to_hg" in help_text
