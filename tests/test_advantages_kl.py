"""RLOO and pass@k advantages (A7), KL estimators as loss terms (A8) and batch-level reward
scaling (A9) of the ALGORITHMS_NEXT spec: every test vector of the three sections, each gradient
region of each KL estimator against references written here (the closed form, or autograd of the
formula in float64), the config checks, and short training runs on the tiny model."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import OmegaConf

from rlvr_lightning import advantages as adv
from rlvr_lightning.advantages import (
    ADVANTAGE_ESTIMATORS,
    REQUIRED,
    advantage_options,
    check_advantage_options,
    compute_advantages,
    group_advantages,
    pass_at_k_terms,
)
from rlvr_lightning.config import ConfigError, validate_config
from rlvr_lightning.control import ControlState
from rlvr_lightning.objectives import LossNormalizer, ObjectiveParams, PolicyBatch, compute_loss
from rlvr_lightning.objectives.base import KL_ESTIMATORS, kl_estimate
from tests.conftest import TINY_OVERRIDES, compose_config, read_scalars

DT = torch.float64
CONF = Path(__file__).resolve().parents[1] / "rlvr_lightning" / "conf"


def close(got, expected, atol=1e-6) -> None:
    got = torch.as_tensor(got, dtype=DT)
    expected = torch.as_tensor(expected, dtype=DT)
    assert torch.allclose(got, expected, atol=atol, rtol=0), f"{got.tolist()} != {expected.tolist()}"


# ============================================================================ A7: RLOO


@pytest.mark.parametrize(
    ("rewards", "expected"),
    [
        ([1.0, 0.0, 0.0, 1.0], [0.666667, -0.666667, -0.666667, 0.666667]),
        ([0.5, 1.0, 0.0], [0.0, 0.75, -0.75]),
    ],
)
def test_rloo_vectors(rewards, expected):
    close(group_advantages(torch.tensor(rewards), len(rewards), "rloo"), expected)


def test_rloo_is_the_leave_one_out_baseline():
    rewards = torch.tensor([[0.3, 1.0, 0.0, 0.7, 0.2], [1.0, 1.0, 0.0, 0.0, 1.0]])
    size = rewards.shape[-1]
    expected = torch.stack(
        [torch.stack([row[i] - torch.cat([row[:i], row[i + 1 :]]).mean() for i in range(size)]) for row in rewards]
    )
    close(group_advantages(rewards.reshape(-1), size, "rloo"), expected.reshape(-1))
    # Constant groups: exactly 0; no std anywhere.
    assert torch.equal(group_advantages(torch.full((4,), 0.1), 4, "rloo"), torch.zeros(4))


def test_rloo_with_a_group_of_one_raises():
    with pytest.raises(ValueError, match="group_size >= 2"):
        group_advantages(torch.tensor([1.0, 0.0]), 1, "rloo")


# ============================================================================ A7: pass@k


def binary_group(size: int, correct: int) -> torch.Tensor:
    return torch.tensor([1.0] * correct + [0.0] * (size - correct))


@pytest.mark.parametrize(
    ("size", "correct", "k", "mean", "sigma", "positive", "negative"),
    [
        (8, 2, 4, 0.785714, 0.410326, 0.522232, -0.174077),
        (8, 2, 1, 0.25, None, 1.732047, -0.577349),
        (4, 1, 2, 0.5, None, 0.999998, -0.333333),
        (16, 3, 8, 0.9, 0.3, 0.333332, -0.076923),
    ],
)
def test_pass_at_k_vectors(size, correct, k, mean, sigma, positive, negative):
    r_bar, a_pos, a_neg = pass_at_k_terms(size, correct, k)
    close([r_bar, a_pos, a_neg], [mean, positive, negative])
    if sigma is not None:
        close(math.sqrt(r_bar * (1 - r_bar)), sigma)
    advantages, metrics = compute_advantages(binary_group(size, correct), size, "pass_at_k", {"k": k})
    close(advantages, [positive] * correct + [negative] * (size - correct))
    close(metrics["reward/pass_at_k_group_mean"], mean)


def enumerated_pass_at_k(size: int, correct: int, k: int) -> list[float]:
    """Average, over every k-subset holding response i, of the subset's normalised max reward
    ``(max_S R - R_bar) / sigma`` with R_bar and sigma the mean and population std of that max
    over all k-subsets (no epsilon)."""
    rewards = [1.0] * correct + [0.0] * (size - correct)
    subsets = list(itertools.combinations(range(size), k))
    maxima = {s: max(rewards[i] for i in s) for s in subsets}
    mean = sum(maxima.values()) / len(subsets)
    std = math.sqrt(sum((m - mean) ** 2 for m in maxima.values()) / len(subsets))
    return [
        sum((maxima[s] - mean) / std for s in subsets if i in s) / sum(1 for s in subsets if i in s)
        for i in range(size)
    ]


@pytest.mark.parametrize(("size", "correct", "k"), [(8, 2, 4), (6, 3, 2), (5, 1, 3), (7, 3, 4), (4, 1, 2)])
def test_pass_at_k_is_the_average_over_k_subsets(size, correct, k):
    advantages = group_advantages(binary_group(size, correct), size, "pass_at_k", {"k": k})
    close(advantages, enumerated_pass_at_k(size, correct, k), atol=1e-5)  # eps 1e-6 in ours only
    assert abs(float(advantages.double().sum())) < 1e-5  # c * A_pos + (N - c) * A_neg = 0


def test_pass_at_k_without_a_wrong_k_subset_gives_zero():
    """N - c < k: every k-subset holds a correct response, so R_bar = 1 and A = 0."""
    assert pass_at_k_terms(7, 5, 4) == (1.0, 0.0, 0.0)
    assert torch.equal(group_advantages(binary_group(7, 5), 7, "pass_at_k", {"k": 4}), torch.zeros(7))


def test_pass_at_k_enumeration_without_eps_matches_the_spec():
    close(enumerated_pass_at_k(8, 2, 4)[:3], [0.522233, 0.522233, -0.174078])


def test_pass_at_k_with_k_1_is_grpo_with_the_population_std():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    expected = (rewards - rewards.mean()) / (rewards.std(unbiased=False) + 1e-6)
    close(group_advantages(rewards, 8, "pass_at_k", {"k": 1}), expected)


def test_pass_at_k_constant_groups_get_zero_and_other_rewards_raise():
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    advantages, metrics = compute_advantages(rewards, 4, "pass_at_k", {"k": 2})
    assert torch.equal(advantages, torch.zeros(8))
    assert metrics["reward/pass_at_k_group_mean"] == 0.5  # R_bar 1 and 0
    assert metrics["reward/zero_advantage_group_fraction"] == 1.0
    with pytest.raises(ValueError, match="binary rewards"):
        group_advantages(torch.tensor([1.0, 0.5, 0.0, 0.0]), 4, "pass_at_k", {"k": 2})


def test_pass_at_k_needs_k_and_k_within_the_group():
    assert advantage_options("pass_at_k") == {"k": REQUIRED}
    with pytest.raises(ValueError, match="needs advantage.k"):
        group_advantages(binary_group(4, 1), 4, "pass_at_k")
    with pytest.raises(ValueError, match="<= rollout.group_size=4"):
        group_advantages(binary_group(4, 1), 4, "pass_at_k", {"k": 5})
    with pytest.raises(ValueError, match="integer >= 1"):
        group_advantages(binary_group(4, 1), 4, "pass_at_k", {"k": 0})


# ============================================================================ A7: max leave-one-out


@pytest.mark.parametrize(
    ("rewards", "expected", "unscaled"),
    [
        ([0.0, 1.0, 0.0, 0.0], [0.0, 1.999996, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]),
        ([1.0, 1.0, 0.0, 0.0], [0.0] * 4, [0.0] * 4),
        ([0.2, 0.9, 0.5, 0.1], [0.0, 1.112970, 0.0, 0.0], [0.0, 0.4, 0.0, 0.0]),
    ],
)
def test_max_leave_one_out_vectors(rewards, expected, unscaled):
    rewards = torch.tensor(rewards)
    close(group_advantages(rewards, 4, "max_leave_one_out"), expected)
    close(group_advantages(rewards, 4, "max_leave_one_out", {"norm_by_std": False}), unscaled)


# ============================================================================ A9: reward scaling

GROUPS = torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 0, 1, 1, 1, 1])


@pytest.mark.parametrize(
    ("mode", "expected", "scale"),
    [
        ("group", [1.499997, -0.499999, -0.499999, -0.499999, 0.499999, 0.499999, 0.499999, -1.499997] + [0.0] * 4,
         (0.5 + 0.5 + 0.0) / 3),
        ("batch", [1.523254, -0.507751, -0.507751, -0.507751, 0.507751, 0.507751, 0.507751, -1.523254] + [0.0] * 4,
         0.492366),
        ("none", [0.75, -0.25, -0.25, -0.25, 0.25, 0.25, 0.25, -0.75] + [0.0] * 4, 1.0),
    ],
)
def test_reward_scaling_vectors(mode, expected, scale):
    advantages, metrics = compute_advantages(GROUPS, 4, "grpo", {"scale_rewards": mode})
    close(advantages, expected)
    close(metrics["reward/std_scale"], scale)
    assert metrics["reward/zero_std_group_fraction"] == pytest.approx(1 / 3)
    assert metrics["reward/zero_advantage_group_fraction"] == pytest.approx(1 / 3)
    assert torch.equal(advantages[8:], torch.zeros(4))  # constant group: 0 in every mode


def test_batch_scaling_after_dropping_the_constant_group():
    advantages, metrics = compute_advantages(GROUPS[:8], 4, "grpo", {"scale_rewards": "batch"})
    close(metrics["reward/std_scale"], 0.534522)
    close(advantages, [1.403119, -0.467706, -0.467706, -0.467706, 0.467706, 0.467706, 0.467706, -1.403119])


def test_group_scaling_with_trls_eps(monkeypatch):
    monkeypatch.setattr(adv, "STD_EPS", 1e-4)
    advantages = group_advantages(GROUPS, 4, "grpo", {"scale_rewards": "group"})
    close(advantages[:2], [1.4997, -0.4999], atol=1e-4)
    assert abs(float(advantages[0]) - 1.499997) > 2e-4  # differs from ours (eps 1e-6)


def test_defaults_are_todays_grpo_and_dr_grpo():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0])
    grouped = rewards.view(-1, 4)
    grpo = (grouped - grouped.mean(-1, keepdim=True)) / (grouped.std(-1, unbiased=True, keepdim=True) + 1e-6)
    assert torch.equal(group_advantages(rewards, 4, "grpo"), grpo.reshape(-1))
    assert torch.equal(group_advantages(rewards, 4, "dr_grpo"), (grouped - grouped.mean(-1, keepdim=True)).reshape(-1))
    assert torch.equal(group_advantages(rewards, 4, "grpo", {"scale_rewards": "none"}), group_advantages(rewards, 4, "dr_grpo"))
    assert OmegaConf.load(CONF / "advantage" / "grpo.yaml").scale_rewards == "group"


def test_scale_rewards_values_and_estimators_that_bring_their_own_scaling():
    with pytest.raises(ValueError, match="must be one of group, batch, none"):
        check_advantage_options("grpo", {"scale_rewards": "global"})
    for name in ("rloo", "pass_at_k", "max_leave_one_out", "dr_grpo"):
        with pytest.raises(ValueError, match=f"unknown for advantage estimator '{name}'"):
            check_advantage_options(name, {"scale_rewards": "batch", "k": 2} if name == "pass_at_k" else {"scale_rewards": "batch"})


def _batch_std_worker(rank: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        share = GROUPS[:8].view(2, 4)[rank]  # one group per rank

        def reduce_sum(values: torch.Tensor) -> torch.Tensor:
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
            return values

        advantages, metrics = compute_advantages(share, 4, "grpo", {"scale_rewards": "batch"}, reduce_sum)
        torch.save({"advantages": advantages, "scale": metrics["reward/std_scale"]}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_batch_std_spans_every_rank(tmp_path):
    """Two gloo ranks holding one group each give the one-process batch-scaled advantages."""
    out = str(tmp_path / "result")
    mp.spawn(_batch_std_worker, args=(str(tmp_path / "rendezvous"), out), nprocs=2, join=True)
    whole, metrics = compute_advantages(GROUPS[:8], 4, "grpo", {"scale_rewards": "batch"})
    parts = [torch.load(f"{out}.{rank}") for rank in range(2)]
    assert torch.allclose(torch.cat([p["advantages"] for p in parts]), whole, atol=1e-6)
    for part in parts:
        assert part["scale"] == pytest.approx(metrics["reward/std_scale"])
    close(parts[0]["scale"], 0.534522)


def test_collector_batch_scaling_uses_the_train_batch_after_dynamic_sampling(tiny):
    """Dynamic sampling drops the constant groups; std_B is over the groups that remain."""
    from rlvr_lightning.rewards import RewardResult
    from rlvr_lightning.rollout import build_engine
    from rlvr_lightning.rollout.collector import CollectorSettings, RolloutCollector

    batches = iter([[1.0, 0, 0, 0, 1, 1, 1, 1], [1.0, 1, 1, 0, 0, 0, 0, 0]])

    def reward(completions, answers):
        rewards = next(batches)
        return RewardResult(rewards=rewards, correct=[r > 0 for r in rewards], extracted=[None] * len(rewards))

    model, tokenizer = tiny
    engine = build_engine({"name": "shared_prefix"}, model, tokenizer)
    settings = CollectorSettings(
        group_size=4, prompts_per_step=2, max_new_tokens=4, dynamic=True, max_generation_batches=2,
        advantage="grpo", advantage_options={"scale_rewards": "batch"},
    )
    rows = [{"question": f"What is {a} + 1?", "answer": str(a + 1)} for a in range(4)]
    torch.manual_seed(0)
    rollout, metrics = RolloutCollector(tokenizer, reward, engine.generate, settings).collect(rows, {})
    assert rollout.data["rewards"].tolist() == [1.0, 0, 0, 0, 1, 1, 1, 0]
    close(metrics["reward/std_scale"], 0.534522)
    close(rollout.data["advantages"], [1.403119, -0.467706, -0.467706, -0.467706, 0.467706, 0.467706, 0.467706, -1.403119])
    assert metrics["reward/zero_std_group_fraction"] == 0.0


def test_advantage_yamls_state_the_python_defaults():
    names = {OmegaConf.load(path).name for path in (CONF / "advantage").glob("*.yaml")}
    assert {"rloo", "pass_at_k", "max_leave_one_out"} <= names == set(ADVANTAGE_ESTIMATORS)
    for path in (CONF / "advantage").glob("*.yaml"):
        raw = OmegaConf.to_container(OmegaConf.load(path))
        options = advantage_options(raw.pop("name"))
        assert set(raw) == set(options), f"{path.name} must list every option: {sorted(options)}"
        for key, value in raw.items():
            assert options[key] is REQUIRED or options[key] == value, f"{path.name}: {key}"
    assert OmegaConf.load(CONF / "advantage" / "pass_at_k.yaml").k == 4


# ============================================================================ A8: KL estimators

LOGP = [-1.0, -2.0, -0.5]
REF = [-1.2, -1.5, -0.5]
OLD = [-1.1, -2.0, -0.4]


def kl_through_the_loss(estimator, logp, ref, old=None, weighted=False, beta=1.0):
    """``compute_loss`` of a PPO objective with A = 0 (no policy gradient) plus the KL term,
    token-mean over one sequence: returns (per-token g, metrics) with g = grad / (beta / N)."""
    logp = torch.tensor([logp], dtype=DT, requires_grad=True)
    old = torch.tensor([old if old is not None else logp.detach()[0].tolist()], dtype=DT)
    n = logp.shape[-1]
    batch = PolicyBatch(
        logp=logp, old_logp=old, advantages=torch.zeros(1, n, dtype=DT), mask=torch.ones(1, n, dtype=DT),
        ref_logp=torch.tensor([ref], dtype=DT),
    )
    params = ObjectiveParams(aggregation="token-mean", kl_coef=beta, kl_estimator=estimator, kl_importance_weight=weighted)
    loss, metrics = compute_loss("ppo", batch, ControlState(), params, LossNormalizer(float(n), 1.0, n))
    loss.backward()
    return logp.grad[0] * n / beta, metrics


@pytest.mark.parametrize(
    ("estimator", "values", "grads"),
    [
        ("k1", [0.2, -0.5, 0.0], [1.0, 1.0, 1.0]),
        ("k2", [0.02, 0.125, 0.0], [0.2, -0.5, 0.0]),
        ("k3", [0.018731, 0.148721, 0.0], [0.181269, -0.648721, 0.0]),
        ("k3_plus", [0.018731, 0.148721, 0.0], [0.2, -0.5, 0.0]),  # k3's value, k2's gradient
    ],
)
def test_kl_estimator_vectors(estimator, values, grads):
    logp = torch.tensor(LOGP, dtype=DT, requires_grad=True)
    value = kl_estimate(logp, torch.tensor(REF, dtype=DT), estimator)
    close(value, values)
    value.sum().backward()
    close(logp.grad, grads)
    g, metrics = kl_through_the_loss(estimator, LOGP, REF, beta=0.04)
    close(g, grads)
    close(metrics["objective/kl_ref"], sum(values) / 3)
    close(metrics["objective/kl_ref_k1"], (0.2 - 0.5) / 3)  # logged with every estimator
    close(metrics["objective/kl_ref_k3"], (0.018731 + 0.148721) / 3)


def test_importance_weighted_k3_vector():
    g, metrics = kl_through_the_loss("k3", LOGP, REF, OLD, weighted=True, beta=0.5)
    close(g, [0.221034, -0.5, 0.0])
    close(metrics["objective/kl_ref"], (0.020701 + 0.148721) / 3)
    # Independent: autograd of exp(logp - logp_old) * (e^u - u - 1).
    logp = torch.tensor(LOGP, dtype=DT, requires_grad=True)
    u = torch.tensor(REF, dtype=DT) - logp
    value = (logp - torch.tensor(OLD, dtype=DT)).exp() * (u.exp() - u - 1)
    close(value, [0.020701, 0.148721, 0.0])
    value.sum().backward()
    close(g, logp.grad)


def test_importance_weight_is_one_on_policy():
    """pi_old = pi_theta: r = 1, so r * k3 has k3's value but k2's gradient (logp - logp_ref)."""
    g, metrics = kl_through_the_loss("k3", LOGP, REF, weighted=True)
    close(g, [0.2, -0.5, 0.0])
    close(metrics["objective/kl_ref"], metrics["objective/kl_ref_k3"])


def test_kl_expectations_over_a_three_token_vocabulary():
    """Exact expectation over a ~ pi of each estimator's logit gradient (spec A8)."""
    pi = torch.tensor([0.5, 0.3, 0.2], dtype=DT)
    ref = torch.tensor([0.4, 0.4, 0.2], dtype=DT)

    def expected_grad(estimator):
        z = pi.log().clone().requires_grad_(True)
        logp = torch.log_softmax(z, -1)
        (pi * kl_estimate(logp, ref.log(), estimator)).sum().backward()  # pi is a constant weight
        return z.grad

    z = pi.log().clone().requires_grad_(True)
    p = torch.softmax(z, -1)
    reverse_kl = (p * (p.log() - ref.log())).sum()
    reverse_kl.backward()
    close(reverse_kl, 0.025267)
    close(z.grad, [0.098938, -0.093885, -0.005053])
    close(expected_grad("k1"), [0.0, 0.0, 0.0], atol=1e-12)
    close(expected_grad("k2"), z.grad, atol=1e-12)
    close(expected_grad("k3_plus"), z.grad, atol=1e-12)
    close(expected_grad("k3"), pi - ref, atol=1e-12)  # grad KL(ref || pi)
    close(expected_grad("k3"), [0.1, -0.1, 0.0])


# Gradient regions, u = logp_ref - logp: interior; k3 above its clamp at 10 (u = 3 and u = -15);
# u beyond its clamp at +-20. Columns: logp, logp_ref.
REGIONS = {
    "interior": ([-1.0, -2.0, -0.7, -3.0], [-1.3, -1.1, -0.7, -4.5]),
    "k3_clamped": ([-4.0, -0.1], [-1.0, -15.1]),
    "u_clamped": ([-25.0, -0.5], [-0.5, -30.0]),
}


def closed_form_g(estimator: str, logp: float, ref: float, r: float | None = None) -> float:
    """``g = d l / d logp`` of each estimator (spec A8), with the clamps: u in [-20, 20]
    (no gradient beyond), k3 in [-10, 10]; ``r`` given: the importance-weighted form r * k."""
    u = ref - logp
    inside = abs(u) < 20
    k3 = math.exp(max(min(u, 20), -20)) - max(min(u, 20), -20) - 1
    k3_free = inside and k3 < 10
    dk = {
        "k1": 1.0 if inside else 0.0,
        "k2": -u if inside else 0.0,
        "k3": 1 - math.exp(u) if k3_free else 0.0,
        "k3_plus": -u if inside else 0.0,
    }[estimator]
    if r is None:
        return dk
    value = {"k1": -max(min(u, 20), -20), "k3": min(k3, 10.0)}[estimator]
    return r * value + r * dk  # d r / d logp = r (log ratio inside its clamp)


@pytest.mark.parametrize("region", sorted(REGIONS))
@pytest.mark.parametrize("estimator", KL_ESTIMATORS)
def test_kl_gradient_by_region(estimator, region):
    logp, ref = REGIONS[region]
    g, _ = kl_through_the_loss(estimator, logp, ref, beta=0.3)
    close(g, [closed_form_g(estimator, a, b) for a, b in zip(logp, ref, strict=True)], atol=1e-9)
    if region == "interior":  # and autograd of the formula, no clamp involved
        leaf = torch.tensor(logp, dtype=DT, requires_grad=True)
        u = torch.tensor(ref, dtype=DT) - leaf
        formula = {"k1": -u, "k2": u**2 / 2, "k3": u.exp() - u - 1, "k3_plus": u**2 / 2}[estimator]
        formula.sum().backward()
        close(g, leaf.grad, atol=1e-12)


@pytest.mark.parametrize("region", sorted(REGIONS))
@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_importance_weighted_gradient_by_region(estimator, region):
    logp, ref = REGIONS[region]
    old = [a + 0.1 * (-1) ** i for i, a in enumerate(logp)]  # r = e^-0.1, e^0.1, ...
    g, _ = kl_through_the_loss(estimator, logp, ref, old, weighted=True, beta=2.0)
    ratios = [math.exp(a - o) for a, o in zip(logp, old, strict=True)]
    expected = [closed_form_g(estimator, a, b, r) for a, b, r in zip(logp, ref, ratios, strict=True)]
    close(g, expected, atol=1e-9)


def test_importance_weight_with_a_clamped_log_ratio_keeps_only_the_estimators_gradient():
    """|logp - logp_old| > 20: r is constant (clamped log), g = r_clamped * dk/dlogp."""
    g, _ = kl_through_the_loss("k3", [-1.0], [-1.3], old=[-22.0], weighted=True)
    close(g, [math.exp(20.0) * (1 - math.exp(-0.3))], atol=1e-3)


def test_kl_options_are_checked():
    batch = PolicyBatch(
        logp=torch.zeros(1, 2, dtype=DT), old_logp=torch.zeros(1, 2, dtype=DT), advantages=torch.zeros(1, 2, dtype=DT),
        mask=torch.ones(1, 2, dtype=DT), ref_logp=torch.zeros(1, 2, dtype=DT),
    )
    normalizer = LossNormalizer(2.0, 1.0, 2)
    for params, message in (
        (ObjectiveParams(kl_coef=0.1, kl_estimator="k4"), "unknown objective.kl_estimator"),
        (ObjectiveParams(kl_coef=0.1, kl_estimator="k2", kl_importance_weight=True), "k1 or k3"),
        (ObjectiveParams(kl_coef=0.1, kl_estimator="k3_plus", kl_importance_weight=True), "k1 or k3"),
    ):
        with pytest.raises(ValueError, match=message):
            compute_loss("ppo", batch, ControlState(), params, normalizer)


def test_kl_defaults_are_grpos_k3_and_the_yaml_states_them():
    base = OmegaConf.load(CONF / "objective" / "_shared" / "base.yaml")
    assert base.kl_estimator == ObjectiveParams().kl_estimator == "k3"
    assert base.kl_importance_weight is ObjectiveParams().kl_importance_weight is False
    params = ObjectiveParams.from_config({"name": "grpo", "kl_estimator": "k2", "kl_importance_weight": True})
    assert (params.kl_estimator, params.kl_importance_weight) == ("k2", True)


# ============================================================================ config


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["advantage=pass_at_k", "advantage.k=5"], "advantage.k=5 must be <= rollout.group_size=4"),
        (["advantage=pass_at_k", "advantage.k=0"], "advantage.k=0 must be an integer >= 1"),
        (["advantage=pass_at_k", "advantage.k=null"], "advantage.k=None must be an integer >= 1"),
        (["advantage=pass_at_k", "reward.format_reward=0.1"], "reward.format_reward=0.1 with advantage=pass_at_k"),
        (["advantage=rloo", "+advantage.scale_rewards=batch"], "advantage.scale_rewards is not a setting"),
        (["advantage.scale_rewards=global"], "advantage.scale_rewards='global' must be one of group, batch, none"),
        (["advantage=rloo", "rollout.group_size=1", "rollout.mini_batches=1"], "with the leave-one-out rloo advantage: use group_size >= 2"),
        (["objective.kl_estimator=k4"], "objective.kl_estimator='k4' is unknown; available: k1, k2, k3, k3_plus"),
        (["objective.kl_estimator=k2", "objective.kl_importance_weight=true"], "needs an estimator whose expectation"),
        (["objective.kl_importance_weight=1"], "objective.kl_importance_weight=1 must be true or false"),
    ],
)
def test_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_config(compose_config(TINY_OVERRIDES + overrides))


def test_config_accepts_the_new_settings():
    for overrides in (
        ["advantage=rloo"], ["advantage=pass_at_k", "advantage.k=2"], ["advantage=max_leave_one_out"],
        ["advantage.scale_rewards=batch"], ["advantage.scale_rewards=none"],
        ["objective.kl_coef=0.01", "objective.kl_estimator=k3_plus"],
        ["objective.kl_coef=0.01", "objective.kl_estimator=k1", "objective.kl_importance_weight=true"],
    ):
        validate_config(compose_config(TINY_OVERRIDES + overrides))


# ============================================================================ training runs


@pytest.mark.parametrize(
    ("overrides", "tags"),
    [
        (["advantage=rloo", "reward.random_reward_probability=0.5"], ["reward/zero_advantage_group_fraction"]),
        (["advantage=pass_at_k", "advantage.k=2", "reward.random_reward_probability=0.5"],
         ["reward/pass_at_k_group_mean", "reward/zero_advantage_group_fraction"]),
        (["objective.kl_coef=0.01", "objective.kl_estimator=k2"],
         ["objective/kl_ref", "objective/kl_ref_k1", "objective/kl_ref_k3"]),
        (["advantage.scale_rewards=batch", "reward.random_reward_probability=0.5", "objective.kl_coef=0.01",
          "objective.kl_importance_weight=true"],
         ["reward/std_scale", "reward/zero_std_group_fraction", "objective/kl_ref_k3"]),
    ],
    ids=["rloo", "pass_at_k", "kl_k2", "batch_scale_weighted_k3"],
)
def test_training_runs(tmp_path, overrides, tags):
    from rlvr_lightning.train import run

    cfg = compose_config(TINY_OVERRIDES + ["rollout.epochs=2", "validate_before_training=false", *overrides])
    run(cfg, run_dir=tmp_path / "run")
    scalars = read_scalars(tmp_path / "run")
    for tag in tags:
        assert [step for step, _ in scalars.get(tag, [])] == [0, 1], f"{tag}: {scalars.get(tag)}"
        assert all(math.isfinite(value) for _, value in scalars[tag])
    if "advantage=pass_at_k" in overrides or "advantage=rloo" in overrides:
        # Random 0/1 rewards: some group is mixed, so some advantage is non-zero.
        assert max(value for _, value in scalars["reward/advantage_abs_mean"]) > 0
    if "objective.kl_estimator=k2" in overrides:
        assert "reward/std_scale" in scalars  # grpo's default group scaling is logged too
