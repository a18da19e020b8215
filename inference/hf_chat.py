"""`ChatModel`: a causal LM + its tokenizer + fixed generation settings. Chat messages become prompt
token ids through the tokenizer's chat template (`apply_chat_template`, token for token what training
fed the model), and one `generate` call gives a `Reply`."""
from __future__ import annotations

import copy
import dataclasses
import time
from typing import IO, Optional

from inference.errors import InferenceError
from trainer.generation.stop_ids import answer_stop_ids, generation_pad_id


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
    """A causal LM + its tokenizer + fixed generation settings (from the parsed demo.py `args`:
    max_new_tokens, greedy, temperature, top_p, top_k, repetition_penalty)."""

    def __init__(self, model, tokenizer, args, device, max_context: int):
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.max_new_tokens = args.max_new_tokens
        self.max_context = max_context
        gen = copy.deepcopy(model.generation_config)
        self.eos_ids = answer_stop_ids(tokenizer, model.config, getattr(model, "name_or_path", None))
        pad = generation_pad_id(tokenizer)
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

    def check_fits(self, ids: list[int], where: str) -> None:
        if len(ids) > self.prompt_budget:
            raise InferenceError(f"{where}: the prompt is {len(ids)} tokens; with --max-new-tokens {self.max_new_tokens} a context of "
                                 f"{self.max_context} tokens holds at most {self.prompt_budget}: shorten it or lower --max-new-tokens")

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
