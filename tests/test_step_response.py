"""tools/step_response.py: the fit, the gains, the suggested controller and a tiny end-to-end run."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tests.conftest import TINY_OVERRIDES
from tools import step_response


def line(slope: float, start: float = 2.0, steps: int = 10, noise: float = 0.0, seed: int = 0):
    rng = random.Random(seed)
    return [(k, start + slope * k + rng.gauss(0.0, noise)) for k in range(steps)]


def test_fit_line_and_residuals():
    slope, intercept = step_response.fit_line(line(-0.03, start=2.2))
    assert slope == pytest.approx(-0.03) and intercept == pytest.approx(2.2)
    assert step_response.residual_std(line(0.1)) == pytest.approx(0.0, abs=1e-12)
    curve = [(k, 2.0 * 0.8**k) for k in range(10)]  # a falling curve is not noise
    assert step_response.residual_std(curve) < 0.05 < step_response.residual_std(line(0.0, noise=0.15, steps=10))
    assert step_response.residual_std(line(0.0, noise=0.1, steps=400)) == pytest.approx(0.1, rel=0.15)
    with pytest.raises(ValueError, match="at least 2 steps"):
        step_response.fit_line([(0, 1.0)])


def test_gains_and_suggestion_for_the_entropy_coefficient():
    # Baseline drifts down 0.02/step; +0.05 gives +0.03/step, -0.05 gives -0.20/step.
    series = {0.0: line(-0.02), 0.05: line(0.03), -0.05: line(-0.20)}
    result = step_response.analyse("entropy_coef", series, fraction=0.5)
    assert result["gains"]["0.05"] == pytest.approx(1.0)  # (0.03 + 0.02) / 0.05
    assert result["gains"]["-0.05"] == pytest.approx(3.6)  # (-0.20 + 0.02) / -0.05
    # The strongest gain sets kp: half the error per step on the side that reacts most.
    assert result["suggestion"]["kp"] == pytest.approx(0.5 / 3.6)
    assert result["suggestion"]["ki"] == pytest.approx(0.5 / 3.6 * 0.5 / 4)
    assert "scheduler.actuator=entropy_coef" in result["suggestion"]["overrides"]
    assert "scheduler.coef_scale=1.0" in result["suggestion"]["overrides"]
    assert result["noise_std"] == pytest.approx(0.0, abs=1e-12)
    # Entropy holds level where the slope crosses 0: between 0 (-0.02) and 0.05 (+0.03), at 0.02.
    assert result["balance"] == pytest.approx(0.02)
    assert "scheduler.coef_feedforward=0.02" in result["suggestion"]["overrides"]


def test_balance_point():
    assert step_response.balance_point({0.0: -0.02, 0.05: 0.03, -0.05: -0.2}) == pytest.approx(0.02)
    assert step_response.balance_point({0.1: 0.0, 0.2: 0.1}) == 0.1
    assert step_response.balance_point({0.0: -0.1, 0.1: -0.05}) is None  # never level: no crossing
    # Without a crossing the coefficient gets no feed-forward, and the summary says why.
    result = step_response.analyse("entropy_coef", {0.0: line(-0.1), 0.1: line(-0.05)})
    assert result["balance"] is None and "scheduler.coef_feedforward=0" in result["suggestion"]["overrides"]
    assert "every slope has the same sign" in result["warning_balance"]
    # Other fields: the balance point is where the objective should start the field.
    eps = step_response.analyse("eps_high", {0.2: line(-0.02), 0.3: line(0.02)})
    assert eps["balance"] == pytest.approx(0.25)
    assert "objective.control.eps_high=0.25" in eps["suggestion"]["overrides"]


def test_noise_floor_and_fields_that_lower_entropy():
    series = {0.2: line(0.0, noise=0.1, steps=40, seed=1), 0.1: line(0.05, noise=0.1, steps=40, seed=2)}
    # eps_low: tightening it (smaller) raises entropy, so its gain is negative, as target_entropy
    # assumes for the low side; the suggestion drives clip with the low side only.
    result = step_response.analyse("eps_low", series)
    assert result["gains"]["0.1"] < 0
    assert "scheduler.high_scale=0" in result["suggestion"]["overrides"]
    assert result["noise_relative"] == pytest.approx(result["noise_std"] / 2.0, rel=0.05)
    assert result["noise_floor_worst_tracking_error"] == pytest.approx(2.5 * result["noise_relative"])


def test_no_suggestion_when_entropy_moves_the_wrong_way():
    series = {0.0: line(0.0), 0.05: line(-0.05)}  # a bonus that lowers entropy: no usable loop
    result = step_response.analyse("entropy_coef", series)
    assert result["suggestion"] is None
    assert "did not move the way target_entropy assumes" in result["why_no_suggestion"]
    with pytest.raises(ValueError, match="field must be one of"):
        step_response.analyse("lr", series)
    with pytest.raises(ValueError, match="baseline and at least one other"):
        step_response.analyse("entropy_coef", {0.0: line(0.0)})


def test_step_response_runs_end_to_end(tmp_path: Path) -> None:
    extra = [o for o in TINY_OVERRIDES if not o.startswith(("model=", "trainer.max_steps=", "trainer.val_check"))]
    out = tmp_path / "out"
    result = step_response.main(
        ["--model", "tiny", "--steps", "4", "--values", "0", "0.5", "--out-dir", str(out), "--extra", *extra]
    )
    saved = json.loads((out / "step_response.json").read_text())
    assert saved["field"] == "entropy_coef" and saved["steps"] == 4
    assert [len(points) for points in saved["series"].values()] == [4, 4]
    # The two runs share their first rollout (same seed, nothing trained yet) and then differ.
    first = [points[0][1] for points in saved["series"].values()]
    assert first[0] == pytest.approx(first[1])
    assert saved["series"]["0.0"][2][1] != saved["series"]["0.5"][2][1]
    assert set(result["gains"]) == {"0.5"}
    assert (out / "step_response.png").read_bytes()[:4] == b"\x89PNG"
    assert "| 0.5 |" in (out / "summary.md").read_text()


def test_step_response_rejects_bad_arguments(capsys) -> None:
    with pytest.raises(SystemExit):
        step_response.main(["--values", "0.1"])
    assert "--values needs a baseline" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        step_response.main(["--steps", "3"])
    assert "--steps must be >= 4" in capsys.readouterr().err
