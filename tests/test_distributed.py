"""Data parallelism on CPU: two gloo processes.

The unit checks run the pieces a DDP step is made of on two ranks and compare them with one
process over the whole batch: the step's prompts split between ranks, group advantages, the
token-mean loss normalised by the global token count and scaled by the world size, gradients
averaged like DDP does (with a rank that has fewer micro-batches), the sharded gradient norm,
and the mean of the logged scalars. FSDP2 (``trainer=fsdp2``, torch's ``fully_shard``) runs on
gloo too: its sharding of the tiny model is checked against the unsharded model (logits,
averaged gradients, the global gradient norm of DTensor shards). The end-to-end checks train
the tiny model through the real entry point with ``trainer=ddp`` and ``trainer=fsdp2`` (two
processes each): FSDP2 must reach DDP's weights and scalars, and resume exactly from its
sharded checkpoint.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rlvr_lightning import distributed
from rlvr_lightning.advantages import group_advantages
from rlvr_lightning.control import ControlState
from rlvr_lightning.data.datamodule import StepBatches
from rlvr_lightning.objectives import LossNormalizer, ObjectiveParams, PolicyBatch, compute_loss
from tests.conftest import TINY_OVERRIDES, read_scalars

REPO = Path(__file__).resolve().parents[1]
WORLD = 2
GROUP_SIZE = 2
NUM_GROUPS = 4  # two per rank
LENGTH, HIDDEN, VOCAB = 6, 5, 7


# ----------------------------------------------------------------------------- data sharding


def test_step_batches_split_each_generation_batch_between_ranks() -> None:
    rows = [{"question": str(i), "answer": str(i)} for i in range(100)]
    full = StepBatches(rows, rows_per_step=8, seed=3, generation_batches=2)
    shards = [
        StepBatches(rows, rows_per_step=8, seed=3, rank=r, world_size=2, generation_batches=2)
        for r in range(2)
    ]
    for step in (0, 5):
        everything = full.batch_for_step(step)
        parts = [shard.batch_for_step(step) for shard in shards]
        assert [len(p) for p in parts] == [4, 4]
        # Generation batch b of rank r is the r-th half of the step's generation batch b.
        assert parts[0] == everything[0:2] + everything[4:6]
        assert parts[1] == everything[2:4] + everything[6:8]
    assert shards[0].batch_for_step(0) != shards[0].batch_for_step(1)


def test_step_batches_reject_a_batch_that_does_not_split_between_ranks() -> None:
    rows = [{"question": "q", "answer": "a"}] * 10
    with pytest.raises(ValueError, match="not divisible by the number of data-parallel ranks"):
        StepBatches(rows, rows_per_step=3, seed=0, rank=0, world_size=2)


# ----------------------------------------------------------------------------- two gloo ranks


def _problem() -> dict[str, torch.Tensor]:
    """A fixed batch of NUM_GROUPS groups: features, targets, masks, old log-probs, rewards."""
    generator = torch.Generator().manual_seed(0)
    rows = NUM_GROUPS * GROUP_SIZE
    lengths = torch.tensor([6, 2, 5, 1, 3, 6, 4, 2])
    return {
        "features": torch.randn(rows, LENGTH, HIDDEN, generator=generator),
        "targets": torch.randint(VOCAB, (rows, LENGTH), generator=generator),
        "mask": (torch.arange(LENGTH) < lengths.unsqueeze(-1)).float(),
        "old_noise": 0.3 * torch.randn(rows, LENGTH, generator=generator),
        "rewards": torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0]),
        "weight": torch.randn(HIDDEN, VOCAB, generator=generator),
    }


def _loss_share(
    weight: torch.Tensor, data: dict[str, torch.Tensor], rows: torch.Tensor, advantages: torch.Tensor,
    normalizer: LossNormalizer, aggregation: str,
) -> torch.Tensor:
    logits = data["features"][rows] @ weight
    logp = torch.log_softmax(logits, -1).gather(-1, data["targets"][rows].unsqueeze(-1)).squeeze(-1)
    batch = PolicyBatch(
        logp=logp,
        old_logp=logp.detach() + data["old_noise"][rows],
        advantages=advantages.unsqueeze(-1).expand_as(logp),
        mask=data["mask"][rows],
    )
    control = ControlState(eps_low=0.2, eps_high=0.28)
    loss, _ = compute_loss("dapo", batch, control, ObjectiveParams(aggregation=aggregation), normalizer)
    return loss


def _reference_gradient(data: dict[str, torch.Tensor], aggregation: str) -> torch.Tensor:
    """One process, the whole batch in one micro-batch."""
    weight = data["weight"].clone().requires_grad_(True)
    rows = torch.arange(NUM_GROUPS * GROUP_SIZE)
    advantages = group_advantages(data["rewards"], GROUP_SIZE)
    normalizer = LossNormalizer(
        num_tokens=float(data["mask"].sum()), num_sequences=float(len(rows)), max_response_length=LENGTH
    )
    _loss_share(weight, data, rows, advantages, normalizer, aggregation).backward()
    return weight.grad


def _rank_gradient(rank: int, data: dict[str, torch.Tensor], aggregation: str) -> torch.Tensor:
    """This rank's groups, in micro-batches (rank 0: two, rank 1: one, padded to two), with the
    global counts of the mini-batch and DDP's gradient average."""
    weight = data["weight"].clone().requires_grad_(True)
    share = NUM_GROUPS * GROUP_SIZE // WORLD
    rows = torch.arange(rank * share, (rank + 1) * share)
    rewards = data["rewards"][rows]
    advantages = group_advantages(rewards, GROUP_SIZE)  # rank-local: groups are never split
    assert torch.allclose(advantages, group_advantages(data["rewards"], GROUP_SIZE)[rows])
    counts = torch.tensor([data["mask"][rows].sum(), float(len(rows))])
    dist.all_reduce(counts)
    normalizer = LossNormalizer(
        num_tokens=float(counts[0]), num_sequences=float(counts[1]), max_response_length=LENGTH,
        world_size=WORLD,
    )
    micro = [rows[:GROUP_SIZE], rows[GROUP_SIZE:]] if rank == 0 else [rows]
    pairs = distributed.equal_micro_batches(micro)
    assert len(pairs) == 2 and [w for _, w in pairs] == ([1.0, 1.0] if rank == 0 else [1.0, 0.0])
    for micro_rows, micro_weight in pairs:
        local = torch.searchsorted(rows, micro_rows)
        loss = _loss_share(weight, data, micro_rows, advantages[local], normalizer, aggregation)
        (loss * micro_weight).backward()
    grad = weight.grad.clone()
    dist.all_reduce(grad)
    return grad / WORLD  # DDP averages gradients over ranks


def _worker(rank: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        data = _problem()
        for aggregation in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
            expected = _reference_gradient(data, aggregation)
            got = _rank_gradient(rank, data, aggregation)
            assert torch.allclose(got, expected, atol=1e-6), (aggregation, (got - expected).abs().max())

        # Sharded gradient norm: each rank holds half of the gradient entries.
        full = torch.arange(12, dtype=torch.float32).view(3, 4) - 5.0
        param = torch.nn.Parameter(torch.zeros(3, 2))
        param.grad = full[:, 2 * rank : 2 * rank + 2].clone()
        norm = distributed.clip_grad_norm([param], max_norm=1.0, sharded=True)
        assert torch.allclose(norm, full.norm()), (norm, full.norm())
        clipped = [torch.zeros(3, 2) for _ in range(WORLD)]
        dist.all_gather(clipped, param.grad)
        assert torch.allclose(torch.cat(clipped, dim=1).norm(), torch.tensor(1.0), atol=1e-4)

        # Logged scalars: mean over ranks; a key only one rank has keeps that rank's value.
        metrics = {"reward/mean": float(rank), "optim/loss": 2.0 + 2 * rank}
        if rank == 1:
            metrics["objective/erc_rho_p50"] = 0.9
        reduced = distributed.mean_across_ranks(metrics)
        assert reduced == pytest.approx({"reward/mean": 0.5, "optim/loss": 3.0, "objective/erc_rho_p50": 0.9})

        assert distributed.min_across_ranks(3 + rank) == 3
        assert distributed.all_ranks(True) and not distributed.all_ranks(rank == 0)
    finally:
        dist.destroy_process_group()


def test_two_ranks_match_one_process_over_the_whole_batch(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(str(tmp_path / "rendezvous"),), nprocs=WORLD, join=True)


def _synced_generation_worker(rank: int, init_file: str) -> None:
    """Lock-step decoding (what FSDP needs): a rank whose rows all end at once keeps running
    forwards until the other rank is done, so both run the same number."""
    from rlvr_lightning.models import build_tiny_model
    from rlvr_lightning.rollout import sample_shared_prefix

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model, tokenizer = build_tiny_model(seed=0)
        forwards = []
        model.register_forward_hook(lambda *_: forwards.append(1))
        encoded = tokenizer(["<|im_start|>user\n1 + 2?"], return_tensors="pt")
        # Rank 0: every token ends a response (done after one token); rank 1: EOS never sampled.
        eos = list(range(len(tokenizer))) if rank == 0 else [tokenizer.eos_token_id]
        out = sample_shared_prefix(
            model, encoded["input_ids"], encoded["attention_mask"], group_size=2, max_new_tokens=7,
            eos_token_ids=eos, pad_token_id=tokenizer.pad_token_id, ignore_eos=rank == 1, synced=True,
        )
        assert out.shape == (2, 7)
        counts = [torch.zeros(1) for _ in range(WORLD)]
        dist.all_gather(counts, torch.tensor([float(len(forwards))]))
        assert [float(c) for c in counts] == [7.0, 7.0], counts  # prefill + 6 decoding steps each
    finally:
        dist.destroy_process_group()


def test_synced_generation_keeps_ranks_in_lock_step(tmp_path: Path) -> None:
    mp.spawn(_synced_generation_worker, args=(str(tmp_path / "rendezvous"),), nprocs=WORLD, join=True)


def _fsdp2_worker(rank: int, init_file: str) -> None:
    """FSDP2Strategy.shard on two ranks: each holds half of every parameter, the forward equals
    the unsharded model's, gradients are averaged over ranks (like DDP), the global norm of the
    DTensor shards is the norm of the full gradient, and ``gathered`` makes forwards rank-local."""
    from datetime import timedelta

    from torch.distributed.device_mesh import init_device_mesh

    from rlvr_lightning.models import build_tiny_model

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
    )
    try:
        strategy = distributed.FSDP2Strategy(layer_class_names=["LlamaDecoderLayer"])
        strategy._device_mesh = init_device_mesh(
            "cpu", (WORLD, 1), mesh_dim_names=("data_parallel", "tensor_parallel")
        )
        model, tokenizer = build_tiny_model(seed=0)
        reference, _ = build_tiny_model(seed=0)
        wrong = distributed.FSDP2Strategy(layer_class_names=["Qwen2DecoderLayer"])
        wrong._device_mesh = strategy._device_mesh
        with pytest.raises(ValueError, match=r"matches no module of LlamaForCausalLM.*\['LlamaDecoderLayer'\]"):
            wrong.shard([model])
        strategy.shard([model])
        strategy.shard([model])  # configure_model runs again for fit after validate: a no-op
        assert distributed.is_sharded(model) and distributed.needs_synced_forwards(model)
        for (name, param), full in zip(model.named_parameters(), reference.parameters(), strict=True):
            assert type(param).__name__ == "DTensor", name
            first = -(-full.shape[0] // WORLD)  # dim-0 shards: rank 0 gets the rounded-up half
            assert param.to_local().shape[0] == (first, full.shape[0] - first)[rank], name

        encoded = tokenizer(["<|im_start|>user\n1 + 2?", "<|im_start|>user\n3 + 4 + 5?"], return_tensors="pt", padding=True)
        rank_rows = slice(rank, rank + 1)  # each rank its own row
        logits = model(input_ids=encoded["input_ids"][rank_rows], attention_mask=encoded["attention_mask"][rank_rows]).logits
        expected = reference(input_ids=encoded["input_ids"][rank_rows], attention_mask=encoded["attention_mask"][rank_rows]).logits
        assert torch.equal(logits.detach(), expected.detach())

        logits.float().square().mean().backward()
        # The reference: the mean of both ranks' losses, as FSDP averages gradients over ranks.
        sum(
            reference(input_ids=encoded["input_ids"][r : r + 1], attention_mask=encoded["attention_mask"][r : r + 1])
            .logits.float().square().mean()
            for r in range(WORLD)
        ).div(WORLD).backward()
        for (name, param), full in zip(model.named_parameters(), reference.parameters(), strict=True):
            assert torch.allclose(param.grad.full_tensor(), full.grad, atol=1e-6), name
        full_norm = torch.cat([p.grad.flatten() for p in reference.parameters()]).norm()
        norm = distributed.clip_grad_norm(model.parameters(), max_norm=1e9, sharded=True)
        assert torch.allclose(norm, full_norm, rtol=1e-5), (norm, full_norm)

        # gather_for_rollout: the whole model gathered once; forwards then need no other rank
        # (rank 1 runs three, rank 0 one: in lock-step mode that would hang), sharded on exit.
        with strategy.gathered(model) as gathered:
            assert gathered
            weight = model.model.layers[0].mlp.up_proj.weight
            assert type(weight).__name__ != "DTensor" and weight.shape == reference.model.layers[0].mlp.up_proj.weight.shape
            with torch.no_grad():
                for _ in range(1 + 2 * rank):
                    again = model(input_ids=encoded["input_ids"][rank_rows], attention_mask=encoded["attention_mask"][rank_rows]).logits
            assert torch.equal(again, expected.detach())
            # rollout/engine=static reads the gathered weights (its layers are no FSDP units).
            from rlvr_lightning.rollout.static import sample_static

            rows = [encoded["input_ids"][rank_rows], encoded["attention_mask"][rank_rows], 2, 5, [], 0,
                    lambda logits: logits.argmax(-1)]
            assert torch.equal(sample_static(model, *rows), sample_static(reference, *rows))
        assert all(type(p).__name__ == "DTensor" for p in model.parameters())
        dist.barrier()
        strategy.gather_for_rollout = False
        with strategy.gathered(model) as gathered:
            assert not gathered
    finally:
        dist.destroy_process_group()


def test_fsdp2_shards_the_model_and_matches_the_unsharded_one(tmp_path: Path) -> None:
    mp.spawn(_fsdp2_worker, args=(str(tmp_path / "rendezvous"),), nprocs=WORLD, join=True)


def test_fsdp2_strategy_rejects_an_unknown_mixed_precision() -> None:
    with pytest.raises(ValueError, match="mixed_precision='fp16' is unknown; use bf16 or null"):
        distributed.FSDP2Strategy(mixed_precision="fp16")


def test_helpers_are_the_identity_in_one_process() -> None:
    rows = [torch.arange(2), torch.arange(2, 4)]
    assert [w for _, w in distributed.equal_micro_batches(rows)] == [1.0, 1.0]
    assert distributed.mean_across_ranks({"a": 1.0}) == {"a": 1.0}
    assert distributed.min_across_ranks(5) == 5
    assert not distributed.needs_synced_forwards(torch.nn.Linear(2, 2))


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_ddp_training_with_two_cpu_processes(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    overrides = [o for o in TINY_OVERRIDES if not o.startswith("rollout.prompts_per_step")]
    cmd = [
        sys.executable, "-m", "rlvr_lightning.train", *overrides, "trainer=ddp",
        "rollout.prompts_per_step=4", "validate_before_training=false", f"hydra.run.dir={run_dir}",
    ]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    scalars = read_scalars(run_dir)
    assert [step for step, _ in scalars["reward/mean"]] == [0, 1]
    # Each rank trained on 2 of the step's 4 prompts x 4 samples: the mean over ranks is 8.
    assert [value for _, value in scalars["sampling/num_sequences"]] == [8.0, 8.0]
    assert [step for step, _ in scalars["val/accuracy"]] == [2]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()


def _train(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    overrides = [o for o in TINY_OVERRIDES if not o.startswith(("rollout.prompts_per_step", "trainer.max_steps"))]
    cmd = [
        sys.executable, "-m", "rlvr_lightning.train", *overrides, "rollout.prompts_per_step=4",
        # Coin-flip rewards: mixed groups (non-zero advantages) on the random tiny model.
        "reward.random_reward_probability=0.5", "validate_before_training=false", *extra,
        f"hydra.run.dir={run_dir}",
    ]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_fsdp2_with_two_cpu_processes_matches_ddp_and_resumes_exactly(tmp_path: Path) -> None:
    """Same seeds, same data split, same averaged gradients: FSDP2 reaches DDP's weights and
    logs DDP's scalars (only the layout of parameters differs). Then an FSDP2 run stopped at
    step 2 with a sharded checkpoint (a folder, one file per rank) resumes to step 3 exactly,
    decoding in lock-step instead of with the policy gathered, and exports (in one process) to
    the weights of the uninterrupted run."""
    _train(tmp_path / "ddp", "trainer=ddp", "trainer.max_steps=3")
    full = _train(tmp_path / "fsdp2", "trainer=fsdp2", "trainer.max_steps=3")
    assert full.stdout.count("run directory:") == 1  # printed by rank 0 only
    ddp, fsdp2 = read_scalars(tmp_path / "ddp"), read_scalars(tmp_path / "fsdp2")
    compared = [tag for tag in ddp if not tag.startswith(("time/", "perf/"))]
    assert {"reward/mean", "optim/loss", "optim/grad_norm", "entropy/rollout"} <= set(compared)
    assert any(value != 0 for _, value in ddp["optim/grad_norm"])  # the runs did learn something
    for tag in compared:
        assert [s for s, _ in fsdp2[tag]] == [s for s, _ in ddp[tag]], tag
        assert [v for _, v in fsdp2[tag]] == pytest.approx([v for _, v in ddp[tag]], abs=1e-5), tag
    weights = {
        name: torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
        for name in ("ddp", "fsdp2")
    }
    assert weights["fsdp2"].keys() == weights["ddp"].keys()
    for key, value in weights["ddp"].items():
        assert torch.allclose(weights["fsdp2"][key], value, atol=1e-6), key

    # ... and decoding sharded, in lock-step (same samples as with the policy gathered).
    sharded = (
        "trainer=fsdp2", "trainer.strategy.save_distributed_checkpoint=true", "trainer.strategy.gather_for_rollout=false"
    )
    _train(tmp_path / "first", *sharded, "trainer.max_steps=2")
    checkpoint = tmp_path / "first" / "checkpoints" / "last.ckpt"
    assert checkpoint.is_dir() and len(list(checkpoint.glob("*.distcp"))) == 2
    _train(tmp_path / "resumed", *sharded, "trainer.max_steps=3", f"ckpt_path={checkpoint}")
    resumed = read_scalars(tmp_path / "resumed")
    for tag in compared:
        if tag.startswith("val/"):
            continue
        assert [s for s, _ in resumed[tag]] == [2], tag
        assert resumed[tag][0][1] == pytest.approx(fsdp2[tag][2][1], abs=1e-6), tag

    # The sharded checkpoint exports (read in one process) to the weights of the full run.
    from safetensors.torch import load_file

    from rlvr_lightning.export import export_policy

    exported = load_file(export_policy(tmp_path / "resumed" / "checkpoints" / "last.ckpt", tmp_path / "hf") / "model.safetensors")
    assert exported
    for key, value in exported.items():
        assert torch.allclose(value, weights["fsdp2"][f"policy.{key}"], atol=1e-6), key
