"""Config validation, run before any model loads: fail in a second with a useful message."""

from __future__ import annotations

from omegaconf import DictConfig

from rlvr_lightning.advantages import ADVANTAGE_ESTIMATORS
from rlvr_lightning.objectives import AGGREGATIONS, available_objectives


class ConfigError(ValueError):
    """A config value is invalid; the message names the field and the allowed values."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate_config(cfg: DictConfig) -> None:
    objective = cfg.objective
    _require(
        objective.name in available_objectives(),
        f"objective.name={objective.name!r} is unknown; available: {', '.join(available_objectives())}",
    )
    if objective.get("aggregation") is not None:
        _require(objective.aggregation in AGGREGATIONS, f"objective.aggregation={objective.aggregation!r}; use one of {AGGREGATIONS}")
    _require(objective.advantage in ADVANTAGE_ESTIMATORS, f"objective.advantage={objective.advantage!r}; use one of {ADVANTAGE_ESTIMATORS}")
    control = objective.control
    for field in ("eps_low", "eps_high"):
        _require(control[field] >= 0, f"objective.control.{field}={control[field]} must be >= 0")
    _require(
        control.eps_low <= 1,
        f"objective.control.eps_low={control.eps_low} must be <= 1 (lower clip bound 1 - eps_low >= 0; 1 means no lower bound)",
    )
    for field in ("beta1", "beta2"):
        _require(control[field] >= 0, f"objective.control.{field}={control[field]} must be >= 0")
    if control.get("dual_clip") is not None:
        _require(control.dual_clip > 1, f"objective.control.dual_clip={control.dual_clip} must be > 1, or null to turn it off")
    erc = (control.get("erc_beta_low"), control.get("erc_beta_high"))
    _require((erc[0] is None) == (erc[1] is None), "objective.control.erc_beta_low and erc_beta_high must both be set or both null")
    if erc[0] is not None:
        _require(0 < erc[0] < 1 and erc[1] > 0, f"ERC band ({erc[0]}, {erc[1]}): need 0 < erc_beta_low < 1 and erc_beta_high > 0")
    for field in ("kl_coef", "entropy_coef", "nll_coef"):
        _require(objective.get(field, 0) >= 0, f"objective.{field}={objective.get(field)} must be >= 0")

    rollout = cfg.rollout
    for field in ("prompts_per_step", "group_size", "max_new_tokens", "epochs", "mini_batches", "max_tokens_per_micro_batch"):
        _require(int(rollout[field]) >= 1, f"rollout.{field}={rollout[field]} must be >= 1")
    _require(rollout.temperature > 0, f"rollout.temperature={rollout.temperature} must be > 0")
    _require(0 < rollout.top_p <= 1, f"rollout.top_p={rollout.top_p} must be in (0, 1]")
    if objective.advantage == "grpo":
        _require(rollout.group_size >= 2, "rollout.group_size=1 with the group-normalised grpo advantage: use group_size >= 2 (or objective.advantage=dr_grpo)")
    _require(
        rollout.prompts_per_step % rollout.mini_batches == 0,
        f"rollout.mini_batches={rollout.mini_batches} does not divide rollout.prompts_per_step="
        f"{rollout.prompts_per_step}: mini-batches hold whole groups; choose a divisor of {rollout.prompts_per_step}",
    )
    _require(cfg.optim.lr > 0, f"optim.lr={cfg.optim.lr} must be > 0")
    _require(int(cfg.trainer.max_steps) >= 1, f"trainer.max_steps={cfg.trainer.max_steps} must be >= 1")
