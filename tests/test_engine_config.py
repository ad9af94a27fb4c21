"""Config-time checks of ``rollout.engine.tensor_parallel_size`` (rollout/engine=vllm), before any
model loads: an integer >= 1 that divides the training processes (trainer.devices x
trainer.num_nodes; skipped where devices is auto or -1, a list counts its entries), and refused
with dynamic sampling (the ranks of a tensor-parallel vLLM must generate the same number of
times; dynamic sampling stops per rank). vLLM is optional: the accepted configs are checked with
``find_spec("vllm")`` answering as if it were installed; the refusals come first on any machine."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import re

import pytest

from rlvr_lightning.config import ConfigError, validate_config
from tests.conftest import TINY_OVERRIDES, compose_config

VLLM = ["rollout/engine=vllm"]


@pytest.fixture
def vllm_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    find_spec = importlib.util.find_spec

    def fake(name: str, *args, **kwargs):
        if name == "vllm":
            return importlib.machinery.ModuleSpec("vllm", None)
        return find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake)


def _validate(*overrides: str) -> None:
    validate_config(compose_config(TINY_OVERRIDES + list(overrides)))


def _refused(message: str, *overrides: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        _validate(*overrides)


@pytest.mark.usefixtures("vllm_installed")
@pytest.mark.parametrize("overrides", [
    ["trainer=ddp", "rollout.engine.tensor_parallel_size=2"],  # 2 processes, one vLLM over both
    ["trainer=ddp", "trainer.num_nodes=2", "rollout.engine.tensor_parallel_size=2"],  # 4 processes
    ["trainer=ddp", "trainer.num_nodes=2", "rollout.engine.tensor_parallel_size=4"],
    ["trainer=ddp", "trainer.devices=auto", "rollout.engine.tensor_parallel_size=3"],  # known at launch only
    ["trainer=ddp", "trainer.devices=-1", "rollout.engine.tensor_parallel_size=3"],
    ["trainer=ddp", "trainer.devices=[0,1]", "rollout.engine.tensor_parallel_size=2"],
    ["rollout.engine.tensor_parallel_size=1"],  # the default: one process, one vLLM
    ["trainer=ddp", "sampling=dynamic", "rollout.engine.tensor_parallel_size=1"],  # per-rank vLLMs: no group
])
def test_tensor_parallel_sizes_that_fit_the_processes_are_accepted(overrides: list[str]) -> None:
    _validate(*VLLM, *overrides)


def test_a_size_that_does_not_divide_the_processes_is_refused() -> None:
    _refused(
        "rollout.engine.tensor_parallel_size=3 does not divide the 2 training processes "
        "(trainer.devices=2 x trainer.num_nodes=1): each vLLM is sharded over that many consecutive ranks; "
        "use 1 or 2",
        *VLLM, "trainer=ddp", "rollout.engine.tensor_parallel_size=3",
    )
    _refused(
        "rollout.engine.tensor_parallel_size=3 does not divide the 4 training processes "
        "(trainer.devices=2 x trainer.num_nodes=2)",
        *VLLM, "trainer=ddp", "trainer.num_nodes=2", "rollout.engine.tensor_parallel_size=3",
    )
    _refused(  # a list of devices: one process per entry
        "rollout.engine.tensor_parallel_size=4 does not divide the 2 training processes "
        "(trainer.devices=[0, 1] x trainer.num_nodes=1)",
        *VLLM, "trainer=ddp", "trainer.devices=[0,1]", "rollout.engine.tensor_parallel_size=4",
    )
    _refused(
        "rollout.engine.tensor_parallel_size=2 does not divide the 1 training process "
        "(trainer.devices=1 x trainer.num_nodes=1): each vLLM is sharded over that many consecutive ranks; use 1",
        *VLLM, "rollout.engine.tensor_parallel_size=2",
    )


@pytest.mark.parametrize("value", ["0", "-2", "1.5", "two", "true"])
def test_a_size_that_is_not_a_positive_integer_is_refused(value: str) -> None:
    with pytest.raises(ConfigError, match=r"rollout\.engine\.tensor_parallel_size=.* must be (an integer )?>= 1 "
                                          r"\(1: one vLLM per rank"):
        _validate(*VLLM, "trainer=ddp", f"rollout.engine.tensor_parallel_size={value}")


@pytest.mark.parametrize("sampling", ["dynamic", "dapo"])
def test_dynamic_sampling_with_a_tensor_parallel_vllm_is_refused(sampling: str) -> None:
    _refused(
        "sampling.dynamic=true with rollout.engine.tensor_parallel_size=2: the 2 ranks of a tensor-parallel "
        "vLLM must generate the same number of times, and dynamic sampling decides per rank when to stop "
        "drawing batches, so a run could hang; use sampling=plain (sampling.dynamic=false), or "
        "rollout.engine.tensor_parallel_size=1",
        *VLLM, "trainer=ddp", f"sampling={sampling}", "rollout.engine.tensor_parallel_size=2",
    )
    _refused(  # devices=auto: the divisibility is unknown, the hang is not
        "sampling.dynamic=true with rollout.engine.tensor_parallel_size=2",
        *VLLM, "trainer=ddp", "trainer.devices=auto", f"sampling={sampling}", "rollout.engine.tensor_parallel_size=2",
    )


@pytest.mark.parametrize("engine", ["shared_prefix", "static", "hf"])
def test_other_engines_are_unaffected(engine: str) -> None:
    # Odd process counts and dynamic sampling are fine without a tensor-parallel vLLM.
    _validate(f"rollout/engine={engine}", "trainer=ddp", "trainer.devices=3", "sampling=dynamic")
    _validate(f"rollout/engine={engine}", "trainer=ddp", "trainer.num_nodes=3")
    with pytest.raises(ConfigError, match=r"rollout\.engine\.tensor_parallel_size is not an option"):
        _validate(f"rollout/engine={engine}", "+rollout.engine.tensor_parallel_size=2")
