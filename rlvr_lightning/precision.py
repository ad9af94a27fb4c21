"""Numeric precision: ``trainer.precision``, its ``auto`` value, and decoding under CPU bf16.

``trainer.precision`` takes Lightning's values (``32-true``, ``bf16-mixed``, ...) and ``auto``:
``bf16-mixed`` on a CPU with native bfloat16 arithmetic (``avx512_bf16`` or ``amx_bf16`` among
its flags), ``32-true`` anywhere else: a CPU without them or one that cannot be identified, a
GPU (``trainer=gpu`` sets ``bf16-mixed`` itself), and FSDP2 (``trainer.strategy.mixed_precision``
is its own setting). ``train.build`` resolves it (``resolve_precision``), prints the choice and
its reason, and records it in the run's hyper-parameters.

``bf16-mixed`` keeps the weights and the optimizer state in float32 and runs every forward under
``torch.autocast`` to bfloat16: generation (it runs inside the training and validation steps),
the old-log-prob and reference passes and the update. Lightning's autocast caches no weight
casts, so each forward would cast every weight again: one decoding step of a small batch spends
more time casting than multiplying. ``weights_cast_once`` (used by the engines that decode with
the policy's own modules and by the log-prob passes) casts each linear layer's weight once per
block instead, with the same rounding autocast applies, so the numbers are autocast's. Sampling
and log-probs upcast the bfloat16 logits to float32 (``rollout/sampling.py``, ``logprobs.py``).
"""

from __future__ import annotations

import functools
import platform
import typing
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

AUTO = "auto"
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of native bf16 arithmetic
CPUINFO = Path("/proc/cpuinfo")


def _lightning_precisions() -> tuple[str, ...]:
    try:
        from lightning.fabric import connector

        values = typing.get_args(connector._PRECISION_INPUT_STR) + typing.get_args(connector._PRECISION_INPUT_STR_ALIAS)
    except (ImportError, AttributeError):  # a Lightning without these names: its 2.x values
        values = ()
    return values or ("transformer-engine", "transformer-engine-float16", "16-true", "16-mixed", "bf16-true",
                      "bf16-mixed", "32-true", "64-true", "64", "32", "16", "bf16")


# What trainer.precision may be (an integer 16, 32 or 64 reads as its string).
PRECISIONS = (AUTO, *_lightning_precisions())


@dataclass(frozen=True)
class CpuBf16Support:
    """Whether this CPU has native bf16 arithmetic: ``supported`` is None when unknown."""

    supported: bool | None
    cpu: str  # model name
    flag: str | None  # the flag that says so
    source: str  # where it was read

    def describe(self) -> str:
        if self.supported:
            return f"{self.cpu} has native bf16 ({self.flag} in {self.source})"
        if self.supported is False:
            return f"{self.cpu} has no native bf16 (neither {' nor '.join(BF16_CPU_FLAGS)} in {self.source})"
        return f"whether {self.cpu} has native bf16 is unknown ({self.source})"


def cpu_bf16_support(cpuinfo: str | Path | None = None) -> CpuBf16Support:
    """Read the CPU's flags from ``cpuinfo`` (default ``CPUINFO``, Linux); without them ask torch's
    CPU probe; else unknown."""
    cpuinfo = CPUINFO if cpuinfo is None else cpuinfo
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        text = ""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())  # the first processor's
    cpu = fields.get("model name") or platform.processor() or platform.machine() or "this CPU"
    if "flags" in fields:  # x86 Linux
        flags = set(fields["flags"].split())
        found = next((flag for flag in BF16_CPU_FLAGS if flag in flags), None)
        return CpuBf16Support(found is not None, cpu, found, str(cpuinfo))
    # No flags to read (another OS, or an ARM /proc/cpuinfo): torch's CPU probe, whose False
    # may only mean that it cannot tell.
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    try:
        if probe is not None and probe():
            return CpuBf16Support(True, cpu, "avx512_bf16", "torch.cpu._is_avx512_bf16_supported()")
    except Exception:  # noqa: BLE001 - a probe that fails says nothing
        pass
    return CpuBf16Support(None, cpu, None, f"no CPU flags in {cpuinfo}, and torch's probe finds no avx512_bf16")


@dataclass(frozen=True)
class PrecisionChoice:
    """The ``precision`` the Trainer gets, what the config asked for, and why."""

    requested: Any
    precision: Any
    reason: str

    def describe(self) -> str:
        if self.requested == AUTO:
            return f"trainer.precision=auto -> {self.precision}: {self.reason}"
        return f"trainer.precision={self.precision} ({self.reason})"

    def record(self) -> dict[str, str]:
        """For the run's hyper-parameters."""
        return {"requested": str(self.requested), "trainer": str(self.precision), "reason": self.reason}


def _on_cpu(accelerator: str) -> bool:
    if accelerator == "cpu":
        return True
    if accelerator != "auto":
        return False
    mps = getattr(torch.backends, "mps", None)
    return not torch.cuda.is_available() and not (mps is not None and mps.is_available())


def resolve_precision(trainer: Mapping[str, Any], cpuinfo: str | Path | None = None) -> PrecisionChoice:
    """The Trainer's ``precision`` for the ``trainer`` config block (``auto`` resolved)."""
    requested = trainer.get("precision", "32-true")
    accelerator = str(trainer.get("accelerator", "auto")).lower()
    strategy = trainer.get("strategy")
    target = str(strategy.get("_target_", "") if isinstance(strategy, Mapping) else strategy or "")
    on_cpu = _on_cpu(accelerator)
    if requested != AUTO:
        note = "as configured"
        if on_cpu and str(requested) in ("32-true", "32"):
            support = cpu_bf16_support(cpuinfo)
            if support.supported:
                note += f"; {support.describe()}: trainer.precision=auto or bf16-mixed would use it"
        return PrecisionChoice(requested, requested, note)
    if "FSDP2" in target:
        return PrecisionChoice(AUTO, "32-true", "FSDP2 sets its own (trainer.strategy.mixed_precision)")
    if not on_cpu:
        return PrecisionChoice(
            AUTO, "32-true", f"accelerator {accelerator} is not a CPU (auto picks bf16 on CPUs only; "
            "set trainer.precision=bf16-mixed, as trainer=gpu does)"
        )
    support = cpu_bf16_support(cpuinfo)
    return PrecisionChoice(AUTO, "bf16-mixed" if support.supported else "32-true", support.describe())


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, input: torch.Tensor) -> torch.Tensor:
    return F.linear(input.to(weight.dtype), weight, bias)


@contextmanager
def weights_cast_once(model: nn.Module) -> Iterator[bool]:
    """Within the block, and only under CPU autocast to bfloat16: each float32 ``nn.Linear`` of
    ``model`` computes with a bfloat16 copy of its weight and bias made on entry, rather than
    autocast's cast at every call (the same rounding). The parameters (float32) are untouched;
    the copies are dropped on exit. For passes without gradients (decoding, log-prob passes):
    the copies carry none. Yields whether it applied."""
    device_type = "cpu"
    first = next(model.parameters(), None)
    if (
        first is None
        or first.device.type != device_type
        or torch.is_grad_enabled()
        or not torch.is_autocast_enabled(device_type)
        or torch.get_autocast_dtype(device_type) != torch.bfloat16
    ):
        yield False
        return
    dtype = torch.bfloat16
    replaced: list[nn.Module] = []
    try:
        for module in model.modules():
            weight = getattr(module, "weight", None)
            # A sharded (FSDP2) or non-float32 weight, or a forward already replaced: left alone.
            if (
                not isinstance(module, nn.Linear)
                or "forward" in module.__dict__
                or type(weight.data) is not torch.Tensor
                or weight.dtype != torch.float32
            ):
                continue
            bias = None if module.bias is None else module.bias.detach().to(dtype)
            module.forward = functools.partial(_linear, weight.detach().to(dtype), bias)
            replaced.append(module)
        yield True
    finally:
        for module in replaced:
            del module.forward
