"""Talk to a trained model with the prompt format used in training (the exported chat_template).

  python demo.py --model-path runs/quickstart/hf                       # interactive chat
  python demo.py --model-path runs/quickstart/hf --prompt "What is the capital of France?"
  python demo.py --model-path runs/quickstart/ckpt --prompts-file q.jsonl --output a.jsonl --greedy
  deepspeed --num_gpus 2 demo.py --model-path runs/quickstart/hf      # AutoTP over 2 devices

--model-path is a Hugging Face folder (a `convert_model.py pp_to_hg` output, or any LLaMA/BLOOM
folder) or a pipeline checkpoint (a `hg_to_pp` output, a training save_path, a global_stepN folder),
which is converted in memory: no files are written.

Chat commands: /reset (forget the conversation), /exit (or Ctrl-D). A line ending in "\\" continues
on the next line. The conversation is kept within --max-context tokens (prompt + --max-new-tokens);
the oldest turns are dropped, with a notice, when it no longer fits.

--prompts-file: a JSONL file, one input per line: a JSON string (one user message), {"prompt": ...},
{"rounds": [["ask", ...], ["ans", ...], ...]}, or a training record with "type" (instruct, conversation,
ref_qa, pairwise, prompt; "output"/answers after the last question are not shown to the model and are
written back as "reference"). Each output line: {"prompt", "response", "tokens", "seconds",
"finish_reason"} (+ "id", "reference" when the input has them). See docs/inference.md.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import IO, Optional

EXIT_USER_ERROR = 2
# Architectures DeepSpeed's inference kernels have an injection policy for (deepspeed/module_inject/
# replace_policy.py: LLAMALayerPolicy, BLOOMLayerPolicy). The kernels are CUDA-only.
KERNEL_INJECT_TYPES = ("llama", "bloom")
DEFAULT_CONTEXT = 2048  # BLOOM (ALiBi) has no max_position_embeddings; it was trained with 2048
COMMANDS = {"/reset": "forget the conversation", "/exit": "quit (also /quit, Ctrl-D)", "/help": "this list"}


class DemoError(Exception):
    """A user error: printed as one line (no traceback), exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", required=True,
                   help="HF folder (pp_to_hg output) or pipeline checkpoint (hg_to_pp output, training save_path, global_stepN)")
    inputs = p.add_mutually_exclusive_group()
    inputs.add_argument("--prompt", help="one user message; the reply is printed (no --prompt/--prompts-file/--record: interactive chat)")
    inputs.add_argument("--record", help='one input as JSON, like a --prompts-file line, e.g. \'{"type": "instruct", "instruct": "..."}\'')
    inputs.add_argument("--prompts-file", help="JSONL inputs, one per line (see above); replies go to --output")
    p.add_argument("--output", help="JSONL file for --prompts-file results (default: standard output)")
    p.add_argument("--save-token-ids", action="store_true", help="also write the generated token ids (\"token_ids\") to --output")
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--greedy", action="store_true", help="greedy decoding (ignores temperature/top-p/top-k)")
    g.add_argument("--temperature", type=float, default=0.7)
    g.add_argument("--top-p", type=float, default=0.9)
    g.add_argument("--top-k", type=int, default=50, help="0 disables top-k")
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0,
                   help="sampling seed; in batch mode every input is sampled from this seed (order-independent)")
    g.add_argument("--max-context", type=int,
                   help="tokens of prompt + reply (default: the model's max_position_embeddings, else %d)" % DEFAULT_CONTEXT)
    r = p.add_argument_group("runtime")
    r.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: the checkpoint's dtype")
    r.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA when available")
    r.add_argument("--ds-inference", action="store_true",
                   help="use deepspeed.init_inference in a single process too (always used under the deepspeed launcher)")
    r.add_argument("--kernel-inject", default="auto", choices=["auto", "on", "off"],
                   help="DeepSpeed kernel injection; auto: on for CUDA + llama/bloom + float16/bfloat16, off otherwise")
    r.add_argument("--show-prompt", action="store_true", help="print each rendered prompt (exactly what the model sees) to stderr")
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    return p


def check_args(args) -> None:
    checks = [
        (args.max_new_tokens >= 1, "--max-new-tokens must be at least 1"),
        (args.greedy or args.temperature > 0, "--temperature must be > 0 (use --greedy for deterministic replies)"),
        (0 < args.top_p <= 1, "--top-p must be in (0, 1]"),
        (args.top_k >= 0, "--top-k must be >= 0 (0 disables it)"),
        (args.repetition_penalty > 0, "--repetition-penalty must be > 0 (1.0 disables it)"),
        (args.max_context is None or args.max_context > args.max_new_tokens,
         "--max-context must be larger than --max-new-tokens (the prompt needs room too)"),
        (args.output is None or args.prompts_file is not None, "--output goes with --prompts-file"),
    ]
    for ok, message in checks:
        if not ok:
            raise DemoError(message)


# ---------------------------------------------------------------------------------------------
# Ranks: one process, or N under `deepspeed --num_gpus N` (AutoTP). Only rank 0 reads and prints.

@dataclasses.dataclass
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, obj):
        """Rank 0's `obj` on every rank (a line read from stdin, a command)."""
        if self.world_size == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def init_ranks(use_cuda: bool) -> Ranks:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Ranks()
    import deepspeed
    import deepspeed.comm as dist

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        import torch

        torch.cuda.set_device(local_rank)
    deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo")
    avoid_shm_allreduce_segfault()
    return Ranks(dist.get_rank(), dist.get_world_size(), local_rank)


def avoid_shm_allreduce_segfault(environ=None) -> bool:
    """Route AutoTP's all-reduce through torch.distributed when not every rank is on this machine.

    DeepSpeed 0.19.8 (CPU) sets up its shared-memory all-reduce only when LOCAL_SIZE == WORLD_SIZE
    (deepspeed/ops/csrc/cpu/comm/shm_interface.cpp), but `inference_all_reduce` calls the shm kernel
    whenever the backend's `shm_vector_kernel_level` allows it (deepspeed/comm/torch.py), and then
    segfaults. The deepspeed launcher on one machine sets LOCAL_SIZE == WORLD_SIZE; torchrun (no
    LOCAL_SIZE) and multi-node runs do not. Level 0 makes it fall back to torch.distributed.all_reduce.
    Returns True when it changed the setting."""
    environ = os.environ if environ is None else environ
    if environ.get("LOCAL_SIZE") == environ.get("WORLD_SIZE"):
        return False
    from deepspeed.comm import comm

    backend = comm.cdb
    if backend is None or getattr(backend, "shm_vector_kernel_level", 0) == 0:
        return False  # no shm op built, or already off: the fallback is used anyway
    backend.shm_vector_kernel_level = 0
    return True


# ---------------------------------------------------------------------------------------------
# Loading: an HF folder, or a pipeline checkpoint converted in memory.

def is_pipeline_checkpoint(path: Path) -> bool:
    from models.pipe_dir import find_layer_files

    return bool(find_layer_files(path)) or (path / "latest").is_file()


def _torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    from data.templates import set_chat_template

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise DemoError(f"{folder}: cannot load the tokenizer ({_first_line(e)})") from None
    if not tokenizer.chat_template:
        set_chat_template(tokenizer)  # a folder exported before templates were stored, or a pipe checkpoint
    if tokenizer.eos_token_id is None:
        raise DemoError(f"{folder}: the tokenizer has no eos_token (it ends every assistant turn in the training template)")
    return tokenizer


def load_hf_folder(path: Path, dtype: str):
    from transformers import AutoModelForCausalLM

    if not (path / "config.json").is_file():
        raise DemoError(f"--model-path {path}: no config.json and no pipeline layer files: give a Hugging Face folder "
                        "(convert_model.py pp_to_hg output) or a pipeline checkpoint (hg_to_pp output, training save_path, global_stepN)")
    tokenizer = load_tokenizer(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype="auto" if dtype == "auto" else _torch_dtype(dtype))
    except (OSError, ValueError, KeyError) as e:
        raise DemoError(f"--model-path {path}: cannot load the model ({_first_line(e)})") from None
    return model, tokenizer


def load_pipeline_checkpoint(path: Path, dtype: str):
    """Build the HF model from a pipeline checkpoint without writing files: the layer files are
    memory-mapped and their tensors handed to `from_pretrained` under their HF names (the mapping of
    `convert.pp_to_hg`), so weights are read from disk as they are used and, when no cast is needed,
    shared with the mapping rather than copied."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    from convert.errors import ConversionError
    from models.pipe_dir import SIDE_FILES, find_side_file
    from convert.pp_to_hg import iter_hf_tensors, open_pipe_checkpoint, plan_pipe_to_hf

    try:
        ckpt_dir, search, config, head = open_pipe_checkpoint(path)
        if head != "lm":
            raise DemoError(f"--model-path {path}: a pipeline checkpoint with a {head!r} head (a reward/value model) has no LM head to generate with")
        specs, sources = plan_pipe_to_hf(ckpt_dir, config, head)
        state_dict = dict(iter_hf_tensors(specs, sources))
    except ConversionError as e:
        raise DemoError(str(e)) from None
    tok_file = next((f for name in SIDE_FILES if "token" in name or name in ("vocab.json", "merges.txt")
                     if (f := find_side_file(search, name)) is not None), None)
    if tok_file is None:
        raise DemoError(f"{ckpt_dir}: no tokenizer files here or in {search[-1]} (hg_to_pp copies them; copy them from the source HF folder)")
    tokenizer = load_tokenizer(tok_file.parent)
    if dtype == "auto":
        float_dtypes = {s.dtype for s in specs if s.dtype.is_floating_point}
        torch_dtype = float_dtypes.pop() if len(float_dtypes) == 1 else _torch_dtype("float32")
    else:
        torch_dtype = _torch_dtype(dtype)
    model_class = AutoModelForCausalLM._model_mapping[type(config)]
    model = model_class.from_pretrained(None, config=config, state_dict=state_dict, dtype=torch_dtype)
    gen_file = find_side_file(search, "generation_config.json")
    if gen_file is not None:
        model.generation_config = GenerationConfig.from_pretrained(gen_file.parent)
    return model, tokenizer


def load_model(model_path: str, dtype: str):
    path = Path(model_path)
    if not path.exists():
        raise DemoError(f"--model-path {path}: no such folder")
    if not path.is_dir():
        raise DemoError(f"--model-path {path}: not a folder (give a Hugging Face folder or a pipeline checkpoint)")
    if is_pipeline_checkpoint(path):
        model, tokenizer = load_pipeline_checkpoint(path, dtype)
    else:
        model, tokenizer = load_hf_folder(path, dtype)
    return model.eval(), tokenizer


def context_length(config, tokenizer, override: Optional[int]) -> int:
    if override:
        return override
    for attr in ("max_position_embeddings", "n_positions", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 10**6 else DEFAULT_CONTEXT


# ---------------------------------------------------------------------------------------------
# Generation

@dataclasses.dataclass
class Reply:
    text: str
    token_ids: list
    seconds: float
    finish_reason: str  # "eos" (end of turn) or "length" (--max-new-tokens reached)


class StreamTo:
    """transformers' TextStreamer writing to a given stream (TextStreamer prints to sys.stdout)."""

    def __new__(cls, tokenizer, stream: IO[str]):
        from transformers import TextStreamer

        class _Streamer(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False):
                stream.write(text)
                stream.flush()

        return _Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


class ChatModel:
    """A causal LM + its tokenizer + fixed generation settings; renders prompts with the chat template."""

    def __init__(self, model, tokenizer, args, device, max_context: int):
        import copy

        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.max_new_tokens = args.max_new_tokens
        self.max_context = max_context
        gen = copy.deepcopy(model.generation_config)
        eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
        self.eos_ids = sorted({tokenizer.eos_token_id, *[e for e in eos if e is not None]})
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        sampling = ({"do_sample": False, "temperature": None, "top_p": None, "top_k": None} if args.greedy else
                    {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k or None})
        gen.update(max_new_tokens=args.max_new_tokens, min_new_tokens=None, max_length=None,
                   repetition_penalty=args.repetition_penalty, eos_token_id=self.eos_ids, pad_token_id=pad, **sampling)
        self.generation_config = gen

    @property
    def prompt_budget(self) -> int:
        """Most prompt tokens that leave room for a full reply."""
        return self.max_context - self.max_new_tokens

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """Token ids of `messages` + the assistant header: `apply_chat_template` (as training tokenizes)."""
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))

    def generate(self, ids: list[int], streamer=None, seed: Optional[int] = None) -> Reply:
        import torch

        if seed is not None:
            torch.manual_seed(seed)
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        start = time.perf_counter()
        with torch.no_grad():
            out = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                      generation_config=self.generation_config, streamer=streamer)
        seconds = time.perf_counter() - start
        new = out[0, len(ids):].tolist()
        finished = bool(new) and new[-1] in self.eos_ids
        return Reply(self.tokenizer.decode(new, skip_special_tokens=True), new, seconds, "eos" if finished else "length")


def setup_engine(model, tokenizer, args, ranks: Ranks, device: str, reload):
    """Move the model to `device`; under several ranks (or --ds-inference) wrap it with
    `deepspeed.init_inference`: AutoTP over all ranks, kernel injection where supported.
    `reload()` gives a fresh (model, tokenizer) if a kernel-injection attempt must be undone."""
    import torch

    use_ds = ranks.world_size > 1 or args.ds_inference
    inject = args.kernel_inject == "on" or (
        args.kernel_inject == "auto" and device.startswith("cuda") and model.config.model_type in KERNEL_INJECT_TYPES
        and model.dtype in (torch.float16, torch.bfloat16))
    if args.kernel_inject == "on" and not device.startswith("cuda"):
        raise DemoError("--kernel-inject on needs CUDA: DeepSpeed's inference kernels have no CPU version")
    if args.kernel_inject == "on" and not use_ds:
        raise DemoError("--kernel-inject on needs DeepSpeed inference: run under the deepspeed launcher or add --ds-inference")
    if not use_ds:
        return model.to(device), "Hugging Face generate"
    if not device.startswith("cuda") and model.dtype == torch.float16:
        raise DemoError("DeepSpeed inference on CPU does not support float16: use --dtype bfloat16 or float32")
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)

    def init(model, inject: bool):
        engine = deepspeed.init_inference(model, tensor_parallel={"tp_size": ranks.world_size}, dtype=model.dtype,
                                          replace_with_kernel_inject=inject)
        return engine.module

    if inject and args.kernel_inject == "auto":
        # DeepSpeed's injection policies follow older transformers module layouts: try it on a
        # 2-token warm-up, and fall back to plain AutoTP rather than fail.
        try:
            injected = init(model, True)
            warm = torch.tensor([[tokenizer.eos_token_id] * 2], device=device)
            with torch.no_grad():
                injected.generate(input_ids=warm, attention_mask=torch.ones_like(warm), max_new_tokens=2, do_sample=False,
                                  pad_token_id=tokenizer.eos_token_id)
            model = injected
        except Exception as e:  # noqa: BLE001  (any failure: injection is an optimisation)
            print(f"[kernel injection failed ({type(e).__name__}: {_first_line(e)}); using AutoTP without it "
                  "(--kernel-inject off skips the attempt)]")
            inject = False
            model, _ = reload()
            model = init(model, False)
    else:
        model = init(model, inject)
    if ranks.world_size > 1 and not inject and model.config.model_type == "bloom":
        keep_bloom_attention_mask(model)
    return model, f"DeepSpeed init_inference (AutoTP tp_size={ranks.world_size}, kernel injection {'on' if inject else 'off'})"


def keep_bloom_attention_mask(model) -> None:
    """Make BLOOM build its ALiBi bias through `build_alibi_tensor` under AutoTP.

    DeepSpeed's AutoTP replaces `model.transformer.build_alibi_tensor` with a version that keeps the
    heads of this rank. transformers 5's `generate` drops an all-ones attention mask, and BLOOM then
    computes the bias for all heads inline, never calling that method: the shapes no longer match the
    sharded attention ("expanded size of the tensor (2) must match the existing size (4)"). Putting
    the all-ones mask back costs nothing and routes the bias through DeepSpeed's method again."""
    import torch

    def restore_mask(module, args, kwargs):
        if kwargs.get("attention_mask") is None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            ref = ids if ids is not None else kwargs["inputs_embeds"]
            past = kwargs.get("past_key_values")
            past_length = past.get_seq_length() if past is not None else 0
            kwargs["attention_mask"] = torch.ones(ref.shape[0], past_length + ref.shape[1], dtype=torch.long, device=ref.device)
        return args, kwargs

    model.transformer.register_forward_pre_hook(restore_mask, with_kwargs=True)


# ---------------------------------------------------------------------------------------------
# Inputs: prompts and records

@dataclasses.dataclass
class Item:
    messages: list[dict]  # what the model sees (ends with a user message)
    prompt: str  # the last user message
    where: str  # "file: line N" for messages
    id: object = None
    reference: Optional[str] = None  # answers the input carried after its last question


def item_from_json(obj, file: str, index: int, line: Optional[int] = None) -> Item:
    """A JSON value -> Item: a string, {"prompt"}, {"rounds"} (type "prompt"), or a typed record."""
    from data.errors import Problem
    from data.records import validate_record
    from data.templates import record_messages

    where = str(Problem(file, "", record=index, line=line)).rstrip(": ")
    if isinstance(obj, str):
        if not obj.strip():
            raise DemoError(f"{where}: empty prompt")
        return Item([{"role": "user", "content": obj}], obj, where)
    if isinstance(obj, dict):
        obj = dict(obj)
        obj.setdefault("type", "prompt")
        # Inference inputs need no answer: fill one in for validation only (dropped below).
        placeholder = False
        if obj["type"] == "instruct" and "output" not in obj:
            obj["output"], placeholder = "-", True
        if obj["type"] in ("conversation", "ref_qa") and isinstance(obj.get("rounds"), list) \
                and not any(isinstance(t, list) and t[:1] == ["ans"] for t in obj["rounds"]):
            obj["rounds"], placeholder = obj["rounds"] + [["ans", "-"]], True
        if obj["type"] == "pretrain":
            raise DemoError(f"{where}: a pretrain record has no chat form; give the text as {{\"prompt\": ...}}")
    record, problems = validate_record(obj, file, index, line)
    if problems:
        more = f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})" if len(problems) > 1 else ""
        raise DemoError(str(problems[0]) + more)
    messages = record_messages(record.type, record.fields)
    answers = []
    while messages and messages[-1]["role"] == "assistant":
        answers.insert(0, messages.pop()["content"])
    if not messages or messages[-1]["role"] != "user":
        raise DemoError(f"{where}: nothing to answer: the input has no question (\"ask\" turn) before its answers")
    return Item(messages, messages[-1]["content"], where, id=obj.get("id"),
                reference=None if placeholder or not answers else "\n\n".join(answers))


def read_prompts_file(path: str) -> list[Item]:
    from data.errors import Problem

    p = Path(path)
    if not p.is_file():
        raise DemoError(f"--prompts-file {path}: no such file")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DemoError(f"--prompts-file {path}: not UTF-8 ({e.reason} at byte {e.start})") from None
    items, index = [], 0
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DemoError(str(Problem(path, f"invalid JSON: {e.msg} (column {e.colno}); each line must be one JSON "
                                             "value (a string or a record object)", record=index, line=lineno))) from None
        items.append(item_from_json(obj, path, index, lineno))
        index += 1
    if not items:
        raise DemoError(f"--prompts-file {path}: no inputs (one JSON value per line)")
    return items


def parse_record_arg(text: str) -> Item:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DemoError(f"--record: invalid JSON: {e.msg} (column {e.colno})") from None
    return item_from_json(obj, "--record", 0)


# ---------------------------------------------------------------------------------------------
# Modes

class NullIO:
    def write(self, s):
        return len(s)

    def flush(self):
        pass


def check_fits(chat: ChatModel, ids: list[int], where: str) -> None:
    if len(ids) > chat.prompt_budget:
        raise DemoError(f"{where}: the prompt is {len(ids)} tokens; with --max-new-tokens {chat.max_new_tokens} a context of "
                        f"{chat.max_context} tokens holds at most {chat.prompt_budget}: shorten it or lower --max-new-tokens")


def run_batch(chat: ChatModel, items: list[Item], out: IO[str], err: IO[str], seed: int, save_token_ids: bool,
              show_prompt: bool = False) -> None:
    """One JSON line per item to `out`, flushed as each reply is done; every item is sampled from `seed`."""
    all_ids = [chat.prompt_ids(item.messages) for item in items]
    for item, ids in zip(items, all_ids):
        check_fits(chat, ids, item.where)  # fail before generating anything
    total_tokens, start = 0, time.perf_counter()
    for n, (item, ids) in enumerate(zip(items, all_ids), start=1):
        if show_prompt:
            err.write(f"[prompt {n}]\n{chat.tokenizer.decode(ids)}\n")
        reply = chat.generate(ids, seed=seed)
        row = {"prompt": item.prompt, "response": reply.text, "tokens": len(reply.token_ids),
               "seconds": round(reply.seconds, 4), "finish_reason": reply.finish_reason}
        if item.id is not None:
            row["id"] = item.id
        if len(item.messages) > 1:
            row["messages"] = item.messages
        if item.reference is not None:
            row["reference"] = item.reference
        if save_token_ids:
            row["token_ids"] = reply.token_ids
        out.write(json.dumps(row, ensure_ascii=False) + "\n")
        out.flush()
        total_tokens += len(reply.token_ids)
        err.write(f"[{n}/{len(items)}] {len(reply.token_ids)} tokens in {reply.seconds:.2f} s\n")
    elapsed = time.perf_counter() - start
    err.write(f"[done: {len(items)} replies, {total_tokens} tokens in {elapsed:.1f} s, {total_tokens / max(elapsed, 1e-9):.1f} tokens/s]\n")


def run_single(chat: ChatModel, item: Item, out: IO[str], err: IO[str], seed: int, is_main: bool, show_prompt: bool) -> Reply:
    ids = chat.prompt_ids(item.messages)
    check_fits(chat, ids, item.where)
    if show_prompt:
        err.write(f"[prompt]\n{chat.tokenizer.decode(ids)}\n")
    reply = chat.generate(ids, streamer=StreamTo(chat.tokenizer, out) if is_main else None, seed=seed)
    out.write("\n")
    err.write(f"[{len(reply.token_ids)} tokens in {reply.seconds:.2f} s"
              + (f"; cut at --max-new-tokens {chat.max_new_tokens}" if reply.finish_reason == "length" else "") + "]\n")
    return reply


class ChatSession:
    """The REPL's state: the conversation so far, kept within the context; every prompt it sent."""

    def __init__(self, chat: ChatModel, out: IO[str], err: IO[str], stream: bool = True, show_prompt: bool = False):
        self.chat, self.out, self.err, self.stream, self.show_prompt = chat, out, err, stream, show_prompt
        self.history: list[dict] = []
        self.prompts: list[list[int]] = []  # token ids of every prompt given to the model

    def reset(self) -> None:
        self.history = []

    def fit(self, messages: list[dict]) -> Optional[tuple[list[dict], list[int]]]:
        """Drop the oldest turns (a user message and its replies) until the prompt fits; None if the
        newest message alone does not fit."""
        ids = self.chat.prompt_ids(messages)
        dropped = 0
        while len(ids) > self.chat.prompt_budget and len(messages) > 1:
            cut = next((i for i in range(1, len(messages)) if messages[i]["role"] == "user"), len(messages) - 1)
            messages = messages[cut:]
            dropped += 1
            ids = self.chat.prompt_ids(messages)
        if len(ids) > self.chat.prompt_budget:
            self.err.write(f"[message too long: {len(ids)} prompt tokens, at most {self.chat.prompt_budget} fit "
                           f"(--max-context {self.chat.max_context} - --max-new-tokens {self.chat.max_new_tokens}); not sent]\n")
            return None
        if dropped:
            self.err.write(f"[history: dropped the {dropped} oldest turn{'s' if dropped > 1 else ''} to fit the context of "
                           f"{self.chat.max_context} tokens ({len(ids)} prompt + {self.chat.max_new_tokens} reply)]\n")
        return messages, ids

    def ask(self, text: str, seed: Optional[int] = None) -> Optional[Reply]:
        fitted = self.fit(self.history + [{"role": "user", "content": text}])
        if fitted is None:
            return None
        messages, ids = fitted
        self.prompts.append(ids)
        if self.show_prompt:
            self.err.write(f"[prompt]\n{self.chat.tokenizer.decode(ids)}\n")
        reply = self.chat.generate(ids, streamer=StreamTo(self.chat.tokenizer, self.out) if self.stream else None, seed=seed)
        self.out.write("\n")
        self.out.flush()
        if reply.finish_reason == "length":
            self.err.write(f"[reply cut at --max-new-tokens {self.chat.max_new_tokens}]\n")
        self.history = messages + [{"role": "assistant", "content": reply.text}]
        return reply


def read_message(stdin: IO[str], out: IO[str], interactive: bool) -> Optional[str]:
    """One message (lines ending in a backslash continue); None at end of input."""
    lines = []
    while True:
        if interactive:
            out.write(">>> " if not lines else "... ")
            out.flush()
        line = stdin.readline()
        if not line:
            return "\n".join(lines) if lines else None
        line = line.rstrip("\n")
        if line.endswith("\\"):
            lines.append(line[:-1])
            continue
        lines.append(line)
        return "\n".join(lines)


def run_repl(chat: ChatModel, ranks: Ranks, stdin: IO[str], out: IO[str], err: IO[str], seed: int, show_prompt: bool = False) -> ChatSession:
    """The chat loop. Rank 0 reads stdin and shares each line, so every rank generates in step."""
    interactive = ranks.is_main and hasattr(stdin, "isatty") and stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    session = ChatSession(chat, out, err, stream=ranks.is_main, show_prompt=show_prompt)
    err.write(f"[chat: {', '.join(COMMANDS)}; context {chat.max_context} tokens, replies up to {chat.max_new_tokens}]\n")
    import torch

    torch.manual_seed(seed)  # one seed per session: a session replays exactly
    while True:
        text = ranks.share(read_message(stdin, out, interactive) if ranks.is_main else None)
        if text is None or text.strip() in ("/exit", "/quit"):
            break
        command = text.strip()
        if not command:
            continue
        if command == "/reset":
            session.reset()
            err.write("[conversation reset]\n")
        elif command == "/help":
            err.write("".join(f"  {c:8s} {h}\n" for c, h in COMMANDS.items()))
        elif command.startswith("/") and " " not in command:
            err.write(f"[unknown command {command}; commands: {', '.join(COMMANDS)}]\n")
        else:
            session.ask(text)
        err.flush()
    return session


# ---------------------------------------------------------------------------------------------

def pick_device(choice: str) -> str:
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        raise DemoError("--device cuda: no CUDA device visible")
    return "cuda" if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()) else "cpu"


def run(args, stdin: IO[str], stdout: IO[str], stderr: IO[str]) -> int:
    check_args(args)
    items = None
    if args.prompts_file:
        items = read_prompts_file(args.prompts_file)  # before loading the model: bad input fails fast
    elif args.record:
        items = [parse_record_arg(args.record)]
    elif args.prompt is not None:
        if not args.prompt.strip():
            raise DemoError("--prompt is empty")
        items = [Item([{"role": "user", "content": args.prompt}], args.prompt, "--prompt")]
    device_kind = pick_device(args.device)
    ranks = init_ranks(device_kind == "cuda")
    out, err = (stdout, stderr) if ranks.is_main else (NullIO(), NullIO())
    device = f"cuda:{ranks.local_rank}" if device_kind == "cuda" else "cpu"
    if device_kind == "cpu" and args.dtype == "float16":
        err.write("[warning: float16 on CPU is slow and often unsupported; bfloat16 or float32 is better]\n")

    import torch

    torch.manual_seed(args.seed)
    if not ranks.is_main:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    # Library prints while loading (DeepSpeed's "AutoTP: ...") must not mix with replies on stdout.
    with contextlib.redirect_stdout(err):
        model, tokenizer = load_model(args.model_path, args.dtype)
        model, engine_name = setup_engine(model, tokenizer, args, ranks, device,
                                          reload=lambda: load_model(args.model_path, args.dtype))
    max_context = context_length(model.config, tokenizer, args.max_context)
    if max_context <= args.max_new_tokens:
        raise DemoError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in the model's context of "
                        f"{max_context} tokens: lower it (or set --max-context)")
    chat = ChatModel(model, tokenizer, args, device, max_context)
    err.write(f"[{args.model_path}: {model.config.model_type}, {model.dtype}, {device}, {engine_name}, "
              f"{ranks.world_size} rank{'s' if ranks.world_size > 1 else ''}]\n")

    if args.prompts_file:
        if args.output and ranks.is_main:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            with open(args.output, "w", encoding="utf-8") as fh:
                run_batch(chat, items, fh, err, args.seed, args.save_token_ids, args.show_prompt)
        else:
            run_batch(chat, items, out, err, args.seed, args.save_token_ids, args.show_prompt)
    elif items is not None:
        run_single(chat, items[0], out, err, args.seed, ranks.is_main, args.show_prompt)
    else:
        run_repl(chat, ranks, stdin, out, err, args.seed, args.show_prompt)
    return 0


def main(argv=None, stdin: IO[str] = None, stdout: IO[str] = None, stderr: IO[str] = None) -> int:
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    args = build_parser().parse_args(argv)
    try:
        return run(args, stdin, stdout, stderr)
    except DemoError as e:
        if int(os.environ.get("RANK", "0")) == 0:
            stderr.write(f"error: {e}\n")
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        stderr.write("\n")
        return 130


def _shutdown_distributed() -> None:
    """A barrier + destroy at exit: without it gloo ranks sometimes abort ("terminate called...")."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


if __name__ == "__main__":
    try:
        status = main()
    finally:
        _shutdown_distributed()
    sys.exit(status)
