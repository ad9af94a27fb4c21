"""Answer extraction, equality checks and the exception- and timeout-safe RewardFunction."""

from __future__ import annotations

import json
import pickle
import threading
import time
from pathlib import Path

import pytest

from rlvr_lightning import rewards
from rlvr_lightning.rewards import (
    RewardFunction,
    RewardResult,
    extract_answer,
    extract_boxed,
    extract_last_number,
    math_verify_equal,
    numeric_equal,
    parse_gsm8k_answer,
)

FIXTURE_DATA = Path(__file__).resolve().parent / "fixtures" / "data"  # a few rows of each benchmark


# --- extraction ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so the answer is \\boxed{42}.", "42"),
        ("\\boxed{1} then \\boxed{2}", "2"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{ {a{b}c} }", "{a{b}c}"),
        ("\\fbox{7}", "7"),
        ("\\boxed {5}", "5"),
        ("\\boxed{}", ""),
        ("no box here, 12", None),
        ("\\boxed{12", None),
        ("\\boxed{1} and \\boxed{\\frac{3}{4}", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("I have 3 apples and 12 pears.", "12"),
        ("The result is -7", "-7"),
        ("It is \u22124", "-4"),
        ("10-5 = 5", "5"),
        ("x = -3.25.", "-3.25"),
        ("They paid $1,234 in total.", "1234"),
        ("1,234,567 people", "1234567"),
        ("the list 1,2,3", "3"),
        ("she ate 3/4 of the cake", "3/4"),
        ("so $\\frac{3}{4}$", "3/4"),
        ("Answer: 18.", "18"),
        ("no digits at all", None),
    ],
)
def test_extract_last_number(text, expected):
    assert extract_last_number(text) == expected


def test_extract_answer_modes():
    both = "First 3, so \\boxed{5}. Check: 7"
    assert extract_answer(both, "boxed") == "5"
    assert extract_answer(both, "last_number") == "7"
    assert extract_answer(both, "boxed_or_last") == "5"
    plain = "The answer is 7"
    assert extract_answer(plain, "boxed") is None
    assert extract_answer(plain, "boxed_or_last") == "7"
    assert extract_answer("\\boxed{} 4", "boxed_or_last") == "4"  # an empty box is no answer
    with pytest.raises(ValueError, match="answer mode"):
        extract_answer(plain, "first_number")


def test_parse_gsm8k_answer():
    assert parse_gsm8k_answer("5 + 3 = <<5+3=8>>8\n#### 8") == "8"
    assert parse_gsm8k_answer("... #### 1,234") == "1234"
    assert parse_gsm8k_answer("#### -3") == "-3"
    with pytest.raises(ValueError, match="####"):
        parse_gsm8k_answer("The answer is 8")
    with pytest.raises(ValueError, match="not a number"):
        parse_gsm8k_answer("#### eight")


@pytest.mark.parametrize("split", ["train", "test"])
def test_every_gsm8k_answer_parses(split):
    path = FIXTURE_DATA / "gsm8k" / f"{split}.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    assert rows
    for row in rows:
        final = parse_gsm8k_answer(row["answer"])
        # The parsed answer is what a correct boxed completion is compared with.
        assert numeric_equal(extract_answer(f"So \\boxed{{{final}}}."), final), row["answer"]


# --- equality ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pred", "ref", "expected"),
    [
        ("7", "7", True),
        ("7.0", "7", True),
        ("+7", "7", True),
        ("7.", "7", True),
        ("1,234", "1234", True),
        ("3/4", "0.75", True),
        ("-3/4", "-0.75", True),
        ("\\frac{1}{2}", "0.5", True),
        ("0.3333333", "1/3", True),
        ("\\$18.00", "18", True),
        ("18 \\text{ dollars}", "18", True),
        ("x = -5", "-5", True),
        ("50\\%", "50", True),
        ("0", "0", True),
        ("7", "8", False),
        ("0.001", "0", False),
        ("-7", "7", False),
        ("5x", "5", False),
        ("x^2", "2", False),
        ("3 4", "34", False),
        ("1/0", "1", False),
        ("seven", "7", False),
        ("", "7", False),
        ("1e999999999", "1", False),
    ],
)
def test_numeric_equal(pred, ref, expected):
    assert numeric_equal(pred, ref) is expected


def test_numeric_equal_relative_tolerance():
    assert numeric_equal("100.00001", "100", rel_tol=1e-6)
    assert not numeric_equal("100.001", "100", rel_tol=1e-6)
    assert numeric_equal("100.001", "100", rel_tol=1e-4)


@pytest.mark.parametrize(
    ("pred_text", "ref", "expected"),
    [
        ("So the answer is \\boxed{\\frac{1}{2}}.", "0.5", True),
        ("So the answer is \\boxed{0.5}.", "\\frac{1}{2}", True),
        ("Hence $\\sqrt{2}$.", "\\sqrt{2}", True),
        ("\\boxed{2^{1/2}}", "\\sqrt{2}", True),
        ("\\boxed{\\sqrt{3}}", "\\sqrt{2}", False),
        ("\\boxed{18}", "18", True),
        ("I do not know.", "18", False),
    ],
)
def test_math_verify_equal(pred_text, ref, expected):
    assert math_verify_equal(pred_text, ref) is expected


# --- RewardFunction ------------------------------------------------------------------------


def test_reward_function_numeric_rewards_and_format_bonus():
    reward_fn = RewardFunction(format_reward=0.1, correct_reward=1.0, incorrect_reward=-0.5)
    result = reward_fn(
        ["so \\boxed{8}", "it is 8", "\\boxed{9}", "no idea", "\\boxed{1,234}"],
        ["8", "8", "8", "8", "1234"],
    )
    assert isinstance(result, RewardResult)
    assert result.correct == [True, True, False, False, True]
    assert result.rewards == pytest.approx([1.1, 1.0, -0.4, -0.5, 1.1])
    assert result.extracted == ["8", "8", "9", None, "1,234"]
    assert (result.num_failures, result.num_timeouts) == (0, 0)


def test_reward_function_boxed_mode_ignores_unboxed_numbers():
    result = RewardFunction(answer_mode="boxed")(["it is 8", "\\boxed{8}"], ["8", "8"])
    assert result.correct == [False, True]


def test_reward_function_rejects_bad_arguments():
    with pytest.raises(ValueError, match="method"):
        RewardFunction(method="regex")
    with pytest.raises(ValueError, match="answer mode"):
        RewardFunction(answer_mode="first")
    with pytest.raises(ValueError, match="timeout_seconds"):
        RewardFunction(timeout_seconds=0)
    with pytest.raises(ValueError, match="completions"):
        RewardFunction()(["\\boxed{1}"], ["1", "2"])
    assert RewardFunction()([], []) == RewardResult(rewards=[], correct=[], extracted=[])


def test_numeric_rewards_are_fast():
    completions = [("Step by step. " * 100) + f"\\boxed{{{i}}}" for i in range(64)]
    answers = [str(i) for i in range(64)]
    reward_fn = RewardFunction()
    reward_fn(completions, answers)
    start = time.perf_counter()
    result = reward_fn(completions, answers)
    assert all(result.correct)
    assert time.perf_counter() - start < 0.5  # milliseconds in practice; loose for shared CPUs


def _misbehaving_numeric_equal(release: threading.Event):
    real = rewards.numeric_equal

    def numeric_equal(pred: str, ref: str, rel_tol: float = 1e-6) -> bool:
        if pred == "raise":
            raise RuntimeError("verifier bug")
        if pred == "hang":
            release.wait(30)
        return real(pred, ref, rel_tol)

    return numeric_equal


@pytest.mark.parametrize("in_worker_thread", [False, True])
def test_raising_and_hanging_checks_score_incorrect_and_are_counted(monkeypatch, in_worker_thread):
    release = threading.Event()
    monkeypatch.setattr(rewards.verification, "numeric_equal", _misbehaving_numeric_equal(release))
    reward_fn = RewardFunction(timeout_seconds=0.3, format_reward=0.25)
    completions = ["\\boxed{4}", "\\boxed{raise}", "\\boxed{hang}", "\\boxed{5}", "\\boxed{hang}"]
    answers = ["4", "4", "4", "5", "4"]
    results: list[RewardResult] = []
    start = time.perf_counter()
    try:
        if in_worker_thread:
            thread = threading.Thread(
                target=lambda: results.append(reward_fn(completions, answers))
            )
            thread.start()
            thread.join(10)
        else:
            results.append(reward_fn(completions, answers))
    finally:
        release.set()
    elapsed = time.perf_counter() - start
    (result,) = results
    assert result.correct == [True, False, False, True, False]
    # Failed and timed-out checks score as incorrect; the format bonus still applies.
    assert result.rewards == pytest.approx([1.25, 0.25, 0.25, 1.25, 0.25])
    assert result.num_failures == 1
    assert result.num_timeouts == 2
    assert elapsed < 5.0


def test_math_verify_reward_survives_a_hanging_check():
    # SymPy would spend hours on 9^(9^(9^9)); the worker is killed and replaced after the limit.
    with RewardFunction(method="math_verify", timeout_seconds=1.0, num_workers=2) as reward_fn:
        completions = [
            "So the answer is \\boxed{\\frac{1}{2}}.",
            "Thus $\\sqrt{2}$",
            "\\boxed{9^{9^{9^{9}}}}",
            "\\boxed{\\pi}",
            "\\boxed{3}",
        ]
        answers = ["0.5", "\\sqrt{2}", "1", "\\pi", "4"]
        result = reward_fn(completions, answers)
        assert result.correct == [True, True, False, True, False]
        assert result.rewards == [1.0, 1.0, 0.0, 1.0, 0.0]
        assert result.extracted[0] == "\\frac{1}{2}"
        assert result.extracted[2] is None
        assert (result.num_timeouts, result.num_failures) == (1, 0)

        # The replaced worker serves the next batch, also when called from another thread.
        results: list[RewardResult] = []
        thread = threading.Thread(
            target=lambda: results.append(reward_fn(["\\boxed{0.75}", "7"], ["\\frac{3}{4}", "8"]))
        )
        thread.start()
        thread.join(30)
        assert results[0].correct == [True, False]
        assert results[0].num_timeouts == 0

        # Worker processes do not travel with a copy of the reward function.
        copy = pickle.loads(pickle.dumps(reward_fn))
        assert copy._process_runner is None
        assert copy.method == "math_verify"
        processes = [worker.process for worker in reward_fn._process_runner._workers]
    assert processes and all(process.poll() is not None for process in processes)


def test_random_rewards_ignore_correctness_but_report_it() -> None:
    import torch

    reward_fn = RewardFunction(method="numeric", random_reward_probability=0.5)
    torch.manual_seed(0)
    result = reward_fn(["\\boxed{2}"] * 400, ["2"] * 400)
    assert all(result.correct)
    assert 0.4 < sum(result.rewards) / 400 < 0.6
    torch.manual_seed(0)
    assert reward_fn(["\\boxed{2}"] * 400, ["2"] * 400).rewards == result.rewards  # seeded
    with pytest.raises(ValueError, match="random_reward_probability"):
        RewardFunction(random_reward_probability=1.5)
