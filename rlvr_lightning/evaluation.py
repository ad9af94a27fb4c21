"""Sampling metrics over ``n`` scored completions per problem: avg@n, pass@k and maj@k.

* ``avg@n``: the mean correctness of all samples (the unbiased pass@1 estimate, averaged over
  problems).
* ``pass@k``: the probability that at least one of ``k`` samples drawn without replacement from
  the ``n`` is correct, by the unbiased estimator of Chen et al. 2021 ("Evaluating Large
  Language Models Trained on Code", eq. 1): ``1 - C(n - c, k) / C(n, k)`` for ``c`` correct.
* ``maj@k``: whether the most frequent answer among the first ``k`` samples is correct
  (self-consistency, Wang et al. 2023).

Pure functions: no model, no I/O, so the validation loop and ``evaluate`` share them.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct (Chen et al. 2021, eq. 1).

    ``1 - C(n - c, k) / C(n, k)``, computed as ``1 - prod_{i = n - c + 1}^{n} (1 - k / i)``,
    which stays finite where the binomials overflow a float. Exactly 1 when ``n - c < k``
    (every draw of ``k`` contains a correct sample).
    """
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:
        return 1.0
    none_correct = 1.0
    for i in range(n - c + 1, n + 1):
        none_correct *= 1.0 - k / i
    return 1.0 - none_correct


def avg_at_k(correct: Sequence[bool | float]) -> float:
    """avg@k: the mean correctness (or reward) of one problem's ``k`` samples."""
    if not correct:
        raise ValueError("avg@k of no samples")
    return sum(float(value) for value in correct) / len(correct)


def majority_vote(
    answers: Sequence[str | None], correct: Sequence[bool]
) -> tuple[str | None, bool]:
    """maj@k of one problem: the most frequent answer and whether it is correct.

    Answers are compared as stripped strings; None (no answer extracted) does not vote. Ties go
    to the answer that appears first. The vote is correct when a completion giving the
    majority answer was judged correct (any, so one timed-out check of an otherwise correct
    answer does not flip it). No answer at all: ``(None, False)``.
    """
    if len(answers) != len(correct):
        raise ValueError(f"got {len(answers)} answers but {len(correct)} correctness flags")
    votes: Counter[str] = Counter()
    first_seen: dict[str, int] = {}
    for position, answer in enumerate(answers):
        if answer is None:
            continue
        key = answer.strip()
        votes[key] += 1
        first_seen.setdefault(key, position)
    if not votes:
        return None, False
    winner = min(votes, key=lambda key: (-votes[key], first_seen[key]))
    is_correct = any(
        flag for answer, flag in zip(answers, correct, strict=True)
        if answer is not None and answer.strip() == winner
    )
    return winner, is_correct


def default_k_values(n: int) -> list[int]:
    """Powers of two below ``n``, then ``n`` itself: 4 -> [1, 2, 4], 6 -> [1, 2, 4, 6]."""
    if n < 1:
        raise ValueError(f"need n >= 1 samples, got {n}")
    values = []
    k = 1
    while k < n:
        values.append(k)
        k *= 2
    return values + [n]


def group_by_problem(records: Iterable[Mapping[str, Any]]) -> dict[Any, list[Mapping[str, Any]]]:
    """Per-sample records grouped by ``problem_index``, each group ordered by ``sample_index``."""
    groups: dict[Any, list[Mapping[str, Any]]] = defaultdict(list)
    for record in records:
        groups[record["problem_index"]].append(record)
    return {
        problem: sorted(samples, key=lambda record: record.get("sample_index", 0))
        for problem, samples in groups.items()
    }


def summarize(
    records: Iterable[Mapping[str, Any]], k_values: Sequence[int] | None = None
) -> dict[str, float]:
    """Benchmark metrics from per-sample records, averaged over problems.

    Each record has ``problem_index``, ``sample_index``, ``correct`` (bool) and, for maj@k,
    ``extracted`` (the answer, or None). Every problem needs the same number ``n`` of samples.
    ``k_values`` defaults to ``default_k_values(n)``.

    Returns ``avg@n``; ``pass@k`` for every k (pass@1 equals avg@n); ``maj@k`` for every k >= 2,
    voting over each problem's first ``k`` samples; and ``num_problems``, ``n_samples``.
    """
    groups = group_by_problem(records)
    if not groups:
        raise ValueError("no records to summarize")
    sizes = {len(samples) for samples in groups.values()}
    if len(sizes) != 1:
        raise ValueError(f"problems have different sample counts {sorted(sizes)}; need one n")
    n = sizes.pop()
    k_values = sorted(set(k_values or default_k_values(n)))
    if k_values[0] < 1 or k_values[-1] > n:
        raise ValueError(f"k values {k_values} must lie in [1, n={n}]")
    flags = [[bool(sample["correct"]) for sample in samples] for samples in groups.values()]
    num_problems = len(flags)
    metrics: dict[str, float] = {f"avg@{n}": sum(map(avg_at_k, flags)) / num_problems}
    for k in k_values:
        metrics[f"pass@{k}"] = sum(pass_at_k(n, sum(f), k) for f in flags) / num_problems
    for k in k_values:
        if k < 2:
            continue
        votes = [
            majority_vote([s.get("extracted") for s in samples[:k]], f[:k])[1]
            for samples, f in zip(groups.values(), flags, strict=True)
        ]
        metrics[f"maj@{k}"] = sum(votes) / num_problems
    metrics["num_problems"] = float(num_problems)
    metrics["n_samples"] = float(n)
    return metrics
