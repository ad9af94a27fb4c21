"""A user's own reward (``reward.function``): loading, checking, and a real training run with
the example ``examples/length_penalty_reward.py``."""

from __future__ import annotations

import json
import math
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import examples.length_penalty_reward as example
from rlvr_lightning.config import ConfigError, validate_config
from rlvr_lightning.rewards import RewardFunction, UserRewardError, load_reward_function
from rlvr_lightning.train import run
from tests.conftest import TINY_OVERRIDES, compose_config, read_scalars

EXAMPLE = "examples.length_penalty_reward.length_penalty_reward"
COMPLETIONS = ["So \\boxed{4}", "It is 7", "I think the answer is \\boxed{5}. " * 10, "no idea"]
ANSWERS = ["4", "7", "5", "3"]


# --- the example -------------------------------------------------------------------------


def test_example_rewards_correct_answers_minus_a_capped_length_penalty() -> None:
    scores = example.length_penalty_reward(COMPLETIONS, ANSWERS)
    assert scores == pytest.approx([1 - 0.012, 1 - 0.007, 1 - 0.2, -0.007])


# --- loading -----------------------------------------------------------------------------


@pytest.mark.parametrize("path", [EXAMPLE, "examples.length_penalty_reward:length_penalty_reward"])
def test_dotted_and_colon_paths_load_the_function(path: str) -> None:
    assert load_reward_function(path) is example.length_penalty_reward
    assert load_reward_function(f"  {path} ") is example.length_penalty_reward


BAD_FUNCTIONS = [
    ("length_penalty_reward", "must be a dotted path package.module.function"),
    ("examples..length_penalty_reward", "must be a dotted path"),
    (123, "must be a dotted path"),
    ("no_such_package.reward", "no module of that path can be imported"),
    ("examples.length_penalty_reward.nope", "'examples.length_penalty_reward' has no attribute 'nope'"),
    ("examples.nope.fn", "'examples' has no attribute 'nope' (and there is no module 'examples.nope')"),
    ("examples.length_penalty_reward:nope", "'examples.length_penalty_reward' has no attribute 'nope'"),
    ("examples.length_penalty_reward.MAX_PENALTY", "is a float, not a callable"),
    ("os.getcwd", "cannot be called as function(completions, answers)"),
]


@pytest.mark.parametrize("function,fragment", BAD_FUNCTIONS, ids=[str(f) for f, _ in BAD_FUNCTIONS])
def test_a_bad_function_is_refused_naming_the_key_and_what_it_must_be(function, fragment) -> None:
    with pytest.raises(UserRewardError) as error:
        RewardFunction(function=function)
    message = str(error.value)
    assert f"reward.function={function!r}" in message
    assert fragment in message
    assert "(completions: list[str], answers: list[str]) -> list[float]" in message


def test_a_module_that_fails_to_import_is_reported_with_its_error(tmp_path, monkeypatch) -> None:
    (tmp_path / "broken_reward.py").write_text("import no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserRewardError, match="importing 'broken_reward' failed.*no_such_dependency"):
        load_reward_function("broken_reward.score")


def test_reward_options_that_would_be_ignored_are_refused() -> None:
    with pytest.raises(ValueError, match="reward.format_reward=0.1 does not apply with reward.function"):
        RewardFunction(function=EXAMPLE, format_reward=0.1)
    with pytest.raises(ValueError, match="reward.random_reward_probability=0.5 does not apply"):
        RewardFunction(function=EXAMPLE, random_reward_probability=0.5)


# --- calling -----------------------------------------------------------------------------


def test_rewards_are_the_functions_scores_and_correct_is_the_verifiers() -> None:
    builtin = RewardFunction()(COMPLETIONS, ANSWERS)
    result = RewardFunction(function=EXAMPLE)(COMPLETIONS, ANSWERS)
    assert result.rewards == example.length_penalty_reward(COMPLETIONS, ANSWERS)  # exactly
    assert result.correct == builtin.correct == [True, True, True, False]
    assert result.extracted == builtin.extracted
    assert (result.num_failures, result.num_timeouts) == (0, 0)
    assert RewardFunction(function=EXAMPLE)([], []).rewards == []


def test_the_function_gets_fresh_lists_with_string_answers() -> None:
    seen = []

    def reward(completions, answers):
        seen.append((completions, answers))
        return [0.5] * len(completions)

    result = RewardFunction(function=reward)(("a", "b"), (1, 2.5))
    assert seen == [(["a", "b"], ["1", "2.5"])]
    assert result.rewards == [0.5, 0.5]


@pytest.mark.parametrize("scores,expected", [
    ((1, 0.25), [1.0, 0.25]),
    ([True, False], [1.0, 0.0]),
    (np.array([0.5, -1.0], dtype=np.float32), [0.5, -1.0]),
    (torch.tensor([0.5, 2.0]), [0.5, 2.0]),
])
def test_lists_tuples_bools_arrays_and_tensors_are_accepted(scores, expected) -> None:
    assert RewardFunction(function=lambda c, a: scores)(["x", "y"], ["1", "2"]).rewards == expected


@pytest.mark.parametrize("scores,fragment", [
    ([1.0], "returned 1 scores for 2 completions"),
    ([1.0, 2.0, 3.0], "returned 3 scores for 2 completions"),
    ([1.0, "1.0"], "returned '1.0' for completion 1; each score must be a finite number"),
    ([None, 1.0], "returned None for completion 0"),
    ([1.0, math.nan], "returned nan for completion 1"),
    ([math.inf, 1.0], "returned inf for completion 0"),
    (0.5, "returned a float; it must return a list of floats, one score per completion (2 here)"),
    ("10", "returned a str"),
    ({"x": 1.0, "y": 1.0}, "returned a dict"),
    (None, "returned a NoneType"),
    (iter([1.0, 1.0]), "returned a list_iterator"),
])
def test_a_bad_return_value_is_refused_naming_the_function(scores, fragment) -> None:
    def my_reward(completions, answers):
        return scores

    reward_fn = RewardFunction(function=my_reward)
    with pytest.raises(UserRewardError) as error:
        reward_fn(["x", "y"], ["1", "2"])
    message = str(error.value)
    assert message.startswith("reward.function='") and "my_reward'" in message
    assert fragment in message


def test_an_exception_in_the_function_propagates_with_a_note() -> None:
    def buggy(completions, answers):
        raise KeyError("oops")

    with pytest.raises(KeyError, match="oops") as error:
        RewardFunction(function=buggy)(["x"], ["1"])
    notes = getattr(error.value, "__notes__", ["raised by the user reward reward.function="])
    assert "raised by the user reward reward.function=" in notes[0]


def test_a_copy_imports_the_function_again() -> None:
    reward_fn = RewardFunction(function=EXAMPLE)
    copy = pickle.loads(pickle.dumps(reward_fn))
    assert copy._user_function is None and copy.function == EXAMPLE
    assert copy(COMPLETIONS, ANSWERS).rewards == reward_fn(COMPLETIONS, ANSWERS).rewards
    assert "function='examples.length_penalty_reward.length_penalty_reward'" in repr(copy)


# --- config ------------------------------------------------------------------------------


def test_the_config_key_defaults_to_the_builtin_verifier() -> None:
    cfg = compose_config(TINY_OVERRIDES)
    assert cfg.reward.function is None
    validate_config(cfg)


@pytest.mark.parametrize("override,fragments", [
    ("reward.function=no_such_package.reward", ["reward.function='no_such_package.reward'",
                                                "no module", "-> list[float]"]),
    ("reward.function=examples.length_penalty_reward.MAX_PENALTY", ["not a callable"]),
    ("reward.format_reward=0.5", ["reward.format_reward=0.5 does not apply with reward.function"]),
])
def test_config_validation_refuses_a_bad_function_before_any_model_loads(override, fragments) -> None:
    overrides = TINY_OVERRIDES + [f"reward.function={EXAMPLE}", override]
    with pytest.raises(ConfigError) as error:
        validate_config(compose_config(overrides))
    for fragment in fragments:
        assert fragment in str(error.value), str(error.value)


# --- training ----------------------------------------------------------------------------


def test_training_logs_the_example_functions_rewards(tmp_path: Path, monkeypatch) -> None:
    # Record each call of the example (the trainer imports it by its path, so it finds the spy).
    calls: list[tuple[list[str], list[str], list[float]]] = []
    real = example.length_penalty_reward

    def length_penalty_reward(completions: list[str], answers: list[str]) -> list[float]:
        scores = real(completions, answers)
        calls.append((list(completions), list(answers), scores))
        return scores

    monkeypatch.setattr(example, "length_penalty_reward", length_penalty_reward)
    # The same override a user types after `python -m rlvr_lightning.train`.
    overrides = [f"reward.function={EXAMPLE}", "objective=grpo", "logging.num_groups=2"]
    run(compose_config(TINY_OVERRIDES + overrides), run_dir=tmp_path / "run")

    # Validation (32 completions: 8 problems x 4 samples) at steps 0 and 2, training (8: 2 prompts
    # x 4 samples) at steps 0 and 1.
    assert [len(completions) for completions, _, _ in calls] == [32, 8, 8, 32]
    train_calls, val_calls = calls[1:3], [calls[0], calls[3]]
    for completions, answers, scores in calls:
        assert scores == real(completions, answers)
    scalars = read_scalars(tmp_path / "run")
    assert [step for step, _ in scalars["reward/mean"]] == [0, 1]
    logged = [value for _, value in scalars["reward/mean"]]
    assert logged == pytest.approx([sum(s) / len(s) for _, _, s in train_calls], abs=1e-6)
    assert len({round(value, 6) for _, _, s in train_calls for value in s}) > 1  # the penalty varies
    val_logged = [value for _, value in scalars["val/reward"]]
    assert val_logged == pytest.approx([sum(s) / len(s) for _, _, s in val_calls], abs=1e-6)
    # Accuracy is still the verifier's verdict, whatever the reward.
    verdicts = [RewardFunction()(c, a).correct for c, a, _ in train_calls]
    accuracy = [value for _, value in scalars["reward/accuracy"]]
    assert accuracy == pytest.approx([sum(v) / len(v) for v in verdicts], abs=1e-6)
    # samples.jsonl holds every training completion with the reward it got.
    samples = [json.loads(line) for line in next((tmp_path / "run").rglob("samples.jsonl")).open()]
    assert [s["completion"] for s in samples] == [c for cs, _, _ in train_calls for c in cs]
    assert [s["reward"] for s in samples] == pytest.approx(
        [value for _, _, scores in train_calls for value in scores], abs=1e-6
    )


def test_the_documented_listing_is_the_example_file() -> None:
    """The README's section shows the example file as it is."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    text = readme.split("## Your own reward", 1)[1]
    listing = re.search(r"```python\n(.*?)```", text, re.S).group(1).strip()
    source = Path(example.__file__).read_text()
    assert listing == source[source.index("from __future__") :].strip()
    assert f"reward.function={EXAMPLE}" in text
