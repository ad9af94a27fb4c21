"""Verifiable rewards: extract a completion's final answer and check it against the reference.

The package, by concern:

* ``extraction``: the answer a completion commits to (``\\boxed{}``, the last number, ...).
* ``verification``: the equivalence checks, ``numeric`` (exact rational comparison, for GSM8K
  and the arithmetic task) and ``math_verify`` (symbolic comparison of LaTeX with SymPy, for
  MATH500 / AIME / AMC style answers).
* ``sandbox``: runs a batch of checks so that no completion can break a training step: a check
  that raises or overruns ``timeout_seconds`` scores as incorrect and is counted; math_verify
  checks run in worker processes that are killed and replaced when a check hangs.
* ``custom``: a user's own reward callable (``reward.function``).
* ``reward``: ``RewardFunction``, which puts these together, and its ``RewardResult``.

The names below are the public interface; import them from ``rlvr_lightning.rewards``.
"""

from rlvr_lightning.rewards.custom import UserRewardError, load_reward_function
from rlvr_lightning.rewards.extraction import (
    ANSWER_MODES,
    extract_answer,
    extract_boxed,
    extract_last_number,
    parse_gsm8k_answer,
)
from rlvr_lightning.rewards.reward import RewardFunction, RewardResult
from rlvr_lightning.rewards.verification import METHODS, math_verify_equal, numeric_equal

__all__ = [
    "ANSWER_MODES",
    "METHODS",
    "RewardFunction",
    "RewardResult",
    "UserRewardError",
    "extract_answer",
    "extract_boxed",
    "extract_last_number",
    "load_reward_function",
    "math_verify_equal",
    "numeric_equal",
    "parse_gsm8k_answer",
]
