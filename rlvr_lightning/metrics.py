"""Entropy metrics of docs/algorithms.md section 5 (token regions of section 4.1)."""

from __future__ import annotations

import resource

import torch


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated accelerator memory on CUDA, else the process's peak resident memory."""
    if torch.cuda.is_available() and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux

# Region name -> (advantage sign, high probability?). High probability: surprisal -log p below
# the entropy at that position.
REGIONS = {
    "pa_hp": (1, True),  # E1: entropy decreases when reinforced
    "pa_lp": (1, False),  # E2: entropy increases
    "na_hp": (-1, True),  # E3: entropy increases
    "na_lp": (-1, False),  # E4: entropy decreases
}


def token_regions(logp: torch.Tensor, entropy: torch.Tensor, advantages: torch.Tensor) -> dict[str, torch.Tensor]:
    """Boolean masks of the four regions (tokens with A == 0 belong to none)."""
    high_prob = -logp < entropy
    out = {}
    for name, (sign, high) in REGIONS.items():
        side = advantages > 0 if sign > 0 else advantages < 0
        out[name] = side & (high_prob if high else ~high_prob)
    return out


def entropy_by_region(
    entropy: torch.Tensor, logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor
) -> dict[str, float]:
    """Plain token-mean entropy and token fraction of each region over ``mask``.

    Keys: ``entropy/region_<name>`` and ``entropy/region_<name>_fraction``, and
    ``entropy/region_none_fraction`` for the tokens with a zero advantage, which belong to no
    region (the five fractions sum to 1). A region with no token reports fraction 0 and no
    entropy: the key is left out (a 0 would read as an entropy collapse on a chart).
    """
    valid = mask.bool()
    total = valid.sum().clamp_min(1)
    out: dict[str, float] = {}
    for name, region in token_regions(logp, entropy, advantages).items():
        selected = region & valid
        count = selected.sum()
        if count > 0:
            out[f"entropy/region_{name}"] = float((entropy * selected).sum() / count)
        out[f"entropy/region_{name}_fraction"] = float(count / total)
    out["entropy/region_none_fraction"] = float(((advantages == 0) & valid).sum() / total)
    return out
