"""Replies streamed to a person: one message (`run_single`), or the chat REPL (`run_repl`), whose
`ChatSession` keeps the conversation within the context by dropping the oldest turns.

Replies go to `out` as they are generated; notices ("[...]") go to `err`. Under several ranks, rank 0
reads stdin and shares each line, so every rank generates in step.
"""
from __future__ import annotations

from typing import IO, Optional

from inference.hf_chat import ChatModel, Reply, StreamTo
from inference.inputs import Item
from inference.parallel import Ranks

COMMANDS = {"/reset": "forget the conversation", "/exit": "quit (also /quit, Ctrl-D)", "/help": "this list"}


def run_single(chat: ChatModel, item: Item, out: IO[str], err: IO[str], seed: int, is_main: bool, show_prompt: bool) -> Reply:
    ids = chat.prompt_ids(item.messages)
    chat.check_fits(ids, item.where)
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
