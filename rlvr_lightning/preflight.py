"""Checks a run makes before it trains or writes, and the run folder's first files.

- ``check_output_folders``: the run folder and its ``checkpoints/`` can be written (checked
  before the model loads, not found out when the first checkpoint is saved at the end).
- ``warn_long_prompts``: training prompts longer than the model's context (minus
  ``rollout.max_new_tokens``) with no ``rollout.max_prompt_tokens`` to cut them.
- ``write_run_files``: ``config.yaml`` and Hydra's ``.hydra/`` (``hydra.output_subdir`` is null in
  ``conf/config.yaml``, so Hydra writes none before the config is checked); a write error names
  the file. ``remove_unused_run_folder``: after a run that failed before writing anything, the
  folder Hydra created for it goes (with the job log it holds, if that is all).
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from omegaconf import DictConfig, OmegaConf

HOW_TO_MOVE = "write the run elsewhere: hydra.run.dir=<folder> on the command line (run(cfg, run_dir=...) in Python)"
# Where a model config states its context length, by model family.
CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


class OutputFolderError(OSError):
    """The run folder (or its checkpoints/) cannot be written; the message names it."""


def _unwritable(folder: Path) -> str | None:
    """Why ``folder`` (an existing path) cannot hold the run's files, or None."""
    if not folder.is_dir():
        return "it is a file, not a folder"
    if os.access(folder, os.W_OK | os.X_OK):
        return None
    try:
        read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        read_only = False
    return "it is on a read-only file system" if read_only else "permission denied (the folder is not writable)"


def check_output_folders(run_dir: Path) -> None:
    """Raise OutputFolderError when the run folder or ``checkpoints/`` in it cannot be written (or
    created: the nearest existing folder above them must be writable). Creates nothing."""
    for folder, what in ((run_dir, "the run folder"), (run_dir / "checkpoints", "the checkpoint folder")):
        existing = folder
        while not existing.exists() and existing.parent != existing:
            existing = existing.parent
        reason = _unwritable(existing)
        if reason is None:
            continue
        where = "" if existing == folder else f" (it does not exist yet, and {existing}, where it would be created, cannot be written)"
        raise OutputFolderError(
            errno.EACCES,
            f"cannot write {what} {folder}: {reason}{where}. The run writes config.yaml, its logs and its "
            f"checkpoints there (the last one when training ends): make it writable, or {HOW_TO_MOVE}",
        )


def context_length(model: Any) -> int | None:
    """The model's context length in tokens, from its config (None when it states none)."""
    config = getattr(model, "config", None)
    for name in CONTEXT_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def warn_long_prompts(module: Any, train_rows: list[dict[str, Any]], cfg: DictConfig) -> int | None:
    """Warn when the longest training prompts do not fit the model's context together with
    ``rollout.max_new_tokens`` and ``rollout.max_prompt_tokens`` does not cut them (or cuts them
    too late). Tokenizes the 16 longest questions only. Returns their longest prompt in tokens."""
    context = context_length(module.policy)
    if context is None or not train_rows:
        return None
    longest = sorted(train_rows, key=lambda row: len(str(row.get("question", ""))), reverse=True)[:16]
    encoded = module.tokenizer(module.collector.prompts(longest), add_special_tokens=False)["input_ids"]
    tokens = max(len(ids) for ids in encoded)
    new_tokens = int(cfg.rollout.max_new_tokens)
    limit = cfg.rollout.get("max_prompt_tokens")
    fits = context - new_tokens
    if tokens + new_tokens <= context or (limit is not None and int(limit) + new_tokens <= context):
        return tokens
    cut = (
        "rollout.max_prompt_tokens is not set, so such prompts are generated in full"
        if limit is None
        else f"rollout.max_prompt_tokens={limit} lets them past it"
    )
    hint = (
        f"set rollout.max_prompt_tokens={fits} (over-long prompts are then dropped; "
        "rollout.overlong_prompts=truncate keeps their end instead)"
        if fits >= 1
        else f"lower rollout.max_new_tokens={new_tokens} below the context first"
    )
    rank_zero_warn(
        f"the longest training prompt is {tokens} tokens, and with rollout.max_new_tokens={new_tokens} it "
        f"does not fit the model's context of {context} tokens (model config: {CONTEXT_FIELDS[0]} or "
        f"alike); {cut}: slow, memory-hungry, and past the context the model's outputs are meaningless. "
        f"{hint}",
        category=UserWarning,
    )
    return tokens


def _write(path: Path, text: str) -> None:
    """Write ``text`` to ``path``; an error names the file (and says "disk full" when it is)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as error:
        reason = "disk full" if error.errno in (errno.ENOSPC, errno.EDQUOT) else (error.strerror or str(error))
        raise OSError(error.errno, f"cannot write {path}: {reason}; free space there or {HOW_TO_MOVE}") from error


def write_run_files(cfg: DictConfig, run_dir: Path) -> None:
    """``config.yaml`` (resolved) in the run folder, and under Hydra ``.hydra/config.yaml``,
    ``hydra.yaml`` and ``overrides.yaml``, as Hydra writes them when ``hydra.output_subdir`` is
    set, now that the config passed its checks."""
    _write(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.output_subdir is not None or Path(hydra_cfg.runtime.output_dir).resolve() != run_dir.resolve():
        return  # Hydra wrote them itself, or this run writes elsewhere
    folder = run_dir / ".hydra"
    _write(folder / "config.yaml", OmegaConf.to_yaml(cfg))
    _write(folder / "hydra.yaml", OmegaConf.to_yaml(OmegaConf.create({"hydra": hydra_cfg})))
    _write(folder / "overrides.yaml", OmegaConf.to_yaml(hydra_cfg.overrides.task))


def remove_unused_run_folder(run_dir: Path, log_name: str) -> None:
    """Remove ``run_dir`` after a run that failed before writing anything of its own: when it
    holds nothing, or nothing but the job log ``<log_name>.log`` (whose handler is closed)."""
    try:
        entries = list(run_dir.iterdir())
    except OSError:
        return
    log_file = run_dir / f"{log_name}.log"
    if any(entry != log_file for entry in entries):
        return
    for handler in list(logging.getLogger().handlers):
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename) == log_file.absolute():
            logging.getLogger().removeHandler(handler)
            handler.close()
    try:
        if log_file.exists():
            log_file.unlink()
        run_dir.rmdir()
    except OSError:
        pass
