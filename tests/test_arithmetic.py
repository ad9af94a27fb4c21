"""The synthetic arithmetic task, its held-out split, and prompt building."""

from __future__ import annotations

import re

import pytest

from rlvr_lightning.data.arithmetic import ArithmeticTask, make_arithmetic_splits
from rlvr_lightning.data.prompts import DEFAULT_INSTRUCTION, build_prompt

QUESTION = re.compile(r"What is ([\d +\-*]+)\?")


def expression(row: dict[str, str]) -> str:
    match = QUESTION.fullmatch(row["question"])
    assert match is not None, row["question"]
    return match.group(1)


def reference_value(row: dict[str, str]) -> int:
    # Python's own arithmetic, independent of the generator's evaluator.
    return eval(expression(row), {"__builtins__": {}})


def operands(row: dict[str, str]) -> list[int]:
    return [int(token) for token in expression(row).split()[::2]]


def operators(row: dict[str, str]) -> list[str]:
    return expression(row).split()[1::2]


# --- the task ------------------------------------------------------------------------------


def test_default_task_is_one_digit_addition():
    rows = ArithmeticTask().generate(200, seed=0)
    assert rows[0].keys() == {"question", "answer"}
    for row in rows:
        assert operators(row) == ["+"]
        assert all(0 <= value <= 9 for value in operands(row))
        assert int(row["answer"]) == reference_value(row)
    assert ArithmeticTask().num_problems() == 100


def test_generation_is_deterministic_by_seed():
    task = ArithmeticTask(max_digits=3, operations=["+", "-", "*"], num_operands=3)
    assert task.generate(100, seed=7) == task.generate(100, seed=7)
    assert task.generate(100, seed=7) != task.generate(100, seed=8)


@pytest.mark.parametrize(
    "knobs",
    [
        dict(min_digits=2, max_digits=3, operations=["+", "-", "*"], num_operands=4),
        dict(min_digits=1, max_digits=2, operations=["-"], num_operands=3),
        dict(min_digits=3, max_digits=3, operations=["*"], num_operands=2),
        dict(operations=["-", "+"], num_operands=5, allow_negative=False),
    ],
)
def test_answers_are_correct_and_knobs_respected(knobs):
    task = ArithmeticTask(**knobs)
    rows = task.generate(300, seed=1)
    for row in rows:
        values = operands(row)
        assert len(values) == task.num_operands
        assert set(operators(row)) <= set(task.operations)
        assert all(task.min_digits <= len(str(value)) <= task.max_digits for value in values)
        assert row["answer"] == str(reference_value(row))
        if not task.allow_negative:
            assert int(row["answer"]) >= 0
    used = {operator for row in rows for operator in operators(row)}
    assert used == set(task.operations)


def test_subtraction_gives_negative_answers_only_when_allowed():
    negative = ArithmeticTask(operations=["-"]).generate(200, seed=0)
    assert any(int(row["answer"]) < 0 for row in negative)
    non_negative = ArithmeticTask(operations=["-"], allow_negative=False).generate(200, seed=0)
    assert all(int(row["answer"]) >= 0 for row in non_negative)


def test_multiplication_binds_tighter():
    task = ArithmeticTask(operations=["+", "*"], num_operands=3)
    for row in task.generate(200, seed=3):
        assert int(row["answer"]) == reference_value(row)


@pytest.mark.parametrize(
    "knobs",
    [
        dict(min_digits=0),
        dict(min_digits=3, max_digits=2),
        dict(operations=["/"]),
        dict(operations=[]),
        dict(operations=["+", "+"]),
        dict(num_operands=1),
    ],
)
def test_invalid_knobs_raise(knobs):
    with pytest.raises(ValueError):
        ArithmeticTask(**knobs)


# --- splits --------------------------------------------------------------------------------


def test_small_space_split_is_disjoint():
    train, val = make_arithmetic_splits(500, 30, seed=0)
    train_questions = {row["question"] for row in train}
    val_questions = [row["question"] for row in val]
    assert len(train) == 500 and len(val) == 30
    assert len(set(val_questions)) == 30
    assert not train_questions & set(val_questions)
    # Every one of the 70 remaining problems is used before any repeats.
    assert len(train_questions) == 70
    for row in train + val:
        assert int(row["answer"]) == reference_value(row)


def test_small_space_uses_each_train_problem_before_repeating():
    train, val = make_arithmetic_splits(50, 10, seed=0)
    assert len({row["question"] for row in train}) == 50


def test_large_space_split_is_disjoint():
    knobs = dict(min_digits=2, max_digits=3, operations=["+", "-", "*"], num_operands=3)
    train, val = make_arithmetic_splits(2000, 200, seed=0, **knobs)
    assert len(train) == 2000 and len(val) == 200
    val_questions = {row["question"] for row in val}
    assert len(val_questions) == 200
    assert not val_questions & {row["question"] for row in train}


def test_splits_are_deterministic_by_seed():
    knobs = dict(max_digits=2, operations=["+", "-"])
    assert make_arithmetic_splits(100, 20, 5, **knobs) == make_arithmetic_splits(
        100, 20, 5, **knobs
    )
    assert make_arithmetic_splits(100, 20, 5, **knobs) != make_arithmetic_splits(
        100, 20, 6, **knobs
    )


def test_impossible_split_raises():
    with pytest.raises(ValueError, match="num_val=100 is too large"):
        make_arithmetic_splits(10, 100, seed=0)
    with pytest.raises(ValueError, match="num_val=101 is too large"):
        make_arithmetic_splits(0, 101, seed=0)
    # Holding out the whole space is possible when no training rows are asked for.
    train, val = make_arithmetic_splits(0, 100, seed=0)
    assert train == [] and len({row["question"] for row in val}) == 100
    # With allow_negative=False only 55 one-digit subtractions exist.
    with pytest.raises(ValueError, match="55 distinct problems"):
        make_arithmetic_splits(10, 60, seed=0, operations=["-"], allow_negative=False)


# --- prompts -------------------------------------------------------------------------------


def make_tokenizer(chat_template: str | None):
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    vocab = {"[UNK]": 0, "What": 1, "is": 2}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    tokenizer.chat_template = chat_template
    return tokenizer


CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_build_prompt_with_chat_template():
    tokenizer = make_tokenizer(CHAT_TEMPLATE)
    prompt = build_prompt(tokenizer, "What is 3 + 5?")
    assert prompt == f"<|user|>What is 3 + 5?\n{DEFAULT_INSTRUCTION}<|end|><|assistant|>"
    with_system = build_prompt(tokenizer, "What is 3 + 5?", "Be brief.", system_prompt="You add.")
    assert (
        with_system
        == "<|system|>You add.<|end|><|user|>What is 3 + 5?\nBe brief.<|end|><|assistant|>"
    )


def test_build_prompt_without_chat_template():
    tokenizer = make_tokenizer(None)
    prompt = build_prompt(tokenizer, "What is 3 + 5?")
    assert prompt == "Question: What is 3 + 5?\nPut your final answer within \\boxed{}.\nAnswer:"
    assert build_prompt(tokenizer, "What is 1 + 1?", instruction="") == (
        "Question: What is 1 + 1?\nAnswer:"
    )
    assert (
        build_prompt(tokenizer, "Q?", "I.", system_prompt="S.") == "S.\n\nQuestion: Q?\nI.\nAnswer:"
    )


def test_multiplication_data_config_composes_to_one_digit_multiplication():
    """``data=arithmetic_multiplication``: arithmetic.yaml's keys with ``operations: ["*"]``."""
    from hydra.utils import instantiate

    from tests.conftest import compose_config

    data = compose_config(["data=arithmetic_multiplication"]).data
    base = compose_config(["data=arithmetic"]).data
    assert {key: data[key] for key in data if key != "operations"} == {
        key: base[key] for key in base if key != "operations"
    }
    module = instantiate(data)
    module.setup()
    assert len(module.val_rows) == 50 and len(module.train_rows) == 5000
    val_questions = {row["question"] for row in module.val_rows}
    assert not val_questions & {row["question"] for row in module.train_rows}
    for row in module.train_rows[:500] + module.val_rows:
        assert operators(row) == ["*"]
        assert all(0 <= value <= 9 for value in operands(row))
        assert int(row["answer"]) == reference_value(row)
