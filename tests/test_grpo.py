"""GRPO's pure parts: the advantage estimators (trainer/rl/advantages.py) against hand-computed values and
the published formulas (verl core_algos.py, TRL grpo_trainer.py), the loss aggregations and the clipped
loss on fixed logits (trainer/rl/grpo_losses.py), the reward functions (trainer/rl/rewards.py), the
prompt records' columns (data/), and the config checks (trainer/rl/grpo_options.py)."""
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from trainer.rl import advantages as adv
from trainer.rl.grpo_losses import GRPOLoss, clipped_surrogate, loss_weights

REPO = Path(__file__).resolve().parent.parent


def opts(**kw):
    base = dict(n_samples_per_prompt=4, scale_rewards=None, kl_coef=0.0)
    return SimpleNamespace(**{**base, **kw})


def answer_mask(lengths, width=5):
    m = torch.zeros(len(lengths), width)
    for r, n in enumerate(lengths):
        m[r, 1:1 + n] = 1
    return m


# ---------------------------------------------------------------------------------------------
# Advantages.

def test_grpo_group_scale_by_hand():
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    ans = answer_mask([2, 1, 3, 2, 1, 1, 1, 1])
    a = adv.ESTIMATORS["grpo"](scores, ans, None, opts())
    std = math.sqrt((4 * 0.25) / 3)  # unbiased std of [1, 0, 0, 1]
    want = [0.5 / (std + 1e-4), -0.5 / (std + 1e-4)]
    assert a[0, 1].item() == pytest.approx(want[0], rel=1e-6)
    assert a[1, 1].item() == pytest.approx(want[1], rel=1e-6)
    assert torch.equal(a[0] != 0, ans[0] > 0)  # the row's value on its answer tokens only
    assert a[4:].abs().max() == 0  # an all-equal group teaches nothing
    assert adv.zero_std_groups(scores, 4).tolist() == [False, True]


def test_grpo_against_trl_formula():
    """TRL: advantages = rewards - mean_grouped; / (std_grouped + 1e-4) ("group") or / (rewards.std() + 1e-4) ("batch")."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(12, generator=g)
    ans = torch.ones(12, 3)
    grouped = scores.view(-1, 4)
    centred = (scores - grouped.mean(1).repeat_interleave(4))
    by_group = centred / (grouped.std(1).repeat_interleave(4) + 1e-4)
    by_batch = centred / (scores.std() + 1e-4)
    for scale, want in (("group", by_group), ("batch", by_batch), ("none", centred)):
        got = adv.ESTIMATORS["grpo"](scores, ans, None, opts(scale_rewards=scale))[:, 0]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(adv.ESTIMATORS["dr_grpo"](scores, ans, None, opts())[:, 0], centred, rtol=1e-5, atol=1e-6)


def test_rloo_is_the_leave_one_out_mean():
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 1.0, 2.0, 6.0])
    a = adv.ESTIMATORS["rloo"](scores, torch.ones(8, 2), None, opts())[:, 0]
    want = [s - (sum(grp) - s) / 3 for grp in ([1, 0, 0, 1], [3, 1, 2, 6]) for s in grp]
    np.testing.assert_allclose(a.numpy(), want, rtol=1e-6)
    assert a[0].item() == pytest.approx(2 / 3)  # 1 - (0 + 0 + 1) / 3


def verl_masked_whiten(values, mask):
    """verl_F.masked_whiten: unbiased masked variance, rsqrt(var + 1e-8)."""
    n = mask.sum()
    mean = (values * mask).sum() / n
    var = (((values - mean) ** 2) * mask).sum() / n * n / (n - 1)
    return (values - mean) / np.sqrt(var + 1e-8)


def test_reinforce_pp_by_hand_and_against_verl():
    scores = torch.tensor([2.0, -1.0])
    ans = torch.tensor([[0, 1, 1, 0.0], [0, 1, 1, 1.0]])
    kl = torch.tensor([[9, 0.5, 0.1, 9], [9, 0.2, 0.0, -0.3]])
    a = adv.ESTIMATORS["reinforce++"](scores, ans, kl, opts(kl_coef=0.1, n_samples_per_prompt=2))
    # token rewards: row 0 [-0.05, -0.01 + 2], row 1 [-0.02, 0, 0.03 - 1]; returns summed to the end
    returns = np.array([[0, 1.94, 1.99, 0], [0, -0.99, -0.97, -0.97]])
    m = ans.numpy().astype(float)
    want = verl_masked_whiten(returns, m) * m
    np.testing.assert_allclose(a.numpy(), want, rtol=1e-5, atol=1e-6)


def test_reinforce_pp_baseline_against_verl():
    scores = torch.tensor([1.0, 0.0, 3.0, 1.0])
    ans = answer_mask([1, 2, 3, 2])
    kl = torch.full((4, 5), 0.5)
    a = adv.ESTIMATORS["reinforce++_baseline"](scores, ans, kl, opts(kl_coef=0.2, n_samples_per_prompt=2))
    m = ans.numpy().astype(float)
    totals = scores.numpy() - 0.2 * 0.5 * m.sum(1)  # token_level_rewards.sum(-1)
    centred = totals - np.repeat(totals.reshape(-1, 2).mean(1), 2)
    want = verl_masked_whiten(centred[:, None] * m, m) * m
    np.testing.assert_allclose(a.numpy(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,scale", [("grpo", "batch"), ("reinforce++", None), ("reinforce++_baseline", None)])
def test_batch_statistics_across_replicas_equal_one_process(name, scale):
    """Two replicas' estimators, their sums added (what all_reduce_sum does), equal one process on all rows."""
    g = torch.Generator().manual_seed(3)
    scores, kl = torch.randn(8, generator=g), torch.rand(8, 6, generator=g)
    ans = answer_mask([1, 2, 3, 4, 2, 2, 1, 3], width=6)
    o = opts(scale_rewards=scale, kl_coef=0.1)
    whole = adv.ESTIMATORS[name](scores, ans, kl, o)
    halves = [slice(0, 4), slice(4, 8)]
    recorded = []
    for h in halves:  # each replica's local sums (what it passes to the all-reduce)
        calls = []
        adv.ESTIMATORS[name](scores[h], ans[h], kl[h], o, lambda t: calls.append(t.clone()) or t)
        recorded.append(calls)
    for k, h in enumerate(halves):
        calls = iter(recorded[1 - k])
        got = adv.ESTIMATORS[name](scores[h], ans[h], kl[h], o, lambda t: t + next(calls))
        torch.testing.assert_close(got, whole[h], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Loss aggregation and the loss on fixed logits.

def test_loss_weights_by_hand():
    m = torch.tensor([[1, 1, 0, 0.0], [1, 1, 1, 1.0], [0, 0, 0, 0.0]])
    # grpo: mean over the 3 rows of (row sum / row tokens); dapo: / 6 tokens; dr_grpo: / (3 rows x 4)
    np.testing.assert_allclose(loss_weights(m, "grpo", 6, 3, 4).numpy(), m.numpy() / np.array([[2], [4], [1]]) / 3)
    for name in ("dapo", "bnpo"):
        np.testing.assert_allclose(loss_weights(m, name, 6, 3, 4).numpy(), m.numpy() / 6)
    np.testing.assert_allclose(loss_weights(m, "dr_grpo", 6, 3, 4).numpy(), m.numpy() / 12)
    with pytest.raises(ValueError, match="loss_type"):
        loss_weights(m, "seq_mean", 6, 3, 4)


def test_clip_higher_is_asymmetric():
    logp_old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[0.7, 1.25, 1.35, 1.25]]))
    a = torch.tensor([[-1.0, 1.0, 1.0, -1.0]])
    loss, clipped = clipped_surrogate(logp, logp_old, a, 0.2, 0.28)
    # ratio 0.7 < 0.8 with A < 0: clipped at 0.8; 1.25 < 1.28: not clipped; 1.35 > 1.28 with A > 0: 1.28
    np.testing.assert_allclose(loss.numpy(), [[0.8, -1.25, -1.28, 1.25]], rtol=1e-6)
    assert clipped["clip_low"].tolist() == [[True, False, False, False]]
    assert clipped["clip_high"].tolist() == [[False, False, True, False]]


def loss_opts(**kw):
    base = dict(logprob_temperature=1.0, epsilon=0.2, epsilon_high_value=0.28, kl_in_loss=True, kl_coef=0.05,
                kl_estimator="k3")
    return SimpleNamespace(**{**base, **kw})


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_grpo_loss_on_fixed_logits(loss_type):
    """GRPOLoss on fixed logits equals the per-token formula (TRL's _compute_loss) written in numpy."""
    g = torch.Generator().manual_seed(1)
    B, S, V = 3, 6, 7
    logits = torch.randn(B, S, V, generator=g)
    tokens = torch.randint(0, V, (B, S - 1), generator=g)
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 1, 0, 0, 0], [0, 1, 1, 1, 1.0]])
    old = torch.log_softmax(logits[:, :-1], -1).gather(-1, tokens[..., None]).squeeze(-1) + 0.3 * torch.randn(B, S - 1, generator=g)
    ref = old - 0.2 * torch.rand(B, S - 1, generator=g)
    advantages = torch.randn(B, 1, generator=g).expand(B, S - 1) * mask
    weights = loss_weights(mask, loss_type, float(mask.sum()), B, 4)
    fn = GRPOLoss(loss_opts())
    got = fn(logits, (tokens, weights, old, advantages, ref)).item()

    logp = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, tokens[..., None]).squeeze(-1).numpy()
    ratio = np.exp(logp - old.double().numpy())
    A, m = advantages.double().numpy(), mask.double().numpy()
    per_token = -np.minimum(ratio * A, np.clip(ratio, 0.8, 1.28) * A)
    d = ref.double().numpy() - logp
    per_token = per_token + 0.05 * (np.exp(d) - d - 1)
    if loss_type == "grpo":
        want = ((per_token * m).sum(1) / m.sum(1)).mean()
    elif loss_type == "dapo":
        want = (per_token * m).sum() / m.sum()
    else:
        want = (per_token * m).sum() / (B * 4)
    assert got == pytest.approx(want, rel=1e-5)
    stats = fn.take_stats()
    assert stats[0].item() == mask.sum().item()


# ---------------------------------------------------------------------------------------------
# Reward functions.

def test_math_answer_and_gsm8k_answers():
    from trainer.rl.rewards import math_answer

    completions = ["so 6 * 7 = 42", "The answer is \\boxed{1,000}.", "I think 41", "no number", "x = 2.50"]
    answers = ["42", "#### 1000", "Natalia sold ... #### 42", "7", "2.5"]
    assert math_answer(None, completions, answer=answers) == [1.0, 1.0, 0.0, 0.0, 1.0]
    assert math_answer(None, ["1"], answer=[None]) == [None]


def test_the_shipped_gsm8k_prompts_reach_math_answer():
    """data/samples/math_prompts.jsonl (GSM8K's question/answer lines, README's GRPO example): every line is a
    prompt whose answer column math_answer checks; the reference solution scores 1, the question's own
    last number 0 (none of them is the answer)."""
    from transformers import AutoTokenizer

    from data.dataset import build_dataset
    from trainer.rl.rewards import math_answer

    built = build_dataset(str(REPO / "data" / "samples" / "math_prompts.jsonl"),
                          AutoTokenizer.from_pretrained(REPO / "configs" / "tiny-llama"), 128, kind="prompt")
    records = [built.train.record(i) for i in range(len(built.train))]
    assert len(records) == 16 and built.stats["types"] == {"prompt": 16}
    answers = [r["answer"] for r in records]
    assert math_answer(None, answers, answer=answers) == [1.0] * 16
    assert math_answer(None, [r["prompt"] for r in records], answer=answers) == [0.0] * 16


def test_builtin_format_exact_and_overlong():
    from trainer.rl.rewards import exact_match, format_reward, overlong_penalty

    assert exact_match(None, [" yes ", "no"], answer=["yes", "yes"]) == [1.0, 0.0]
    assert format_reward()(None, ["<think>a</think> <answer>b</answer>", "b"]) == [1.0, 0.0]
    pen = overlong_penalty(10, 4)
    assert pen(None, ["", "", "", ""], completion_ids=[[0] * 6, [0] * 8, [0] * 10, [0] * 11]) == [0.0, -0.5, -1.0, -1.0]


def write_module(tmp_path, body: str) -> str:
    path = tmp_path / "my_rewards.py"
    path.write_text(body)
    return str(path)


def test_user_functions_get_columns_and_none_is_skipped(tmp_path):
    from trainer.rl.rewards import call_reward_functions, load_reward_function, weighted_sum

    path = write_module(tmp_path, "def parity(prompts, completions, answer, level, **kw):\n"
                                  "    return [None if l == 'skip' else float(len(c) % 2 == int(a)) for c, a, l in zip(completions, answer, level)]\n")
    fn = load_reward_function(f"{path}:parity", {}, 8, "grpo")
    funcs = [("parity", fn, 2.0), ("math_answer", load_reward_function("math_answer", {}, 8, "grpo"), 0.5)]
    per = call_reward_functions(funcs, ["p", "q", "r"], ["ab", "7", "x"],
                                {"answer": ["0", "7", "1"], "level": ["a", "skip", "skip"], "completion_ids": [[1], [2], [3]]},
                                "grpo")
    assert per[0, 0].item() == 1.0 and math.isnan(per[1, 0].item()) and math.isnan(per[2, 0].item())
    assert weighted_sum(per, [2.0, 0.5]).tolist() == [2.0, 0.5, 0.0]  # row 2: math_answer 0, parity n/a


@pytest.mark.parametrize("body,message", [
    ("def f(prompts, completions, **kw):\n    raise KeyError('answer')\n",
     "'f' raised KeyError: 'answer' on sample 0 of this replica's 2 (prompt 'p', completion 'a')"),
    ("def f(prompts, completions, **kw):\n    return [1.0]\n", "returned 1 values for this replica's 2 completions"),
    ("def f(prompts, completions, **kw):\n    return [1.0, float('nan')]\n",
     "returned nan on sample 1 of this replica's 2 (prompt 'q', completion 'b'): a finite number or None"),
    ("def f(prompts, completions, **kw):\n    return ['1', 0.0]\n", "returned '1' on sample 0 of this replica's 2 (prompt 'p'"),
])
def test_reward_function_failures_are_one_line(tmp_path, body, message):
    from trainer.rl.rewards import RewardError, call_reward_functions, load_reward_function

    fn = load_reward_function(f"{write_module(tmp_path, body)}:f", {}, 8, "grpo")
    with pytest.raises(RewardError) as e:
        call_reward_functions([("f", fn, 1.0)], ["p", "q"], ["a", "b"], {}, "grpo")
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)



TRL_DOCS_STYLE = """
import numpy as np
import torch

def reward_len(completions, **kwargs):  # TRL's documentation example: keywords only matter
    return [-abs(3 - len(c)) for c in completions]

def as_numpy(prompts, completions, **kwargs):
    return np.array([1.5, 2.0], dtype=np.float32)

def as_tensor(completions, trainer_state, **kwargs):
    return torch.tensor([float(trainer_state.global_step), float(trainer_state.max_steps)])

def numpy_scalars(completions, **kwargs):
    return [np.float32(0.25), np.int64(3)]

def a_bool(completions, **kwargs):
    return [True, 0.0]

async def checked_remotely(completions, **kwargs):  # TRL's async reward functions (e.g. a sandbox's API)
    import asyncio

    async def one(c):
        await asyncio.sleep(0.01)
        return float(len(c))
    return list(await asyncio.gather(*(one(c) for c in completions)))

async def never_answers(completions, **kwargs):
    import asyncio

    await asyncio.sleep(30)
"""


def test_functions_written_for_trl_run_unchanged(tmp_path):
    """Called with keywords as TRL calls them (a function without a prompts parameter works), given
    trainer_state (reward_trainer_state: steps completed, max steps), returning numpy arrays, tensors and
    numpy scalars; a bool is still not a reward; async functions are awaited, within reward_timeout_s; a
    record field that shadows a keyword is refused."""
    from trainer.rl.rewards import RewardError, call_reward_functions, load_reward_function, reward_trainer_state

    path = write_module(tmp_path, TRL_DOCS_STYLE)
    state = reward_trainer_state(step=5, total_steps=30)
    assert (state.global_step, state.max_steps) == (4, 30)

    def run(name):
        fn = load_reward_function(f"{path}:{name}", {}, 8, "grpo")
        return call_reward_functions([(name, fn, 1.0)], ["p", "q"], ["abc", "a"], {}, "grpo", trainer_state=state)[:, 0].tolist()

    assert run("reward_len") == [0.0, -2.0]
    assert run("as_numpy") == [1.5, 2.0]
    assert run("as_tensor") == [4.0, 30.0]
    assert run("numpy_scalars") == [0.25, 3.0]
    with pytest.raises(RewardError, match="returned True on sample 0"):
        run("a_bool")
    assert run("checked_remotely") == [3.0, 1.0]
    fn = load_reward_function(f"{path}:never_answers", {}, 8, "grpo")
    with pytest.raises(RewardError, match=r"'never_answers' took longer than grpo.reward_timeout_s = 0.2 s"):
        call_reward_functions([("never_answers", fn, 1.0)], ["p"], ["a"], {}, "grpo", timeout_s=0.2)

    from types import SimpleNamespace

    from trainer.rl.rewards import row_rewards
    ro = SimpleNamespace(n_rows=1, answer_ids=lambda width: [[1]])
    tok = SimpleNamespace(batch_decode=lambda ids, skip_special_tokens: ["x"])
    fn = load_reward_function(f"{path}:reward_len", {}, 8, "grpo")
    with pytest.raises(RewardError, match="a prompt record has a field 'completions'"):
        row_rewards(ro, [{"prompt": "p", "completions": "shadow"}], None, [("reward_len", fn, 1.0)], tok, 4, 1.0, "grpo")

SECOND_ROW_FAILS = """
def strict(prompts, completions, answer, **kw):
    out = []
    for completion, truth in zip(completions, answer):
        text = completion[0]["content"] if isinstance(completion, list) else completion
        out.append(float(int(text.split()[-1]) == int(truth)))  # a word at the end: ValueError
    return out
"""


def test_a_raising_reward_function_names_the_first_sample_that_raises_alone(tmp_path):
    """The batched call raises; called again row by row, the first row that raises is named with excerpts of
    its prompt (a conversation: its last message) and completion; a message over several lines stays one."""
    from trainer.rl.rewards import RewardError, call_reward_functions, load_reward_function

    fn = load_reward_function(f"{write_module(tmp_path, SECOND_ROW_FAILS)}:strict", {}, 8, "ppo")
    long_prompt = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "What is 6 x 7? " * 10}]
    prompts = ["1+1?", long_prompt, "2+2?"]
    completions = ["it is 2", [{"role": "assistant", "content": "forty two"}], "four"]
    with pytest.raises(RewardError) as e:
        call_reward_functions([("rewards.py:strict", fn, 1.0)], prompts, completions, {"answer": ["2", "42", "4"]}, "ppo")
    want = ("reward function 'rewards.py:strict' raised ValueError: invalid literal for int() with base 10: 'two' on "
            f"sample 1 of this replica's 3 (prompt {('What is 6 x 7? ' * 10)[:60] + '...'!r}, completion 'forty two')")
    assert str(e.value) == want

    only_together = "def pair(prompts, completions, **kw):\n    if len(completions) > 1:\n        raise RuntimeError('a\\nb')\n" \
                    "    return [0.0]\n"
    (tmp_path / "pair.py").write_text(only_together)
    fn = load_reward_function(f"{tmp_path / 'pair.py'}:pair", {}, 8, "grpo")
    with pytest.raises(RewardError) as e:  # no one row raises alone: the function and the row count
        call_reward_functions([("pair", fn, 1.0)], ["p", "q"], ["a", "b"], {}, "grpo")
    assert str(e.value) == "reward function 'pair' raised RuntimeError: a b on this replica's 2 samples (no one sample raises alone)"


TRL_STYLE = """
def last_word_is_answer(prompts, completions, answer, **kw):
    # TRL's conversational format: completion[0]["content"]; the prompt's last message is the user's
    out = []
    for prompt, completion, truth in zip(prompts, completions, answer):
        assert prompt[-1]["role"] == "user" and completion[0]["role"] == "assistant", (prompt, completion)
        out.append(float(completion[0]["content"].split()[-1] == truth))
    return out


def standard(prompts, completions, answer, **kw):
    assert all(isinstance(p, str) and isinstance(c, str) for p, c in zip(prompts, completions))
    return [float(c.split()[-1] == a) for c, a in zip(completions, answer)]
"""


class WordTokenizer:
    """Decodes ids as words w<id> (the tests' stand-in for a tokenizer)."""

    def batch_decode(self, ids, skip_special_tokens=True):
        return [" ".join(f"w{i}" for i in row) for row in ids]

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"w{int(i)}" for i in ids)


def word_rollout(answers: list[list[int]], prompt_width: int = 2):
    from trainer.rl.rollout import Rollout

    width = prompt_width + max(len(a) for a in answers)
    ids = torch.zeros(len(answers), width, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    ids[:, :prompt_width], mask[:, :prompt_width] = 5, 1
    for r, a in enumerate(answers):
        ids[r, prompt_width:prompt_width + len(a)], mask[r, prompt_width:prompt_width + len(a)] = torch.tensor(a), 1
    n_new = torch.tensor([len(a) for a in answers])
    return Rollout(ids, mask, ids[:, 1:], mask[:, 1:].float(), n_new > 0, n_new, None)


def test_conversational_records_get_trl_message_lists_per_row(tmp_path):
    """A record whose prompt is a message list: the function gets that list and [{"role": "assistant",
    "content": text}]; a string prompt (e.g. a single user turn the data layer gave as text): strings. The
    built-ins take both shapes."""
    from trainer.rl.rewards import (
        completion_text,
        exact_match,
        format_reward,
        load_reward_function,
        math_answer,
        row_rewards,
    )

    path = write_module(tmp_path, TRL_STYLE)
    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "say w7"}]
    ro = word_rollout([[3, 7], [7], [4, 4]])
    records = [{"prompt": chat, "answer": "w7"}, {"prompt": chat, "answer": "w7"}, {"prompt": chat, "answer": "w7"}]
    trl = ("trl", load_reward_function(f"{path}:last_word_is_answer", {}, 8, "grpo"), 1.0)
    rewards, per = row_rewards(ro, records, None, [trl], WordTokenizer(), 2, 1.0, "grpo")
    assert per[:, 0].tolist() == [1.0, 1.0, 0.0] and rewards.tolist() == [1.0, 1.0, 0.0]
    plain = [{"prompt": "say w7", "answer": "w7"}, {"answer": "w7"}, {"prompt": "say w7", "answer": "w4"}]  # no prompt: decoded
    std = ("std", load_reward_function(f"{path}:standard", {}, 8, "grpo"), 2.0)
    assert row_rewards(ro, plain, None, [std], WordTokenizer(), 2, 1.0, "grpo")[0].tolist() == [2.0, 2.0, 2.0]

    conversation = [[{"role": "assistant", "content": "so \\boxed{42}"}], [{"role": "assistant", "content": " yes "}]]
    assert completion_text(conversation[0]) == "so \\boxed{42}" and completion_text("x") == "x"
    assert math_answer([chat, chat], conversation, answer=["42", "41"]) == [1.0, 0.0]
    assert exact_match([chat, chat], conversation, answer=["no", "yes"]) == [0.0, 1.0]
    assert format_reward("so .*")([chat, chat], conversation) == [1.0, 0.0]


def test_reward_key_problems_name_the_section():
    """One check of the reward keys for PPO's and GRPO's sections, each message naming the key as written."""
    from trainer.rl.rewards import reward_problems

    raw = {"reward_funcs": ["math_answer", "nosuch"], "reward_kwargs": {"format": {}}, "reward_timeout_s": -1}
    for section in ("ppo", "grpo"):
        found = reward_problems(section, raw)
        assert found[0].startswith(f"{section}.reward_funcs: 'nosuch' is not a built-in"), found
        assert f"{section}.reward_kwargs: 'format' is not a built-in reward function in {section}.reward_funcs" in found[1]
        assert found[2] == f"{section}.reward_timeout_s must be positive (seconds) or null (no limit), got -1"
        assert reward_problems(section, {"reward_funcs": ["format"], "reward_weights": [1, 2]}) == [
            f"{section}.reward_weights must be a list of 1 number(s), one per reward function, got [1, 2]"]
        assert reward_problems(section, {"reward_funcs": "format"})[0].startswith(f"{section}.reward_funcs must be a list")


def test_reward_function_loading_errors(tmp_path):
    from trainer.rl.rewards import RewardError, load_reward_function, spec_problems

    assert spec_problems(["math_answer", "nosuch", "missing.py:f"], {"format": {"pattern": "x"}}, "grpo")[0].startswith(
        "grpo.reward_funcs: 'nosuch' is not a built-in")
    assert "no file missing.py" in spec_problems(["missing.py:f"], {}, "grpo")[0]
    assert "'format' is not a built-in reward function in grpo.reward_funcs" in spec_problems(["math_answer"], {"format": {}},
                                                                                            "grpo")[0]
    with pytest.raises(RewardError, match="^ppo.reward_funcs: reward function 'no_such_module_xyz:f': cannot import no_such"):
        load_reward_function("no_such_module_xyz:f", {}, 8, "ppo")
    with pytest.raises(RewardError, match="has no function 'g'"):
        load_reward_function(f"{write_module(tmp_path, 'x = 1')}:g", {}, 8, "grpo")


# ---------------------------------------------------------------------------------------------
# Prompt records keep their columns.

def test_prompt_records_keep_their_fields(tmp_path):
    from data.dataset import build_dataset
    from tests.data_fixtures import load_tokenizer, write_jsonl

    unified = write_jsonl(tmp_path / "u.jsonl", [{"type": "prompt", "prompt": "What is 6 x 7?", "answer": "42", "level": 1},
                                                 {"type": "prompt", "rounds": [["ask", "Hi"], ["ans", "Hello"], ["ask", "2+2?"]],
                                                  "answer": "4"}])
    trl = write_jsonl(tmp_path / "t.jsonl", [{"prompt": [{"role": "user", "content": "1+1?"}], "answer": "2"},
                                             {"prompt": "3+3?", "answer": "6", "source": "gen"}])
    for path, want in ((unified, [{"prompt": "What is 6 x 7?", "answer": "42", "level": 1},
                                  {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                                              {"role": "user", "content": "2+2?"}], "answer": "4"}]),
                       (trl, [{"prompt": [{"role": "user", "content": "1+1?"}], "answer": "2"},  # as given (TRL)
                              {"prompt": "3+3?", "answer": "6", "source": "gen"}])):
        built = build_dataset(path, load_tokenizer("llama"), 64, kind="prompt", cache_dir=str(tmp_path / "cache"))
        assert [built.train.record(i) for i in range(len(built.train))] == want
        again = build_dataset(path, load_tokenizer("llama"), 64, kind="prompt", cache_dir=str(tmp_path / "cache"))
        assert again.stats["cache"]["hit"] and again.train.record(0) == want[0]


def test_other_record_types_still_refuse_unknown_fields(tmp_path):
    from data.records import validate_record

    rec, problems = validate_record({"type": "instruct", "instruct": "a", "output": "b", "answer": "c"}, "f", 0)
    assert rec is None and problems[0].field == "answer"


# ---------------------------------------------------------------------------------------------
# Config validation.

def grpo_config(tmp_path, **grpo):
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"type": "prompt", "prompt": "1+1?", "answer": "2"}) + "\n")
    return {"stage": "grpo", "actor_path": str(tmp_path), "save_path": str(tmp_path / "out"), "data_path": str(data),
            "train_steps": 2, "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [2, 1]}},
            "train_batch_size": 8, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
            "grpo": {"reward_funcs": ["math_answer"], "n_samples_per_prompt": 4, **grpo}}


def test_config_defaults(tmp_path):
    from trainer.recipes import validate_config

    cfg = validate_config(grpo_config(tmp_path))
    o = cfg.options
    assert (o.loss_type, o.advantage, o.epsilon_high_value, o.kl_coef, o.needs_reference) == ("dapo", "grpo", 0.2, 0.0, False)
    # the actor's rollout in the memory model: every row of its replica (8 prompts x 4 samples), prompt + answer columns
    assert o.generation_shape(cfg) == (32, cfg.max_seq_len, o.max_new_tokens)
    assert cfg.model_path == str(tmp_path) and o.rollout_rows(8) == 32 and cfg.micro_batch_shape() == (4, 512 + 64)


@pytest.mark.parametrize("grpo,message", [
    ({"kl_coef": 0.1, "kl_estimator": "k1"}, "puts the KL in the loss, where \"k1\" has a zero gradient"),
    ({"loss_type": "token_mean"}, "grpo.loss_type must be one of"),
    ({"advantage": "gae"}, "grpo.advantage must be one of"),
    ({"advantage": "rloo", "scale_rewards": "batch"}, "scale_rewards applies to advantage \"grpo\" only"),
    ({"n_samples_per_prompt": 1}, "n_samples_per_prompt must be >= 2"),
    ({"reward_funcs": []}, "needs a reward"),
    ({"reward_funcs": ["math_answer"], "reward_weights": [1, 2]}, "reward_weights must be a list of 1 number"),
    ({"epsilon_high": 0.1}, "epsilon_high 0.1 must be >= epsilon"),
    ({"rollout_batch_size": 3}, "is not a multiple of train_batch_size"),
    ({"num_iteration": 2}, "grpo: unknown keys ['num_iteration']"),
    ({"reward_timeout_s": 0}, "grpo.reward_timeout_s must be positive"),
    ({"max_refill_rounds": 2}, 'grpo.max_refill_rounds refills the groups grpo.filter_zero_std_groups takes out of the '
                               'update: set "filter_zero_std_groups": true'),
    ({"max_refill_rounds": -1, "filter_zero_std_groups": True}, "grpo.max_refill_rounds must be an integer >= 0, got -1"),
    ({"max_refill_rounds": 1.5, "filter_zero_std_groups": True}, "grpo.max_refill_rounds must be an integer >= 0, got 1.5"),
    ({"advantage": "reinforce++", "n_samples_per_prompt": 1, "filter_zero_std_groups": True},
     "a group of one always is: set grpo.n_samples_per_prompt >= 2"),
    ({"reward_funcs": ["math_answer"], "reward_kwargs": {"overlong": {"max_length": 8}}}, "'overlong' is not a built-in reward function in grpo.reward_funcs"),
])
def test_config_problems(tmp_path, grpo, message):
    from trainer.config import ConfigError
    from trainer.recipes import validate_config

    with pytest.raises(ConfigError) as e:
        validate_config(grpo_config(tmp_path, **grpo))
    assert message in str(e.value)


def test_k1_allowed_in_the_reward_of_reinforce_pp(tmp_path):
    from trainer.recipes import validate_config

    o = validate_config(grpo_config(tmp_path, advantage="reinforce++", kl_coef=0.1, kl_estimator="k1")).options
    assert o.kl_in_reward and not o.kl_in_loss and o.needs_reference


def test_chain_sft_then_grpo(tmp_path):
    """rlhf.py's ["sft", "grpo"]: the actor (and model_path) is the SFT step's result; the GRPO section validates."""
    from trainer import chain
    from trainer.config import ConfigError

    raw = json.loads((REPO / "configs" / "rlhf_quickstart.json").read_text())
    raw.update(pipeline=["sft", "grpo"], save_path=str(tmp_path / "out"))
    raw["grpo"] = {"data_path": "data/samples/rlhf_prompts.jsonl", "train_steps": 4,
                   "grpo": {"rollout_batch_size": 2, "n_samples_per_prompt": 4, "reward_funcs": ["format"]}}
    steps = chain.load_steps_from(raw, world_size=2)
    grpo = steps[1]
    assert [s.name for s in steps] == ["sft", "grpo"] and grpo.cfg.stage == "grpo"
    assert grpo.raw["actor_path"] == grpo.raw["model_path"] == str(tmp_path / "out" / "sft")
    assert grpo.exports == [(tmp_path / "out" / "grpo", tmp_path / "out" / "grpo" / "hf")]
    raw["grpo"]["actor_path"] = "elsewhere"
    with pytest.raises(ConfigError, match="actor_path is set by the RLHF command"):
        chain.load_steps_from(raw, world_size=2)


@pytest.mark.parametrize("mask_truncated,filter_groups", [(False, False), (True, False), (False, True), (True, True)])
def test_loss_mask_drops_truncated_answers_and_equal_reward_groups(mask_truncated, filter_groups):
    from trainer.rl.grpo_options import GRPOOptions
    from trainer.rl.grpo_rollout import make_experience

    answer = answer_mask([2, 1, 3, 2, 1, 1, 1, 1], width=5)
    ended = torch.tensor([True, False, True, True, False, True, True, True])
    ro = SimpleNamespace(answer=answer, ended=ended)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0], dtype=torch.float64)  # group 2: all equal
    o = GRPOOptions(actor_path="x", n_samples_per_prompt=4, mask_truncated_completions=mask_truncated,
                    filter_zero_std_groups=filter_groups)
    exp = make_experience(ro, [torch.zeros(8, 5)], None, rewards, torch.zeros(8, 0), None, o, adv.local_sum)
    keep = torch.ones(8, dtype=torch.bool)
    if mask_truncated:
        keep &= ended
    if filter_groups:
        keep[4:] = False
    assert torch.equal(exp.loss_mask, answer * keep[:, None].float())
    assert torch.equal(exp.advantages[4:], torch.zeros(4, 5))  # equal rewards: advantage 0 either way


def test_a_reward_function_over_its_time_limit_is_one_line(tmp_path):
    import time

    from trainer.rl.rewards import RewardError, call_reward_functions, load_reward_function

    fn = load_reward_function(f"{write_module(tmp_path, 'import time' + chr(10) + 'def slow(prompts, completions, **kw):' + chr(10) + '    time.sleep(5)')}:slow", {}, 8, "ppo")
    start = time.perf_counter()
    with pytest.raises(RewardError, match=r"'slow' took longer than ppo.reward_timeout_s = 0.2 s on this replica's 2 completions$"):
        call_reward_functions([("slow", fn, 1.0)], ["p", "q"], ["a", "b"], {}, "ppo", timeout_s=0.2)
    assert time.perf_counter() - start < 2
    quick = load_reward_function("exact_match", {}, 8, "ppo")  # within the limit: the alarm is cancelled after the call
    assert call_reward_functions([("e", quick, 1.0)], ["p"], ["a"], {"answer": ["a"]}, "ppo", timeout_s=0.2).tolist() == [[1.0]]
    time.sleep(0.3)


def test_shipped_grpo_configs_validate():
    from trainer import chain
    from trainer.recipes import load_config

    cfg = load_config(str(REPO / "configs" / "grpo_tiny.json"), world_size=2)
    assert cfg.stage == "grpo" and cfg.options.reward_funcs == ("format",)
    steps = chain.load_steps(str(REPO / "configs" / "grpo_quickstart.json"), world_size=2)
    assert [s.name for s in steps] == ["sft", "grpo"]
    assert steps[1].cfg.options.actor_path == "runs/grpo-quickstart/sft" == cfg.options.actor_path


# ---------------------------------------------------------------------------------------------
# DAPO's dynamic sampling with refill (trainer/rl/dynamic_sampling.py).

def test_refill_plan_by_hand():
    from trainer.rl.dynamic_sampling import is_full, refill_plan

    T, F = True, False
    r0, r1, r2 = (torch.tensor(x) for x in ([T, F, T, F], [F, T, F, F], [T, T, F, T]))
    # slots 1 and 3 lack a signal: the next signal groups in (round, group) order are (1, 1) then (2, 0)
    assert refill_plan([r0, r1, r2]) == [(0, 0), (1, 1), (0, 2), (2, 0)]
    assert refill_plan([r0, r1]) == [(0, 0), (1, 1), (0, 2), (0, 3)]  # not enough: slot 3 keeps its group (masked)
    assert refill_plan([r0]) == [(0, 0), (0, 1), (0, 2), (0, 3)]
    assert (is_full([r0]), is_full([r0, r1]), is_full([r0, r1, r2])) == (False, False, True)
    assert is_full([torch.tensor([T, T])]) and refill_plan([torch.tensor([F, F]), torch.tensor([T, T])]) == [(1, 0), (1, 1)]


# Rewards of 4 groups of 2 rows per round: a group has a signal when its two rewards differ.
ROUND_REWARDS = [[1, 0, 2, 2, 0, 0, 1, 0],   # groups 0 and 3 have a signal
                 [5, 5, 3, 4, 7, 7, 7, 7],   # group 1
                 [9, 9, 6, 8, 0, 1, 9, 9]]   # groups 1 and 2


def fake_rounds(made: list):
    """generate_round for the loop: round k's rows have ids 100k + row; rewards from ROUND_REWARDS. made:
    each round's ScoredRound, in call order."""
    from trainer.rl.dynamic_sampling import ScoredRound
    from trainer.rl.rollout import Rollout

    def generate_round(k: int):
        assert k == len(made)
        ids = (100 * k + torch.arange(8))[:, None].repeat(1, 3)
        ro = Rollout(ids, torch.ones_like(ids), ids[:, 1:].contiguous(), torch.ones(8, 2), torch.ones(8, dtype=torch.bool),
                     torch.full((8,), 2), torch.zeros(8, 2))
        rewards = torch.tensor(ROUND_REWARDS[k], dtype=torch.float64)
        made.append(ScoredRound(ro, rewards, rewards[:, None].clone(), None))
        return made[-1]
    return generate_round


@pytest.mark.parametrize("max_refill_rounds", [0, 1, 2, 5])
def test_the_round_loop_trains_on_signal_groups_and_zero_rounds_is_the_filter_alone(max_refill_rounds):
    """The recipe's round loop (sample_groups) on a fake generator and scorer, then make_experience with
    filter_zero_std_groups: with enough signal groups the update sees only them (slots 1 and 2 refilled
    from rounds 1 and 2, in order); with fewer, the rest stay masked; with 0 rounds it is today's filter."""
    from trainer.rl.dynamic_sampling import sample_groups
    from trainer.rl.grpo_options import GRPOOptions
    from trainer.rl.grpo_rollout import make_experience

    made = []
    batch, rounds, first = sample_groups(fake_rounds(made), 2, max_refill_rounds, 0, 1, adv.local_sum)
    assert len(made) == rounds == min(1 + max_refill_rounds, 3)  # stops once full
    assert torch.equal(first, torch.tensor(ROUND_REWARDS[0], dtype=torch.float64))
    want_rows = {0: [0, 1, 2, 3, 4, 5, 6, 7],              # round 0 as generated
                 1: [0, 1, 102, 103, 4, 5, 6, 7],          # slot 1 <- (1, 1); slot 2 stays
                 2: [0, 1, 102, 103, 202, 203, 6, 7]}[min(max_refill_rounds, 2)]  # slot 2 <- (2, 1)
    assert batch.ro.ids[:, 0].tolist() == want_rows
    assert batch.rewards.tolist() == [ROUND_REWARDS[r // 100][r % 100] for r in want_rows]
    assert torch.equal(batch.per_function[:, 0], batch.rewards) and torch.equal(batch.ro.tokens, batch.ro.ids[:, 1:])
    o = GRPOOptions(actor_path="x", n_samples_per_prompt=2, filter_zero_std_groups=True, max_refill_rounds=max_refill_rounds)
    exp = make_experience(batch.ro, [torch.zeros(8, 2)], None, batch.rewards, batch.per_function, None, o, adv.local_sum)
    kept_groups = exp.loss_mask.reshape(4, 2, 2).amax(dim=(1, 2)).tolist()
    assert kept_groups == {0: [1, 0, 0, 1], 1: [1, 1, 0, 1], 2: [1, 1, 1, 1]}[min(max_refill_rounds, 2)]
    assert (batch is made[0]) == (max_refill_rounds == 0)  # 0: the filter alone, on the first round itself


def test_each_round_draws_further_prompts_with_its_own_seeds(monkeypatch):
    """step_prompt_records per round: rank 0's sampler moves on by rollout_batch_size prompts each round
    (its position is what a checkpoint saves); round 0's seeds are those of a step without refill, and a
    later round's differ even for the same prompt (else a prompt drawn again would repeat its answers)."""
    from trainer.generation.token_sampling import row_seeds
    from trainer.rl import rollout
    from trainer.rl.rollout import PromptSampler

    monkeypatch.setattr(rollout, "broadcast_object", lambda obj: obj)  # one process: rank 0's lists as they are

    class Prompts:  # 3 prompts, each the same token ids: only the seeds can tell rounds apart
        def __getitem__(self, i):
            return torch.tensor([5, 6]), torch.ones(2, dtype=torch.int64)

        def record(self, i):
            return {"prompt": f"p{i}", "answer": str(i)}

    dataset, sampler = Prompts(), PromptSampler(3, seed=1)
    rounds = [rollout.step_prompt_records(sampler, dataset, 2, 2, 7, 4, k) for k in range(3)]
    assert [len(p) for p, _, _ in rounds] == [4, 4, 4] and sampler.state_dict() != PromptSampler(3, seed=1).state_dict()
    again = PromptSampler(3, seed=1)
    picked = [again.take(2) for _ in range(3)]  # the same sampler's draws, round after round
    assert [[r["prompt"] for r in recs[::2]] for _, _, recs in rounds] == [[f"p{i}" for i in ids] for ids in picked]
    assert sampler.state_dict() == again.state_dict()
    prompts, seeds, _ = rounds[0]
    assert seeds == row_seeds(7 * 1_000_003 + 4, prompts)  # round 0: the seeds of a step without refill
    assert len({s for _, round_seeds, _ in rounds for s in round_seeds}) == 12  # every row of every round its own
