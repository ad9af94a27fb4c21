"""A reward of your own: correctness, minus a small penalty for long completions.

Select it from the config (run from the repository root, so that ``examples`` imports)::

    python -m rlvr_lightning.train reward.function=examples.length_penalty_reward.length_penalty_reward

Any importable callable works the same way. Like a TRL reward function, it gets the batch's
completions and their reference answers (two lists of strings, in the same order) and returns
one float per completion; those floats are the rewards. The logged accuracy (``reward/accuracy``,
``val/accuracy``, pass@k) stays the verdict of ``reward.method``.

Here a correct answer (read with the project's own extraction and numeric check) earns 1.0,
and every completion loses 0.001 per character, at most 0.2: among correct answers the shorter
ones score higher, and a wrong answer never outscores a right one.
"""

from __future__ import annotations

from rlvr_lightning.rewards import extract_answer, numeric_equal

PENALTY_PER_CHARACTER = 0.001
MAX_PENALTY = 0.2


def length_penalty_reward(completions: list[str], answers: list[str]) -> list[float]:
    """1.0 for a correct final answer, else 0.0, minus min(0.2, 0.001 * characters)."""
    scores = []
    for completion, answer in zip(completions, answers, strict=True):
        extracted = extract_answer(completion, mode="boxed_or_last")
        correct = extracted is not None and numeric_equal(extracted, answer)
        penalty = min(MAX_PENALTY, PENALTY_PER_CHARACTER * len(completion))
        scores.append((1.0 if correct else 0.0) - penalty)
    return scores
