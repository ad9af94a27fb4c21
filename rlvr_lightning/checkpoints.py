"""Checkpoint files: written atomically, checked before a run resumes from one.

``AtomicCheckpointIO`` is Lightning's ``TorchCheckpointIO`` with an atomic write: the checkpoint
goes to a temporary file in the target's folder, is flushed to disk and then renamed over the
target (``os.replace``), so a run killed mid-write leaves the previous file whole and never a
truncated one. (Lightning's own write stages the file in the system temp folder, and moving it
across file systems is a copy, which is not atomic.)

``read_resume_checkpoint`` and ``check_checkpoint_fits`` turn every way a resume checkpoint can
be wrong (missing, unreadable, not written by rlvr_lightning, written for another model) into
one error that names the file and the likely cause, before anything is trained or written.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

# Shown with every resume error: where checkpoints live and how to pass one.
RESUME_HINT = (
    "pass ckpt_path=outputs/runs/<run>/checkpoints/last.ckpt (or a step_*.ckpt of that folder, "
    "written when checkpoint.every_n_steps > 0)"
)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be resumed from; the message names the file and the likely cause."""


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save(obj, path)`` that never leaves a partly written ``path`` behind."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(obj, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, 0o644)  # mkstemp creates 0600; checkpoints are ordinary files
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    # Persist the rename itself (the folder entry); not every platform can open a folder.
    with contextlib.suppress(OSError):
        folder = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O whose writes are atomic (see ``atomic_torch_save``)."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike[str], storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        atomic_torch_save(checkpoint, path)


def read_resume_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """Load a checkpoint to resume from (tensors memory-mapped, not read) and check that it is
    one rlvr_lightning wrote. Raises FileNotFoundError or CheckpointError with the fix. A sharded
    FSDP checkpoint (a folder, ``trainer.strategy.save_distributed_checkpoint=true``) is left
    to Lightning's own loader: None."""
    path = Path(path)
    if path.is_dir() and (path / ".metadata").is_file():
        return None
    if not path.is_file():
        what = "is a folder, not a checkpoint file" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"ckpt_path={str(path)!r} {what}; {RESUME_HINT}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(error).__name__}: {_first_line(error)}): the "
            "file is truncated or corrupt (copied incompletely, or not a checkpoint at all). "
            f"Resume from another checkpoint of that run: {RESUME_HINT}"
        ) from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(
            f"checkpoint {path} holds no Lightning state_dict: it is not a training checkpoint "
            f"(a bare model file?); {RESUME_HINT}, or load plain weights as the model with "
            "model=hf model.name_or_path=<folder>"
        )
    if "rlvr_control_state" not in checkpoint:
        raise CheckpointError(
            f"checkpoint {path} has no rlvr_lightning control state: it was not written by "
            "rlvr_lightning.train, so the thresholds, schedule and step counter cannot be restored; "
            f"{RESUME_HINT}"
        )
    return checkpoint


def check_checkpoint_fits(checkpoint: dict[str, Any], path: str | os.PathLike[str], module: torch.nn.Module) -> None:
    """Raise CheckpointError when the checkpoint's weights do not fit ``module`` (another model
    size, or an objective with or without a reference model)."""
    saved: dict[str, torch.Tensor] = checkpoint["state_dict"]
    expected = module.state_dict()
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    mismatched = [
        f"{name} {tuple(saved[name].shape)} in the file vs {tuple(tensor.shape)} configured"
        for name, tensor in expected.items()
        if name in saved and tuple(saved[name].shape) != tuple(tensor.shape)
    ]
    if not (missing or unexpected or mismatched):
        return
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es), e.g. {mismatched[0]}")
    if missing:
        problems.append(f"{len(missing)} weight(s) missing from the file, e.g. {missing[0]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected weight(s), e.g. {unexpected[0]}")
    config = Path(path).resolve().parent.parent / "config.yaml"
    origin = f" (its run's config is {config})" if config.is_file() else ""
    raise CheckpointError(
        f"checkpoint {path} does not fit the configured model: {'; '.join(problems)}. It was "
        "written with another model or objective config (model size, or kl_coef > 0 adding a "
        f"reference model); resume with the config of the run that wrote it{origin}"
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "no message"


def rng_states() -> dict[str, Any]:
    """The global generators' states (torch CPU and CUDA, Python, NumPy), in types a
    ``weights_only`` load accepts. Every draw of a training step is seeded from ``(seed, step)``,
    so these matter only to code that draws outside a step; they are saved for completeness."""
    import random

    import numpy

    kind, keys, position, has_gauss, cached = numpy.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype("int64")), position, has_gauss, cached),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what ``rng_states`` returned (absent entries are left alone)."""
    import random

    import numpy

    if "torch" in states:
        torch.set_rng_state(states["torch"])
    if "python" in states:
        version, internal, gauss = states["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in states:
        kind, keys, position, has_gauss, cached = states["numpy"]
        numpy.random.set_state((kind, keys.numpy().astype("uint32"), position, has_gauss, cached))
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
