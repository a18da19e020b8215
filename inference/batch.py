"""A prompts file answered: one JSON line per input, written as each reply finishes.

    {"prompt", "response", "tokens", "seconds", "finish_reason"} (+ "id", "messages", "reference",
    "token_ids" when the input has them / --save-token-ids)

Every prompt is checked against the context before anything is generated, and every input is sampled
from the same seed, so a reply does not depend on where its input is in the file.
"""
from __future__ import annotations

import json
import time
from typing import IO

from inference.hf_chat import ChatModel, Reply
from inference.inputs import Item


def run_batch(chat: ChatModel, items: list[Item], out: IO[str], err: IO[str], seed: int, save_token_ids: bool,
              show_prompt: bool = False) -> None:
    """One JSON line per item to `out`, flushed as each reply is done; progress lines to `err`."""
    all_ids = [chat.prompt_ids(item.messages) for item in items]
    for item, ids in zip(items, all_ids):
        chat.check_fits(ids, item.where)  # fail before generating anything
    total_tokens, start = 0, time.perf_counter()
    for n, (item, ids) in enumerate(zip(items, all_ids), start=1):
        if show_prompt:
            err.write(f"[prompt {n}]\n{chat.tokenizer.decode(ids)}\n")
        reply = chat.generate(ids, seed=seed)
        out.write(json.dumps(result_row(item, reply, save_token_ids), ensure_ascii=False) + "\n")
        out.flush()
        total_tokens += len(reply.token_ids)
        err.write(f"[{n}/{len(items)}] {len(reply.token_ids)} tokens in {reply.seconds:.2f} s\n")
    elapsed = time.perf_counter() - start
    err.write(f"[done: {len(items)} replies, {total_tokens} tokens in {elapsed:.1f} s, {total_tokens / max(elapsed, 1e-9):.1f} tokens/s]\n")


def result_row(item: Item, reply: Reply, save_token_ids: bool) -> dict:
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
    return row
