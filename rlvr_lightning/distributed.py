"""Data-parallel (DDP) and sharded (FSDP) training: the few places where ranks must agree.

Each rank trains on its own share of the step's prompts (``data.datamodule.StepBatches``) and
samples with its own seed; groups are never split across ranks, so group advantages stay
rank-local. What needs the other ranks:

- the global token count of each mini-batch (the module reduces it; ``LossNormalizer``),
- the number of backward passes per optimizer update: DDP all-reduces gradients in every
  backward and FSDP reduce-scatters them, so every rank must run the same number of
  micro-batches (``equal_micro_batches`` pads a short rank with zero-weight repeats),
- under FSDP, the number of forward passes too (each one all-gathers the layer's parameters):
  generation then decodes in lock-step (``needs_synced_forwards``) and log-prob passes are
  padded like the updates,
- the gradient norm under FSDP, whose gradients are shards (``clip_grad_norm``),
- the logged training scalars: the mean over ranks (``mean_across_ranks``).

Every helper is the identity when ``torch.distributed`` is not initialised (one process).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_reduce(values: torch.Tensor, op: Any) -> torch.Tensor:
    if world_size() > 1:
        dist.all_reduce(values, op=op)
    return values


def equal_micro_batches(
    micro_batches: Sequence[torch.Tensor], device: torch.device | str = "cpu"
) -> list[tuple[torch.Tensor, float]]:
    """``(rows, weight)`` pairs, as many on every rank: a rank with fewer micro-batches than the
    busiest one repeats its last micro-batch with weight 0 (its loss counts nothing, but its
    backward joins the gradient all-reduce / reduce-scatter the other ranks are in)."""
    pairs = [(rows, 1.0) for rows in micro_batches]
    if world_size() == 1:
        return pairs
    most = int(_all_reduce(torch.tensor([len(pairs)], device=device), dist.ReduceOp.MAX)[0])
    if most > len(pairs) and not pairs:
        raise RuntimeError("this rank has no micro-batch to repeat; every rank needs at least one group")
    return pairs + [(pairs[-1][0], 0.0)] * (most - len(pairs))


def min_across_ranks(value: int, device: torch.device | str = "cpu") -> int:
    """Smallest ``value`` over ranks (e.g. the number of mini-batches all ranks can fill)."""
    return int(_all_reduce(torch.tensor([value], device=device), dist.ReduceOp.MIN)[0])


def mean_across_ranks(metrics: dict[str, float], device: torch.device | str = "cpu") -> dict[str, float]:
    """Each scalar averaged over the ranks that report it (a rank may lack a key, e.g. ERC
    quantiles when it had no loss token); keys are agreed on first so every rank reduces the
    same vector in the same order."""
    if world_size() == 1:
        return dict(metrics)
    gathered: list[list[str] | None] = [None] * world_size()
    dist.all_gather_object(gathered, sorted(metrics))
    keys = sorted({key for names in gathered for key in (names or [])})
    values = torch.tensor([float(metrics.get(k, 0.0)) for k in keys], dtype=torch.float64, device=device)
    present = torch.tensor([float(k in metrics) for k in keys], dtype=torch.float64, device=device)
    stacked = _all_reduce(torch.stack([values, present]), dist.ReduceOp.SUM)
    return {k: float(stacked[0, i] / stacked[1, i].clamp_min(1)) for i, k in enumerate(keys)}


def is_sharded(module: nn.Module) -> bool:
    """True when FSDP (v1 wrappers or ``fully_shard``) manages parameters of ``module``."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    for sub in module.modules():
        if isinstance(sub, FullyShardedDataParallel) or type(sub).__name__.startswith("FSDP"):
            return True
    return False


def needs_synced_forwards(module: nn.Module) -> bool:
    """Whether every rank must run the same number of forward passes through ``module``.

    Under FSDP each wrapped layer all-gathers its parameters in its forward, so a rank that
    stopped decoding early would leave the others waiting. (Gathering the whole model once with
    ``FullyShardedDataParallel.summon_full_params`` is not an option: Lightning runs the
    training step inside the root FSDP forward, where summoning is refused, and a forward
    inside a summoned unit reshards it.) DDP and one process: False.
    """
    return world_size() > 1 and is_sharded(module)


def all_ranks(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True when ``flag`` holds on every rank (one small all-reduce), so ranks decide together."""
    if world_size() == 1:
        return flag
    value = torch.tensor([1 if flag else 0], device=device)
    return bool(_all_reduce(value, dist.ReduceOp.MIN)[0])


@torch.no_grad()
def clip_grad_norm(parameters: Iterable[nn.Parameter], max_norm: float, sharded: bool) -> torch.Tensor:
    """Clip by the global gradient norm. With ``sharded`` (FSDP, ``use_orig_params``) each rank
    holds a disjoint shard of every gradient, so the squared norms are summed over ranks first;
    otherwise (one process, DDP after its all-reduce) the local norm is already the global one."""
    parameters = list(parameters)
    if not sharded or world_size() == 1:
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    # A rank whose shard misses a parameter holds no gradient for it; it still joins the reduce.
    device = parameters[0].device if parameters else torch.device("cpu")
    parameters = [p for p in parameters if p.grad is not None]
    squared = torch.zeros(1, device=device, dtype=torch.float32)
    for p in parameters:
        squared += p.grad.detach().float().pow(2).sum()
    total = _all_reduce(squared, dist.ReduceOp.SUM).sqrt()[0]
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    if torch.isfinite(total):
        for p in parameters:
            p.grad.mul_(scale.to(p.grad.dtype))
    return total


def _layer_name_matches(module: nn.Module, names: frozenset[str]) -> bool:
    return type(module).__name__ in names


def fsdp_strategy(
    layer_class_names: Sequence[str] = ("LlamaDecoderLayer",),
    activation_checkpointing: bool = False,
    sharding_strategy: str = "FULL_SHARD",
    **kwargs: Any,
):
    """Lightning ``FSDPStrategy`` that wraps (and optionally checkpoints) every module whose class
    name is in ``layer_class_names``: the decoder layers of a Hugging Face model, found by name at
    wrap time, so the config needs no import path (``LlamaDecoderLayer``, ``Qwen2DecoderLayer``)."""
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

    names = frozenset(layer_class_names)
    policy = functools.partial(lambda_auto_wrap_policy, lambda_fn=functools.partial(_layer_name_matches, names=names))
    return FSDPStrategy(
        auto_wrap_policy=policy,
        activation_checkpointing_policy=policy if activation_checkpointing else None,
        sharding_strategy=sharding_strategy,
        **kwargs,
    )
