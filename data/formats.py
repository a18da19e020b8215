"""Record formats of the ecosystem, mapped on load to the unified record types (``data.records``).

    format      a record has           becomes
    pipetune    "type"                 itself (the unified record types)
    messages    "messages"             conversation; ref_qa when it starts with a system message
    sharegpt    "conversations"        conversation / ref_qa ("from": human|user, gpt|assistant|chatgpt, system)
    alpaca      "instruction"          instruct; conversation / ref_qa with "history" / "system"
    preference  "chosen" + "rejected"  pairwise (prompt + one answer each); "prompt" alone: prompt
    completion  "prompt" + "completion"  instruct (two strings) / conversation (message lists)

The format is detected per file from its first record (the keys above, in this order; "type" only when
it names a record type), or stated in the data path: ``{"path": "x.jsonl", "format": "sharegpt"}``.

Preference records (Anthropic HH, Dahoas, TRL, UltraFeedback): ``prompt``, ``chosen`` and ``rejected``
are each a string or a list of messages. A string that starts with "Human:" or "Assistant:" (after
whitespace) is an HH transcript: its "\\n\\nHuman:" / "\\n\\nAssistant:" markers start turns, and a
prompt's trailing empty "Assistant:" (the generation prompt) is dropped. A plain string is one user
turn (prompt) or one assistant answer (chosen/rejected). The turns that chosen and rejected share at
their start are prompt turns too (TRL's implicit prompt; HH transcripts), after the explicit prompt;
when chosen and rejected repeat the explicit prompt (UltraFeedback), that copy is skipped. What is left
of each must be one assistant message.

System messages: a first, non-empty system message becomes the ``reference`` of a ref_qa record (the
unified types' one system slot: pipetune's template renders it as "Reference:", the model's own
template as its system message). An empty system message or alpaca ``input`` counts as absent (as
exported data sets write them). Pairwise and prompt records have no system turn: such records are errors.

Columns that a format does not use are ignored (data sets carry ids, scores, sources), except names
close to the format's own keys ("inputs", "instrution", "conversation"): those are errors, so a typo
does not silently drop a field.

``map_record`` returns the unified object plus a map from its field names to the source's, so that
validation problems (``data.records.validate_record``) and tokenization problems name the user's
fields: ``field 'messages[3].content': is empty``.
"""
from __future__ import annotations

import difflib
import json
import re
from typing import Any, Dict, List, Optional, Tuple

from data.schema import FORMATS, RECORD_TYPES, json_type

# The keys each format reads; others are ignored unless they look like a typo of one of these.
KEYS = {
    "messages": ("messages",),
    "sharegpt": ("conversations", "system"),
    "alpaca": ("instruction", "input", "output", "system", "history"),
    "preference": ("prompt", "chosen", "rejected"),
    "completion": ("prompt", "completion"),
}
MESSAGE_ROLES = {"user": "ask", "assistant": "ans", "system": "system"}
SHAREGPT_ROLES = {"human": "ask", "user": "ask", "gpt": "ans", "assistant": "ans", "chatgpt": "ans", "system": "system"}
_ROLE_NAMES = {"ask": "user", "ans": "assistant", "system": "system"}
_HH_START = re.compile(r"\s*(Human|Assistant):")
_HH_SPLIT = re.compile(r"(?:\A\s*|\n\n)(Human|Assistant):")

Turn = Tuple[str, Any, str]  # (role "ask" | "ans" | "system", text, source field)
BadList = List[Tuple[Optional[str], str, str]]  # (source field, message, reason)


def detect_format(obj: dict) -> Optional[str]:
    """The format of a record from its keys (None: none matches)."""
    if obj.get("type") in RECORD_TYPES:
        return "pipetune"
    if "messages" in obj:
        return "messages"
    if "conversations" in obj:
        return "sharegpt"
    if "chosen" in obj or "rejected" in obj:
        return "preference"
    if "completion" in obj:
        return "completion"
    if "instruction" in obj:
        return "alpaca"
    if "prompt" in obj:
        return "preference"
    if "type" in obj:
        return "pipetune"
    return None


def undetected_message(obj: dict) -> str:
    keys = ", ".join(sorted(obj)[:8]) or "none"
    return ("cannot tell the record format from the first record's keys (" + keys + "): a unified record has "
            "\"type\"; messages, conversations (ShareGPT), instruction/output (Alpaca), prompt/chosen/rejected "
            "(preference) or prompt/completion name the others. State it with {\"path\": ..., \"format\": ...} "
            f"({', '.join(FORMATS)})")


class Mapped:
    """A source record mapped to a unified record object (``obj`` None when it could not be mapped)."""

    def __init__(self, obj: Optional[dict], problems: BadList, fields: Dict[str, str]):
        self.obj, self.problems, self.fields = obj, problems, fields


def map_record(fmt: str, obj: dict) -> Mapped:
    """A record object of format ``fmt`` (not "pipetune") -> the unified record object."""
    m = _Mapper(fmt)
    m.typo_keys(obj)
    out = {"messages": m.messages, "sharegpt": m.sharegpt, "alpaca": m.alpaca, "preference": m.preference,
           "completion": m.completion}[fmt](obj)
    if m.problems:
        return Mapped(None, m.problems, m.fields)
    return Mapped(out, [], m.fields)


class _Mapper:
    def __init__(self, fmt: str):
        self.fmt, self.problems, self.fields = fmt, [], {}

    def bad(self, field: Optional[str], message: str, reason: str = "bad_value") -> None:
        self.problems.append((field, message, reason))

    def typo_keys(self, obj: dict) -> None:
        known = KEYS[self.fmt]
        for key in obj:
            if key in known:
                continue
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.8)
            if close:
                self.bad(key, f"unknown field for the {self.fmt} format: did you mean {close[0]!r}? (other unknown "
                         "fields are ignored)", "unknown_field")

    def need(self, obj: dict, key: str) -> bool:
        if key not in obj:
            self.bad(key, f"missing (required by the {self.fmt} format)", "missing_field")
            return False
        return True

    # -- message lists ------------------------------------------------------------------------------

    def turns(self, value: Any, field: str, role_key: str, text_key: str, roles: Dict[str, str]) -> Optional[List[Turn]]:
        """A list of message objects -> turns; None (with problems) when it is not one."""
        if not isinstance(value, list):
            self.bad(field, f"must be a list of messages ({{\"{role_key}\": ..., \"{text_key}\": ...}}), got a JSON "
                     f"{json_type(value)}")
            return None
        if not value:
            self.bad(field, "is empty; give at least one message", "empty_text")
            return None
        out, ok = [], True
        for i, msg in enumerate(value):
            where = f"{field}[{i}]"
            if not isinstance(msg, dict):
                self.bad(where, f"must be a message object with \"{role_key}\" and \"{text_key}\", got a JSON "
                         f"{json_type(msg)}")
                ok = False
                continue
            role = msg.get(role_key)
            if role_key not in msg:
                self.bad(where, f"missing \"{role_key}\"", "missing_field")
                ok = False
            elif role not in roles:
                self.bad(f"{where}.{role_key}", f"unknown role {json.dumps(role, ensure_ascii=False)}; use "
                         f"{', '.join(repr(r) for r in roles)}", "unknown_role")
                ok = False
            if text_key not in msg:
                self.bad(where, f"missing \"{text_key}\"", "missing_field")
                ok = False
            if ok:
                out.append((roles[role], msg[text_key], f"{where}.{text_key}"))
        return out if ok else None

    def split_system(self, turns: List[Turn], field: str, allowed: bool = True) -> Tuple[Optional[Turn], List[Turn]]:
        """(the leading system turn or None, the other turns); a system turn elsewhere is a problem.
        An empty system message counts as absent."""
        turns = [t for t in turns if not (t[0] == "system" and isinstance(t[1], str) and not t[1].strip())]
        system = turns[0] if turns and turns[0][0] == "system" else None
        rest = turns[1:] if system else turns
        for role, _, where in rest:
            if role == "system":
                self.bad(where.rsplit(".", 1)[0], "a system message must be the first message", "bad_value")
        if system is not None and not allowed:
            self.bad(system[2].rsplit(".", 1)[0], "system messages are not supported here (pairwise and prompt records "
                     "have no system turn)", "bad_value")
        return system, rest

    def need_answer(self, turns: List[Turn], field: str, what: str = "an assistant message") -> None:
        if not any(role == "ans" for role, _, _ in turns):
            self.bad(field, f"has no answer: add {what} (nothing would be trained on)", "no_answer")

    def chat(self, system: Optional[Turn], turns: List[Turn]) -> dict:
        """Turns -> a conversation or ref_qa object, recording the field map."""
        rounds = []
        for i, (role, text, where) in enumerate(turns):
            rounds.append([role, text])
            self.fields[f"rounds[{i}][1]"] = where
            self.fields[f"rounds[{i}]"] = where.rsplit(".", 1)[0]
        if system is None:
            return {"type": "conversation", "rounds": rounds}
        self.fields["reference"] = system[2]
        return {"type": "ref_qa", "reference": system[1], "rounds": rounds}

    # -- formats ------------------------------------------------------------------------------------

    def messages(self, obj: dict) -> Optional[dict]:
        if not self.need(obj, "messages"):
            return None
        turns = self.turns(obj["messages"], "messages", "role", "content", MESSAGE_ROLES)
        if turns is None:
            return None
        system, rest = self.split_system(turns, "messages")
        self.need_answer(rest, "messages")
        self.fields["rounds"] = "messages"
        return self.chat(system, rest)

    def sharegpt(self, obj: dict) -> Optional[dict]:
        if not self.need(obj, "conversations"):
            return None
        turns = self.turns(obj["conversations"], "conversations", "from", "value", SHAREGPT_ROLES)
        if turns is None:
            return None
        if isinstance(obj.get("system"), str) and obj["system"].strip():
            turns = [("system", obj["system"], "system")] + turns
        system, rest = self.split_system(turns, "conversations")
        self.need_answer(rest, "conversations", 'a "gpt" message')
        self.fields["rounds"] = "conversations"
        return self.chat(system, rest)

    def alpaca(self, obj: dict) -> Optional[dict]:
        ok = self.need(obj, "instruction") & self.need(obj, "output")
        history = obj.get("history") or []
        if not isinstance(history, list) or not all(isinstance(h, list) and len(h) == 2 for h in history):
            self.bad("history", "must be a list of [instruction, output] pairs")
            return None
        if not ok:
            return None
        ask = obj["instruction"]
        if isinstance(obj.get("input"), str) and obj["input"].strip():
            ask = (obj["instruction"] + "\n\n" + obj["input"]) if isinstance(obj["instruction"], str) else obj["instruction"]
            self.fields["input"] = "input"
        system = obj.get("system") if isinstance(obj.get("system"), str) and obj["system"].strip() else None
        if not history and system is None:
            self.fields.update(instruct="instruction", output="output")
            out = {"type": "instruct", "instruct": obj["instruction"], "output": obj["output"]}
            if "input" in self.fields:
                out["input"] = obj["input"]
            return out
        turns = [t for i, (q, a) in enumerate(history) for t in (("ask", q, f"history[{i}][0]"), ("ans", a, f"history[{i}][1]"))]
        turns += [("ask", ask, "instruction"), ("ans", obj["output"], "output")]
        self.fields["rounds"] = "history"
        return self.chat(("system", system, "system") if system is not None else None, turns)

    def completion(self, obj: dict) -> Optional[dict]:
        if not (self.need(obj, "prompt") & self.need(obj, "completion")):
            return None
        prompt, completion = obj["prompt"], obj["completion"]
        if isinstance(prompt, str) and isinstance(completion, str):
            self.fields.update(instruct="prompt", output="completion")
            return {"type": "instruct", "instruct": prompt, "output": completion}
        p = self.side(prompt, "prompt", "ask")
        c = self.side(completion, "completion", "ans")
        if p is None or c is None:
            return None
        system, rest = self.split_system(p + c, "prompt")
        if not c or any(role != "ans" for role, _, _ in c):
            self.bad("completion", "must be assistant messages (the part that is trained)")
        self.fields["rounds"] = "prompt"
        return self.chat(system, rest)

    def side(self, value: Any, field: str, plain_role: str) -> Optional[List[Turn]]:
        """A preference/completion field: a message list, an HH transcript or one plain turn."""
        if isinstance(value, list):
            return self.turns(value, field, "role", "content", MESSAGE_ROLES)
        if isinstance(value, str) and _HH_START.match(value):
            return hh_turns(value, field, drop_open_answer=field == "prompt")
        if isinstance(value, str):
            return [(plain_role, value, field)]
        self.bad(field, f"must be a string or a list of messages, got a JSON {json_type(value)}")
        return None

    def preference(self, obj: dict) -> Optional[dict]:
        has_c, has_r = "chosen" in obj, "rejected" in obj
        prompt = self.side(obj["prompt"], "prompt", "ask") if "prompt" in obj else []
        if not (has_c or has_r):  # a prompt-only record (PPO prompts)
            if not self.need(obj, "prompt") or prompt is None:
                return None
            _, prompt = self.split_system(prompt, "prompt", allowed=False)
            return None if self.problems else self.prompt_fields({"type": "prompt"}, prompt, obj)
        if not (self.need(obj, "chosen") & self.need(obj, "rejected")):
            return None
        chosen, rejected = self.side(obj["chosen"], "chosen", "ans"), self.side(obj["rejected"], "rejected", "ans")
        if prompt is None or chosen is None or rejected is None:
            return None
        if prompt and len(chosen) > len(prompt) and len(rejected) > len(prompt) \
                and _same(chosen[:len(prompt)], prompt) and _same(rejected[:len(prompt)], prompt):
            chosen, rejected = chosen[len(prompt):], rejected[len(prompt):]  # conversations repeating the prompt
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and _same(chosen[shared:shared + 1], rejected[shared:shared + 1]):
            shared += 1
        context = prompt + chosen[:shared]
        for key, rest in (("chosen", chosen[shared:]), ("rejected", rejected[shared:])):
            if len(rest) != 1 or rest[0][0] != "ans":
                self.bad(key, "must end in one assistant answer after the turns it shares with "
                         f"'{'rejected' if key == 'chosen' else 'chosen'}' (got {len(rest)} different "
                         f"message{'s' if len(rest) != 1 else ''}: {', '.join(_ROLE_NAMES[r] for r, _, _ in rest) or 'none'})")
            else:
                self.fields[key] = rest[0][2]
        if not context:
            self.bad("prompt", "missing: give \"prompt\", or chosen and rejected conversations that start with the "
                     "same prompt turns", "missing_field")
        _, context = self.split_system(context, "prompt", allowed=False)
        if self.problems:
            return None
        answers = [chosen[shared][1], rejected[shared][1]]
        if isinstance(obj.get("prompt"), str) and _HH_START.match(obj["prompt"]):
            # Dahoas style: the prompt ends with "Assistant:" and each answer continues it (" The answer")
            answers = [a.strip() if isinstance(a, str) and s[2] == k else a
                       for a, s, k in zip(answers, (chosen[shared], rejected[shared]), ("chosen", "rejected"))]
        return self.prompt_fields({"type": "pairwise", "chosen": answers[0], "rejected": answers[1]}, context, obj)

    def prompt_fields(self, out: dict, context: List[Turn], obj: dict) -> dict:
        if len(context) == 1 and context[0][0] == "ask":
            out["prompt"] = context[0][1]
            self.fields["prompt"] = context[0][2]
            return out
        rounds = self.chat(None, context)["rounds"]
        self.fields["rounds"] = "prompt" if "prompt" in obj else "chosen"
        out["rounds"] = rounds
        return out


def hh_turns(text: str, field: str, drop_open_answer: bool) -> List[Turn]:
    """An HH transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") -> turns, texts stripped. With
    ``drop_open_answer`` a trailing empty "Assistant:" (a generation prompt) is dropped."""
    parts = _HH_SPLIT.split(text)  # ["", "Human", " q", "Assistant", " a", ...]
    turns = [("ask" if who == "Human" else "ans", said.strip(), f"{field} (turn {i + 1})")
             for i, (who, said) in enumerate(zip(parts[1::2], parts[2::2]))]
    if drop_open_answer and turns and turns[-1][0] == "ans" and not turns[-1][1]:
        turns.pop()
    return turns


def _same(a: List[Turn], b: List[Turn]) -> bool:
    return [(r, t) for r, t, _ in a] == [(r, t) for r, t, _ in b]
