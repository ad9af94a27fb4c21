"""The units of a training step driven without a ``Trainer``: the rollout collector, token-budget
packing and the policy updater (tiny model, one process)."""

from __future__ import annotations

import torch

from rlvr_lightning.control import ControlState
from rlvr_lightning.objectives import ObjectiveParams
from rlvr_lightning.packing import micro_batches
from rlvr_lightning.rewards import RewardResult
from rlvr_lightning.rollout import build_engine
from rlvr_lightning.rollout.collector import CollectorSettings, RolloutCollector
from rlvr_lightning.update import PolicyUpdater, UpdateSettings

ROWS = [{"question": f"What is {a} + {b}?", "answer": str(a + b)} for a, b in [(1, 2), (3, 4), (2, 2), (5, 1)]]


def scripted_reward(pattern: list[float]):
    """A reward function that gives the completions ``pattern``, repeated."""

    def score(completions: list[str], answers: list[str]) -> RewardResult:
        rewards = [pattern[i % len(pattern)] for i in range(len(completions))]
        return RewardResult(rewards=rewards, correct=[r > 0 for r in rewards], extracted=[None] * len(rewards))

    return score


def collector(tiny, reward, **settings) -> RolloutCollector:
    model, tokenizer = tiny
    engine = build_engine({"name": "shared_prefix"}, model, tokenizer)
    options = dict(group_size=4, prompts_per_step=2, max_new_tokens=6) | settings
    return RolloutCollector(tokenizer, reward, engine.generate, CollectorSettings(**options))


def test_collector_scores_and_computes_group_advantages(tiny) -> None:
    torch.manual_seed(0)
    rollout, metrics = collector(tiny, scripted_reward([1.0, 0.0, 0.0, 0.0])).collect(ROWS[:2], {})
    assert len(rollout) == 8 and rollout.group_size == 4
    assert rollout.data["rewards"].tolist() == [1.0, 0.0, 0.0, 0.0] * 2
    # GRPO: (R - mean) / (std + 1e-6) within each group; the loss mask is the response mask.
    expected = (torch.tensor([1.0, 0, 0, 0]) - 0.25) / (torch.tensor([1.0, 0, 0, 0]).std() + 1e-6)
    assert torch.allclose(rollout.data["advantages"], expected.repeat(2))
    assert torch.equal(rollout.data["loss_mask"], rollout.response_mask)
    assert metrics["reward/mean"] == 0.25 and metrics["sampling/num_sequences"] == 8.0


def test_dynamic_sampling_drops_constant_groups_and_draws_again(tiny) -> None:
    # The first batch's groups are constant (all 0), the second batch's are mixed.
    calls: list[int] = []

    def reward(completions: list[str], answers: list[str]) -> RewardResult:
        calls.append(len(completions))
        pattern = [0.0] * 4 if len(calls) == 1 else [1.0, 0.0, 1.0, 0.0]
        rewards = [pattern[i % 4] for i in range(len(completions))]
        return RewardResult(rewards=rewards, correct=[r > 0 for r in rewards], extracted=[None] * len(rewards))

    torch.manual_seed(0)
    rollout, metrics = collector(tiny, reward, dynamic=True, max_generation_batches=2).collect(ROWS, {})
    assert calls == [8, 8]
    assert len(rollout) == 8 and rollout.data["rewards"].tolist() == [1.0, 0.0] * 4
    assert metrics["sampling/generation_batches"] == 2.0
    # Half the groups generated had equal rewards: exactly those were dropped.
    assert metrics["reward/zero_variance_group_fraction"] == 0.5


def test_packing_keeps_whole_groups_under_the_budget(tiny) -> None:
    torch.manual_seed(0)
    rollout, _ = collector(tiny, scripted_reward([1.0, 0.0])).collect(ROWS[:2], {})
    prompt = int(rollout.attention_mask.sum(-1).max()) - int(rollout.response_lengths.max())
    budget = prompt + 4 * rollout.response_length  # room for one shared-prompt group
    batches = micro_batches(torch.arange(2), rollout, budget, share_prompt=True)
    assert len(batches) == 2 and sorted(torch.cat(batches).tolist()) == list(range(8))
    assert all(len(rows) == 4 and rows[0] % 4 == 0 for rows in batches)
    assert len(micro_batches(torch.arange(2), rollout, 10_000, share_prompt=True)) == 1


def updater(tiny, **settings) -> tuple[PolicyUpdater, torch.optim.Optimizer]:
    model, _ = tiny
    policy = model.train()
    settings = UpdateSettings(epochs=2, mini_batches=2, max_new_tokens=6, **settings)
    unit = PolicyUpdater(policy, "grpo", ObjectiveParams(aggregation="token-mean"), ControlState(), settings)
    return unit, torch.optim.SGD(policy.parameters(), lr=1e-2)


def test_updater_takes_epochs_x_mini_batches_updates_and_changes_the_weights(tiny) -> None:
    torch.manual_seed(0)
    rollout, _ = collector(tiny, scripted_reward([1.0, 0.0, 0.0, 0.0])).collect(ROWS[:2], {})
    unit, optimizer = updater(tiny)
    unit.old_logprobs(rollout)
    assert rollout.data["old_logp"].shape == rollout.response_mask.shape
    steps: list[int] = []
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda update: steps.append(update) or 1.0)
    before = [p.detach().clone() for p in unit.policy.parameters()]
    metrics = unit.update(rollout, optimizer, scheduler, torch.Generator().manual_seed(1))
    assert len(steps) == 1 + 4  # the scheduler's first call, then one per update
    assert any(not torch.equal(b, p) for b, p in zip(before, unit.policy.parameters(), strict=True))
    assert metrics["optim/skipped_nonfinite_updates"] == 0.0
    assert "objective/clip_low_fraction" in metrics and "entropy/update" in metrics
    entropy = unit.rollout_entropy_metrics(rollout)["entropy/rollout"]
    assert 0.0 < entropy < torch.log(torch.tensor(float(tiny[1].vocab_size)))


def test_updater_skips_nonfinite_updates_and_stops_at_the_limit(tiny, monkeypatch) -> None:
    torch.manual_seed(0)
    rollout, _ = collector(tiny, scripted_reward([1.0, 0.0, 0.0, 0.0])).collect(ROWS[:2], {})
    unit, optimizer = updater(tiny, max_consecutive_nonfinite_updates=3)
    unit.old_logprobs(rollout)
    import rlvr_lightning.update as update_module

    real = update_module.compute_loss
    monkeypatch.setattr(update_module, "compute_loss", lambda *a: (real(*a)[0] * float("nan"), real(*a)[1]))
    before = [p.detach().clone() for p in unit.policy.parameters()]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda update: 1.0)
    metrics = unit.update(rollout, optimizer, scheduler, torch.Generator().manual_seed(1))
    assert metrics["optim/skipped_nonfinite_updates"] == 3.0  # then no more updates this rollout
    assert unit.consecutive_nonfinite_updates == 3 and unit.nonfinite_updates == 3
    assert all(torch.equal(b, p) for b, p in zip(before, unit.policy.parameters(), strict=True))
