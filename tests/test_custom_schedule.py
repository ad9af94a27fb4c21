"""The README's custom schedule (``rlvr_lightning.schedulers.examples.WarmupClipHigher``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from rlvr_lightning.control import ControlState
from rlvr_lightning.schedulers import StepInfo
from rlvr_lightning.schedulers.examples import WarmupClipHigher
from rlvr_lightning.train import run
from tests.conftest import TINY_OVERRIDES, compose_config, read_scalars

CONFIG = Path(__file__).resolve().parents[1] / "rlvr_lightning" / "conf" / "scheduler" / "warmup_clip_higher.yaml"


def info(step: int) -> StepInfo:
    return StepInfo(step=step, total_steps=10, rollout_entropy=1.0, reward_mean=0.0)


def test_curve_is_symmetric_during_warmup_then_clip_higher() -> None:
    schedule = WarmupClipHigher(warmup_steps=3, eps_high=0.28)
    control = ControlState(eps_low=0.2, eps_high=0.25)
    curve = []
    for step in range(6):
        schedule.update(control, info(step))
        curve.append((control.eps_low, control.eps_high, control.info["warmup"]))
    assert curve == [(0.2, 0.2, 1.0)] * 3 + [(0.2, 0.28, 0.0)] * 3


def test_warmup_follows_eps_low_and_zero_warmup_starts_relaxed() -> None:
    control = ControlState(eps_low=0.1, eps_high=0.3)
    WarmupClipHigher(warmup_steps=2, eps_high=0.28).update(control, info(0))
    assert control.eps_high == 0.1
    WarmupClipHigher(warmup_steps=0, eps_high=0.35).update(control, info(0))
    assert control.eps_high == 0.35


@pytest.mark.parametrize("kwargs", [dict(warmup_steps=-1), dict(eps_high=-0.1)])
def test_rejects_negative_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="must be >= 0"):
        WarmupClipHigher(**kwargs)


def test_yaml_config_instantiates_the_example() -> None:
    schedule = instantiate(OmegaConf.load(CONFIG))
    assert isinstance(schedule, WarmupClipHigher)
    assert (schedule.warmup_steps, schedule.eps_high) == (10, 0.28)


def test_cli_overrides_run_three_steps_with_eps_high_moving(tmp_path: Path) -> None:
    # The same override strings a user types after `python -m rlvr_lightning.train`.
    overrides = [
        "scheduler._target_=rlvr_lightning.schedulers.examples.WarmupClipHigher",
        "+scheduler.warmup_steps=1",
        "+scheduler.eps_high=0.3",
        "objective=grpo",
        "rollout.epochs=2",
        "trainer.max_steps=3",
        "trainer.val_check_interval=100",
        "validate_before_training=false",
    ]
    run(compose_config(TINY_OVERRIDES + overrides), run_dir=tmp_path / "run")
    scalars = read_scalars(tmp_path / "run")
    steps = [step for step, _ in scalars["control/eps_high"]]
    logged = [value for _, value in scalars["control/eps_high"]]
    assert steps == [0, 1, 2]
    assert logged == pytest.approx([0.2, 0.3, 0.3], abs=1e-6)
    # Plain bounds: the one in force is control/eps_high, so objective/eps_high_in_force is not logged.
    assert "objective/eps_high_in_force" not in scalars
    assert [value for _, value in scalars["control/warmup"]] == [1.0, 0.0, 0.0]
    assert [value for _, value in scalars["control/eps_low"]] == pytest.approx([0.2] * 3)
