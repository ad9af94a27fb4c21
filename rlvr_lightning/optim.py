"""The optimizer and its learning-rate schedule (the ``optim`` config block)."""

from __future__ import annotations

import math
from typing import Any

import torch

LR_SCHEDULES = ("constant", "linear", "cosine")


def build_optimizer(
    policy: torch.nn.Module, cfg: dict[str, Any], total_updates: int | None
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the trainable parameters and a per-update LR schedule: linear warm-up over
    ``warmup_updates``, then ``constant``, ``linear`` or ``cosine`` decay to ``min_lr_ratio`` over
    ``total_updates`` (None: constant after warm-up)."""
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params,
        lr=float(cfg["lr"]),
        betas=tuple(cfg.get("betas", (0.9, 0.999))),
        weight_decay=float(cfg.get("weight_decay", 0.0)),
        eps=float(cfg.get("eps", 1e-8)),
        # One fused kernel over all parameters: several times faster than the per-tensor loop.
        fused=bool(cfg.get("fused", True)) and all(p.device.type in ("cpu", "cuda") for p in params),
    )
    warmup = int(cfg.get("warmup_updates", 0))
    kind = cfg.get("lr_schedule", "constant")
    floor = float(cfg.get("min_lr_ratio", 0.0))
    if kind not in LR_SCHEDULES:
        raise ValueError(f"optim.lr_schedule={kind!r}; use {', '.join(LR_SCHEDULES)}")

    def factor(update: int) -> float:
        if warmup and update < warmup:
            return (update + 1) / warmup
        if kind == "constant" or total_updates is None:
            return 1.0
        progress = min(1.0, (update - warmup) / max(1, total_updates - warmup))
        if kind == "cosine":
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        return floor + (1 - floor) * (1 - progress)

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
