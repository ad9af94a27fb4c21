"""DPPO: a trust region on the sampled token's probability, not on the ratio (Binary-TV, Binary-KL).

From Rethinking the Trust Region in LLM Reinforcement Learning (arXiv 2602.04879); see
docs/algorithms.md, DPPO section.

Anchor: the paper anchors both the mask and the ratio on the rollout policy mu (the inference
engine's log-probs). This objective anchors on ``batch.old_logp``: that is mu when the trainer
runs in bypass mode (``logp_old := logp_rollout``), and the trainer's pre-update pass pi_old
otherwise, the documented fallback.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from rlvr_lightning.control import ControlState
from rlvr_lightning.objectives.base import (
    ObjectiveParams,
    ObjectiveTerms,
    PolicyBatch,
    log_ratio,
    masked_max,
    masked_mean,
    register_objective,
)

VARIANTS = ("tv", "kl")
# Default trust-region size per variant, the same on both sides (verl's DPPO example).
DEFAULT_DELTA = {"tv": 0.15, "kl": 0.05}
# Cap C on the importance weight min(r, C) (separate from the dual-clip constant).
RATIO_CAP = 20.0
# Keeps log(1 - p) finite at p = 1 in the binary KL (as in the paper's code).
KL_EPS = 1e-8


@dataclass(frozen=True)
class DppoSettings:
    variant: str
    delta_low: float
    delta_high: float
    ratio_cap: float


def dppo_settings(options: dict[str, Any]) -> DppoSettings:
    """Read and check DPPO's ``objective.options``; a null delta takes the variant's default."""
    variant = options.get("variant", "tv")
    if variant not in VARIANTS:
        raise ValueError(
            f"objective.options.variant={variant!r} is not a DPPO variant; choose one of "
            f"{', '.join(repr(v) for v in VARIANTS)}"
        )
    deltas = []
    for key in ("dppo_delta_low", "dppo_delta_high"):
        value = options.get(key)
        value = DEFAULT_DELTA[variant] if value is None else float(value)
        if not value >= 0:
            raise ValueError(
                f"objective.options.{key}={value} must be >= 0 (or null for the default)"
            )
        deltas.append(value)
    ratio_cap = float(options.get("dppo_ratio_cap", RATIO_CAP))
    if not ratio_cap > 0:
        raise ValueError(f"objective.options.dppo_ratio_cap={ratio_cap} must be > 0")
    return DppoSettings(variant, deltas[0], deltas[1], ratio_cap)


def binary_divergence(
    variant: str, logp: torch.Tensor, anchor_logp: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(D, p, p_mu)`` of the sampled token, detached.

    TV: ``D = p - p_mu`` (signed). KL: the KL between Bernoulli(p_mu) and Bernoulli(p),
    ``p_mu log(p_mu/p) + (1-p_mu) log((1-p_mu+1e-8)/(1-p+1e-8))``, always >= 0.
    """
    logp, anchor_logp = logp.detach(), anchor_logp.detach()
    p, p_mu = logp.exp(), anchor_logp.exp()
    if variant == "tv":
        return p - p_mu, p, p_mu
    divergence = p_mu * (anchor_logp - logp) + (1.0 - p_mu) * (
        torch.log(1.0 - p_mu + KL_EPS) - torch.log(1.0 - p + KL_EPS)
    )
    return divergence, p, p_mu


def dppo_terms(batch: PolicyBatch, settings: DppoSettings) -> ObjectiveTerms:
    """Per-token DPPO loss: ``l = -A * k * sg(min(r, C) / r) * r``.

    ``k = 0`` on a masked token: TV masks A > 0 with ``p - p_mu > delta_high`` and A < 0 with
    ``p_mu - p > delta_low``; KL masks A > 0 with ``p > p_mu`` and ``D > delta_high`` and
    A < 0 with ``p < p_mu`` and ``D > delta_low``. The value is ``-A*k*min(r, C)`` and the
    gradient ``g = -A*min(r, C)*k``: unclipped inside the trust region, whatever the ratio
    (up to C), and 0 outside it.
    """
    advantages = batch.advantages
    divergence, p, p_mu = binary_divergence(settings.variant, batch.logp, batch.old_logp)
    if settings.variant == "tv":
        masked_high = (advantages > 0) & (divergence > settings.delta_high)
        masked_low = (advantages < 0) & (-divergence > settings.delta_low)
    else:
        masked_high = (advantages > 0) & (p > p_mu) & (divergence > settings.delta_high)
        masked_low = (advantages < 0) & (p < p_mu) & (divergence > settings.delta_low)
    keep = ~(masked_high | masked_low)

    ratio = log_ratio(batch).exp()
    truncated = ratio.detach() > settings.ratio_cap
    # sg(min(r, C) / r), written without a division by a tiny r.
    scale = torch.where(truncated, settings.ratio_cap / ratio.detach(), torch.ones_like(ratio))
    per_token = torch.where(keep, -advantages * scale * ratio, torch.zeros_like(ratio))

    mask = batch.mask
    valid = mask.bool()
    # The metric reports the divergence itself: |p - p_mu| for TV, D for KL.
    size = divergence.abs() if settings.variant == "tv" else divergence
    ratio_max = masked_max(ratio.detach(), valid)
    metrics = {
        "dppo_masked_high_fraction": masked_mean(masked_high.float(), mask),
        "dppo_masked_low_fraction": masked_mean(masked_low.float(), mask),
        "dppo_divergence_mean": masked_mean(size, mask),
        # Kept tokens whose weight min(r, C) was truncated at C.
        "dppo_ratio_truncated_fraction": masked_mean((truncated & keep).float(), mask),
        "ratio_mean": masked_mean(ratio.detach(), mask),
        "ratio_max": ratio_max,
        "approx_kl_old": masked_mean((batch.old_logp - batch.logp).detach(), mask),
        "dppo_delta_low_in_force": ratio.new_tensor(settings.delta_low),
        "dppo_delta_high_in_force": ratio.new_tensor(settings.delta_high),
    }
    return ObjectiveTerms(per_token, metrics)


@register_objective("dppo", aggregation="seq-mean-token-sum-norm")
def dppo(batch: PolicyBatch, control: ControlState, params: ObjectiveParams) -> ObjectiveTerms:
    """DPPO (arXiv 2602.04879): mask tokens whose probability left a binary trust region.

    ``objective.options``: ``variant`` ``tv`` (Binary-TV, default) or ``kl`` (Binary-KL);
    ``dppo_delta_low`` / ``dppo_delta_high`` (null: 0.15 for TV, 0.05 for KL);
    ``dppo_ratio_cap`` C (default 20). See ``dppo_terms`` for the loss and its gradient.
    ``control`` (eps, dual clip, betas) is not read. Aggregation seq-mean-token-sum-norm, the
    setting of the example the default deltas come from. The anchor is ``batch.old_logp``
    (see the module docstring).
    """
    return dppo_terms(batch, dppo_settings(params.options))
