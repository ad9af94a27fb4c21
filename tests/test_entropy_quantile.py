"""Top-entropy-quantile token mask ("forking tokens", arXiv 2506.01939): the test vectors A1.1-A1.3
of the spec, the gradient with the mask for every objective, the threshold's independence of
micro-batch size and data-parallel layout (the real updater, and two gloo ranks), and a short
training run.

Expected numbers are written out from the spec (closed form), not computed by the code under test.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rlvr_lightning import distributed
from rlvr_lightning.control import ControlState
from rlvr_lightning.objectives import (
    LossNormalizer,
    ObjectiveParams,
    PolicyBatch,
    available_objectives,
    compute_loss,
    get_objective,
)
from rlvr_lightning.objectives.entropy_mask import (
    EntropyMaskStats,
    entropy_quantile_threshold,
    quantile_linear,
    top_entropy_mask,
)

DT = torch.float64

# A1.2: two responses, the second padded at its last position (whose 9.9 must not count).
A12_ENTROPY = [[2.0, 3.0, 1.5, 2.5], [0.1, 0.3, 0.2, 9.9]]
A12_MASK = [[1, 1, 1, 1], [1, 1, 1, 0]]
A12_ADVANTAGES = [1.0, -0.5]
A12_KEPT = [[1, 1, 0, 1], [0, 0, 0, 0]]


def a12_batch(rows: list[int]) -> PolicyBatch:
    """Rows of A1.2 at ratio 1 (logp = logp_old), ``logp`` a float64 leaf."""
    old = torch.full((len(rows), 4), -1.0, dtype=DT)
    return PolicyBatch(
        logp=old.clone().requires_grad_(True),
        old_logp=old,
        advantages=torch.tensor([[A12_ADVANTAGES[r]] * 4 for r in rows], dtype=DT),
        mask=torch.tensor([A12_MASK[r] for r in rows], dtype=DT),
        old_entropy=torch.tensor([A12_ENTROPY[r] for r in rows], dtype=DT),
    )


def a12_normalizer(world_size: int = 1) -> LossNormalizer:
    # The global counts of the whole mini-batch: 7 valid tokens, 2 sequences.
    return LossNormalizer(num_tokens=7.0, num_sequences=2.0, max_response_length=4, world_size=world_size)


def masked_loss(batch: PolicyBatch, threshold: float, aggregation: str, normalizer: LossNormalizer):
    batch.token_mask = top_entropy_mask(batch.old_entropy, batch.mask, threshold)
    params = ObjectiveParams(aggregation=aggregation)
    loss, metrics = compute_loss("ppo", batch, ControlState(entropy_quantile=0.4), params, normalizer)
    loss.backward()
    return loss, metrics


def valid_entropies(batch: PolicyBatch) -> torch.Tensor:
    return batch.old_entropy[batch.mask.bool()]


# ----------------------------------------------------------------------------- A1.1


def test_a1_1_threshold_and_kept_tokens() -> None:
    entropy = torch.tensor([0.05, 1.2, 0.3, 2.5, 0.0, 0.9, 3.1, 0.01, 0.6, 1.7], dtype=DT)
    threshold = entropy_quantile_threshold(entropy, 0.2)
    assert threshold == pytest.approx(1.86, abs=1e-12)
    kept = top_entropy_mask(entropy, torch.ones_like(entropy), threshold)
    assert kept.nonzero().flatten().tolist() == [3, 6]
    assert float(kept.sum()) / len(entropy) == pytest.approx(0.2)


@pytest.mark.parametrize("q", [0.0, 0.13, 0.5, 0.8, 0.999, 1.0])
@pytest.mark.parametrize("size", [1, 2, 7, 1000])
def test_quantile_by_sort_equals_torch_quantile(q: float, size: int) -> None:
    values = torch.randn(size, generator=torch.Generator().manual_seed(size), dtype=DT).exp()
    assert quantile_linear(values, q) == pytest.approx(float(torch.quantile(values, q)), abs=1e-12)


def test_rho_one_is_off_and_ties_are_kept() -> None:
    values = torch.tensor([1.0, 2.0, 2.0, 2.0, 3.0])
    assert entropy_quantile_threshold(values, 1.0) is None
    assert entropy_quantile_threshold(values[:0], 0.2) is None  # no valid token: nothing to mask
    threshold = entropy_quantile_threshold(values, 0.2)  # position 0.8 * 4 = 3.2: 2.0 + 0.2 * (3.0 - 2.0)
    assert threshold == pytest.approx(2.2)
    # rho = 0.6: the 0.4-quantile is 2.0, tied three times: 4 of 5 kept (more than rho).
    threshold = entropy_quantile_threshold(values, 0.6)
    assert threshold == pytest.approx(2.0)
    assert int(top_entropy_mask(values, torch.ones_like(values), threshold).sum()) == 4
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="entropy_quantile"):
            entropy_quantile_threshold(values, bad)


# ----------------------------------------------------------------------------- A1.2


@pytest.mark.parametrize(
    "aggregation, loss, weighted_gradient",
    [("token-mean", -3.0 / 7.0, -1.0 / 7.0), ("seq-mean-token-mean", -0.375, -0.125)],
)
def test_a1_2_values_and_gradients(aggregation: str, loss: float, weighted_gradient: float) -> None:
    batch = a12_batch([0, 1])
    threshold = entropy_quantile_threshold(valid_entropies(batch), 0.4)
    assert threshold == pytest.approx(1.8, abs=1e-12)  # the pad's 9.9 is excluded
    assert batch.token_mask is None
    value, _ = masked_loss(batch, threshold, aggregation, a12_normalizer())
    assert batch.token_mask.int().tolist() == A12_KEPT
    assert float(value.detach()) == pytest.approx(loss, abs=1e-6)
    expected = torch.tensor(A12_KEPT, dtype=DT) * weighted_gradient
    torch.testing.assert_close(batch.logp.grad, expected, atol=1e-12, rtol=0)


def test_a1_2_metrics() -> None:
    batch = a12_batch([0, 1])
    values = valid_entropies(batch)
    stats = EntropyMaskStats()
    stats.add(values, entropy_quantile_threshold(values, 0.4))
    metrics = stats.metrics()
    assert metrics["objective/entropy_mask_threshold"] == pytest.approx(1.8)
    assert metrics["objective/entropy_mask_kept_fraction"] == pytest.approx(3 / 7)
    assert metrics["entropy/kept_mean"] == pytest.approx((2.0 + 3.0 + 2.5) / 3)
    assert metrics["entropy/dropped_mean"] == pytest.approx((1.5 + 0.1 + 0.3 + 0.2) / 4)


# ----------------------------------------------------------------------------- A1.3


def test_a1_3_per_micro_batch_threshold_is_the_wrong_scope() -> None:
    """The spec's counter-example: one threshold per row gives other tokens and another loss."""
    kept, total = [], 0.0
    for row, tau in ((0, 2.4), (1, 0.22)):
        batch = a12_batch([row])
        threshold = entropy_quantile_threshold(valid_entropies(batch), 0.4)
        assert threshold == pytest.approx(tau, abs=1e-12)
        value, _ = masked_loss(batch, threshold, "token-mean", a12_normalizer())
        kept += batch.token_mask.int().tolist()
        total += float(value.detach())
    assert kept == [[0, 1, 0, 1], [0, 1, 0, 0]]
    assert total == pytest.approx(-0.214286, abs=1e-6)


@pytest.mark.parametrize("aggregation, loss, weighted_gradient",
                         [("token-mean", -3.0 / 7.0, -1.0 / 7.0), ("seq-mean-token-mean", -0.375, -0.125)])
@pytest.mark.parametrize("split", [[[0, 1]], [[0], [1]], [[1], [0]]])
def test_a1_3_split_into_micro_batches_gives_a1_2(split, aggregation, loss, weighted_gradient) -> None:
    """The updater's order: the threshold over the whole mini-batch first (gathered over ranks;
    one rank here), then one micro-batch at a time."""
    whole = a12_batch([0, 1])
    threshold = entropy_quantile_threshold(distributed.gather_across_ranks(valid_entropies(whole)), 0.4)
    total, gradient = 0.0, torch.zeros(2, 4, dtype=DT)
    for rows in split:
        batch = a12_batch(rows)
        value, _ = masked_loss(batch, threshold, aggregation, a12_normalizer())
        total += float(value.detach())
        gradient[rows] = batch.logp.grad
    assert total == pytest.approx(loss, abs=1e-6)
    torch.testing.assert_close(gradient, torch.tensor(A12_KEPT, dtype=DT) * weighted_gradient, atol=1e-12, rtol=0)


WORLD = 2


def _two_rank_worker(rank: int, init_file: str, results: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        # Rank r holds row r of A1.2 (4 and 3 valid tokens: unequal lengths to gather).
        batch = a12_batch([rank])
        values = distributed.gather_across_ranks(valid_entropies(batch).float())
        threshold = entropy_quantile_threshold(values, 0.4)
        value, _ = masked_loss(batch, threshold, "token-mean", a12_normalizer(world_size=WORLD))
        # What DDP does: the loss and the gradient averaged over ranks.
        loss = torch.tensor([float(value)], dtype=DT)
        dist.all_reduce(loss)
        torch.save(
            {"values": values, "threshold": threshold, "loss": float(loss) / WORLD, "gradient": batch.logp.grad / WORLD,
             "kept": batch.token_mask.int().tolist()},
            f"{results}.{rank}",
        )
    finally:
        dist.destroy_process_group()


def test_a1_3_split_over_two_ranks_gives_a1_2(tmp_path: Path) -> None:
    results = str(tmp_path / "result")
    mp.spawn(_two_rank_worker, args=(str(tmp_path / "rendezvous"), results), nprocs=WORLD, join=True)
    ranks = [torch.load(f"{results}.{rank}", weights_only=False) for rank in range(WORLD)]
    expected_values = [2.0, 3.0, 1.5, 2.5, 0.1, 0.3, 0.2]  # rank 0's four, then rank 1's three
    for result in ranks:
        assert result["values"].tolist() == pytest.approx(expected_values)
        assert result["threshold"] == pytest.approx(1.8, abs=1e-6)
    assert [result["kept"][0] for result in ranks] == A12_KEPT
    assert ranks[0]["loss"] == pytest.approx(-3.0 / 7.0, abs=1e-6)
    gradient = torch.cat([result["gradient"] for result in ranks])
    torch.testing.assert_close(gradient, torch.tensor(A12_KEPT, dtype=DT) * (-1.0 / 7.0), atol=1e-12, rtol=0)


def test_gather_across_ranks_is_the_identity_in_one_process() -> None:
    values = torch.tensor([3.0, 1.0, 2.0])
    assert torch.equal(distributed.gather_across_ranks(values), values)


# ----------------------------------------------------------------------------- every objective


def random_batch(seed: int) -> PolicyBatch:
    generator = torch.Generator().manual_seed(seed)
    rows, length = 4, 6
    old = -torch.rand(rows, length, generator=generator, dtype=DT) * 3 - 0.1
    logp = old + 0.4 * torch.randn(rows, length, generator=generator, dtype=DT)  # ratios on both sides of the clip
    lengths = torch.tensor([6, 3, 5, 1])
    advantages = torch.tensor([1.0, -0.7, 0.4, -1.2], dtype=DT).unsqueeze(-1).expand(rows, length)
    return PolicyBatch(
        logp=logp.detach().requires_grad_(True),
        old_logp=old,
        advantages=advantages,
        mask=(torch.arange(length) < lengths.unsqueeze(-1)).to(DT),
        entropy=torch.rand(rows, length, generator=generator, dtype=DT) * 2,
        old_entropy=torch.rand(rows, length, generator=generator, dtype=DT) * 2,
        ref_logp=old - 0.1,
        correct=torch.tensor([True, False, True, False]),
        generator=torch.Generator().manual_seed(seed + 1),
    )


def loss_and_gradient(name: str, batch: PolicyBatch, params: ObjectiveParams, mask: torch.Tensor | None):
    batch.token_mask = mask
    batch.logp.grad = None
    batch.generator = torch.Generator().manual_seed(7)  # Clip-Cov draws the same tokens every call
    counts = batch.mask.sum()
    normalizer = LossNormalizer(float(counts), float(batch.mask.shape[0]), 6,
                                num_correct_tokens=float((batch.mask * batch.correct.unsqueeze(-1)).sum()))
    loss, metrics = compute_loss(name, batch, ControlState(beta1=0.5, beta2=0.5), params, normalizer)
    loss.backward()
    return float(loss), batch.logp.grad.clone(), metrics


@pytest.mark.parametrize("name", available_objectives())
def test_mask_scales_each_tokens_gradient_for_every_objective(name: str) -> None:
    """``g'_t = e_t * g_t`` with ``w_t`` unchanged: the masked gradient is the unmasked one on kept
    tokens and 0 on dropped ones, for every objective and aggregation; the loss is the unmasked
    aggregation of the kept tokens' losses only (the normaliser still counts every valid token)."""
    batch = random_batch(3)
    values = batch.old_entropy[batch.mask.bool()]
    kept = top_entropy_mask(batch.old_entropy, batch.mask, entropy_quantile_threshold(values, 0.5))
    assert 0 < int(kept.sum()) < int(batch.mask.sum())
    for aggregation in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
        params = ObjectiveParams(aggregation=aggregation)
        _, full, _ = loss_and_gradient(name, batch, params, None)
        value, masked, metrics = loss_and_gradient(name, batch, params, kept)
        torch.testing.assert_close(masked, full * kept, atol=1e-12, rtol=0)
        assert masked[~kept].abs().max() == 0.0 and masked[kept].abs().max() > 0.0
        # The value: each kept token's loss with its aggregation weight, dropped tokens 0.
        terms = get_objective(name).fn(batch, ControlState(beta1=0.5, beta2=0.5), params)
        per_token = terms.per_token_loss.detach() * kept
        lengths = batch.mask.sum(-1)
        weight = {
            "token-mean": batch.mask / batch.mask.sum(),
            "seq-mean-token-mean": batch.mask / (lengths.clamp_min(1).unsqueeze(-1) * 4),
            "seq-mean-token-sum": batch.mask / 4,
            "seq-mean-token-sum-norm": batch.mask / (4 * 6),
        }[aggregation]
        assert value == pytest.approx(float((per_token * weight).sum()), abs=1e-12)
        # The metric is the token mean over m of the masked loss.
        assert float(metrics["objective/policy_loss"]) == pytest.approx(
            float(per_token.sum() / batch.mask.sum()), abs=1e-12
        )


@pytest.mark.parametrize(
    "r, a, expected_g",
    [
        (0.5, 1.0, -0.5),  # A > 0, below 1 + eps_high: g = -A r
        (1.1, 1.0, -1.1),
        (1.5, 1.0, 0.0),  # A > 0, clipped high: no gradient
        (0.5, -1.0, 0.0),  # A < 0, clipped low
        (1.1, -1.0, 1.1),  # A < 0, unclipped: g = -A r
        (3.0, -1.0, 3.0),
    ],
)
def test_ppo_clip_regions_with_the_mask(r: float, a: float, expected_g: float) -> None:
    """PPO's gradient regions (eps 0.2) on a kept token and zero on a dropped one, token-mean over
    both valid tokens (w = 1/2)."""
    old = torch.tensor([[-1.0, -1.0]], dtype=DT)
    batch = PolicyBatch(
        logp=(old + math.log(r)).detach().requires_grad_(True),
        old_logp=old,
        advantages=torch.full_like(old, a),
        mask=torch.ones_like(old),
        token_mask=torch.tensor([[True, False]]),
    )
    loss, _ = compute_loss("ppo", batch, ControlState(), ObjectiveParams(aggregation="token-mean"),
                           LossNormalizer(2.0, 1.0, 2))
    loss.backward()
    torch.testing.assert_close(batch.logp.grad, torch.tensor([[expected_g / 2, 0.0]], dtype=DT), atol=1e-12, rtol=0)


def test_extras_keep_the_full_mask() -> None:
    """KL, NLL and the entropy bonus keep m, not e (the spec's choice; TRL masks the entropy bonus):
    the mask changes only the policy loss's part of the gradient."""
    batch = random_batch(5)
    values = batch.old_entropy[batch.mask.bool()]
    kept = top_entropy_mask(batch.old_entropy, batch.mask, entropy_quantile_threshold(values, 0.3))
    tokens = float(batch.mask.sum())
    normalizer = LossNormalizer(tokens, 4.0, 6, num_correct_tokens=float((batch.mask * batch.correct.unsqueeze(-1)).sum()))
    batch.entropy = batch.entropy.detach().requires_grad_(True)

    def gradients(params: ObjectiveParams, mask: torch.Tensor | None, entropy_coef: float):
        batch.token_mask, batch.logp.grad, batch.entropy.grad = mask, None, None
        loss, _ = compute_loss("grpo", batch, ControlState(entropy_coef=entropy_coef), params, normalizer)
        loss.backward()
        entropy_grad = batch.entropy.grad.clone() if batch.entropy.grad is not None else None
        return batch.logp.grad.clone(), entropy_grad

    extras = ObjectiveParams(aggregation="token-mean", kl_coef=0.1, nll_coef=0.2)
    policy_only = ObjectiveParams(aggregation="token-mean")
    # The extras' gradient: (with extras) - (policy loss only), masked and unmasked alike.
    masked = gradients(extras, kept, 0.0)[0] - gradients(policy_only, kept, 0.0)[0]
    full = gradients(extras, None, 0.0)[0] - gradients(policy_only, None, 0.0)[0]
    torch.testing.assert_close(masked, full, atol=1e-12, rtol=0)
    assert masked[batch.mask.bool() & ~kept].abs().min() > 0  # dropped tokens still get the extras
    # The entropy bonus: d/dH_t of -coef * token_mean(H) on every valid token, kept or not.
    _, entropy_grad = gradients(policy_only, kept, 0.05)
    torch.testing.assert_close(entropy_grad, -0.05 * batch.mask / tokens, atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------- the real updater


ROWS = [{"question": f"What is {a} + {b}?", "answer": str(a + b)} for a, b in [(1, 2), (3, 4), (2, 2), (5, 1)]]


def _rollout(tiny):
    from rlvr_lightning.rewards import RewardResult
    from rlvr_lightning.rollout import build_engine
    from rlvr_lightning.rollout.collector import CollectorSettings, RolloutCollector

    model, tokenizer = tiny

    def reward(completions: list[str], answers: list[str]) -> RewardResult:
        rewards = [float(i % 3 == 0) for i in range(len(completions))]
        return RewardResult(rewards=rewards, correct=[r > 0 for r in rewards], extracted=[None] * len(rewards))

    engine = build_engine({"name": "shared_prefix"}, model, tokenizer)
    settings = CollectorSettings(group_size=4, prompts_per_step=4, max_new_tokens=8)
    torch.manual_seed(0)
    rollout, _ = RolloutCollector(tokenizer, reward, engine.generate, settings).collect(ROWS, {})
    return rollout


def _update(tiny, rollout, budget: int, monkeypatch) -> tuple[list[torch.Tensor], dict[str, float], list[torch.Tensor]]:
    """One rollout through the real ``PolicyUpdater`` (2 mini-batches under a token budget of
    ``budget``); the kept tokens of each optimizer update ([rows, length], from the micro-batches'
    ``token_mask``), the metrics and the weights after."""
    import copy

    import rlvr_lightning.update as update_module
    from rlvr_lightning.update import PolicyUpdater, UpdateSettings

    model, _ = tiny
    policy = copy.deepcopy(model).train()
    settings = UpdateSettings(epochs=1, mini_batches=2, max_new_tokens=8, max_tokens_per_micro_batch=budget)
    unit = PolicyUpdater(policy, "grpo", ObjectiveParams(aggregation="token-mean"),
                         ControlState(entropy_quantile=0.3), settings)
    unit.old_logprobs(rollout)
    # Record each update's micro-batches (rows) and, in the same order, each micro-batch's mask.
    micro_rows: list[list[torch.Tensor]] = []
    token_masks: list[torch.Tensor] = []
    plain_micro_batches = unit.micro_batches

    def recording_micro_batches(groups, rollout):
        micro_rows.append(plain_micro_batches(groups, rollout))
        return micro_rows[-1]

    real = update_module.compute_loss

    def recording_compute_loss(name, batch, *args):
        token_masks.append(batch.token_mask)
        return real(name, batch, *args)

    monkeypatch.setattr(unit, "micro_batches", recording_micro_batches)
    monkeypatch.setattr(update_module, "compute_loss", recording_compute_loss)
    optimizer = torch.optim.SGD(policy.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda update: 1.0)
    metrics = unit.update(rollout, optimizer, scheduler, torch.Generator().manual_seed(1))
    monkeypatch.undo()
    masks = iter(token_masks)
    kept = []
    for micro_batches in micro_rows:
        full = torch.zeros_like(rollout.response_mask, dtype=torch.bool)
        for rows in micro_batches:
            mask = next(masks)
            full[rows, : mask.shape[1]] = mask
        kept.append(full)
    metrics["micro_batches"] = float(len(token_masks))
    return kept, metrics, [p.detach().clone() for p in policy.parameters()]


def test_updater_mask_does_not_depend_on_the_micro_batch_size(tiny, monkeypatch) -> None:
    rollout = _rollout(tiny)
    small_kept, small, small_weights = _update(tiny, rollout, budget=1, monkeypatch=monkeypatch)  # one group each
    large_kept, large, large_weights = _update(tiny, rollout, budget=100_000, monkeypatch=monkeypatch)
    assert small["micro_batches"] == 4 and large["micro_batches"] == 2
    # Independently: the top 30% by H_old of each update's mini-batch (2 groups of 4).
    order = torch.randperm(4, generator=torch.Generator().manual_seed(1)).tensor_split(2)
    mask = rollout.data["loss_mask"].bool()
    entropy = rollout.data["old_entropy"]
    kept_total = 0
    for update, groups in enumerate(order):
        rows = torch.cat([torch.arange(4) + 4 * g for g in groups.tolist()])
        in_mini = torch.zeros_like(mask)
        in_mini[rows] = True
        values = entropy[mask & in_mini]
        tau = torch.quantile(values, 0.7)
        expected = mask & in_mini & (entropy >= tau)
        assert torch.equal(small_kept[update], expected) and torch.equal(large_kept[update], expected)
        kept_total += int(expected.sum())
    for key in ("objective/entropy_mask_threshold", "objective/entropy_mask_kept_fraction",
                "entropy/kept_mean", "entropy/dropped_mean"):
        assert small[key] == large[key]
    assert small["objective/entropy_mask_kept_fraction"] == pytest.approx(kept_total / int(mask.sum()))
    assert small["entropy/kept_mean"] > small["entropy/dropped_mean"]
    for a, b in zip(small_weights, large_weights, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_updater_refuses_the_mask_without_a_pre_update_pass(tiny) -> None:
    from rlvr_lightning.update import PolicyUpdater, UpdateSettings

    rollout = _rollout(tiny)
    model, _ = tiny
    unit = PolicyUpdater(model, "grpo", ObjectiveParams(), ControlState(entropy_quantile=0.2),
                         UpdateSettings(epochs=1, mini_batches=1, max_new_tokens=8))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    with pytest.raises(ValueError, match="entropy_quantile < 1 needs pi_old's entropies"):
        unit.update(rollout, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: 1.0),
                    torch.Generator().manual_seed(1), old_from_update=True)


def test_a_schedule_can_move_rho() -> None:
    from rlvr_lightning.schedulers import LinearSchedule
    from rlvr_lightning.schedulers.base import StepInfo

    schedule = LinearSchedule(field="entropy_quantile", start=1.0, end=0.2)
    control = ControlState()
    schedule.update(control, StepInfo(step=5, total_steps=10, rollout_entropy=1.0, reward_mean=0.0))
    assert control.entropy_quantile == pytest.approx(0.6)


# ----------------------------------------------------------------------------- training run


@pytest.mark.parametrize("mini_batches", [1, 2])
def test_training_run_logs_the_mask_metrics(tiny_config, tmp_path: Path, mini_batches: int) -> None:
    """A short tiny-model run with rho = 0.2; one update per rollout (mini_batches=1) needs the
    pre-update pass, which the module then keeps."""
    from rlvr_lightning.train import run
    from tests.conftest import read_scalars

    run_dir = tmp_path / "run"
    run(tiny_config("objective.control.entropy_quantile=0.2", f"rollout.mini_batches={mini_batches}",
                    "validate_before_training=false"), run_dir=run_dir)
    scalars = read_scalars(run_dir)
    assert [value for _, value in scalars["control/entropy_quantile"]] == pytest.approx([0.2, 0.2])
    for step in range(2):
        threshold = scalars["objective/entropy_mask_threshold"][step][1]
        kept = scalars["objective/entropy_mask_kept_fraction"][step][1]
        assert threshold > 0.0 and 0.2 <= kept < 0.5
        assert scalars["entropy/kept_mean"][step][1] > scalars["entropy/dropped_mean"][step][1]
