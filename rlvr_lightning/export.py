"""Export a trained policy as a Hugging Face model folder:
``python -m rlvr_lightning.export <checkpoint> <folder>``.

The checkpoint is one ``rlvr_lightning.train`` wrote: a ``.ckpt`` file, or the folder a sharded
FSDP2 run writes (``trainer=fsdp2 trainer.strategy.save_distributed_checkpoint=true``, one file
per rank), which is read in one process. The policy is rebuilt from the model config stored in
the checkpoint, given the trained weights (LoRA adapters merged into them) and saved with its
tokenizer as safetensors, so that any tool loads it, ours included::

    python -m rlvr_lightning.evaluate model=hf model.name_or_path=<folder> data=gsm8k ...

The target folder must not exist yet (nothing is overwritten); it is written under a temporary
name and renamed when complete.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from rlvr_lightning.checkpoints import CheckpointError, read_resume_checkpoint
from rlvr_lightning.models import load_model_and_tokenizer, merge_lora

PREFIX = "policy."


def _sharded_metadata(folder: Path) -> dict[str, Any]:
    """The non-tensor part of a sharded checkpoint (Lightning's ``meta.pt``)."""
    meta = folder / "meta.pt"
    if not meta.is_file():
        raise CheckpointError(f"sharded checkpoint {folder} has no meta.pt: it was not written by rlvr_lightning.train")
    metadata = torch.load(meta, map_location="cpu", weights_only=False)
    if "rlvr_control_state" not in metadata:
        raise CheckpointError(f"checkpoint {folder} has no rlvr_lightning control state: it was not written by rlvr_lightning.train")
    return metadata


def _load_sharded_policy(folder: Path, policy: torch.nn.Module) -> None:
    """Fill ``policy`` from the ``policy.*`` entries of a distributed (DCP) checkpoint folder,
    resharded onto this single process."""
    import torch.distributed.checkpoint as dcp

    weights = {PREFIX + name: tensor for name, tensor in policy.state_dict().items()}
    dcp.load({"state_dict": weights}, checkpoint_id=str(folder), no_dist=True)
    policy.load_state_dict({name[len(PREFIX) :]: tensor for name, tensor in weights.items()})


def export_policy(checkpoint: str | Path, target: str | Path) -> Path:
    """Write the policy of ``checkpoint`` to the new folder ``target`` (see the module doc)."""
    checkpoint, target = Path(checkpoint), Path(target)
    if target.exists():
        raise FileExistsError(f"{target} already exists; export into a new folder (nothing is overwritten)")
    sharded = checkpoint.is_dir() and (checkpoint / ".metadata").is_file()
    loaded = None if sharded else read_resume_checkpoint(checkpoint)
    metadata = _sharded_metadata(checkpoint) if sharded else loaded
    hyper = metadata.get("hyper_parameters") or {}
    if "model" not in hyper:
        raise CheckpointError(f"checkpoint {checkpoint} has no model config in its hyper_parameters")
    model_cfg = dict(hyper["model"])
    model_cfg.pop("gradient_checkpointing", None)
    policy, tokenizer = load_model_and_tokenizer(**model_cfg, seed=int(hyper.get("seed", 0)))
    if sharded:
        _load_sharded_policy(checkpoint, policy)
    else:
        weights = {k[len(PREFIX) :]: v for k, v in loaded["state_dict"].items() if k.startswith(PREFIX)}
        missing, unexpected = policy.load_state_dict(weights, strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"checkpoint {checkpoint} does not fit the model config it stores: "
                f"{len(missing)} missing weight(s) (e.g. {missing[:1]}), {len(unexpected)} unexpected (e.g. {unexpected[:1]})"
            )
    if int((model_cfg.get("lora") or {}).get("r", 0)) > 0:  # LoRA: fold the adapters into the weights
        policy = merge_lora(policy)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        policy.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m rlvr_lightning.export",
        description="Export the policy of an rlvr_lightning checkpoint as a Hugging Face model folder.",
    )
    parser.add_argument("checkpoint", help="a .ckpt file, or a sharded checkpoint folder (trainer=fsdp2)")
    parser.add_argument("folder", help="new folder to write (config, safetensors weights, tokenizer)")
    args = parser.parse_args(argv)
    target = export_policy(args.checkpoint, args.folder)
    print(f"[rlvr_lightning] policy written to {target.resolve()}")
    print(f"[rlvr_lightning] evaluate it with: python -m rlvr_lightning.evaluate model=hf model.name_or_path={target}")


if __name__ == "__main__":
    main()
