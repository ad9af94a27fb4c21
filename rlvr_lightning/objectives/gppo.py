"""GPPO and CE-GPPO: PPO clip that keeps a bounded gradient on clipped tokens (docs/algorithms.md 2.5).

GPPO is from Klear-Reasoner (arXiv 2508.07629); CE-GPPO (arXiv 2509.20712) adds one coefficient
per side so the entropy can be steered. Both share ``gppo_terms``.
"""

from __future__ import annotations

import torch

from rlvr_lightning.control import ControlState
from rlvr_lightning.objectives.base import (
    ObjectiveParams,
    ObjectiveTerms,
    PolicyBatch,
    log_ratio,
    masked_mean,
    register_objective,
)
from rlvr_lightning.objectives.ppo import apply_dual_clip, ratio_metrics


def gppo_terms(
    batch: PolicyBatch, control: ControlState, beta1: float, beta2: float
) -> ObjectiveTerms:
    """Per-token CE-GPPO loss with gradient coefficients ``beta1`` (left) and ``beta2`` (right).

    With ``E-, E+`` the per-token clip bounds in force (detached) and ``sg`` the stop-gradient::

        l = -beta1 * (1 - E-) * r / sg(r) * A   if A < 0 and r < 1 - E-   (left side)
        l = -beta2 * (1 + E+) * r / sg(r) * A   if A > 0 and r > 1 + E+   (right side)
        l = -r * A                              otherwise, then dual clip for A < 0

    ``r / sg(r)`` is 1 in the forward pass and has ``d/d logp = 1``, so the clipped tokens get
    the bounded gradient ``-beta * (1 -/+ E) * A`` instead of PPO's zero. The sides are picked
    with explicit masks and ``torch.where`` (section 2.5), never with tensor clamp bounds.
    """
    ratio = log_ratio(batch).exp()
    advantages = batch.advantages
    eps_low, eps_high = control.clip_bounds(batch.old_logp)

    left = (advantages < 0) & (ratio < 1.0 - eps_low)
    right = (advantages > 0) & (ratio > 1.0 + eps_high)
    # Value 1, gradient with respect to logp equal to 1: carries a bounded gradient.
    unit_ratio = ratio / ratio.detach()
    left_loss = -beta1 * (1.0 - eps_low) * unit_ratio * advantages
    right_loss = -beta2 * (1.0 + eps_high) * unit_ratio * advantages
    unclipped_loss = -ratio * advantages
    per_token = torch.where(left, left_loss, torch.where(right, right_loss, unclipped_loss))
    per_token, dual = apply_dual_clip(per_token, advantages, ratio, control.dual_clip)

    mask = batch.mask
    metrics = ratio_metrics(batch, ratio, eps_low, eps_high)
    metrics.update(
        clip_low_fraction=masked_mean(left.float(), mask),
        clip_high_fraction=masked_mean(right.float(), mask),
        dual_clip_fraction=masked_mean(dual.float(), mask),
        # Tokens of each side whose gradient survives (beta > 0), as a fraction of all tokens.
        preserved_gradient_low_fraction=masked_mean((left & (beta1 > 0)).float(), mask),
        preserved_gradient_high_fraction=masked_mean((right & (beta2 > 0)).float(), mask),
        beta1_in_force=ratio.new_tensor(float(beta1)),
        beta2_in_force=ratio.new_tensor(float(beta2)),
    )
    return ObjectiveTerms(per_token, metrics)


@register_objective("gppo", aggregation="token-mean")
def gppo(batch: PolicyBatch, control: ControlState, params: ObjectiveParams) -> ObjectiveTerms:
    """GPPO (arXiv 2508.07629, Klear-Reasoner): CE-GPPO with beta1 = beta2 = 1 (docs/algorithms.md 2.5).

    The clipped tokens keep the gradient ``-(1-E-)*A`` (left side: A<0, r<1-E-) and
    ``-(1+E+)*A`` (right side: A>0, r>1+E+). ``control.beta1`` and ``control.beta2`` are
    ignored: GPPO fixes both coefficients at 1. Use ``ce_gppo`` to set or schedule them.
    """
    return gppo_terms(batch, control, beta1=1.0, beta2=1.0)


@register_objective("ce_gppo", aggregation="token-mean")
def ce_gppo(batch: PolicyBatch, control: ControlState, params: ObjectiveParams) -> ObjectiveTerms:
    """CE-GPPO (arXiv 2509.20712): gradient-preserving clip with coefficients from the control state.

    ``beta1 = control.beta1`` scales the NEGATIVE-advantage, low-ratio side (A<0, r<1-E-,
    mostly NA&LP tokens, entropy-decreasing: exploitation); ``beta2 = control.beta2`` scales the
    POSITIVE-advantage, high-ratio side (A>0, r>1+E+, mostly PA&LP tokens, entropy-increasing:
    exploration). One sentence of the paper's section 3.2 states the reverse assignment; the
    paper's equations, its section 5.1 and the released code agree with the assignment used
    here (docs/algorithms.md 2.5). beta1 = beta2 = 0 gives PPO's gradients, beta1 = beta2 = 1 GPPO.
    """
    return gppo_terms(batch, control, beta1=control.beta1, beta2=control.beta2)
