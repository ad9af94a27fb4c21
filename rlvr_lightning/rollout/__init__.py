"""Rollouts: sample ``group_size`` completions per prompt and lay them out for training.

``engine.py`` holds the protocol every engine follows (``RolloutEngine.generate(prompts,
group_size, SamplingParams) -> Rollout`` and ``close()``) and the registry; one file per engine
(``shared_prefix``, ``static``, ``hf``, ``vllm``) registers itself; ``collector.py`` turns a
step's prompts into a scored rollout with advantages.
"""

import importlib
import pkgutil

from rlvr_lightning.rollout.engine import (
    ENGINES,
    RolloutEngine,
    SamplingParams,
    build_engine,
    check_engine_options,
    engine_class,
    engine_options,
    generate_rollout,
    register_engine,
)
from rlvr_lightning.rollout.sampling import draw_categorical, sample_next
from rlvr_lightning.rollout.shared_prefix import sample_shared_prefix
from rlvr_lightning.rollout.types import (
    Rollout,
    eos_token_ids,
    merge_rollouts,
    response_mask_from_ids,
)

__all__ = [
    "ENGINES",
    "Rollout",
    "RolloutEngine",
    "SamplingParams",
    "build_engine",
    "check_engine_options",
    "draw_categorical",
    "engine_options",
    "engine_class",
    "eos_token_ids",
    "generate_rollout",
    "merge_rollouts",
    "register_engine",
    "response_mask_from_ids",
    "sample_next",
    "sample_shared_prefix",
]

# Every module of this package is imported, so an engine's file registers it by being there.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
