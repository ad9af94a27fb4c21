"""Rollout/training mismatch correction: TIS, MIS (IcePop), sequence-level IS, geometric
rejection and bypass (ALGORITHMS_NEXT A3; docs/pending/rollout_correction.md).

Three log-probs per response token: ``logp_rollout`` (mu: what the inference engine gave the
sampled token, after temperature and top-p), ``logp_old`` (pi_old: the trainer's pre-update
pass, no gradient) and ``logp`` (pi_theta). With the mask ``m``::

    delta_t = clamp(logp_old - logp_rollout, -20, 20);  rho_t = exp(delta_t)    # pi_old / mu

    token_truncate     iw_t = min(rho_t, C)                                      (TIS)
    token_mask         iw_t = rho_t * 1[C_lo <= rho_t <= C_hi]                   (MIS, IcePop)
    sequence_truncate  iw_t = min(prod_s rho_s, C)                  on every token of the sequence
    sequence_mask      iw_t = prod_s rho_s * 1[C_lo <= prod_s rho_s <= C_hi]
    geo band (add-on)  iw_t <- iw_t * 1[G_lo <= exp(mean_s delta_s) <= G_hi]

``iw`` is computed once per rollout (detached), then ``compute_loss`` multiplies the objective's
per-token loss by it (the policy term only, after every clip; KL, entropy bonus and NLL stay
unweighted) and the normaliser is unchanged: a zeroed token still counts. Sequence-level
objectives (GSPO, GMPO) get the geometric mean of the token weights of each sequence instead.
``bypass`` applies no weight: the updater uses ``logp_rollout`` as ``logp_old``.

An engine may leave a token's log-prob unknown (NaN): that token counts as matched (``rho = 1``).
Everything here is a pure tensor function.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch

# Clamp on delta before exp (the spec's; the same as the objectives' log-ratio clamp).
DELTA_CLAMP = 20.0
MODES = ("none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask", "bypass")
WEIGHTING_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
# Objectives with one ratio per sequence: the token weights enter as their geometric mean per
# sequence (verl's geo_mean). A new sequence-level objective adds its name here.
SEQUENCE_LEVEL_OBJECTIVES = frozenset({"gspo", "gmpo"})
METRIC_PREFIX = "rollout_correction/"


@dataclass(frozen=True)
class CorrectionSettings:
    """The ``correction`` config block (``conf/correction/<name>.yaml``).

    ``cap`` is C of the truncating modes, ``mask_low``/``mask_high`` the band of the masking
    modes, ``geo_low``/``geo_high`` the optional geometric-mean band (both null: off) that any
    weighting mode may add. Defaults: C = 2 (verl), IcePop's [0.5, 5].
    """

    mode: str = "none"
    cap: float = 2.0
    mask_low: float = 0.5
    mask_high: float = 5.0
    geo_low: float | None = None
    geo_high: float | None = None

    def __post_init__(self) -> None:
        check_settings(self)

    @classmethod
    def from_config(cls, block: dict[str, Any] | None) -> CorrectionSettings:
        """The settings of a ``correction`` block; ValueError for a key that is not one."""
        block = dict(block or {})
        names = [f.name for f in fields(cls)]
        unknown = sorted(str(key) for key in block if key not in names)
        if unknown:
            raise ValueError(f"correction.{unknown[0]} is not a setting of correction; its settings: {', '.join(names)}")
        return cls(**block)

    @property
    def weighted(self) -> bool:
        """Whether the loss gets importance weights (every mode but none and bypass)."""
        return self.mode in WEIGHTING_MODES

    @property
    def bypass(self) -> bool:
        return self.mode == "bypass"

    @property
    def needs_rollout_logprobs(self) -> bool:
        return self.mode != "none"

    @property
    def geo_band(self) -> bool:
        return self.geo_low is not None


def check_engine(settings: CorrectionSettings, engine: str) -> None:
    """Refuse a mode that needs the sampled tokens' log-probs with an engine that returns none."""
    from rlvr_lightning.rollout import engine_class  # the rollout package imports objectives

    if settings.needs_rollout_logprobs and not engine_class(engine).returns_logprobs:
        raise ValueError(
            f"correction.mode={settings.mode} needs the sampled tokens' log-probs, which "
            f"rollout/engine={engine} does not return: use shared_prefix, static or vllm"
        )


def check_settings(settings: CorrectionSettings) -> None:
    """ValueError naming the field, its value and the allowed range."""
    if settings.mode not in MODES:
        raise ValueError(f"correction.mode={settings.mode!r} is unknown; available: {', '.join(MODES)}")
    for name in ("cap", "mask_low", "mask_high"):
        value = getattr(settings, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"correction.{name}={value!r} must be a finite number")
    if not settings.cap > 0:
        raise ValueError(f"correction.cap={settings.cap} must be > 0 (C, the largest weight)")
    if not 0 <= settings.mask_low < settings.mask_high:
        raise ValueError(
            f"correction.mask_low={settings.mask_low}, correction.mask_high={settings.mask_high}: "
            "need 0 <= mask_low < mask_high (the band of ratios that keep their weight)"
        )
    if (settings.geo_low is None) != (settings.geo_high is None):
        raise ValueError(
            f"correction.geo_low={settings.geo_low}, correction.geo_high={settings.geo_high}: set both "
            "(the geometric-mean band) or neither"
        )
    if settings.geo_low is not None:
        low, high = settings.geo_low, settings.geo_high
        if not (isinstance(low, (int, float)) and isinstance(high, (int, float)) and 0 <= low < high < math.inf):
            raise ValueError(
                f"correction.geo_low={low}, correction.geo_high={high}: need 0 <= geo_low < geo_high (finite)"
            )
        if not settings.weighted:
            raise ValueError(
                f"correction.geo_low/geo_high reject sequences on top of a weighting mode; correction.mode="
                f"{settings.mode!r} applies no weights: use one of {', '.join(WEIGHTING_MODES)}, or set both to null"
            )


def known_rollout_logp(old_logp: torch.Tensor, rollout_logp: torch.Tensor) -> torch.Tensor:
    """``rollout_logp`` with unknown (NaN) entries replaced by ``old_logp`` (a matched token)."""
    rollout_logp = rollout_logp.to(old_logp.device, old_logp.dtype)
    return torch.where(torch.isnan(rollout_logp), old_logp, rollout_logp)


def log_ratio(old_logp: torch.Tensor, rollout_logp: torch.Tensor) -> torch.Tensor:
    """``delta = clamp(logp_old - logp_rollout, -20, 20)`` (float64, detached)."""
    old = old_logp.detach().double()
    mu = known_rollout_logp(old, rollout_logp.detach())
    return (old - mu).clamp(-DELTA_CLAMP, DELTA_CLAMP)


def correction_weights(
    old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor, settings: CorrectionSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """``iw`` ``[N, T]`` (float32, detached, 0 outside ``mask``) and the bool ``[N, T]`` of tokens
    whose weight the cap lowered (for ``truncated_fraction``), for a weighting ``settings.mode``.

    Rows must be whole responses: the sequence modes and the geo band reduce over each row.
    """
    if not settings.weighted:
        raise ValueError(f"correction.mode={settings.mode!r} applies no importance weights")
    valid = mask.bool()
    delta = log_ratio(old_logp, rollout_logp).masked_fill(~valid, 0.0)
    if settings.mode.startswith("token"):
        ratio = delta.exp()
    else:
        # prod_t rho_t on every token of the sequence (float64: exp overflows only past e^709,
        # and inf is then capped or masked, never multiplied).
        ratio = delta.sum(-1, keepdim=True).exp().expand_as(delta)
    if settings.mode.endswith("truncate"):
        truncated = ratio > settings.cap
        weights = ratio.clamp(max=settings.cap)
    else:
        truncated = torch.zeros_like(valid)
        keep = (ratio >= settings.mask_low) & (ratio <= settings.mask_high)
        weights = torch.where(keep, ratio, torch.zeros_like(ratio))
    if settings.geo_band:
        lengths = valid.sum(-1, keepdim=True).clamp_min(1)
        geo = (delta.sum(-1, keepdim=True) / lengths).exp()
        keep = (geo >= settings.geo_low) & (geo <= settings.geo_high)
        weights = torch.where(keep, weights, torch.zeros_like(weights))
    weights = torch.where(valid, weights, torch.zeros_like(weights))
    return weights.float(), truncated & valid


def sequence_geometric_mean(weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each row's geometric mean of ``weights`` over ``mask``, on every token of the row (a zero
    weight zeroes its sequence; a row without tokens gets 1)."""
    valid = mask.bool()
    logs = torch.where(valid, weights.double().log(), torch.zeros_like(weights, dtype=torch.float64))
    mean = logs.sum(-1, keepdim=True) / valid.sum(-1, keepdim=True).clamp_min(1)
    return mean.exp().expand_as(weights).to(weights.dtype)


def loss_weights(objective: str, weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The weights ``compute_loss`` multiplies objective ``objective``'s per-token loss by: the
    token weights, or for a sequence-level objective their geometric mean per sequence."""
    weights = weights.detach()
    if objective in SEQUENCE_LEVEL_OBJECTIVES:
        return sequence_geometric_mean(weights, mask)
    return weights


def quantiles(values: torch.Tensor, qs: tuple[float, ...]) -> list[float]:
    """Quantiles of a 1-D tensor with linear interpolation (``torch.quantile``'s default), by
    sorting: ``torch.quantile`` refuses more than 2**24 values."""
    ordered = values.double().sort().values
    last = ordered.numel() - 1
    out = []
    for q in qs:
        position = q * last
        low = int(math.floor(position))
        high = min(low + 1, last)
        out.append(float(ordered[low] + (ordered[high] - ordered[low]) * (position - low)))
    return out


def mismatch_metrics(
    old_logp: torch.Tensor,
    rollout_logp: torch.Tensor,
    mask: torch.Tensor,
    weights: torch.Tensor | None = None,
    truncated: torch.Tensor | None = None,
) -> dict[str, float]:
    """The mismatch metrics over ``mask`` (``rollout_correction/...``); with ``weights`` (a
    weighting mode) also ``weight_mean``, ``ess``, ``truncated_fraction``, ``masked_fraction``.
    Empty when ``mask`` holds no token."""
    valid = mask.bool()
    if not valid.any():
        return {}
    old = old_logp.detach().double()[valid]
    mu = known_rollout_logp(old, rollout_logp.detach()[valid])
    diff = old - mu
    delta = diff.clamp(-DELTA_CLAMP, DELTA_CLAMP)
    rho = delta.exp()
    p01, p50, p99 = quantiles(rho, (0.01, 0.5, 0.99))
    metrics = {
        "logp_abs_diff_mean": float(diff.abs().mean()),
        "logp_abs_diff_max": float(diff.abs().max()),
        "kl_k1": float((-diff).mean()),  # mean(logp_rollout - logp_old): unbiased, may be < 0
        "kl_k3": float((rho - 1.0 - delta).mean()),
        "ratio_p01": p01,
        "ratio_p50": p50,
        "ratio_p99": p99,
        "ratio_min": float(rho.min()),
        "ratio_max": float(rho.max()),
        "chi2_token": float((rho * rho).mean() - 1.0),
    }
    if weights is not None:
        iw = weights.detach().double()[valid]
        second = float((iw * iw).mean())
        metrics["weight_mean"] = float(iw.mean())
        metrics["ess"] = float(iw.mean()) ** 2 / second if second > 0 else 0.0
        cut = truncated[valid] if truncated is not None else torch.zeros_like(iw, dtype=torch.bool)
        metrics["truncated_fraction"] = float(cut.double().mean())
        metrics["masked_fraction"] = float((iw == 0).double().mean())
    return {METRIC_PREFIX + key: value for key, value in metrics.items()}
