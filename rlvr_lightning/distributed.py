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

Sharding is ``FSDP2Strategy``: Lightning's ``ModelParallelStrategy`` with torch's
``fully_shard`` (FSDP2), on GPUs (nccl) and CPUs (gloo, which is how the test suite runs it).
Lightning's ``FSDPStrategy`` (torch's FSDP1) is not used: it wraps the LightningModule in a root
FSDP unit and runs ``training_step`` inside that unit's forward, and a backward pass started
there fails (``Expects BACKWARD_PRE or BACKWARD_POST state but got HandleTrainingState.FORWARD``),
while a step here generates and runs several backward passes.

Every helper is the identity when ``torch.distributed`` is not initialised (one process).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy
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


def gather_across_ranks(values: torch.Tensor) -> torch.Tensor:
    """Every rank's 1-D ``values`` (lengths may differ), concatenated in rank order, on every
    rank (e.g. the entropies of a mini-batch's tokens for a global quantile); one process:
    ``values`` itself. Two collectives: the lengths, then the values padded to the longest."""
    values = values.flatten()
    if world_size() == 1:
        return values
    length = torch.tensor([values.numel()], device=values.device)
    lengths = [torch.zeros_like(length) for _ in range(world_size())]
    dist.all_gather(lengths, length)
    longest = max(int(n) for n in lengths)
    padded = values.new_zeros(longest)
    padded[: values.numel()] = values
    chunks = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(chunks, padded)
    return torch.cat([chunk[: int(n)] for chunk, n in zip(chunks, lengths, strict=True)])


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
        squared += _local(p.grad).detach().float().pow(2).sum()
    total = _all_reduce(squared, dist.ReduceOp.SUM).sqrt()[0]
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    if torch.isfinite(total):
        for p in parameters:
            p.grad.mul_(scale.to(p.grad.dtype))
    return total


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard: the local tensor of an FSDP2 ``DTensor``, the tensor itself otherwise."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2: every rank holds a shard of each parameter, gradient and optimizer state
    (``torch.distributed.fsdp.fully_shard`` over all ranks), on GPUs (nccl) or CPUs (gloo).

    Each module whose class name is in ``layer_class_names`` (the decoder layers) becomes one
    FSDP unit, gathered for its forward and backward; the rest of the model (embeddings, final
    norm, LM head) is the root unit. The policy and, when the objective has a KL term, the frozen
    reference policy are sharded alike. ``mixed_precision="bf16"`` computes and gathers in
    bfloat16 and reduces gradients in float32 over float32 master shards (use it with trainer
    precision ``32-true``); null keeps everything in the parameters' dtype.
    ``reshard_after_forward=false`` keeps the decoder layers gathered from the forward to the
    backward (ZeRO-2 like: faster, more memory). ``save_distributed_checkpoint=true`` writes one
    file per rank (a folder) instead of one checkpoint gathered on rank 0.
    ``gather_for_rollout=true`` gathers the whole model once for each gradient-free stage of a
    step (generation, the old and reference log-prob passes, validation; ``gathered``), so those
    forwards need no communication and each rank stops when its own rows are done; false keeps
    it sharded (least memory): decoding in lock-step, one gather per layer and token.

    Lightning calls the module's ``configure_model`` hook, which calls ``shard``.
    """

    def __init__(
        self,
        layer_class_names: Sequence[str] = ("LlamaDecoderLayer",),
        mixed_precision: str | None = None,
        reshard_after_forward: bool = True,
        gather_for_rollout: bool = True,
        save_distributed_checkpoint: bool = False,
        process_group_backend: str | None = None,
        **kwargs: Any,
    ) -> None:
        if mixed_precision not in (None, "bf16"):
            raise ValueError(
                f"trainer.strategy.mixed_precision={mixed_precision!r} is unknown; use bf16 or null (the parameters' dtype)"
            )
        # One data-parallel dimension over every rank; no tensor parallelism.
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            **kwargs,
        )
        self.layer_class_names = tuple(layer_class_names)
        self.mixed_precision = mixed_precision
        self.reshard_after_forward = bool(reshard_after_forward)
        self.gather_for_rollout = bool(gather_for_rollout)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def shard(self, models: Iterable[nn.Module]) -> None:
        """Apply ``fully_shard`` to each model's decoder layers, then to the model itself.
        A model already sharded (``configure_model`` runs once per ``fit``/``validate``) is left as is."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = self.device_mesh["data_parallel"]
        policy = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if self.mixed_precision == "bf16"
            else MixedPrecisionPolicy()
        )
        names = frozenset(self.layer_class_names)
        for model in models:
            if is_sharded(model):
                continue
            layers = [sub for sub in model.modules() if type(sub).__name__ in names]
            if not layers:
                found = sorted({type(sub).__name__ for sub in model.modules() if "Layer" in type(sub).__name__})
                raise ValueError(
                    f"trainer.strategy.layer_class_names={list(self.layer_class_names)} matches no module of "
                    f"{type(model).__name__}; set it to the class name of the model's decoder layers "
                    f"(classes here with 'Layer' in their name: {found or 'none'})"
                )
            for layer in layers:
                fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=self.reshard_after_forward)
            # The root (embeddings, norm, head) stays gathered after its forward: the backward
            # needs it at once (torch's default for the root).
            fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)

    @contextlib.contextmanager
    def gathered(self, model: nn.Module) -> Iterator[bool]:
        """With ``gather_for_rollout``, every FSDP unit of ``model`` all-gathered once and kept
        whole inside the block (forwards then need no communication, so ranks need not decode
        in lock-step); yields whether it did. Sharded again on exit."""
        from torch.distributed.fsdp import FSDPModule

        units = [sub for sub in model.modules() if isinstance(sub, FSDPModule)]
        if not (self.gather_for_rollout and units):
            yield False
            return
        for unit in units:
            unit.set_reshard_after_forward(False, recurse=False)
            unit.unshard()
        try:
            yield True
        finally:
            for unit in units:
                unit.reshard()
                unit.set_reshard_after_forward(unit is not model and self.reshard_after_forward, recurse=False)
