"""End-to-end: the real Hydra entry point on the tiny model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlvr_lightning.train import run
from tests.conftest import TINY_OVERRIDES, read_scalars

REPO = Path(__file__).resolve().parents[1]


def test_cli_two_steps_writes_tensorboard_scalars(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "rlvr_lightning.train", *TINY_OVERRIDES, f"hydra.run.dir={run_dir}"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"run directory: {run_dir.resolve()}" in result.stdout
    scalars = read_scalars(run_dir)
    for tag in ("entropy/rollout", "entropy/update", "reward/mean", "control/eps_low", "control/eps_high",
                "objective/clip_low_fraction", "objective/clip_high_fraction", "time/generate_seconds",
                "perf/completion_tokens_per_second", "val/accuracy", "entropy/region_pa_hp_fraction"):
        assert tag in scalars, f"{tag} missing; have {sorted(scalars)}"
    assert [step for step, _ in scalars["reward/mean"]] == [0, 1]
    # Validation before training (step 0) and after the second rollout (step 2).
    assert [step for step, _ in scalars["val/accuracy"]] == [0, 2]
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "tensorboard" / "samples.jsonl").is_file()


def test_resume_continues_step_counter_and_control_state(tiny_config, tmp_path: Path) -> None:
    first = tmp_path / "first"
    run(tiny_config(), run_dir=first)
    ckpt = first / "checkpoints" / "last.ckpt"
    import torch

    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert saved["global_step"] == 2
    assert saved["rlvr_control_state"]["eps_high"] == pytest.approx(0.2)
    assert saved["optimizer_states"] and saved["lr_schedulers"]
    second = tmp_path / "second"
    run(tiny_config("trainer.max_steps=3", f"ckpt_path={ckpt}"), run_dir=second)
    scalars = read_scalars(second)
    assert [step for step, _ in scalars["reward/mean"]] == [2]
