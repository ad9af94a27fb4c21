"""Callbacks that watch training without changing it: sampled completions to TensorBoard and
``samples.jsonl``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl


class SampleLogger(pl.Callback):
    """Every ``sample_every_n_steps`` rollouts (0: never), write ``num_samples`` completions of
    the step's rollout, spread over its groups, with their rewards (the ``logging`` config block)."""

    def __init__(self, sample_every_n_steps: int = 5, num_samples: int = 4) -> None:
        self.sample_every_n_steps = int(sample_every_n_steps)
        self.num_samples = int(num_samples)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        rollout = getattr(pl_module, "last_rollout", None)
        step = trainer.global_step - 1  # the rollout's step: the module has advanced the counter
        every = self.sample_every_n_steps
        if rollout is None or every <= 0 or step % every:
            return
        count = min(self.num_samples, len(rollout))
        rewards = rollout.data["rewards"]
        records = [
            {"step": step, "prompt": rollout.prompts[i], "completion": rollout.completions[i], "reward": float(rewards[i])}
            for i in range(0, len(rollout), max(1, len(rollout) // count))[:count]
        ]
        log_dir = trainer.log_dir  # a broadcast under DDP: every rank must ask, once
        if log_dir and trainer.is_global_zero:
            path = Path(log_dir) / "samples.jsonl"
            with path.open("a") as handle:
                for record in records:
                    handle.write(json.dumps(record) + "\n")
        experiment = getattr(pl_module.logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "add_text"):
            text = "\n\n".join(
                f"**reward {r['reward']:.2f}**\n\n```\n{r['prompt']}{r['completion']}\n```" for r in records
            )
            experiment.add_text("samples/completions", text, global_step=step)
