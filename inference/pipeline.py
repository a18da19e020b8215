"""demo.py --pipeline-stages P: generate from a pipeline checkpoint split over P ranks, each holding
only its stage's layers (a model too big for one device, no AutoTP), with the KV-cached pipelined
generator of `trainer.generation.decoding` (the one PPO uses on the training engine).

    deepspeed --num_gpus 2 demo.py --model-path runs/quickstart/ckpt --pipeline-stages 2 --greedy

World = P x D ranks: D replicas of the P-stage pipeline; a prompts file is shared among the
replicas, a chat turn goes to replica 0. Rank 0 (stage 0 of replica 0) reads input and writes
replies: every stage holds the generated ids, and stage 0 sees each token as soon as it is chosen,
so replies stream. Prompts are rendered with the training template exactly as `demo.py` does
(`inference.loading.load_tokenizer` with the template training recorded, `apply_chat_template`).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import IO

from inference.errors import InferenceError
from inference.hf_chat import ChatModel, Reply
from inference.inputs import Item


def init_pipeline_ranks(n_stages: int, use_cuda: bool):
    """DeepSpeed's process group (a one-rank group when run without a launcher); checks P divides it."""
    import torch.distributed as dist

    from inference.parallel import Ranks

    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    world = int(os.environ["WORLD_SIZE"])
    if n_stages < 1 or world % n_stages:
        raise InferenceError(f"--pipeline-stages {n_stages} does not divide the {world} rank{'s' if world > 1 else ''}: "
                             f"launch P x D ranks (deepspeed --num_gpus {max(n_stages, 1)} demo.py ... --pipeline-stages {max(n_stages, 1)})")
    if use_cuda:
        import torch

        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if not dist.is_initialized():
        from trainer.engine.distributed import init_process_group

        init_process_group("nccl" if use_cuda else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"]))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_pipeline_module(model_path, n_stages: int, dtype: str = "auto", device: str = "cpu", parts=None):
    """(PipelineModule of this rank's stage with the checkpoint's weights, its ModelPlan, tokenizer).

    model_path: a pipeline checkpoint (hg_to_pp output, training save_path, global_stepN). The split
    is `parts` (layers per stage) or balanced by compute (`model_topo.parts: "auto"`'s rule).
    Collective: every rank of the world calls it."""
    import torch
    import torch.distributed as dist

    from convert.errors import ConversionError
    from convert.pp_to_hg import load_layer, open_pipe_checkpoint
    from inference.loading import is_pipeline_checkpoint, load_tokenizer, torch_dtype, training_template_of
    from models.pipe_dir import CheckpointError, find_layer_files, find_side_file
    from models.pipeline import pipe_layer_names, prepare_config
    from trainer.engine.auto_parts import auto_parts
    from trainer.engine.build import build_pipeline_module, load_weights
    from trainer.engine.partition import boundaries_from_parts
    from trainer.engine.plan import ModelPlan, layer_param_counts
    from trainer.engine.topology import Topology

    path = Path(model_path)
    if not path.is_dir() or not is_pipeline_checkpoint(path):
        raise InferenceError(f"--model-path {path}: --pipeline-stages needs a pipeline checkpoint (a hg_to_pp output, a training "
                             "save_path or a global_stepN folder); convert an HF folder with `convert_model.py hg_to_pp`")
    try:
        ckpt_dir, search, hf_config, head = open_pipe_checkpoint(path)
    except (CheckpointError, ConversionError) as e:
        raise InferenceError(str(e)) from None
    if head != "lm":
        raise InferenceError(f"--model-path {path}: a pipeline checkpoint with a {head!r} head has no LM head to generate with")
    config = prepare_config(hf_config)
    names = pipe_layer_names(config)
    counts = layer_param_counts(config)
    if n_stages > len(names):
        raise InferenceError(f"--pipeline-stages {n_stages}: the model has only {len(names)} pipe layers")
    parts = list(parts) if parts else auto_parts(counts, config.hidden_size, 512, n_stages)
    boundaries_from_parts(parts, n_stages, names)
    side = find_side_file(search, "config.json").parent
    plan = ModelPlan(path, side, hf_config, config, "lm", names, counts, parts)
    topo = Topology(dist.get_rank(), dist.get_world_size(), n_stages, dist.get_world_size() // n_stages)
    module = build_pipeline_module(plan, topo)
    try:
        load_weights(module, plan, seed=0)
    except (CheckpointError, FileNotFoundError, RuntimeError) as e:
        raise InferenceError(f"--model-path {path}: {e}") from None
    if dtype == "auto":
        first = load_layer(find_layer_files(ckpt_dir)[0])
        weights_dtype = next((t.dtype for t in first.values() if t.is_floating_point()), torch.float32)
    else:
        weights_dtype = torch_dtype(dtype)
    module.to(device=device, dtype=weights_dtype)
    tok_dir = next((f.parent for name in ("tokenizer_config.json", "tokenizer.json", "tokenizer.model")
                    if (f := find_side_file(search, name)) is not None), None)
    if tok_dir is None:
        raise InferenceError(f"{ckpt_dir}: no tokenizer files here or in {search[-1]} (hg_to_pp copies them)")
    return module.eval(), plan, load_tokenizer(tok_dir, training_template=training_template_of(search))


class PipelineChat:
    """`inference.hf_chat.ChatModel`'s interface (prompt_ids, check_fits, generate -> Reply) over the
    pipelined generator, so demo's single-prompt and chat code runs unchanged. Collective: every rank
    calls `generate` with the same prompt (the REPL shares each line from rank 0)."""

    def __init__(self, module, plan, tokenizer, args, max_context: int, ranks):
        from trainer.generation.stop_ids import answer_stop_ids, generation_pad_id
        from trainer.generation.token_sampling import SamplingConfig

        self.module, self.config, self.tokenizer, self.ranks = module, plan.model_config, tokenizer, ranks
        self.max_new_tokens, self.max_context = args.max_new_tokens, max_context
        self.eos_ids = answer_stop_ids(tokenizer, plan.model_config, plan.side_dir)
        self.pad_id = generation_pad_id(tokenizer)
        self.sampling = SamplingConfig(greedy=args.greedy, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                       repetition_penalty=args.repetition_penalty, seed=args.seed)

    # The prompt side is ChatModel's own (same tokenizer, template and context budget).
    prompt_budget = ChatModel.prompt_budget
    prompt_ids = ChatModel.prompt_ids
    check_fits = ChatModel.check_fits

    def generate_many(self, prompts: list[list[int]], seed=None, on_step=None):
        """This replica's share of `prompts` -> its `Generation` (rows of prompts[r::D])."""
        import dataclasses

        from trainer.generation.decoding import generate, replica_share

        sampling = self.sampling if seed is None else dataclasses.replace(self.sampling, seed=seed)
        return generate(self.module, self.config, replica_share(prompts, self.module), max_new_tokens=self.max_new_tokens,
                        stop_ids=self.eos_ids, pad_id=self.pad_id, sampling=sampling, max_context=self.max_context,
                        on_step=on_step)

    def generate(self, ids: list[int], streamer=None, seed=None) -> Reply:
        """One prompt, on replica 0 (the others get an empty share); the Reply is rank 0's."""
        import torch

        def stream(rows, new, active):
            if bool(active[0]):
                streamer.put(new[:1].cpu())

        if streamer is not None and self.ranks.is_main:
            streamer.put(torch.tensor([ids]))  # TextStreamer(skip_prompt=True) drops the first put: the prompt
        start = time.perf_counter()
        out = self.generate_many([ids], seed=seed, on_step=stream if streamer is not None and self.ranks.is_main else None)
        if streamer is not None and self.ranks.is_main:
            streamer.end()
        seconds = time.perf_counter() - start
        new = out.answer(0) if len(out.n_new) else []
        return self._reply(new, seconds, out.finish_reason[0] if len(out.n_new) else "length")

    def _reply(self, new: list[int], seconds: float, finish: str) -> Reply:
        return Reply(self.tokenizer.decode(new, skip_special_tokens=True), new, seconds, "eos" if finish == "stop" else "length")


def run_pipeline_batch(chat: PipelineChat, items: list[Item], out: IO[str], err: IO[str], seed: int, save_token_ids: bool,
                       show_prompt: bool = False) -> None:
    """A prompts file in one pipelined generation over all replicas (micro-batches in flight), then one
    JSON line per input on rank 0, in input order (as `inference.batch.run_batch` writes them)."""
    import torch.distributed as dist

    from inference.batch import result_row

    all_ids = [chat.prompt_ids(item.messages) for item in items]
    for item, ids in zip(items, all_ids):
        chat.check_fits(ids, item.where)
    if show_prompt:
        for n, ids in enumerate(all_ids, start=1):
            err.write(f"[prompt {n}]\n{chat.tokenizer.decode(ids)}\n")
    start = time.perf_counter()
    gen = chat.generate_many(all_ids, seed=seed)
    elapsed = time.perf_counter() - start
    mine = [(gen.answer(k), gen.seconds[k], gen.finish_reason[k]) for k in range(len(gen.n_new))]
    place_stage0 = chat.module.stage_id == 0
    shares = [None] * dist.get_world_size()
    dist.all_gather_object(shares, mine if place_stage0 else None)
    replicas = [s for s in shares if s is not None]  # replica r's rows are items[r::D], in stage-0 rank order
    if not chat.ranks.is_main:
        return
    d = len(replicas)
    total = 0
    for i, item in enumerate(items):
        new, seconds, finish = replicas[i % d][i // d]
        total += len(new)
        out.write(json.dumps(result_row(item, chat._reply(new, seconds, finish), save_token_ids), ensure_ascii=False) + "\n")
    out.flush()
    err.write(f"[done: {len(items)} replies, {total} tokens in {elapsed:.1f} s, {total / max(elapsed, 1e-9):.1f} tokens/s; "
              f"{chat.module.num_stages} pipeline stages x {d} replica{'s' if d > 1 else ''}]\n")


def run_pipeline(args, items, stdin: IO[str], stdout: IO[str], stderr: IO[str]) -> int:
    """demo.py's `run` for --pipeline-stages: the same inputs, outputs and chat REPL, generated on the
    pipeline (see the module docstring)."""
    import contextlib

    import torch

    from inference.chat import run_repl, run_single
    from inference.loading import context_length
    from inference.parallel import NullIO, pick_device

    device_kind = pick_device(args.device)
    if args.ds_inference or args.kernel_inject == "on":
        raise InferenceError("--pipeline-stages runs its own pipelined generator: drop --ds-inference / --kernel-inject on")
    ranks = init_pipeline_ranks(args.pipeline_stages, device_kind == "cuda")
    out, err = (stdout, stderr) if ranks.is_main else (NullIO(), NullIO())
    device = f"cuda:{ranks.local_rank}" if device_kind == "cuda" else "cpu"
    if not ranks.is_main:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    with contextlib.redirect_stdout(err):  # DeepSpeed's "Using topology ..." lines must not mix with replies
        module, plan, tokenizer = load_pipeline_module(args.model_path, args.pipeline_stages, args.dtype, device)
    max_context = context_length(plan.model_config, tokenizer, args.max_context)
    if max_context <= args.max_new_tokens:
        raise InferenceError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in the model's context of "
                             f"{max_context} tokens: lower it (or set --max-context)")
    chat = PipelineChat(module, plan, tokenizer, args, max_context, ranks)
    dtype = next(module.parameters()).dtype
    replicas = ranks.world_size // args.pipeline_stages
    err.write(f"[{args.model_path}: {plan.model_config.model_type}, {dtype}, {device}, pipelined generation "
              f"({args.pipeline_stages} stages x {replicas} replica{'s' if replicas > 1 else ''}, parts {plan.parts})]\n")
    torch.manual_seed(args.seed)
    if args.prompts_file:
        if args.output and ranks.is_main:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            with open(args.output, "w", encoding="utf-8") as fh:
                run_pipeline_batch(chat, items, fh, err, args.seed, args.save_token_ids, args.show_prompt)
        else:
            run_pipeline_batch(chat, items, out, err, args.seed, args.save_token_ids, args.show_prompt)
    elif items is not None:
        run_single(chat, items[0], out, err, args.seed, ranks.is_main, args.show_prompt)
    else:
        run_repl(chat, ranks, stdin, out, err, args.seed, args.show_prompt)
    return 0
