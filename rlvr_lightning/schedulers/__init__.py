"""Entropy schedules as Lightning callbacks that write the control state every step."""

from rlvr_lightning.schedulers.base import ConstantSchedule, ControlCallback, StepInfo
from rlvr_lightning.schedulers.schedules import (
    AdaptiveEntropy,
    BetaStages,
    CosineSchedule,
    DecreaseIncreaseDecrease,
    IncreaseThenDecrease,
    LinearSchedule,
    OscillatoryDecay,
    TargetEntropy,
)

__all__ = [
    "AdaptiveEntropy",
    "BetaStages",
    "ConstantSchedule",
    "ControlCallback",
    "CosineSchedule",
    "DecreaseIncreaseDecrease",
    "IncreaseThenDecrease",
    "LinearSchedule",
    "OscillatoryDecay",
    "StepInfo",
    "TargetEntropy",
]
