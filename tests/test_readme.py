"""The README stays true to the code: its quick-start test command is what CI runs, and the
custom-schedule listing is the file the tests import."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def test_ci_runs_the_readme_test_command() -> None:
    lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    command = [line for line in lines if line and not line.startswith(("#", "set ", "cd "))][-1]
    assert command in README


def test_custom_schedule_listing_is_the_example_file() -> None:
    section = README.split("### Write your own schedule", 1)[1]
    listing = re.search(r"```python\n(.*?)```", section, re.S).group(1).strip()
    source = (REPO / "rlvr_lightning" / "schedulers" / "examples.py").read_text()
    assert listing == source[source.index("from __future__") :].strip()


def test_every_config_group_option_is_documented() -> None:
    for group in ("objective", "scheduler", "model", "trainer", "sampling", "advantage", "rollout/engine", "correction", "logger"):
        for config in (REPO / "rlvr_lightning" / "conf" / group).glob("*.yaml"):
            assert f"`{config.stem}`" in README, f"{group}/{config.stem} is not in the README"


def test_engine_listing_is_the_example_file() -> None:
    section = README.split("### Your own engine", 1)[1]
    listing = re.search(r"```python\n(.*?)```", section, re.S).group(1).strip()
    source = (REPO / "examples" / "top_k_engine.py").read_text()
    assert listing == source[source.index("from __future__") :].strip()
