"""Record formats of the ecosystem, mapped on load to the unified record types (``data.records``).

    format      a record has           becomes
    pipetune    "type"                 itself (the unified record types)
    messages    "messages"             conversation; ref_qa when it starts with a system message;
                                       prompt (when read as prompts) when it ends with a user message
    sharegpt    "conversations"        as messages ("from": human|user, gpt|assistant|chatgpt, system)
    alpaca      "instruction"          instruct; conversation / ref_qa with "history" / "system"
    preference  "chosen" + "rejected"  pairwise (prompt + one answer each); "prompt" alone: prompt
    completion  "prompt" + "completion"  instruct (two strings) / conversation (message lists)
    qa          "question" + "answer"  instruct (question -> answer); prompt (when read as prompts)
                                       with the answer (and every other field) as columns (GSM8K)

The format is detected per file from its first record (the keys above, in this order; "type" only when
it names a record type), or stated in the data path: ``{"path": "x.jsonl", "format": "sharegpt"}``.

Read as prompts (``map_record(..., prompts=True)``: what ``build_dataset(kind="prompt")``, PPO's and
GRPO's data, reads). Two shapes mean different records to different stages, and the stage is known
only when the data is built, so the mapping takes it:

- A question/answer record (GSM8K: ``{"question": "...", "answer": "... #### 72"}``) is an SFT example
  (instruct: the question, trained on the answer with its reasoning) and a GRPO prompt whose answer
  checks the completion (prompt: the question, columns ``answer`` and the record's other fields, which
  the reward functions get; the built-in math_answer takes what follows "####"). The same file so
  serves both stages unchanged; for SFT its other fields are ignored, as other formats ignore them.
- A chat (messages, ShareGPT) ending with a user message is a prompt (TRL's conversational prompt): its
  messages up to that last user message, a leading system message included (R1-style runs put the
  format instruction there), other fields as columns. Anywhere else it is what it always was: a
  conversation still needs an answer ("has no answer"), so an SFT file with a truncated chat is
  reported, not silently skipped.

A prompt record keeps the prompt as the source gave it (``Mapped.prompt``; ``data.records.Record.
given_prompt``): the string, or the message list as {"role", "content"} dicts (system message
included), which is what the reward functions receive as ``prompts``.

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
template as its system message). A prompt record carries it as a leading ``["system", text]`` round
(not a field: a prompt record's other fields are the reward functions' columns, and "reference" is a
likely column name), rendered the same way. An empty system message or alpaca ``input`` counts as
absent (as exported data sets write them). Pairwise records have no system turn: such records are errors.

Columns that a format does not use are ignored (data sets carry ids, scores, sources), except names
close to the format's own keys ("inputs", "instrution", "conversation"): those are errors, so a typo
does not silently drop a field. A prompt-only record keeps its other columns (e.g. "answer": GRPO's
reward functions read them).

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
    "qa": ("question", "answer"),
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
    if "question" in obj and "answer" in obj:
        return "qa"
    if "type" in obj:
        return "pipetune"
    return None


def undetected_message(obj: dict) -> str:
    keys = ", ".join(sorted(obj)[:8]) or "none"
    return ("cannot tell the record format from the first record's keys (" + keys + "): a unified record has "
            "\"type\"; messages, conversations (ShareGPT), instruction/output (Alpaca), prompt/chosen/rejected "
            "(preference), prompt/completion or question/answer (qa) name the others. State it with "
            f"{{\"path\": ..., \"format\": ...}} ({', '.join(FORMATS)})")


class Mapped:
    """A source record mapped to a unified record object (``obj`` None when it could not be mapped).
    ``prompt``: the prompt as the source gave it (a string or {"role", "content"} messages), for records
    whose prompt came from one source field as a whole; else None."""

    def __init__(self, obj: Optional[dict], problems: BadList, fields: Dict[str, str], prompt: Any = None):
        self.obj, self.problems, self.fields, self.prompt = obj, problems, fields, prompt


def map_record(fmt: str, obj: dict, prompts: bool = False) -> Mapped:
    """A record object of format ``fmt`` (not "pipetune") -> the unified record object. ``prompts``: the
    records are read as prompts (kind="prompt"; the module docstring)."""
    m = _Mapper(fmt, prompts)
    m.typo_keys(obj)
    out = {"messages": m.messages, "sharegpt": m.sharegpt, "alpaca": m.alpaca, "preference": m.preference,
           "completion": m.completion, "qa": m.qa}[fmt](obj)
    if m.problems:
        return Mapped(None, m.problems, m.fields)
    return Mapped(out, [], m.fields, m.given)


class _Mapper:
    def __init__(self, fmt: str, prompts: bool = False):
        self.fmt, self.prompts, self.problems, self.fields = fmt, prompts, [], {}
        self.given: Any = None  # the prompt as the source gave it (Mapped.prompt)

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
            self.bad(system[2].rsplit(".", 1)[0], "system messages are not supported here (pairwise records have no "
                     "system turn)", "bad_value")
        return system, rest

    def need_answer(self, turns: List[Turn], field: str, what: str = "an assistant message") -> None:
        if not any(role == "ans" for role, _, _ in turns):
            hint = "; as a prompt ending with a user message it serves PPO/GRPO (kind \"prompt\")" \
                if turns and turns[-1][0] == "ask" else ""
            self.bad(field, f"has no answer: add {what} (nothing would be trained on){hint}", "no_answer")

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
        if self.prompts and rest and rest[-1][0] == "ask":  # TRL's conversational prompt
            self.given = [{"role": m["role"], "content": m["content"]} for m in obj["messages"]]
            return self.chat_prompt(system, rest, obj, "messages")
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
        if self.prompts and rest and rest[-1][0] == "ask":
            self.given = [{"role": _ROLE_NAMES[role], "content": text} for role, text, _ in turns]
            return self.chat_prompt(system, rest, obj, "conversations", ("conversations", "system"))
        self.need_answer(rest, "conversations", 'a "gpt" message')
        self.fields["rounds"] = "conversations"
        return self.chat(system, rest)

    def chat_prompt(self, system: Optional[Turn], turns: List[Turn], obj: dict, field: str,
                    keys: Tuple[str, ...] = ("messages",)) -> dict:
        """A chat ending with a user turn, read as a prompt: its turns (a system turn first as a ["system",
        text] round), the record's other fields as columns."""
        columns = {k: v for k, v in obj.items() if k not in keys and k != "type"}
        return self.prompt_fields({"type": "prompt", **columns}, ([system] if system else []) + turns, field)

    def qa(self, obj: dict) -> Optional[dict]:
        """GSM8K-style question/answer: instruct, or (read as prompts) a prompt with the answer as a column."""
        if not (self.need(obj, "question") & self.need(obj, "answer")):
            return None
        if self.prompts:
            self.fields["prompt"] = "question"
            self.given = obj["question"]
            columns = {k: v for k, v in obj.items() if k not in ("question", "type")}
            return {"type": "prompt", "prompt": obj["question"], **columns}
        self.fields.update(instruct="question", output="answer")
        return {"type": "instruct", "instruct": obj["question"], "output": obj["answer"]}

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
        if not (has_c or has_r):  # a prompt-only record (PPO/GRPO prompts; TRL's prompt column)
            if not self.need(obj, "prompt") or prompt is None:
                return None
            system, prompt = self.split_system(prompt, "prompt")
            columns = {k: v for k, v in obj.items() if k not in KEYS["preference"] and k != "type"}
            if self.problems:
                return None
            self.given = _given(obj["prompt"])
            return self.prompt_fields({"type": "prompt", **columns}, ([system] if system else []) + prompt, "prompt")
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
        if "prompt" in obj and len(context) == len(prompt):  # the explicit prompt is the whole context
            self.given = _given(obj["prompt"])
        answers = [chosen[shared][1], rejected[shared][1]]
        if isinstance(obj.get("prompt"), str) and _HH_START.match(obj["prompt"]):
            # Dahoas style: the prompt ends with "Assistant:" and each answer continues it (" The answer")
            answers = [a.strip() if isinstance(a, str) and s[2] == k else a
                       for a, s, k in zip(answers, (chosen[shared], rejected[shared]), ("chosen", "rejected"))]
        return self.prompt_fields({"type": "pairwise", "chosen": answers[0], "rejected": answers[1]}, context,
                                  "prompt" if "prompt" in obj else "chosen")

    def prompt_fields(self, out: dict, context: List[Turn], field: str) -> dict:
        """The prompt of a pairwise/prompt object: "prompt" for one user turn, else "rounds" (a system
        turn first becomes a ["system", text] round: prompt records only). ``field``: the source's."""
        if len(context) == 1 and context[0][0] == "ask":
            out["prompt"] = context[0][1]
            self.fields["prompt"] = context[0][2]
            return out
        rounds = self.chat(None, context)["rounds"]
        self.fields["rounds"] = field
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


def _given(value: Any) -> Any:
    """A preference prompt as given: a string, or its messages as {"role", "content"} dicts."""
    if isinstance(value, list):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    return value


def _same(a: List[Turn], b: List[Turn]) -> bool:
    return [(r, t) for r, t, _ in a] == [(r, t) for r, t, _ in b]
