"""GMPO: the geometric mean of the token ratios per sequence, clipped in log space.

From Geometric-Mean Policy Optimization (arXiv 2507.20673); see docs/algorithms.md, GMPO
section. Like GSPO it needs one advantage per sequence and couples a sequence's tokens through
the sequence ratio.
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


@register_objective("gmpo", aggregation="seq-mean-token-mean")
def gmpo(batch: PolicyBatch, control: ControlState, params: ObjectiveParams) -> ObjectiveTerms:
    """GMPO (arXiv 2507.20673): ``l_i = -A_i * R_i``, ``R_i = exp(mean_t ell~_t)``.

    ``ell_t = logp - logp_old`` (clamped to [-20, 20]) is clipped in log space on the side the
    sign of A makes optimistic: ``ell~ = s * min(s * ell, s * clip(ell, -eps_low, eps_high))``
    with ``s = sign(A)``, i.e. capped at ``eps_high`` when A > 0 and floored at ``-eps_low``
    when A < 0 (A = 0 gives ``ell~ = 0``). ``eps_low`` / ``eps_high`` are the plain
    ``control.eps_low`` / ``control.eps_high`` read in log space (default 0.4 each, r in
    [0.670, 1.492]); probability-dependent bounds do not apply.

    Token form: ``l_it = -A_i * sg(R_i) * exp(ell~_t - sg(ell~_t))`` has the value ``-A_i*R_i``
    on every valid token, so seq-mean-token-mean gives ``mean_i(-A_i*R_i)`` over the global
    sequence count B, and token t gets ``g_t = -A_i*R_i`` with weight ``1/(B*L_i)``, or 0 when
    its log-ratio was cut (clip-high: A > 0 and ell > eps_high; clip-low: A < 0 and
    ell < -eps_low). A cut token still enters ``R_i`` at its bound. ``A_i`` is the token mean
    of the advantage over the sequence (one value per response here).
    """
    mask = batch.mask.to(batch.logp.dtype)
    valid_sequences = mask.sum(-1) > 0
    advantages = batch.advantages
    eps_low, eps_high = float(control.eps_low), float(control.eps_high)

    ell = log_ratio(batch)
    clip_high = (advantages > 0) & (ell > eps_high)
    clip_low = (advantages < 0) & (ell < -eps_low)
    clipped_ell = torch.where(
        clip_high, ell.new_tensor(eps_high), torch.where(clip_low, ell.new_tensor(-eps_low), ell)
    )
    clipped_ell = torch.where(advantages == 0, torch.zeros_like(ell), clipped_ell)

    lengths = mask.sum(-1)
    sequence_log_ratio = (clipped_ell.detach() * mask).sum(-1) / lengths.clamp_min(1.0)
    sequence_ratio = sequence_log_ratio.exp()
    sequence_advantage = (advantages * mask).sum(-1) / lengths.clamp_min(1.0)
    # Value -A_i*R_i; d/d logp_t = -A_i*R_i * d ell~_t/d logp_t (0 on a cut token).
    token_factor = (clipped_ell - clipped_ell.detach()).exp()
    per_token = -(sequence_advantage * sequence_ratio).unsqueeze(-1) * token_factor

    ratio_max = masked_max(sequence_ratio, valid_sequences)
    metrics = {
        "clip_low_fraction": masked_mean(clip_low.float(), mask),
        "clip_high_fraction": masked_mean(clip_high.float(), mask),
        "sequence_ratio_mean": masked_mean(sequence_ratio, valid_sequences),
        "sequence_ratio_max": ratio_max,
        "approx_kl_old": masked_mean((batch.old_logp - batch.logp).detach(), mask),
        "eps_low_in_force": sequence_ratio.new_tensor(eps_low),
        "eps_high_in_force": sequence_ratio.new_tensor(eps_high),
    }
    return ObjectiveTerms(per_token, metrics)
