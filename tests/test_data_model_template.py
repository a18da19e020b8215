"""template "model": training with the tokenizer's own chat template (Llama-3 and ChatML styles, written
in tests/data_fixtures.py, tokenizers without a usable pad token) trains exactly the assistant tokens
(content + end-of-turn token), and demo.py renders prompts token for token as training saw them, for a
training save_path, its global_stepN and the pp_to_hg export."""
import json
import shutil
import types

import pytest
from data_fixtures import (
    CHATML_GENERATION_TEMPLATE,
    CHATML_TEMPLATE,
    LLAMA3_BOS,
    LLAMA3_TEMPLATE,
    ROOT,
    chat_tokenizer,
    write_json,
    write_jsonl,
)
from transformers import AutoConfig, AutoTokenizer

from data.chat_template import ModelTemplate
from data.dataset import build_dataset
from data.errors import DataError, TokenizerError

T = 128
CONVERSATION = {"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello, friend."},
                             {"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "It is 4."}]}
REF_QA = {"type": "ref_qa", "reference": "Pandas eat bamboo.", "rounds": [["ask", "What do pandas eat?"], ["ans", "Bamboo."]]}
INSTRUCT = {"type": "instruct", "instruct": "Translate.", "input": "Good morning!", "output": "早上好！"}
PAIR = {"type": "pairwise", "rounds": [["ask", "Hi"], ["ans", "Hey"], ["ask", "Joke?"]], "chosen": "Knock knock.",
        "rejected": "No."}


def segments_llama3(messages, add_generation_prompt=False):
    """(text, trained) pieces of LLAMA3_TEMPLATE's rendering, written out by hand."""
    out = [(LLAMA3_BOS, False)]
    for m in messages:
        out.append((f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n", False))
        trained = m["role"] == "assistant"
        out += [(m["content"].strip(), trained), ("<|eot_id|>", trained)]
    if add_generation_prompt:
        out.append(("<|start_header_id|>assistant<|end_header_id|>\n\n", False))
    return out


def segments_chatml(messages, add_generation_prompt=False):
    out = []
    for m in messages:
        trained = m["role"] == "assistant"
        out += [(f"<|im_start|>{m['role']}\n", False), (m["content"], trained), ("<|im_end|>", trained), ("\n", False)]
    if add_generation_prompt:
        out.append(("<|im_start|>assistant\n", False))
    return out


def expected(tok, segments):
    """Ids and trained mask from tokenizing each piece alone (the templates' pieces meet at pre-tokenizer
    boundaries, so this equals tokenizing the whole text); position 0 is never trained."""
    ids, mask = [], []
    for text, trained in segments:
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids += piece
        mask += [trained] * len(piece)
    mask[0] = False
    return ids, mask


def lm_rows(built):
    out = []
    for i in range(len(built.train)):
        (ids, attn), labels = built.train[i]
        n = int(attn.sum())
        out.append((ids[:n].tolist(), (labels[:n] != -100).tolist()))
    return out


MESSAGES_OF = {  # what each record is as messages (the template's input)
    "conversation": CONVERSATION["messages"],
    "ref_qa": [{"role": "system", "content": REF_QA["reference"]}, {"role": "user", "content": "What do pandas eat?"},
               {"role": "assistant", "content": "Bamboo."}],
    "instruct": [{"role": "user", "content": "Translate.\n\nGood morning!"}, {"role": "assistant", "content": "早上好！"}],
}


@pytest.mark.parametrize("style,template,segments", [
    ("llama3", LLAMA3_TEMPLATE, segments_llama3),                 # incremental rendering (no generation blocks)
    ("chatml", CHATML_GENERATION_TEMPLATE, segments_chatml),      # {% generation %} assistant masks
    ("chatml", CHATML_TEMPLATE, segments_chatml),                 # the same template without them
])
def test_trains_exactly_the_assistant_tokens(tmp_path, style, template, segments):
    tok = chat_tokenizer(style, template)
    path = write_jsonl(tmp_path / "d.jsonl", [CONVERSATION])
    other = write_json(tmp_path / "u.json", [REF_QA, INSTRUCT])
    built = build_dataset([path, other], tok, T, template="model")
    want = [expected(tok, segments(MESSAGES_OF[k])) for k in ("conversation", "ref_qa", "instruct")]
    assert lm_rows(built) == want
    st = built.stats["template"]
    assert st["generation_blocks"] == ("{% generation %}" in template) and st["prompt_boundary_ok"]
    assert st["end_of_turn"] == ("<|eot_id|>" if style == "llama3" else "<|im_end|>")
    # no pad token to use: choose_pad picked a reserved token (Llama-3) / unk (SmolLM2: its pad is EOS)
    assert built.stats["pad"]["source"] == ("spare_special" if style == "llama3" else "unk_token")
    assert tok.pad_token_id in (None, tok.eos_token_id)


@pytest.mark.parametrize("style", ["llama3", "chatml"])
def test_pairwise_and_prompt_kinds(tmp_path, style):
    tok = chat_tokenizer(style)
    segments = segments_llama3 if style == "llama3" else segments_chatml
    path = write_json(tmp_path / "p.json", [PAIR])
    context = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"}, {"role": "user", "content": "Joke?"}]
    built = build_dataset(path, tok, T, kind="pairwise", template="model")
    (ids, attn), labels, _ = built.train[0]
    for row, answer in enumerate(("Knock knock.", "No.")):
        segs = [(text, trained and i >= len(segments(context)))  # the answer inside the prompt is context
                for i, (text, trained) in enumerate(segments(context + [{"role": "assistant", "content": answer}]))]
        n = int(attn[row].sum())
        assert (ids[row, :n].tolist(), (labels[row, :n] != -100).tolist()) == expected(tok, segs)
    prompts = build_dataset(path, tok, T, kind="prompt", template="model")
    ids, attn = prompts.train[0]
    assert ids[attn.bool()].tolist() == tok.apply_chat_template(context, add_generation_prompt=True, tokenize=True,
                                                                 return_dict=False)


def test_context_cut_drops_whole_oldest_exchanges(tmp_path):
    tok = chat_tokenizer("llama3")
    long = {"type": "pairwise", "rounds": [["ask", "Tell me everything about the pipeline " * 6], ["ans", "Sure " * 20],
                                          ["ask", "Joke?"]], "chosen": "Knock knock.", "rejected": "No."}
    path = write_json(tmp_path / "p.json", [long])
    built = build_dataset(path, tok, 40, kind="pairwise", template="model")
    assert built.stats["train"]["context_cut"] == 1
    (ids, attn), _, _ = built.train[0]
    last = [{"role": "user", "content": "Joke?"}, {"role": "assistant", "content": "Knock knock."}]
    assert ids[0, :int(attn[0].sum())].tolist() == tok.apply_chat_template(last, tokenize=True, return_dict=False)
    with pytest.raises(ValueError, match="no pairwise samples left"):
        build_dataset(path, tok, 12, kind="pairwise", template="model")


def test_template_problems(tmp_path):
    tok = chat_tokenizer("chatml")
    no_template = chat_tokenizer("chatml", "{{ '' }}")
    with pytest.raises(TokenizerError, match="found 0 trained spans"):
        ModelTemplate(no_template)
    plain = AutoTokenizer.from_pretrained(f"{ROOT}/configs/tiny-bloom")
    plain.chat_template = None
    with pytest.raises(TokenizerError, match='template "model": tokenizer .* has no usable chat_template'):
        build_dataset(write_json(tmp_path / "a.json", [INSTRUCT]), plain, T, template="model")
    no_stop = chat_tokenizer("chatml", "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                                       "{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(TokenizerError, match="not a special token such as EOS '<\\|im_end\\|>': a model trained on it "
                                             "would not learn to stop"):
        build_dataset(write_json(tmp_path / "a.json", [INSTRUCT]), no_stop, T, template="model")
    # a template that refuses a conversation (roles must alternate): that record, by file and index
    strict = chat_tokenizer("chatml", "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                                      "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
                                      "{% endfor %}" + CHATML_TEMPLATE)
    path = write_json(tmp_path / "c.json", [INSTRUCT, {"type": "conversation", "rounds": [["ask", "a"], ["ask", "b"],
                                                                                         ["ans", "c"]]}])
    with pytest.raises(DataError) as e:
        build_dataset(path, strict, T, template="model")
    assert e.value.lines == [f"{path}: record 1: the model's chat template cannot render this record: Conversation "
                             "roles must alternate user/assistant"]
    assert build_dataset(path, strict, T, template="model", strict=False).stats["invalid"] == {"template": 1}
    # special-token text in a record is refused under the model's template too, naming the user's field
    bad = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "Hi<|im_start|>"},
                                                           {"role": "assistant", "content": "x"}]}])
    with pytest.raises(DataError, match="field 'messages\\[0\\].content': contains the special token text '<\\|im_start\\|>'"):
        build_dataset(bad, tok, T, template="model")


def test_cache_key_follows_the_template(tmp_path):
    path = write_json(tmp_path / "a.json", [INSTRUCT])
    keys = {build_dataset(path, tok, T, template=t, cache_dir=str(tmp_path / "c")).stats["cache"]["key"]
            for tok in (chat_tokenizer("chatml", CHATML_TEMPLATE), chat_tokenizer("chatml", CHATML_GENERATION_TEMPLATE))
            for t in ("pipetune", "model")}
    assert len(keys) == 3  # pipetune's template ignores the tokenizer's: the two pipetune builds share a key


# ----------------------------------------------------------------------------------------------
# Export and demo use the template training used

def chat_model_dir(tmp_path, style):
    """A tiny LLaMA HF folder whose tokenizer is the chat tokenizer (with its chat template)."""
    from models.random_init import save_random_model

    config_dir = tmp_path / "config"
    config_dir.mkdir()
    for name in ("config.json", "generation_config.json"):
        shutil.copy2(f"{ROOT}/configs/tiny-llama/{name}", config_dir / name)
    tok = chat_tokenizer(style)
    tok.save_pretrained(config_dir)
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    gen = json.loads((config_dir / "generation_config.json").read_text())
    (config_dir / "generation_config.json").write_text(json.dumps({**gen, **ids}))
    return save_random_model(config_dir, tmp_path / "hf", seed=0, overrides=ids)


def training_save_path(pp, save_path, template):
    """What training leaves in SAVE_PATH (prepare_save_path: side files + pipetune.json with the
    template of the training config), layer files in SAVE_PATH/global_step1 named by `latest`."""
    from models.pipe_dir import find_layer_files, read_metadata
    from trainer.engine.checkpoint import prepare_save_path

    config_path = save_path.parent / "train.json"
    config_path.write_text(json.dumps({"template": template}))
    meta = read_metadata([pp])
    plan = types.SimpleNamespace(side_dir=pp, model_config=AutoConfig.from_pretrained(pp), layer_names=meta["layer_names"],
                                 head="lm")
    prepare_save_path(str(save_path), plan, str(config_path), "float32", pad_token_id=0)
    (save_path / "global_step1").mkdir()
    for path in find_layer_files(pp).values():
        shutil.copy2(path, save_path / "global_step1" / path.name)
    (save_path / "latest").write_text("global_step1")
    return save_path


def demo_chat(model_path):
    import demo
    from inference.hf_chat import ChatModel
    from inference.loading import context_length, load_model

    args = demo.build_parser().parse_args(["--model-path", str(model_path), "--greedy", "--max-new-tokens", "4"])
    model, tokenizer = load_model(args.model_path, args.dtype)
    return ChatModel(model, tokenizer, args, "cpu", context_length(model.config, tokenizer, None))


@pytest.mark.parametrize("style", ["llama3", "chatml"])
def test_demo_renders_prompts_as_training_did(tmp_path, style):
    from convert.hg_to_pp import hg_to_pp
    from convert.pp_to_hg import pp_to_hg

    pp = hg_to_pp(chat_model_dir(tmp_path, style), tmp_path / "pp", progress=False)
    run = training_save_path(pp, tmp_path / "run", "model")
    assert json.loads((run / "pipetune.json").read_text())["template"] == "model"
    train_tok = AutoTokenizer.from_pretrained(run)
    data = write_jsonl(tmp_path / "d.jsonl", [CONVERSATION])
    (sample_ids, trained), = lm_rows(build_dataset(data, train_tok, T, template="model"))
    context = CONVERSATION["messages"][:3]
    (prompt_ids, attn), = [build_dataset(write_jsonl(tmp_path / "p.jsonl", [{"prompt": context}]), train_tok, T,
                                         kind="prompt", template="model").train[0]]
    prompt_ids = prompt_ids[attn.bool()].tolist()
    last_true = len(trained) - 1 - trained[::-1].index(True)
    last_answer = last_true - trained[last_true::-1].index(False) + 1  # the first token of the last trained run
    assert sample_ids[:last_answer] == prompt_ids  # training's context of the last answer == the PPO prompt
    exported = pp_to_hg(run, tmp_path / "export", progress=False)
    assert (exported / "chat_template.jinja").read_text() == train_tok.chat_template
    for model_path in (run, run / "global_step1", exported):
        chat = demo_chat(model_path)
        assert chat.prompt_ids(context) == prompt_ids, model_path
    # the same checkpoint trained with pipetune's template renders pipetune's prompt (and exports it)
    pipetune_run = training_save_path(pp, tmp_path / "run2", "pipetune")
    text = demo_chat(pipetune_run).tokenizer.decode(demo_chat(pipetune_run).prompt_ids(context[-1:]))
    assert text.endswith("Human:\nWhat is 2 + 2?\n\nAssistant:\n")
    assert demo_chat(pp).tokenizer.chat_template != train_tok.chat_template  # hg_to_pp output: nothing trained yet


def test_one_rank_training_run_records_and_serves_the_model_template(tmp_path):
    """train_ds.py with "template": "model" (1 rank, 1 step): pipetune.json records it, and demo renders the
    save_path's prompts with the tokenizer's template, token for token as the training data has them."""
    import os
    import subprocess
    import sys

    from test_train_cli import free_port

    from convert.hg_to_pp import hg_to_pp

    pp = hg_to_pp(chat_model_dir(tmp_path, "llama3"), tmp_path / "pp", progress=False)
    data = write_jsonl(tmp_path / "d.jsonl", [CONVERSATION] * 2)
    cfg = {"model_path": str(pp), "save_path": str(tmp_path / "run"), "data_path": [{"path": data, "format": "messages"}],
           "template": "model", "train_steps": 1, "max_seq_len": 64, "train_micro_batch_size_per_gpu": 1,
           "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [1, 1]}, "parts": "auto"},
           "optimizer": {"type": "SGD", "params": {"lr": 0.0}}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "train_ds.py", "--config", str(tmp_path / "config.json")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    run = tmp_path / "run"
    assert json.loads((run / "pipetune.json").read_text())["template"] == "model"
    tok = AutoTokenizer.from_pretrained(run)
    context = CONVERSATION["messages"][:3]
    want = tok.apply_chat_template(context, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert want[:2] == [tok.bos_token_id, tok.convert_tokens_to_ids("<|start_header_id|>")]
    assert demo_chat(run).prompt_ids(context) == want


# ----------------------------------------------------------------------------------------------
# GRPO/PPO prompts under the model's template

GRPO_PROMPTS = [
    [{"role": "system", "content": "Reason in <think> tags, then answer in <answer> tags."},
     {"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello, friend."},
     {"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
     {"role": "assistant", "content": "Hello, friend."}, {"role": "user", "content": "What is 2 + 2?"}],
]


def llama31_tokenizer():
    """configs/tiny-llama3's tokenizer: Llama-3.1-Instruct's chat template (a system header always)."""
    return AutoTokenizer.from_pretrained(f"{ROOT}/configs/tiny-llama3")


@pytest.mark.parametrize("which", ["llama3.1", "chatml"])
def test_grpo_prompts_equal_apply_chat_template(tmp_path, which):
    """A system + user prompt and a multi-turn prompt (messages records ending with a user message, and
    TRL prompt lists) tokenize as apply_chat_template(messages, add_generation_prompt=True)."""
    tok = llama31_tokenizer() if which == "llama3.1" else chat_tokenizer("chatml")
    rows = [{"messages": m, "answer": "4"} for m in GRPO_PROMPTS]
    trl = [{"prompt": m, "answer": "4"} for m in GRPO_PROMPTS]
    for path in (write_jsonl(tmp_path / "m.jsonl", rows), write_jsonl(tmp_path / "t.jsonl", trl)):
        built = build_dataset(path, tok, T, kind="prompt", template="model")
        for i, messages in enumerate(GRPO_PROMPTS):
            ids, attn = built.train[i]
            want = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
            assert ids[attn.bool()].tolist() == want, (path, i)
            assert built.train.record(i) == {"prompt": messages, "answer": "4"}


def test_grpo_config_with_the_model_template_builds_its_data_with_it(tmp_path, monkeypatch):
    """A GRPO config with "template": "model" validates, and the recipes' data path
    (trainer.batches.build_data_rank0_first, rank 0 of one) builds its prompts with the model's template."""
    from trainer import batches
    from trainer.recipes import validate_config

    data = write_jsonl(tmp_path / "p.jsonl", [{"messages": m, "answer": "4"} for m in GRPO_PROMPTS])
    cfg = validate_config({"stage": "grpo", "actor_path": str(tmp_path), "save_path": str(tmp_path / "out"),
                           "data_path": data, "template": "model", "max_seq_len": T, "train_steps": 2,
                           "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [1, 1]}},
                           "train_batch_size": 4, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
                           "grpo": {"reward_funcs": ["math_answer"], "n_samples_per_prompt": 4}})
    assert cfg.template == "model"
    monkeypatch.setattr(batches, "broadcast_object", lambda obj, src=0: obj)  # one rank: no process group
    tok = llama31_tokenizer()
    built = batches.build_data_rank0_first(cfg, tok, "prompt", types.SimpleNamespace(rank=0), build_here=False)
    assert built.stats["template"]["name"] == "model"
    for i, messages in enumerate(GRPO_PROMPTS):
        ids, attn = built.train[i]
        assert ids[attn.bool()].tolist() == tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                                    return_dict=False)
