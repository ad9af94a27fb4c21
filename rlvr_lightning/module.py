"""``RLVRModule``: the Lightning glue around one training step.

One step is one rollout followed by several policy updates, and the units that do the work
follow the data: ``rollout.RolloutCollector`` (prompts -> generate -> score -> dynamic sampling
-> advantages), the schedules (callbacks that set the control state), ``update.PolicyUpdater``
(old log-probs, then ``updates_per_rollout`` optimizer steps over mini-batches accumulated in
micro-batches under a token budget), then metrics. Sample logging is a callback
(``callbacks.SampleLogger``). This module owns the policy, the rollout engine, the optimizer,
checkpoint state and validation.

Lightning counts one global step per rollout: the optimizer steps inside a rollout are taken on
the plain torch optimizer, and the module advances Lightning's step counter once at the end of
the training step, so ``trainer.max_steps`` is the number of rollouts.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from rlvr_lightning import distributed
from rlvr_lightning.checkpoints import rng_states, set_rng_states
from rlvr_lightning.control import ControlState
from rlvr_lightning.dashboard import UsedControls
from rlvr_lightning.metrics import peak_memory_gib
from rlvr_lightning.models import enable_activation_checkpointing, load_model_and_tokenizer
from rlvr_lightning.objectives import ObjectiveParams, get_objective
from rlvr_lightning.objectives.correction import CorrectionSettings, check_engine
from rlvr_lightning.optim import build_optimizer
from rlvr_lightning.resume import schedule_state_keys
from rlvr_lightning.rewards import RewardFunction
from rlvr_lightning.rollout import (
    Rollout,
    RolloutEngine,
    SamplingParams,
    build_engine,
)
from rlvr_lightning.rollout.collector import CollectorSettings, RolloutCollector, timed
from rlvr_lightning.schedulers.base import ConstantSchedule, StepInfo, control_callbacks
from rlvr_lightning.stability import exploding_stop_message, nonfinite_stop_message
from rlvr_lightning.update import ParallelHooks, PolicyUpdater, UpdateSettings
from rlvr_lightning.validation import HeldOutMetrics


class RLVRModule(pl.LightningModule):
    """Policy (a Hugging Face causal LM) trained with a pluggable objective.

    Args mirror the config groups: ``model`` (see ``models.load_model_and_tokenizer``),
    ``objective`` (``conf/objective/*.yaml``), ``rollout`` (generation and update shape; its
    ``engine`` block is ``conf/rollout/engine/*.yaml``), ``optim`` (optimizer and LR schedule),
    ``reward`` (``rewards.RewardFunction``), ``prompt`` (instruction and system prompt),
    ``sampling`` (``conf/sampling``: dynamic sampling, overlong shaping), ``advantage``
    (``conf/advantage``: the estimator's ``name`` and its options),
    ``validation`` (held-out sampling), ``correction`` (``conf/correction``: the rollout/training
    mismatch correction, ``objectives/correction.py``). ``precision``: what ``trainer.precision``
    resolved to and why (``precision.PrecisionChoice.record``), kept in the hyper-parameters.
    """

    def __init__(
        self,
        model: dict[str, Any],
        objective: dict[str, Any],
        rollout: dict[str, Any],
        optim: dict[str, Any],
        reward: dict[str, Any],
        prompt: dict[str, Any] | None = None,
        sampling: dict[str, Any] | None = None,
        advantage: dict[str, Any] | None = None,
        validation: dict[str, Any] | None = None,
        correction: dict[str, Any] | None = None,
        seed: int = 0,
        precision: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.seed = seed
        self.rollout_cfg = dict(rollout)
        self.optim_cfg = dict(optim)

        self.objective_name = objective["name"]
        self.objective_spec = get_objective(self.objective_name)
        self.objective_params = ObjectiveParams.from_config(objective)
        self.control = ControlState(**dict(objective.get("control") or {}))
        self.correction = CorrectionSettings.from_config(correction)

        model = dict(model)
        gradient_checkpointing = bool(model.pop("gradient_checkpointing", False))
        self.policy, self.tokenizer = load_model_and_tokenizer(**model, seed=seed)
        if gradient_checkpointing:
            enable_activation_checkpointing(self.policy)
        self.policy.train()
        # The KL term's frozen reference: a copy of the initial policy.
        self.ref_policy = (
            copy.deepcopy(self.policy).eval().requires_grad_(False) if self.objective_params.kl_coef > 0 else None
        )
        self.reward_fn = RewardFunction(**reward)
        self.engine_options = dict(self.rollout_cfg.get("engine") or {"name": "shared_prefix"})
        check_engine(self.correction, str(self.engine_options.get("name", "shared_prefix")))
        self.engine: RolloutEngine | None = None  # built on first use, closed at teardown
        self.collector = RolloutCollector(
            self.tokenizer, self.reward_fn, self._generate,
            CollectorSettings.from_config(
                self.rollout_cfg, prompt or {}, sampling or {},
                {
                    "advantage": (advantage or {}).get("name", "grpo"),
                    "advantage_options": {k: v for k, v in (advantage or {}).items() if k != "name"},
                    # vLLM computes log-probs only when asked; shared_prefix and static always do.
                    "rollout_logprobs": self.correction.needs_rollout_logprobs,
                },
            ),
        )
        self.updater = PolicyUpdater(
            self.policy, self.objective_name, self.objective_params, self.control,
            UpdateSettings.from_config(self.rollout_cfg, optim), ref_policy=self.ref_policy,
            correction=self.correction,
        )
        self.updates_per_rollout = self.updater.settings.updates_per_rollout
        self.held_out = HeldOutMetrics(**(validation or {}), rollout_temperature=float(rollout["temperature"]))
        self.last_rollout: Rollout | None = None  # the step's rollout, for callbacks (sample logging)
        self.step_metrics: dict[str, float] = {}  # the scalars of the last step, as logged
        # On resume, the control state (and the schedules' state) come from the checkpoint;
        # train.run sets False for resume.reset_control / resume.allow_objective_change.
        self.restore_control = True
        self.used_controls = UsedControls(self.control)  # control/ tags: the controls the run uses
        # (bypass: the ratio anchors on the engine's log-probs, so it is not 1 even then)
        if self.updates_per_rollout == 1 and self.objective_spec.uses_clipping and not self.correction.bypass:
            warnings.warn(
                f"updates_per_rollout == 1: objective {self.objective_name!r} relies on clipping, "
                "but with one optimizer step per rollout the ratio is exactly 1 and nothing is "
                "ever clipped; raise rollout.epochs or rollout.mini_batches",
                stacklevel=2,
            )

    # ------------------------------------------------------------------ Lightning plumbing

    def configure_model(self) -> None:
        # FSDP2 (trainer=fsdp2) shards the policy and the reference policy here; other
        # strategies have nothing to do (DDP wraps the module itself).
        if isinstance(self.trainer.strategy, distributed.FSDP2Strategy):
            self.trainer.strategy.shard([m for m in (self.policy, self.ref_policy) if m is not None])

    def configure_optimizers(self) -> dict[str, Any]:
        max_steps = self.trainer.max_steps if self._trainer is not None else -1
        total_updates = max(1, max_steps * self.updates_per_rollout) if max_steps and max_steps > 0 else None
        optimizer, scheduler = build_optimizer(self.policy, self.optim_cfg, total_updates)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_fit_start(self) -> None:
        strategy = self.trainer.strategy
        self.updater.hooks = ParallelHooks(
            backward=self.manual_backward,
            reduce_sum=lambda values: strategy.reduce(values, reduce_op="sum"),
            gathered=self._gathered,
            world_size=self.trainer.world_size,
        )
        # advantage.scale_rewards=batch: the std of the whole train batch, all ranks (rewards live
        # on the CPU; the collective runs on this rank's device).
        self.collector.reduce_sum = lambda values: strategy.reduce(values.to(self.device), reduce_op="sum").cpu()
        self.schedules = control_callbacks(self.trainer)
        if self.updates_per_rollout == 1 and any(
            not isinstance(cb, ConstantSchedule) and cb.relies_on_clipping for cb in self.schedules
        ):
            warnings.warn(
                "updates_per_rollout == 1: a clip-threshold schedule has no effect because nothing "
                "is clipped with one optimizer step per rollout",
                stacklevel=2,
            )

    def teardown(self, stage: str) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["rlvr_control_state"] = self.control.state_dict()
        checkpoint["rlvr_nonfinite_updates"] = self.updater.nonfinite_updates
        checkpoint["rlvr_consecutive_nonfinite_updates"] = self.updater.consecutive_nonfinite_updates
        checkpoint["rlvr_rng_states"] = rng_states()
        checkpoint["rlvr_logged_controls"] = self.used_controls.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "rlvr_control_state" not in checkpoint:
            raise ValueError("checkpoint has no rlvr_lightning control state; was it written by rlvr_lightning?")
        if self.restore_control:
            self.control.load_state_dict(checkpoint["rlvr_control_state"])
        else:  # resume.reset_control / allow_objective_change: the config's values, schedules afresh
            for key in schedule_state_keys(checkpoint, self.trainer):
                del checkpoint["callbacks"][key]
        self.updater.nonfinite_updates = int(checkpoint.get("rlvr_nonfinite_updates", 0))
        self.updater.consecutive_nonfinite_updates = int(checkpoint.get("rlvr_consecutive_nonfinite_updates", 0))
        set_rng_states(checkpoint.get("rlvr_rng_states", {}))
        self.used_controls.load_state_dict(checkpoint.get("rlvr_logged_controls", ()))

    def _advance_step_counter(self) -> None:
        # Optimizer steps go to the plain optimizer; one Lightning step is one rollout.
        progress = self.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
        progress.increment_ready()
        progress.increment_completed()

    def _step_seed(self, step: int, salt: int = 0) -> int:
        # Ranks sample different completions (rank 0 keeps the single-process seeds).
        return (self.seed * 1_000_003 + step * 7_919 + salt + self.global_rank * 104_729) % (2**63 - 1)

    def _old_from_update(self) -> bool:
        """Whether pi_old's log-probs and entropies come from the update pass itself.

        With one optimizer update per rollout the policy of that update is pi_old (the ratio is
        exactly 1), so the separate pre-update pass would recompute what the update pass computes
        anyway: skipping it saves a forward pass over the rollout. It is kept when a schedule other
        than ``constant`` runs, because schedules read the rollout entropy before the update, and
        when ``rollout.old_logprobs_from_update`` is false. (The update pass runs in train mode: a
        model with dropout would see its pi_old values differ from an eval-mode pass.) It is kept
        too when the top-entropy-quantile mask is on: its threshold needs pi_old's entropies of
        the whole mini-batch before the first micro-batch.
        """
        if self.updates_per_rollout != 1 or not self.rollout_cfg.get("old_logprobs_from_update", True):
            return False
        if self.control.entropy_quantile < 1.0:
            return False
        return all(isinstance(cb, ConstantSchedule) for cb in self.schedules)

    def _generate(self, prompts: list[str], group_size: int, sampling: SamplingParams) -> Rollout:
        if self.engine is None:
            self.engine = build_engine(self.engine_options, self.policy, self.tokenizer)
        # FSDP2 with gather_for_rollout: the policy is gathered once, decoding is rank-local.
        with self._gathered(self.policy) as gathered:
            lockstep = not gathered and distributed.needs_synced_forwards(self.policy)
            return self.engine.generate(prompts, group_size, sampling, lockstep=lockstep)

    def _gathered(self, model: torch.nn.Module) -> AbstractContextManager[bool]:
        """``FSDP2Strategy.gathered`` under trainer=fsdp2 (whole model gathered for the block,
        when ``gather_for_rollout``), else a block that yields False."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        if isinstance(strategy, distributed.FSDP2Strategy):
            return strategy.gathered(model)
        return nullcontext(False)

    # ------------------------------------------------------------------ training step

    def training_step(self, batch: list[dict[str, Any]], batch_idx: int) -> None:
        step = self.global_step
        timings: dict[str, float] = {}
        step_start = time.perf_counter()
        self.last_rollout = None
        # Every random draw of a step (sampling, mini-batch order, Clip-Cov) derives from
        # (seed, step), so a resumed run makes the same draws as an uninterrupted one.
        torch.manual_seed(self._step_seed(step))

        batch, prompt_metrics = self.collector.limit_prompt_length(batch)
        if prompt_metrics and not distributed.all_ranks(bool(batch), self.device):
            self._skip_step_without_prompts(step, prompt_metrics)
            return
        rollout, rollout_metrics = self.collector.collect(batch, timings, ranks=self.trainer.world_size)
        rollout_metrics.update(prompt_metrics)
        old_from_update = self._old_from_update()
        if not old_from_update:
            with timed(timings, "old_logprobs"):
                self.updater.old_logprobs(rollout)
        if self.ref_policy is not None:
            with timed(timings, "ref_logprobs"):
                self.updater.ref_logprobs(rollout)
        if not old_from_update:
            rollout_metrics.update(self.updater.rollout_entropy_metrics(rollout))
            # Mismatch metrics (and the correction's weights, before the update reads them).
            rollout_metrics.update(self.updater.rollout_correction(rollout))

        info = StepInfo(
            step=step,
            total_steps=max(int(self.trainer.max_steps), 1),
            # NaN when pi_old comes from the update pass: only constant schedules run then.
            # Token mean over every rank's rollout, so all ranks' schedules agree.
            rollout_entropy=math.nan if old_from_update else self.updater.rollout_entropy_all_ranks(rollout),
            reward_mean=float(rollout_metrics["reward/mean"]),
        )
        with self.control.recording() as scheduled:  # the fields the schedules write
            for schedule in self.schedules:
                schedule.on_rollout_end(self.trainer, self, info)

        with timed(timings, "update"), self.control.recording() as used:  # the fields the update reads
            generator = torch.Generator().manual_seed(self._step_seed(step, salt=1))
            update_metrics = self.updater.update(
                rollout, self.optimizers(use_pl_optimizer=False), self.lr_schedulers(), generator, old_from_update
            )
        self.used_controls.note(self.control, read=used.read, written=scheduled.written)
        if old_from_update:
            rollout_metrics.update(self.updater.rollout_entropy_metrics(rollout))
            # pi_old's log-probs came from the update pass: the same values, measured now (the
            # update computed the weights per micro-batch from the same numbers).
            rollout_metrics.update(self.updater.rollout_correction(rollout))

        step_seconds = time.perf_counter() - step_start
        completion_tokens = float(rollout.response_mask.sum())
        metrics = {**rollout_metrics, **update_metrics}
        # Control info keys holding a "/" are whole tags (entropy/controller_measured).
        metrics.update({k if "/" in k else f"control/{k}": v for k, v in self.control.scalars().items()})
        # Only the controls this run uses, and no objective/*_in_force that repeats one of them
        # (dashboard.UsedControls); the others, and updates_per_rollout, are in the HParams summary.
        metrics = self.used_controls.filter(metrics)
        metrics.update({f"time/{k}_seconds": v for k, v in timings.items()})
        metrics["time/step_seconds"] = step_seconds
        metrics["perf/completion_tokens_per_second"] = completion_tokens / max(step_seconds, 1e-9)
        metrics["perf/peak_memory_gib"] = peak_memory_gib(self.device)
        metrics["optim/lr"] = self.lr_schedulers().get_last_lr()[0]
        # Data parallel: every scalar is the mean over ranks (each rank trained on its own prompts).
        metrics = distributed.mean_across_ranks({k: float(v) for k, v in metrics.items()}, self.device)
        self._log_at_step(metrics, step)
        self.step_metrics = metrics
        self.log("reward", metrics["reward/mean"], prog_bar=True, on_step=True, logger=False, batch_size=len(rollout))
        self.log("entropy", metrics["entropy/rollout"], prog_bar=True, on_step=True, logger=False, batch_size=len(rollout))
        self.last_rollout = rollout
        self._advance_step_counter()
        self._stop_if_nonfinite(step)

    def _log_at_step(self, metrics: dict[str, float], step: int) -> None:
        """Write scalars at x = ``step`` (rollouts completed before them): Lightning's own logging
        step counts batches, which drifts from the rollout count across a resume."""
        if self.logger is not None and self.trainer.is_global_zero:
            self.logger.log_metrics(metrics, step=step)
            if isinstance(self.logger, TensorBoardLogger):
                # On disk at once, not after TensorBoard's 120 s flush interval or 10 queued events.
                self.logger.experiment.flush()

    # ------------------------------------------------------------------ faults

    def _skip_step_without_prompts(self, step: int, prompt_metrics: dict[str, float]) -> None:
        """Every prompt of the step was dropped for its length: no rollout and no update, but the
        step counts, so the run still ends after ``trainer.max_steps`` steps."""
        warnings.warn(
            f"step {step}: every prompt is longer than rollout.max_prompt_tokens="
            f"{self.rollout_cfg['max_prompt_tokens']} tokens and was dropped, so the step is skipped "
            "(no update); raise max_prompt_tokens or set rollout.overlong_prompts=truncate",
            stacklevel=2,
        )
        metrics = {**prompt_metrics, "optim/skipped_steps_without_prompts": 1.0}
        self._log_at_step(distributed.mean_across_ranks(metrics, self.device), step)
        self._advance_step_counter()

    def _stop_if_nonfinite(self, step: int) -> None:
        """After ``optim.max_consecutive_nonfinite_updates`` skipped NaN/Inf updates in a row, or
        an update not taken because it would have blown up the weights
        (``stability.explosion_reason``), save the state before them and stop the run."""
        updater, limit = self.updater, self.updater.settings.max_consecutive_nonfinite_updates
        if 0 < limit <= updater.consecutive_nonfinite_updates:
            name, message = "nonfinite_stop.ckpt", partial(
                nonfinite_stop_message, step, updater.consecutive_nonfinite_updates, limit)
        elif updater.exploding_update is not None:
            name, message = "exploding_update_stop.ckpt", partial(exploding_stop_message, step, updater.exploding_update)
        else:
            return
        callback = self.trainer.checkpoint_callback
        folder = Path(getattr(callback, "dirpath", None) or Path(self.trainer.default_root_dir) / "checkpoints")
        self.trainer.save_checkpoint(folder / name)  # atomic: the trainer's checkpoint I/O (train.build)
        raise RuntimeError(message(folder / name))

    # ------------------------------------------------------------------ validation

    def validation_step(self, batch: list[dict[str, Any]], batch_idx: int) -> None:
        held_out = self.held_out
        # The same seed at every validation, so accuracies at different steps see the same draws
        # of sampling noise; the training RNG stream is left untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self._step_seed(0, salt=10_000 + batch_idx))
            rollout = self.collector.sample(
                batch, held_out.samples, greedy=held_out.temperature == 0.0, temperature=held_out.temperature
            )
        answers = [row["answer"] for row in batch for _ in range(held_out.samples)]
        held_out.update(self.reward_fn(rollout.completions, answers), rollout.response_lengths, len(batch))

    def on_validation_epoch_end(self) -> None:
        # Validation after k rollouts is logged at step k (step 0: before any update).
        metrics = self.held_out.compute_and_reset()
        self._log_at_step(metrics, self.global_step)
        self.log("val/accuracy", metrics["val/accuracy"], prog_bar=True, logger=False)
