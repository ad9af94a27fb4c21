"""End-to-end: every objective config trains through the real entry point and logs its metrics.

Each config in ``conf/objective`` runs ``train.run`` on the tiny model for 2 rollouts with
4 optimizer updates per rollout (2 epochs x 2 mini-batches), so the ratio leaves 1 and the
objective's own metrics come from real update passes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from rlvr_lightning.train import run
from tests.conftest import TINY_OVERRIDES, compose_config, read_scalars

OBJECTIVE_DIR = Path(__file__).resolve().parents[1] / "rlvr_lightning" / "conf" / "objective"
OBJECTIVES = sorted(path.stem for path in OBJECTIVE_DIR.glob("*.yaml"))

# 2 rollouts, validation once at the end, 4 updates per rollout.
FAST = [
    "validate_before_training=false",
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "rollout.epochs=2",
]

PPO_CLIP = ("clip_low_fraction", "clip_high_fraction", "dual_clip_fraction")
RATIO = ("ratio_mean", "ratio_max", "approx_kl_old")
# The clip bounds the objective reads (logged under control/; objective/eps_*_in_force would
# repeat them under the constant schedule, so it is not logged).
BOUNDS = ("control/eps_low", "control/eps_high")
ERC = ("erc_in_band_fraction", "erc_above_band_fraction", "erc_below_band_fraction")
GPPO = ("preserved_gradient_low_fraction", "preserved_gradient_high_fraction")
DYNAMIC_SAMPLING = ("sampling/generation_batches", "reward/mean_all_generated")


def objective_tags(*names: str) -> tuple[str, ...]:
    """``objective/<name>`` for a bare name; a name holding a ``/`` is a whole tag."""
    return tuple(name if "/" in name else f"objective/{name}" for name in names)


# Per config: (extra overrides, the tags that config must log besides the common ones).
EXPECTED: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "ppo": ((), objective_tags(*PPO_CLIP, *RATIO, *BOUNDS)),
    # GRPO with the paper's KL to the frozen reference: exercises the reference pass too.
    "grpo": (("objective.kl_coef=0.04",), objective_tags(*PPO_CLIP, *BOUNDS, "kl_ref")),
    "dapo": ((), objective_tags(*PPO_CLIP, *BOUNDS) + DYNAMIC_SAMPLING),
    "dr_grpo": ((), objective_tags(*PPO_CLIP, *BOUNDS)),
    "gppo": ((), objective_tags(*PPO_CLIP, *GPPO, *BOUNDS)),
    "ce_gppo": (
        (),
        objective_tags(*PPO_CLIP, *GPPO, *BOUNDS, "control/beta1", "control/beta2"),
    ),
    "cispo": (
        (),
        objective_tags(
            *RATIO,
            *BOUNDS,
            "cispo_weight_clipped_low_fraction",
            "cispo_weight_clipped_high_fraction",
        ),
    ),
    "gspo": (
        (),
        objective_tags(
            "sequence_clip_low_fraction",
            "sequence_clip_high_fraction",
            "sequence_ratio_mean",
            "sequence_ratio_max",
            *BOUNDS,
        ),
    ),
    "clip_cov": (
        (),
        objective_tags(*PPO_CLIP, *BOUNDS, "cov_selected_fraction", "cov_candidate_fraction", "cov_mean")
        + DYNAMIC_SAMPLING,
    ),
    "kl_cov": (
        (),
        objective_tags(*RATIO, *BOUNDS, "cov_selected_fraction", "cov_mean", "kl_cov_penalty_mean"),
    ),
    "erc_dapo": ((), objective_tags(*PPO_CLIP, *ERC, *BOUNDS) + DYNAMIC_SAMPLING),
    "erc_gppo": ((), objective_tags(*PPO_CLIP, *GPPO, *ERC, *BOUNDS)),
    "sapo": (
        (),
        objective_tags(
            "sapo_weight_mean_pos", "sapo_weight_mean_neg", "sapo_attenuated_fraction", *RATIO
        ),
    ),
    "gmpo": (
        (),
        objective_tags(
            "clip_low_fraction",
            "clip_high_fraction",
            "sequence_ratio_mean",
            "sequence_ratio_max",
            *BOUNDS,
        ),
    ),
    # Binary-KL here; the Binary-TV default runs in tests/test_objectives_next.py.
    "dppo": (
        ("objective.options.variant=kl",),
        objective_tags(
            "dppo_masked_high_fraction",
            "dppo_masked_low_fraction",
            "dppo_divergence_mean",
            "dppo_ratio_truncated_fraction",
            *RATIO,
        ),
    ),
}

COMMON = (
    "objective/policy_loss",
    "entropy/rollout",
    "entropy/update",
    "reward/mean",
    "reward/std",
    "reward/zero_variance_group_fraction",
    "entropy/region_none_fraction",
    "optim/loss",
    "val/accuracy",
)


def test_every_objective_config_has_expectations() -> None:
    missing = sorted(set(OBJECTIVES) - set(EXPECTED))
    assert not missing, f"add the metrics of conf/objective/{missing[0]}.yaml to EXPECTED"
    stale = sorted(set(EXPECTED) - set(OBJECTIVES))
    assert not stale, f"EXPECTED lists objectives with no config: {stale}"


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_objective_trains_and_logs_its_metrics(objective: str, tmp_path: Path) -> None:
    extra, tags = EXPECTED.get(objective, ((), ()))
    cfg = compose_config(TINY_OVERRIDES + FAST + [f"objective={objective}", *extra])
    metrics = run(cfg, run_dir=tmp_path / objective)

    assert "val/accuracy" in metrics
    assert (tmp_path / objective / "checkpoints" / "last.ckpt").is_file()
    scalars = read_scalars(tmp_path / objective)
    for tag in COMMON + tags:
        assert tag in scalars, f"{objective}: {tag} missing; have {sorted(scalars)}"
        if tag != "val/accuracy":
            assert [step for step, _ in scalars[tag]] == [0, 1], f"{objective}: {tag} steps"
    # Duplicates of control/ tags and settings the run does not change are not logged.
    for tag in ("control/updates_per_rollout", "objective/eps_low_in_force", "objective/eps_high_in_force"):
        assert tag not in scalars, f"{objective}: {tag} is logged"
    if "control/beta1" in scalars:  # CE-GPPO; GPPO's fixed coefficients stay as beta*_in_force
        assert "objective/beta1_in_force" not in scalars
    if not set(BOUNDS) & set(tags):  # SAPO and DPPO do not read the clip bounds
        assert not set(BOUNDS) & set(scalars), f"{objective}: logs bounds it does not use"
    for tag in tags:
        if tag.endswith("_fraction"):
            assert all(0.0 <= value <= 1.0 for _, value in scalars[tag]), f"{tag}: {scalars[tag]}"
    if "sampling/generation_batches" in tags:
        limit = int(cfg.sampling.max_generation_batches)
        assert all(1 <= value <= limit for _, value in scalars["sampling/generation_batches"])
    if objective == "grpo":
        # KL to the reference is 0 before the first update and >= 0 (k3 estimator) after.
        assert all(value >= 0.0 for _, value in scalars["objective/kl_ref"])


def test_one_update_per_rollout_warns_for_a_clipping_objective(tmp_path: Path) -> None:
    cfg = compose_config(
        TINY_OVERRIDES
        + FAST
        + ["objective=ppo", "rollout.mini_batches=1", "rollout.epochs=1", "trainer.max_steps=1"]
    )
    with pytest.warns(UserWarning, match="updates_per_rollout == 1"):
        run(cfg, run_dir=tmp_path / "one_update")
