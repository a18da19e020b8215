"""``template: "model"``: train with the tokenizer's own chat template (Llama-3-Instruct, ChatML, ...).

Each chat-type record becomes HF messages (``data.templates.record_turns``: instruct -> user +
assistant, ref_qa's reference -> a system message, pairwise -> the prompt turns + the chosen or rejected
answer, prompt -> the prompt turns with the generation prompt), rendered once with
``apply_chat_template(..., tokenize=False)`` and tokenized once with ``add_special_tokens=False``, exactly
as ``apply_chat_template(..., tokenize=True)`` (and so demo.py, vLLM, TGI) tokenizes it. Pretrain records
are raw text + EOS, as with pipetune's template.

Trained tokens (loss) are the trained assistant messages (every answer of instruct, conversation and
ref_qa; the chosen/rejected answer of a pairwise record, not the answers inside its prompt), each with
the template's end-of-turn markup, never the headers:

- the template has ``{% generation %}`` blocks: the tokens its assistant mask marks
  (``apply_chat_template(..., return_assistant_tokens_mask=True)``), one run per assistant message;
- otherwise, by rendering incrementally and diffing: assistant message i's span starts where the
  rendering of messages[:i] with the generation prompt ends (the header is the generation prompt) and
  ends where the rendering of messages[:i + 1] ends, less trailing whitespace (ChatML's "\\n" after
  "<|im_end|>" belongs to the next turn's layout). Each prefix rendering must be a prefix of the
  whole text (true of Llama-3 and ChatML templates); a record for which it is not is reported.

Checked once per tokenizer on a probe conversation (``TokenizerError`` otherwise): the template renders
it, and each trained span ends with a special token (EOS or an end-of-turn token such as
``<|eot_id|>``/``<|im_end|>``), so that the model learns to stop. Recorded in the stats: whether the
prompt's tokens are a prefix of the trained sample's tokens (``prompt_boundary_ok``: true when the
tokenizer splits at the header's end, as Llama-3's and Qwen's pre-tokenizers do; then a prompt that demo
renders is token for token the context training saw).

Over-long pairwise/prompt samples lose whole context messages from the left (oldest exchanges first,
re-rendered, so a template's preamble stays; a prompt's system message stays); a sample that does not
fit with only its last context message (after its system message) is dropped. Messages are never cut
inside their text.
"""
from __future__ import annotations

import hashlib
import re
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np

from data.errors import Problem, TokenizerError
from data.records import Record
from data.templates import Piece, record_turns
from data.tokenize import encode, special_token_problems, tokenize_records

TEMPLATES = ("pipetune", "model")
GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")
PROBE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
         {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye"}]
Sample = Tuple[np.ndarray, np.ndarray]  # (ids int32 [L], target bool [L])


class RecordProblem(Exception):
    """This record cannot be rendered/masked with the model's template (the message says why)."""


def make_template(name: str, tokenizer) -> Optional["ModelTemplate"]:
    """None for pipetune's template, a ``ModelTemplate`` for "model"."""
    if name not in TEMPLATES:
        raise ValueError(f"template {name!r}: use one of {', '.join(TEMPLATES)}")
    return ModelTemplate(tokenizer) if name == "model" else None


class ModelTemplate:
    name = "model"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        who = repr(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)
        try:
            self.source = tokenizer.get_chat_template()
        except ValueError as e:
            raise TokenizerError(f'template "model": tokenizer {who} has no usable chat_template ({e}); give a '
                                 'tokenizer with one (tokenizer_config.json or chat_template.jinja) or use template '
                                 '"pipetune"') from None
        self.generation_blocks = bool(GENERATION_BLOCK.search(self.source))
        self.version = hashlib.sha256(self.source.encode()).hexdigest()[:16] + ("-gen" if self.generation_blocks else "")
        self.specials = [s for s in tokenizer.all_special_tokens if s]
        added = {tid for tid, t in tokenizer.added_tokens_decoder.items() if t.special}
        self.special_ids = added | set(tokenizer.all_special_ids)
        self._probe(who)

    # -- the probe ------------------------------------------------------------------------------

    def _probe(self, who: str) -> None:
        trained = [m["role"] == "assistant" for m in PROBE]
        try:
            ids, target = self._encode_chat(PROBE, trained, False)
            prompt_ids = self._tokenize(self.render(PROBE[:1], True))
        except (RecordProblem, *_render_errors()) as e:
            raise TokenizerError(f'template "model": the chat template of tokenizer {who} cannot render a plain '
                                 f"user/assistant conversation: {e}") from None
        runs = _runs(target)
        if len(runs) != 2:
            raise TokenizerError(f'template "model": found {len(runs)} trained spans in a conversation with 2 assistant '
                                 f"messages (tokenizer {who}); use template \"pipetune\"")
        for a, b in runs:
            if int(ids[b - 1]) not in self.special_ids:
                text = self.tokenizer.decode(ids[a:b].tolist())
                raise TokenizerError(
                    f'template "model": the chat template of tokenizer {who} ends an assistant turn with {text!r}, not '
                    f"a special token such as EOS {self.tokenizer.eos_token!r}: a model trained on it would not learn "
                    "to stop. Use a template whose assistant turns end with an end-of-turn token, or template \"pipetune\"")
        self.end_of_turn = self.tokenizer.convert_ids_to_tokens(int(ids[runs[0][1] - 1]))
        self.prompt_boundary_ok = bool(len(prompt_ids) <= len(ids) and np.array_equal(ids[:len(prompt_ids)], prompt_ids))

    def describe(self) -> dict:
        return {"name": self.name, "generation_blocks": self.generation_blocks, "end_of_turn": self.end_of_turn,
                "prompt_boundary_ok": self.prompt_boundary_ok, "version": self.version}

    # -- rendering and masks --------------------------------------------------------------------

    def render(self, messages: List[dict], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def _tokenize(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int32)

    def spans(self, messages: List[dict], trained: Sequence[bool], add_generation_prompt: bool
              ) -> Tuple[str, List[Tuple[int, int]]]:
        """(rendered text, trained char spans) by incremental rendering (see the module docstring)."""
        text = self.render(messages, add_generation_prompt)
        spans = []
        for i, train in enumerate(trained):
            if not train:
                continue
            after = text if i == len(messages) - 1 and not add_generation_prompt else self.render(messages[:i + 1])
            if not text.startswith(after):
                raise RecordProblem(f"the model's chat template renders messages 1..{i + 1} differently alone than "
                                    "inside the whole conversation, so the assistant message cannot be located; use a "
                                    "template with {% generation %} blocks, or template \"pipetune\"")
            start = None
            if i > 0:
                before = self.render(messages[:i], True)
                if after.startswith(before):
                    start = len(before)
            if start is None:  # no generation prompt before it: find its text after the previous messages
                base = self.render(messages[:i]) if i > 0 else ""
                pos = after.find(messages[i]["content"].strip(), len(base)) if after.startswith(base) else -1
                if pos < 0:
                    raise RecordProblem(f"cannot find assistant message {i + 1} in the model's chat template's rendering "
                                        "(the template changes its text); use template \"pipetune\"")
                start = pos
            spans.append((start, max(start, len(after.rstrip()))))
        return text, spans

    def _encode_chat(self, messages: List[dict], trained: Sequence[bool], add_generation_prompt: bool) -> Sample:
        if self.generation_blocks and any(trained):
            enc = self.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                     return_assistant_tokens_mask=True,
                                                     add_generation_prompt=add_generation_prompt)
            return self._from_mask(np.asarray(enc["input_ids"], dtype=np.int32), enc["assistant_masks"], messages, trained)
        text, spans = self.spans(messages, trained, add_generation_prompt)
        (ids, target), = encode(self.tokenizer, [text], [spans], add_special_tokens=False)
        return ids, target

    def _from_mask(self, ids: np.ndarray, mask, messages: List[dict], trained: Sequence[bool]) -> Sample:
        runs = _runs(np.asarray(mask, dtype=bool))
        assistant = [t for m, t in zip(messages, trained) if m["role"] == "assistant"]
        if len(runs) != len(assistant):
            raise RecordProblem(f"the model's chat template marks {len(runs)} {{% generation %}} spans for "
                                f"{len(assistant)} assistant messages; each assistant message needs one")
        target = np.zeros(len(ids), dtype=bool)
        for (a, b), train in zip(runs, assistant):
            target[a:b] = train
        if len(target):
            target[0] = False
        return ids, target

    def encode_turns(self, turns, add_generation_prompt: bool) -> Sample:
        """(role, content, field, trained) turns -> (ids, target); raises RecordProblem / template errors."""
        messages = [{"role": role, "content": content} for role, content, _, _ in turns]
        return self._encode_chat(messages, [t for _, _, _, t in turns], add_generation_prompt)

    # -- data.tokenize's contract ---------------------------------------------------------------

    def tokenize_records(self, records: Iterable[Tuple[Record, str]], batch_size: int = 1000
                         ) -> Tuple[List[Optional[Sample]], List[Problem]]:
        """As ``data.tokenize.tokenize_records``, with this template for chat-type records."""
        entries = list(records)
        out: List[Optional[Sample]] = [None] * len(entries)
        problems: List[Problem] = []
        raw = [i for i, (rec, _) in enumerate(entries) if rec.type == "pretrain"]
        if raw:
            samples, bad = tokenize_records([entries[i] for i in raw], self.tokenizer, batch_size)
            problems.extend(bad)
            for i, s in zip(raw, samples):
                out[i] = s
        texts, spans, where = [], [], []  # incremental path: batch the tokenization
        for i, (rec, side) in enumerate(entries):
            if rec.type == "pretrain":
                continue
            turns = record_turns(rec.type, rec.fields, side)
            bad = special_token_problems(rec, [Piece(c, t, f) for _, c, f, t in turns], self.specials)
            if bad:
                problems.extend(bad)
                continue
            gp, messages = rec.type == "prompt", [{"role": r, "content": c} for r, c, _, _ in turns]
            trained = [t for _, _, _, t in turns]
            try:
                if self.generation_blocks and any(trained):
                    out[i] = self._encode_chat(messages, trained, gp)
                else:
                    text, sp = self.spans(messages, trained, gp)
                    texts.append(text)
                    spans.append(sp)
                    where.append(i)
            except (RecordProblem, *_render_errors()) as e:
                problems.append(template_problem(rec, e))
        for i, sample in zip(where, encode(self.tokenizer, texts, spans, batch_size, add_special_tokens=False)):
            out[i] = sample
        return out, problems

    def fit_context(self, entries: Sequence[Tuple[Record, str]], max_len: int) -> Optional[List[Sample]]:
        """Pairwise/prompt sides sharing one context -> samples that fit after dropping the same oldest
        context messages from each (a user message starts the kept context, or only the last context
        message is kept; a prompt's system message is kept first); None when nothing fits."""
        sides = [record_turns(rec.type, rec.fields, side) for rec, side in entries]
        gp = entries[0][0].type == "prompt"
        n_context = len(sides[0]) - (0 if gp else 1)
        keep = 1 if n_context > 1 and sides[0][0][0] == "system" else 0  # the system message stays
        starts = [k for k in range(1 + keep, n_context) if sides[0][k][0] == "user" or k == n_context - 1]
        for k in starts:
            try:
                samples = [self.encode_turns(turns[:keep] + turns[k:], gp) for turns in sides]
            except (RecordProblem, *_render_errors()):
                continue  # e.g. a template that needs a user message first
            if all(len(ids) <= max_len for ids, _ in samples):
                return samples
        return None


def template_problem(rec: Record, e: Exception) -> Problem:
    msg = str(e) if isinstance(e, RecordProblem) else f"the model's chat template cannot render this record: {e}"
    return Problem(rec.file, msg, record=rec.index, line=rec.line, reason="template")


def _render_errors() -> tuple:
    """What apply_chat_template raises for a conversation its template refuses (raise_exception, bad roles)."""
    from jinja2 import TemplateError

    return TemplateError, ValueError, TypeError, KeyError


def _runs(mask: np.ndarray) -> List[Tuple[int, int]]:
    """[start, end) of each run of True."""
    m = np.concatenate([[False], np.asarray(mask, dtype=bool), [False]])
    edges = np.flatnonzero(m[1:] != m[:-1])
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist()))
