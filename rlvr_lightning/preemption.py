"""Preemption: on SIGTERM or SIGINT, finish the step, write a checkpoint, say how to resume, exit.

A cluster that preempts a job sends SIGTERM (SLURM, Kubernetes, torchrun forward it to every
process) and kills it a grace period later; Ctrl-C sends SIGINT. ``PreemptionCallback`` turns
either into a clean stop at the next step boundary:

1. the signal handler only records the signal (and says so on stderr); the step in progress
   runs to its end, so no half-updated model or optimizer state is ever saved;
2. at the end of the step the ranks agree (one small all-reduce: the run stops when any rank
   got a signal, and SIGTERM wins over SIGINT), and every rank takes part in writing
   ``<checkpoint folder>/preempted.ckpt`` (``trainer.save_checkpoint``: atomic, with its
   ``.sha256``; see ``checkpoints.AtomicCheckpointIO``). It is saved where ``ModelCheckpoint``
   saves its step checkpoints, so resuming from it continues the run exactly;
3. rank 0 prints the command that resumes the run: ``python -m rlvr_lightning.train <this run's
   overrides> ckpt_path=<that file>`` (the overrides are Hydra's; without Hydra, only the
   ``ckpt_path`` part);
4. every rank raises ``Preempted``, a ``SystemExit`` whose code is 128 + the signal number, the
   shell's convention: 143 for SIGTERM, 130 for SIGINT, so a scheduler (or a retry loop) sees
   that the run was stopped and did not finish.

A second Ctrl-C stops at once, without a checkpoint (KeyboardInterrupt: Lightning exits 1).
A signal during the last step lets the run finish as usual (exit 0: nothing is left to resume).
A signal during a validation inside training takes effect at the end of the next step.

Lightning's own SIGTERM handling (``_SignalConnector``) records SIGTERM in
``trainer.received_sigterm`` and then ends ``fit`` with ``SIGTERMException``, a ``SystemExit``
with code 0, without a checkpoint; under DDP its handler even runs a collective
(``dist.broadcast``) inside the signal handler, which cannot be matched by the other ranks.
So, for the training loop (``on_train_start`` to ``on_train_end``), this callback's handlers
replace Lightning's, a SIGTERM Lightning recorded before that is taken over, and Lightning
restores the handlers from before ``fit`` in its own teardown. Outside the training loop
(model loading, ``validate_before_training``) the signals keep their usual effect: nothing is
trained yet, so nothing is lost.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import sys
import threading
import warnings
from pathlib import Path
from types import FrameType
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint

from rlvr_lightning.distributed import world_size

SIGNALS = (signal.SIGTERM, signal.SIGINT)
CHECKPOINT_NAME = "preempted.ckpt"


def exit_code(signum: int) -> int:
    """The status a shell reports for a process stopped by ``signum``: 143 SIGTERM, 130 SIGINT."""
    return 128 + int(signum)


class Preempted(SystemExit):
    """A run stopped by a signal after writing its checkpoint. A ``SystemExit``, so the process
    exits with ``code`` (``exit_code(signum)``) unless something catches it."""

    def __init__(self, signum: int, checkpoint: Path, command: str) -> None:
        super().__init__(exit_code(signum))
        self.signum = int(signum)
        self.checkpoint = checkpoint
        self.command = command

    def __str__(self) -> str:
        return (
            f"stopped by {signal.Signals(self.signum).name} (exit status {self.code}); "
            f"checkpoint {self.checkpoint}; resume with: {self.command}"
        )


def _hydra_overrides() -> list[str] | None:
    """This run's command-line overrides less any ``ckpt_path``; None when Hydra is not running."""
    if not HydraConfig.initialized():
        return None
    return [
        override
        for override in HydraConfig.get().overrides.task
        if override.split("=", 1)[0].lstrip("+~") != "ckpt_path"
    ]


def resume_command(checkpoint: Path) -> str:
    """``python -m rlvr_lightning.train <this run's overrides> ckpt_path=<checkpoint>``, shell
    quoted. The overrides are Hydra's (``HydraConfig.get().overrides.task``) less any earlier
    ``ckpt_path``; without Hydra (``train.run`` called from Python) there are none to repeat."""
    overrides = _hydra_overrides() or []
    return shlex.join(["python", "-m", "rlvr_lightning.train", *overrides, f"ckpt_path={checkpoint}"])


def _say(message: str) -> None:
    """Write to stderr with one system call (safe inside a signal handler)."""
    with contextlib.suppress(OSError):
        os.write(sys.stderr.fileno(), f"[rlvr_lightning] {message}\n".encode())


class PreemptionCallback(Checkpoint):
    """On SIGTERM or SIGINT during training: finish the step, write ``preempted.ckpt``, print
    the resume command and exit 143 or 130 (see the module doc).

    ``dirpath``: the folder of the checkpoint; None: that of the trainer's ``ModelCheckpoint``
    (else ``<default_root_dir>/checkpoints``). A ``Checkpoint`` callback, so Lightning runs it
    after the other callbacks and, listed after the ``ModelCheckpoint``, after that one too: a
    step checkpoint due at the stopping step is written as well.
    """

    def __init__(self, dirpath: str | os.PathLike[str] | None = None, filename: str = CHECKPOINT_NAME) -> None:
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.filename = filename
        self.received: int | None = None  # the signal this process got, if any
        self._previous: dict[int, Any] = {}
        self._global_zero = True

    # ------------------------------------------------------------------ signal handlers

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            self._restore()
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        first = self.received is None
        if first or signum == signal.SIGTERM:
            self.received = signum
        if first and self._global_zero:
            again = "; press Ctrl-C again to stop at once, without a checkpoint" if signum == signal.SIGINT else ""
            _say(
                f"{name} received: finishing the current step, then writing a checkpoint and "
                f"exiting with status {exit_code(signum)}{again}"
            )

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            warnings.warn(
                "training runs outside the main thread, where signal handlers cannot be set: "
                "SIGTERM and SIGINT stop it without a checkpoint",
                stacklevel=2,
            )
            return
        for signum in SIGNALS:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)

    def _restore(self) -> None:
        """Put back the handlers ``_install`` replaced (those still ours)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, previous in self._previous.items():
            if signal.getsignal(signum) == self._handle:
                signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    # ------------------------------------------------------------------ Lightning hooks

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._global_zero = trainer.is_global_zero
        self.received = None
        # A SIGTERM that Lightning's handler caught before this point is ours to act on; left
        # in Lightning's flag, it would end the run with status 0 and no checkpoint.
        connector = getattr(trainer, "_signal_connector", None)
        if getattr(connector, "received_sigterm", False):
            self.received = signal.SIGTERM
            connector.received_sigterm = False
        self._install()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        signum = self._agreed_signal(trainer.strategy.root_device)
        if not signum:
            return
        if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
            if trainer.is_global_zero:
                _say(f"{signal.Signals(signum).name} received during the last step: the run finishes as usual")
            return
        path = self.checkpoint_path(trainer)
        trainer.save_checkpoint(path, weights_only=False)  # every rank takes part; rank 0 writes
        command = resume_command(path)
        if trainer.is_global_zero:
            config = " (and the config this run was given)" if _hydra_overrides() is None else ""
            _say(
                f"stopped by {signal.Signals(signum).name} after {trainer.global_step} steps; "
                f"checkpoint: {path}\n[rlvr_lightning] resume with{config}:\n{command}"
            )
        self._restore()
        raise Preempted(signum, path, command)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore()

    # ------------------------------------------------------------------ helpers

    def _agreed_signal(self, device: torch.device) -> int:
        """The signal every rank acts on: the largest any rank received (SIGTERM, 15, wins over
        SIGINT, 2); 0 when none did. One all-reduce per step under DDP/FSDP, none alone."""
        received = int(self.received or 0)
        if world_size() == 1:
            return received
        value = torch.tensor([received], dtype=torch.int64, device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return int(value.item())

    def checkpoint_path(self, trainer: pl.Trainer) -> Path:
        """Absolute path of the checkpoint this callback writes."""
        folder = self.dirpath
        if folder is None:
            saving = [cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint) and cb.dirpath]
            folder = Path(saving[0].dirpath) if saving else Path(trainer.default_root_dir) / "checkpoints"
        return (folder / self.filename).resolve()
