"""demo.py and inference/: greedy tokens equal the pipe layers' and HF's, the chat REPL builds exactly
the apply_chat_template prompt, batch mode writes one JSON line per input, user errors are one line,
every pipeline checkpoint kind renders the training template, and 2 AutoTP ranks give the
single-process tokens."""
import inspect
import io
import json
import os
import shutil
import subprocess
import sys
import types

import pytest
import torch
from conftest import CONFIGS, REPO, launch_ranks
from transformers import AutoConfig, AutoModelForCausalLM

import demo
from compat.private_api import avoid_shm_allreduce_segfault
from convert.hg_to_pp import hg_to_pp
from convert.pp_to_hg import load_layer, pp_to_hg
from inference.chat import run_repl
from inference.hf_chat import ChatModel
from inference.loading import context_length, load_model
from inference.parallel import Ranks
from models.pipe_dir import find_layer_files
from models.pipeline import SequentialPipe, build_layers, prepare_config
from models.random_init import save_random_model

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
MAX_NEW = 12


def make_chat(model_path, max_context=None, **overrides):
    argv = ["--model-path", str(model_path), "--greedy", "--max-new-tokens", str(MAX_NEW)]
    if max_context:
        argv += ["--max-context", str(max_context)]
    args = demo.build_parser().parse_args(argv)
    vars(args).update(overrides)
    model, tokenizer = load_model(args.model_path, args.dtype)
    return ChatModel(model, tokenizer, args, "cpu", context_length(model.config, tokenizer, args.max_context))


def pipe_greedy(pp_dir, prompt_ids, eos_ids, max_new=MAX_NEW):
    """Greedy decoding with the pipe layers (one process, no KV cache: the whole sequence each step)."""
    config = prepare_config(AutoConfig.from_pretrained(pp_dir))
    layers = build_layers(config)
    files = find_layer_files(pp_dir)
    for i, layer in enumerate(layers):
        if isinstance(layer, torch.nn.Module):
            layer.load_state_dict(load_layer(files[i]), strict=True)
    pipe = SequentialPipe(layers).eval()
    ids, new = torch.tensor([prompt_ids]), []
    with torch.no_grad():
        for _ in range(max_new):
            logits = pipe((ids, torch.ones_like(ids)))  # [1, T, V]
            token = int(logits[0, -1].argmax())
            new.append(token)
            if token in eos_ids:
                break
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return new


def hf_greedy(hf_dir, prompt_ids, eos_ids):
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW, do_sample=False,
                         eos_token_id=eos_ids, pad_token_id=eos_ids[0])
    return out[0, len(prompt_ids):].tolist()


def perturb_layer_files(pp_dir, seed=1, scale=0.3):
    """Stand-in for training: change every weight of the pipeline checkpoint."""
    gen = torch.Generator().manual_seed(seed)
    for path in find_layer_files(pp_dir).values():
        state = {k: v.clone() for k, v in torch.load(path, weights_only=True).items()}
        for v in state.values():
            if v.is_floating_point():
                v.add_(torch.randn(v.shape, generator=gen) * scale)
        torch.save(state, path)


CASES = [("llama", False), ("llama", True), ("bloom", None)]
# HF's default init (std 0.02) makes tiny random models repeat one token; a wider init gives varied
# greedy continuations, so token equality means something.
INIT_RANGE = {"llama": 0.3, "bloom": 1.0}


def lively(tiny_hf, model_type, tied=None):
    return tiny_hf(model_type, tied, initializer_range=INIT_RANGE[model_type])


@pytest.mark.parametrize("model_type,tied", CASES)
def test_greedy_tokens_equal_pipe_layers_and_source_model(tiny_hf, tmp_path, model_type, tied):
    src = lively(tiny_hf, model_type, tied)
    pp = hg_to_pp(src, tmp_path / "pp", progress=False)
    exported = pp_to_hg(pp, tmp_path / "hf", progress=False)
    chat = make_chat(exported)
    ids = chat.prompt_ids(MESSAGES)
    from_export = chat.generate(ids).token_ids
    from_pipe_ckpt = make_chat(pp).generate(ids).token_ids  # converted in memory
    assert len(from_export) >= 4 and len(set(from_export)) >= 3
    assert from_export == from_pipe_ckpt == pipe_greedy(pp, ids, chat.eos_ids) == hf_greedy(src, ids, chat.eos_ids)


def test_trained_weights_come_from_the_checkpoint(tiny_hf, tmp_path):
    """After 'training' (perturbed layer files), export and in-memory conversion follow the pipe
    layers, not the source model."""
    src = tiny_hf("llama", False)
    pp = hg_to_pp(src, tmp_path / "pp", progress=False)
    perturb_layer_files(pp)
    exported = pp_to_hg(pp, tmp_path / "hf", progress=False)
    chat = make_chat(exported)
    ids = chat.prompt_ids(MESSAGES)
    tokens = chat.generate(ids).token_ids
    assert len(set(tokens)) >= 3
    assert tokens == make_chat(pp).generate(ids).token_ids == pipe_greedy(pp, ids, chat.eos_ids)
    assert tokens != hf_greedy(src, ids, chat.eos_ids)


def test_pipeline_checkpoint_in_memory_writes_nothing_and_shares_mmap(tiny_hf, tmp_path):
    pp = hg_to_pp(tiny_hf("bloom"), tmp_path / "pp", progress=False)
    before = sorted(p.name for p in pp.iterdir())
    model, tokenizer = load_model(str(pp), "auto")
    assert sorted(p.name for p in pp.iterdir()) == before
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()  # tied
    assert tokenizer.chat_template and model.dtype == torch.float32
    bf16, _ = load_model(str(pp), "bfloat16")
    assert bf16.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# Chat REPL

@pytest.fixture(scope="module")
def llama_pp(tiny_hf, tmp_path_factory):
    return hg_to_pp(tiny_hf("llama", False), tmp_path_factory.mktemp("demo") / "pp", progress=False)


def test_repl_two_turns_reset_exit_prompts_equal_apply_chat_template(llama_pp):
    chat = make_chat(llama_pp)
    tok = chat.tokenizer
    stdin = io.StringIO("Hello there\nAnd then?\n/reset\n\nFresh start\n/exit\nnever read\n")
    out, err = io.StringIO(), io.StringIO()
    session = run_repl(chat, Ranks(), stdin, out, err, seed=0)

    replies = out.getvalue().split("\n")[:-1]  # streamed replies, one per line
    assert len(session.prompts) == 3 and len(replies) == 3
    turn1 = [{"role": "user", "content": "Hello there"}]
    turn2 = turn1 + [{"role": "assistant", "content": replies[0]}, {"role": "user", "content": "And then?"}]
    turn3 = [{"role": "user", "content": "Fresh start"}]  # after /reset
    for ids, messages in zip(session.prompts, (turn1, turn2, turn3)):
        assert ids == tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    # The training format, literally (LLaMA: BOS text first; the reply ends with EOS).
    assert tok.decode(session.prompts[1]) == f"<s>Human:\nHello there\n\nAssistant:\n{replies[0]}</s>\n\nHuman:\nAnd then?\n\nAssistant:\n"
    # Streamed text == the decoded reply (greedy, so a rerun gives the same tokens).
    assert replies[0] == chat.generate(session.prompts[0]).text
    assert "[conversation reset]" in err.getvalue()
    assert session.history[0] == turn3[0] and session.history[1]["content"] == replies[2]


def test_repl_drops_oldest_turns_to_fit_context(llama_pp):
    chat = make_chat(llama_pp, max_context=MAX_NEW + 48)
    out, err = io.StringIO(), io.StringIO()
    session = run_repl(chat, Ranks(), io.StringIO("one two three\nfour five six\nseven eight\n"), out, err, seed=0)
    assert "dropped the 1 oldest turn" in err.getvalue()
    assert all(len(ids) <= chat.prompt_budget for ids in session.prompts) and len(session.prompts) == 3
    # The last prompt starts at a user turn and still ends with the newest message.
    text = chat.tokenizer.decode(session.prompts[-1])
    assert text.startswith("<s>Human:\n") and text.endswith("Human:\nseven eight\n\nAssistant:\n")
    assert "one two three" not in text
    # A message that cannot fit is refused, not sent.
    session2 = run_repl(chat, Ranks(), io.StringIO("word " * 80 + "\n"), io.StringIO(), err2 := io.StringIO(), seed=0)
    assert session2.prompts == [] and "message too long" in err2.getvalue()


def test_repl_through_stdin_subprocess(llama_pp):
    """The real CLI: piped stdin, greedy, replies on stdout, notices on stderr, exit 0."""
    proc = subprocess.run([sys.executable, str(REPO / "demo.py"), "--model-path", str(llama_pp), "--greedy",
                           "--max-new-tokens", "6", "--dtype", "float32"],
                          input="Hi\n/reset\nHi\n/exit\n", capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split("\n")
    assert len(lines) == 3 and lines[0] == lines[1] and lines[0]  # same question after /reset: same greedy reply
    assert "[conversation reset]" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------
# Batch mode

BATCH_INPUTS = [
    "Plain string prompt",
    {"prompt": "Tell me a joke", "id": "q2"},
    {"type": "instruct", "instruct": "Translate to French", "input": "Good morning", "output": "Bonjour"},
    {"rounds": [["ask", "Hi"], ["ans", "Hello!"], ["ask", "How are you?"]]},
    {"type": "conversation", "rounds": [["ask", "Name a color"], ["ans", "Blue"]]},
]
EXPECTED_MESSAGES = [
    [{"role": "user", "content": "Plain string prompt"}],
    [{"role": "user", "content": "Tell me a joke"}],
    [{"role": "user", "content": "Translate to French\n\nGood morning"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "How are you?"}],
    [{"role": "user", "content": "Name a color"}],
]


def write_jsonl(path, rows, blank_after=None):
    lines = [json.dumps(r) for r in rows]
    if blank_after is not None:
        lines.insert(blank_after, "")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_batch_mode_writes_one_json_line_per_input(llama_pp, tmp_path):
    prompts = write_jsonl(tmp_path / "in.jsonl", BATCH_INPUTS, blank_after=2)
    out = tmp_path / "sub" / "out.jsonl"
    err = io.StringIO()
    argv = ["--model-path", str(llama_pp), "--prompts-file", str(prompts), "--output", str(out), "--greedy",
            "--max-new-tokens", str(MAX_NEW), "--save-token-ids"]
    assert demo.main(argv, stdout=io.StringIO(), stderr=err) == 0, err.getvalue()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == len(BATCH_INPUTS)
    chat = make_chat(llama_pp)
    for row, messages in zip(rows, EXPECTED_MESSAGES):
        assert {"prompt", "response", "tokens", "seconds", "finish_reason"} <= set(row)
        assert row["prompt"] == messages[-1]["content"]
        expected = chat.generate(chat.prompt_ids(messages))
        assert row["token_ids"] == expected.token_ids and row["tokens"] == len(expected.token_ids)
        assert row["response"] == expected.text and row["finish_reason"] == expected.finish_reason
        assert isinstance(row["seconds"], float) and row["seconds"] > 0
    assert rows[1]["id"] == "q2"
    assert rows[2]["reference"] == "Bonjour" and rows[4]["reference"] == "Blue"
    assert rows[3]["messages"] == EXPECTED_MESSAGES[3] and "reference" not in rows[3]
    assert "[done: 5 replies" in err.getvalue()


def test_batch_sampling_is_seeded_per_input(llama_pp, tmp_path):
    """Sampling: the same --seed gives the same reply to an input wherever it is in the file."""
    def run(rows):
        prompts = write_jsonl(tmp_path / "s.jsonl", rows)
        out = io.StringIO()
        assert demo.main(["--model-path", str(llama_pp), "--prompts-file", str(prompts), "--seed", "7",
                          "--temperature", "1.0", "--top-k", "0", "--max-new-tokens", "8"], stdout=out, stderr=io.StringIO()) == 0
        return [json.loads(line)["response"] for line in out.getvalue().splitlines()]

    both = run(["first", "second"])
    assert run(["second"]) == both[1:]


# ---------------------------------------------------------------------------------------------
# User errors: one line, exit 2

@pytest.mark.parametrize("lines,expected", [
    (['"ok"', "{not json"], "bad.jsonl: record 1 (line 2): invalid JSON"),
    (['"ok"', "", '{"type": "instruct", "instruction": "x"}'], "bad.jsonl: record 1 (line 3): field 'instruction': unknown field"),
    (['{"type": "conversation", "rounds": [["ans", "only an answer"]]}'], "nothing to answer"),
    (['{"type": "pretrain", "text": "x"}'], "no chat form"),
    (['{"rounds": [["user", "x"]]}'], "unknown role 'user'"),
])
def test_bad_prompts_file_line_is_one_error_line(llama_pp, tmp_path, lines, expected):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    err = io.StringIO()
    assert demo.main(["--model-path", str(llama_pp), "--prompts-file", str(bad)], stderr=err) == 2
    assert err.getvalue().count("\n") == 1 and err.getvalue().startswith("error: ")
    assert expected in err.getvalue()


@pytest.mark.parametrize("extra,expected", [
    (["--temperature", "0", "--prompt", "x"], "--temperature must be > 0"),
    (["--top-p", "1.5", "--prompt", "x"], "--top-p"),
    (["--output", "o.jsonl", "--prompt", "x"], "--output goes with --prompts-file"),
    (["--max-context", "16", "--prompt", "a long question " * 10], "the prompt is"),
    (["--max-context", "8", "--max-new-tokens", "8", "--prompt", "x"], "--max-context must be larger"),
    (["--record", '{"type": "instruct"}'], "--record: record 0: field 'instruct': missing"),
    (["--kernel-inject", "on", "--device", "cpu", "--prompt", "x"], "needs CUDA"),  # --device cpu: also on a CUDA machine
])
def test_bad_options_are_one_error_line(llama_pp, extra, expected):
    err = io.StringIO()
    assert demo.main(["--model-path", str(llama_pp), "--max-new-tokens", "4", *extra], stdout=io.StringIO(), stderr=err) == 2
    lines = err.getvalue().splitlines()  # errors found after loading follow the model banner line
    assert lines[-1].startswith("error: ") and expected in lines[-1] and len(lines) <= 2, err.getvalue()


def test_bad_model_path_cli_has_no_traceback(tmp_path):
    (tmp_path / "empty").mkdir()
    for path, expected in [(tmp_path / "missing", "no such folder"), (tmp_path / "empty", "no config.json and no pipeline layer files")]:
        err = io.StringIO()
        assert demo.main(["--model-path", str(path), "--prompt", "x"], stderr=err) == 2
        assert expected in err.getvalue() and err.getvalue().count("\n") == 1
    proc = subprocess.run([sys.executable, str(REPO / "demo.py"), "--model-path", str(tmp_path / "missing"), "--prompt", "x"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == f"error: --model-path {tmp_path / 'missing'}: no such folder\n"


def test_record_argument_renders_instruct(llama_pp):
    out, err = io.StringIO(), io.StringIO()
    record = {"type": "instruct", "instruct": "Translate to French", "input": "Good morning"}
    assert demo.main(["--model-path", str(llama_pp), "--record", json.dumps(record), "--greedy", "--max-new-tokens",
                      str(MAX_NEW), "--show-prompt"], stdout=out, stderr=err) == 0
    assert "<s>Human:\nTranslate to French\n\nGood morning\n\nAssistant:\n" in err.getvalue()
    chat = make_chat(llama_pp)
    assert out.getvalue() == chat.generate(chat.prompt_ids(EXPECTED_MESSAGES[2])).text + "\n"


# ---------------------------------------------------------------------------------------------
# The AutoTP all-reduce workaround

def test_shm_allreduce_workaround(monkeypatch):
    from deepspeed.comm import comm
    from deepspeed.comm.torch import TorchBackend

    # The attribute we turn off is the one DeepSpeed's inference_all_reduce consults.
    assert "shm_vector_kernel_level" in inspect.getsource(TorchBackend.inference_all_reduce)
    backend = types.SimpleNamespace(shm_vector_kernel_level=1)
    monkeypatch.setattr(comm, "cdb", backend)
    assert not avoid_shm_allreduce_segfault({"LOCAL_SIZE": "2", "WORLD_SIZE": "2"})  # deepspeed launcher, one node
    assert backend.shm_vector_kernel_level == 1
    assert avoid_shm_allreduce_segfault({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"})  # torchrun: no LOCAL_SIZE
    assert backend.shm_vector_kernel_level == 0
    backend.shm_vector_kernel_level = 2
    assert avoid_shm_allreduce_segfault({"LOCAL_SIZE": "8", "WORLD_SIZE": "16"})  # 2 nodes
    assert backend.shm_vector_kernel_level == 0


# ---------------------------------------------------------------------------------------------

@pytest.mark.multirank
def test_two_rank_autotp_gives_single_process_tokens(tiny_hf, tmp_path):
    """One `deepspeed --num_gpus 2` launch: demo.main with AutoTP (tp_size 2) on a LLaMA pipeline
    checkpoint and a BLOOM HF folder (batch), and the chat REPL (rank 0 reads stdin, shares lines)."""
    llama_pp = hg_to_pp(lively(tiny_hf, "llama", False), tmp_path / "llama-pp", progress=False)
    bloom_hf = lively(tiny_hf, "bloom")
    prompts = write_jsonl(tmp_path / "in.jsonl", BATCH_INPUTS[:3])
    chat_in = tmp_path / "chat.txt"
    chat_in.write_text("Hello there\nAnd then?\n/reset\nHello there\n/exit\n")
    proc = launch_ranks(REPO / "tests" / "multirank" / "demo_tp.py",
                        "--batch", f"{llama_pp}:{prompts}:{tmp_path / 'llama.jsonl'}",
                        "--batch", f"{bloom_hf}:{prompts}:{tmp_path / 'bloom.jsonl'}",
                        "--chat", f"{llama_pp}:{chat_in}:{tmp_path / 'chat_out.txt'}", timeout=900)
    assert "AutoTP" in proc.stdout + proc.stderr  # DeepSpeed really sharded the model

    for model_path, name in [(llama_pp, "llama"), (bloom_hf, "bloom")]:
        rows = [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
        chat = make_chat(model_path, max_new_tokens=10)
        expected = [chat.generate(chat.prompt_ids(m)).token_ids for m in EXPECTED_MESSAGES[:3]]
        assert [r["token_ids"] for r in rows] == expected, name
        assert len({t for ids in expected for t in ids}) >= 6, name  # varied tokens, not one repeated
    chat = make_chat(llama_pp, max_new_tokens=10)
    session = run_repl(chat, Ranks(), io.StringIO(chat_in.read_text()), single := io.StringIO(), io.StringIO(), seed=0)
    assert (tmp_path / "chat_out.txt").read_text() == single.getvalue() and len(session.prompts) == 3


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads the process's mappings from /proc (Linux)")
def test_pipeline_checkpoint_weights_are_memory_mapped_not_copied(tiny_hf, tmp_path):
    """Without a cast, every weight of the in-memory model lies in a mapping of a layer file."""
    pp = hg_to_pp(tiny_hf("llama", False), tmp_path / "pp", progress=False)
    model, _ = load_model(str(pp), "auto")
    maps = []  # (start, end, path) of this process's file mappings
    with open("/proc/self/maps") as fh:
        for line in fh:
            fields = line.split(maxsplit=5)
            if len(fields) == 6:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                maps.append((start, end, fields[5].strip()))

    def mapped_file(tensor):
        ptr = tensor.data_ptr()
        return next((path for start, end, path in maps if start <= ptr < end), None)

    files = {str(p) for p in find_layer_files(pp).values()}
    assert all(mapped_file(p) in files for p in model.parameters())
    bf16, _ = load_model(str(pp), "bfloat16")  # a cast copies
    assert not any(mapped_file(p) in files for p in bf16.parameters())


# ---------------------------------------------------------------------------------------------
# The prompt format: a pipeline checkpoint renders with the training template (issue 11, defect 2)

INST_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
                 "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
TRAINING_PROMPT = "<s>Human:\nHi\n\nAssistant:\n"  # data.templates for LLaMA (BOS text first)


def chat_model_source(tmp_path, where):
    """A tiny LLaMA HF folder whose tokenizer carries its own [INST] chat template, stored `where`:
    in tokenizer_config.json (Llama-2-chat) or as chat_template.jinja (transformers 5 saves)."""
    config_dir = tmp_path / "chat-config"
    shutil.copytree(CONFIGS["llama"], config_dir)
    if where == "tokenizer_config.json":
        tc = json.loads((config_dir / "tokenizer_config.json").read_text())
        (config_dir / "tokenizer_config.json").write_text(json.dumps({**tc, "chat_template": INST_TEMPLATE}))
    else:
        (config_dir / "chat_template.jinja").write_text(INST_TEMPLATE)
    return save_random_model(config_dir, tmp_path / "chat-hf", seed=0)


def training_run_layout(pp, save_path):
    """A training save_path from a hg_to_pp dir: side files in SAVE_PATH, layer files in
    SAVE_PATH/global_step1, DeepSpeed's `latest` naming it."""
    shutil.copytree(pp, save_path)
    (save_path / "global_step1").mkdir()
    for path in find_layer_files(save_path).values():
        path.rename(save_path / "global_step1" / path.name)
    (save_path / "latest").write_text("global_step1")
    return save_path


def shown_prompt(model_path):
    err = io.StringIO()
    assert demo.main(["--model-path", str(model_path), "--prompt", "Hi", "--greedy", "--max-new-tokens", "1",
                      "--show-prompt"], stdout=io.StringIO(), stderr=err) == 0, err.getvalue()
    return err.getvalue().split("[prompt]\n", 1)[1].split("\n[", 1)[0]


@pytest.mark.parametrize("where", ["tokenizer_config.json", "chat_template.jinja"])
def test_every_pipeline_checkpoint_kind_renders_the_training_template(tmp_path, where):
    src = chat_model_source(tmp_path, where)
    assert shown_prompt(src) == "<s>[INST] Hi [/INST]"  # an HF folder keeps its own template
    pp = hg_to_pp(src, tmp_path / "pp", progress=False)
    save_path = training_run_layout(pp, tmp_path / "run")
    exported = pp_to_hg(pp, tmp_path / "export", progress=False)
    for model_path in (pp, save_path, save_path / "global_step1", exported):
        assert shown_prompt(model_path) == TRAINING_PROMPT, model_path
    chat = make_chat(save_path / "global_step1")
    assert chat.tokenizer.decode(chat.prompt_ids([{"role": "user", "content": "Hi"}])) == TRAINING_PROMPT
