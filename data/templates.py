"""The prompt format of every record type: the single source of truth.

Every non-pretrain record is rendered as a chat. Turns are joined by a blank line; each answer ends
with the tokenizer's EOS token (the end-of-turn token):

    Reference:\\n{reference}            (ref_qa only: a "system" message)
    \\n\\nHuman:\\n{ask}
    \\n\\nAssistant:\\n{ans}</s>
    \\n\\nHuman:\\n{ask} ...

- instruct:     one Human turn with ``instruct`` (+ "\\n\\n" + ``input`` when given), then ``output``.
- conversation: the rounds in order; asks and answers may repeat in a row (each is its own turn).
- ref_qa:       the reference as a leading "Reference:" block, then the rounds.
- pairwise:     the prompt (a string = one Human turn, or rounds), then ``chosen`` or ``rejected``.
- prompt:       the prompt followed by the generation prompt "\\n\\nAssistant:\\n" (for PPO rollouts); a
                leading ["system", text] round renders as ref_qa's "Reference:" block.
- ranked:       the prompt, then one of its ``responses`` (side ``"responses[k]"``, ``response_side(k)``;
                side "chosen" means the best, responses[0]).
- pretrain:     the raw text + EOS, no template.

Trained spans (labels kept, everything else -100): each answer's text plus its EOS, i.e. the instruct
``output``, every ``ans`` turn of conversation/ref_qa, and the pairwise ``chosen`` (``rejected`` is
rendered the same way for reward scoring; so is every answer of a ranked record, whose best answer is its
"chosen" for SFT). The "Assistant:\\n" header is never trained. In a pairwise
or prompt record, ``ans`` turns of the prompt are context (not trained). Pretrain trains on all tokens.

The answer always starts right after a newline, so the first answer token never merges with the
header for either tokenizer (LLaMA's SentencePiece and BLOOM's byte-level BPE both split at "\\n").

BOS follows the tokenizer's convention (LLaMA adds BOS, BLOOM does not): ``render_record`` returns
text without BOS; ``data.tokenize`` prepends the BOS text to chat-type records when the tokenizer adds
BOS and tokenizes with ``add_special_tokens=False``, exactly like ``apply_chat_template(..., tokenize=True)``
with ``chat_template(add_bos=True)`` (which starts with ``{{ bos_token }}``). Pretrain text is tokenized
with ``add_special_tokens=True``.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

SEP = "\n\n"  # between turns
HEADERS = {"system": "Reference:\n", "user": "Human:\n", "assistant": "Assistant:\n"}
ROLE_OF = {"ask": "user", "ans": "assistant", "system": "system"}  # "system": a prompt record's first round
_HEADER_TEXTS = frozenset(HEADERS.values())

# Jinja twin of render_messages(). Keep the two in step (tests/test_data_templates.py checks equality).
_JINJA_BODY = (
    "{%- for message in messages -%}"
    "{%- if not loop.first -%}{{ '\\n\\n' }}{%- endif -%}"
    "{%- if message['role'] == 'system' -%}{{ 'Reference:\\n' + message['content'] }}"
    "{%- elif message['role'] == 'user' -%}{{ 'Human:\\n' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' -%}{{ 'Assistant:\\n' + message['content'] + eos_token }}"
    "{%- else -%}{{ raise_exception('unknown role ' + message['role'] + "
    "'; use system (reference), user or assistant') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{%- if messages -%}{{ '\\n\\n' }}{%- endif -%}{{ 'Assistant:\\n' }}"
    "{%- endif -%}"
)


def chat_template(add_bos: bool) -> str:
    """The Jinja chat template; ``add_bos`` for tokenizers that add BOS themselves (LLaMA)."""
    return ("{{ bos_token }}" if add_bos else "") + _JINJA_BODY


CHAT_TEMPLATE = chat_template(add_bos=False)
# Changes whenever the format changes: part of the dataset cache key.
TEMPLATE_VERSION = "1-" + hashlib.sha256((_JINJA_BODY + repr(HEADERS) + SEP).encode()).hexdigest()[:12]


def tokenizer_adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    ids = tokenizer("a")["input_ids"]
    return bos is not None and len(ids) > 0 and ids[0] == bos


def set_chat_template(tokenizer) -> str:
    """Store our chat template on ``tokenizer`` (saved by ``save_pretrained``); returns it."""
    tokenizer.chat_template = chat_template(tokenizer_adds_bos(tokenizer))
    return tokenizer.chat_template


def rounds_to_messages(rounds: Sequence[Sequence[str]], reference: Optional[str] = None) -> List[Dict[str, str]]:
    """``[["ask", q], ["ans", a]]`` (+ optional reference) -> HF chat messages (system/user/assistant)."""
    messages = [{"role": "system", "content": reference}] if reference is not None else []
    return messages + [{"role": ROLE_OF[role], "content": text} for role, text in rounds]


@dataclasses.dataclass(frozen=True)
class Piece:
    """A run of rendered text. ``field`` names the record field it came from (None for markup)."""
    text: str
    trained: bool = False
    field: Optional[str] = None


def render_messages(turns: Sequence[Tuple[str, str, Optional[str], bool]], eos_token: str,
                    add_generation_prompt: bool = False) -> List[Piece]:
    """(role, content, field, trained) turns -> pieces; the text equals the Jinja template's output."""
    pieces: List[Piece] = []
    for i, (role, content, field, trained) in enumerate(turns):
        if i:
            pieces.append(Piece(SEP))
        pieces.append(Piece(HEADERS[role]))
        pieces.append(Piece(content, trained, field))
        if role == "assistant":
            pieces.append(Piece(eos_token, trained))
    if add_generation_prompt:
        if turns:
            pieces.append(Piece(SEP))
        pieces.append(Piece(HEADERS["assistant"]))
    return pieces


def _prompt_turns(fields: dict) -> List[Tuple[str, str, Optional[str], bool]]:
    """The prompt of a pairwise/prompt record; its answers are context, not trained."""
    if "prompt" in fields:
        return [("user", fields["prompt"], "prompt", False)]
    return [(ROLE_OF[r], t, f"rounds[{i}][1]", False) for i, (r, t) in enumerate(fields["rounds"])]


def response_side(k: int) -> str:
    """The ``side`` that renders answer ``k`` of a ranked record (0 = the best)."""
    return f"responses[{k}]"


def _response_index(side: str) -> int:
    """A ranked record's side -> its answer index ("chosen" -> 0, the best)."""
    if side == "chosen":
        return 0
    if side.startswith("responses[") and side.endswith("]"):
        return int(side[len("responses["):-1])
    raise ValueError(f"side {side!r} of a ranked record: use response_side(k)")


def record_turns(rtype: str, fields: dict, side: str = "chosen") -> List[Tuple[str, str, Optional[str], bool]]:
    """A chat-type record -> (role, content, field, trained) turns. ``side``: pairwise answer to use."""
    if rtype == "instruct":
        ask = fields["instruct"] + (SEP + fields["input"] if "input" in fields else "")
        return [("user", ask, "instruct", False), ("assistant", fields["output"], "output", True)]
    if rtype in ("conversation", "ref_qa"):
        turns = [("system", fields["reference"], "reference", False)] if rtype == "ref_qa" else []
        return turns + [(ROLE_OF[r], t, f"rounds[{i}][1]", r == "ans") for i, (r, t) in enumerate(fields["rounds"])]
    if rtype == "pairwise":
        return _prompt_turns(fields) + [("assistant", fields[side], side, True)]
    if rtype == "prompt":
        return _prompt_turns(fields)
    if rtype == "ranked":
        k = _response_index(side)
        return _prompt_turns(fields) + [("assistant", fields["responses"][k], response_side(k), True)]
    raise ValueError(f"record type {rtype!r} has no chat form")


def record_messages(rtype: str, fields: dict, side: str = "chosen") -> List[Dict[str, str]]:
    """HF chat messages for a record (what ``apply_chat_template`` takes)."""
    return [{"role": role, "content": content} for role, content, _, _ in record_turns(rtype, fields, side)]


def render_record(rtype: str, fields: dict, eos_token: str, side: str = "chosen") -> List[Piece]:
    """A validated record -> pieces whose concatenation is the training text (without BOS)."""
    if rtype == "pretrain":
        return [Piece(fields["text"], True, "text"), Piece(eos_token, True)]
    return render_messages(record_turns(rtype, fields, side), eos_token, add_generation_prompt=rtype == "prompt")


class ContextLayout(NamedTuple):
    """Where a pairwise/prompt rendering may be cut (character positions in the rendered text).

    The text is ``context + tail``: the context is the prompt's turns, the tail (always kept whole) is
    the separator before the last header and what follows it: the scored answer and its EOS
    (pairwise), or the generation prompt (prompt). Over-long samples lose context from the left: whole
    oldest exchanges first, then the start of the last context turn's text, keeping its header. A
    prompt's system message (its first turn, before other context turns) is kept whole, as BOS is: it
    is the prefix ``[0, prefix_end)`` (its "Reference:" block and the separator after it)."""
    turn_starts: Tuple[int, ...]  # where the context may start: the first turn, each later user turn and
                                  # the last turn (their headers), oldest first
    content: Tuple[int, int]      # [start, end) of the last context turn's text
    tail_start: int               # start of the separator before the answer/generation-prompt header
    prefix_end: int = 0           # end of what is always kept before the context (the system message)

    def shifted(self, n: int) -> "ContextLayout":
        """The layout after ``n`` characters (the BOS text) are prepended."""
        return ContextLayout(tuple(t + n for t in self.turn_starts), (self.content[0] + n, self.content[1] + n),
                             self.tail_start + n, self.prefix_end + n)


def context_layout(pieces: Sequence[Piece]) -> Optional[ContextLayout]:
    """The layout of ``render_record`` pieces of a pairwise/prompt record (None for other shapes:
    pretrain, or a chat without context turns before its last header)."""
    starts, pos, headers, contents = [], 0, [], {}
    for i, p in enumerate(pieces):
        starts.append(pos)
        if p.field is None and p.text in _HEADER_TEXTS:
            headers.append(i)
        elif p.field is not None and headers:
            contents[headers[-1]] = (pos, pos + len(p.text))
        pos += len(p.text)
    if len(headers) < 2 or headers[-1] == 0 or pieces[headers[-1] - 1].text != SEP:
        return None
    context = headers[:-1]
    prefix_end = 0
    if len(context) > 1 and pieces[context[0]].text == HEADERS["system"]:  # a prompt's system message: kept
        prefix_end, context = starts[context[1]], context[1:]
    if context[-1] not in contents:
        return None
    # Cut points: a context may start at its first turn, at any later user turn (an exchange is
    # dropped whole), or at its last turn.
    cuts = sorted({context[0], context[-1]} | {h for h in context if pieces[h].text == HEADERS["user"]})
    return ContextLayout(tuple(starts[h] for h in cuts), contents[context[-1]], starts[headers[-1] - 1], prefix_end)


def join_pieces(pieces: Sequence[Piece]) -> Tuple[str, List[Tuple[int, int]]]:
    """Pieces -> (text, trained character spans [start, end)); adjacent trained pieces merge."""
    parts, spans, pos = [], [], 0
    for p in pieces:
        if p.trained and p.text:
            if spans and spans[-1][1] == pos:
                spans[-1] = (spans[-1][0], pos + len(p.text))
            else:
                spans.append((pos, pos + len(p.text)))
        parts.append(p.text)
        pos += len(p.text)
    return "".join(parts), spans
