"""Rewards: math answers (math-verify and the built-in extractor), format, DAPO over-length, reasoning-gym,
weighted combination, and the verifier pool under hanging, raising and dying verifiers.

The verifiers below are module-level so the pool's spawned workers can unpickle them (this module
imports no JAX, so a worker starts quickly)."""

import functools
import os
import time

import numpy as np
import pytest

from polmjax.rl.rewards import (RewardFn, VerifierPool, builtin_verify, extract_answer, format_reward, math_reward,
                                overlong, overlong_reward, reasoning_gym_reward, score)

TIMEOUT_S = 1.0


def echo(prompts, completions, **_):
    return [float(c) for c in completions]


def sleeps_forever(prompts, completions, **_):
    time.sleep(3600)


def raises(prompts, completions, **_):
    raise RuntimeError("verifier bug")


def exits(prompts, completions, **_):
    os._exit(7)


def maybe_none(prompts, completions, **_):
    return [None if c == "skip" else 1.0 for c in completions]


@pytest.fixture(scope="module")
def pool():
    with VerifierPool(num_workers=2, timeout_s=TIMEOUT_S) as p:
        yield p


# --- math answers -------------------------------------------------------------------------------


def test_math_verify_equalities():
    pytest.importorskip("math_verify")
    gold = ["\\frac{1}{2}", "0.5", "72", "Natalia sold 48/2 = 24 clips in May.\n#### 72", "-4", "\\frac{1}{2}",
            "42", "not math at all"]
    completions = ["The answer is 0.5", "so the result is $\\frac{1}{2}$", "\\boxed{72}", "She sold 72 clips.",
                   "Calculate: -4", "\\boxed{\\frac{1}{3}}", "first 42, then 41", "anything"]
    got = math_reward(None, completions, gold, backend="math_verify")
    assert got[:5] == [1.0] * 5
    assert got[5:7] == [0.0, 0.0]  # 1/3 ≠ 1/2; the last number (41) is the answer, not an earlier 42
    assert got[7] in (None, 0.0)  # a gold that does not parse is skipped (None), as TRL's accuracy_reward


def test_math_reward_reads_the_final_answer_not_the_reasoning():
    pytest.importorskip("math_verify")
    completions = ["<think>maybe 42, or 7</think><answer>7</answer>", "<think>6 x 7 = 42</think><answer>42</answer>",
                   "first \\boxed{3}, no: \\boxed{42}", "<think>\\boxed{42}?</think> it is \\boxed{41}", "\\boxed{3\\sqrt{2}}"]
    got = math_reward(None, completions, ["42", "42", "42", "42", "3\\sqrt{2}"], backend="math_verify")
    assert got == [0.0, 1.0, 1.0, 0.0, 1.0]


@pytest.mark.parametrize("text, want", [
    ("so x = \\boxed{\\frac{1}{2}} done", "\\frac{1}{2}"),
    ("\\boxed{1} then \\boxed{\\dfrac{3}{\\sqrt{4}}}", "\\dfrac{3}{\\sqrt{4}}"),
    ("Step: 5 + 7 = 12\n#### 1,234\n", "1,234"),
    ("<think>2+2</think><answer> 4 </answer>", "4"),
    ("It is 3/4.", "3/4"),
    ("we get -2.5 and then \\frac{7}{8}", "\\frac{7}{8}"),
    ("I cannot tell", None),
])
def test_extract_answer(text, want):
    assert extract_answer(text) == want


@pytest.mark.parametrize("gold, completion, want", [
    ("0.5", "\\boxed{\\frac{1}{2}}", True),
    ("\\frac{1}{2}", "the answer is 1/2.", True),
    ("-\\frac{3}{4}", "\\boxed{-0.75}", True),
    ("1000", "#### 1,000", True),
    ("-3", "so x = -3", True),
    ("x+1", "\\boxed{x + 1}", True),
    ("Step by step... #### 18", "The total is 18 dollars", True),
    ("42", "41", False),
    ("x+1", "\\boxed{2x+1}", False),
    ("7", "no answer here", False),
])
def test_builtin_verify(gold, completion, want):
    assert builtin_verify(gold, completion) is want


def test_math_reward_builtin_backend():
    got = math_reward(None, ["\\boxed{6}", "it is 7", "#### 0.25"], ["6", "6", "\\frac{1}{4}"], backend="builtin")
    assert got == [1.0, 0.0, 1.0]
    math_solution = ["The sum is $2+3=\\boxed{5}$."]  # a MATH-style solution under TRL's column name
    assert math_reward(None, ["so 5"], solution=math_solution, backend="builtin") == [1.0]
    with pytest.raises(ValueError, match="'answer'"):
        math_reward(None, ["so 5"], backend="builtin")


# --- format, over-length, reasoning-gym ----------------------------------------------------------


def test_format_reward():
    completions = [
        "<think>2 + 2 is 4</think><answer>4</answer>",
        "  <think>\nmulti\nline\n</think>\n<answer>4</answer>\n",
        "<answer>4</answer>",
        "<think>a</think><answer>4</answer> trailing text",
        "<think>a<think>b</think></think><answer>4</answer>",
        "<think>a</think><answer>4</answer><answer>5</answer>",
    ]
    assert format_reward(None, completions) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]


def test_overlong_shape():
    # L_max = 20, L_cache = 8: 0 up to 12, then linear to −1 at 20, −1 beyond
    np.testing.assert_allclose(overlong([0, 12, 13, 16, 20, 21], max_len=20, buffer=8),
                               [0.0, 0.0, -1 / 8, -4 / 8, -1.0, -1.0])
    fn = functools.partial(overlong_reward, max_len=20, buffer=8)
    assert fn(None, ["a", "b"], completion_lengths=[4, 18]) == pytest.approx([0.0, -0.75])
    with pytest.raises(ValueError, match="buffer"):
        overlong([1], max_len=4, buffer=8)


def test_reasoning_gym_task(pool):
    rg = pytest.importorskip("reasoning_gym")
    data = rg.create_dataset("basic_arithmetic", size=3, seed=0)
    entries = [data[i] for i in range(3)]
    completions = [f"<think>easy</think><answer>{entries[0]['answer']}</answer>",
                   "<answer>999999999</answer>",
                   f"{entries[2]['answer']}"]  # no tag: the whole completion is the answer
    assert reasoning_gym_reward(None, completions, entries) == [1.0, 0.0, 1.0]
    # a fresh worker imports reasoning_gym on its first call (~1-2 s): this term gets its own timeout
    prompts = [e["question"] for e in entries]
    scores = score([RewardFn(reasoning_gym_reward, timeout_s=60.0)], prompts, completions, {"entry": entries},
                   pool=pool)
    np.testing.assert_array_equal(scores.total, [1.0, 0.0, 1.0])


# --- combination ----------------------------------------------------------------------------------


def test_weighted_combination_and_metrics():
    completions = ["<think>x</think><answer>2</answer>", "<answer>3</answer>", "skip"]
    fns = [RewardFn(functools.partial(math_reward, backend="builtin"), weight=1.0, isolate=False),
           RewardFn(format_reward, weight=0.5, isolate=False),
           RewardFn(maybe_none, weight=2.0, name="applies", isolate=False)]
    s = score(fns, ["p"] * 3, completions, {"answer": ["2", "2", "2"]})
    np.testing.assert_array_equal(s.per_fn["math_reward"], [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(s.per_fn["format_reward"], [1.0, 0.0, 0.0])
    assert np.isnan(s.per_fn["applies"][2])
    np.testing.assert_allclose(s.total, [1.0 + 0.5 + 2.0, 2.0, 0.0])  # None is left out of the sum
    assert s.metrics["rewards/applies/mean"] == 1.0  # and out of the mean
    assert s.metrics["rewards/math_reward/mean"] == pytest.approx(1 / 3)
    assert s.metrics["rewards/format_reward/errors"] == 0.0
    assert s.metrics["reward"] == pytest.approx(np.mean([3.5, 2.0, 0.0]))

    failing = score([RewardFn(raises, isolate=False), RewardFn(echo, isolate=False)], ["p"] * 2, ["1", "2"])
    np.testing.assert_array_equal(failing.total, [1.0, 2.0])  # the failing term scores 0
    assert failing.metrics["rewards/raises/errors"] == 2.0
    assert "verifier bug" in failing.errors["raises"]

    with pytest.raises(ValueError, match="VerifierPool"):
        score([RewardFn(echo)], ["p"], ["1"])
    with pytest.raises(ValueError, match="unique"):
        score([RewardFn(echo, isolate=False), RewardFn(echo, isolate=False)], ["p"], ["1"])
    with pytest.raises(ValueError, match="row field 'answer'"):
        score([RewardFn(echo, isolate=False)], ["p"], ["1"], {"answer": []})


# --- the verifier pool ----------------------------------------------------------------------------


def test_pool_hanging_verifier_times_out(pool):
    start = time.monotonic()
    s = score([RewardFn(sleeps_forever, name="hang"), RewardFn(echo)], ["p"] * 2, ["1", "2"], pool=pool)
    elapsed = time.monotonic() - start
    assert elapsed < TIMEOUT_S + 2.0, elapsed
    np.testing.assert_array_equal(s.per_fn["hang"], [0.0, 0.0])
    np.testing.assert_array_equal(s.per_fn["echo"], [1.0, 2.0])
    assert s.metrics["rewards/hang/timeouts"] == 2.0 and s.metrics["rewards/hang/errors"] == 0.0
    assert s.metrics["rewards/echo/timeouts"] == 0.0
    after = score([RewardFn(echo)], ["p"] * 3, ["4", "5", "6"], pool=pool)  # killed workers were replaced
    np.testing.assert_array_equal(after.total, [4.0, 5.0, 6.0])


def test_pool_batch_timeout_bounds_a_run_of_hanging_calls(pool):
    pool.batch_timeout_s = 1.5  # 6 hanging calls on 2 workers would otherwise take 3 x TIMEOUT_S
    try:
        start = time.monotonic()
        s = score([RewardFn(sleeps_forever, name="hang")], ["p"] * 6, ["1"] * 6, pool=pool)
        elapsed = time.monotonic() - start
    finally:
        pool.batch_timeout_s = None
    assert elapsed < 1.5 + 2.0, elapsed
    assert s.metrics["rewards/hang/timeouts"] == 6.0
    np.testing.assert_array_equal(s.total, np.zeros(6))
    np.testing.assert_array_equal(score([RewardFn(echo)], ["p"], ["9"], pool=pool).total, [9.0])


def test_pool_raising_and_dying_verifiers(pool):
    restarts = pool.restarts
    s = score([RewardFn(raises), RewardFn(exits), RewardFn(echo)], ["p"] * 2, ["1", "2"], pool=pool)
    np.testing.assert_array_equal(s.per_fn["raises"], [0.0, 0.0])
    np.testing.assert_array_equal(s.per_fn["exits"], [0.0, 0.0])
    np.testing.assert_array_equal(s.total, [1.0, 2.0])
    assert s.metrics["rewards/raises/errors"] == 2.0 and s.metrics["rewards/exits/errors"] == 2.0
    assert "exit code 7" in s.errors["exits"] and "verifier bug" in s.errors["raises"]
    assert pool.restarts == restarts + 2  # the two dead workers, not the raising calls
    after = score([RewardFn(echo)], ["p"] * 4, ["1", "2", "3", "4"], pool=pool)
    np.testing.assert_array_equal(after.total, [1.0, 2.0, 3.0, 4.0])


def test_pool_rejects_unpicklable_and_fork(pool):
    with pytest.raises(ValueError, match="module level"):
        score([RewardFn(lambda p, c, **_: [1.0] * len(c), name="lam")], ["p"], ["1"], pool=pool)
    with pytest.raises(ValueError, match="fork"):
        VerifierPool(start_method="fork")
