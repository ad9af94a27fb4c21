"""Schedule callbacks: they write the control state before each policy update.

The training module calls ``on_rollout_end`` on every ``ControlCallback`` after a rollout has
been generated, scored and measured (its token-mean entropy is known) and before the optimizer
steps that use it. A schedule implements ``update``; its own state (if any) goes through
``state_dict`` / ``load_state_dict``, which Lightning saves in checkpoints, so a resumed run
continues the schedule where it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning.pytorch as pl

from rlvr_lightning.control import ControlState


@dataclass(frozen=True)
class StepInfo:
    """What a schedule may read: progress and the latest measurements."""

    step: int  # rollouts completed before this one (0 for the first)
    total_steps: int  # trainer.max_steps (number of rollouts in the run)
    rollout_entropy: float  # token-mean entropy of this rollout under pi_old (pre-update pass), all ranks
    reward_mean: float  # mean reward of this rollout


class ControlCallback(pl.Callback):
    """Base class for schedules. Subclasses implement ``update``."""

    # Whether the schedule acts through clipping (clip bounds, CE-GPPO betas), which does nothing
    # with one optimizer step per rollout (the module warns then); False for coefficient schedules.
    relies_on_clipping: bool = True

    def update(self, control: ControlState, info: StepInfo) -> None:  # pragma: no cover
        raise NotImplementedError

    def on_rollout_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, info: StepInfo) -> None:
        self.update(pl_module.control, info)


def control_callbacks(trainer: pl.Trainer) -> list[ControlCallback]:
    """The schedules among a trainer's callbacks, in order: the one place the module finds them."""
    return [callback for callback in trainer.callbacks if isinstance(callback, ControlCallback)]


class ConstantSchedule(ControlCallback):
    """Keeps the thresholds the objective config set (it has no state to log)."""

    def update(self, control: ControlState, info: StepInfo) -> None:
        pass
