"""Checkpoint integrity: a sha256 written with every checkpoint and checked before a resume,
damage told apart from an object the safe loader refuses, partial files of interrupted saves
cleaned up, and write errors (disk full) that name the file."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

import rlvr_lightning.train as train_module
from rlvr_lightning.checkpoints import (
    AtomicCheckpointIO,
    CheckpointError,
    CheckpointWriteError,
    UnverifiedCheckpointWarning,
    atomic_torch_save,
    checksum_path,
    read_resume_checkpoint,
    verify_checkpoint,
)
from rlvr_lightning.train import run
from tests.conftest import TINY_OVERRIDES, compose_config, read_scalars

QUICK = ["trainer.val_check_interval=100", "validate_before_training=false"]


class Forbidden:
    """A class torch.load(weights_only=True) has not been told it may rebuild."""


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def resume(ckpt: Path, run_dir: Path, steps: int = 3) -> dict[str, float]:
    return run(compose_config(TINY_OVERRIDES + QUICK + [f"trainer.max_steps={steps}", f"ckpt_path={ckpt}"]), run_dir=run_dir)


def forbid_building(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if ``train.run`` gets as far as building the model."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was built before the checkpoint was refused")

    monkeypatch.setattr(train_module, "build", refuse)


def flip_middle(path: Path, count: int = 64) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + count] = bytes(byte ^ 0xFF for byte in data[middle : middle + count])
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """2 tiny steps with a checkpoint after each: step_1, step_2 and last, each with its sha256.
    An interrupted save's partial file is waiting in the folder when the run starts."""
    folder = tmp_path_factory.mktemp("run")
    stale = folder / "checkpoints" / ".step_2.ckpt.k3x9_q0z.tmp"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"PK\x03\x04 half of a checkpoint")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    run(compose_config(TINY_OVERRIDES + QUICK + ["trainer.max_steps=2", "checkpoint.every_n_steps=1"]), run_dir=folder)
    return folder / "checkpoints"


@pytest.fixture
def checkpoints(tiny_run: Path, tmp_path: Path) -> Path:
    """A copy of the tiny run's checkpoint folder, free to damage."""
    return Path(shutil.copytree(tiny_run, tmp_path / "checkpoints"))


def test_every_checkpoint_has_a_matching_sha256_and_partial_files_are_gone(tiny_run: Path) -> None:
    names = sorted(path.name for path in tiny_run.iterdir())
    assert names == [
        "last.ckpt", "last.ckpt.sha256", "step_1.ckpt", "step_1.ckpt.sha256", "step_2.ckpt", "step_2.ckpt.sha256",
    ], names  # the stale .step_2.ckpt.*.tmp went with the first successful save
    for name in ("last.ckpt", "step_1.ckpt", "step_2.ckpt"):
        line = checksum_path(tiny_run / name).read_text().splitlines()[0]
        assert line == f"{hashlib.sha256((tiny_run / name).read_bytes()).hexdigest()}  {name}"  # sha256sum -c format


def test_flipped_bytes_are_refused_before_the_model_loads(checkpoints: Path, monkeypatch) -> None:
    ckpt = checkpoints / "last.ckpt"
    flip_middle(ckpt)
    # The damage is invisible to the loader: without the checksum this file would resume.
    assert torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)["global_step"] == 2
    before = snapshot(checkpoints)
    forbid_building(monkeypatch)
    with pytest.raises(CheckpointError) as error:
        resume(ckpt, run_dir=checkpoints.parent)
    message = str(error.value)
    recorded = checksum_path(ckpt).read_text().split()[0]
    for fragment in (
        f"checkpoint {ckpt} is corrupt: its sha256 {hashlib.sha256(ckpt.read_bytes()).hexdigest()}",
        f"does not match {recorded}, recorded in last.ckpt.sha256 when the checkpoint was written (written at",
        "Do not resume from it: use an earlier checkpoint of that run",
        "step_2.ckpt, step_1.ckpt",
    ):
        assert fragment in message, message
    assert "refuses" not in message
    assert snapshot(checkpoints) == before


def test_truncated_copy_says_how_much_is_missing(checkpoints: Path) -> None:
    ckpt = checkpoints / "step_1.ckpt"
    size = ckpt.stat().st_size
    ckpt.write_bytes(ckpt.read_bytes()[: size // 2])
    with pytest.raises(CheckpointError, match=rf"is corrupt: .* it is {size // 2} bytes, {size} were written \(truncated"):
        read_resume_checkpoint(ckpt)


def test_whole_file_holding_a_refused_object_is_not_called_corrupt(tiny_run: Path, tmp_path: Path, monkeypatch) -> None:
    saved = torch.load(tiny_run / "last.ckpt", map_location="cpu", weights_only=True)
    saved["extra"] = Forbidden()
    ckpt = tmp_path / "foreign.ckpt"
    atomic_torch_save(saved, ckpt)
    forbid_building(monkeypatch)
    with pytest.raises(CheckpointError) as error:
        resume(ckpt, run_dir=tmp_path / "run")
    message = str(error.value)
    assert f"checkpoint {ckpt} holds an object the safe loader refuses: {__name__}.Forbidden" in message
    assert "The file is whole (its sha256 matches), not corrupt" in message
    assert "truncated or corrupt" not in message and "is corrupt" not in message
    # Without a sidecar the zip archive's CRC-32s show it is whole: the same diagnosis.
    checksum_path(ckpt).unlink()
    with pytest.warns(UnverifiedCheckpointWarning), pytest.raises(CheckpointError, match="refuses: .*Forbidden. The file is whole \\(its CRC-32s match\\)"):
        read_resume_checkpoint(ckpt)


def test_checkpoint_without_sidecar_loads_with_a_warning(checkpoints: Path, tmp_path: Path) -> None:
    """Checkpoints of older runs have no sha256: they still resume, with a warning."""
    checksum_path(checkpoints / "last.ckpt").unlink()
    with pytest.warns(UnverifiedCheckpointWarning, match="has no checksum file last.ckpt.sha256"):
        resume(checkpoints / "last.ckpt", run_dir=tmp_path / "resumed")
    assert [step for step, _ in read_scalars(tmp_path / "resumed")["reward/mean"]] == [2]


def test_damaged_checkpoint_without_sidecar_is_caught_by_its_crc(checkpoints: Path) -> None:
    ckpt = checkpoints / "last.ckpt"
    checksum_path(ckpt).unlink()
    flip_middle(ckpt)
    with pytest.warns(UnverifiedCheckpointWarning), pytest.raises(CheckpointError, match=r"is corrupt: the CRC-32 of its archive member \S+ does not match"):
        read_resume_checkpoint(ckpt)


def test_a_crash_between_checkpoint_and_sidecar_never_pairs_a_file_with_another_hash(tmp_path: Path, monkeypatch) -> None:
    ckpt = tmp_path / "last.ckpt"
    atomic_torch_save({"global_step": 1}, ckpt)
    before = ckpt.read_bytes()

    def crash(*args):
        raise KeyboardInterrupt  # killed just before the rename

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"global_step": 2}, ckpt)
    monkeypatch.undo()
    # The old file stays; its sidecar is gone already, so it is unverified, not "corrupt".
    assert ckpt.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    with pytest.warns(UnverifiedCheckpointWarning):
        assert verify_checkpoint(ckpt) is False
    assert torch.load(ckpt, weights_only=True) == {"global_step": 1}


def test_stale_partial_files_are_removed_by_the_next_save(tmp_path: Path) -> None:
    old = time.time() - 600
    stale = [tmp_path / ".step_2.ckpt.a1b2c3d4.tmp", tmp_path / ".last.ckpt.sha256.zz_9y8x7.tmp"]
    in_progress = tmp_path / ".step_3.ckpt.q1w2e3r4.tmp"  # another save, still being written
    unrelated = [tmp_path / ".notes.txt.a1b2c3d4.tmp", tmp_path / "step_1.ckpt.tmp"]
    for path in stale + [in_progress] + unrelated:
        path.write_bytes(b"partial")
    for path in stale + unrelated:
        os.utime(path, (old, old))
    os.utime(in_progress, (time.time() + 60, time.time() + 60))
    AtomicCheckpointIO().save_checkpoint({"global_step": 4}, tmp_path / "step_4.ckpt")
    left = sorted(path.name for path in tmp_path.iterdir())
    assert left == sorted(["step_4.ckpt", "step_4.ckpt.sha256", in_progress.name] + [p.name for p in unrelated]), left


def test_removing_a_checkpoint_removes_its_sidecar(tmp_path: Path) -> None:
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 1}, tmp_path / "step_1.ckpt")
    io.remove_checkpoint(tmp_path / "step_1.ckpt")
    assert list(tmp_path.iterdir()) == []


class FillsUp:
    """A file whose disk fills after ``room`` bytes: later writes raise ENOSPC, as a full disk does."""

    def __init__(self, stream, room: int) -> None:
        self.stream, self.room = stream, room

    def write(self, data) -> int:
        size = len(data) if isinstance(data, str) else memoryview(data).nbytes
        if size > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= size
        return self.stream.write(data)

    def __getattr__(self, name):
        return getattr(self.stream, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stream.close()


def fill_disk_after(monkeypatch: pytest.MonkeyPatch, room: int, mode: str) -> None:
    real_fdopen = os.fdopen

    def fdopen(handle, file_mode="r", *args, **kwargs):
        stream = real_fdopen(handle, file_mode, *args, **kwargs)
        return FillsUp(stream, room) if file_mode == mode else stream

    monkeypatch.setattr(os, "fdopen", fdopen)


def test_disk_full_names_the_file_and_keeps_the_previous_checkpoint(tiny_run: Path, tmp_path: Path, monkeypatch) -> None:
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    atomic_torch_save({"global_step": 1}, ckpt)
    before = snapshot(ckpt.parent)
    state = torch.load(tiny_run / "last.ckpt", map_location="cpu", weights_only=True)
    fill_disk_after(monkeypatch, room=4096, mode="wb")  # mid-archive, as in `unexpected pos 496704 vs 496596`
    with pytest.raises(CheckpointWriteError) as error:
        AtomicCheckpointIO().save_checkpoint(state, ckpt)
    message = str(error.value)
    assert error.value.errno == errno.ENOSPC
    assert f"cannot write checkpoint {ckpt}: disk full (No space left on device" in message, message
    assert "unexpected pos" not in message and "is unchanged" in message
    assert snapshot(ckpt.parent) == before  # the old pair, and no partial file


def test_disk_full_while_writing_the_sidecar_says_the_checkpoint_was_written(tmp_path: Path, monkeypatch) -> None:
    ckpt = tmp_path / "step_1.ckpt"
    fill_disk_after(monkeypatch, room=10, mode="w")  # the sidecar is the only text file written
    with pytest.raises(CheckpointWriteError, match=f"checkpoint {ckpt} was written, but not its checksum file step_1.ckpt.sha256: disk full"):
        atomic_torch_save({"global_step": 1}, ckpt)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_1.ckpt"]
