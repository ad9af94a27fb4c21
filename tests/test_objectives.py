"""Per-token gradients and values of every objective against docs/algorithms.md (sections 1-3, 5).

Each test builds ``logp`` as a float64 leaf, computes the loss through ``compute_loss``,
back-propagates, and compares ``logp.grad`` with ``w_t * g_t`` where ``g_t`` comes from the
formulas of docs/algorithms.md (written out below, independently of the implementation) and ``w_t``
is the aggregation weight of section 1.
"""

from __future__ import annotations

import math

import pytest
import torch

from rlvr_lightning.control import ControlState
from rlvr_lightning.objectives import (
    LossNormalizer,
    ObjectiveParams,
    PolicyBatch,
    available_objectives,
    compute_loss,
    get_objective,
)

DT = torch.float64
ALL_OBJECTIVES = [
    "ppo",
    "grpo",
    "dapo",
    "dr_grpo",
    "gppo",
    "ce_gppo",
    "cispo",
    "gspo",
    "clip_cov",
    "kl_cov",
]
AGGREGATION_MODES = [
    "token-mean",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
]


# ----------------------------------------------------------------------------- helpers


def make_batch(ratios, advantages, mask=None, old_logp=None, **extra) -> PolicyBatch:
    """A batch whose ratio r = exp(logp - logp_old) equals ``ratios``; ``logp`` is a leaf."""
    ratio = torch.tensor(ratios, dtype=DT)
    old = torch.full_like(ratio, -1.0) if old_logp is None else torch.as_tensor(old_logp, dtype=DT)
    logp = (old + ratio.log()).detach().requires_grad_(True)
    adv = torch.tensor(advantages, dtype=DT)
    if mask is None:
        mask = torch.ones_like(ratio, dtype=torch.bool)
    else:
        mask = torch.as_tensor(mask, dtype=torch.bool)
    return PolicyBatch(logp=logp, old_logp=old, advantages=adv, mask=mask, **extra)


def normalizer_for(batch: PolicyBatch, max_response_length=None, world_size=1) -> LossNormalizer:
    mask = batch.mask.to(DT)
    correct_tokens = 0.0
    if batch.correct is not None:
        correct_tokens = float((mask * batch.correct.to(DT).unsqueeze(-1)).sum())
    return LossNormalizer(
        num_tokens=float(mask.sum()),
        num_sequences=float(mask.shape[0]),
        max_response_length=max_response_length or mask.shape[1],
        world_size=world_size,
        num_correct_tokens=correct_tokens,
    )


def aggregation_weights(mode, mask, num_sequences, max_response_length, world_size=1):
    """``w_t`` of section 1: d(aggregated loss) / d l_t."""
    m = torch.as_tensor(mask).to(DT)
    if mode == "token-mean":
        w = m / m.sum()
    elif mode == "seq-mean-token-mean":
        w = m / m.sum(-1, keepdim=True).clamp_min(1.0) / num_sequences
    elif mode == "seq-mean-token-sum":
        w = m / num_sequences
    elif mode == "seq-mean-token-sum-norm":
        w = m / (num_sequences * max_response_length)
    else:
        raise AssertionError(mode)
    return w * world_size


def params_for(name, **kwargs) -> ObjectiveParams:
    kwargs.setdefault("aggregation", get_objective(name).default_aggregation)
    return ObjectiveParams(**kwargs)


def run(name, batch, control, params=None, normalizer=None):
    """Loss, ``logp.grad`` and metrics of one backward pass."""
    params = params or params_for(name)
    normalizer = normalizer or normalizer_for(batch)
    if batch.logp.grad is not None:
        batch.logp.grad = None
    loss, metrics = compute_loss(name, batch, control, params, normalizer)
    loss.backward()
    return loss.detach(), batch.logp.grad.detach().clone(), metrics


def weights_of(name, batch, params=None, normalizer=None):
    params = params or params_for(name)
    normalizer = normalizer or normalizer_for(batch)
    return aggregation_weights(
        params.aggregation, batch.mask, normalizer.num_sequences, normalizer.max_response_length
    )


def close(actual, expected, atol=1e-12):
    # Fraction metrics are float32 (mean of a float mask); everything else is float64.
    rtol = 1e-9 if actual.dtype == DT else 1e-6
    atol = atol if actual.dtype == DT else max(atol, 1e-7)
    torch.testing.assert_close(
        actual.to(DT), torch.as_tensor(expected, dtype=DT), rtol=rtol, atol=atol
    )


def ppo_expected(r, a, eps_low, eps_high, dual_clip=None):
    """(l, g) of one token from docs/algorithms.md 2.1 (with dual clip)."""
    lower, upper = 1.0 - eps_low, 1.0 + eps_high
    clipped = min(max(r, lower), upper)
    loss = -min(r * a, clipped * a)
    if a > 0 and r > upper:  # clip-high
        grad = 0.0
    elif a < 0 and r < lower:  # clip-low
        grad = 0.0
    else:  # inside, or the pessimistic side that is not clipped
        grad = -a * r
    if dual_clip is not None and a < 0 and r > dual_clip:
        loss, grad = -dual_clip * a, 0.0
    return loss, grad


def gppo_expected(r, a, eps_low, eps_high, beta1, beta2, dual_clip=None):
    """(l, g) of one token from docs/algorithms.md 2.5."""
    if a < 0 and r < 1.0 - eps_low:  # left side
        return -beta1 * (1.0 - eps_low) * a, -beta1 * (1.0 - eps_low) * a
    if a > 0 and r > 1.0 + eps_high:  # right side
        return -beta2 * (1.0 + eps_high) * a, -beta2 * (1.0 + eps_high) * a
    if dual_clip is not None and a < 0 and r > dual_clip:
        return -dual_clip * a, 0.0
    return -r * a, -r * a


def elementwise(fn, ratios, advantages, *args):
    """Apply a per-token reference ``fn`` to nested lists; eps may be per-token tensors."""
    losses, grads = [], []
    for i, (row_r, row_a) in enumerate(zip(ratios, advantages, strict=True)):
        row_l, row_g = [], []
        for j, (r, a) in enumerate(zip(row_r, row_a, strict=True)):
            token_args = [x[i][j] if isinstance(x, (list, torch.Tensor)) else x for x in args]
            token_args = [float(x) if isinstance(x, torch.Tensor) else x for x in token_args]
            loss, grad = fn(r, a, *token_args)
            row_l.append(loss)
            row_g.append(grad)
        losses.append(row_l)
        grads.append(row_g)
    return torch.tensor(losses, dtype=DT), torch.tensor(grads, dtype=DT)


# Region table of section 2.1, two sequences of 5 slots, the second with 2 padding slots.
#   row 0: inside (A>0) | clip-high | A>0 & r<1-eps (kept) | clip-low | A<0 & r>1+eps (kept)
#          | r=5, A>0 (clip-high, never dual clip)
#   row 1: inside (A<0) | r=4, A<0 (dual clip when c=3) | r=1.25 (clip-high only at 0.2) | pad
REGION_RATIOS = [[1.1, 1.5, 0.5, 0.5, 1.5, 5.0], [0.9, 4.0, 1.25, 3.0, 0.2, 1.0]]
REGION_ADVANTAGES = [[1.0, 1.0, 1.0, -1.0, -1.0, 1.0], [-0.5, -2.0, 0.7, 2.0, -2.0, 1.0]]
REGION_MASK = [[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]]
NO_CLIP_COV = {"clip_cov_lower": 1e9, "clip_cov_upper": 2e9}  # no candidates: plain PPO


def test_registry_holds_every_objective_with_its_aggregation():
    assert set(ALL_OBJECTIVES) <= set(available_objectives())
    expected = {
        "ppo": "token-mean",
        "grpo": "seq-mean-token-mean",
        "dapo": "token-mean",
        "dr_grpo": "seq-mean-token-sum-norm",
        "gppo": "token-mean",
        "ce_gppo": "token-mean",
        "cispo": "token-mean",
        "gspo": "seq-mean-token-mean",
        "clip_cov": "token-mean",
        "kl_cov": "token-mean",
    }
    for name, mode in expected.items():
        assert get_objective(name).default_aggregation == mode, name


# ----------------------------------------------------------------------------- PPO family


@pytest.mark.parametrize("name", ["ppo", "grpo", "dapo", "dr_grpo", "clip_cov"])
@pytest.mark.parametrize("eps_low,eps_high", [(0.2, 0.2), (0.2, 0.28)])
@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_ppo_clip_regions(name, eps_low, eps_high, dual_clip):
    batch = make_batch(REGION_RATIOS, REGION_ADVANTAGES, REGION_MASK)
    control = ControlState(eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip)
    options = NO_CLIP_COV if name == "clip_cov" else {}
    params = params_for(name, options=options)
    # Dr. GRPO divides by the generation budget, not the padded width.
    normalizer = normalizer_for(batch, max_response_length=8)
    loss, grad, _ = run(name, batch, control, params, normalizer)

    per_token, g = elementwise(
        ppo_expected, REGION_RATIOS, REGION_ADVANTAGES, eps_low, eps_high, dual_clip
    )
    w = weights_of(name, batch, params, normalizer)
    close(grad, w * g)
    close(loss, (w * per_token).sum())
    # The table itself: clip-high, clip-low and dual clip have zero gradient, the pessimistic
    # sides do not.
    assert grad[0, 1] == 0 and grad[0, 3] == 0
    assert grad[0, 2] < 0 and grad[0, 4] > 0 and grad[0, 5] == 0
    assert (grad[1, 1] == 0) == (dual_clip is not None)
    assert (grad[1, 2] == 0) == (eps_high < 0.25)
    assert torch.all(grad[1, 3:] == 0)


def test_probability_dependent_bounds_per_token_and_detached():
    # Same ratio and advantage, different pi_old: the bound in force differs per token.
    p = [[0.9, 0.1, 0.9, 0.1]]
    ratios = [[1.4, 1.4, 0.75, 0.75]]
    advantages = [[1.0, 1.0, -1.0, -1.0]]
    old = torch.tensor(p, dtype=DT).log().requires_grad_(True)
    batch = make_batch(ratios, advantages, old_logp=old)
    # Leaf logp built from a detached copy; old_logp itself keeps requires_grad to catch any
    # gradient path through the bounds.
    batch.logp = (old.detach() + torch.tensor(ratios, dtype=DT).log()).requires_grad_(True)
    control = ControlState(high_prob_weight=1.0, low_prob_weight=1.0)

    # Closed forms of section 4.2: r <= (1 + 0.5) / (1 + 0.25 p_old), r >= (1 - 0.3) / (1 - 0.13 p_old).
    eps_high = [[min(max(1.5 / (1 + 0.25 * q) - 1, 0.05), 0.6) for q in row] for row in p]
    eps_low = [[min(max(1 - 0.7 / (1 - 0.13 * q), 0.05), 0.6) for q in row] for row in p]
    low_bounds, high_bounds = control.clip_bounds(old)
    assert not low_bounds.requires_grad and not high_bounds.requires_grad
    close(high_bounds, eps_high)
    close(low_bounds, eps_low)

    for name in ["ppo", "ce_gppo", "cispo"]:
        control.beta1, control.beta2 = 0.5, 0.75
        old.grad = None
        loss, grad, metrics = run(name, batch, control)
        if name == "ppo":
            _, g = elementwise(ppo_expected, ratios, advantages, eps_low, eps_high)
            # p = 0.9 tokens are clipped (tight bound), p = 0.1 tokens are not.
            assert g[0, 0] == 0 and g[0, 1] != 0 and g[0, 2] == 0 and g[0, 3] != 0
        elif name == "ce_gppo":
            _, g = elementwise(gppo_expected, ratios, advantages, eps_low, eps_high, 0.5, 0.75)
        else:
            g = torch.tensor(
                [
                    [
                        -min(max(r, 1 - lo), 1 + hi) * a
                        for r, a, lo, hi in zip(
                            ratios[0], advantages[0], eps_low[0], eps_high[0], strict=True
                        )
                    ]
                ],
                dtype=DT,
            )
        close(grad, g / 4)
        # Bounds are detached: old_logp only enters through r = exp(logp - logp_old) (and
        # not at all in CISPO, whose ratio is a detached weight).
        if name == "cispo":
            assert old.grad is None or torch.all(old.grad == 0)
        else:
            close(old.grad, -grad)
        close(metrics["objective/eps_high_in_force"], sum(eps_high[0]) / 4)
        close(metrics["objective/eps_low_in_force"], sum(eps_low[0]) / 4)


def test_grpo_k3_kl_gradient():
    ratios = [[1.1, 1.5, 0.5], [0.9, 1.0, 1.3]]
    advantages = [[1.0, 1.0, -1.0], [-0.5, 0.5, -0.2]]
    mask = [[1, 1, 1], [1, 1, 0]]
    batch = make_batch(ratios, advantages, mask)
    batch.ref_logp = batch.old_logp + torch.tensor([[0.3, -0.2, 0.1], [-0.4, 0.05, 0.2]], dtype=DT)
    beta = 0.04
    params = params_for("grpo", kl_coef=beta)
    loss, grad, metrics = run("grpo", batch, ControlState(), params)

    l_ppo, g_ppo = elementwise(ppo_expected, ratios, advantages, 0.2, 0.2)
    diff = batch.ref_logp - batch.logp.detach()
    k3 = diff.exp() - diff - 1.0
    g = g_ppo + beta * (1.0 - diff.exp())
    w = weights_of("grpo", batch, params)
    close(grad, w * g)
    close(loss, (w * (l_ppo + beta * k3)).sum())
    m = torch.tensor(mask, dtype=DT)
    close(metrics["objective/kl_ref"], (k3 * m).sum() / m.sum())


def test_k3_is_clamped_at_ten():
    batch = make_batch([[1.0]], [[0.0]])
    batch.ref_logp = batch.old_logp + 5.0  # exp(5) - 5 - 1 = 142 > 10
    loss, grad, _ = run("grpo", batch, ControlState(), params_for("grpo", kl_coef=1.0))
    close(loss, 10.0)
    close(grad, [[0.0]])


# ----------------------------------------------------------------------------- CE-GPPO


GPPO_RATIOS = [[1.1, 1.5, 0.5, 0.5, 1.5, 0.9], [12.0, 4.0, 0.6, 1.3, 2.0, 0.1]]
GPPO_ADVANTAGES = [[1.0, 1.0, 1.0, -1.0, -1.0, -0.5], [-1.0, -0.5, -2.0, 0.7, 0.0, 0.3]]
GPPO_MASK = [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]


@pytest.mark.parametrize(
    "beta1,beta2", [(0.0, 0.0), (1.0, 1.0), (0.5, 1.0), (0.75, 1.0), (1.0, 0.5), (0.25, 0.8)]
)
@pytest.mark.parametrize("dual_clip", [None, 10.0])
def test_ce_gppo_both_sides(beta1, beta2, dual_clip):
    batch = make_batch(GPPO_RATIOS, GPPO_ADVANTAGES, GPPO_MASK)
    control = ControlState(eps_low=0.2, eps_high=0.2, beta1=beta1, beta2=beta2, dual_clip=dual_clip)
    loss, grad, metrics = run("ce_gppo", batch, control)

    per_token, g = elementwise(
        gppo_expected, GPPO_RATIOS, GPPO_ADVANTAGES, 0.2, 0.2, beta1, beta2, dual_clip
    )
    w = weights_of("ce_gppo", batch)
    close(grad, w * g)
    close(loss, (w * per_token).sum())
    # Left side (A<0, r<0.8) carries beta1, right side (A>0, r>1.2) carries beta2.
    close(grad[0, 3], w[0, 3] * -beta1 * 0.8 * -1.0)
    close(grad[0, 1], w[0, 1] * -beta2 * 1.2 * 1.0)
    assert (grad[1, 0] == 0) == (dual_clip is not None)

    n = 10.0
    close(metrics["objective/clip_low_fraction"], 2 / n)  # (0,3) and (1,2)
    close(metrics["objective/clip_high_fraction"], 2 / n)  # (0,1) and (1,3)
    close(metrics["objective/dual_clip_fraction"], (1 / n) if dual_clip else 0.0)
    close(metrics["objective/preserved_gradient_low_fraction"], 2 / n if beta1 > 0 else 0.0)
    close(metrics["objective/preserved_gradient_high_fraction"], 2 / n if beta2 > 0 else 0.0)


def test_ce_gppo_with_zero_betas_has_ppo_gradients():
    control = ControlState(eps_low=0.2, eps_high=0.28, beta1=0.0, beta2=0.0, dual_clip=3.0)
    batch = make_batch(REGION_RATIOS, REGION_ADVANTAGES, REGION_MASK)
    _, grad_ce, _ = run("ce_gppo", batch, control)
    _, grad_ppo, _ = run("ppo", batch, control)
    close(grad_ce, grad_ppo)


def test_gppo_ignores_control_betas():
    batch = make_batch(GPPO_RATIOS, GPPO_ADVANTAGES, GPPO_MASK)
    control = ControlState(beta1=0.0, beta2=0.3)
    loss, grad, metrics = run("gppo", batch, control)
    per_token, g = elementwise(gppo_expected, GPPO_RATIOS, GPPO_ADVANTAGES, 0.2, 0.2, 1.0, 1.0)
    w = weights_of("gppo", batch)
    close(grad, w * g)
    close(loss, (w * per_token).sum())
    close(metrics["objective/beta1_in_force"], 1.0)
    close(metrics["objective/preserved_gradient_low_fraction"], 2 / 10)


# ----------------------------------------------------------------------------- CISPO


def test_cispo_gradient_is_clipped_weight_for_every_token():
    ratios = REGION_RATIOS
    batch = make_batch(ratios, REGION_ADVANTAGES, REGION_MASK)
    control = ControlState(eps_low=0.2, eps_high=0.28)
    loss, grad, metrics = run("cispo", batch, control)

    logp = batch.logp.detach()
    weight = torch.tensor([[min(max(r, 0.8), 1.28) for r in row] for row in ratios], dtype=DT)
    adv = batch.advantages
    w = weights_of("cispo", batch)
    close(grad, w * (-weight * adv))
    close(loss, (w * (-weight * adv * logp)).sum())
    # No token loses its gradient, not even the ones PPO would clip.
    m = batch.mask
    assert torch.all(grad[m] != 0)
    n = 9.0
    close(metrics["objective/cispo_weight_clipped_low_fraction"], 2 / n)  # r = 0.5 twice
    close(metrics["objective/cispo_weight_clipped_high_fraction"], 4 / n)  # 1.5, 1.5, 5, 4


# ----------------------------------------------------------------------------- GSPO


def test_gspo_sequence_clip():
    eps_low, eps_high = 3e-4, 4e-4
    # Token log-ratios; the sequence ratio is exp of their masked mean.
    log_ratios = [
        [1e-4, -1e-4, 3e-4, 0.0],  # mean 7.5e-5: inside, A > 0
        [0.02, 0.0, 0.01, 0.0],  # mean 0.01 over 3 tokens: A > 0, clipped high
        [-0.01, -0.01, 0.0, 0.0],  # mean -0.01 over 2: A < 0, clipped low
        [-0.01, -0.01, -0.01, -0.01],  # A > 0 and s < 1-eps: not clipped
        [0.01, 0.03, 0.0, 0.0],  # A < 0 and s > 1+eps: not clipped
        [15.0, 15.0, 0.0, 0.0],  # mean 15 clamped to 10: A > 0, clipped high
    ]
    mask = [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]]
    seq_adv = [1.0, 0.5, -1.0, 0.8, -0.6, 1.0]
    advantages = [[a] * 4 for a in seq_adv]
    ratios = torch.tensor(log_ratios, dtype=DT).exp().tolist()
    batch = make_batch(ratios, advantages, mask)
    control = ControlState(eps_low=eps_low, eps_high=eps_high)
    loss, grad, metrics = run("gspo", batch, control)

    lengths = [sum(row) for row in mask]
    s = [
        math.exp(min(sum(x * m for x, m in zip(lr, mk, strict=True)) / n, 10.0))
        for lr, mk, n in zip(log_ratios, mask, lengths, strict=True)
    ]
    num_sequences = len(mask)
    expected_grad = torch.zeros(len(mask), 4, dtype=DT)
    expected_loss = 0.0
    clipped = [False, True, True, False, False, True]
    for i, (a, si, n) in enumerate(zip(seq_adv, s, lengths, strict=True)):
        assert clipped[i] == ((a > 0 and si > 1 + eps_high) or (a < 0 and si < 1 - eps_low))
        g = 0.0 if clipped[i] else -a * si
        expected_grad[i, :n] = g / (num_sequences * n)
        expected_loss += -min(si * a, min(max(si, 1 - eps_low), 1 + eps_high) * a) / num_sequences
    close(grad, expected_grad)
    close(loss, expected_loss)
    assert torch.isfinite(grad).all()

    close(metrics["objective/sequence_clip_low_fraction"], 1 / 6)
    close(metrics["objective/sequence_clip_high_fraction"], 2 / 6)
    close(metrics["objective/sequence_ratio_mean"], sum(s) / 6)
    close(metrics["objective/sequence_ratio_max"], math.exp(10.0))


# ----------------------------------------------------------------------------- aggregation


MICRO_RATIOS = [
    [1.1, 1.5, 0.5, 0.7],
    [0.9, 1.3, 1.05, 1.0],
    [1.18, 0.95, 0.6, 2.0],
    [1.0, 1.15, 0.85, 1.4],
]
MICRO_ADVANTAGES = [
    [1.0, 1.0, 1.0, 1.0],
    [-0.5, -0.5, -0.5, -0.5],
    [0.3, 0.3, 0.3, 0.3],
    [-1.2, -1.2, -1.2, -1.2],
]
MICRO_MASK = [[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]]


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
@pytest.mark.parametrize("name", ["ppo", "gppo", "cispo", "gspo"])
def test_micro_batch_invariance(mode, name):
    control = ControlState(eps_low=0.2, eps_high=0.2)
    params = params_for(name, aggregation=mode)
    full = make_batch(MICRO_RATIOS, MICRO_ADVANTAGES, MICRO_MASK)
    normalizer = normalizer_for(full, max_response_length=6)
    loss_full, grad_full, _ = run(name, full, control, params, normalizer)

    # The one-shot gradient matches the aggregation weights of section 1.
    if name == "ppo":
        _, g = elementwise(ppo_expected, MICRO_RATIOS, MICRO_ADVANTAGES, 0.2, 0.2)
        w = aggregation_weights(mode, full.mask, 4.0, 6)
        close(grad_full, w * g)

    # Uneven micro-batches, each aggregated with the global counts.
    loss_sum = torch.zeros((), dtype=DT)
    grads = []
    for rows in (slice(0, 1), slice(1, 4)):
        part = make_batch(MICRO_RATIOS[rows], MICRO_ADVANTAGES[rows], MICRO_MASK[rows])
        loss, grad, _ = run(name, part, control, params, normalizer)
        loss_sum = loss_sum + loss
        grads.append(grad)
    close(torch.cat(grads), grad_full)
    close(loss_sum, loss_full)


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
def test_world_size_scaling_matches_global_mean(mode):
    """Two ranks, world_size 2, gradients averaged like DDP: equal to the one-rank gradient."""
    control = ControlState()
    params = params_for("ppo", aggregation=mode)
    coefficients = torch.linspace(0.5, 2.0, 16, dtype=DT).view(4, 4)

    def theta_grad(rows, world_size):
        theta = torch.zeros((), dtype=DT, requires_grad=True)
        batch = make_batch(MICRO_RATIOS[rows], MICRO_ADVANTAGES[rows], MICRO_MASK[rows])
        batch.logp = batch.logp.detach() + theta * coefficients[rows]
        full = make_batch(MICRO_RATIOS, MICRO_ADVANTAGES, MICRO_MASK)
        normalizer = normalizer_for(full, max_response_length=6, world_size=world_size)
        loss, _ = compute_loss("ppo", batch, control, params, normalizer)
        loss.backward()
        return loss.detach(), theta.grad

    loss_one, grad_one = theta_grad(slice(0, 4), 1)
    rank_results = [theta_grad(slice(0, 2), 2), theta_grad(slice(2, 4), 2)]
    close(sum(g for _, g in rank_results) / 2, grad_one)
    close(sum(loss for loss, _ in rank_results) / 2, loss_one)
    # A single rank's share is scaled up by the world size.
    loss_ws1, _ = theta_grad(slice(0, 2), 1)
    close(rank_results[0][0], 2 * loss_ws1)


# ----------------------------------------------------------------------------- ERC


def erc_entropies(rhos, old_entropy=1.0):
    """Update-pass entropies giving exactly these ratios rho = (H + 1e-8) / (H_old + 1e-8)."""
    old = torch.full((len(rhos), len(rhos[0])), old_entropy, dtype=DT)
    new = torch.tensor(rhos, dtype=DT) * (old + 1e-8) - 1e-8
    return new, old


ERC_RHOS = [[1.0, 1.06, 0.94, 1.05, 0.95], [1.04, 0.96, 1.2, 0.5, 1.0]]
ERC_IN_BAND = [[True, False, False, False, False], [True, True, False, False, True]]


def test_erc_masks_gradient_keeps_value_and_denominator():
    ratios = [[1.1, 0.9, 1.05, 0.95, 1.1], [0.9, 1.1, 1.0, 1.1, 1.5]]
    advantages = [[1.0, -1.0, 1.0, -0.5, 0.5], [-1.0, 1.0, -2.0, 0.3, 1.0]]
    mask = [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    entropy, old_entropy = erc_entropies(ERC_RHOS)
    rho = (entropy + 1e-8) / (old_entropy + 1e-8)
    # Precondition: the boundary tokens sit exactly on the open band's edges.
    assert rho[0, 3] == 1.0 + 0.05 and rho[0, 4] == 1.0 - 0.05
    batch = make_batch(ratios, advantages, mask, entropy=entropy, old_entropy=old_entropy)
    control = ControlState(eps_low=0.2, eps_high=0.28, erc_beta_low=0.05, erc_beta_high=0.05)
    loss, grad, metrics = run("dapo", batch, control)

    per_token, g = elementwise(ppo_expected, ratios, advantages, 0.2, 0.28)
    in_band = torch.tensor(ERC_IN_BAND, dtype=DT)
    n = 9.0  # out-of-band tokens still count in the denominator
    m = torch.tensor(mask, dtype=DT)
    close(grad, m * in_band * g / n)
    close(loss, (m * per_token).sum() / n)
    # Both signs of A lose their gradient out of band, and keep it in band.
    assert grad[0, 1] == 0 and grad[0, 2] == 0 and grad[0, 0] != 0 and grad[1, 0] != 0
    close(metrics["objective/erc_in_band_fraction"], 3 / n)
    close(metrics["objective/erc_above_band_fraction"], 3 / n)  # 1.06, 1.05, 1.2
    close(metrics["objective/erc_below_band_fraction"], 3 / n)  # 0.94, 0.95, 0.5


@pytest.mark.parametrize("name", ALL_OBJECTIVES)
def test_erc_applies_to_every_objective(name):
    ratios = [[1.1, 0.9, 1.05, 0.95, 1.3], [0.7, 1.1, 1.0, 1.1, 1.5]]
    advantages = [[1.0, 1.0, 1.0, 1.0, 1.0], [-1.0, -1.0, -1.0, -1.0, -1.0]]
    mask = [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    entropy, old_entropy = erc_entropies(ERC_RHOS)

    def batch():
        return make_batch(
            ratios,
            advantages,
            mask,
            entropy=entropy,
            old_entropy=old_entropy,
            generator=torch.Generator().manual_seed(0),
        )

    # Only the options the objective declares (unknown ones are errors).
    options = {"clip_cov": {"clip_cov_ratio": 0.5}, "kl_cov": {"kl_cov_ratio": 0.5}}.get(name, {})
    params = params_for(name, options=options)
    base = ControlState(beta1=0.5, beta2=1.0)
    erc = ControlState(beta1=0.5, beta2=1.0, erc_beta_low=0.05, erc_beta_high=0.05)
    loss_plain, grad_plain, _ = run(name, batch(), base, params)
    loss_erc, grad_erc, _ = run(name, batch(), erc, params)
    close(loss_erc, loss_plain)
    close(grad_erc, grad_plain * torch.tensor(ERC_IN_BAND, dtype=DT))


# ----------------------------------------------------------------------------- Clip-Cov / KL-Cov


def cov_data(seed=1):
    """4 x 10 tokens, 36 valid, with several Clip-Cov candidates and high-Cov clipped tokens."""
    g = torch.Generator().manual_seed(seed)
    advantages = torch.tensor([2.0, -2.0, 1.0, -1.0], dtype=DT)[
        torch.randint(0, 4, (4, 10), generator=g)
    ]
    logp = -5.0 * torch.rand(4, 10, generator=g, dtype=DT)
    ratios = torch.exp(0.8 * (torch.rand(4, 10, generator=g, dtype=DT) - 0.5))
    mask = torch.ones(4, 10, dtype=torch.bool)
    mask[3, 6:] = False
    # A padding log-prob far from the others: the means must run over valid tokens only.
    logp[3, 9] = 30.0
    return advantages, logp, ratios, mask


def covariance(advantages, logp, mask):
    m = mask.to(DT)
    mean_a = (advantages * m).sum() / m.sum()
    mean_logp = (logp * m).sum() / m.sum()
    return (advantages - mean_a) * (logp - mean_logp)


def cov_batch(advantages, logp, ratios, mask, seed=None):
    batch = make_batch(ratios.tolist(), advantages.tolist(), mask, old_logp=logp - ratios.log())
    batch.logp = logp.clone().requires_grad_(True)
    if seed is not None:
        batch.generator = torch.Generator().manual_seed(seed)
    return batch


@pytest.mark.parametrize("ratio_of_tokens,expected_count", [(0.0002, 1), (0.25, 9)])
def test_clip_cov_seeded_selection(ratio_of_tokens, expected_count):
    advantages, logp, ratios, mask = cov_data()
    cov = covariance(advantages, logp, mask)
    clipped = ((advantages < 0) & (ratios < 0.8)) | ((advantages > 0) & (ratios > 1.2))
    in_range = (cov > 1) & (cov < 5)
    candidates = mask & ~clipped & in_range
    n_valid = int(mask.sum())
    assert expected_count == max(math.floor(ratio_of_tokens * n_valid), 1)
    # Preconditions: more candidates than picks; clipped and padding tokens in the Cov range.
    assert int(candidates.sum()) > expected_count + 2
    assert bool((mask & clipped & in_range).any()) and bool((~mask & in_range).any())

    params = params_for("clip_cov", options={"clip_cov_ratio": ratio_of_tokens})
    control = ControlState()
    _, g = elementwise(ppo_expected, ratios.tolist(), advantages.tolist(), 0.2, 0.2)
    w = mask.to(DT) / n_valid

    picks = []
    for seed in (0, 0, 1, 2, 3):
        batch = cov_batch(advantages, logp, ratios, mask, seed)
        loss, grad, metrics = run("clip_cov", batch, control, params)
        expected = w * g
        selected = (grad == 0) & (expected != 0)
        assert int(selected.sum()) == expected_count
        assert bool((selected <= candidates).all())
        # Every other token keeps its PPO gradient; the loss value is PPO's.
        close(grad[~selected], expected[~selected])
        per_token, _ = elementwise(ppo_expected, ratios.tolist(), advantages.tolist(), 0.2, 0.2)
        close(loss, (w * per_token).sum())
        close(metrics["objective/cov_selected_fraction"], expected_count / n_valid)
        close(metrics["objective/cov_mean"], (cov * mask).sum() / n_valid)
        picks.append(selected)
    assert torch.equal(picks[0], picks[1])  # same seed, same tokens
    assert any(not torch.equal(picks[0], p) for p in picks[2:])  # other seeds differ


def test_clip_cov_without_candidates_is_ppo():
    advantages, logp, ratios, mask = cov_data()
    params = params_for("clip_cov", options={"clip_cov_lower": 100.0, "clip_cov_upper": 200.0})
    batch = cov_batch(advantages, logp, ratios, mask, seed=0)
    _, grad, metrics = run("clip_cov", batch, ControlState(), params)
    _, g = elementwise(ppo_expected, ratios.tolist(), advantages.tolist(), 0.2, 0.2)
    close(grad, mask.to(DT) * g / int(mask.sum()))
    close(metrics["objective/cov_selected_fraction"], 0.0)


@pytest.mark.parametrize("ratio_of_tokens,expected_count", [(0.002, 1), (0.1, 3)])
def test_kl_cov_top_k(ratio_of_tokens, expected_count):
    advantages, logp, ratios, mask = cov_data()
    # A padding token with a huge covariance must never be picked.
    advantages[3, 8], logp[3, 8] = 50.0, 50.0
    cov = covariance(advantages, logp, mask)
    n_valid = int(mask.sum())
    assert expected_count == max(math.floor(ratio_of_tokens * n_valid), 1)
    assert cov[3, 8] > cov[mask].max()
    order = torch.argsort(cov.masked_fill(~mask, -math.inf).flatten(), descending=True)
    top = torch.zeros(40, dtype=torch.bool)
    top[order[:expected_count]] = True
    top = top.view(4, 10)
    # Precondition: no tie at the cut.
    sorted_cov = cov[mask].sort(descending=True).values
    assert sorted_cov[expected_count - 1] > sorted_cov[expected_count]

    coef = 0.7
    params = params_for("kl_cov", options={"kl_cov_ratio": ratio_of_tokens, "kl_cov_coef": coef})
    # eps would clip these tokens under PPO; KL-Cov must ignore it.
    control = ControlState(eps_low=0.01, eps_high=0.01)
    batch = cov_batch(advantages, logp, ratios, mask)
    loss, grad, metrics = run("kl_cov", batch, control, params)

    log_r = ratios.log()
    g = -advantages * ratios + top.to(DT) * coef * log_r.sign()
    per_token = -advantages * ratios + top.to(DT) * coef * log_r.abs()
    w = mask.to(DT) / n_valid
    close(grad, w * g)
    close(loss, (w * per_token).sum())
    close(metrics["objective/cov_selected_fraction"], expected_count / n_valid)


# ----------------------------------------------------------------------------- extras


@pytest.mark.parametrize("name", ALL_OBJECTIVES)
def test_entropy_bonus_and_nll_gradients(name):
    ratios = [[1.1, 0.9, 1.3], [0.7, 1.05, 1.0]]
    advantages = [[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]]
    mask = [[1, 1, 1], [1, 1, 0]]
    correct = torch.tensor([True, False])

    def batch():
        entropy = torch.tensor([[1.0, 2.0, 0.5], [0.3, 1.5, 9.0]], dtype=DT).requires_grad_(True)
        return make_batch(
            ratios,
            advantages,
            mask,
            entropy=entropy,
            correct=correct,
            generator=torch.Generator().manual_seed(0),
        )

    control = ControlState(beta1=0.5, beta2=1.0)
    plain = batch()
    loss_plain, grad_plain, _ = run(name, plain, control, params_for(name))
    extra = batch()
    entropy_coef, nll_coef = 0.01, 0.1
    params = params_for(name, nll_coef=nll_coef)
    control_extra = ControlState(beta1=0.5, beta2=1.0, entropy_coef=entropy_coef)
    loss_extra, grad_extra, metrics = run(name, extra, control_extra, params)

    m = torch.tensor(mask, dtype=DT)
    correct_mask = m * correct.to(DT).unsqueeze(-1)
    logp = extra.logp.detach()
    entropy = extra.entropy.detach()
    expected_extra = -entropy_coef * (entropy * m).sum() / m.sum() + nll_coef * (
        -(logp * correct_mask).sum() / correct_mask.sum()
    )
    close(loss_extra - loss_plain, expected_extra)
    close(grad_extra - grad_plain, -nll_coef * correct_mask / correct_mask.sum())
    close(extra.entropy.grad, -entropy_coef * m / m.sum())
    close(metrics["objective/nll_correct"], -(logp * correct_mask).sum() / correct_mask.sum())


@pytest.mark.parametrize("name", ALL_OBJECTIVES)
def test_log_ratio_clamp_keeps_values_finite(name):
    ratios = [[1.0, 1.0, 1.0, 1.0]]
    advantages = [[1.0, -1.0, 1.0, -1.0]]
    batch = make_batch(ratios, advantages, generator=torch.Generator().manual_seed(0))
    # logp - logp_old = +-30, beyond the +-20 clamp.
    batch.logp = (
        batch.old_logp + torch.tensor([[30.0, 30.0, -30.0, -30.0]], dtype=DT)
    ).requires_grad_(True)
    control = ControlState(beta1=1.0, beta2=1.0)
    loss, grad, metrics = run(name, batch, control)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert all(torch.isfinite(v).all() for v in metrics.values())
    if "objective/ratio_max" in metrics:
        close(metrics["objective/ratio_max"], math.exp(20.0), atol=1e-3)


# ----------------------------------------------------------------------------- metrics


def test_ppo_metrics_on_hand_made_example():
    # 8 valid tokens: 1 clip-low, 2 clip-high, 1 dual clip, 1 pessimistic on each side,
    # 2 inside; a padding token that would be clip-high must not count.
    ratios = [[0.5, 1.5, 1.6, 4.0, 0.5, 1.5], [1.0, 1.1, 2.0, 9.0, 1.0, 1.0]]
    advantages = [[-1.0, 1.0, 2.0, -1.0, 1.0, -1.0], [0.5, -0.5, 1.0, 1.0, 0.0, 0.0]]
    mask = [[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]]
    batch = make_batch(ratios, advantages, mask)
    control = ControlState(eps_low=0.2, eps_high=0.28, dual_clip=3.0)
    _, _, metrics = run("ppo", batch, control)
    n = 8.0
    close(metrics["objective/clip_low_fraction"], 1 / n)
    close(metrics["objective/clip_high_fraction"], 2 / n)
    close(metrics["objective/dual_clip_fraction"], 1 / n)
    valid_ratios = [0.5, 1.5, 1.6, 4.0, 0.5, 1.5, 1.0, 1.1]
    close(metrics["objective/ratio_mean"], sum(valid_ratios) / n)
    close(metrics["objective/ratio_max"], 4.0)
    close(metrics["objective/approx_kl_old"], -sum(math.log(r) for r in valid_ratios) / n)
    close(metrics["objective/eps_low_in_force"], 0.2)
    close(metrics["objective/eps_high_in_force"], 0.28)


EXPECTED_METRICS = {
    "ppo": {
        "clip_low_fraction",
        "clip_high_fraction",
        "dual_clip_fraction",
        "ratio_mean",
        "ratio_max",
        "approx_kl_old",
        "eps_low_in_force",
        "eps_high_in_force",
    },
    "gppo": {
        "clip_low_fraction",
        "clip_high_fraction",
        "dual_clip_fraction",
        "preserved_gradient_low_fraction",
        "preserved_gradient_high_fraction",
        "ratio_mean",
        "ratio_max",
    },
    "cispo": {
        "cispo_weight_clipped_low_fraction",
        "cispo_weight_clipped_high_fraction",
        "ratio_mean",
        "ratio_max",
        "approx_kl_old",
    },
    "gspo": {"sequence_clip_low_fraction", "sequence_clip_high_fraction", "sequence_ratio_mean"},
    "clip_cov": {"cov_selected_fraction", "cov_mean", "clip_low_fraction", "clip_high_fraction"},
    "kl_cov": {"cov_selected_fraction", "cov_mean", "ratio_mean"},
}
EXPECTED_METRICS.update(
    grpo=EXPECTED_METRICS["ppo"],
    dapo=EXPECTED_METRICS["ppo"],
    dr_grpo=EXPECTED_METRICS["ppo"],
    ce_gppo=EXPECTED_METRICS["gppo"],
)


@pytest.mark.parametrize("name", ALL_OBJECTIVES)
def test_metric_names(name):
    batch = make_batch(
        REGION_RATIOS, REGION_ADVANTAGES, REGION_MASK, generator=torch.Generator().manual_seed(0)
    )
    _, _, metrics = run(name, batch, ControlState())
    expected = {f"objective/{key}" for key in EXPECTED_METRICS[name] | {"policy_loss"}}
    assert expected <= set(metrics)
