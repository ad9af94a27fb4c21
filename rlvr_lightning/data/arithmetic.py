"""Synthetic arithmetic problems with exact answers: a verifiable task a tiny model can learn.

``ArithmeticTask`` draws problems such as ``{"question": "What is 3 + 5?", "answer": "8"}``;
its knobs (operand digits, operations, number of operands, negative results) set the difficulty.
``make_arithmetic_splits`` builds a training split and a held-out validation split that share no
question, also when the problem space is small (1-digit addition has only 100 problems).
Everything is deterministic given the seed.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

OPERATIONS = ("+", "-", "*")
# Problem spaces up to this size are enumerated and split exactly; larger ones are sampled.
ENUMERATION_LIMIT = 200_000
# Rejection sampling gives up after this many draws per requested problem.
MAX_DRAWS_PER_PROBLEM = 1_000


def evaluate(operands: Sequence[int], operators: Sequence[str]) -> int:
    """Value of ``operands[0] operators[0] operands[1] ...`` with ``*`` binding tighter."""
    total, term, sign = 0, operands[0], 1
    for operator, operand in zip(operators, operands[1:], strict=True):
        if operator == "*":
            term *= operand
        else:
            total += sign * term
            sign, term = (1 if operator == "+" else -1), operand
    return total + sign * term


def format_question(operands: Sequence[int], operators: Sequence[str]) -> str:
    expression = str(operands[0])
    for operator, operand in zip(operators, operands[1:], strict=True):
        expression += f" {operator} {operand}"
    return f"What is {expression}?"


@dataclass(frozen=True)
class ArithmeticTask:
    """A distribution of arithmetic problems.

    Operands are non-negative; an operand's digit count is drawn uniformly from
    ``[min_digits, max_digits]`` and its value uniformly among numbers with that many digits
    (1 digit: 0 to 9; d > 1 digits: 10**(d-1) to 10**d - 1). Each operator is drawn uniformly
    from ``operations``; ``*`` binds tighter than ``+`` and ``-``.
    """

    # Digits of each operand, lower and upper bound.
    min_digits: int = 1
    max_digits: int = 1
    # Operators to draw from: any of "+", "-", "*".
    operations: Sequence[str] = ("+",)
    # Operands per problem.
    num_operands: int = 2
    # Whether a problem may have a negative answer (only subtraction can produce one); when
    # False such problems are redrawn.
    allow_negative: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "operations", tuple(self.operations))
        if not 1 <= self.min_digits <= self.max_digits:
            raise ValueError(
                f"need 1 <= min_digits <= max_digits, got {self.min_digits}, {self.max_digits}"
            )
        if not self.operations or not set(self.operations) <= set(OPERATIONS):
            raise ValueError(
                f"operations must be a non-empty subset of {OPERATIONS}, "
                f"got {list(self.operations)}"
            )
        if len(set(self.operations)) != len(self.operations):
            raise ValueError(f"operations has duplicates: {list(self.operations)}")
        if self.num_operands < 2:
            raise ValueError(f"num_operands must be at least 2, got {self.num_operands}")

    def operand_range(self, digits: int) -> range:
        """The operand values with ``digits`` digits."""
        return range(0 if digits == 1 else 10 ** (digits - 1), 10**digits)

    def operand_values(self) -> range:
        """Every operand value, over all allowed digit counts."""
        return range(self.operand_range(self.min_digits)[0], 10**self.max_digits)

    def num_problems(self) -> int:
        """Number of distinct questions, counting those a sign filter would reject."""
        num_values = len(self.operand_values())
        return num_values**self.num_operands * len(self.operations) ** (self.num_operands - 1)

    def _row(self, operands: Sequence[int], operators: Sequence[str]) -> dict[str, str] | None:
        answer = evaluate(operands, operators)
        if answer < 0 and not self.allow_negative:
            return None
        return {"question": format_question(operands, operators), "answer": str(answer)}

    def sample(self, rng: random.Random) -> dict[str, str]:
        """One problem drawn with ``rng``."""
        for _ in range(MAX_DRAWS_PER_PROBLEM):
            operands = [
                rng.choice(self.operand_range(rng.randint(self.min_digits, self.max_digits)))
                for _ in range(self.num_operands)
            ]
            operators = [rng.choice(self.operations) for _ in range(self.num_operands - 1)]
            row = self._row(operands, operators)
            if row is not None:
                return row
        raise ValueError(
            f"{self} almost never has a non-negative answer; set allow_negative=True or use "
            "fewer subtractions"
        )

    def generate(self, num_problems: int, seed: int) -> list[dict[str, str]]:
        """``num_problems`` independent draws (repeats possible), deterministic by ``seed``."""
        rng = random.Random(seed)
        return [self.sample(rng) for _ in range(num_problems)]

    def enumerate_problems(self) -> list[dict[str, str]]:
        """Every distinct problem the task can produce, in a fixed order (small spaces only)."""
        if self.num_problems() > ENUMERATION_LIMIT:
            raise ValueError(
                f"{self.num_problems()} problems are too many to enumerate (limit "
                f"{ENUMERATION_LIMIT})"
            )
        rows = []
        for operands in itertools.product(self.operand_values(), repeat=self.num_operands):
            for operators in itertools.product(self.operations, repeat=self.num_operands - 1):
                row = self._row(operands, operators)
                if row is not None:
                    rows.append(row)
        return rows


def _draw_train(pool: list[dict[str, str]], num_train: int, rng: random.Random) -> list[dict]:
    """``num_train`` rows from ``pool``: without repeats while it lasts, then in full passes."""
    rows: list[dict[str, str]] = []
    while len(rows) < num_train:
        rows.extend(rng.sample(pool, min(len(pool), num_train - len(rows))))
    return rows


def make_arithmetic_splits(
    num_train: int, num_val: int, seed: int, **knobs: Any
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Training rows and held-out validation rows that share no question.

    ``knobs`` are ``ArithmeticTask`` fields. Validation questions are distinct. A small problem
    space (at most ``ENUMERATION_LIMIT`` problems) is enumerated and shuffled, the first
    ``num_val`` problems are held out and the training rows are drawn from the rest (repeating
    problems only once all have been used). A larger space is sampled, training draws that hit a
    validation question being redrawn. Raises ValueError when ``num_val`` distinct held-out
    problems (plus at least one training problem) do not exist.
    """
    if num_train < 0 or num_val < 0:
        raise ValueError(f"split sizes must be non-negative, got {num_train}, {num_val}")
    task = ArithmeticTask(**knobs)
    rng = random.Random(seed)
    if task.num_problems() <= ENUMERATION_LIMIT:
        problems = task.enumerate_problems()
        available = len(problems) - (1 if num_train > 0 else 0)
        if num_val > available:
            raise ValueError(
                f"num_val={num_val} is too large: the task has {len(problems)} distinct problems"
                + (", and at least one must be left for training" if num_train > 0 else "")
                + f" ({task})"
            )
        rng.shuffle(problems)
        return _draw_train(problems[num_val:], num_train, rng), problems[:num_val]

    if num_val > task.num_problems() // 2:
        raise ValueError(
            f"num_val={num_val} is too large for sampling distinct problems from a space of "
            f"{task.num_problems()} ({task}); hold out at most half of it"
        )
    val: dict[str, dict[str, str]] = {}
    draws = 0
    while len(val) < num_val:
        if draws == MAX_DRAWS_PER_PROBLEM * num_val:
            raise ValueError(f"could not draw {num_val} distinct problems from {task}")
        draws += 1
        row = task.sample(rng)
        val.setdefault(row["question"], row)
    train: list[dict[str, str]] = []
    draws = 0
    while len(train) < num_train:
        if draws == MAX_DRAWS_PER_PROBLEM * num_train:
            raise ValueError(
                f"could not draw {num_train} training problems outside the held-out set"
            )
        draws += 1
        row = task.sample(rng)
        if row["question"] not in val:
            train.append(row)
    return train, list(val.values())
