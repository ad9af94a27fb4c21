"""A custom schedule: clip-higher after a warm-up (the README's "Write your own schedule")."""

from __future__ import annotations

from rlvr_lightning.control import ControlState
from rlvr_lightning.schedulers.base import ControlCallback, StepInfo


class WarmupClipHigher(ControlCallback):
    """Symmetric clip (``eps_high = eps_low``) for the first ``warmup_steps`` rollouts, then
    clip-higher with ``eps_high`` relaxed to the given value (DAPO's 0.28, arXiv 2503.14476).

    A pure function of the step, so it has no state to checkpoint. Use it with
    ``scheduler=warmup_clip_higher`` or
    ``scheduler._target_=rlvr_lightning.schedulers.examples.WarmupClipHigher``.
    """

    def __init__(self, warmup_steps: int = 10, eps_high: float = 0.28) -> None:
        if warmup_steps < 0 or eps_high < 0:
            raise ValueError(f"warmup_steps and eps_high must be >= 0 ({warmup_steps}, {eps_high})")
        self.warmup_steps = int(warmup_steps)
        self.eps_high = float(eps_high)

    def update(self, control: ControlState, info: StepInfo) -> None:
        warming_up = info.step < self.warmup_steps
        control.eps_high = control.eps_low if warming_up else self.eps_high
        control.info["warmup"] = float(warming_up)  # logged as control/warmup
