"""Policy objectives: a registry of pure tensor functions (see ``base``)."""

from rlvr_lightning.objectives import (
    cispo,  # noqa: F401  (registers CISPO)
    cov,  # registers Clip-Cov and KL-Cov
    dppo,  # registers DPPO
    gmpo,  # noqa: F401  (registers GMPO)
    gppo,  # noqa: F401  (registers GPPO and CE-GPPO)
    gspo,  # registers GSPO
    ppo,  # noqa: F401  (registers the PPO family)
    sapo,  # registers SAPO
)
from rlvr_lightning.objectives.base import (
    AGGREGATIONS,
    LossNormalizer,
    ObjectiveParams,
    ObjectiveTerms,
    PolicyBatch,
    aggregate,
    available_objectives,
    check_objective_options,
    compute_loss,
    declare_objective_options,
    get_objective,
    objective_options,
    register_objective,
    resolve_aggregation,
)

# The options each built-in objective reads from ``objective.options``, with their defaults (the
# modules' constants). Objectives not listed take no options: any key is an error. A new
# objective declares its own in ``register_objective(..., options={...})``.
declare_objective_options(
    "clip_cov",
    clip_cov_ratio=cov.CLIP_COV_RATIO,
    clip_cov_lower=cov.CLIP_COV_LOWER,
    clip_cov_upper=cov.CLIP_COV_UPPER,
)
declare_objective_options("kl_cov", kl_cov_ratio=cov.KL_COV_RATIO, kl_cov_coef=cov.KL_COV_COEF)
declare_objective_options("gspo", gspo_log_ratio_clamp=gspo.SEQUENCE_LOG_RATIO_CLAMP)
declare_objective_options("sapo", sapo_tau_pos=sapo.TAU_POS, sapo_tau_neg=sapo.TAU_NEG)
# DPPO: a null delta takes the variant's default (dppo.DEFAULT_DELTA).
declare_objective_options(
    "dppo", variant="tv", dppo_delta_low=None, dppo_delta_high=None, dppo_ratio_cap=dppo.RATIO_CAP
)

__all__ = [
    "AGGREGATIONS",
    "LossNormalizer",
    "ObjectiveParams",
    "ObjectiveTerms",
    "PolicyBatch",
    "aggregate",
    "available_objectives",
    "check_objective_options",
    "compute_loss",
    "declare_objective_options",
    "get_objective",
    "objective_options",
    "register_objective",
    "resolve_aggregation",
]
