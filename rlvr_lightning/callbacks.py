"""Callbacks that watch training without changing it: sampled groups of completions to
TensorBoard and ``samples.jsonl`` (``SampleLogger``), and the TensorBoard extras of every run
(``DashboardLogger``: custom-scalars layout, HParams summary, histograms)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger

from rlvr_lightning.dashboard import (
    LAYOUT,
    hparams_summaries,
    samples_markdown,
    session_end_summary,
)
from rlvr_lightning.rewards import extract_answer


def logging_step(step: int, every: int, max_steps: int) -> bool:
    """Every ``every`` rollouts (0: never), and the run's last rollout."""
    return every > 0 and (step % every == 0 or step == max_steps - 1)


def _tensorboard_writers(trainer: pl.Trainer) -> list[Any]:
    """The SummaryWriters of the trainer's TensorBoard loggers (rank 0 only; none elsewhere)."""
    if not trainer.is_global_zero:
        return []
    return [logger.experiment for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]


def user_turn(question: str, instruction: str | None) -> str:
    """What the prompt asks, without the chat template: the question and the instruction."""
    return f"{question}\n{instruction}" if instruction else question


class SampleLogger(pl.Callback):
    """Every ``sample_every_n_steps`` rollouts (0: never) and at the last one, write
    ``num_groups`` whole groups of the step's rollout (spread over its groups): the prompt once
    (without the chat template), the reference answer, and every completion of the group with its
    reward, verdict, the answer the verifier read, advantage, length and mean entropy. To the
    text tab (``samples/completions``, a table per group) and ``samples.jsonl`` (a row per
    completion, the same fields). The ``logging`` config block."""

    def __init__(self, sample_every_n_steps: int = 5, num_groups: int = 2) -> None:
        self.sample_every_n_steps = int(sample_every_n_steps)
        self.num_groups = int(num_groups)

    def groups(self, pl_module: Any, rollout: Any, rows: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
        """The chosen groups of ``rollout`` as dicts (``rows``: the step's data rows)."""
        size = rollout.group_size
        total = len(rollout) // size
        count = min(self.num_groups, total)
        chosen = sorted({index * total // count for index in range(count)}) if count > 0 else []
        collector = pl_module.collector
        by_prompt = dict(zip(collector.prompts(rows), rows, strict=True)) if rows else {}
        instruction = collector.settings.instruction
        answer_mode = pl_module.reward_fn.answer_mode
        data = rollout.data
        out = []
        for group in chosen:
            first = group * size
            row = by_prompt.get(rollout.prompts[first])
            completions = []
            for i in range(first, first + size):
                mask = rollout.response_mask[i]
                tokens = float(mask.sum())
                entropy = float((data["old_entropy"][i] * mask).sum() / max(tokens, 1.0)) if "old_entropy" in data else math.nan
                completion = rollout.completions[i]
                completions.append(
                    {
                        "completion": completion,
                        "reward": float(data["rewards"][i]),
                        "correct": bool(data["correct"][i]),
                        "extracted": extract_answer(completion, mode=answer_mode),
                        "advantage": float(data["advantages"][i]),
                        "length": int(rollout.response_lengths[i]),
                        "truncated": bool(rollout.truncated[i]),
                        "entropy": entropy,
                    }
                )
            out.append(
                {
                    "group": group,
                    "question": user_turn(str(row["question"]), instruction) if row else rollout.prompts[first],
                    "answer": row["answer"] if row else None,
                    "completions": completions,
                }
            )
        return out

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        rollout = getattr(pl_module, "last_rollout", None)
        step = trainer.global_step - 1  # the rollout's step: the module has advanced the counter
        if rollout is None or not logging_step(step, self.sample_every_n_steps, int(trainer.max_steps)):
            return
        groups = self.groups(pl_module, rollout, batch if isinstance(batch, list) else None)
        log_dir = trainer.log_dir  # a broadcast under DDP: every rank must ask, once
        if log_dir and trainer.is_global_zero:
            path = Path(log_dir) / "samples.jsonl"
            with path.open("a") as handle:
                for group in groups:
                    shared = {"step": step, "group": group["group"], "question": group["question"], "answer": group["answer"]}
                    for completion in group["completions"]:
                        handle.write(json.dumps({**shared, **completion}) + "\n")
        experiment = getattr(pl_module.logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "add_text"):
            text = samples_markdown(step, groups, pl_module.reward_fn.answer_mode)
            experiment.add_text("samples/completions", text, global_step=step)


class DashboardLogger(pl.Callback):
    """What TensorBoard shows besides the scalars (nothing for other loggers):

    - the custom-scalars layout (``dashboard.LAYOUT``), written when fitting starts;
    - the HParams summary: ``hparams`` (the config's key choices and every control's starting
      value) against the last values of ``dashboard.HPARAMS_METRICS``, ended with the run's
      status;
    - every ``histogram_every_n_steps`` rollouts (0: never) and at the last one, histograms of the
      rollout's per-token entropy under pi_old (``hist/entropy``), the importance ratios of the
      step's updates (``hist/ratio``) and the advantages (``hist/advantage``), over rank 0's
      loss tokens and completions.
    """

    def __init__(self, histogram_every_n_steps: int = 5, hparams: Mapping[str, Any] | None = None) -> None:
        self.histogram_every_n_steps = int(histogram_every_n_steps)
        self.hparams = dict(hparams or {})
        self.ended = False

    def on_fit_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        for writer in _tensorboard_writers(trainer):
            writer.add_custom_scalars(LAYOUT)
            if self.hparams:
                file_writer = writer._get_file_writer()
                for summary in hparams_summaries(self.hparams):
                    file_writer.add_summary(summary)
            writer.flush()

    def _histogram_step(self, trainer: pl.Trainer, step: int) -> bool:
        return trainer.is_global_zero and logging_step(step, self.histogram_every_n_steps, int(trainer.max_steps))

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        pl_module.updater.record_ratios = self._histogram_step(trainer, trainer.global_step)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step - 1  # the module has advanced the counter
        rollout = getattr(pl_module, "last_rollout", None)
        updater = pl_module.updater
        ratios, updater.record_ratios, updater.last_ratios = updater.last_ratios, False, None
        if rollout is None or not self._histogram_step(trainer, step):
            return
        mask = rollout.data["loss_mask"].bool()
        values = {
            "hist/entropy": rollout.data["old_entropy"][mask],
            "hist/ratio": ratios,
            "hist/advantage": rollout.data["advantages"],
        }
        for writer in _tensorboard_writers(trainer):
            for tag, tensor in values.items():
                if tensor is not None and tensor.numel():
                    writer.add_histogram(tag, tensor.detach().float().cpu(), global_step=step)
            writer.flush()

    def _end(self, trainer: pl.Trainer, success: bool) -> None:
        if self.ended or not self.hparams:
            return
        self.ended = True
        for writer in _tensorboard_writers(trainer):
            writer._get_file_writer().add_summary(session_end_summary(success))
            writer.flush()

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self._end(trainer, success=True)

    def on_exception(self, trainer: pl.Trainer, pl_module: Any, exception: BaseException) -> None:
        self._end(trainer, success=False)

