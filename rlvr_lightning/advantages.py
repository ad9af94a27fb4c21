"""Advantage estimators in a registry (docs/algorithms.md section 1) and DAPO's reward shaping (2.3).

An estimator maps one step's rewards, laid out ``[num_groups, G]``, to one advantage per
response of the same shape; ``@register_advantage("name")`` makes it selectable as
``advantage=name`` (with ``conf/advantage/<name>.yaml``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

AdvantageEstimator = Callable[[torch.Tensor], torch.Tensor]
ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {}


def register_advantage(name: str) -> Callable[[AdvantageEstimator], AdvantageEstimator]:
    """Decorator: register ``fn(grouped_rewards [num_groups, G]) -> advantages`` under ``name``."""

    def add(fn: AdvantageEstimator) -> AdvantageEstimator:
        if name in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"advantage estimator {name!r} is registered twice")
        ADVANTAGE_ESTIMATORS[name] = fn
        return fn

    return add


@register_advantage("grpo")
def grpo_advantage(grouped: torch.Tensor) -> torch.Tensor:
    """``(R_i - mean_j R_j) / (std_j R_j + 1e-6)`` with the unbiased std (needs G >= 2)."""
    if grouped.shape[-1] < 2:
        raise ValueError("the grpo advantage needs group_size >= 2 (std of a group of one)")
    centred = grouped - grouped.mean(-1, keepdim=True)
    return centred / (grouped.std(-1, unbiased=True, keepdim=True) + 1e-6)


@register_advantage("dr_grpo")
def dr_grpo_advantage(grouped: torch.Tensor) -> torch.Tensor:
    """Dr. GRPO (arXiv 2503.20783): ``R_i - mean_j R_j``, no division by the group's std."""
    return grouped - grouped.mean(-1, keepdim=True)


def group_advantages(rewards: torch.Tensor, group_size: int, estimator: str = "grpo") -> torch.Tensor:
    """Per-response advantage from rewards laid out group by group (``[num_groups * G]``)."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(
            f"unknown advantage estimator {estimator!r}; use one of {', '.join(ADVANTAGE_ESTIMATORS)}"
        )
    return ADVANTAGE_ESTIMATORS[estimator](rewards.float().view(-1, group_size)).reshape(-1)


def overlong_penalty(lengths: torch.Tensor, max_length: int, buffer_tokens: int) -> torch.Tensor:
    """DAPO soft overlong punishment: 0 up to ``L_max - L_cache``, then linear to -1 at ``L_max``,
    and -1 beyond (arXiv 2503.14476, eq. 13)."""
    if buffer_tokens <= 0:
        return torch.zeros_like(lengths, dtype=torch.float32)
    expected = max_length - buffer_tokens
    lengths = lengths.float()
    ramp = (expected - lengths) / buffer_tokens
    penalty = torch.where(lengths <= expected, torch.zeros_like(lengths), ramp)
    return torch.where(lengths > max_length, torch.full_like(lengths, -1.0), penalty)


def constant_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[num_groups]`` bool: groups whose rewards are all equal (no learning signal)."""
    grouped = rewards.view(-1, group_size)
    return (grouped == grouped[:, :1]).all(-1)
