"""hg_to_pp / pp_to_hg: bit-exact round trips, DeepSpeed-compatible layer files, HF-loadable
output, and a clear message (no traceback, nothing written) for each bad input."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from convert.hg_to_pp import hg_to_pp
from convert.pp_to_hg import pp_to_hg
from convert.safetensors_stream import StreamingSafetensorsWriter, TensorSpec
from convert_model import main as cli
from models.pipeline import SequentialPipe, build_layers, prepare_config

from conftest import REPO

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
    assert code == 2 and "'gpt_neox' is not supported; supported: bloom, llama" in err
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
