"""CISPO: clip the importance-sampling weight, never the token's gradient (docs/algorithms.md 2.6).

From MiniMax-M1 (arXiv 2506.13585), equations 4-5.
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
from rlvr_lightning.objectives.ppo import ratio_metrics


@register_objective("cispo", aggregation="token-mean")
def cispo(batch: PolicyBatch, control: ControlState, params: ObjectiveParams) -> ObjectiveTerms:
    """CISPO (arXiv 2506.13585): ``l = -sg(clip(r, 1-E-, 1+E+)) * A * logp``.

    Every token keeps a gradient, ``g = -clip(r)*A``; the clip only bounds its weight. The
    clipped-weight fractions count tokens whose weight hit a bound, whatever the sign of A.
    The paper sets no lower bound (a large eps_low) and tunes only eps_high.
    """
    ratio = log_ratio(batch).exp()
    eps_low, eps_high = control.clip_bounds(batch.old_logp)
    lower, upper = 1.0 - eps_low, 1.0 + eps_high
    weight = torch.minimum(torch.maximum(ratio, lower), upper).detach()
    per_token = -weight * batch.advantages * batch.logp

    mask = batch.mask
    metrics = ratio_metrics(batch, ratio, eps_low, eps_high)
    metrics.update(
        cispo_weight_clipped_low_fraction=masked_mean((ratio < lower).float(), mask),
        cispo_weight_clipped_high_fraction=masked_mean((ratio > upper).float(), mask),
    )
    return ObjectiveTerms(per_token, metrics)
