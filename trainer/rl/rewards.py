"""Reward functions for GRPO (verifiable rewards), TRL's interface:

    f(prompts: list[str | list[dict]], completions: list[str], **columns) -> list[float | None]

prompts: each row's prompt as the record gave it (a string, or a list of {"role", "content"} messages);
completions: the generated answers decoded without special tokens; columns: every other field of the
prompt records, one list per field (e.g. answer=[...]), plus completion_ids (the answer token ids, as
TRL passes them). A function may ignore what it does not need (**kwargs). None means "does not apply to
this sample": a row's reward is the weighted sum over the functions that apply (TRL's nansum; a row no
function applies to gets 0).

A reward function is named in grpo.reward_funcs as
    "math_answer" | "exact_match" | "format" | "overlong"      a built-in (below; options in grpo.reward_kwargs)
    "my_rewards:exact_answer"                                 module:function, the module importable from
                                                              the working directory or PYTHONPATH
    "path/to/rewards.py:exact_answer"                         a file
A function that raises, returns a list of the wrong length, a NaN or a non-number, or whose call takes
longer than grpo.reward_timeout_s, stops the run on every rank with one line (RewardError) naming the
function (and the sample).

Built-ins:
    math_answer   1.0 when the completion's answer (its last \\boxed{...}, else its last number) equals the
                  `answer` column (GSM8K's "#### 42" taken after the ####), compared as numbers when both
                  parse (commas, $ and % dropped), else as stripped strings; 0.0 otherwise; None without an answer
    exact_match   1.0 when the stripped completion equals the stripped `answer` column, else 0.0
    format        1.0 when the completion matches `pattern` as a whole (re.DOTALL), else 0.0; default TRL's
                  think/answer format "<think>.*?</think>\\s*<answer>.*?</answer>"
    overlong      DAPO's soft overlong penalty on the answer's token count L: 0 for L <= max_length - buffer,
                  (max_length - buffer - L) / buffer up to max_length, -1 beyond (reward_kwargs "overlong":
                  {"max_length": (grpo.max_new_tokens), "buffer": (a fifth of max_length)})
"""
import importlib
import importlib.util
import math
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
        got = extract_answer(completion)
        out.append(1.0 if got is not None and normalise_answer(got) == normalise_answer(truth) else 0.0)
    return out


def exact_match(prompts, completions, answer=None, **_) -> list:
    if answer is None:
        return [None] * len(completions)
    return [None if a is None else float(c.strip() == str(a).strip()) for c, a in zip(completions, answer)]


def format_reward(pattern: str = THINK_ANSWER) -> Callable:
    regex = re.compile(pattern, re.DOTALL)

    def format(prompts, completions, **_) -> list:
        return [1.0 if regex.fullmatch(c.strip()) else 0.0 for c in completions]
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
# Names -> functions.

def spec_problems(specs, kwargs: dict) -> list[str]:
    """Config checks that need no import: known built-ins, module:function form, files that exist."""
    out = []
    for spec in specs:
        if spec in BUILTIN_OPTIONS:
            continue
        module, _, name = spec.rpartition(":")
        if not module or not name:
            out.append(f"grpo.reward_funcs: {spec!r} is not a built-in ({', '.join(BUILTIN_OPTIONS)}) nor "
                       "\"module:function\" / \"path/to/file.py:function\"")
        elif module.endswith(".py") and not Path(module).is_file():
            out.append(f"grpo.reward_funcs: {spec!r}: no file {module}")
    for name, options in kwargs.items():
        if name not in BUILTIN_OPTIONS or name not in specs:
            out.append(f"grpo.reward_kwargs: {name!r} is not a built-in reward function in grpo.reward_funcs "
                       f"(options exist for {[n for n, o in BUILTIN_OPTIONS.items() if o]})")
        elif not isinstance(options, dict) or set(options) - set(BUILTIN_OPTIONS[name]):
            out.append(f"grpo.reward_kwargs.{name} must be an object with keys among {list(BUILTIN_OPTIONS[name])}, "
                       f"got {options!r}")
    return out


def load_reward_function(spec: str, kwargs: dict, max_new_tokens: int) -> Callable:
    """A reward_funcs entry -> the callable; RewardError (one line) when it cannot be loaded."""
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
        raise RewardError(f"reward function {spec!r}: cannot import {where}: {type(e).__name__}: {e}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise RewardError(f"reward function {spec!r}: {where} has no function {name!r}")
    return fn


def load_reward_functions(opts) -> list[tuple[str, Callable, float]]:
    """(name, function, weight) of each grpo.reward_funcs entry."""
    return [(spec, load_reward_function(spec, opts.reward_kwargs, opts.max_new_tokens), float(w))
            for spec, w in zip(opts.reward_funcs, opts.weights())]


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


def call_reward_functions(funcs: list, prompts: list, completions: list, columns: dict,
                          timeout_s: Optional[float] = None) -> torch.Tensor:
    """float64[R, F]: each function's reward per row, NaN where it returned None. RewardError naming the
    function and the sample on an exception, a call longer than timeout_s, a wrong length, a NaN or a
    non-number."""
    out = torch.full((len(completions), len(funcs)), math.nan, dtype=torch.float64)
    for f, (name, fn, _) in enumerate(funcs):
        try:
            values = _call_with_timeout(fn, timeout_s, prompts, completions, **columns)
        except _Timeout:
            raise RewardError(f"reward function {name!r} took longer than reward_timeout_s = {timeout_s} s on "
                              f"{len(completions)} completions") from None
        except Exception as e:  # noqa: BLE001 - the user's code: reported in one line on every rank
            raise RewardError(f"reward function {name!r} raised {type(e).__name__}: {e}") from None
        if not isinstance(values, (list, tuple)) or len(values) != len(completions):
            got = f"{len(values)} values" if isinstance(values, (list, tuple)) else f"a {type(values).__name__}"
            raise RewardError(f"reward function {name!r} returned {got} for {len(completions)} completions "
                              "(one float or None per completion)")
        for i, v in enumerate(values):
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) or math.isinf(v):
                raise RewardError(f"reward function {name!r} returned {v!r} for sample {i} (prompt "
                                  f"{str(prompts[i])[:60]!r}): a finite number or None is needed")
            out[i, f] = float(v)
    return out


def weighted_sum(per_function: torch.Tensor, weights) -> torch.Tensor:
    """float64[R]: sum over the functions that apply (not NaN) of weight x reward (TRL's nansum)."""
    w = torch.tensor(list(weights), dtype=torch.float64)
    return torch.nan_to_num(per_function * w, nan=0.0).sum(dim=1)


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
