"""Training entry point: ``python -m rlvr_lightning.train [group=option ...] [key=value ...]``.

Thin by design: compose the config, validate it, instantiate the data module, the module, the
callbacks, the logger and the trainer, then fit. Everything else lives in the package.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from rlvr_lightning.allocator import keep_freed_memory
from rlvr_lightning.callbacks import DashboardLogger, SampleLogger
from rlvr_lightning.checkpoints import (
    AtomicCheckpointIO,
    check_checkpoint_fits,
    read_resume_checkpoint,
)
from rlvr_lightning.config import validate_config
from rlvr_lightning.dashboard import run_hparams
from rlvr_lightning.loggers import build_logger, finish_logger
from rlvr_lightning.module import RLVRModule
from rlvr_lightning.precision import resolve_precision
from rlvr_lightning.preemption import PreemptionCallback
from rlvr_lightning.preflight import (
    check_output_folders,
    remove_unused_run_folder,
    warn_long_prompts,
    write_run_files,
)
from rlvr_lightning.progress import RolloutProgressBar
from rlvr_lightning.resume import ResumeConfig, plan_resume, sharded_metadata

# Lightning warnings that do not apply to this loop: optimizer steps are taken inside the
# training step on purpose (manual optimisation), and checkpoints hold the post-update state.
warnings.filterwarnings("ignore", message=".*no pre-optimization state was saved.*")
warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*")

CONFIG_DIR = str(Path(__file__).resolve().parent / "conf")


def run_dir_of(cfg: DictConfig) -> Path:
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(cfg.get("run_dir") or "outputs/runs/unnamed")


def say(trainer: pl.Trainer, message: str) -> None:
    """Print once per run: on rank 0 (every rank runs this script under DDP/FSDP)."""
    if trainer.is_global_zero:
        print(f"[rlvr_lightning] {message}")


def build(
    cfg: DictConfig, run_dir: Path, validate: bool = True
) -> tuple[pl.Trainer, RLVRModule, pl.LightningDataModule]:
    """Instantiate the trainer, the module and the data module from a composed config
    (validated first unless the caller already did: ``validate=False``)."""
    if validate:
        validate_config(cfg)
    keep_freed_memory(cfg.get("malloc_threshold_mib"))
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    container: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    sampling = container["sampling"]
    generation_batches = int(sampling["max_generation_batches"]) if sampling["dynamic"] else 1
    datamodule = instantiate(cfg.data, generation_batches_per_step=generation_batches)
    datamodule.setup("fit")
    # trainer.precision=auto: bf16-mixed on a CPU with native bf16, else 32-true (precision.py).
    precision = resolve_precision(container["trainer"])
    module = RLVRModule(
        model=container["model"],
        objective=container["objective"],
        rollout=container["rollout"],
        optim=container["optim"],
        reward=container["reward"],
        prompt=container["prompt"],
        sampling=sampling,
        advantage=container["advantage"],
        validation=container["validation"],
        correction=container.get("correction"),
        seed=int(cfg.seed),
        precision=precision.record(),
    )
    every = int(cfg.checkpoint.every_n_steps)
    checkpoint = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="step_{step}",
        auto_insert_metric_name=False,  # step_2.ckpt, not step_step=2.ckpt ("=" needs quoting in Hydra)
        every_n_train_steps=every or None,
        save_top_k=-1 if every else 0,  # 0: keep only last.ckpt (written when training stops)
        save_last=bool(cfg.checkpoint.save_last),
        save_on_train_epoch_end=True,
    )
    logging = container["logging"]
    callbacks = [
        instantiate(cfg.scheduler),
        checkpoint,
        SampleLogger(logging["sample_every_n_steps"], logging["num_groups"]),
        # TensorBoard: custom-scalars layout, HParams summary, histograms (rlvr_lightning/dashboard.py).
        DashboardLogger(
            logging["histogram_every_n_steps"],
            {**run_hparams(cfg, module.control), "trainer.precision": str(precision.precision)},
        ),
    ]
    # On SIGTERM/SIGINT: finish the step, save checkpoints/preempted.ckpt, print the resume
    # command, exit 143/130 (after ModelCheckpoint, so it saves the step's final state).
    callbacks.append(PreemptionCallback(run_dir / "checkpoints"))
    # The config goes into every checkpoint (what a resume compares with); on resume the
    # config's optimizer settings (lr, betas, ...) replace the restored ones.
    callbacks.append(ResumeConfig(container))
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(RolloutProgressBar())
    logger = build_logger(cfg.get("logger"), run_dir)  # conf/logger: TensorBoard (default), CSV, W&B, MLflow
    # Evaluation-only sets (val_size 0) have no held-out rows: training runs without validation.
    no_validation = {} if datamodule.val_rows else {"limit_val_batches": 0}
    trainer = instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=logger,
        default_root_dir=str(run_dir),
        plugins=[AtomicCheckpointIO()],  # checkpoints are written to a temporary file, then renamed
        precision=precision.precision,
        **no_validation,
    )
    say(trainer, f"precision: {precision.describe()}")
    return trainer, module, datamodule


def run(cfg: DictConfig, run_dir: Path | None = None) -> dict[str, float]:
    """Train as configured; returns the final logged metrics (floats)."""
    run_dir = run_dir or run_dir_of(cfg)
    # Bad values, bad checkpoints, a config that contradicts the checkpoint's run and unwritable
    # output folders fail here, before a model loads or a file is written.
    validate_config(cfg)
    checkpoint = read_resume_checkpoint(cfg.ckpt_path) if cfg.ckpt_path else None
    # What the checkpoint's run was configured with (a sharded checkpoint: its meta.pt).
    recorded = checkpoint if checkpoint is not None or not cfg.ckpt_path else sharded_metadata(cfg.ckpt_path)
    resume = plan_resume(cfg, recorded, cfg.ckpt_path) if recorded is not None else None
    if cfg.ckpt_path and recorded is None:
        warnings.warn(
            f"ckpt_path={cfg.ckpt_path} is a sharded checkpoint without a readable meta.pt: its run's settings "
            "are not compared with this config (resume with the config of the run that wrote it)",
            stacklevel=2,
        )
    check_output_folders(run_dir)
    if resume is not None:
        resume.report()
    trainer, module, datamodule = build(cfg, run_dir, validate=False)
    if checkpoint is not None:
        check_checkpoint_fits(checkpoint, cfg.ckpt_path, module)
        del checkpoint
    if resume is not None:
        module.restore_control = resume.restore_control
    warn_long_prompts(module, datamodule.train_rows, cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_run_files(cfg, run_dir)  # config.yaml (and Hydra's .hydra/), now that the config passed
    if cfg.validate_before_training and not cfg.ckpt_path and datamodule.val_rows:
        trainer.validate(module, datamodule=datamodule, verbose=False)
        say(trainer, f"held-out accuracy before training: {float(trainer.callback_metrics['val/accuracy']):.3f}")
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    except BaseException:
        finish_logger(trainer.logger, failed=True)
        raise
    finish_logger(trainer.logger)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if "val/accuracy" in metrics:
        say(trainer, f"held-out accuracy after training: {metrics['val/accuracy']:.3f}")
    say(trainer, f"run directory: {run_dir.resolve()}")
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    run_dir = run_dir_of(cfg)
    try:
        metrics = run(cfg)
    except BaseException:
        # A run that failed before writing anything leaves no folder (Hydra creates it first).
        remove_unused_run_folder(run_dir, HydraConfig.get().job.name)
        raise
    return metrics.get("val/accuracy")


if __name__ == "__main__":
    main()
