"""Policy objectives: a registry of pure tensor functions (see ``base``)."""

from rlvr_lightning.objectives import (
    cispo,  # noqa: F401  (registers CISPO)
    cov,  # noqa: F401  (registers Clip-Cov and KL-Cov)
    gppo,  # noqa: F401  (registers GPPO and CE-GPPO)
    gspo,  # noqa: F401  (registers GSPO)
    ppo,  # noqa: F401  (registers the PPO family)
)
from rlvr_lightning.objectives.base import (
    AGGREGATIONS,
    LossNormalizer,
    ObjectiveParams,
    ObjectiveTerms,
    PolicyBatch,
    aggregate,
    available_objectives,
    compute_loss,
    get_objective,
    register_objective,
)

__all__ = [
    "AGGREGATIONS",
    "LossNormalizer",
    "ObjectiveParams",
    "ObjectiveTerms",
    "PolicyBatch",
    "aggregate",
    "available_objectives",
    "compute_loss",
    "get_objective",
    "register_objective",
]
