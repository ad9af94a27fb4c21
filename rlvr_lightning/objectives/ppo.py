"""PPO-clip family: PPO, GRPO, DAPO, Dr. GRPO (docs/algorithms.md sections 2.1 to 2.4).

They share one per-token loss, the PPO clipped surrogate with separate ``eps_low`` and
``eps_high`` (clip-higher when ``eps_high > eps_low``) and optional dual clip; they differ in
aggregation, advantage estimator and extras, which their configs set.
"""

from __future__ import annotations

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


def clip_events(
    ratio: torch.Tensor, advantages: torch.Tensor, eps_low: torch.Tensor, eps_high: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sign-split clip events (section 2.1): low = A<0 and r<1-eps_low; high = A>0 and r>1+eps_high.

    A > 0 with r < 1-eps_low and A < 0 with r > 1+eps_high are not clipped: there PPO's min
    keeps the unclipped, pessimistic term.
    """
    low = (advantages < 0) & (ratio < 1.0 - eps_low)
    high = (advantages > 0) & (ratio > 1.0 + eps_high)
    return low, high


def ratio_metrics(
    batch: PolicyBatch, ratio: torch.Tensor, eps_low: torch.Tensor, eps_high: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Metrics every ratio-based objective logs (section 5)."""
    mask = batch.mask
    valid = mask.bool()
    ratio_max = masked_max(ratio.detach(), valid)
    return {
        "ratio_mean": masked_mean(ratio.detach(), mask),
        "ratio_max": ratio_max,
        "approx_kl_old": masked_mean((batch.old_logp - batch.logp).detach(), mask),
        "eps_low_in_force": masked_mean(eps_low, mask),
        "eps_high_in_force": masked_mean(eps_high, mask),
    }


def apply_dual_clip(
    per_token: torch.Tensor,
    advantages: torch.Tensor,
    ratio: torch.Tensor,
    dual_clip: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dual clip (section 2.1): for A < 0, ``l = min(l, -c*A)``; returns (loss, event mask)."""
    if dual_clip is None:
        return per_token, torch.zeros_like(advantages, dtype=torch.bool)
    if dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (got {dual_clip}); set it to null to turn it off")
    cap = -dual_clip * advantages
    event = (advantages < 0) & (ratio > dual_clip)
    capped = torch.where(event, cap, per_token)
    return capped, event


def ppo_clip_terms(batch: PolicyBatch, control: ControlState) -> ObjectiveTerms:
    """``l = -min(r*A, clip(r, 1-E-, 1+E+)*A)``, then dual clip; bounds per token, detached."""
    ratio = log_ratio(batch).exp()
    advantages = batch.advantages
    eps_low, eps_high = control.clip_bounds(batch.old_logp)
    clipped_ratio = torch.maximum(torch.minimum(ratio, 1.0 + eps_high), 1.0 - eps_low)
    per_token = torch.maximum(-advantages * ratio, -advantages * clipped_ratio)
    per_token, dual = apply_dual_clip(per_token, advantages, ratio, control.dual_clip)
    low, high = clip_events(ratio, advantages, eps_low, eps_high)
    mask = batch.mask
    metrics = ratio_metrics(batch, ratio, eps_low, eps_high)
    metrics.update(
        clip_low_fraction=masked_mean(low.float(), mask),
        clip_high_fraction=masked_mean(high.float(), mask),
        dual_clip_fraction=masked_mean(dual.float(), mask),
    )
    return ObjectiveTerms(per_token, metrics)


@register_objective("ppo", aggregation="token-mean")
def ppo(batch: PolicyBatch, control: ControlState, params: ObjectiveParams) -> ObjectiveTerms:
    """PPO clip with separate eps_low / eps_high and optional dual clip (docs/algorithms.md 2.1).

    Gradient ``d l/d logp = -A*r`` except 0 on clip-low (A<0, r<1-eps_low), clip-high
    (A>0, r>1+eps_high) and dual-clip (A<0, r>c) events.
    """
    return ppo_clip_terms(batch, control)


@register_objective("grpo", aggregation="seq-mean-token-mean")
def grpo(batch: PolicyBatch, control: ControlState, params: ObjectiveParams) -> ObjectiveTerms:
    """GRPO (arXiv 2402.03300): PPO clip, eps 0.2, seq-mean-token-mean, optional k3 KL."""
    return ppo_clip_terms(batch, control)


@register_objective("dapo", aggregation="token-mean")
def dapo(batch: PolicyBatch, control: ControlState, params: ObjectiveParams) -> ObjectiveTerms:
    """DAPO (arXiv 2503.14476): clip-higher (0.2 / 0.28) with token-mean aggregation.

    Dynamic sampling and overlong shaping act on the rollout, not here (see the trainer).
    """
    return ppo_clip_terms(batch, control)


@register_objective("dr_grpo", aggregation="seq-mean-token-sum-norm")
def dr_grpo(batch: PolicyBatch, control: ControlState, params: ObjectiveParams) -> ObjectiveTerms:
    """Dr. GRPO (arXiv 2503.20783): PPO clip, advantages without std normalisation,
    ``seq-mean-token-sum-norm`` aggregation by the generation budget."""
    return ppo_clip_terms(batch, control)
