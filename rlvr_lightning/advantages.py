"""Advantage estimators in a registry (docs/algorithms.md section 1) and DAPO's reward shaping (2.3).

An estimator maps one step's rewards, laid out ``[num_groups, G]``, to one advantage per
response of the same shape; ``@register_advantage("name")`` makes it selectable as
``advantage=name`` (with ``conf/advantage/<name>.yaml``). Its keyword-only parameters are its
options (``advantage.<option>=...``; one without a default must be set), and a parameter named
``context`` receives an ``AdvantageContext``: the data-parallel sum (for batch statistics) and
a dict for the estimator's own ``reward/`` scalars.

Built in: ``grpo`` (with ``scale_rewards: group | batch | none``, A9 of the spec), ``dr_grpo``
(= grpo with ``scale_rewards=none``), ``rloo``, ``pass_at_k`` (arXiv 2508.10751) and
``max_leave_one_out`` (arXiv 2503.19595; verl/EasyR1 ``grpo_passk``). See
docs/pending/advantages_kl.md.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import torch

AdvantageEstimator = Callable[..., torch.Tensor]
ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {}
# name -> {option: default}; REQUIRED marks an option without a default.
ADVANTAGE_OPTIONS: dict[str, dict[str, Any]] = {}
REQUIRED = inspect.Parameter.empty
STD_EPS = 1e-6
SCALE_REWARDS = ("group", "batch", "none")
# Rules for option values, shared by every estimator that takes an option of that name:
# option -> (test, what it must be).
OPTION_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "scale_rewards": (lambda v: v in SCALE_REWARDS, f"one of {', '.join(SCALE_REWARDS)}"),
    "k": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1"),
    "norm_by_std": (lambda v: isinstance(v, bool), "true or false"),
}


def _sum_here(values: torch.Tensor) -> torch.Tensor:
    return values


@dataclass
class AdvantageContext:
    """What an estimator may use beyond its rewards and options."""

    # Sum of a tensor over data-parallel ranks (the identity in one process): statistics of the
    # whole train batch (``scale_rewards=batch``).
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] = _sum_here
    # The estimator's own scalars, logged as given (``reward/...``).
    metrics: dict[str, float] = field(default_factory=dict)


def register_advantage(name: str) -> Callable[[AdvantageEstimator], AdvantageEstimator]:
    """Decorator: register ``fn(grouped_rewards [num_groups, G], *, <options>, context=None)
    -> advantages`` under ``name``; its keyword-only parameters (other than ``context``) are the
    options it reads, with their defaults."""

    def add(fn: AdvantageEstimator) -> AdvantageEstimator:
        if name in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"advantage estimator {name!r} is registered twice")
        parameters = inspect.signature(fn).parameters.values()
        ADVANTAGE_ESTIMATORS[name] = fn
        ADVANTAGE_OPTIONS[name] = {
            p.name: p.default for p in parameters if p.kind is p.KEYWORD_ONLY and p.name != "context"
        }
        return fn

    return add


def advantage_options(name: str) -> dict[str, Any]:
    """The options estimator ``name`` reads, with their defaults (``REQUIRED``: none)."""
    if name not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {name!r}; use one of {', '.join(ADVANTAGE_ESTIMATORS)}")
    return dict(ADVANTAGE_OPTIONS[name])


def check_advantage_options(name: str, options: Mapping[str, Any] | None, group_size: int | None = None) -> None:
    """Raise ValueError for an option estimator ``name`` does not read, a required one that is
    missing, or a value it does not accept (``k`` must also be <= ``group_size``)."""
    allowed = advantage_options(name)
    options = dict(options or {})
    for key in options:
        if key not in allowed:
            hint = f"allowed: {', '.join(sorted(allowed))}" if allowed else "this estimator takes no options"
            if key == "scale_rewards" and name in ("rloo", "pass_at_k", "max_leave_one_out"):
                hint += f" ({name} brings its own scaling)"
            raise ValueError(f"advantage.{key} is unknown for advantage estimator {name!r}; {hint}")
    for key, default in allowed.items():
        if key not in options and default is REQUIRED:
            raise ValueError(f"advantage={name} needs advantage.{key} (no default; e.g. advantage.{key}=4)")
        value = options.get(key, default)
        test, rule = OPTION_RULES.get(key, (lambda v: True, ""))
        if not test(value):
            raise ValueError(f"advantage.{key}={value!r} must be {rule}")
    k = options.get("k")
    if k is not None and group_size is not None and k > group_size:
        raise ValueError(f"advantage.k={k} must be <= rollout.group_size={group_size} (subsets of the group)")


def _zero_constant_groups(grouped: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """A = 0 exactly in groups whose rewards are all equal (no signal; a mean off by one ulp
    divided by a tiny std would otherwise leave noise)."""
    constant = (grouped == grouped[:, :1]).all(-1, keepdim=True)
    return torch.where(constant, torch.zeros_like(advantages), advantages)


def batch_reward_std(grouped: torch.Tensor, reduce_sum: Callable[[torch.Tensor], torch.Tensor] = _sum_here) -> float:
    """Bessel-corrected std of every reward of the train batch, over all data-parallel ranks
    (two passes: the global mean, then the squared deviations from it)."""
    flat = grouped.detach().double().reshape(-1)
    count, total = reduce_sum(torch.stack([flat.new_tensor(float(flat.numel())), flat.sum()])).tolist()
    mean = total / max(count, 1.0)
    squares = float(reduce_sum(((flat - mean) ** 2).sum().reshape(1))[0])
    return math.sqrt(squares / (count - 1)) if count > 1 else 0.0


@register_advantage("grpo")
def grpo_advantage(
    grouped: torch.Tensor, *, scale_rewards: str = "group", context: AdvantageContext | None = None
) -> torch.Tensor:
    """``(R_i - mean_g R) / (scale + 1e-6)`` (needs G >= 2), ``scale_rewards`` choosing the scale
    (spec A9; TRL ``scale_rewards``, with eps 1e-6 instead of TRL's 1e-4):

    - ``group``: the group's unbiased std (GRPO, arXiv 2402.03300; the default),
    - ``batch``: the unbiased std of every reward of the train batch, after dynamic-sampling
      filtering, over all ranks, with the group mean kept (Lite PPO, arXiv 2508.08221),
    - ``none``: no division (Dr. GRPO, arXiv 2503.20783).

    Constant-reward groups get A = 0 in every mode. Logs ``reward/std_scale``: the divisor (the
    batch std, the mean of the group stds, or 1).
    """
    if grouped.shape[-1] < 2:
        raise ValueError("the grpo advantage needs group_size >= 2 (std of a group of one)")
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"advantage.scale_rewards={scale_rewards!r} must be one of {', '.join(SCALE_REWARDS)}")
    context = context or AdvantageContext()
    centred = grouped - grouped.mean(-1, keepdim=True)
    if scale_rewards == "group":
        std = grouped.std(-1, unbiased=True, keepdim=True)
        advantages = centred / (std + STD_EPS)
        context.metrics["reward/std_scale"] = float(std.mean())
    elif scale_rewards == "batch":
        std_batch = batch_reward_std(grouped, context.reduce_sum)
        advantages = centred / (std_batch + STD_EPS)
        context.metrics["reward/std_scale"] = std_batch
    else:
        advantages = centred
        context.metrics["reward/std_scale"] = 1.0
    return _zero_constant_groups(grouped, advantages)


@register_advantage("dr_grpo")
def dr_grpo_advantage(grouped: torch.Tensor, *, context: AdvantageContext | None = None) -> torch.Tensor:
    """Dr. GRPO (arXiv 2503.20783): ``R_i - mean_j R_j``, no division by the group's std
    (``grpo`` with ``scale_rewards=none``; works for G = 1, where it is 0)."""
    context = context or AdvantageContext()
    context.metrics["reward/std_scale"] = 1.0
    return _zero_constant_groups(grouped, grouped - grouped.mean(-1, keepdim=True))


@register_advantage("rloo")
def rloo_advantage(grouped: torch.Tensor) -> torch.Tensor:
    """RLOO (arXiv 2402.14740): ``A_i = R_i - mean_{j != i} R_j = G/(G-1) * (R_i - mean_j R_j)``,
    no std. G = 1 raises, as the grpo advantage does (verl ``rloo`` gives R, SkyRL 0)."""
    size = grouped.shape[-1]
    if size < 2:
        raise ValueError("the rloo advantage needs group_size >= 2 (leave-one-out mean of a group of one)")
    advantages = size / (size - 1) * (grouped - grouped.mean(-1, keepdim=True))
    return _zero_constant_groups(grouped, advantages)


def pass_at_k_terms(size: int, correct: int, k: int) -> tuple[float, float, float]:
    """``(R_bar, A_pos, A_neg)`` of a binary group of ``size`` responses, ``correct`` of them right
    (arXiv 2508.10751, ``passk_adv.py::calc_adv``), with ``C(n, k) = 0`` for n < k:
    ``R_bar = 1 - C(N-c, k)/C(N, k)``, ``sigma = sqrt(R_bar (1 - R_bar))``,
    ``A_pos = (1 - R_bar)/(sigma + 1e-6)``,
    ``A_neg = (1 - R_bar - C(N-c-1, k-1)/C(N-1, k-1))/(sigma + 1e-6)``; 0 when c is 0 or N.
    Binomial ratios are exact fractions before the one rounding to float."""
    if not 1 <= k <= size:
        raise ValueError(f"pass@k needs 1 <= k <= group_size; got k={k}, group_size={size}")
    if correct in (0, size):
        return float(correct == size), 0.0, 0.0
    all_wrong = Fraction(math.comb(size - correct, k), math.comb(size, k))
    mean = 1 - all_wrong
    sigma = math.sqrt(float(mean * (1 - mean)))
    rest_wrong = Fraction(math.comb(size - correct - 1, k - 1), math.comb(size - 1, k - 1))
    return float(mean), float(1 - mean) / (sigma + STD_EPS), float(1 - mean - rest_wrong) / (sigma + STD_EPS)


@register_advantage("pass_at_k")
def pass_at_k_advantage(grouped: torch.Tensor, *, k: int, context: AdvantageContext | None = None) -> torch.Tensor:
    """Pass@k training (arXiv 2508.10751): each response's advantage is the exact average, over
    every k-subset containing it, of the subset's normalised max-reward advantage
    (``pass_at_k_terms``). Binary rewards only (others raise); k = 1 is GRPO with the population
    std. Logs ``reward/pass_at_k_group_mean`` (the mean R_bar)."""
    binary = (grouped == 0) | (grouped == 1)
    if not bool(binary.all()):
        raise ValueError(
            "the pass_at_k advantage needs binary rewards (0 or 1); got "
            f"{sorted({float(v) for v in grouped[~binary].tolist()})[:5]} (check reward.correct_reward, "
            "reward.incorrect_reward, reward.format_reward and sampling.overlong_buffer_tokens)"
        )
    size = grouped.shape[-1]
    advantages = torch.zeros_like(grouped)
    means = []
    for row, rewards in enumerate(grouped):
        correct = rewards.bool()
        mean, positive, negative = pass_at_k_terms(size, int(correct.sum()), int(k))
        advantages[row] = torch.where(correct, positive, negative)
        means.append(mean)
    if context is not None:
        context.metrics["reward/pass_at_k_group_mean"] = sum(means) / max(len(means), 1)
    return advantages


@register_advantage("max_leave_one_out")
def max_leave_one_out_advantage(grouped: torch.Tensor, *, norm_by_std: bool = True) -> torch.Tensor:
    """Tang et al. (arXiv 2503.19595), verl/EasyR1 ``grpo_passk``: only the group's argmax gets
    ``A = r_max - r_second_max``, divided by the group's unbiased std + 1e-6 when
    ``norm_by_std`` (verl: optional, EasyR1: always); everyone else 0. With binary rewards it is
    non-zero only when exactly one response is right. Not 2508.10751's pass@k (``pass_at_k``)."""
    if grouped.shape[-1] < 2:
        raise ValueError("the max_leave_one_out advantage needs group_size >= 2 (a second-best reward)")
    top = grouped.topk(2, dim=-1)
    gap = top.values[:, 0] - top.values[:, 1]
    if norm_by_std:
        gap = gap / (grouped.std(-1, unbiased=True) + STD_EPS)
    advantages = torch.zeros_like(grouped)
    advantages.scatter_(-1, top.indices[:, :1], gap.unsqueeze(-1))
    return advantages


def compute_advantages(
    rewards: torch.Tensor,
    group_size: int,
    estimator: str = "grpo",
    options: Mapping[str, Any] | None = None,
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] = _sum_here,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-response advantages from rewards laid out group by group (``[num_groups * G]``), with
    the scalars to log: the estimator's own, ``reward/zero_std_group_fraction`` (groups whose
    rewards are all equal) and ``reward/zero_advantage_group_fraction`` (groups whose
    advantages are all 0). ``options``: the estimator's (``advantage.<option>``)."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(
            f"unknown advantage estimator {estimator!r}; use one of {', '.join(ADVANTAGE_ESTIMATORS)}"
        )
    check_advantage_options(estimator, options, group_size)
    fn = ADVANTAGE_ESTIMATORS[estimator]
    kwargs = dict(options or {})
    context = AdvantageContext(reduce_sum=reduce_sum)
    if "context" in inspect.signature(fn).parameters:
        kwargs["context"] = context
    grouped = rewards.float().view(-1, group_size)
    advantages = fn(grouped, **kwargs)
    metrics = dict(context.metrics)
    metrics["reward/zero_std_group_fraction"] = float(constant_groups(grouped, group_size).float().mean())
    metrics["reward/zero_advantage_group_fraction"] = float((advantages == 0).all(-1).float().mean())
    return advantages.reshape(-1), metrics


def group_advantages(
    rewards: torch.Tensor, group_size: int, estimator: str = "grpo", options: Mapping[str, Any] | None = None
) -> torch.Tensor:
    """Per-response advantage from rewards laid out group by group (``[num_groups * G]``)."""
    return compute_advantages(rewards, group_size, estimator, options)[0]


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
