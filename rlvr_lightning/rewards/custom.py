"""A user's own reward: any importable callable ``(completions, answers) -> list[float]``.

Selected with ``reward.function=package.module.function`` (or ``package.module:function``), it
is called like a TRL reward function: with the batch's completions and their reference answers
(two lists of strings, in the same order), and returns one score per completion. The scores
are the rewards, as they are. ``RewardFunction`` (``reward.py``) calls it in the trainer's
process and still runs the configured verifier (``reward.method``) for ``correct``.

Problems surface early and name the setting: a path that does not import, a non-callable, a
callable that cannot take ``(completions, answers)``, or a return value that is not one finite
number per completion raise ``UserRewardError``.
"""

from __future__ import annotations

import importlib
import inspect
import math
import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

FUNCTION_KEY = "reward.function"
EXPECTED = (
    "a dotted path package.module.function (or package.module:function) to a callable "
    "(completions: list[str], answers: list[str]) -> list[float], or null for the built-in "
    "verifier"
)
_DOTTED_NAME = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")

UserReward = Callable[[list[str], list[str]], Sequence[float]]


class UserRewardError(ValueError):
    """``reward.function`` is not a usable reward callable, or returned something unusable."""


def describe(function: str | Callable[..., Any]) -> str:
    """How messages name the function: its dotted path, or ``module.qualname`` of a callable."""
    if isinstance(function, str) or not callable(function):
        return function if isinstance(function, str) else repr(function)
    module = getattr(function, "__module__", None)
    name = getattr(function, "__qualname__", None) or type(function).__qualname__
    return f"{module}.{name}" if module else name


def _candidates(path: str) -> list[tuple[str, str]]:
    """``(module, attribute)`` splits of ``path``, the longest module first."""
    if ":" in path:
        module_name, _, attribute = path.partition(":")
        return [(module_name, attribute)]
    parts = path.split(".")
    return [(".".join(parts[:i]), ".".join(parts[i:])) for i in range(len(parts) - 1, 0, -1)]


def load_reward_function(function: str | Callable[..., Any]) -> UserReward:
    """The callable that ``function`` names (a callable is checked and returned as it is).

    Raises ``UserRewardError`` naming ``reward.function``, its value and what it must be.
    """
    if callable(function):
        _check_signature(function, describe(function))
        return function
    path = function.strip() if isinstance(function, str) else ""
    splits = _candidates(path)
    if not splits or not all(_DOTTED_NAME.fullmatch(part) for split in splits for part in split):
        raise UserRewardError(f"{FUNCTION_KEY}={function!r} must be {EXPECTED}")
    module, module_name, attribute = _import_module(path, splits)
    target: Any = module
    owner = module_name
    for name in attribute.split("."):
        try:
            target = getattr(target, name)
        except AttributeError:
            raise UserRewardError(
                f"{FUNCTION_KEY}={path!r}: {owner!r} has no attribute {name!r} (and there is no "
                f"module {f'{owner}.{name}'!r}); it must be {EXPECTED}"
            ) from None
        owner = f"{owner}.{name}"
    if not callable(target):
        raise UserRewardError(
            f"{FUNCTION_KEY}={path!r} is a {type(target).__name__}, not a callable; "
            f"it must be {EXPECTED}"
        )
    _check_signature(target, path)
    return target


def _import_module(path: str, splits: list[tuple[str, str]]) -> tuple[Any, str, str]:
    """The first of ``splits`` whose module imports: ``(module, module name, attribute)``."""
    for module_name, attribute in splits:
        try:
            return importlib.import_module(module_name), module_name, attribute
        except ModuleNotFoundError as error:
            missing = error.name or ""
            if module_name == missing or module_name.startswith(missing + "."):
                continue  # this prefix is not a module: try a shorter one
            raise UserRewardError(
                f"{FUNCTION_KEY}={path!r}: importing {module_name!r} failed: {error}"
            ) from error
        except Exception as error:  # the user's module raised while importing
            raise UserRewardError(
                f"{FUNCTION_KEY}={path!r}: importing {module_name!r} raised "
                f"{type(error).__name__}: {error}"
            ) from error
    raise UserRewardError(
        f"{FUNCTION_KEY}={path!r}: no module of that path can be imported (install its "
        f"package, or put its folder on PYTHONPATH); it must be {EXPECTED}"
    )


def _check_signature(function: Callable[..., Any], name: str) -> None:
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):  # some builtins have no signature to check
        return
    try:
        signature.bind(["completion"], ["answer"])
    except TypeError as error:
        raise UserRewardError(
            f"{FUNCTION_KEY}={name!r} cannot be called as function(completions, answers) "
            f"({error}); it must be {EXPECTED}"
        ) from None


def check_scores(scores: Any, count: int, name: str) -> list[float]:
    """``scores`` as floats, or ``UserRewardError`` unless it is one finite number per completion.

    Lists and tuples pass, and so do NumPy arrays and torch tensors (through ``tolist``); bools
    count as 0 and 1.
    """
    if hasattr(scores, "tolist") and not isinstance(scores, (str, bytes)):
        scores = scores.tolist()
    if isinstance(scores, (str, bytes, Mapping)) or not isinstance(scores, Sequence):
        raise UserRewardError(
            f"{FUNCTION_KEY}={name!r} returned a {type(scores).__name__}; it must return a list "
            f"of floats, one score per completion ({count} here)"
        )
    if len(scores) != count:
        raise UserRewardError(
            f"{FUNCTION_KEY}={name!r} returned {len(scores)} scores for {count} completions; "
            f"it must return a list of floats, one score per completion"
        )
    checked = []
    for position, score in enumerate(scores):
        if not isinstance(score, numbers.Real) or not math.isfinite(score):
            raise UserRewardError(
                f"{FUNCTION_KEY}={name!r} returned {score!r} for completion {position}; "
                f"each score must be a finite number (float, int or bool)"
            )
        checked.append(float(score))
    return checked


def call_reward_function(
    function: UserReward, name: str, completions: Sequence[str], answers: Sequence[str]
) -> list[float]:
    """Call ``function(completions, answers)`` (fresh lists) and check what it returns.

    It runs in this process, on this thread, without a time limit. An exception it raises
    propagates (a bug in a reward should stop the run, not train on zeros), with a note naming
    ``reward.function`` where Python supports notes.
    """
    try:
        scores = function(list(completions), list(answers))
    except Exception as error:
        if hasattr(error, "add_note"):  # Python >= 3.11
            error.add_note(f"raised by the user reward {FUNCTION_KEY}={name!r}")
        raise
    return check_scores(scores, len(completions), name)
