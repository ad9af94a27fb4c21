"""Group-relative advantages (ALGORITHMS.md section 1) and DAPO's reward shaping (2.3)."""

from __future__ import annotations

import torch

ADVANTAGE_ESTIMATORS = ("grpo", "dr_grpo")


def group_advantages(rewards: torch.Tensor, group_size: int, estimator: str = "grpo") -> torch.Tensor:
    """Per-response advantage from rewards laid out group by group (``[num_groups * G]``).

    ``grpo``: ``(R_i - mean_j R_j) / (std_j R_j + 1e-6)`` with the unbiased std (needs G >= 2).
    ``dr_grpo`` (arXiv 2503.20783): ``R_i - mean_j R_j``.
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.float().view(-1, group_size)
    centred = grouped - grouped.mean(-1, keepdim=True)
    if estimator == "dr_grpo":
        return centred.view(-1)
    if estimator == "grpo":
        if group_size < 2:
            raise ValueError("the grpo advantage needs group_size >= 2 (std of a group of one)")
        return (centred / (grouped.std(-1, unbiased=True, keepdim=True) + 1e-6)).view(-1)
    raise ValueError(f"unknown advantage estimator {estimator!r}; use one of {ADVANTAGE_ESTIMATORS}")


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
