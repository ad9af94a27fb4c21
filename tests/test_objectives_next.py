"""SAPO, GMPO and DPPO (docs/algorithms.md; arXiv 2511.20347, 2507.20673, 2602.04879).

Every numeric vector of the spec is a test here (loss value and per-token gradient), and each
region of each objective (every clip or trust region, each sign of the advantage) is checked
against a reference written in this file, independently of the implementation: the closed-form
gradient of the spec, or torch autograd through the formula written inline. As in
test_objectives.py, ``logp`` is a float64 leaf, the loss goes through ``compute_loss``, and
``logp.grad`` is compared with ``w_t * g_t`` (``w_t`` the aggregation weight).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from rlvr_lightning.control import ControlState
from rlvr_lightning.objectives import (
    LossNormalizer,
    ObjectiveParams,
    PolicyBatch,
    compute_loss,
    get_objective,
)

DT = torch.float64
NEW_OBJECTIVES = ["sapo", "gmpo", "dppo"]
SPEC_ATOL = 1e-6  # the spec's vectors are printed with 6 decimals


# ----------------------------------------------------------------------------- helpers


def batch_from_ratios(ratios, advantages, mask=None, old_logp=None) -> PolicyBatch:
    """A batch whose ratio r = exp(logp - logp_old) equals ``ratios``; ``logp`` is a leaf."""
    ratio = torch.tensor(ratios, dtype=DT)
    old = torch.full_like(ratio, -1.0) if old_logp is None else torch.tensor(old_logp, dtype=DT)
    return batch_from_logp(old + ratio.log(), old, advantages, mask)


def batch_from_logp(logp, old_logp, advantages, mask=None) -> PolicyBatch:
    logp = torch.as_tensor(logp, dtype=DT).detach().clone().requires_grad_(True)
    old = torch.as_tensor(old_logp, dtype=DT)
    adv = torch.tensor(advantages, dtype=DT)
    mask = torch.ones_like(old, dtype=torch.bool) if mask is None else torch.tensor(mask).bool()
    return PolicyBatch(logp=logp, old_logp=old, advantages=adv, mask=mask)


def counts(batch: PolicyBatch, max_response_length=None) -> LossNormalizer:
    mask = batch.mask.to(DT)
    return LossNormalizer(
        num_tokens=float(mask.sum()),
        num_sequences=float(mask.shape[0]),
        max_response_length=max_response_length or mask.shape[1],
    )


def run(name, batch, control=None, options=None, aggregation=None, normalizer=None):
    """Loss, ``logp.grad`` and metrics of one backward pass through ``compute_loss``."""
    params = ObjectiveParams(
        aggregation=aggregation or get_objective(name).default_aggregation,
        options=dict(options or {}),
    )
    loss, metrics = compute_loss(
        name, batch, control or ControlState(), params, normalizer or counts(batch)
    )
    loss.backward()
    return loss.detach(), batch.logp.grad.detach().clone(), metrics


def close(actual, expected, atol=1e-12):
    rtol = 1e-9 if torch.as_tensor(actual).dtype == DT else 1e-6
    atol = atol if torch.as_tensor(actual).dtype == DT else max(atol, 1e-7)
    torch.testing.assert_close(
        torch.as_tensor(actual).to(DT), torch.as_tensor(expected, dtype=DT), rtol=rtol, atol=atol
    )


def spec_close(actual, expected):
    close(actual, expected, atol=SPEC_ATOL)


def seq_mean_token_mean_weights(mask, num_sequences=None):
    m = torch.tensor(mask, dtype=DT)
    return m / m.sum(-1, keepdim=True).clamp_min(1.0) / (num_sequences or m.shape[0])


# ----------------------------------------------------------------------------- registry


def test_registry_defaults():
    expected = {
        "sapo": "seq-mean-token-mean",
        "gmpo": "seq-mean-token-mean",
        "dppo": "seq-mean-token-sum-norm",
    }
    for name, mode in expected.items():
        spec = get_objective(name)
        assert spec.default_aggregation == mode, name
        # All three act only once the policy has moved away from pi_old.
        assert spec.uses_clipping, name
        assert "arXiv" in spec.doc, name


@pytest.mark.parametrize("name", NEW_OBJECTIVES)
def test_config_defaults(name):
    from tests.conftest import compose_config

    cfg = compose_config([f"objective={name}"])
    objective = cfg.objective
    assert objective.name == name
    assert objective.aggregation is None  # null: the registered default applies
    if name == "sapo":
        assert dict(objective.options) == {"sapo_tau_pos": 1.0, "sapo_tau_neg": 1.05}
        assert cfg.advantage.name == "grpo"
    if name == "gmpo":
        assert (objective.control.eps_low, objective.control.eps_high) == (0.4, 0.4)
        assert cfg.advantage.name == "grpo"
    if name == "dppo":
        assert dict(objective.options) == {
            "variant": "tv",
            "dppo_delta_low": None,
            "dppo_delta_high": None,
            "dppo_ratio_cap": 20.0,
        }
        assert cfg.advantage.name == "dr_grpo"


# ----------------------------------------------------------------------------- SAPO

SAPO_TAU_POS, SAPO_TAU_NEG = 1.0, 1.05

# (r, A, l_t, g_t) from the spec's SAPO table (tau_pos 1.0, tau_neg 1.05).
SAPO_VECTORS = [
    (1.0, 1.0, -2.0, -1.0),
    (1.5, 1.0, -2.489837, -1.410022),
    (3.0, 1.0, -3.523188, -1.259923),
    (0.5, 1.0, -1.510163, -0.470007),
    (1.5, -1.0, 2.393585, 1.401210),
    (0.5, -1.0, 1.415938, 0.467070),
    (1.0, -1.0, 1.904762, 1.0),
]


@pytest.mark.parametrize(("r", "a", "loss", "grad"), SAPO_VECTORS)
def test_sapo_token_vectors(r, a, loss, grad):
    batch = batch_from_ratios([[r]], [[a]])  # one token: every aggregation weight is 1
    value, g, _ = run("sapo", batch)
    spec_close(value, loss)
    spec_close(g[0, 0], grad)


def test_sapo_seq_mean_token_mean_vector():
    ratios = [[1.5, 0.5, 1.0], [1.5, 0.5, 1.0]]
    advantages = [[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]]
    mask = [[1, 1, 0], [1, 1, 1]]
    loss, grad, _ = run("sapo", batch_from_ratios(ratios, advantages, mask))
    spec_close(loss, -0.047619)
    spec_close(grad, [[-0.352506, -0.117502, 0.0], [0.233535, 0.077845, 0.166667]])
    assert grad[0, 2] == 0.0  # padding


def sapo_reference(r, a, tau_pos, tau_neg):
    """(l, g) of one token: l by the formula, g in closed form -A*r*sech^2(tau(r-1)/2)."""
    tau = tau_pos if a > 0 else tau_neg
    loss = -(4.0 / tau) / (1.0 + math.exp(-tau * (r - 1.0))) * a
    grad = -a * r / math.cosh(tau * (r - 1.0) / 2.0) ** 2
    return loss, grad


@pytest.mark.parametrize(("tau_pos", "tau_neg"), [(SAPO_TAU_POS, SAPO_TAU_NEG), (0.5, 4.0)])
def test_sapo_gradient_on_both_sides_of_one_for_both_signs(tau_pos, tau_neg):
    # No hard regions: r below, at and above 1 (far on both sides), for A > 0, A < 0 and A = 0.
    ratio_grid = [0.05, 0.5, 0.9, 1.0, 1.1, 1.28, 2.0, 6.0, 40.0]
    advantage_grid = [1.3, -0.7, 0.0]
    ratios = [ratio_grid for _ in advantage_grid]
    advantages = [[a] * len(ratio_grid) for a in advantage_grid]
    options = {"sapo_tau_pos": tau_pos, "sapo_tau_neg": tau_neg}
    loss, grad, _ = run("sapo", batch_from_ratios(ratios, advantages), options=options)

    reference = [
        [sapo_reference(r, a, tau_pos, tau_neg) for r in ratio_grid] for a in advantage_grid
    ]
    expected_l = torch.tensor([[lg[0] for lg in row] for row in reference], dtype=DT)
    expected_g = torch.tensor([[lg[1] for lg in row] for row in reference], dtype=DT)
    w = seq_mean_token_mean_weights([[1] * len(ratio_grid)] * len(advantage_grid))
    close(grad, w * expected_g)
    close(loss, (w * expected_l).sum())
    # The gate never amplifies the unclipped PPO gradient -A*r, and is exactly 1 at r = 1.
    ppo_grad = -torch.tensor(advantages, dtype=DT) * torch.tensor(ratios, dtype=DT)
    assert (expected_g.abs() <= ppo_grad.abs() + 1e-15).all()
    close(expected_g[:, 3], ppo_grad[:, 3])


def test_sapo_gradient_matches_autograd_of_the_formula():
    ratios = [[0.3, 0.8, 1.0, 1.2, 2.5], [0.6, 1.0, 1.05, 1.7, 9.0]]
    advantages = [[0.8, 0.8, 0.8, 0.8, 0.8], [-1.5, -1.5, -1.5, -1.5, -1.5]]
    mask = [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    batch = batch_from_ratios(ratios, advantages, mask)
    loss, grad, _ = run("sapo", batch)

    logp = batch.logp.detach().clone().requires_grad_(True)
    r = torch.exp(logp - batch.old_logp)
    a = batch.advantages
    tau = torch.where(a > 0, torch.tensor(1.0, dtype=DT), torch.tensor(1.05, dtype=DT))
    per_token = -(4.0 / tau) * torch.sigmoid(tau * (r - 1.0)) * a
    m = batch.mask.to(DT)
    reference = ((per_token * m).sum(-1) / m.sum(-1)).mean()
    reference.backward()
    close(loss, reference.detach())
    close(grad, logp.grad)


def test_sapo_forward_symmetry():
    # f(1+d) + f(1-d) = 4/tau, on each side of the advantage.
    for a, tau in ((1.0, SAPO_TAU_POS), (-1.0, SAPO_TAU_NEG)):
        for d in (0.1, 0.5, 0.9):
            loss, _, _ = run("sapo", batch_from_ratios([[1 + d, 1 - d]], [[a, a]]))
            close(loss * 2 / -a, 4.0 / tau)  # seq mean of the two tokens' -l/A


def test_sapo_metrics():
    # A > 0 at r = 1 (weight 1) and r = 4 (attenuated); A < 0 at r = 0.5; a padded A < 0 token.
    ratios = [[1.0, 4.0, 0.5], [0.5, 30.0, 1.0]]
    advantages = [[1.0, 1.0, -1.0], [-1.0, -1.0, -1.0]]
    mask = [[1, 1, 1], [1, 0, 0]]
    _, _, metrics = run("sapo", batch_from_ratios(ratios, advantages, mask))

    def weight(r, tau):
        return r / math.cosh(tau * (r - 1) / 2) ** 2

    close(metrics["objective/sapo_weight_mean_pos"], (weight(1.0, 1.0) + weight(4.0, 1.0)) / 2)
    close(metrics["objective/sapo_weight_mean_neg"], weight(0.5, 1.05))
    # Only r = 4 has sech^2 < 0.5 among valid tokens (the padded r = 30 does not count).
    assert 1 / math.cosh(1.5) ** 2 < 0.5 < 1 / math.cosh(1.05 * 0.25) ** 2
    close(metrics["objective/sapo_attenuated_fraction"], 1 / 4)
    close(metrics["objective/ratio_mean"], (1.0 + 4.0 + 0.5 + 0.5) / 4)
    close(metrics["objective/ratio_max"], 4.0)


def test_sapo_zero_advantage_takes_tau_neg():
    # At r = 2.72 the gate is 0.51 with tau 1.0 and 0.487 with tau 1.05: only tau_neg attenuates.
    assert 1 / math.cosh(1.0 * 1.72 / 2) ** 2 > 0.5 > 1 / math.cosh(1.05 * 1.72 / 2) ** 2
    loss, grad, metrics = run("sapo", batch_from_ratios([[2.72]], [[0.0]]))
    close(metrics["objective/sapo_attenuated_fraction"], 1.0)
    assert loss == 0 and grad[0, 0] == 0


@pytest.mark.parametrize("key", ["sapo_tau_pos", "sapo_tau_neg"])
def test_sapo_rejects_non_positive_temperature(key):
    with pytest.raises(ValueError, match=f"objective.options.{key}=0.0"):
        run("sapo", batch_from_ratios([[1.0]], [[1.0]]), options={key: 0.0})


# ----------------------------------------------------------------------------- GMPO

GMPO_EPS = ControlState(eps_low=0.4, eps_high=0.4)


def test_gmpo_vector_positive_advantage():
    ell = [[0.1, 0.5, -0.6, 0.0]]
    loss, grad, metrics = run(
        "gmpo", batch_from_ratios(torch.tensor(ell).exp().tolist(), [[1.0] * 4]), GMPO_EPS
    )
    spec_close(loss, -0.975310)
    spec_close(grad, [[-0.243827, 0.0, -0.243827, -0.243827]])
    spec_close(metrics["objective/sequence_ratio_mean"], 0.975310)


def test_gmpo_vector_negative_advantage():
    ell = [[0.1, 0.5, -0.6, 0.0]]
    loss, grad, metrics = run(
        "gmpo", batch_from_ratios(torch.tensor(ell).exp().tolist(), [[-1.0] * 4]), GMPO_EPS
    )
    spec_close(loss, 1.051271)
    spec_close(grad, [[0.262818, 0.262818, 0.0, 0.262818]])
    spec_close(metrics["objective/sequence_ratio_mean"], 1.051271)


def test_gmpo_vector_both_sequences_one_batch():
    ell = [[0.1, 0.5, -0.6, 0.0]] * 2
    ratios = torch.tensor(ell, dtype=DT).exp().tolist()
    loss, grad, metrics = run("gmpo", batch_from_ratios(ratios, [[1.0] * 4, [-1.0] * 4]), GMPO_EPS)
    spec_close(loss, 0.037981)
    spec_close(grad, [[-0.121914, 0.0, -0.121914, -0.121914], [0.131409, 0.131409, 0.0, 0.131409]])
    # Ours counts only gradient-cut tokens (verl would report 0.25 for each).
    close(metrics["objective/clip_high_fraction"], 0.125)
    close(metrics["objective/clip_low_fraction"], 0.125)
    spec_close(metrics["objective/sequence_ratio_max"], 1.051271)


def test_gmpo_vector_three_tokens():
    ell = [[0.2, -0.1, 0.45]]
    loss, grad, metrics = run(
        "gmpo", batch_from_ratios(torch.tensor(ell, dtype=DT).exp().tolist(), [[2.0] * 3]), GMPO_EPS
    )
    spec_close(metrics["objective/sequence_ratio_mean"], 1.181360)
    spec_close(loss, -2.362721)
    spec_close(grad, [[-0.787574, -0.787574, 0.0]])


def gmpo_reference(ell, advantages, mask, eps_low, eps_high):
    """Loss and logp-gradient by autograd through the spec's formula, written inline."""
    ell = torch.tensor(ell, dtype=DT).requires_grad_(True)
    a = torch.tensor(advantages, dtype=DT)
    m = torch.tensor(mask, dtype=DT)
    s = torch.sign(a)
    clipped = s * torch.minimum(s * ell, s * torch.clamp(ell, -eps_low, eps_high))
    lengths = m.sum(-1)
    sequence_ratio = torch.exp((clipped * m).sum(-1) / lengths)
    sequence_advantage = (a * m).sum(-1) / lengths
    loss = (-sequence_advantage * sequence_ratio).mean()  # B = number of sequences
    loss.backward()
    return loss.detach(), ell.grad, sequence_ratio.detach(), sequence_advantage


# One sequence per region (cut tokens marked *), asymmetric bounds eps_low 0.3, eps_high 0.5:
#   0: A > 0, all inside the band
#   1: A > 0, clip-high* (0.7 > 0.5) next to inside tokens
#   2: A > 0, far below -eps_low (kept: the pessimistic side) and a clip-high*
#   3: A < 0, all inside
#   4: A < 0, clip-low* (-0.45 < -0.3) next to inside tokens
#   5: A < 0, far above eps_high (kept) and a clip-low*, with a padded slot that would be cut
#   6: A = 0 (no gradient, R = 1)
GMPO_ELL = [
    [0.1, -0.2, 0.25, 0.0],
    [0.7, 0.1, -0.1, 0.2],
    [-1.2, 0.9, 0.05, -0.05],
    [-0.25, 0.15, 0.45, 0.0],
    [-0.45, 0.2, 0.0, -0.1],
    [1.5, -0.9, 0.3, -2.0],
    [0.6, -0.6, 0.1, 0.0],
]
GMPO_ADV = [1.2, 0.5, 2.0, -0.8, -1.0, -0.3, 0.0]
GMPO_MASK = [
    [1, 1, 1, 1],
    [1, 1, 1, 0],
    [1, 1, 1, 1],
    [1, 1, 0, 0],
    [1, 1, 1, 1],
    [1, 1, 1, 0],
    [1, 1, 1, 1],
]
GMPO_CUT = [
    [0, 0, 0, 0],
    [1, 0, 0, 0],
    [0, 1, 0, 0],
    [0, 0, 0, 0],
    [1, 0, 0, 0],
    [0, 1, 0, 0],
    [0, 0, 0, 0],
]


def test_gmpo_regions_match_autograd_and_closed_form():
    eps_low, eps_high = 0.3, 0.5
    advantages = [[a] * 4 for a in GMPO_ADV]
    ratios = torch.tensor(GMPO_ELL, dtype=DT).exp().tolist()
    control = ControlState(eps_low=eps_low, eps_high=eps_high)
    loss, grad, metrics = run("gmpo", batch_from_ratios(ratios, advantages, GMPO_MASK), control)

    ref_loss, ref_grad, ref_ratio, ref_adv = gmpo_reference(
        GMPO_ELL, advantages, GMPO_MASK, eps_low, eps_high
    )
    m = torch.tensor(GMPO_MASK, dtype=DT)
    close(loss, ref_loss)
    close(grad, ref_grad * m)

    # Closed form of the spec's region table: -A_i*R_i with weight 1/(B*L_i), 0 on a cut token.
    cut = torch.tensor(GMPO_CUT, dtype=torch.bool)
    weights = seq_mean_token_mean_weights(GMPO_MASK)
    closed = torch.where(cut, torch.zeros_like(m), -(ref_adv * ref_ratio).unsqueeze(-1) * weights)
    close(grad, closed)
    # Every region: cut tokens have no gradient; kept ones (both pessimistic sides too) do.
    assert (grad[cut] == 0).all()
    assert (grad[:6][~cut[:6] & m[:6].bool()] != 0).all()
    assert (grad[6] == 0).all()
    close(ref_ratio[6], 1.0)

    n = m.sum()
    close(metrics["objective/clip_high_fraction"], 2 / n)  # rows 1 and 2
    close(metrics["objective/clip_low_fraction"], 2 / n)  # rows 4 and 5 (row 5's pad excluded)
    close(metrics["objective/sequence_ratio_mean"], ref_ratio.mean())
    close(metrics["objective/sequence_ratio_max"], ref_ratio.max())
    close(metrics["objective/eps_low_in_force"], eps_low)
    close(metrics["objective/eps_high_in_force"], eps_high)


def test_gmpo_cut_token_still_scales_the_others():
    # Raising a cut token's log-ratio further changes nothing (it enters R at its bound).
    base = [[0.6, 0.1]]
    further = [[1.6, 0.1]]
    grads = []
    for ell in (base, further):
        _, grad, _ = run(
            "gmpo",
            batch_from_ratios(torch.tensor(ell, dtype=DT).exp().tolist(), [[1.0, 1.0]]),
            GMPO_EPS,
        )
        grads.append(grad)
    close(grads[0], grads[1])
    close(grads[0][0, 1], -math.exp((0.4 + 0.1) / 2) / 2)


# ----------------------------------------------------------------------------- DPPO

# (p_mu, p, A, r, TV masked, KL D, KL masked, g TV, g KL) from the spec's DPPO table.
DPPO_TABLE = [
    (0.30, 0.50, 1, 1.666667, True, 0.082283, True, 0.0, 0.0),
    (0.30, 0.40, 1, 1.333333, False, 0.021601, False, -1.333333, -1.333333),
    (0.80, 0.60, -1, 0.75, True, 0.091516, True, 0.0, 0.0),
    (0.05, 0.01, -1, 0.2, False, 0.041291, False, 0.2, 0.2),
    (0.01, 0.30, 1, 30.0, True, 0.309146, True, 0.0, 0.0),
    (0.90, 0.50, 1, 0.555556, False, 0.368064, False, -0.555556, -0.555556),
    (0.001, 0.05, -1, 50.0, False, 0.046330, False, 20.0, 20.0),
    (0.90, 0.99, 1, 1.1, False, 0.144479, True, -1.1, 0.0),
    (0.99, 0.90, -1, 0.909091, False, 0.071331, True, 0.909091, 0.0),
]


def dppo_batch(p_mu, p, a, mask=None) -> PolicyBatch:
    return batch_from_logp(
        torch.tensor(p, dtype=DT).log(), torch.tensor(p_mu, dtype=DT).log(), a, mask
    )


def sum_norm_weights(mask, max_response_length):
    m = torch.tensor(mask, dtype=DT)
    return m / (m.shape[0] * max_response_length)


@pytest.mark.parametrize("variant", ["tv", "kl"])
@pytest.mark.parametrize("row", DPPO_TABLE, ids=[f"row{i}" for i in range(len(DPPO_TABLE))])
def test_dppo_table_row(row, variant):
    p_mu, p, a, r, tv_masked, kl_d, kl_masked, g_tv, g_kl = row
    spec_close(p / p_mu, r)
    batch = dppo_batch([[p_mu]], [[p]], [[float(a)]])
    loss, grad, metrics = run("dppo", batch, options={"variant": variant})
    masked, g = (tv_masked, g_tv) if variant == "tv" else (kl_masked, g_kl)
    # One token, seq-mean-token-sum-norm over B = 1 and L_max = 1: w = 1.
    spec_close(grad[0, 0], g)
    # Value -A*k*min(r, C).
    spec_close(loss, 0.0 if masked else -a * min(p / p_mu, 20.0))
    side = "high" if a > 0 else "low"
    close(metrics[f"objective/dppo_masked_{side}_fraction"], float(masked))
    if variant == "kl":
        spec_close(metrics["objective/dppo_divergence_mean"], kl_d)
    else:
        close(metrics["objective/dppo_divergence_mean"], abs(p - p_mu))
    close(metrics["objective/dppo_ratio_truncated_fraction"], float(not masked and p / p_mu > 20))


@pytest.mark.parametrize("variant", ["tv", "kl"])
def test_dppo_table_as_one_batch(variant):
    # All rows in one sequence with padding, default aggregation seq-mean-token-sum-norm.
    p_mu = [[row[0] for row in DPPO_TABLE] + [0.5]]
    p = [[row[1] for row in DPPO_TABLE] + [0.99]]
    advantages = [[float(row[2]) for row in DPPO_TABLE] + [1.0]]
    mask = [[1] * len(DPPO_TABLE) + [0]]
    batch = dppo_batch(p_mu, p, advantages, mask)
    normalizer = counts(batch, max_response_length=16)
    loss, grad, metrics = run("dppo", batch, options={"variant": variant}, normalizer=normalizer)
    column = 7 if variant == "tv" else 8
    g = torch.tensor([[row[column] for row in DPPO_TABLE] + [0.0]], dtype=DT)
    w = sum_norm_weights(mask, 16)
    spec_close(grad, w * g)
    masked_column = 4 if variant == "tv" else 6
    kept = [not row[masked_column] for row in DPPO_TABLE]
    values = [
        -row[2] * min(row[1] / row[0], 20.0) * k for row, k in zip(DPPO_TABLE, kept, strict=True)
    ]
    close(loss, sum(values) / 16)
    high = sum(row[masked_column] and row[2] > 0 for row in DPPO_TABLE)
    low = sum(row[masked_column] and row[2] < 0 for row in DPPO_TABLE)
    close(metrics["objective/dppo_masked_high_fraction"], high / 9)
    close(metrics["objective/dppo_masked_low_fraction"], low / 9)
    close(metrics["objective/dppo_ratio_truncated_fraction"], 1 / 9)  # the r = 50 row


def binary_kl(p_mu, p):
    return p_mu * math.log(p_mu / p) + (1 - p_mu) * math.log((1 - p_mu + 1e-8) / (1 - p + 1e-8))


def dppo_reference(p_mu, p, a, variant, delta_low, delta_high, cap):
    """Closed-form g of the spec: -A*min(r, C) inside the trust region, 0 when masked."""
    if variant == "tv":
        masked = (a > 0 and p - p_mu > delta_high) or (a < 0 and p_mu - p > delta_low)
    else:
        d = binary_kl(p_mu, p)
        masked = (a > 0 and p > p_mu and d > delta_high) or (a < 0 and p < p_mu and d > delta_low)
    return 0.0 if masked else -a * min(p / p_mu, cap)


# Region grid: for each sign of A, the probability rises a little, rises a lot, falls a little,
# falls a lot, and (ratio > C) rises from a tiny anchor. Asymmetric deltas and a small C show
# that each side reads its own threshold.
DPPO_REGION_PAIRS = [
    (0.40, 0.45),  # rises a little
    (0.20, 0.70),  # rises a lot
    (0.60, 0.55),  # falls a little
    (0.80, 0.10),  # falls a lot
    (0.0005, 0.0075),  # r = 15 > C = 8, small TV and KL change
    (0.97, 0.999),  # rises a little in TV, a lot in KL
    (0.999, 0.97),  # falls a little in TV, a lot in KL
]


@pytest.mark.parametrize("variant", ["tv", "kl"])
@pytest.mark.parametrize(("delta_low", "delta_high"), [(0.1, 0.3), (0.3, 0.02)])
def test_dppo_regions_against_closed_form(variant, delta_low, delta_high):
    cap = 8.0
    p_mu = [[pair[0] for pair in DPPO_REGION_PAIRS]] * 2
    p = [[pair[1] for pair in DPPO_REGION_PAIRS]] * 2
    advantages = [[0.7] * len(DPPO_REGION_PAIRS), [-1.3] * len(DPPO_REGION_PAIRS)]
    options = {
        "variant": variant,
        "dppo_delta_low": delta_low,
        "dppo_delta_high": delta_high,
        "dppo_ratio_cap": cap,
    }
    batch = dppo_batch(p_mu, p, advantages)
    loss, grad, metrics = run("dppo", batch, options=options, aggregation="token-mean")

    g = torch.tensor(
        [
            [
                dppo_reference(m, q, a[0], variant, delta_low, delta_high, cap)
                for m, q in zip(pm, pp, strict=True)
            ]
            for pm, pp, a in zip(p_mu, p, advantages, strict=True)
        ],
        dtype=DT,
    )
    n = g.numel()
    close(grad, g / n)
    # The value equals -A*k*min(r, C) = g (for a kept token) and 0 when masked.
    close(loss, g.sum() / n)
    # Every region occurs in the grid: both signs are masked somewhere and kept somewhere.
    for row in range(2):
        assert (g[row] == 0).any() and (g[row] != 0).any()
    # A token whose probability moves against its advantage is never masked.
    falls_for_pos = [i for i, (m, q) in enumerate(DPPO_REGION_PAIRS) if q < m]
    rises_for_neg = [i for i, (m, q) in enumerate(DPPO_REGION_PAIRS) if q > m]
    assert (g[0, falls_for_pos] != 0).all() and (g[1, rises_for_neg] != 0).all()
    # The r = 15 token is truncated at C on both signs.
    close(grad[:, 4], torch.tensor([-0.7 * cap, 1.3 * cap], dtype=DT) / n)
    close(metrics["objective/dppo_ratio_truncated_fraction"], 2 / n)
    close(metrics["objective/dppo_delta_low_in_force"], delta_low)
    close(metrics["objective/dppo_delta_high_in_force"], delta_high)


def test_dppo_gradient_matches_autograd_of_the_value_formula():
    # Autograd through the spec's l = -A * k * sg(min(r, C) / r) * r, with k from the TV rule.
    p_mu = torch.tensor([[0.3, 0.3, 0.8, 0.05, 0.001, 0.9]], dtype=DT)
    p = torch.tensor([[0.5, 0.4, 0.6, 0.01, 0.05, 0.5]], dtype=DT)
    a = torch.tensor([[1.0, 2.0, -1.0, -0.5, -1.0, 1.0]], dtype=DT)
    batch = dppo_batch(p_mu.tolist(), p.tolist(), a.tolist())
    loss, grad, _ = run("dppo", batch, aggregation="token-mean")

    logp = p.log().requires_grad_(True)
    r = torch.exp(logp - p_mu.log())
    k = 1.0 - (((a > 0) & (p - p_mu > 0.15)) | ((a < 0) & (p_mu - p > 0.15))).to(DT)
    reference = (-a * k * (torch.clamp(r, max=20.0) / r).detach() * r).mean()
    reference.backward()
    close(loss, reference.detach())
    close(grad, logp.grad)


def test_dppo_variant_is_validated():
    batch = dppo_batch([[0.5]], [[0.5]], [[1.0]])
    with pytest.raises(ValueError, match="objective.options.variant='js'") as error:
        run("dppo", batch, options={"variant": "js"})
    assert "'tv'" in str(error.value) and "'kl'" in str(error.value)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"dppo_delta_low": -0.1}, "objective.options.dppo_delta_low=-0.1"),
        ({"dppo_delta_high": -1.0}, "objective.options.dppo_delta_high=-1.0"),
        ({"dppo_ratio_cap": 0.0}, "objective.options.dppo_ratio_cap=0.0"),
    ],
)
def test_dppo_rejects_bad_thresholds(options, message):
    with pytest.raises(ValueError, match=message):
        run("dppo", dppo_batch([[0.5]], [[0.5]], [[1.0]]), options=options)


@pytest.mark.parametrize(("variant", "delta"), [("tv", 0.15), ("kl", 0.05)])
def test_dppo_null_delta_takes_the_variant_default(variant, delta):
    options = {"variant": variant, "dppo_delta_low": None, "dppo_delta_high": None}
    _, _, metrics = run("dppo", dppo_batch([[0.5]], [[0.5]], [[1.0]]), options=options)
    close(metrics["objective/dppo_delta_low_in_force"], delta)
    close(metrics["objective/dppo_delta_high_in_force"], delta)


# ----------------------------------------------------------------------------- all three


MICRO_RATIOS = [
    [1.1, 1.9, 0.5, 0.7],
    [0.9, 1.3, 1.05, 1.0],
    [1.18, 0.95, 0.6, 2.0],
    [1.0, 1.15, 0.85, 1.6],
]
MICRO_ADVANTAGES = [[1.0] * 4, [-0.5] * 4, [0.3] * 4, [-1.2] * 4]
MICRO_MASK = [[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]]
MICRO_OLD_LOGP = [
    [-1.0, -0.6, -2.0, -0.4],
    [-0.2, -1.5, -0.9, -3.0],
    [-0.3, -1.0, -1.0, -0.1],
    [-2.5, -0.7, -0.5, -0.8],
]


@pytest.mark.parametrize("name", NEW_OBJECTIVES)
def test_micro_batch_invariance(name):
    control = ControlState(eps_low=0.2, eps_high=0.2)
    full = batch_from_ratios(MICRO_RATIOS, MICRO_ADVANTAGES, MICRO_MASK, MICRO_OLD_LOGP)
    normalizer = counts(full, max_response_length=6)
    loss_full, grad_full, _ = run(name, full, control, normalizer=normalizer)
    assert (grad_full != 0).any()
    loss_sum, grads = torch.zeros((), dtype=DT), []
    for rows in (slice(0, 1), slice(1, 4)):
        part = batch_from_ratios(
            MICRO_RATIOS[rows], MICRO_ADVANTAGES[rows], MICRO_MASK[rows], MICRO_OLD_LOGP[rows]
        )
        loss, grad, _ = run(name, part, control, normalizer=normalizer)
        loss_sum, grads = loss_sum + loss, grads + [grad]
    close(torch.cat(grads), grad_full)
    close(loss_sum, loss_full)


@pytest.mark.parametrize("name", NEW_OBJECTIVES)
def test_log_ratio_clamp_keeps_values_finite(name):
    # logp - logp_old = +-30, beyond the +-20 clamp.
    old = torch.tensor([[-30.0, -30.0, -0.5, -0.5]], dtype=DT)
    batch = batch_from_logp(
        old + torch.tensor([[30.0, 30.0, -30.0, -30.0]], dtype=DT), old, [[1.0, -1.0, 1.0, -1.0]]
    )
    loss, grad, metrics = run(name, batch)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert all(torch.isfinite(v).all() for v in metrics.values())


@pytest.mark.parametrize("name", NEW_OBJECTIVES)
def test_erc_masks_the_new_objectives_per_token(name):
    # ERC detaches out-of-band tokens: only their own gradient is removed.
    ratios = [[1.1, 0.9, 1.05, 1.3]]
    advantages = [[1.0, 1.0, 1.0, 1.0]]
    old_entropy = torch.ones(1, 4, dtype=DT)
    entropy = torch.tensor([[1.0, 1.2, 1.0, 1.0]], dtype=DT)  # token 1 out of band
    plain = batch_from_ratios(ratios, advantages)
    _, grad_plain, _ = run(name, plain)
    banded = batch_from_ratios(ratios, advantages)
    banded.entropy, banded.old_entropy = entropy, old_entropy
    control = ControlState(erc_beta_low=0.05, erc_beta_high=0.05)
    _, grad_banded, _ = run(name, banded, control)
    expected = grad_plain.clone()
    expected[0, 1] = 0.0
    close(grad_banded, expected)


EXPECTED_METRICS = {
    "sapo": {
        "sapo_weight_mean_pos",
        "sapo_weight_mean_neg",
        "sapo_attenuated_fraction",
        "ratio_mean",
        "ratio_max",
    },
    "gmpo": {
        "clip_low_fraction",
        "clip_high_fraction",
        "sequence_ratio_mean",
        "sequence_ratio_max",
    },
    "dppo": {
        "dppo_masked_high_fraction",
        "dppo_masked_low_fraction",
        "dppo_divergence_mean",
        "dppo_ratio_truncated_fraction",
    },
}


@pytest.mark.parametrize("name", NEW_OBJECTIVES)
def test_metric_names(name):
    batch = batch_from_ratios(MICRO_RATIOS, MICRO_ADVANTAGES, MICRO_MASK, MICRO_OLD_LOGP)
    _, _, metrics = run(name, batch)
    expected = {f"objective/{key}" for key in EXPECTED_METRICS[name] | {"policy_loss"}}
    assert expected <= set(metrics)


# ----------------------------------------------------------------------------- end to end


@pytest.mark.parametrize(
    ("name", "extra"),
    [("sapo", []), ("gmpo", []), ("dppo", []), ("dppo", ["objective.options.variant=kl"])],
)
def test_trains_through_the_entry_point(name, extra, tmp_path: Path):
    from rlvr_lightning.train import run as train_run
    from tests.conftest import TINY_OVERRIDES, compose_config, read_scalars

    overrides = TINY_OVERRIDES + [
        "validate_before_training=false",
        "trainer.max_steps=2",
        "rollout.epochs=2",
        f"objective={name}",
        # Coin-flip rewards and a large step: non-zero advantages, and the ratio leaves 1.
        "reward.random_reward_probability=0.5",
        "optim.lr=1e-2",
        *extra,
    ]
    train_run(compose_config(overrides), run_dir=tmp_path / "x")
    ratio_tag = {
        "sapo": "objective/ratio_max",
        "gmpo": "objective/sequence_ratio_max",
        "dppo": "objective/ratio_max",
    }
    scalars = read_scalars(tmp_path / "x")
    for key in EXPECTED_METRICS[name] | {"policy_loss"}:
        tag = f"objective/{key}"
        assert tag in scalars, f"{name}: {tag} missing; have {sorted(scalars)}"
        assert [step for step, _ in scalars[tag]] == [0, 1], tag
        assert all(math.isfinite(value) for _, value in scalars[tag]), tag
        if key.endswith("_fraction"):
            assert all(0.0 <= value <= 1.0 for _, value in scalars[tag]), tag
    assert "optim/loss" in scalars
    # The metrics come from real updates away from pi_old.
    assert any(value > 1.0 for _, value in scalars[ratio_tag[name]]), scalars[ratio_tag[name]]
    if name == "dppo":
        delta = 0.05 if extra else 0.15
        values = [value for _, value in scalars["objective/dppo_delta_high_in_force"]]
        assert all(abs(value - delta) < 1e-6 for value in values), values
