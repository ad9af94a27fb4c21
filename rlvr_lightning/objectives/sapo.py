"""SAPO: a smooth, sign-dependent sigmoid gate on the ratio instead of a hard clip.

From Soft Adaptive Policy Optimization (arXiv 2511.20347); see docs/algorithms.md, SAPO section.
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

# Gate temperatures for positive and negative advantages (paper; verl, TRL and SkyRL defaults).
TAU_POS = 1.0
TAU_NEG = 1.05
# A token counts as attenuated when its gate sech^2(tau (r - 1) / 2) falls below this value.
ATTENUATED_BELOW = 0.5


def sapo_temperatures(options: dict) -> tuple[float, float]:
    """``(tau_pos, tau_neg)`` from ``objective.options`` (``sapo_tau_pos`` / ``sapo_tau_neg``)."""
    temperatures = []
    for key, default in (("sapo_tau_pos", TAU_POS), ("sapo_tau_neg", TAU_NEG)):
        value = float(options.get(key, default))
        if not value > 0:
            raise ValueError(f"objective.options.{key}={value} must be > 0 (SAPO gate temperature)")
        temperatures.append(value)
    return temperatures[0], temperatures[1]


@register_objective("sapo", aggregation="seq-mean-token-mean")
def sapo(batch: PolicyBatch, control: ControlState, params: ObjectiveParams) -> ObjectiveTerms:
    """SAPO (arXiv 2511.20347): ``l = -(4/tau) * sigmoid(tau * (r - 1)) * A``.

    ``tau = tau_pos`` (default 1.0) when A > 0, else ``tau_neg`` (default 1.05; A = 0 takes
    ``tau_neg``, its loss is 0 anyway). There are no clip regions: with
    ``s = sigmoid(tau (r - 1))`` the gradient is ``g = -A * r * 4 s (1 - s)
    = -A * r * sech^2(tau (r - 1) / 2)``, the unclipped PPO gradient times a gate that is 1 at
    r = 1 and decays smoothly on both sides. ``r`` comes from the clamped log-ratio.
    Aggregation seq-mean-token-mean (paper; verl forces it). ``control`` is not read: the
    temperatures are ``objective.options.sapo_tau_pos`` / ``sapo_tau_neg``.
    """
    tau_pos, tau_neg = sapo_temperatures(params.options)
    advantages = batch.advantages
    ratio = log_ratio(batch).exp()
    tau = torch.where(advantages > 0, ratio.new_tensor(tau_pos), ratio.new_tensor(tau_neg))
    sigmoid = torch.sigmoid(tau * (ratio - 1.0))
    per_token = -(4.0 / tau) * sigmoid * advantages

    mask = batch.mask
    valid = mask.bool()
    gate = (4.0 * sigmoid * (1.0 - sigmoid)).detach()  # sech^2(tau (r - 1) / 2)
    weight = ratio.detach() * gate
    ratio_max = masked_max(ratio.detach(), valid)
    metrics = {
        "sapo_weight_mean_pos": masked_mean(weight, valid & (advantages > 0)),
        "sapo_weight_mean_neg": masked_mean(weight, valid & (advantages < 0)),
        "sapo_attenuated_fraction": masked_mean((gate < ATTENUATED_BELOW).float(), mask),
        "ratio_mean": masked_mean(ratio.detach(), mask),
        "ratio_max": ratio_max,
        "approx_kl_old": masked_mean((batch.old_logp - batch.logp).detach(), mask),
    }
    return ObjectiveTerms(per_token, metrics)
