"""Top-entropy-quantile token mask ("forking tokens"; arXiv 2506.01939, Wang et al. 2025).

*Beyond the 80/20 Rule* trains only on the top ``rho`` fraction of tokens by entropy. With ``S``
the valid tokens (``m = 1``) of the whole optimizer mini-batch, over all micro-batches and all
data-parallel ranks, and ``H_old`` pi_old's full-vocabulary entropy from the pre-update pass::

    tau  = quantile_linear({H_old_t : t in S}, 1 - rho)      # torch.quantile's default
    e_t  = m_t * 1[H_old_t >= tau]                            # ties are kept
    l'_t = e_t * l_t                                          # the objective's per-token loss

The normaliser is unchanged (token-mean still divides by ``sum(m)``), and the extras (entropy
bonus, KL, NLL) keep ``m``. ``rho = 1`` turns the mask off. The threshold comes from ``H_old``
and the whole mini-batch, so it is known before the first micro-batch and does not depend on the
micro-batch size or the data-parallel layout; on a rollout's first mini-batch ``pi_theta =
pi_old``, which is the paper's setting. The updater (``update.PolicyUpdater``) gathers the
mini-batch's values from every rank and passes ``e`` as ``PolicyBatch.token_mask``;
``compute_loss`` applies it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Off: every valid token is kept.
ENTROPY_QUANTILE_OFF = 1.0


def check_entropy_quantile(rho: float) -> float:
    """``rho`` as a float, or ValueError unless ``0 < rho <= 1``."""
    rho = float(rho)
    if not 0.0 < rho <= 1.0:
        raise ValueError(
            f"objective.control.entropy_quantile={rho} must be in (0, 1]: the fraction of tokens "
            "kept by entropy (1 = off)"
        )
    return rho


def quantile_linear(values: torch.Tensor, q: float) -> float:
    """The ``q``-quantile of ``values`` with linear interpolation (``torch.quantile``'s and
    numpy's default), by sorting: ``torch.quantile`` refuses inputs over 2**24 elements."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile q={q} must be in [0, 1]")
    ordered = values.detach().flatten().to(torch.float64).sort().values
    count = ordered.numel()
    if count == 0:
        raise ValueError("the quantile of an empty set is undefined")
    position = q * (count - 1)
    low = min(int(math.floor(position)), count - 1)
    high = min(low + 1, count - 1)
    below, above = float(ordered[low]), float(ordered[high])
    return below + (above - below) * (position - low)


def entropy_quantile_threshold(values: torch.Tensor, rho: float) -> float | None:
    """``tau``: the ``1 - rho`` quantile of ``values`` (H_old of every valid token of the
    mini-batch, all ranks). None when the mask is off (``rho = 1``) or there is no token."""
    rho = check_entropy_quantile(rho)
    if rho >= ENTROPY_QUANTILE_OFF or values.numel() == 0:
        return None
    return quantile_linear(values, 1.0 - rho)


def top_entropy_mask(old_entropy: torch.Tensor, mask: torch.Tensor, threshold: float) -> torch.Tensor:
    """``e = m * 1[H_old >= tau]`` (bool, shaped like ``mask``)."""
    return mask.bool() & (old_entropy.detach() >= threshold)


@dataclass
class EntropyMaskStats:
    """The mask's metrics over the mini-batches of one rollout (each from its global ``S``, so
    every rank holds the same values): threshold (mean over mini-batches weighted by ``|S|``),
    kept fraction ``sum e / sum m``, and mean ``H_old`` of the kept and of the dropped tokens."""

    tokens: float = 0.0
    kept: float = 0.0
    threshold_sum: float = 0.0
    kept_entropy_sum: float = 0.0
    dropped_entropy_sum: float = 0.0

    def add(self, values: torch.Tensor, threshold: float) -> None:
        """One mini-batch: ``values`` are H_old of its valid tokens (all ranks)."""
        kept = values.detach() >= threshold  # in the values' dtype, as ``top_entropy_mask`` compares
        values = values.detach().to(torch.float64)
        count = float(values.numel())
        self.tokens += count
        self.kept += float(kept.sum())
        self.threshold_sum += threshold * count
        self.kept_entropy_sum += float(values[kept].sum())
        self.dropped_entropy_sum += float(values[~kept].sum())

    def metrics(self) -> dict[str, float]:
        if self.tokens == 0:
            return {}
        out = {
            "objective/entropy_mask_threshold": self.threshold_sum / self.tokens,
            "objective/entropy_mask_kept_fraction": self.kept / self.tokens,
        }
        if self.kept > 0:
            out["entropy/kept_mean"] = self.kept_entropy_sum / self.kept
        if self.tokens > self.kept:
            out["entropy/dropped_mean"] = self.dropped_entropy_sum / (self.tokens - self.kept)
        return out
