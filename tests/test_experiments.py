"""The experiment recipes in rlvr_lightning/conf/experiment/ are Hydra experiment configs: every arm
composes with ``+experiment=<recipe>/<arm>``, sets what tells it apart, shares its recipe's
settings, names its run folder, and runs with the plain train command as a multirun."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import TINY_OVERRIDES

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "rlvr_lightning" / "conf" / "experiment"
ARMS = sorted(
    f"{p.parent.name}/{p.stem}" for p in EXPERIMENTS.glob("*/*.yaml") if not p.name.startswith("_")
)
SCHEDULER = "rlvr_lightning.schedulers."

# What each arm sets: its distinguishing values (dotted key -> value). A new arm needs a row.
ARM_VALUES: dict[str, dict[str, object]] = {
    "schedules/constant": {"scheduler._target_": SCHEDULER + "ConstantSchedule"},
    "schedules/increase_then_decrease": {"scheduler._target_": SCHEDULER + "IncreaseThenDecrease"},
    "schedules/decrease_increase_decrease": {
        "scheduler._target_": SCHEDULER + "DecreaseIncreaseDecrease"
    },
    "schedules/oscillatory": {"scheduler._target_": SCHEDULER + "OscillatoryDecay"},
    "schedules/target_entropy": {"scheduler._target_": SCHEDULER + "TargetEntropy"},
    "objectives/grpo": {"objective.name": "grpo", "objective.control.eps_high": 0.2},
    "objectives/dapo": {
        "objective.name": "dapo",
        "objective.control.eps_high": 0.28,
        "sampling.dynamic": True,
    },
    "objectives/ce_gppo": {"objective.name": "ce_gppo", "objective.control.beta1": 0.5},
    "objectives/erc_dapo": {"objective.name": "dapo", "objective.control.erc_beta_high": 0.05},
    "random_rewards/symmetric_eps_0.2": {
        "objective.control.eps_low": 0.2,
        "objective.control.eps_high": 0.2,
    },
    "random_rewards/clip_low_0.05_high_off": {
        "objective.control.eps_low": 0.05,
        "objective.control.eps_high": 10.0,
    },
    "random_rewards/clip_low_0.05": {
        "objective.control.eps_low": 0.05,
        "objective.control.eps_high": 0.2,
    },
    "random_rewards/clip_high_0.05": {
        "objective.control.eps_low": 0.2,
        "objective.control.eps_high": 0.05,
    },
}
# The low-learning-rate arms: their base arm's clip bounds at lr 5e-6.
for _arm in ("symmetric_eps_0.2", "clip_low_0.05", "clip_high_0.05"):
    ARM_VALUES[f"random_rewards/{_arm}_lr_5e-6"] = {**ARM_VALUES[f"random_rewards/{_arm}"], "optim.lr": 5e-6}
ARM_VALUES |= {
    "ce_gppo_betas/b1_0_b2_1": {"objective.control.beta1": 0.0, "objective.control.beta2": 1.0},
    "ce_gppo_betas/b1_0.5_b2_1": {"objective.control.beta1": 0.5, "objective.control.beta2": 1.0},
    "ce_gppo_betas/b1_1_b2_1": {"objective.control.beta1": 1.0, "objective.control.beta2": 1.0},
    "ce_gppo_betas/b1_1_b2_0.5": {"objective.control.beta1": 1.0, "objective.control.beta2": 0.5},
    "entropy_control/constant_addition": {
        "data.operations": ["+"], "scheduler.curve": "constant", "scheduler.target_start": 0.5,
    },
    "entropy_control/constant_multiplication": {
        "data.operations": ["*"], "scheduler.curve": "constant", "scheduler.target_start": 0.5,
    },
    "entropy_control/linear_addition": {
        "data.operations": ["+"], "scheduler.curve": "linear", "scheduler.target_start": 0.8, "scheduler.target_end": 0.4,
    },
    "entropy_control/linear_multiplication": {
        "data.operations": ["*"], "scheduler.curve": "linear", "scheduler.target_start": 0.8, "scheduler.target_end": 0.4,
    },
}

# What every arm of a recipe shares (from its _base.yaml).
SHARED: dict[str, dict[str, object]] = {
    "schedules": {"objective.name": "grpo", "rollout.epochs": 2, "data.operations": ["*"]},
    "objectives": {
        "scheduler._target_": SCHEDULER + "ConstantSchedule",
        "rollout.epochs": 2,
        "data.operations": ["*"],
    },
    "random_rewards": {
        "objective.name": "ppo",
        "reward.random_reward_probability": 0.5,
        "rollout.epochs": 4,
        "optim.lr": 3e-5,
        "data.operations": ["+"],
    },
    "ce_gppo_betas": {
        "objective.name": "ce_gppo",
        "optim.lr": 2e-5,
        "rollout.epochs": 2,
        "data.operations": ["*"],
    },
    "entropy_control": {
        "objective.name": "grpo",
        "scheduler._target_": SCHEDULER + "TargetEntropy",
        "scheduler.actuator": "entropy_coef",
        "trainer.max_steps": 40,
        "rollout.prompts_per_step": 8,
        "rollout.group_size": 4,
    },
}
# The four recipes of the papers' findings: 4 prompts x 4 samples, 30 steps, 3 seeds each.
for _recipe in ("schedules", "objectives", "random_rewards", "ce_gppo_betas"):
    SHARED[_recipe].update(
        {"rollout.prompts_per_step": 4, "rollout.group_size": 4, "trainer.max_steps": 30, "recipe.seeds": [0, 1, 2]}
    )
COMMON = {
    "validate_before_training": False,
    "trainer.val_check_interval": 1000,
}


def compose_with_hydra(overrides: list[str]):
    """The config as ``python -m rlvr_lightning.train <overrides>`` composes it, Hydra's node included."""
    from hydra import compose, initialize_config_dir

    from rlvr_lightning.train import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


def test_every_recipe_has_arms_and_every_arm_a_row() -> None:
    recipes = sorted(p.parent.name for p in EXPERIMENTS.glob("*/_base.yaml"))
    assert recipes == sorted(SHARED)
    assert set(ARMS) == set(ARM_VALUES)
    for path in EXPERIMENTS.rglob("*.yaml"):
        assert path.read_text().startswith("# @package _global_\n"), (
            f"{path} lacks '# @package _global_'"
        )


@pytest.mark.parametrize("experiment", ARMS)
def test_experiment_composes_with_its_values(experiment: str) -> None:
    recipe, arm = experiment.split("/")
    cfg = compose_with_hydra([f"+experiment={experiment}", "seed=3"])
    choices = cfg.hydra.runtime.choices
    assert choices.experiment == experiment
    assert choices.model == "smollm2_135m"
    for key, value in {**COMMON, **SHARED[recipe], **ARM_VALUES[experiment]}.items():
        actual = OmegaConf.select(cfg, key)
        expected = pytest.approx(value) if isinstance(value, float) else value
        assert actual == expected, f"{experiment}: {key}={actual!r}, expected {value!r}"
    assert (cfg.recipe.name, cfg.recipe.arm) == (recipe, arm)
    assert cfg.recipe.description and cfg.recipe.tags and list(cfg.recipe.seeds)

    # The run folder names the recipe, the arm and the seed; a multirun's job folder too.
    run_dir = cfg.hydra.run.dir
    assert re.fullmatch(
        rf"outputs/runs/\d{{4}}-\d\d-\d\d_\d\d-\d\d-\d\d_{recipe}_{re.escape(arm)}_seed3", run_dir
    ), run_dir
    cfg.hydra.job.num = 5
    assert cfg.hydra.sweep.subdir == f"5_{recipe}_{arm}_seed3"
    assert cfg.hydra.sweep.dir.startswith("outputs/multirun/")


def test_command_line_overrides_win_over_the_experiment() -> None:
    cfg = compose_with_hydra(
        ["+experiment=schedules/oscillatory", "model=tiny", "objective=dapo", "trainer.max_steps=2"]
    )
    assert cfg.model.source == "tiny"
    assert cfg.objective.name == "dapo"
    assert cfg.scheduler._target_ == SCHEDULER + "OscillatoryDecay"
    assert cfg.trainer.max_steps == 2
    assert cfg.rollout.epochs == 2  # still the recipe's


def test_run_folder_without_an_experiment_is_unchanged() -> None:
    from hydra.core.hydra_config import HydraConfig

    cfg = compose_with_hydra(["objective=dapo"])
    assert "recipe" not in cfg
    cfg.hydra.job.num = 1
    HydraConfig.instance().set_config(cfg)  # the folder names hold ${hydra:runtime.choices.<group>}
    try:
        # <date>_<time>_<objective>_<schedule>
        assert re.fullmatch(r"outputs/runs/\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_dapo_constant", cfg.hydra.run.dir)
        assert cfg.hydra.sweep.subdir == "1_dapo_constant"
    finally:
        HydraConfig.instance().cfg = None


def test_train_command_runs_a_multirun_over_arms_and_seeds(tmp_path: Path) -> None:
    """The issue's command: ``python -m rlvr_lightning.train -m +experiment=a,b seed=0,1``."""
    tiny = [
        o
        for o in TINY_OVERRIDES
        if not o.startswith(("trainer.max_steps=", "trainer.val_check_interval="))
    ]
    arms = "random_rewards/symmetric_eps_0.2,random_rewards/clip_low_0.05_high_off"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "rlvr_lightning.train",
            "-m",
            f"+experiment={arms}",
            "seed=0,1",
            *tiny,
            "trainer.max_steps=1",
            "rollout.epochs=1",
            "data.num_train=20",
            f"hydra.sweep.dir={tmp_path}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p.name for p in tmp_path.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert jobs == [
        "0_random_rewards_symmetric_eps_0.2_seed0",
        "1_random_rewards_symmetric_eps_0.2_seed1",
        "2_random_rewards_clip_low_0.05_high_off_seed0",
        "3_random_rewards_clip_low_0.05_high_off_seed1",
    ]
    for job in jobs:
        assert (tmp_path / job / "checkpoints" / "last.ckpt").is_file()
        written = OmegaConf.load(tmp_path / job / "config.yaml")
        assert written.recipe.arm in job and f"seed{written.seed}" in job
        assert written.objective.control.eps_low == (0.2 if "symmetric" in job else 0.05)
