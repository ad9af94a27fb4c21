"""The ``logger`` config group (``conf/logger/*.yaml``): Lightning's own loggers, writing into the
run folder.

``logger=tensorboard`` (default), ``csv``, ``wandb`` (offline by default) or ``mlflow`` (a local
file store). Each YAML names the class (``_target_``) and its arguments; ``save_dir`` is relative
to the run folder. The module logs through ``Logger.log_metrics`` only, so any Lightning logger
works; what only TensorBoard has (text panels) is used where the experiment offers it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf

CONF_DIR = Path(__file__).resolve().parent / "conf" / "logger"


def build_logger(config: DictConfig | Mapping[str, Any] | None, run_dir: str | Path) -> Logger:
    """The logger ``config`` describes (None: ``conf/logger/tensorboard.yaml``), with its
    ``save_dir`` joined to ``run_dir`` (an absolute ``save_dir`` is kept)."""
    if config is None:
        config = OmegaConf.load(CONF_DIR / "tensorboard.yaml")
    options = OmegaConf.to_container(config, resolve=True) if isinstance(config, DictConfig) else dict(config)
    save_dir = Path(run_dir) / str(options.pop("save_dir", None) or ".")
    target = str(options.get("_target_", ""))
    if target.endswith("MLFlowLogger") and not options.get("tracking_uri"):
        # MLflow 3 refuses a folder as its store unless told otherwise; a run folder's own store
        # is what logger=mlflow asks for. An explicit MLFLOW_ALLOW_FILE_STORE is left as set.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return instantiate(options, save_dir=str(save_dir))


def finish_logger(logger: Logger | None, failed: bool = False) -> None:
    """Close what Lightning leaves open at the end of ``fit``: a W&B run (the next ``WandbLogger``
    of the same process, e.g. the next job of a Hydra multirun, would log into it otherwise)."""
    if type(logger).__name__ != "WandbLogger":
        return
    import wandb

    if wandb.run is not None:
        wandb.finish(exit_code=1 if failed else 0)
