"""GSPO: one length-normalised importance ratio per sequence (docs/algorithms.md 2.7).

From Group Sequence Policy Optimization (arXiv 2507.18071), equations 5-7 and the token form
of section 4.3.
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

# Upper clamp on the sequence log-ratio before ``exp`` (section 2.7).
SEQUENCE_LOG_RATIO_CLAMP = 10.0


@register_objective("gspo", aggregation="seq-mean-token-mean")
def gspo(batch: PolicyBatch, control: ControlState, params: ObjectiveParams) -> ObjectiveTerms:
    """GSPO (arXiv 2507.18071): PPO clip on the sequence ratio ``s_i``, seq-mean-token-mean.

    ``s_i = exp(mean_t(logp - logp_old))`` over the response's valid tokens (log clamped at
    ``options["gspo_log_ratio_clamp"]``, default 10). The token form
    ``s_it = sg(s_i) * exp(logp - sg(logp))`` has the value ``s_i`` and gives each token the
    gradient ``-A_i*s_i`` (times the aggregation weight ``1/(G*|y_i|)``), or zero when the
    sequence is clipped (A_i > 0 and s_i > 1+eps_high, or A_i < 0 and s_i < 1-eps_low).

    The clip range is the plain ``control.eps_low`` / ``control.eps_high`` (paper: 3e-4 and
    4e-4): probability-dependent bounds are per token and do not apply to a sequence ratio.
    No dual clip.
    """
    mask = batch.mask.to(batch.logp.dtype)
    advantages = batch.advantages
    lengths = mask.sum(-1)
    valid_sequences = lengths > 0

    # The sequence ratio is a detached weight; the gradient flows through the token form only.
    token_log_ratio = log_ratio(batch).detach()
    sequence_log_ratio = (token_log_ratio * mask).sum(-1) / lengths.clamp_min(1.0)
    clamp = float(params.options.get("gspo_log_ratio_clamp", SEQUENCE_LOG_RATIO_CLAMP))
    sequence_ratio = sequence_log_ratio.clamp(max=clamp).exp()
    token_ratio = sequence_ratio.unsqueeze(-1) * (batch.logp - batch.logp.detach()).exp()

    lower, upper = 1.0 - control.eps_low, 1.0 + control.eps_high
    clipped_ratio = token_ratio.clamp(lower, upper)
    per_token = torch.maximum(-advantages * token_ratio, -advantages * clipped_ratio)

    # Sign-split clip events per sequence (A_i is constant over a response's tokens).
    sequence_advantage = (advantages * mask).sum(-1) / lengths.clamp_min(1.0)
    low = (sequence_advantage < 0) & (sequence_ratio < lower)
    high = (sequence_advantage > 0) & (sequence_ratio > upper)
    ratio_max = masked_max(sequence_ratio, valid_sequences)
    metrics = {
        "sequence_clip_low_fraction": masked_mean(low.float(), valid_sequences),
        "sequence_clip_high_fraction": masked_mean(high.float(), valid_sequences),
        "sequence_ratio_mean": masked_mean(sequence_ratio, valid_sequences),
        "sequence_ratio_max": ratio_max,
        "approx_kl_old": masked_mean((batch.old_logp - batch.logp).detach(), mask),
        "eps_low_in_force": sequence_ratio.new_tensor(float(control.eps_low)),
        "eps_high_in_force": sequence_ratio.new_tensor(float(control.eps_high)),
    }
    return ObjectiveTerms(per_token, metrics)
