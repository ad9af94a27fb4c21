"""The README's metrics table lists every tag a run logs, and nothing no run logs.

The table's first column holds backticked tag patterns: ``{a,b}`` is one of the alternatives,
``<k>`` any one path part (``val/pass@<k>``). The tags compared with it are those of a short
tiny-model run made here (scalars and histograms, timings included) and those of every run
``tests/test_golden.py`` guards (``tests/golden/scalars.json``: each objective and schedule).
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest

from rlvr_lightning.train import run
from tests.conftest import TINY_OVERRIDES, compose_config, read_scalars

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
GOLDEN = REPO / "tests" / "golden" / "scalars.json"

# One run that logs much: ERC on GPPO, the ID schedule (probability-dependent bounds), the KL
# term (reference pass), 4 updates per rollout (pre-update pass), validation, histograms.
RUN_OVERRIDES = [
    "objective=erc_gppo",
    "scheduler=increase_then_decrease",
    "objective.kl_coef=0.04",
    "rollout.epochs=2",
    "reward.random_reward_probability=0.5",
    "logging.histogram_every_n_steps=1",
]

# Documented tags that neither that run nor a guarded run logs, and why.
NOT_IN_GUARDED_RUNS = {
    # Only when prompts exceed rollout.max_prompt_tokens.
    "data/overlong_prompts_dropped", "data/overlong_prompts_truncated", "optim/skipped_steps_without_prompts",
    "objective/nll_correct",  # objective.nll_coef > 0
    # Probability-bound shape and the entropy mask: logged only when set away from the defaults
    # or moved by a schedule; no shipped schedule moves them.
    "control/high_prob_slope", "control/high_prob_intercept", "control/low_prob_slope",
    "control/low_prob_intercept", "control/prob_eps_min", "control/prob_eps_max", "control/entropy_quantile",
    "objective/entropy_mask_threshold", "objective/entropy_mask_kept_fraction",
    "entropy/kept_mean", "entropy/dropped_mean",
    # Rollout correction weights: correction=tis, mis, ... (the default, none, logs the mismatch only).
    "rollout_correction/weight_mean", "rollout_correction/ess", "rollout_correction/truncated_fraction",
    "rollout_correction/masked_fraction",
    "reward/pass_at_k_group_mean",  # advantage=pass_at_k
}


def table_patterns(readme: str) -> list[str]:
    """The backticked patterns of the first column of the table under ``## Metrics``."""
    section = readme.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    assert rows, "no table rows under ## Metrics"
    return [pattern for row in rows for pattern in re.findall(r"`([^`]+)`", row.split("|")[1])]


def expand(pattern: str) -> list[str]:
    """``{a,b}`` alternatives spelled out: ``x/{a,b}_y`` -> ``x/a_y``, ``x/b_y``."""
    parts = re.split(r"(\{[^{}]*\})", pattern)
    choices = [part[1:-1].split(",") if part.startswith("{") else [part] for part in parts]
    return ["".join(combination) for combination in itertools.product(*choices)]


def regex(tag_pattern: str) -> re.Pattern[str]:
    """``<k>`` matches one path part; everything else is literal."""
    pieces = re.split(r"<[^<>/]+>", tag_pattern)
    return re.compile("[^/]+".join(re.escape(piece) for piece in pieces))


def logged_tags(run_dir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set(read_scalars(run_dir))
    for path in run_dir.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(path), size_guidance={"histograms": 1})
        accumulator.Reload()
        tags |= set(accumulator.Tags()["histograms"])
    return tags


@pytest.fixture(scope="module")
def tags(tmp_path_factory) -> tuple[set[str], set[str]]:
    """(the tags of the run made here, those of the guarded runs)."""
    run_dir = tmp_path_factory.mktemp("metrics_table") / "run"
    run(compose_config(TINY_OVERRIDES + RUN_OVERRIDES), run_dir=run_dir)
    guarded = {tag for recorded in json.loads(GOLDEN.read_text()).values() for tag in recorded["scalars"]}
    return logged_tags(run_dir), guarded


def test_the_table_parses() -> None:
    assert expand("time/{generate,update}_seconds") == ["time/generate_seconds", "time/update_seconds"]
    assert regex("val/pass@<k>").fullmatch("val/pass@4") and not regex("val/pass@<k>").fullmatch("val/maj@4")
    patterns = [tag for pattern in table_patterns(README.read_text()) for tag in expand(pattern)]
    assert "entropy/rollout" in patterns and len(patterns) == len(set(patterns)), "a tag listed twice"


def test_every_logged_tag_is_in_the_metrics_table(tags: tuple[set[str], set[str]]) -> None:
    here, guarded = tags
    assert {"entropy/rollout", "time/step_seconds", "hist/entropy", "val/pass@2"} <= here
    documented = [regex(tag) for pattern in table_patterns(README.read_text()) for tag in expand(pattern)]
    missing = sorted(tag for tag in here | guarded if not any(r.fullmatch(tag) for r in documented))
    assert not missing, f"logged but not in README.md's metrics table: {missing}"


def test_every_tag_in_the_metrics_table_is_logged(tags: tuple[set[str], set[str]]) -> None:
    logged = tags[0] | tags[1]
    documented = [tag for pattern in table_patterns(README.read_text()) for tag in expand(pattern)]
    stale = sorted(
        tag for tag in documented
        if tag not in NOT_IN_GUARDED_RUNS and not any(regex(tag).fullmatch(name) for name in logged)
    )
    assert not stale, (
        f"in README.md's metrics table but logged by no guarded run: {stale} (remove them, or add "
        "them to NOT_IN_GUARDED_RUNS with the setting that logs them)"
    )
