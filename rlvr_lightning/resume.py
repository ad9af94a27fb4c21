"""Resuming with a config that differs from the one the checkpoint was written under.

``plan_resume`` compares the resumed run's config with the checkpoint's run's (stored in every
checkpoint as ``rlvr_config``; for a checkpoint written before that, the ``config.yaml`` of its
run folder, else the module's hyper-parameters it holds) and sorts every difference:

- the model, the objective (``objective.name``, and ``objective.kl_coef`` turning the reference
  model on or off) and the schedule class (``scheduler._target_``): the checkpoint's state
  belongs to them. Refused, listing the keys, before the model loads; with
  ``resume.allow_objective_change=true`` another objective or schedule class starts fresh (its
  control state and the schedule's own state from this config). A model cannot start fresh: its
  weights and optimizer moments are the checkpoint.
- the control state (``objective.control.*``): the thresholds in force come from the checkpoint
  (a schedule may have moved them), so a changed value is not applied, and the run says so,
  unless ``resume.reset_control=true``: then the control state and the schedule's own state
  start from this config.
- everything else takes effect and is listed: the learning rate and its schedule (and AdamW's
  betas, eps and weight decay: ``ResumeConfig`` puts them over the restored optimizer state),
  ``trainer.max_steps``, logging, validation, checkpointing, rollout, reward, data, seed...
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_only, rank_zero_warn
from omegaconf import DictConfig, OmegaConf

from rlvr_lightning.checkpoints import CheckpointError
from rlvr_lightning.schedulers.base import ControlCallback, control_callbacks

# Settings that are not part of a run's training (where it resumes from, how, where it writes).
IGNORED = ("ckpt_path", "run_dir", "resume.", "hydra.")
# Model settings that do not change the model's weights or architecture.
MODEL_CHANGEABLE = (
    "model.gradient_checkpointing",
    "model.cache_dir",
    "model.trust_remote_code",
    "model.allow_pickle_weights",
    "model.lora.dropout",
)
CONTROL = "objective.control."


class ResumeConfigError(CheckpointError):
    """The config of a resumed run changes what the checkpoint's state belongs to (model,
    objective, schedule class); the message lists the differing keys and the fix."""


class ResumeWarning(UserWarning):
    """A setting of the resumed run's config is not applied: the checkpoint's state wins."""


@dataclass(frozen=True)
class Difference:
    key: str
    old: Any  # the checkpoint's run's value
    new: Any  # this config's value

    def describe(self) -> str:
        return f"{self.key}: {self.old!r} in the checkpoint's run, {self.new!r} now"


@dataclass
class ResumePlan:
    """What a resume takes from the checkpoint and what from the config, with the report."""

    path: str
    step: int | None
    source: str  # where the checkpoint's run's config was read
    restore_control: bool = True  # False: control state and schedule state start from the config
    applied: list[str] = field(default_factory=list)
    not_applied: list[str] = field(default_factory=list)

    def report(self) -> None:
        """Print the differences (rank 0) and warn about those not applied."""
        lines = self.applied + self.not_applied
        if not lines:
            return
        at = f" (after step {self.step})" if self.step is not None else ""
        _print(
            f"resuming from {self.path}{at}: {len(lines)} setting(s) differ from the run that wrote "
            f"it (its config: {self.source}):\n  " + "\n  ".join(lines)
        )
        if self.not_applied:
            rank_zero_warn(
                "resumed run: these settings of the config are NOT in force, the checkpoint's state "
                "is:\n  " + "\n  ".join(self.not_applied),
                category=ResumeWarning,
            )


@rank_zero_only
def _print(message: str) -> None:
    print(f"[rlvr_lightning] {message}", flush=True)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists and empty mappings are values)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def recorded_config(checkpoint: dict[str, Any], path: str | Path) -> tuple[dict[str, Any], str]:
    """The config the checkpoint's run trained with, and where it was read."""
    stored = checkpoint.get("rlvr_config")
    if isinstance(stored, dict):
        return stored, "stored in the checkpoint"
    beside = Path(path).resolve().parent.parent / "config.yaml"
    if beside.is_file():
        try:
            loaded = OmegaConf.to_container(OmegaConf.load(beside), resolve=True)
        except Exception:  # noqa: BLE001 - an unreadable file: fall back to the hyper-parameters
            loaded = None
        if isinstance(loaded, dict):
            return loaded, str(beside)  # type: ignore[return-value]
    hyper = dict(checkpoint.get("hyper_parameters") or {})
    return hyper, (
        "the hyper-parameters in the checkpoint (written before checkpoints stored the config, and "
        "no config.yaml beside checkpoints/): the model, objective, rollout, optim, reward and "
        "validation settings are compared; the schedule, trainer, data and logging are not"
    )


def sharded_metadata(path: str | Path) -> dict[str, Any] | None:
    """A sharded checkpoint's (a folder, ``save_distributed_checkpoint=true``) ``meta.pt``: all
    but the weights and optimizer state, i.e. what ``plan_resume`` compares (None if unreadable)."""
    meta = Path(path) / "meta.pt"
    try:
        loaded = torch.load(meta, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - Lightning's loader reports a broken checkpoint itself
        return None
    return loaded if isinstance(loaded, dict) else None


def _ignored(key: str) -> bool:
    return any(key == name or key.startswith(name) for name in IGNORED)


def _is_model_identity(key: str) -> bool:
    return key.startswith("model.") and not key.startswith(MODEL_CHANGEABLE)


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def plan_resume(cfg: DictConfig, checkpoint: dict[str, Any], path: str | Path) -> ResumePlan:
    """Compare ``cfg`` with the checkpoint's run's config. Raises ResumeConfigError (listing the
    keys) when the model, the objective or the schedule class differ and the config does not
    allow it; returns the plan whose ``report`` lists every other difference."""
    new = flatten(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
    old_tree, source = recorded_config(checkpoint, path)
    old = flatten(old_tree)
    differences = [
        Difference(key, old[key], new[key])
        for key in sorted(new.keys() & old.keys())
        if not _ignored(key) and old[key] != new[key]
    ]
    old_kl, new_kl = _number(old.get("objective.kl_coef", 0.0)), _number(new.get("objective.kl_coef", 0.0))
    reference = (old_kl > 0) != (new_kl > 0) and "objective.kl_coef" in old
    model = [d for d in differences if _is_model_identity(d.key)]
    if reference:
        model += [d for d in differences if d.key == "objective.kl_coef"]
    objective = [d for d in differences if d.key in ("objective.name", "scheduler._target_")]
    control = [d for d in differences if d.key.startswith(CONTROL)]
    special = {d.key for d in model + objective + control}
    others = [d for d in differences if d.key not in special]

    settings = cfg.get("resume") or {}
    reset = bool(settings.get("reset_control", False))
    allow = bool(settings.get("allow_objective_change", False))
    if model or (objective and not allow):
        raise ResumeConfigError(_refusal(path, source, model, objective, reference, allow))

    step = checkpoint.get("global_step")
    max_steps = cfg.trainer.get("max_steps")
    if isinstance(step, int) and isinstance(max_steps, int) and 0 < max_steps <= step:
        raise ResumeConfigError(
            f"trainer.max_steps={max_steps}, and checkpoint {path} was written after step {step}: "
            f"nothing is left to train; set trainer.max_steps above {step} (the total number of "
            "steps, the checkpoint's included)"
        )

    plan = ResumePlan(str(path), step if isinstance(step, int) else None, source)
    plan.restore_control = not (reset or (allow and bool(objective)))
    state = checkpoint.get("rlvr_control_state") or {}
    for difference in others:
        plan.applied.append(f"{difference.key}: {difference.old!r} -> {difference.new!r} (applied)")
    for difference in objective:
        plan.applied.append(
            f"{difference.key}: {difference.old!r} -> {difference.new!r} (applied: "
            "resume.allow_objective_change=true; the control state and the schedule start fresh "
            "from this config, the weights, optimizer state, LR position and step counter come "
            "from the checkpoint)"
        )
    for difference in control:
        line = f"{difference.key}: {difference.old!r} -> {difference.new!r}"
        if not plan.restore_control:
            why = "resume.reset_control=true" if reset else "resume.allow_objective_change=true"
            plan.applied.append(f"{line} (applied: {why})")
            continue
        name = difference.key[len(CONTROL):]
        in_force = f", {name}={state[name]!r} in force" if name in state else ""
        plan.not_applied.append(
            f"{line} NOT applied: the control state comes from the checkpoint{in_force}; pass "
            "resume.reset_control=true to start the control state (and the schedule's own "
            "state) from this config"
        )
    return plan


def _refusal(
    path: str | Path, source: str, model: list[Difference], objective: list[Difference], reference: bool, allow: bool
) -> str:
    changed = model + objective
    what = " and ".join(
        part for part, present in (("model", bool(model)), ("objective or schedule", bool(objective))) if present
    )
    message = (
        f"checkpoint {path} was written with another {what}, so its state does not fit this config: "
        + "; ".join(d.describe() for d in changed)
        + f" (the checkpoint's run's config: {source}). Resume with the checkpoint's values of these keys"
    )
    if objective and not model:
        message += (
            ", or pass resume.allow_objective_change=true to keep the weights, optimizer state, LR "
            "position and step counter and start the control state and the schedule fresh from "
            "this config"
        )
    if model:
        reason = (
            "objective.kl_coef turns the reference model on or off, and the checkpoint holds "
            "the model weights it was trained with"
            if reference
            else "a checkpoint's weights and optimizer moments belong to the model it was written with"
        )
        message += (
            f". A model change cannot be resumed ({reason}"
            + (", whatever resume.allow_objective_change says" if allow else "")
            + "): to train another model start a run without ckpt_path; to start a new run from "
            f"these weights, export them (python -m rlvr_lightning.export {path} <folder>) and pass "
            "model=hf model.name_or_path=<folder>"
        )
    return message


def schedule_state_keys(checkpoint: dict[str, Any], trainer: pl.Trainer) -> list[str]:
    """The keys of ``checkpoint["callbacks"]`` that hold a schedule's state: the configured
    schedules' and the checkpoint's run's schedule's (``rlvr_config``), or any other
    ``ControlCallback`` class's."""
    names = {type(callback).__qualname__ for callback in control_callbacks(trainer)}
    pending: list[type] = [ControlCallback]
    while pending:
        cls = pending.pop()
        names.add(cls.__qualname__)
        pending.extend(cls.__subclasses__())
    recorded = checkpoint.get("rlvr_config")
    target = ((recorded or {}).get("scheduler") or {}).get("_target_") if isinstance(recorded, dict) else None
    if target:
        names.add(str(target).rsplit(".", 1)[-1])
    return [key for key in (checkpoint.get("callbacks") or {}) if str(key).split("{", 1)[0] in names]


class ResumeConfig(pl.Callback):
    """Stores the run's config in every checkpoint (``rlvr_config``, what ``plan_resume``
    compares with), and on resume puts the config's optimizer settings over those restored from
    the checkpoint: AdamW's betas, eps and weight decay, and the learning rate, whose schedule
    continues at its saved position with this config's base rate and shape."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self._configured: list[list[dict[str, Any]]] = []

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint["rlvr_config"] = self.config

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The optimizers exist, built from the config; the checkpoint's state is restored after.
        self._configured = [
            [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]
            for optimizer in trainer.optimizers
        ]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.ckpt_path is None or not self._configured:
            return
        for optimizer, configured in zip(trainer.optimizers, self._configured, strict=True):
            for group, settings in zip(optimizer.param_groups, configured, strict=True):
                if tuple(group.get("betas", ())) != tuple(settings.get("betas", ())):
                    # The moments were accumulated with other betas: the update-size check
                    # computes the update exactly from now on (update.PolicyUpdater).
                    updater = getattr(pl_module, "updater", None)
                    if updater is not None:
                        updater.moments_from_other_betas = True
                group.update({key: value for key, value in settings.items() if key != "lr"})
        for scheduler_config in trainer.lr_scheduler_configs:
            scheduler = scheduler_config.scheduler
            lambdas = getattr(scheduler, "lr_lambdas", None)
            if lambdas is None:
                continue
            groups = scheduler.optimizer.param_groups
            scheduler.base_lrs = [group["initial_lr"] for group in groups]
            rates = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, lambdas, strict=True)]
            for group, rate in zip(groups, rates, strict=True):
                group["lr"] = rate
            scheduler._last_lr = rates
