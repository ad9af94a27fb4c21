"""Shared test helpers: compose the real Hydra configs and read TensorBoard scalars."""

from __future__ import annotations

import os

# Tiny models gain nothing from intra-op threads, and OpenMP's spinning threads slow down badly
# when the machine is busy (reward worker processes, a second test process): one thread each.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from rlvr_lightning.train import CONFIG_DIR  # noqa: E402

# The suite's numbers are float32 whatever CPU runs it: trainer.precision defaults to auto, which
# is bf16-mixed on a CPU with native bf16. Every test that trains pins this.
FLOAT32 = "trainer.precision=32-true"

# Small, fast settings for the tiny model: 2 prompts x 4 samples x 12 tokens, 2 updates per rollout.
TINY_OVERRIDES = [
    "model=tiny",
    FLOAT32,
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "rollout.prompts_per_step=2",
    "rollout.group_size=4",
    "rollout.max_new_tokens=12",
    "rollout.mini_batches=2",
    "data.num_train=200",
    "data.num_val=8",
    "data.val_batch_size=8",
    "logging.sample_every_n_steps=1",
    "trainer.enable_progress_bar=false",
]


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides or []))


@pytest.fixture(scope="module")
def tiny():
    """The tiny model (eval mode) and its tokenizer, left-padding for generation; one per test module."""
    from rlvr_lightning.models import build_tiny_model

    model, tokenizer = build_tiny_model(seed=0)
    tokenizer.padding_side = "left"
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


@pytest.fixture
def tiny_config():
    def make(*extra: str) -> DictConfig:
        return compose_config(TINY_OVERRIDES + list(extra))

    return make


def _write_order(path: Path) -> tuple[int, ...]:
    """``events.out.tfevents.<time>.<host>.<pid>.<counter>``: numeric order, so the tenth writer
    of one second (counter 10) comes after the ninth, not before it as in name order."""
    parts = path.name.split(".")
    return tuple(int(p) if p.isdigit() else 0 for p in (parts[3], parts[-2], parts[-1]))


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """All TensorBoard scalars of a run folder: tag -> [(step, value), ...]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(Path(run_dir).rglob("events.out.tfevents.*"), key=_write_order):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in accumulator.Scalars(tag))
    return out
