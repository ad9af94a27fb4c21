"""Checkpoint files: written atomically with a checksum, checked before a run resumes from one.

``AtomicCheckpointIO`` is Lightning's ``TorchCheckpointIO`` with an atomic, verified write
(``atomic_torch_save``): the checkpoint goes to a temporary file in the target's folder, is
flushed to disk and then renamed over the target (``os.replace``), so a run killed mid-write
leaves the previous file whole and never a truncated one. (Lightning's own write stages the file
in the system temp folder, and moving it across file systems is a copy, which is not atomic.)
The sha256 of the bytes written goes to a sidecar, ``<name>.sha256`` (``sha256sum -c`` reads
it), written after the checkpoint is in place; the previous sidecar is removed before the
rename, so a crash between the two leaves a checkpoint without a sidecar, never a checkpoint
paired with another file's hash. Partial files of an interrupted earlier save in that folder
(``.<name>.<random>.tmp``) are removed once a save succeeds. A failed write (disk full
included) names the file.

``read_resume_checkpoint`` and ``check_checkpoint_fits`` turn every way a resume checkpoint can
be wrong (missing, damaged after it was written, unreadable, holding an object the safe loader
refuses, not written by rlvr_lightning, written for another model) into one error that names
the file and the likely cause, before anything is trained or written. A checkpoint without a
sidecar (written before checksums, or copied without it) loads with a warning, after a check of
the CRC-32s its zip archive stores.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import hashlib
import os
import pickle
import re
import shutil
import socket
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

# Shown with every resume error: where checkpoints live and how to pass one.
RESUME_HINT = (
    "pass ckpt_path=outputs/runs/<run>/checkpoints/last.ckpt (or a step_*.ckpt of that folder, "
    "written when checkpoint.every_n_steps > 0)"
)
CHECKSUM_SUFFIX = ".sha256"
_CHUNK = 1 << 24  # bytes read at a time when hashing or checking a file
# tempfile.mkstemp's names: prefix, 8 characters of its alphabet, suffix.
_PARTIAL = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be resumed from; the message names the file and the likely cause."""


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed; the message names the file (and says "disk full" when the
    file system is out of space). The file that was at that path before, if any, is unchanged."""


class UnverifiedCheckpointWarning(UserWarning):
    """A checkpoint has no ``.sha256`` sidecar, so its bytes cannot be checked against a hash."""


def checksum_path(path: str | os.PathLike[str]) -> Path:
    """The sidecar that holds ``path``'s sha256: ``<name>.sha256`` next to it."""
    path = Path(path)
    return path.with_name(path.name + CHECKSUM_SUFFIX)


class _HashingWriter:
    """The stream ``torch.save`` writes to: hashes every byte on its way to the file and keeps
    the first write error (torch's zip writer replaces it with ``unexpected pos N vs M``)."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.digest = hashlib.sha256()
        self.size = 0
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            written = self.stream.write(data)
        except OSError as error:
            self.error = self.error or error
            raise
        view = memoryview(data)
        self.digest.update(view)
        self.size += view.nbytes
        return written

    def flush(self) -> None:
        self.stream.flush()


def _sha256_of(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_folder(folder: Path) -> None:
    """Persist the folder's entries (a rename, an unlink); not every platform can open a folder."""
    with contextlib.suppress(OSError):
        handle = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)


def _write_error(path: Path, error: OSError, written: Path | None = None) -> CheckpointWriteError:
    """``error`` (raised while writing ``path``) as an error that names the file; ENOSPC and
    EDQUOT say "disk full" and how much space is left. ``written``: the checkpoint that was
    written all the same (``path`` is its checksum file)."""
    if isinstance(error, CheckpointWriteError):
        return error
    reason = error.strerror or str(error) or type(error).__name__
    full = error.errno in (errno.ENOSPC, errno.EDQUOT)
    if full:
        with contextlib.suppress(OSError):
            reason += f", {shutil.disk_usage(path.parent).free / 2**30:.2f} GiB free now"
        reason = f"{'disk full' if error.errno == errno.ENOSPC else 'disk full (disk quota exceeded)'} ({reason})"
    if written is None:
        message = f"cannot write checkpoint {path}: {reason}. The previous file at that path, if any, is unchanged"
    else:
        message = (
            f"checkpoint {written} was written, but not its checksum file {path.name}: {reason}. "
            "The checkpoint loads unverified, with a warning"
        )
    if full:
        message += (
            f". Free space in {path.parent}, or write checkpoints elsewhere (hydra.run.dir=<a folder "
            "on a larger disk>) or less often (checkpoint.every_n_steps)"
        )
    return CheckpointWriteError(error.errno, message)


def _write_text_atomically(path: Path, text: str) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def _remove_stale_partials(target: Path, older_than_ns: int) -> None:
    """Remove the temporary files that interrupted saves left in ``target``'s folder: hidden
    ``.<name>.<random>.tmp`` files of checkpoints (and their sidecars) with ``target``'s
    suffix, last written before this save began (a save still running elsewhere is spared)."""
    suffix = target.suffix or target.name
    with contextlib.suppress(OSError):
        for entry in os.scandir(target.parent):
            match = _PARTIAL.match(entry.name)
            if not match or not entry.is_file(follow_symlinks=False):
                continue
            name = match["name"].removesuffix(CHECKSUM_SUFFIX)
            if not name.endswith(suffix):
                continue
            with contextlib.suppress(OSError):
                if entry.stat(follow_symlinks=False).st_mtime_ns < older_than_ns:
                    os.unlink(entry.path)


def atomic_torch_save(obj: Any, path: str | os.PathLike[str], checksum: bool = True) -> None:
    """``torch.save(obj, path)`` that never leaves a partly written ``path`` behind; with
    ``checksum``, the sha256 of the file goes to ``<path>.sha256`` (``checksum_path``).
    Raises CheckpointWriteError, naming ``path``, when the file system refuses the write."""
    target = Path(path)
    sidecar = checksum_path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as error:
        raise _write_error(target, error) from error
    try:
        started_ns = os.fstat(handle).st_mtime_ns  # the file system's clock, as partial files see it
        with os.fdopen(handle, "wb") as stream:
            writer = _HashingWriter(stream)
            try:
                torch.save(obj, writer)
            except RuntimeError:
                if writer.error is not None:
                    raise writer.error from None
                raise
            stream.flush()
            os.fsync(stream.fileno())
            size = os.fstat(stream.fileno()).st_size
        # torch writes its archive front to back; should a version ever seek, hash the file.
        digest = writer.digest.hexdigest() if writer.size == size else _sha256_of(temporary)
        os.chmod(temporary, 0o644)  # mkstemp creates 0600; checkpoints are ordinary files
        # The old sidecar goes first: a crash before the new one is written leaves a checkpoint
        # without a sidecar (loaded with a warning), never one paired with the old file's hash.
        if os.path.lexists(sidecar):
            os.unlink(sidecar)
            _fsync_folder(target.parent)
        os.replace(temporary, target)
    except OSError as error:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise _write_error(target, error) from error
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    if checksum:
        written = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        try:
            _write_text_atomically(
                sidecar,
                f"{digest}  {target.name}\n# rlvr_lightning checkpoint checksum (check: sha256sum -c "
                f"{sidecar.name}): size={size} written={written} host={socket.gethostname()} "
                f"pid={os.getpid()}\n",
            )
        except OSError as error:
            raise _write_error(sidecar, error, written=target) from error
    _fsync_folder(target.parent)  # persist the renames (the folder entries)
    _remove_stale_partials(target, started_ns)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O whose writes are atomic and checksummed (``atomic_torch_save``)."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike[str], storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        atomic_torch_save(checkpoint, path)

    def remove_checkpoint(self, path: str | os.PathLike[str]) -> None:
        super().remove_checkpoint(path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(checksum_path(path))


@dataclass(frozen=True)
class _Recorded:
    """What a ``.sha256`` sidecar says: the hash, and where known the size and the writer."""

    sha256: str
    size: int | None
    origin: str


def _read_sidecar(sidecar: Path, path: Path) -> _Recorded:
    try:
        lines = sidecar.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise CheckpointError(
            f"the checksum file {sidecar} of checkpoint {path} cannot be read ({type(error).__name__}: "
            f"{_first_line(error)}); restore it, or delete it to load the checkpoint unverified"
        ) from error
    entries = [line.split() for line in lines if line.strip() and not line.startswith("#")]
    if not entries or not re.fullmatch(r"[0-9a-fA-F]{64}", entries[0][0]):
        raise CheckpointError(
            f"the checksum file {sidecar} of checkpoint {path} holds no sha256 (a 64-digit hex "
            "line, as sha256sum writes); restore it, or delete it to load the checkpoint unverified"
        )
    fields = dict(
        token.split("=", 1) for line in lines if line.startswith("#") for token in line.split() if "=" in token
    )
    size = int(fields["size"]) if fields.get("size", "").isdigit() else None
    origin = ", ".join(
        f"{label} {fields[key]}" for key, label in (("written", "at"), ("host", "on host"), ("pid", "by process")) if key in fields
    )
    return _Recorded(entries[0][0].lower(), size, origin)


def _other_checkpoints(path: Path, limit: int = 5) -> str:
    """The other checkpoints in ``path``'s folder, newest first, for an error message."""
    try:
        others = sorted(
            (p for p in path.parent.glob("*.ckpt") if p.name != path.name and p.is_file()),
            key=lambda p: p.stat().st_mtime,
            reverse=True,
        )
    except OSError:
        others = []
    if not others:
        return f"there is no other checkpoint in {path.parent}; start that run again without ckpt_path"
    named = [f"{p.name}{'' if checksum_path(p).is_file() else ' (no checksum)'}" for p in others[:limit]]
    more = f" and {len(others) - limit} more" if len(others) > limit else ""
    return f"use an earlier checkpoint of that run, newest first in {path.parent}: {', '.join(named)}{more}"


def verify_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Check ``path`` against its ``.sha256`` sidecar (True). Without a sidecar, warn
    (UnverifiedCheckpointWarning), check the CRC-32s of its zip archive instead and return
    False. Raises CheckpointError when the bytes are not those that were written."""
    path = Path(path)
    sidecar = checksum_path(path)
    if not sidecar.is_file() and path.is_symlink():  # a link (e.g. last.ckpt): the target's sidecar
        sidecar = checksum_path(path.resolve())
    if not sidecar.is_file():
        warnings.warn(
            f"checkpoint {path} has no checksum file {sidecar.name} (written before checkpoints "
            "carried one, or copied without it): its bytes cannot be verified against a sha256; "
            "only the CRC-32s of its zip archive are checked",
            UnverifiedCheckpointWarning,
            stacklevel=2,
        )
        member = _first_damaged_zip_member(path)
        if member is not None:
            raise CheckpointError(
                f"checkpoint {path} is corrupt: the CRC-32 of its archive member {member} does "
                "not match the one recorded when it was written (its bytes changed since: disk, "
                f"copy or transfer error); do not resume from it: {_other_checkpoints(path)}"
            )
        return False
    recorded = _read_sidecar(sidecar, path)
    actual = _sha256_of(path)
    if actual == recorded.sha256:
        return True
    size = path.stat().st_size
    sizes = ""
    if recorded.size is not None and recorded.size != size:
        cut = " (truncated: copied or written incompletely)" if size < recorded.size else ""
        sizes = f"; it is {size} bytes, {recorded.size} were written{cut}"
    origin = f" (written {recorded.origin})" if recorded.origin else ""
    raise CheckpointError(
        f"checkpoint {path} is corrupt: its sha256 {actual} does not match {recorded.sha256}, "
        f"recorded in {sidecar.name} when the checkpoint was written{origin}{sizes}. Its bytes "
        "changed after the save (disk, copy or transfer error), or the file was replaced without "
        f"its {sidecar.name}. Do not resume from it: {_other_checkpoints(path)}. (If you "
        f"replaced it on purpose, delete {sidecar} to load it unverified.)"
    )


def _first_damaged_zip_member(path: Path) -> str | None:
    """The first member of ``path``'s zip archive whose CRC-32 does not match; None when all
    match or when ``path`` is no readable zip archive (``torch.load`` then says why)."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError):
        return None
    with archive:
        for info in archive.infolist():
            try:
                with archive.open(info) as member:
                    while member.read(_CHUNK):
                        pass
            except Exception:  # a bad CRC, header or length: all damage
                return info.filename
    return None


# What torch's weights-only unpickler says when it refuses an object (rather than failing to
# parse bytes): an unlisted or blocked global, a class or function it may not call.
_REFUSED = (
    re.compile(r"GLOBAL (\S+) was not an allowed global"),
    re.compile(r"unsupported GLOBAL (\S+) whose module"),
    re.compile(r"Can only create new object for nn\.Parameter or classes allowlisted via `add_safe_globals` but got (.+)"),
    re.compile(r"Trying to call reduce for unrecognized function (.+)"),
    re.compile(r"(``\S+`` must be imported to load .+)"),
)


def _refused_object(error: BaseException) -> str | None:
    """The object (global) the safe loader refused, when that is why ``error`` was raised."""
    if not isinstance(error, pickle.UnpicklingError):
        return None
    for pattern in _REFUSED:
        found = pattern.search(str(error))
        if found:
            return found.group(1).strip().rstrip(".")
    return None


def read_resume_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """Verify a checkpoint to resume from (``verify_checkpoint``), load it (tensors memory-mapped,
    not read) and check that it is one rlvr_lightning wrote. Raises FileNotFoundError or
    CheckpointError with the fix. A sharded FSDP checkpoint (a folder,
    ``trainer.strategy.save_distributed_checkpoint=true``) is left to Lightning's own loader: None."""
    path = Path(path)
    if path.is_dir() and (path / ".metadata").is_file():
        return None
    if not path.is_file():
        what = "is a folder, not a checkpoint file" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"ckpt_path={str(path)!r} {what}; {RESUME_HINT}")
    verified = verify_checkpoint(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:
        refused = _refused_object(error)
        if refused is not None:
            whole = "its sha256 matches" if verified else "its CRC-32s match"
            raise CheckpointError(
                f"checkpoint {path} holds an object the safe loader refuses: {refused}. The file "
                f"is whole ({whole}), not corrupt: torch.load(weights_only=True) loads tensors, "
                "containers and allow-listed types only, and this checkpoint was not written by "
                "rlvr_lightning.train (or by code that stored another object in it). Load it with "
                "weights_only=False only if you trust where it came from; to resume, "
                f"{RESUME_HINT}"
            ) from error
        if verified:
            raise CheckpointError(
                f"checkpoint {path} cannot be read ({type(error).__name__}: {_first_line(error)}), "
                "although its sha256 matches the one recorded when it was written: it is whole, "
                "so it was written by another torch version or is not a checkpoint. Resume from "
                f"another checkpoint of that run: {RESUME_HINT}"
            ) from error
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
