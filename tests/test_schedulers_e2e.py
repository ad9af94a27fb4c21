"""End-to-end: every schedule config moves the thresholds the objective uses in real training.

Each config in ``conf/scheduler`` runs ``train.run`` on the tiny model for 3 rollouts (4 updates
each); the thresholds logged under ``control/`` and the bounds the objective reports as in force
(``objective/eps_*_in_force``, logged where probability-dependent bounds make them differ from
``control/eps_*``) must move for every non-constant schedule and stay put for ``constant``; the
controls a schedule does not use are not logged (``absent``). Open-loop schedules are also checked
value by value against their formulas.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from rlvr_lightning.control import ControlState
from rlvr_lightning.schedulers import ControlCallback, StepInfo
from rlvr_lightning.train import run
from tests.conftest import TINY_OVERRIDES, compose_config, read_scalars

SCHEDULER_DIR = Path(__file__).resolve().parents[1] / "rlvr_lightning" / "conf" / "scheduler"
SCHEDULERS = sorted(path.stem for path in SCHEDULER_DIR.glob("*.yaml"))
STEPS = 3

# 3 rollouts without validation (val_check_interval > max_steps), 4 updates per rollout.
FAST = [
    "validate_before_training=false",
    f"trainer.max_steps={STEPS}",
    "trainer.val_check_interval=100",
    "rollout.epochs=2",
    "objective=grpo",  # eps_low = eps_high = 0.2, no dual clip
]

IN_FORCE = ("objective/eps_low_in_force", "objective/eps_high_in_force")
# Never logged under GRPO without probability-dependent bounds: they would repeat control/eps_*,
# or hold a setting GRPO does not use (in the HParams summary instead).
UNUSED = IN_FORCE + ("control/high_prob_weight", "control/low_prob_weight", "control/beta1", "control/beta2")


def cosine(start: float, end: float, fraction: float) -> float:
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * fraction))


# Per config: overrides, the exact values of some tags at steps 0, 1, 2, the tags that must move
# over the 3 steps and the tags that must stay constant. T = 3 throughout.
SPECS: dict[str, dict] = {
    "constant": dict(
        overrides=[],
        exact={"control/eps_low": [0.2] * 3, "control/eps_high": [0.2] * 3},
        moving=(),
        constant=("control/eps_low", "control/eps_high"),
        absent=UNUSED + ("control/schedule_phase", "control/updates_per_rollout"),
    ),
    "linear": dict(  # eps_high 0.28 -> 0.2 over T
        overrides=[],
        exact={"control/eps_high": [0.28 - 0.08 * k / STEPS for k in range(STEPS)]},
        moving=("control/eps_high",),
        constant=("control/eps_low",),
        absent=UNUSED,
    ),
    "cosine": dict(
        overrides=[],
        exact={"control/eps_high": [cosine(0.28, 0.2, k / STEPS) for k in range(STEPS)]},
        moving=("control/eps_high",),
        constant=("control/eps_low",),
        absent=UNUSED,
    ),
    # ID, lam = 1 - 2k/T: weights (lam, 0) while k <= T/2, then (0, 1 + lam).
    "increase_then_decrease": dict(
        overrides=[],
        exact={
            "control/high_prob_weight": [1.0, 1.0 / 3.0, 0.0],
            "control/low_prob_weight": [0.0, 0.0, 2.0 / 3.0],
            "control/schedule_phase": [0.0, 0.0, 1.0],
            # Second phase: E+ is the plain epsilon again.
            "objective/eps_high_in_force": [None, None, 0.2],
            "objective/eps_low_in_force": [0.2, 0.2, None],
        },
        moving=("control/high_prob_weight", "control/low_prob_weight") + IN_FORCE,
        constant=("control/eps_low", "control/eps_high"),
    ),
    # DID: weights (1 - lam, 0) while k <= T/2, then (1, 1 + lam).
    "decrease_increase_decrease": dict(
        overrides=[],
        exact={
            "control/high_prob_weight": [0.0, 2.0 / 3.0, 1.0],
            "control/low_prob_weight": [0.0, 0.0, 2.0 / 3.0],
            "objective/eps_high_in_force": [0.2, None, None],
            "objective/eps_low_in_force": [0.2, 0.2, None],
        },
        moving=("control/high_prob_weight", "control/low_prob_weight") + IN_FORCE,
        constant=("control/eps_low", "control/eps_high"),
    ),
    # OD switches on the measured entropy. With the default initial_state=suppress it can only
    # switch (to boost) once the entropy falls to min_ratio * H_init = 0.2 * H_init, which a
    # few rollouts of the tiny model at lr 1e-5 never do (its entropy moves by ~1e-4 relative;
    # see test_oscillatory_default_holds_suppress). Starting in boost, the decaying ceiling
    # tau_high(1) = H_min + (H_init - H_min) * 2/3 = 0.73 * H_init lies below the barely
    # changed entropy, so the real rollout at step 1 flips the state to suppress.
    "oscillatory": dict(
        overrides=["scheduler.initial_state=boost"],
        exact={
            "control/od_state": [1.0, -1.0, -1.0],
            "control/high_prob_weight": [1.0, 0.0, 0.0],
            "control/low_prob_weight": [0.0, 1.0, 1.0],
            "objective/eps_high_in_force": [None, 0.2, 0.2],
            "objective/eps_low_in_force": [0.2, None, None],
        },
        moving=("control/high_prob_weight", "control/low_prob_weight", "control/od_tau_high")
        + IN_FORCE,
        constant=("control/eps_low", "control/eps_high", "control/od_entropy_init"),
    ),
    # actuator=clip, target 1.0 -> 0.5 of H_init (linear): the error is about -0.17 * H_init at step 1 and
    # -0.33 * H_init at step 2, far beyond what the rate limit (0.02 per rollout) lets through,
    # so eps_high steps down and eps_low up by exactly 0.02 after the error-free first step.
    "target_entropy": dict(
        overrides=["scheduler.actuator=clip"],
        exact={"control/eps_high": [0.2, 0.18, 0.16], "control/eps_low": [0.2, 0.22, 0.24]},
        # tracking_error = |H - target| / target: 0 at step 0 (target = H_init), then not.
        moving=("control/eps_low", "control/eps_high", "control/target_entropy",
                "control/tracking_error"),
        constant=(),
        absent=UNUSED,
    ),
    # Skywork-OR1's adaptive entropy coefficient with a target of 2 * H_init, far above the
    # measured entropy: the gate opens at step 0 and alpha rises by step_size every rollout;
    # the clip thresholds stay put.
    "adaptive_entropy": dict(
        overrides=["scheduler.relative_to_initial=true", "scheduler.target_entropy=2.0"],
        exact={
            "control/entropy_coef": [0.005, 0.01, 0.015],
            "control/entropy_coef_applied": [0.005, 0.01, 0.015],
            "control/entropy_gate": [1.0, 1.0, 1.0],
        },
        moving=("control/entropy_coef", "control/entropy_coef_applied"),
        constant=("control/eps_low", "control/eps_high", "control/entropy_target"),
    ),
    # CE-GPPO (0, 1) until half-way, then (0.5, 1): k/T = 2/3 >= 0.5 at step 2.
    "beta_stages": dict(
        overrides=["objective=ce_gppo"],
        exact={"control/beta1": [0.0, 0.0, 0.5], "control/beta2": [1.0, 1.0, 1.0]},
        moving=("control/beta1",),
        constant=("control/eps_low", "control/eps_high"),
        absent=IN_FORCE + ("objective/beta1_in_force", "objective/beta2_in_force"),
    ),
    # The README's custom schedule: symmetric clip for warmup_steps rollouts, then 0.28.
    "warmup_clip_higher": dict(
        overrides=["scheduler.warmup_steps=1"],
        exact={"control/eps_high": [0.2, 0.28, 0.28], "control/warmup": [1.0, 0.0, 0.0]},
        moving=("control/eps_high",),
        constant=("control/eps_low",),
        absent=UNUSED,
    ),
}


def values(scalars: dict, tag: str) -> list[float]:
    assert tag in scalars, f"{tag} missing; have {sorted(scalars)}"
    assert [step for step, _ in scalars[tag]] == list(range(STEPS)), f"{tag}: {scalars[tag]}"
    return [value for _, value in scalars[tag]]


def train(tmp_path: Path, name: str, *overrides: str) -> dict:
    run(compose_config(TINY_OVERRIDES + FAST + list(overrides)), run_dir=tmp_path / name)
    return read_scalars(tmp_path / name)


def test_every_scheduler_config_has_expectations() -> None:
    missing = sorted(set(SCHEDULERS) - set(SPECS))
    assert not missing, f"add the expected curve of conf/scheduler/{missing[0]}.yaml to SPECS"
    stale = sorted(set(SPECS) - set(SCHEDULERS))
    assert not stale, f"SPECS lists schedulers with no config: {stale}"


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_schedule_moves_the_thresholds_in_force(scheduler: str, tmp_path: Path) -> None:
    spec = SPECS.get(scheduler, dict(overrides=[], exact={}, moving=(), constant=()))
    scalars = train(tmp_path, scheduler, f"scheduler={scheduler}", *spec["overrides"])
    for tag, expected in spec["exact"].items():
        logged = values(scalars, tag)
        for step, (got, want) in enumerate(zip(logged, expected, strict=True)):
            if want is not None:
                assert got == pytest.approx(want, abs=1e-6), f"{tag} at step {step}: {logged}"
    for tag in spec["moving"]:
        logged = values(scalars, tag)
        assert max(logged) - min(logged) > 1e-4, f"{scheduler}: {tag} did not move: {logged}"
    for tag in spec["constant"]:
        logged = values(scalars, tag)
        assert max(logged) - min(logged) < 1e-7, f"{scheduler}: {tag} moved: {logged}"
    for tag in spec.get("absent", ()):
        assert tag not in scalars, f"{scheduler}: {tag} is logged: {scalars[tag]}"
    # The bound in force is a mix of the plain epsilon and the shaped one, within their range.
    for tag in IN_FORCE:
        if tag in scalars:
            assert all(0.0 < value <= 0.6 for value in values(scalars, tag)), scalars[tag]


def test_oscillatory_default_holds_suppress(tmp_path: Path) -> None:
    """The shipped OD config over 3 real rollouts: the ceiling decays, the state stays put."""
    scalars = train(tmp_path, "od", "scheduler=oscillatory")
    entropy_init = values(scalars, "entropy/rollout")[0]
    assert values(scalars, "control/od_entropy_init") == pytest.approx([entropy_init] * STEPS)
    minimum = 0.2 * entropy_init
    expected = [minimum + (entropy_init - minimum) * (1 - k / STEPS) for k in range(STEPS)]
    assert values(scalars, "control/od_tau_high") == pytest.approx(expected, rel=1e-6)
    assert values(scalars, "control/od_state") == [-1.0] * STEPS
    assert values(scalars, "control/low_prob_weight") == [1.0] * STEPS


class StepwiseBounds(ControlCallback):
    """Test schedule: sets (eps_low, eps_high) from a list indexed by the rollout step."""

    def __init__(self, eps_low: list[float], eps_high: list[float]) -> None:
        self.eps_low = list(eps_low)
        self.eps_high = list(eps_high)

    def update(self, control: ControlState, info: StepInfo) -> None:
        control.eps_low = self.eps_low[info.step]
        control.eps_high = self.eps_high[info.step]


def test_schedule_sets_the_bounds_the_objective_uses(tmp_path: Path) -> None:
    # Steps 1 and 2 get bounds far tighter than the ratio's spread after an update (~1e-3), so
    # clipping must show up wherever the advantages are non-zero; step 0's first update sees
    # r = 1 exactly and its bounds are wide.
    eps_low, eps_high = [0.3, 1e-5, 2e-5], [0.05, 3e-5, 1e-5]
    scalars = train(
        tmp_path,
        "stepwise",
        f"scheduler._target_={__name__}.StepwiseBounds",
        f"+scheduler.eps_low=[{','.join(map(str, eps_low))}]",
        f"+scheduler.eps_high=[{','.join(map(str, eps_high))}]",
        # Coin-flip rewards: a random tiny model solves nothing, and groups need mixed rewards.
        "reward.random_reward_probability=0.5",
    )
    assert values(scalars, "control/eps_low") == pytest.approx(eps_low, rel=1e-6)
    assert values(scalars, "control/eps_high") == pytest.approx(eps_high, rel=1e-6)
    # Plain bounds: the objective's bounds in force are these, so their tags are not logged.
    assert not set(IN_FORCE) & set(scalars)

    advantage = values(scalars, "reward/advantage_abs_mean")
    clipped = [
        low + high
        for low, high in zip(
            values(scalars, "objective/clip_low_fraction"),
            values(scalars, "objective/clip_high_fraction"),
            strict=True,
        )
    ]
    assert clipped[0] == 0.0, "bounds of 0.3/0.05 clip nothing at step 0 (ratio ~1)"
    signal = [k for k in (1, 2) if advantage[k] > 0]
    assert signal, f"coin-flip rewards gave no non-zero advantage at step 1 or 2; got {advantage}"
    for k in signal:
        assert clipped[k] > 0.0, f"tight bounds at step {k} clipped nothing: {clipped}"


@pytest.mark.parametrize(
    "scheduler,overrides",
    [
        ("target_entropy", ["scheduler.total_steps=3"]),
        ("oscillatory", ["scheduler.total_steps=3"]),
    ],
)
def test_schedule_state_survives_resume(
    scheduler: str, overrides: list[str], tmp_path: Path
) -> None:
    # total_steps is pinned to 3 so that the 2-step first leg follows the same curve as the
    # 3-step runs (otherwise T = trainer.max_steps = 2 there).
    common = [f"scheduler={scheduler}", *overrides]
    full = train(tmp_path, "full", *common)
    run(
        compose_config(TINY_OVERRIDES + FAST + common + ["trainer.max_steps=2"]),
        run_dir=tmp_path / "first",
    )
    ckpt = tmp_path / "first" / "checkpoints" / "last.ckpt"
    run(
        compose_config(TINY_OVERRIDES + FAST + common + [f"ckpt_path={ckpt}"]),
        run_dir=tmp_path / "resumed",
    )
    resumed = read_scalars(tmp_path / "resumed")
    assert [step for step, _ in resumed["reward/mean"]] == [2]

    # Every random draw derives from (seed, step): the resumed step 2 is the uninterrupted one.
    tags = [tag for tag in full if tag.startswith(("control/", "objective/eps_"))]
    tags += ["entropy/rollout", "reward/mean"]
    for tag in tags:
        assert resumed[tag][0][1] == full[tag][2][1], f"{tag}: {resumed[tag]} vs {full[tag]}"
