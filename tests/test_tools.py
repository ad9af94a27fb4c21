"""tools/compare_schedules.py, tools/plot_run.py and tools/run_experiment.py on the tiny model."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import FLOAT32, TINY_OVERRIDES
from tools import compare_schedules, plot_run

REPO = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SCHEDULES = ("constant", "linear")


def assert_png(path: Path) -> None:
    import matplotlib.image

    assert path.is_file(), f"{path} was not written"
    assert path.read_bytes()[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    height, width = matplotlib.image.imread(path).shape[:2]
    assert height > 100 and width > 100


@pytest.fixture(scope="module")
def comparison(tmp_path_factory) -> Path:
    """Two schedules, 2 rollouts each, through the tool's command-line entry point."""
    out_dir = tmp_path_factory.mktemp("compare") / "out"
    extra = [o for o in TINY_OVERRIDES if not o.startswith(("model=", "trainer.max_steps="))]
    extra += ["validate_before_training=false", "trainer.val_check_interval=2"]
    returned = compare_schedules.main(
        [
            "--model",
            "tiny",
            "--steps",
            "2",
            "--schedules",
            *SCHEDULES,
            "--trainer",
            "cpu",
            "--out-dir",
            str(out_dir),
            "--extra",
            *extra,
        ]
    )
    assert returned == out_dir
    return out_dir


def test_compare_schedules_writes_runs_plot_and_summary(comparison: Path) -> None:
    for name in SCHEDULES:
        assert (comparison / name / "checkpoints" / "last.ckpt").is_file()
    assert_png(comparison / "schedules.png")
    summary = (comparison / "summary.md").read_text()
    assert "model=tiny objective=grpo scheduler=<schedule>" in summary
    assert "rollout.epochs=2" in summary
    rows = [line for line in summary.splitlines() if line.startswith(("| constant", "| linear"))]
    assert len(rows) == 2, summary
    constant = [cell.strip() for cell in rows[0].strip("|").split("|")]
    linear = [cell.strip() for cell in rows[1].strip("|").split("|")]
    assert constant[:2] == ["constant", "2"]
    # mean eps_high in force: 0.2 for constant; linear goes 0.28 -> 0.24 over the 2 steps.
    assert float(constant[5]) == pytest.approx(0.2, abs=1e-4)
    assert float(linear[5]) == pytest.approx(0.26, abs=1e-4)
    assert float(constant[6]) >= 0.0  # validation ran once, at the end


def test_plot_run_cli_with_tags_and_labels(comparison: Path, tmp_path: Path) -> None:
    out = tmp_path / "plot.png"
    result = subprocess.run(
        [
            sys.executable,
            "tools/plot_run.py",
            *(str(comparison / n) for n in SCHEDULES),
            "--tags",
            "entropy/rollout",
            "control/eps_high",
            "objective/eps_high_in_force",
            "--labels",
            "A",
            "B",
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert_png(out)


def test_read_scalars_later_events_file_wins(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    for value in (1.0, 2.0):  # a run resumed into the same folder writes a second file
        writer = SummaryWriter(str(tmp_path / "tensorboard"), filename_suffix=f".{value:.0f}")
        writer.add_scalar("reward/mean", value, global_step=1)
        writer.add_scalar("reward/mean", value, global_step=int(value) + 1)
        writer.close()
    assert plot_run.read_scalars(tmp_path)["reward/mean"] == [(1, 2.0), (2, 1.0), (3, 2.0)]


def test_plot_run_errors_are_clear(comparison: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no TensorBoard events file"):
        plot_run.plot_runs([tmp_path / "empty"], out=tmp_path / "x.png")
    with pytest.raises(ValueError, match="several runs"):
        plot_run.plot_runs([comparison], out=tmp_path / "x.png")
    with pytest.raises(ValueError, match="labels"):
        plot_run.plot_runs([comparison / "constant"], labels=["a", "b"], out=tmp_path / "x.png")
    with pytest.raises(SystemExit) as exit_info:
        plot_run.main([str(tmp_path / "empty"), "--out", str(tmp_path / "x.png")])
    assert exit_info.value.code == 2
    assert not (tmp_path / "x.png").exists()


def test_compare_schedules_runs_as_a_script() -> None:
    result = subprocess.run(
        [sys.executable, "tools/compare_schedules.py", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--schedules" in result.stdout and "--extra" in result.stdout


def test_run_experiment_lists_recipes_and_arms() -> None:
    from tools.run_experiment import arms, recipes

    assert recipes() == ["ce_gppo_betas", "entropy_control", "objectives", "random_rewards", "schedules"]
    assert arms("ce_gppo_betas") == ["b1_0_b2_1", "b1_0.5_b2_1", "b1_1_b2_0.5", "b1_1_b2_1"]
    with pytest.raises(FileNotFoundError, match="available: ce_gppo_betas"):
        arms("no_such_recipe")


def test_run_experiment_states_what_each_arm_file_sets() -> None:
    from tools.run_experiment import RECIPES, file_settings

    # Group overrides only (the objectives arms): no empty key left over.
    assert file_settings(RECIPES / "objectives" / "grpo.yaml") == "objective=grpo"
    assert file_settings(RECIPES / "random_rewards" / "clip_high_0.05.yaml") == (
        "objective.control.eps_low=0.2 objective.control.eps_high=0.05"
    )
    # An arm built on another arm names it, then what it changes.
    assert file_settings(RECIPES / "random_rewards" / "clip_low_0.05_lr_5e-6.yaml") == (
        "+experiment=random_rewards/clip_low_0.05 optim.lr=5e-06"
    )


def test_run_experiment_smoke(tmp_path: Path) -> None:
    """Two arms of a recipe on the tiny model, 2 steps, 2 seeds, through the command line."""
    from tools.run_experiment import main

    extra = ["trainer.max_steps=2", "rollout.prompts_per_step=2", "rollout.group_size=4",
             "rollout.max_new_tokens=8", "rollout.epochs=1", "data.num_train=50", "data.num_val=4", FLOAT32]
    arms = ["--arms", "clip_low_0.05_high_off", "symmetric_eps_0.2"]
    out = main(["random_rewards", *arms, "--model", "tiny", "--seeds", "0", "1", "--out-dir", str(tmp_path),
                "--extra", *extra])
    assert out == tmp_path
    assert_png(out / "random_rewards.png")
    arm_names = ("symmetric_eps_0.2", "clip_low_0.05_high_off")
    for arm in arm_names:
        for seed in (0, 1):
            assert (out / f"{arm}_seed{seed}" / "checkpoints" / "last.ckpt").is_file()
    summary = (out / "summary.md").read_text()
    assert "+experiment=random_rewards/clip_low_0.05_high_off,random_rewards/symmetric_eps_0.2 seed=0,1" in summary
    assert "objective=ppo" in summary and "objective.control.eps_low=0.05" in summary
    # Per arm: mean [min, max] over the two seeds; per run: one row each.
    rows = {line.split("|")[1].strip(): line for line in summary.splitlines() if line.startswith("| ")}
    for arm in arm_names:
        assert rows[arm].split("|")[2].strip() == "0,1"
        assert re.search(r"\d\.\d{4} \[\d\.\d{4}, \d\.\d{4}\]", rows[arm]), rows[arm]
        assert f"{arm}_seed0" in rows and f"{arm}_seed1" in rows

    with pytest.raises(ValueError, match="has no arm"):
        main(["random_rewards", "--arms", "no_such_arm", "--out-dir", str(tmp_path / "x")])

    # --report rebuilds the tables from the runs without training; the recipe's own columns.
    for run in out.glob("*_seed*"):
        (run / "checkpoints" / "last.ckpt").unlink()
    main(["random_rewards", *arms, "--model", "tiny", "--seeds", "0", "1", "--out-dir", str(tmp_path), "--report",
          "--extra", *extra, "+recipe.columns=[[reward worst from 1,reward/mean,max_from_1]]"])
    assert not any(out.glob("*_seed*/checkpoints/last.ckpt"))  # nothing trained again
    report = (out / "summary.md").read_text()
    assert "| arm | seeds | reward worst from 1 | wall s |" in report
    with pytest.raises(FileNotFoundError, match="run that arm and seed first"):
        main(["random_rewards", *arms, "--model", "tiny", "--seeds", "7", "--out-dir", str(tmp_path), "--report"])


def test_run_experiment_reductions() -> None:
    from tools.run_experiment import recipe_columns, reduce

    points = [(0, 1.0), (4, 3.0), (5, 2.0), (9, 6.0)]
    assert reduce(points, "first") == 1.0 and reduce(points, "last") == 6.0 and reduce(points, "mean") == 3.0
    assert reduce(points, "mean_from_5") == 4.0 and reduce(points, "max_from_5") == 6.0
    assert reduce(points, "mean_to_4") == 2.0 and reduce(points, "max_from_10") is None
    with pytest.raises(ValueError, match="column reduction 'median' is unknown"):
        reduce(points, "median")
    with pytest.raises(ValueError, match=r"must be \[header, tag, reduction\]"):
        recipe_columns({"columns": [["entropy", "entropy/rollout"]]})
