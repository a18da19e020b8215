"""Reward functions for PPO and GRPO (verifiable rewards), TRL's interface:

    f(prompts: list[str | list[dict]], completions: list[str | list[dict]], **columns) -> list[float | None]

called with keywords, as TRL calls them: prompts, each row's prompt as the record gave it; completions,
the generated answers decoded without special tokens; columns, every other field of the prompt records,
one list per field (e.g. answer=[...]); completion_ids, the answer token ids; trainer_state, a
transformers.TrainerState (global_step: the RL steps completed, max_steps). A function may ignore what
it does not need (**kwargs), so TRL's `def f(completions, **kwargs)` runs unchanged; an `async def`
function is awaited (on its own event loop: it may gather its own requests, e.g. to a sandbox). It returns
a list (or a 1-D array / tensor) of numbers or None. None means "does not apply to this sample": a row's reward is
the weighted sum over the functions that apply (TRL's nansum; a row no function applies to gets 0), plus
reward_model_weight x the reward model's score where the recipe has one.

Shapes (TRL's two formats, decided per row): a record whose prompt is a list of {"role", "content"}
messages is conversational: its prompt is passed as that list and its completion as
[{"role": "assistant", "content": text}]; any other prompt (a string) is standard: the completion is the
text. The built-ins take both.

A reward function is named in SECTION.reward_funcs (SECTION: "ppo" or "grpo", the recipe's section) as
    "math_answer" | "exact_match" | "format" | "overlong"      a built-in (below; options in SECTION.reward_kwargs)
    "my_rewards:exact_answer"                                 module:function, the module importable from
                                                              the working directory or PYTHONPATH
    "path/to/rewards.py:exact_answer"                         a file
A function that raises, returns a list of the wrong length, a NaN or a non-number, or whose call takes
longer than SECTION.reward_timeout_s, stops the run on every rank with one line (RewardError) naming the
function and, but for a time-out or a wrong length, the sample (when a call on all the rows raises, the
function is called again one row at a time to find the first row that raises alone).

Built-ins:
    math_answer   1.0 when the completion's answer (its last \\boxed{...}, else its last number) equals the
                  `answer` column (GSM8K's "#### 42" taken after the ####), compared as numbers when both
                  parse (commas, $ and % dropped), else as stripped strings; 0.0 otherwise; None without an answer
    exact_match   1.0 when the stripped completion equals the stripped `answer` column, else 0.0
    format        1.0 when the completion matches `pattern` as a whole (re.DOTALL), else 0.0; default TRL's
                  think/answer format "<think>.*?</think>\\s*<answer>.*?</answer>"
    overlong      DAPO's soft overlong penalty on the answer's token count L: 0 for L <= max_length - buffer,
                  (max_length - buffer - L) / buffer up to max_length, -1 beyond (reward_kwargs "overlong":
                  {"max_length": (SECTION.max_new_tokens), "buffer": (a fifth of max_length)})
"""
import asyncio
import importlib
import importlib.util
import inspect
import json
import math
import numbers
import re
import signal
import sys
import threading
from pathlib import Path
from typing import Callable, Optional

import torch

BUILTIN_OPTIONS = {"math_answer": (), "exact_match": (), "format": ("pattern",), "overlong": ("max_length", "buffer")}
THINK_ANSWER = r"<think>.*?</think>\s*<answer>.*?</answer>"
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


class RewardError(RuntimeError):
    """A reward function failed (raised, wrong length, NaN, non-number) or cannot be loaded: one line."""


# ---------------------------------------------------------------------------------------------
# The two shapes.

def is_conversation(prompt) -> bool:
    """A prompt given as a non-empty list of {"role", "content"} messages (TRL's conversational format)."""
    return isinstance(prompt, list) and bool(prompt) and all(isinstance(m, dict) and "role" in m and "content" in m
                                                             for m in prompt)


def completion_text(completion) -> str:
    """A completion in either shape -> its text (a conversational one: its messages' contents, joined)."""
    if isinstance(completion, str):
        return completion
    return "".join(str(m.get("content", "")) for m in completion)


# ---------------------------------------------------------------------------------------------
# Built-ins.

def extract_answer(text: str) -> Optional[str]:
    """The last \\boxed{...} of text (nested braces allowed), else its last number, else None."""
    start = text.rfind("\\boxed{")
    if start >= 0:
        depth, i = 1, start + len("\\boxed{")
        for j in range(i, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                return text[i:j].strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def normalise_answer(text: str) -> str:
    """GSM8K's "... #### 42" -> "42"; commas, $, % and surrounding spaces dropped; "42.0" -> "42"."""
    text = str(text)
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    text = text.strip().replace(",", "").replace("$", "").replace("%", "").strip().rstrip(".")
    try:
        value = float(text)
    except ValueError:
        return text
    return str(int(value)) if value.is_integer() else repr(value)


def math_answer(prompts, completions, answer=None, **_) -> list:
    out = []
    for i, completion in enumerate(completions):
        truth = answer[i] if answer is not None else None
        if truth is None:
            out.append(None)
            continue
        got = extract_answer(completion_text(completion))
        out.append(1.0 if got is not None and normalise_answer(got) == normalise_answer(truth) else 0.0)
    return out


def exact_match(prompts, completions, answer=None, **_) -> list:
    if answer is None:
        return [None] * len(completions)
    return [None if a is None else float(completion_text(c).strip() == str(a).strip()) for c, a in zip(completions, answer)]


def format_reward(pattern: str = THINK_ANSWER) -> Callable:
    regex = re.compile(pattern, re.DOTALL)

    def format(prompts, completions, **_) -> list:
        return [1.0 if regex.fullmatch(completion_text(c).strip()) else 0.0 for c in completions]
    return format


def overlong_penalty(max_length: int, buffer: Optional[int] = None) -> Callable:
    buffer = max(1, buffer if buffer is not None else max_length // 5)

    def overlong(prompts, completions, completion_ids=None, **_) -> list:
        out = []
        for ids in completion_ids:
            n = len(ids)
            out.append(0.0 if n <= max_length - buffer else (max_length - buffer - n) / buffer if n <= max_length else -1.0)
        return out
    return overlong


# ---------------------------------------------------------------------------------------------
# The reward keys of a recipe's section, and names -> functions.

def reward_problems(section: str, raw: dict) -> list[str]:
    """The reward keys of a recipe's config section (raw: the "ppo" or "grpo" object as written; section
    its name): reward_funcs, reward_weights, reward_kwargs, reward_timeout_s (their JSON types: the
    recipe's section_problems). [] when nothing is wrong; messages name SECTION.key."""
    out = []
    funcs, weights, kwargs = raw.get("reward_funcs", []), raw.get("reward_weights"), raw.get("reward_kwargs", {})
    if not isinstance(funcs, list) or not all(isinstance(f, str) and f for f in funcs):
        out.append(f'{section}.reward_funcs must be a list of names ("math_answer", "module:function"), got {json.dumps(funcs)}')
    elif weights is not None and (not isinstance(weights, list) or len(weights) != len(funcs) or not all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights)):
        out.append(f"{section}.reward_weights must be a list of {len(funcs)} number(s), one per reward function, got "
                   f"{json.dumps(weights)}")
    if not isinstance(kwargs, dict):
        out.append(f"{section}.reward_kwargs must be an object (built-in name -> its options), got {json.dumps(kwargs)}")
    if not out:
        out.extend(spec_problems(funcs, kwargs, section))
    timeout = raw.get("reward_timeout_s")
    if isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout <= 0:
        out.append(f"{section}.reward_timeout_s must be positive (seconds) or null (no limit), got {timeout}")
    return out


def spec_problems(specs, kwargs: dict, section: str) -> list[str]:
    """Config checks that need no import: known built-ins, module:function form, files that exist."""
    out = []
    for spec in specs:
        if spec in BUILTIN_OPTIONS:
            continue
        module, _, name = spec.rpartition(":")
        if not module or not name:
            out.append(f"{section}.reward_funcs: {spec!r} is not a built-in ({', '.join(BUILTIN_OPTIONS)}) nor "
                       "\"module:function\" / \"path/to/file.py:function\"")
        elif module.endswith(".py") and not Path(module).is_file():
            out.append(f"{section}.reward_funcs: {spec!r}: no file {module}")
    for name, options in kwargs.items():
        if name not in BUILTIN_OPTIONS or name not in specs:
            out.append(f"{section}.reward_kwargs: {name!r} is not a built-in reward function in {section}.reward_funcs "
                       f"(options exist for {[n for n, o in BUILTIN_OPTIONS.items() if o]})")
        elif not isinstance(options, dict) or set(options) - set(BUILTIN_OPTIONS[name]):
            out.append(f"{section}.reward_kwargs.{name} must be an object with keys among {list(BUILTIN_OPTIONS[name])}, "
                       f"got {options!r}")
    return out


def load_reward_function(spec: str, kwargs: dict, max_new_tokens: int, section: str) -> Callable:
    """A reward_funcs entry -> the callable; RewardError (one line, naming SECTION.reward_funcs) when it
    cannot be loaded."""
    if spec == "math_answer":
        return math_answer
    if spec == "exact_match":
        return exact_match
    if spec == "format":
        return format_reward(**kwargs.get("format", {}))
    if spec == "overlong":
        return overlong_penalty(**{"max_length": max_new_tokens, **kwargs.get("overlong", {})})
    where, _, name = spec.rpartition(":")
    try:
        if where.endswith(".py"):
            loader = importlib.util.spec_from_file_location(Path(where).stem, where)
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            if "" not in sys.path and str(Path.cwd()) not in sys.path:
                sys.path.insert(0, str(Path.cwd()))
            module = importlib.import_module(where)
    except Exception as e:  # noqa: BLE001 - the user's module: any error is theirs, reported in one line
        raise RewardError(f"{section}.reward_funcs: reward function {spec!r}: cannot import {where}: "
                          f"{type(e).__name__}: {_one_line(e)}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise RewardError(f"{section}.reward_funcs: reward function {spec!r}: {where} has no function {name!r}")
    return fn


def load_reward_functions(opts) -> list[tuple[str, Callable, float]]:
    """(name, function, weight) of each reward_funcs entry of a recipe's options (opts: reward_funcs,
    reward_kwargs, weights(), max_new_tokens, section)."""
    return [(spec, load_reward_function(spec, opts.reward_kwargs, opts.max_new_tokens, opts.section), float(w))
            for spec, w in zip(opts.reward_funcs, opts.weights())]


def reward_trainer_state(step: int, total_steps: int):
    """What TRL passes its reward functions as trainer_state during RL step `step` (1-based) of
    total_steps: a transformers.TrainerState with global_step = the steps completed (step - 1) and
    max_steps = total_steps, e.g. for a curriculum."""
    from transformers import TrainerState

    return TrainerState(global_step=step - 1, max_steps=total_steps)


def metric_names(funcs: list) -> list[str]:
    """Each function's name in the metrics (RECIPE/rewards/<name>/mean): a spec's function part."""
    return [spec.rpartition(":")[2] for spec, _, _ in funcs]


# ---------------------------------------------------------------------------------------------
# Scoring a replica's rows.

class _Timeout(Exception):
    pass


def _call_with_timeout(fn, timeout_s: Optional[float], *args, **kwargs):
    """fn(*args, **kwargs), interrupted after timeout_s seconds (SIGALRM: the main thread of a Unix
    process, where the recipe calls it; elsewhere no limit) with _Timeout."""
    if not timeout_s or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        return fn(*args, **kwargs)

    def expire(signum, frame):
        raise _Timeout()

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        return fn(*args, **kwargs)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _invoke(fn, **kwargs):
    """fn(**kwargs); a result to await (an async def function, TRL's async reward functions) is run to
    completion on an event loop of its own."""
    result = fn(**kwargs)
    if inspect.isawaitable(result):
        async def wait():
            return await result
        result = asyncio.run(wait())
    return result


def _one_line(text) -> str:
    return " ".join(str(text).split("\n"))


def _excerpt(value, n: int = 60) -> str:
    """repr of a prompt's or completion's first n characters (a conversation: its last message's content)."""
    text = str(value[-1]["content"]) if is_conversation(value) else str(value)
    return repr(text if len(text) <= n else text[:n] + "...")


def _sample(i: int, prompts: list, completions: list) -> str:
    return (f"sample {i} of this replica's {len(completions)} (prompt {_excerpt(prompts[i])}, "
            f"completion {_excerpt(completions[i])})")


def _first_failing_row(fn, prompts: list, completions: list, columns: dict, extra: dict):
    """(row, exception) of the first row whose call alone raises, else None (the failure needs several rows)."""
    for i in range(len(completions)):
        try:
            _invoke(fn, prompts=[prompts[i]], completions=[completions[i]], **{k: [v[i]] for k, v in columns.items()},
                    **extra)
        except _Timeout:  # the search's own time limit (the caller's), not the row's failure
            raise
        except Exception as e:  # noqa: BLE001 - the user's code
            return i, e
    return None


def _as_number(value) -> Optional[float]:
    """A reward value as a float: any real number (Python's, numpy's) or a one-element tensor / array, as
    TRL's torch.tensor(rewards) takes them; None for anything else (a bool, a string, a list)."""
    if isinstance(value, (bool, str)) or type(value).__name__ == "bool_":
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    if hasattr(value, "numel") and value.numel() == 1 and value.dtype != torch.bool:  # a torch tensor
        return float(value.reshape(()).item())
    if hasattr(value, "size") and hasattr(value, "dtype") and value.size == 1 and value.dtype.kind in "iuf":  # numpy
        return float(value.reshape(()).item())
    return None


def call_reward_functions(funcs: list, prompts: list, completions: list, columns: dict, section: str,
                          timeout_s: Optional[float] = None, trainer_state=None) -> torch.Tensor:
    """float64[R, F]: each function's reward per row, NaN where it returned None. Each function is called
    as TRL calls it: f(prompts=..., completions=..., **columns, trainer_state=...). RewardError (one line)
    on an exception (naming the first sample that raises alone: the function is called again row by
    row, within one more timeout_s), a call longer than timeout_s (SECTION.reward_timeout_s), a wrong
    length, a NaN or a non-number (naming the sample). A list, tuple, numpy array or tensor of numbers
    (Python's, numpy's, one-element tensors) or None is a valid return."""
    n = len(completions)
    extra = {"trainer_state": trainer_state}
    out = torch.full((n, len(funcs)), math.nan, dtype=torch.float64)
    for f, (name, fn, _) in enumerate(funcs):
        try:
            values = _call_with_timeout(_invoke, timeout_s, fn, prompts=prompts, completions=completions, **columns,
                                        **extra)
        except _Timeout:
            raise RewardError(f"reward function {name!r} took longer than {section}.reward_timeout_s = {timeout_s} s on "
                              f"this replica's {n} completions") from None
        except Exception as e:  # noqa: BLE001 - the user's code: reported in one line on every rank
            try:
                found = _call_with_timeout(_first_failing_row, timeout_s, fn, prompts, completions, columns, extra)
            except _Timeout:
                found = None
            if found is None:
                raise RewardError(f"reward function {name!r} raised {type(e).__name__}: {_one_line(e)} on this "
                                  f"replica's {n} samples (no one sample raises alone)") from None
            i, row_error = found
            raise RewardError(f"reward function {name!r} raised {type(row_error).__name__}: {_one_line(row_error)} on "
                              f"{_sample(i, prompts, completions)}") from None
        if hasattr(values, "tolist") and getattr(values, "ndim", 0) == 1:  # a numpy array or a tensor of rewards
            values = values.tolist()
        if not isinstance(values, (list, tuple)) or len(values) != n:
            got = f"{len(values)} values" if isinstance(values, (list, tuple)) else f"a {type(values).__name__}"
            raise RewardError(f"reward function {name!r} returned {got} for this replica's {n} completions "
                              "(one float or None per completion)")
        for i, v in enumerate(values):
            if v is None:
                continue
            number = _as_number(v)
            if number is None or math.isnan(number) or math.isinf(number):
                raise RewardError(f"reward function {name!r} returned {v!r} on {_sample(i, prompts, completions)}: "
                                  "a finite number or None is needed")
            out[i, f] = number
    return out


def weighted_sum(per_function: torch.Tensor, weights) -> torch.Tensor:
    """float64[R]: sum over the functions that apply (not NaN) of weight x reward (TRL's nansum)."""
    w = torch.tensor(list(weights), dtype=torch.float64)
    return torch.nan_to_num(per_function * w, nan=0.0).sum(dim=1)


def row_rewards(ro, records: list, rm_scores: Optional[torch.Tensor], funcs: list, tokenizer, prompt_width: int,
                rm_weight: float, section: str, timeout_s: Optional[float] = None,
                trainer_state=None) -> tuple[torch.Tensor, torch.Tensor]:
    """A replica's rows (ro: a trainer.rl.rollout.Rollout, records: each row's prompt record) -> (rewards
    float64[R] = sum_f w_f r_f (None skipped) + rm_weight x rm_scores, each function's rewards float64[R,F]
    (NaN: None)). Functions get each prompt as its record gave it (else the decoded prompt) and the
    answer decoded without special tokens, both in the row's shape (module doc), every other record field
    as a column, completion_ids, and trainer_state (reward_trainer_state). Without functions nothing is
    decoded. RewardError names the function and the sample; one call may take at most timeout_s seconds
    (None: no limit)."""
    per_function = torch.zeros(ro.n_rows, 0, dtype=torch.float64)
    if funcs:
        assert len(records) == ro.n_rows, (len(records), ro.n_rows)  # this replica's records, one per row
        ids = ro.answer_ids(prompt_width)
        texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
        prompts = [rec.get("prompt") if rec.get("prompt") is not None else
                   tokenizer.decode(ro.ids[r, :prompt_width][ro.mask[r, :prompt_width].bool()], skip_special_tokens=True)
                   for r, rec in enumerate(records)]
        completions = [[{"role": "assistant", "content": text}] if is_conversation(prompt) else text
                       for prompt, text in zip(prompts, texts)]
        names = sorted({k for rec in records for k in rec} - {"prompt"})
        columns = {k: [rec.get(k) for rec in records] for k in names}
        taken = sorted(set(columns) & {"prompts", "completions", "completion_ids", "trainer_state"})
        if taken:
            raise RewardError(f"a prompt record has a field {taken[0]!r}: the reward functions get that name from the "
                              "trainer (TRL's keywords: prompts, completions, completion_ids, trainer_state); rename "
                              "the field")
        per_function = call_reward_functions(funcs, prompts, completions, {**columns, "completion_ids": ids}, section,
                                             timeout_s, trainer_state)
    rewards = weighted_sum(per_function, [w for _, _, w in funcs])
    if rm_scores is not None:
        rewards = rewards + rm_weight * rm_scores.double()
    return rewards, per_function


def score_rows(ro, records: list, rm_scores: Optional[torch.Tensor], funcs: list, tokenizer, prompt_width: int,
               rm_weight: float, section: str, timeout_s: Optional[float], on_last_stage: bool,
               trainer_state=None) -> tuple:
    """Collective when there are functions: row_rewards on the last stage, (None, None) elsewhere; a reward
    function's failure on any replica stops every rank with its message (stop_all_ranks_on)."""
    out, message = (None, None), None
    if on_last_stage:
        try:
            out = row_rewards(ro, records, rm_scores, funcs, tokenizer, prompt_width, rm_weight, section, timeout_s,
                              trainer_state)
        except RewardError as e:
            message = str(e)
    if funcs:  # every rank holds the same list: all join the collective or none
        stop_all_ranks_on(message)
    return out


def stop_all_ranks_on(message: Optional[str]) -> None:
    """Collective: if any rank has a message (a reward failure), every rank raises RewardError with the
    first one; before any collective that would otherwise wait for the failed rank forever."""
    if not torch.distributed.is_initialized():
        if message:
            raise RewardError(message)
        return
    messages = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(messages, message)
    first = next((m for m in messages if m), None)
    if first:
        raise RewardError(first)
