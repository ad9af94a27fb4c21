"""Schedules and the entropy controller against docs/algorithms.md sections 4.2 to 4.4.

The expected bounds are written out from the formulas here, independently of the mixing
weights the schedules write, and compared with what ``ControlState.clip_bounds`` produces.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import torch

from rlvr_lightning.control import ControlState
from rlvr_lightning.schedulers import (
    BetaStages,
    ConstantSchedule,
    ControlCallback,
    CosineSchedule,
    DecreaseIncreaseDecrease,
    IncreaseThenDecrease,
    LinearSchedule,
    OscillatoryDecay,
    StepInfo,
    TargetEntropy,
)

EPS_LOW, EPS_HIGH = 0.2, 0.28  # asymmetric, so a swapped eps_std shows up
PROBS = torch.tensor([0.001, 0.2, 0.5, 0.8, 0.999], dtype=torch.float64)
CONF = Path(__file__).resolve().parents[1] / "rlvr_lightning" / "conf" / "scheduler"

# The PI controller on the clip bounds, as these tests were written for: no derivative term and
# integration at any error, no momentum lead (the shipped defaults drive the entropy coefficient, see
# tests/test_entropy_coef.py).
CLIP_PI = dict(actuator="clip", kp=0.2, ki=0.08, kd=0.0, integral_band=None, lead=0.0)


def clip_pi(**options) -> TargetEntropy:
    return TargetEntropy(**(CLIP_PI | options))


def step(k: int, total: int = 20, entropy: float = 1.0) -> StepInfo:
    return StepInfo(step=k, total_steps=total, rollout_entropy=entropy, reward_mean=0.5)


def upper_shape(p: torch.Tensor) -> torch.Tensor:
    """H(p) of section 4.2 with the third-party defaults, from its closed form
    r <= (1 + beta_h) / (1 - alpha_h * p_old)."""
    return ((1 + 0.5) / (1 + 0.25 * p) - 1).clamp(0.05, 0.6)


def lower_shape(p: torch.Tensor) -> torch.Tensor:
    """M(p) of section 4.2 with the third-party defaults, from its closed form
    r >= (1 - beta_l) / (1 + alpha_l * p_old)."""
    return (1 - (1 - 0.3) / (1 - 0.13 * p)).clamp(0.05, 0.6)


def bounds_after(callback: ControlCallback, control: ControlState, info: StepInfo):
    callback.update(control, info)
    return control.clip_bounds(PROBS.log())


def reload(callback: ControlCallback) -> dict:
    """The callback's state after a trip through torch.save/torch.load, as in a checkpoint."""
    buffer = io.BytesIO()
    torch.save(callback.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# ----------------------------------------------------------------------------- ID / DID


def expected_id(k: int, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    lam = 1 - 2 * k / total
    if k <= total / 2:
        e_plus = lam * upper_shape(PROBS) + (1 - lam) * EPS_HIGH
        e_minus = torch.full_like(PROBS, EPS_LOW)
    else:
        e_plus = torch.full_like(PROBS, EPS_HIGH)
        e_minus = (1 + lam) * lower_shape(PROBS) - lam * EPS_LOW
    return e_minus, e_plus


def expected_did(k: int, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    lam = 1 - 2 * k / total
    if k <= total / 2:
        e_plus = lam * EPS_HIGH + (1 - lam) * upper_shape(PROBS)
        e_minus = torch.full_like(PROBS, EPS_LOW)
    else:
        e_plus = upper_shape(PROBS)
        e_minus = (1 + lam) * lower_shape(PROBS) - lam * EPS_LOW
    return e_minus, e_plus


@pytest.mark.parametrize(
    "schedule_cls, expected",
    [(IncreaseThenDecrease, expected_id), (DecreaseIncreaseDecrease, expected_did)],
)
def test_phased_schedules_follow_section_4_3(schedule_cls, expected):
    total = 20
    schedule = schedule_cls()
    control = ControlState(eps_low=EPS_LOW, eps_high=EPS_HIGH)
    for k in range(total + 1):
        e_minus, e_plus = bounds_after(schedule, control, step(k, total))
        want_minus, want_plus = expected(k, total)
        torch.testing.assert_close(e_minus, want_minus, msg=f"E- at k={k}")
        torch.testing.assert_close(e_plus, want_plus, msg=f"E+ at k={k}")
        assert control.info["schedule_phase"] == (0.0 if k <= total / 2 else 1.0)
        assert control.info["schedule_lambda"] == pytest.approx(1 - 2 * k / total)
        # The plain eps are restored, never drift.
        assert (control.eps_low, control.eps_high) == (EPS_LOW, EPS_HIGH)


def test_id_ends_of_the_run():
    """k=0: E+ = H(p); k=T/2: both plain; just after: E- near M(p); k=T: both plain again."""
    schedule = IncreaseThenDecrease()
    control = ControlState(eps_low=EPS_LOW, eps_high=EPS_HIGH)
    e_minus, e_plus = bounds_after(schedule, control, step(0))
    torch.testing.assert_close(e_plus, upper_shape(PROBS))
    e_minus, e_plus = bounds_after(schedule, control, step(10))
    torch.testing.assert_close(e_plus, torch.full_like(PROBS, EPS_HIGH))
    torch.testing.assert_close(e_minus, torch.full_like(PROBS, EPS_LOW))
    e_minus, e_plus = bounds_after(schedule, control, step(11))
    torch.testing.assert_close(e_minus, 0.9 * lower_shape(PROBS) + 0.1 * EPS_LOW)
    e_minus, e_plus = bounds_after(schedule, control, step(20))
    torch.testing.assert_close(e_plus, torch.full_like(PROBS, EPS_HIGH))
    torch.testing.assert_close(e_minus, torch.full_like(PROBS, EPS_LOW))


def test_phase_split_moves_the_switch():
    total, split = 100, 0.3
    schedule = IncreaseThenDecrease(phase_split=split)
    control = ControlState(eps_low=EPS_LOW, eps_high=EPS_HIGH)
    lambdas = []
    for k in range(total + 1):
        schedule.update(control, step(k, total))
        lambdas.append(control.info["schedule_lambda"])
        assert control.info["schedule_phase"] == (0.0 if k <= 30 else 1.0)
        if k <= 30:
            assert control.high_prob_weight == pytest.approx(1 - k / 30)
            assert control.low_prob_weight == 0.0
        else:
            assert control.high_prob_weight == 0.0
            assert control.low_prob_weight == pytest.approx(1 - (k - 30) / 70)
    assert lambdas[0] == 1.0 and lambdas[30] == pytest.approx(0.0) and lambdas[-1] == -1.0
    assert all(b < a for a, b in zip(lambdas, lambdas[1:], strict=False))


def test_schedules_do_not_drift_from_the_first_plain_eps():
    """Someone else writing eps after the first update does not shift eps_std."""
    schedule = DecreaseIncreaseDecrease()
    control = ControlState(eps_low=EPS_LOW, eps_high=EPS_HIGH)
    schedule.update(control, step(0))
    control.eps_high, control.eps_low = 0.9, 0.9
    schedule.update(control, step(5))
    assert (control.eps_low, control.eps_high) == (EPS_LOW, EPS_HIGH)


# ----------------------------------------------------------------------------- OD


def test_oscillatory_decay_hysteresis():
    total, h_init = 100, 2.0
    # tau_low = 0.4, tau_high(k) = 0.4 + 1.6 * (1 - k/100).
    trace = [
        (0, 2.0, -1),  # between thresholds at k=0: the documented initial state, suppress
        (1, 1.5, -1),  # in between: keep
        (2, 0.4, 1),  # <= tau_low: boost
        (3, 1.0, 1),  # in between: keep boost
        (4, 1.9, 1),  # tau_high(4) = 1.936: still in between
        (5, 1.95, -1),  # tau_high(5) = 1.92: above, suppress
        (6, 0.41, -1),  # just above tau_low: keep suppress
        (50, 0.3, 1),  # below tau_low: boost
        (80, 0.7, 1),  # tau_high(80) = 0.72: in between
        (81, 0.71, -1),  # tau_high(81) = 0.704: above, suppress
        (99, 0.42, -1),  # tau_high(99) = 0.416: above, suppress
    ]
    schedule = OscillatoryDecay()
    control = ControlState(eps_low=EPS_LOW, eps_high=EPS_HIGH)
    for k, entropy, want in trace:
        e_minus, e_plus = bounds_after(schedule, control, step(k, total, entropy))
        assert control.info["od_state"] == want, f"k={k}, H={entropy}"
        assert control.info["od_tau_low"] == pytest.approx(0.2 * h_init)
        assert control.info["od_tau_high"] == pytest.approx(0.4 + 1.6 * (1 - k / total))
        if want == 1:  # boost: (H(p), eps_std)
            torch.testing.assert_close(e_plus, upper_shape(PROBS))
            torch.testing.assert_close(e_minus, torch.full_like(PROBS, EPS_LOW))
        else:  # suppress: (eps_std, M(p))
            torch.testing.assert_close(e_plus, torch.full_like(PROBS, EPS_HIGH))
            torch.testing.assert_close(e_minus, lower_shape(PROBS))


def test_oscillatory_initial_state_and_first_step_rule():
    control = ControlState()
    boost_first = OscillatoryDecay(initial_state="boost")
    boost_first.update(control, step(0, 100, 2.0))
    assert control.info["od_state"] == 1.0
    # The rule still decides: below tau_low at k=0 cannot happen (H_k = H_init), but a later
    # entropy above the ceiling switches to suppress.
    boost_first.update(control, step(50, 100, 1.9))
    assert control.info["od_state"] == -1.0


# ----------------------------------------------------------------------------- beta stages


def test_beta_stages_in_steps_and_fractions():
    control = ControlState(beta1=0.75, beta2=0.9)
    stages = BetaStages([(5, 0.0, 1.0), (10, 0.5, 1.0)], unit="step")
    seen = []
    for k in range(15):
        stages.update(control, step(k, 20))
        seen.append((control.beta1, control.beta2, control.info["beta_stage"]))
    assert seen[:5] == [(0.75, 0.9, -1.0)] * 5  # before the first stage: objective's values
    assert seen[5:10] == [(0.0, 1.0, 0.0)] * 5
    assert seen[10:] == [(0.5, 1.0, 1.0)] * 5

    halfway = BetaStages(
        [{"step": 0.0, "beta1": 0.0, "beta2": 1.0}, {"step": 0.5, "beta1": 0.5, "beta2": 1.0}],
        unit="fraction",
    )
    betas = []
    for k in range(20):
        halfway.update(control, step(k, 20))
        betas.append(control.beta1)
    assert betas == [0.0] * 10 + [0.5] * 10


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"stages": [(0, 0.0, 1.0), (0, 0.5, 1.0)]}, "strictly increasing"),
        ({"stages": [(5, 0.0, 1.0), (2, 0.5, 1.0)], "unit": "step"}, "strictly increasing"),
        ({"stages": [(0, -0.1, 1.0)]}, "beta1 must be finite and >= 0"),
        ({"stages": [(0, 0.1, -1.0)]}, "beta2 must be finite and >= 0"),
        ({"stages": [(0, 0.1)]}, r"must be \(step, beta1, beta2\)"),
        ({"stages": []}, "at least one"),
        ({"stages": [(1.5, 0.0, 1.0)], "unit": "fraction"}, r"fraction in \[0, 1\]"),
        ({"stages": [(0, 0.0, 1.0)], "unit": "epoch"}, "unit must be"),
    ],
)
def test_beta_stages_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BetaStages(**kwargs)


# ----------------------------------------------------------------------------- linear / cosine


def test_linear_and_cosine_annealing():
    control = ControlState()
    linear = LinearSchedule(field="eps_high", start=0.28, end=0.2)
    cosine = CosineSchedule(field=["beta1", "erc_beta_high"], start=[0.0, 0.1], end=[1.0, 0.05])
    for k in range(11):
        linear.update(control, step(k, 10))
        assert control.eps_high == pytest.approx(0.28 - 0.008 * k)
        cosine.update(control, step(k, 10))
        weight = 0.5 * (1 + math.cos(math.pi * k / 10))
        assert control.beta1 == pytest.approx(1.0 - weight)
        assert control.erc_beta_high == pytest.approx(0.05 + 0.05 * weight)
    assert linear.state_key != LinearSchedule(field="eps_low", start=0.2, end=0.1).state_key


def test_annealing_window_holds_the_ends():
    control = ControlState()
    schedule = LinearSchedule(field="eps_low", start=0.3, end=0.1, start_step=10, end_step=20)
    values = []
    for k in range(30):
        schedule.update(control, step(k, 1000))
        values.append(control.eps_low)
    assert values[:11] == pytest.approx([0.3] * 11)
    assert values[15] == pytest.approx(0.2)
    assert values[20:] == pytest.approx([0.1] * 10)


def test_annealing_rejects_unknown_field_and_bad_window():
    with pytest.raises(ValueError, match="valid fields: .*eps_high.*beta1"):
        LinearSchedule(field="eps_hi", start=0.2, end=0.3)
    with pytest.raises(ValueError, match="not a float field"):
        CosineSchedule(field="info", start=0.0, end=1.0)
    with pytest.raises(ValueError, match="one value per field"):
        LinearSchedule(field=["eps_low", "eps_high"], start=[0.1], end=0.2)
    with pytest.raises(ValueError, match="end_step must be an integer > start_step"):
        LinearSchedule(field="eps_low", start=0.1, end=0.2, start_step=5, end_step=5)
    with pytest.raises(ValueError, match="trainer.max_steps"):
        LinearSchedule(field="eps_low", start=0.1, end=0.2).update(ControlState(), step(0, -1))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: IncreaseThenDecrease(phase_split=1.0), r"phase_split must lie in .*\(0, 1\)"),
        (lambda: DecreaseIncreaseDecrease(phase_split=0.0), "phase_split"),
        (lambda: OscillatoryDecay(min_ratio=1.2), r"min_ratio must lie in .*\(0, 1\)"),
        (lambda: OscillatoryDecay(initial_state="keep"), "initial_state must be one of"),
        (lambda: IncreaseThenDecrease(total_steps=0), "total_steps must be a positive"),
        (lambda: TargetEntropy(kp=-1.0), "kp must be finite and >= 0"),
        (lambda: TargetEntropy(kp=0.0, ki=0.0), "both 0"),
        (lambda: TargetEntropy(eps_min=0.3, eps_max=0.2), "eps_min < eps_max"),
        (lambda: TargetEntropy(beta_max=0.0), "beta_max must be"),
        (lambda: TargetEntropy(coef_min=0.2, coef_max=0.1), "coef_min must be finite with -1 <= coef_min < coef_max"),
        (lambda: TargetEntropy(coef_min=-1.5), "coef_min must be"),
        (lambda: TargetEntropy(max_change_per_step=0.0), "max_change_per_step must be > 0"),
        (lambda: TargetEntropy(curve="step"), "curve must be one of"),
        (lambda: TargetEntropy(actuator="lr"), "actuator must be one of"),
        (lambda: TargetEntropy(actuator="clip", high_scale=0.0, low_scale=0.0), "no actuator would move"),
    ],
)
def test_bad_parameters_raise(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_phased_schedule_needs_a_run_length():
    with pytest.raises(ValueError, match="trainer.max_steps"):
        IncreaseThenDecrease().update(ControlState(), step(0, -1))
    # The constructor's total_steps takes precedence.
    control = ControlState()
    IncreaseThenDecrease(total_steps=4).update(control, step(1, -1))
    assert control.info["schedule_lambda"] == pytest.approx(0.5)


# ----------------------------------------------------------------------------- controller


def first_order_plant(controller: TargetEntropy, targets_steps: int, entropy: float = 2.0,
                      gain: float = 1.0, drift: float = 0.05, control: ControlState | None = None,
                      total: int = 200):
    """``H_{k+1} = H_k + gain * (eps_high - eps_low) - drift``: a documented stand-in plant.

    With symmetric eps entropy falls by ``drift`` a step (section 4.1: clip-high wins), and
    widening clip-high / tightening clip-low raises it. The plant integrates, with a constant
    disturbance, so only the integral term removes the steady-state error.
    """
    control = control or ControlState(eps_low=0.2, eps_high=0.2)
    history = []
    for k in range(targets_steps):
        controller.update(control, step(k, total, entropy))
        history.append((entropy, control.eps_low, control.eps_high, dict(control.info)))
        entropy = entropy + gain * (control.eps_high - control.eps_low) - drift
    return history


def test_controller_tracks_constant_target_on_first_order_plant():
    controller = clip_pi(target_start=1.2, curve="constant", relative_to_initial=False,
                               kp=0.3, ki=0.05, max_change_per_step=0.05)
    history = first_order_plant(controller, 150)
    tail = [h for h, *_ in history[-30:]]
    assert max(abs(h - 1.2) for h in tail) < 0.01
    # In steady state the integral alone cancels the drift: eps_high - eps_low = drift.
    _, eps_low, eps_high, info = history[-1]
    assert eps_high - eps_low == pytest.approx(0.05, abs=0.01)
    assert info["target_entropy"] == 1.2
    assert info["controller_output"] == pytest.approx(0.025, abs=0.005)


def test_controller_follows_a_falling_curve():
    total = 200
    controller = clip_pi(target_start=2.0, target_end=1.0, curve="cosine",
                               relative_to_initial=False, kp=0.5, ki=0.1, max_change_per_step=0.05)
    history = first_order_plant(controller, total, total=total)
    for k, (entropy, _, _, info) in enumerate(history):
        want = 1.0 + 0.5 * (1 + math.cos(math.pi * k / total))
        assert info["target_entropy"] == pytest.approx(want)
        if k >= 40:
            assert abs(entropy - want) < 0.05, k


def test_controller_saturation_anti_windup_and_rate_limit():
    rate = 0.01
    controller = clip_pi(target_start=10.0, curve="constant", relative_to_initial=False,
                               kp=0.5, ki=0.2, eps_min=0.05, eps_max=0.4, max_change_per_step=rate)
    control = ControlState(eps_low=0.2, eps_high=0.2)
    # A plant that cannot reach the target: entropy stays at 1.
    integrals, eps = [], [(0.2, 0.2)]
    for k in range(300):
        controller.update(control, step(k, 300, 1.0))
        integrals.append(control.info["controller_integral"])
        eps.append((control.eps_low, control.eps_high))
    for (low0, high0), (low1, high1) in zip(eps, eps[1:], strict=False):
        assert abs(low1 - low0) <= rate + 1e-12 and abs(high1 - high0) <= rate + 1e-12
    assert eps[-1] == pytest.approx((0.05, 0.4))
    assert control.info["controller_saturated"] == 1.0
    # The integral stops growing once the output saturates; it is bounded by the useful range
    # of u over ki (u_max = 0.2 here) rather than growing like 9 * steps.
    assert max(integrals) <= 0.2 / 0.2 + 1e-9
    assert integrals[-1] == integrals[-100]

    # When the target comes back into reach the controller leaves saturation at once.
    controller.target_start = 0.5
    controller.update(control, step(300, 300, 1.0))
    assert control.eps_high < 0.4 and control.eps_low > 0.05


def test_controller_holds_the_integral_while_rate_limited():
    """Conditional integration: while both actuators ramp at their rate limit towards a
    reachable output, the integral does not grow; it resumes once they can follow."""
    controller = clip_pi(target_start=1.5, curve="constant", relative_to_initial=False,
                               kp=0.2, ki=0.01, max_change_per_step=0.001)
    control = ControlState(eps_low=0.2, eps_high=0.2)
    for k in range(20):  # wanted u = 0.2 * 0.5 = 0.1, far more than 0.001 a step
        controller.update(control, step(k, 100, 1.0))
        assert control.info["controller_saturated"] == 1.0
        assert control.info["controller_integral"] == 0.0
    assert control.eps_high == pytest.approx(0.22) and control.eps_low == pytest.approx(0.18)
    fast = clip_pi(target_start=1.5, curve="constant", relative_to_initial=False,
                         kp=0.2, ki=0.01, max_change_per_step=1.0)
    fast.update(control, step(0, 100, 1.0))
    assert control.info["controller_saturated"] == 0.0
    assert control.info["controller_integral"] == pytest.approx(0.5)


def test_controller_beta_mode_moves_the_right_way():
    control = ControlState(beta1=0.5, beta2=1.0)
    controller = TargetEntropy(target_start=2.0, curve="constant", relative_to_initial=False,
                               actuator="beta", kp=0.1, ki=0.0, kd=0.0, integral_band=None,
                               max_change_per_step=None, beta_max=1.5)
    controller.update(control, step(0, 10, 1.0))  # entropy too low by 1 nat: u = 0.1
    assert control.beta2 == pytest.approx(1.1) and control.beta1 == pytest.approx(0.4)
    controller.update(control, step(1, 10, 3.0))  # too high by 1 nat: u = -0.1
    assert control.beta2 == pytest.approx(0.9) and control.beta1 == pytest.approx(0.6)
    # Clip thresholds untouched in beta mode.
    assert (control.eps_low, control.eps_high) == (0.2, 0.2)


def test_controller_relative_target_and_callable_target():
    control = ControlState()
    relative = clip_pi(kp=0.5, ki=0.05, target_start=1.0, target_end=0.5, curve="linear",
                             relative_to_initial=True)
    relative.update(control, step(0, 10, 2.0))
    assert control.info["target_entropy"] == pytest.approx(2.0)
    relative.update(control, step(5, 10, 1.0))
    assert control.info["target_entropy"] == pytest.approx(1.5)
    function = clip_pi(kp=0.5, ki=0.05, target_fn=lambda k, total: 3.0 - k / total, relative_to_initial=False)
    function.update(control, step(4, 8, 1.0))
    assert control.info["target_entropy"] == pytest.approx(2.5)
    assert control.info["entropy_error"] == pytest.approx(1.5)
    assert control.info["tracking_error"] == pytest.approx(1.5 / 2.5)  # |H - target| / target
    function.update(control, step(8, 8, 4.0))  # target 2.0, entropy too high by 2 nats
    assert control.info["tracking_error"] == pytest.approx(1.0)


def test_controller_rejects_initial_values_outside_the_bounds():
    with pytest.raises(ValueError, match="eps_high = 0.7 lies outside"):
        clip_pi(kp=0.5, ki=0.05, eps_max=0.6).update(ControlState(eps_high=0.7), step(0))


def simulate_softmax_policy(controller: TargetEntropy | None, steps: int, seed: int = 0):
    """A categorical policy over 20 actions trained with a clipped policy gradient.

    Each rollout: 64 samples from pi_old, random 0/1 rewards, group-normalised advantages, then
    8 plain gradient steps (lr 2) on ``-min(r*A, clip(r, 1-E-, 1+E+)*A)`` with the bounds from
    the control state. With random rewards the only systematic drift of entropy is the one
    clipping creates (section 4.1), so entropy responds to eps_low/eps_high.
    """
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(20, generator=generator) * 0.5
    control = ControlState(eps_low=0.2, eps_high=0.2)
    entropies = []
    for k in range(steps):
        probs = torch.softmax(logits, 0)
        entropy = float(-(probs * probs.log()).sum())
        entropies.append(entropy)
        if controller is not None:
            controller.update(control, step(k, steps, entropy))
        actions = torch.multinomial(probs, 64, replacement=True, generator=generator)
        rewards = (torch.rand(64, generator=generator) < 0.5).float()
        advantages = (rewards - rewards.mean()) / (rewards.std() + 1e-6)
        old_logp = probs.log()[actions]
        eps_low, eps_high = control.clip_bounds(old_logp)
        current = logits.clone().requires_grad_(True)
        for _ in range(8):
            ratio = (torch.log_softmax(current, 0)[actions] - old_logp).exp()
            clipped = torch.maximum(torch.minimum(ratio, 1 + eps_high), 1 - eps_low)
            loss = torch.maximum(-advantages * ratio, -advantages * clipped).mean()
            (grad,) = torch.autograd.grad(loss, current)
            with torch.no_grad():
                current -= 2.0 * grad
        logits = current.detach()
    return entropies


def test_controller_holds_entropy_of_a_softmax_policy():
    steps, target = 250, 2.0
    controller = clip_pi(target_start=target, curve="constant", relative_to_initial=False,
                               kp=1.0, ki=0.2, max_change_per_step=0.1)
    controlled = simulate_softmax_policy(controller, steps)
    tail = controlled[-100:]
    assert abs(sum(tail) / len(tail) - target) < 0.15
    assert sum(abs(h - target) < 0.5 for h in tail) >= 90
    # The same plant without control does not hold the target (so the check can fail): the
    # symmetric clip lets entropy wander off (it drifts down, section 4.1).
    uncontrolled = simulate_softmax_policy(None, steps)[-100:]
    assert abs(sum(uncontrolled) / len(uncontrolled) - target) > 0.3


# ----------------------------------------------------------------------------- state dicts


def drive(callback: ControlCallback, control: ControlState, steps: range, total: int = 40):
    """Feed a fixed entropy trace; return the control state after every step."""
    out = []
    for k in steps:
        entropy = 2.0 - 1.6 * k / total + 0.3 * math.sin(k)  # crosses the OD thresholds
        callback.update(control, step(k, total, entropy))
        out.append(control.state_dict())
    return out


CALLBACKS = {
    "constant": lambda: ConstantSchedule(),
    "linear": lambda: LinearSchedule(field="eps_high", start=0.28, end=0.2),
    "cosine": lambda: CosineSchedule(field=["eps_low", "beta2"], start=[0.2, 1.0], end=[0.1, 0.5]),
    "id": lambda: IncreaseThenDecrease(phase_split=0.4),
    "did": lambda: DecreaseIncreaseDecrease(),
    "od": lambda: OscillatoryDecay(min_ratio=0.3),
    "beta_stages": lambda: BetaStages([(0, 0.0, 1.0), (20, 0.5, 1.0)], unit="step"),
    "target_clip": lambda: clip_pi(target_start=1.0, target_end=0.5, curve="linear",
                                         relative_to_initial=True, kp=0.2, ki=0.05),
    "target_beta": lambda: TargetEntropy(target_start=1.5, curve="constant", relative_to_initial=False,
                                         actuator="beta", kp=0.2, ki=0.1, kd=0.0, integral_band=None),
}


@pytest.mark.parametrize("name", sorted(CALLBACKS))
def test_state_dict_round_trip_continues_identically(name):
    make = CALLBACKS[name]
    original, control = make(), ControlState(eps_low=0.2, eps_high=0.28, beta1=0.5, beta2=1.0)
    drive(original, control, range(15))
    saved_callback, saved_control = reload(original), control.state_dict()
    expected = drive(original, control, range(15, 40))

    resumed, resumed_control = make(), ControlState()
    resumed.load_state_dict(saved_callback)
    resumed_control.load_state_dict(saved_control)
    assert drive(resumed, resumed_control, range(15, 40)) == expected


def test_od_state_dict_carries_initial_entropy_and_state():
    schedule = OscillatoryDecay()
    control = ControlState()
    schedule.update(control, step(0, 100, 2.0))
    schedule.update(control, step(1, 100, 0.3))  # boost
    state = reload(schedule)
    assert state["entropy_init"] == 2.0 and state["state"] == 1
    fresh = OscillatoryDecay()
    fresh.load_state_dict(state)
    fresh.update(control, step(2, 100, 1.0))  # in between: the restored boost is kept
    assert control.info["od_state"] == 1.0 and control.info["od_tau_low"] == pytest.approx(0.4)


# ----------------------------------------------------------------------------- configs


@pytest.mark.parametrize("path", sorted(CONF.glob("*.yaml")), ids=lambda p: p.stem)
def test_scheduler_configs_instantiate(path):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    callback = instantiate(OmegaConf.load(path))
    assert isinstance(callback, ControlCallback)
    control = ControlState(eps_low=0.2, eps_high=0.28)
    for k in range(3):
        callback.update(control, step(k, 10, 1.0))
    assert all(math.isfinite(v) for v in control.scalars().values())


def test_every_scheduler_has_a_config():
    names = {p.stem for p in CONF.glob("*.yaml")}
    assert {
        "constant", "linear", "cosine", "increase_then_decrease", "decrease_increase_decrease",
        "oscillatory", "beta_stages", "target_entropy",
    } <= names
