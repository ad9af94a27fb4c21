"""Data modules: rows ``{"question", "answer"}`` for training and held-out validation.

Training batches are drawn per step: the batch for step ``k`` depends only on ``(seed, k)``, so a
resumed run (which starts from the restored global step) sees exactly the prompts an
uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, IterableDataset

from rlvr_lightning.data.arithmetic import make_arithmetic_splits


class StepBatches(IterableDataset):
    """Yields, for step ``start_step, start_step + 1, ...``, a list of ``rows_per_step`` rows drawn
    without replacement (within a step) by a generator seeded with ``(seed, step)``."""

    def __init__(self, rows: list[dict[str, Any]], rows_per_step: int, seed: int, start_step: int = 0) -> None:
        if not rows:
            raise ValueError("the training split has no rows")
        self.rows = rows
        self.rows_per_step = rows_per_step
        self.seed = seed
        self.start_step = start_step

    def batch_for_step(self, step: int) -> list[dict[str, Any]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        n = len(self.rows)
        if self.rows_per_step <= n:
            index = torch.randperm(n, generator=generator)[: self.rows_per_step]
        else:
            index = torch.randint(n, (self.rows_per_step,), generator=generator)
        return [self.rows[i] for i in index.tolist()]

    def __iter__(self) -> Iterator[list[dict[str, Any]]]:
        step = self.start_step
        while True:
            yield self.batch_for_step(step)
            step += 1


def _identity(batch: Any) -> Any:
    return batch


class PromptDataModule(pl.LightningDataModule):
    """Base data module; subclasses implement ``load_rows`` -> (train_rows, val_rows)."""

    def __init__(self, prompts_per_step: int = 8, val_batch_size: int = 64, seed: int = 0,
                 generation_batches_per_step: int = 1) -> None:
        super().__init__()
        self.prompts_per_step = prompts_per_step
        self.val_batch_size = val_batch_size
        self.seed = seed
        # Dynamic sampling (DAPO) may need several generation batches of prompts per step.
        self.generation_batches_per_step = generation_batches_per_step
        self.train_rows: list[dict[str, Any]] = []
        self.val_rows: list[dict[str, Any]] = []

    def load_rows(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:  # pragma: no cover
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if not self.train_rows:
            self.train_rows, self.val_rows = self.load_rows()

    def train_dataloader(self) -> DataLoader:
        # Called after a checkpoint is restored, so a resumed run starts at the restored step.
        start = self.trainer.global_step if self.trainer is not None else 0
        dataset = StepBatches(
            self.train_rows, self.prompts_per_step * self.generation_batches_per_step, self.seed, start
        )
        return DataLoader(dataset, batch_size=None, collate_fn=_identity)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_rows, batch_size=self.val_batch_size, shuffle=False, collate_fn=_identity)


class ArithmeticDataModule(PromptDataModule):
    """Built-in arithmetic problems (``data=arithmetic``); see ``data.arithmetic`` for the knobs."""

    def __init__(
        self,
        num_train: int = 5000,
        num_val: int = 64,
        min_digits: int = 1,
        max_digits: int = 1,
        operations: list[str] | tuple[str, ...] = ("+",),
        num_operands: int = 2,
        allow_negative: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.knobs = dict(
            min_digits=min_digits,
            max_digits=max_digits,
            operations=list(operations),
            num_operands=num_operands,
            allow_negative=allow_negative,
        )
        self.num_train = num_train
        self.num_val = num_val

    def load_rows(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        return make_arithmetic_splits(self.num_train, self.num_val, self.seed, **self.knobs)
