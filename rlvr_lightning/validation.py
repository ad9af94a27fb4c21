"""Held-out accuracy during training: avg@n, unbiased pass@k and maj@k over the validation split.

``HeldOutMetrics`` holds the running means (torchmetrics, so Lightning synchronises them across
ranks) and turns one validation batch's scored samples into updates; the module samples.
"""

from __future__ import annotations

from typing import Any

import torch
import torchmetrics

from rlvr_lightning.evaluation import default_k_values, majority_vote, pass_at_k


class HeldOutMetrics(torch.nn.Module):
    """``n_samples`` completions per held-out problem at ``temperature`` (0: greedy, one sample),
    scored: ``val/accuracy`` (avg@n), ``val/reward``, ``val/response_length``, ``val/pass@k`` and
    ``val/maj@k`` for k in 2, 4, ..., n (the ``validation`` config block)."""

    def __init__(self, n_samples: int = 4, temperature: float | None = None, rollout_temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = float(rollout_temperature if temperature is None else temperature)
        self.samples = 1 if self.temperature == 0.0 else int(n_samples)
        self.k_values = default_k_values(self.samples)
        names = ["accuracy", "reward", "response_length"]
        names += [f"{kind}_at_{k}" for kind in ("pass", "maj") for k in self.k_values if k > 1]
        self.meters = torch.nn.ModuleDict({name: torchmetrics.MeanMetric() for name in names})

    def update(self, result: Any, response_lengths: torch.Tensor, problems: int) -> None:
        """Add one batch: ``result`` is the reward function's over ``problems * samples``
        completions laid out problem by problem."""
        samples, meters = self.samples, self.meters
        meters["accuracy"].update(torch.tensor(result.correct, dtype=torch.float32))
        meters["reward"].update(torch.tensor(result.rewards, dtype=torch.float32))
        meters["response_length"].update(response_lengths.float().cpu())
        for problem in range(problems):
            flags = result.correct[problem * samples : (problem + 1) * samples]
            extracted = result.extracted[problem * samples : (problem + 1) * samples]
            for k in self.k_values:
                if k > 1:
                    meters[f"pass_at_{k}"].update(pass_at_k(samples, sum(flags), k))
                    meters[f"maj_at_{k}"].update(float(majority_vote(extracted[:k], flags[:k])[1]))

    def compute_and_reset(self) -> dict[str, float]:
        """``val/<name>`` -> mean over every problem seen since the last call."""
        metrics = {}
        for name, meter in self.meters.items():
            metrics["val/" + name.replace("_at_", "@")] = float(meter.compute())
            meter.reset()
        return metrics
