"""Clip-Cov and KL-Cov: act on the few tokens with the largest covariance (docs/algorithms.md 2.8).

From "The Entropy Mechanism of Reinforcement Learning for Reasoning Language Models"
(arXiv 2505.22617), section 4. Entropy falls with the covariance between a token's advantage
and its log-probability, so both methods restrain the tokens with high covariance.

The covariance is computed over the valid tokens of the micro-batch the objective receives,
detached: ``Cov_t = (A_t - mean(A)) * (logp_t - mean(logp))``.
"""

from __future__ import annotations

import math

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
from rlvr_lightning.objectives.ppo import clip_events, ppo_clip_terms, ratio_metrics

# Paper defaults (section 2.8); override through ``ObjectiveParams.options``.
CLIP_COV_RATIO = 0.0002
CLIP_COV_LOWER = 1.0
CLIP_COV_UPPER = 5.0
KL_COV_RATIO = 0.002
KL_COV_COEF = 1.0


def token_covariance(batch: PolicyBatch) -> torch.Tensor:
    """Detached ``Cov_t`` per token; the means run over the valid (masked) tokens only."""
    advantages = batch.advantages.detach()
    logp = batch.logp.detach()
    centred_advantages = advantages - masked_mean(advantages, batch.mask)
    centred_logp = logp - masked_mean(logp, batch.mask)
    return centred_advantages * centred_logp


def selection_count(fraction: float, num_valid: int) -> int:
    """``max(floor(fraction * N), 1)`` tokens, or none when there are no valid tokens."""
    if num_valid == 0:
        return 0
    return max(math.floor(fraction * num_valid), 1)


@register_objective("clip_cov", aggregation="token-mean")
def clip_cov(batch: PolicyBatch, control: ControlState, params: ObjectiveParams) -> ObjectiveTerms:
    """Clip-Cov (arXiv 2505.22617): PPO clip, plus the gradient of a few random high-Cov tokens cut.

    Candidates are valid tokens that PPO has not already clipped (no clip-low, clip-high or
    dual-clip event: their gradient is already zero) with
    ``clip_cov_lower < Cov_t < clip_cov_upper`` (options, defaults 1 and 5). Of these,
    ``max(floor(clip_cov_ratio * N), 1)`` (default ratio 0.0002, N = valid tokens) are picked
    uniformly at random with ``batch.generator`` (the global default generator when None) and
    detached: they keep their PPO loss value but lose their gradient. With fewer candidates
    than that, all are picked; with none, none.
    """
    options = params.options
    ratio_of_tokens = float(options.get("clip_cov_ratio", CLIP_COV_RATIO))
    lower = float(options.get("clip_cov_lower", CLIP_COV_LOWER))
    upper = float(options.get("clip_cov_upper", CLIP_COV_UPPER))

    terms = ppo_clip_terms(batch, control)
    advantages = batch.advantages
    valid = batch.mask.bool()
    ratio = log_ratio(batch).detach().exp()
    eps_low, eps_high = control.clip_bounds(batch.old_logp)
    low, high = clip_events(ratio, advantages, eps_low, eps_high)
    already_clipped = low | high
    if control.dual_clip is not None:
        already_clipped = already_clipped | ((advantages < 0) & (ratio > control.dual_clip))

    covariance = token_covariance(batch)
    candidates = valid & ~already_clipped & (covariance > lower) & (covariance < upper)
    candidate_index = candidates.flatten().nonzero().squeeze(-1)
    count = min(selection_count(ratio_of_tokens, int(valid.sum())), candidate_index.numel())
    selected = torch.zeros_like(candidates).flatten()
    if count > 0:
        generator = batch.generator
        device = generator.device if generator is not None else torch.device("cpu")
        order = torch.randperm(candidate_index.numel(), generator=generator, device=device)
        selected[candidate_index[order[:count].to(candidate_index.device)]] = True
    selected = selected.view_as(candidates)

    per_token = torch.where(selected, terms.per_token_loss.detach(), terms.per_token_loss)
    metrics = dict(terms.metrics)
    metrics.update(
        cov_selected_fraction=masked_mean(selected.float(), batch.mask),
        cov_candidate_fraction=masked_mean(candidates.float(), batch.mask),
        cov_mean=masked_mean(covariance, batch.mask),
    )
    return ObjectiveTerms(per_token, metrics)


# KL-Cov has no clip, but its penalty |logp - logp_old| is zero with one update per rollout,
# so it is flagged like the clipping objectives for the one-update warning.
@register_objective("kl_cov", aggregation="token-mean")
def kl_cov(batch: PolicyBatch, control: ControlState, params: ObjectiveParams) -> ObjectiveTerms:
    """KL-Cov (arXiv 2505.22617): plain ``-r*A`` plus a KL-like penalty on the top-Cov tokens.

    The ``max(floor(kl_cov_ratio * N), 1)`` valid tokens with the largest ``Cov_t`` (options,
    default ratio 0.002 for 7B; the paper uses 0.0002 for 32B) get
    ``l = -r*A + kl_cov_coef * |logp - logp_old|`` (default coef 1); all other tokens
    ``l = -r*A`` with no PPO clip. The control state's eps and dual clip are not used.
    """
    options = params.options
    ratio_of_tokens = float(options.get("kl_cov_ratio", KL_COV_RATIO))
    coef = float(options.get("kl_cov_coef", KL_COV_COEF))

    token_log_ratio = log_ratio(batch)
    ratio = token_log_ratio.exp()
    valid = batch.mask.bool()
    covariance = token_covariance(batch)
    count = selection_count(ratio_of_tokens, int(valid.sum()))
    selected = torch.zeros_like(valid).flatten()
    if count > 0:
        scores = covariance.masked_fill(~valid, -math.inf).flatten()
        selected[scores.topk(count).indices] = True
    selected = selected.view_as(valid)

    penalty = coef * token_log_ratio.abs()
    per_token = -ratio * batch.advantages + torch.where(
        selected, penalty, torch.zeros_like(penalty)
    )

    eps_low, eps_high = control.clip_bounds(batch.old_logp)
    metrics = ratio_metrics(batch, ratio, eps_low, eps_high)
    # KL-Cov does not clip: the eps in force would be misleading here.
    metrics.pop("eps_low_in_force")
    metrics.pop("eps_high_in_force")
    metrics.update(
        cov_selected_fraction=masked_mean(selected.float(), batch.mask),
        cov_mean=masked_mean(covariance, batch.mask),
        kl_cov_penalty_mean=masked_mean(token_log_ratio.detach().abs(), selected),
    )
    return ObjectiveTerms(per_token, metrics)
