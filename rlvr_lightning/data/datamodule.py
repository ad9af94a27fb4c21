"""Data modules: rows ``{"question", "answer"}`` for training and held-out validation.

Training batches are drawn per step: the batch for step ``k`` depends only on ``(seed, k)``, so a
resumed run (which starts from the restored global step) sees exactly the prompts an
uninterrupted run would have seen. Under data parallelism every rank draws the same step batch and
trains on its own contiguous share of it (``StepBatches``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, IterableDataset

from rlvr_lightning.data.arithmetic import make_arithmetic_splits


class StepBatches(IterableDataset):
    """Yields, for step ``start_step, start_step + 1, ...``, this rank's rows of the step.

    The step's full batch is ``rows_per_step`` rows drawn without replacement (within a step) by
    a generator seeded with ``(seed, step)``, the same on every rank. It is read as
    ``generation_batches`` consecutive generation batches (dynamic sampling draws more than one);
    under data parallelism rank ``r`` of ``world_size`` takes the ``r``-th contiguous share of each
    generation batch, so the ranks train on different prompts that together are the step's batch,
    and no group of samples is ever split across ranks.
    """

    def __init__(
        self,
        rows: list[dict[str, Any]],
        rows_per_step: int,
        seed: int,
        start_step: int = 0,
        rank: int = 0,
        world_size: int = 1,
        generation_batches: int = 1,
    ) -> None:
        if not rows:
            raise ValueError("the training split has no rows")
        prompts_per_batch, remainder = divmod(rows_per_step, generation_batches)
        if remainder or prompts_per_batch % world_size:
            raise ValueError(
                f"rollout.prompts_per_step={prompts_per_batch} is not divisible by the number of "
                f"data-parallel ranks ({world_size}): each rank trains on an equal share of every "
                "generation batch; choose prompts_per_step as a multiple of the world size"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a world of size {world_size}")
        self.rows = rows
        self.rows_per_step = rows_per_step
        self.seed = seed
        self.start_step = start_step
        self.rank = rank
        self.world_size = world_size
        self.generation_batches = generation_batches

    def global_batch_for_step(self, step: int) -> list[dict[str, Any]]:
        """The step's rows over all ranks, in generation-batch order."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        n = len(self.rows)
        if self.rows_per_step <= n:
            index = torch.randperm(n, generator=generator)[: self.rows_per_step]
        else:
            index = torch.randint(n, (self.rows_per_step,), generator=generator)
        return [self.rows[i] for i in index.tolist()]

    def batch_for_step(self, step: int) -> list[dict[str, Any]]:
        """This rank's rows of the step: its share of each generation batch, in order."""
        rows = self.global_batch_for_step(step)
        if self.world_size == 1:
            return rows
        per_batch = self.rows_per_step // self.generation_batches
        share = per_batch // self.world_size
        out = []
        for start in range(0, self.rows_per_step, per_batch):
            first = start + self.rank * share
            out.extend(rows[first : first + share])
        return out

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
        trainer = self.trainer
        start = trainer.global_step if trainer is not None else 0
        dataset = StepBatches(
            self.train_rows,
            self.prompts_per_step * self.generation_batches_per_step,
            self.seed,
            start,
            rank=trainer.global_rank if trainer is not None else 0,
            world_size=trainer.world_size if trainer is not None else 1,
            generation_batches=self.generation_batches_per_step,
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
