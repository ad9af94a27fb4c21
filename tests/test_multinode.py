"""Several machines: Lightning's multi-node launch with ``trainer.num_nodes``.

Two "nodes" of one process each run on this machine, each started like torchrun starts a
worker (``TORCHELASTIC_RUN_ID``, ``RANK``, ``LOCAL_RANK``, ``GROUP_RANK``, ``WORLD_SIZE``,
``MASTER_ADDR=127.0.0.1``, ...; Lightning's ``TorchElasticEnvironment`` reads them), each with
its own run folder. The run must equal a two-process single-node DDP run of the same config:
the data split (by global rank), the sampling seeds, the reduced scalars and the weights. With
two ranks every all-reduce is one addition of two numbers, which is commutative, so the scalars
and weights are compared exactly.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_OVERRIDES, read_scalars

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _command(run_dir: Path, *extra: str) -> list[str]:
    overrides = [o for o in TINY_OVERRIDES if not o.startswith("rollout.prompts_per_step")]
    return [
        sys.executable, "-m", "rlvr_lightning.train", *overrides, "trainer=ddp", "rollout.prompts_per_step=4",
        # Coin-flip rewards: mixed groups (non-zero advantages, so the weights move) on the random tiny model.
        "reward.random_reward_probability=0.5", "validate_before_training=false", *extra, f"hydra.run.dir={run_dir}",
    ]


def _environment(**extra: str) -> dict[str, str]:
    # No launcher or cluster variables of the caller (e.g. a CI job under SLURM or torchrun).
    launcher = ("SLURM_", "TORCHELASTIC_", "MASTER_", "RANK", "LOCAL_RANK", "GROUP_RANK", "WORLD_SIZE", "NODE_RANK")
    env = {k: v for k, v in os.environ.items() if not k.startswith(launcher)}
    return {**env, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", **extra}


def _check(result: subprocess.CompletedProcess, name: str) -> None:
    assert result.returncode == 0, f"{name}:\n" + result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.slow
def test_two_nodes_of_one_process_equal_one_node_of_two(tmp_path: Path) -> None:
    port = str(_free_port())
    nodes = []
    for node in range(2):
        # What `torchrun --nnodes=2 --nproc-per-node=1 --node-rank=<node>` sets for its worker.
        env = _environment(
            TORCHELASTIC_RUN_ID="multinode-test", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
            WORLD_SIZE="2", RANK=str(node), GROUP_RANK=str(node), NODE_RANK=str(node), LOCAL_RANK="0",
            LOCAL_WORLD_SIZE="1", GROUP_WORLD_SIZE="2", ROLE_RANK=str(node), ROLE_WORLD_SIZE="2",
        )
        cmd = _command(tmp_path / f"node{node}", "trainer.num_nodes=2", "trainer.devices=1")
        log = (tmp_path / f"node{node}.log").open("w")  # a file, not a pipe: neither node blocks on its output
        nodes.append((subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    try:
        for node, (process, log) in enumerate(nodes):
            process.wait(timeout=300)
            log.close()
            output = (tmp_path / f"node{node}.log").read_text()
            assert process.returncode == 0, f"node {node}:\n" + output[-6000:]
            # Lightning read the torchrun variables: node 1's process is the second of two ranks.
            assert f"GLOBAL_RANK: {node}, MEMBER: {node + 1}/2" in output, output[-6000:]
    finally:
        for process, log in nodes:
            if process.poll() is None:
                process.kill()
                process.wait()
            log.close()
    single = subprocess.run(
        _command(tmp_path / "single", "trainer.devices=2"), cwd=REPO, capture_output=True, text=True,
        timeout=300, env=_environment(),
    )
    _check(single, "single node")

    # Rank 0 (node 0) logs and checkpoints; node 1's process is global rank 1 and writes neither.
    assert not list((tmp_path / "node1").rglob("events.out.tfevents.*"))
    assert not (tmp_path / "node1" / "checkpoints" / "last.ckpt").exists()

    two_nodes, one_node = read_scalars(tmp_path / "node0"), read_scalars(tmp_path / "single")
    compared = sorted(tag for tag in one_node if not tag.startswith(("time/", "perf/")))
    assert {"reward/mean", "optim/loss", "optim/grad_norm", "sampling/num_sequences"} <= set(compared)
    assert set(compared) <= set(two_nodes)
    # Each rank trained on 2 of the step's 4 prompts x 4 samples: the mean over ranks is 8.
    assert [v for _, v in two_nodes["sampling/num_sequences"]] == [8.0, 8.0]
    assert any(value != 0 for _, value in one_node["optim/grad_norm"])  # the runs did learn something
    for tag in compared:
        assert two_nodes[tag] == one_node[tag], tag

    weights = [
        torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=False)
        for name in ("node0", "single")
    ]
    assert weights[0]["global_step"] == weights[1]["global_step"]
    assert weights[0]["state_dict"].keys() == weights[1]["state_dict"].keys()
    for key, value in weights[1]["state_dict"].items():
        assert torch.equal(weights[0]["state_dict"][key], value), key
