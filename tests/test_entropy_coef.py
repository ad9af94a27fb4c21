"""The entropy coefficient as control state and as a controller actuator (ALGORITHMS_NEXT A2).

- ``objective.control.entropy_coef`` is the one home of the entropy bonus coefficient; the loss
  and the updater read the value in force, which schedules may change mid-run.
- ``AdaptiveEntropy`` (``scheduler=adaptive_entropy``): Skywork-OR1's rule (arXiv 2505.22312),
  every test vector of A2 and the rule step by step.
- ``TargetEntropy`` gains the ``entropy_coef`` and ``entropy_quantile`` actuators and a
  combined mode (one error, one integral, one output driving several actuators).
- The two training commands of the issue through ``train.run`` on the tiny model, and resume.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rlvr_lightning.config import ConfigError, validate_config
from rlvr_lightning.control import ControlState
from rlvr_lightning.logprobs import logprobs_and_entropy_from_logits
from rlvr_lightning.objectives import LossNormalizer, ObjectiveParams, PolicyBatch, compute_loss
from rlvr_lightning.schedulers import AdaptiveEntropy, StepInfo, TargetEntropy
from rlvr_lightning.train import run
from rlvr_lightning.update import ParallelHooks, PolicyUpdater, UpdateSettings
from tests.conftest import TINY_OVERRIDES, compose_config, read_scalars
from tests.test_units import ROWS, collector, scripted_reward

DT = torch.float64


def step(k: int, entropy: float, total: int = 20) -> StepInfo:
    return StepInfo(step=k, total_steps=total, rollout_entropy=entropy, reward_mean=0.5)


def drive(schedule, entropies: list[float], control: ControlState | None = None):
    """(alpha, applied) after each measurement, as the control state holds them."""
    control = control or ControlState()
    out = []
    for k, entropy in enumerate(entropies):
        schedule.update(control, step(k, entropy))
        out.append((control.entropy_coef, control.applied_entropy_coef))
    return out, control


def flat(pairs: list[tuple[float, float]]) -> list[float]:
    return [value for pair in pairs for value in pair]


def trl_rule(alpha: float, entropies: list[float], delta: float, low: float, high: float, target: float):
    """TRL's ``use_adaptive_entropy`` as the spec states it: ``<=`` instead of ``<`` (A2.2)."""
    out = []
    for entropy in entropies:
        if entropy <= target:
            alpha, gate = min(alpha + delta, high), 1.0
        else:
            alpha, gate = max(alpha - delta, low), 0.0
        out.append((alpha, gate * alpha))
    return out


# ----------------------------------------------------------------------------- A2 vectors

A21_ENTROPIES = [0.5, 0.19, 0.15, 0.2, 0.25, 0.1]


def test_a2_1_coefficient_and_applied_bonus():
    schedule = AdaptiveEntropy(target_entropy=0.2, step_size=0.005, min_coef=0.0, max_coef=1.0)
    got, control = drive(schedule, A21_ENTROPIES)
    alpha = [0.0, 0.005, 0.010, 0.005, 0.0, 0.005]
    applied = [0.0, 0.005, 0.010, 0.0, 0.0, 0.005]
    assert [a for a, _ in got] == pytest.approx(alpha, abs=1e-15)
    assert [b for _, b in got] == pytest.approx(applied, abs=1e-15)
    assert control.info["entropy_coef_applied"] == pytest.approx(0.005)
    assert control.info["entropy_target"] == 0.2
    assert control.info["entropy/controller_measured"] == 0.1


def test_a2_2_trl_comparison_is_not_ours():
    trl = trl_rule(0.0, A21_ENTROPIES, 0.005, 0.0, 1.0, 0.2)
    # TRL's `<=` at e = 0.2 (the fourth measurement) keeps raising alpha and applies it.
    assert trl[3] == pytest.approx((0.015, 0.015))
    assert trl[4] == pytest.approx((0.010, 0.0))
    assert trl[5] == pytest.approx((0.015, 0.015))
    ours, _ = drive(AdaptiveEntropy(target_entropy=0.2, step_size=0.005), A21_ENTROPIES)
    assert flat(ours[:3]) == pytest.approx(flat(trl[:3]))
    for k in (3, 4, 5):
        assert ours[k] != pytest.approx(trl[k]), k
    assert ours[3] == pytest.approx((0.005, 0.0))  # `<`: equal to the target shuts the gate


def test_a2_3_upper_bound():
    schedule = AdaptiveEntropy(target_entropy=0.2, step_size=0.005, max_coef=0.5)
    got, control = drive(schedule, [0.1, 0.1], ControlState(entropy_coef=0.498))
    assert got == [(0.5, 0.5), (0.5, 0.5)]
    assert control.entropy_gate is True


def test_a2_4_gradient_of_the_bonus_wrt_logits():
    """d(-c*H)/dz_j = c * p_j * (log p_j + H) through the project's entropy and compute_loss."""
    coef = 0.01
    logits = torch.tensor([[[1.0, 0.0, -1.0]]], requires_grad=True)
    logp, entropy = logprobs_and_entropy_from_logits(logits, torch.tensor([[0]]), entropy_grad=True)
    batch = PolicyBatch(
        logp=logp,
        old_logp=logp.detach(),
        advantages=torch.zeros(1, 1),  # no policy-gradient term: the bonus alone
        mask=torch.ones(1, 1),
        entropy=entropy,
    )
    normalizer = LossNormalizer(num_tokens=1.0, num_sequences=1.0, max_response_length=1)
    loss, _ = compute_loss("grpo", batch, ControlState(entropy_coef=coef), ObjectiveParams(), normalizer)
    loss.backward()
    probs = torch.softmax(logits.detach()[0, 0].to(DT), -1)
    assert probs.tolist() == pytest.approx([0.665241, 0.244728, 0.090031], abs=1e-6)
    assert float(entropy.detach()) == pytest.approx(0.832396, abs=1e-6)
    assert logits.grad[0, 0].tolist() == pytest.approx([0.002826, -0.001408, -0.001418], abs=1e-6)
    closed_form = coef * probs * (probs.log() + 0.832396)
    assert logits.grad[0, 0].to(DT).tolist() == pytest.approx(closed_form.tolist(), abs=1e-8)


# ----------------------------------------------------------------------------- control field


def bonus_batch() -> PolicyBatch:
    logp = torch.tensor([[-1.0, -0.5, -2.0]], dtype=DT, requires_grad=True)
    return PolicyBatch(
        logp=logp,
        old_logp=logp.detach() - 0.05,
        advantages=torch.tensor([[1.0, 1.0, 1.0]], dtype=DT),
        mask=torch.tensor([[1.0, 1.0, 0.0]], dtype=DT),
        entropy=torch.tensor([[1.0, 2.0, 9.0]], dtype=DT, requires_grad=True),
    )


@pytest.mark.parametrize("gate", [None, True, False])
def test_compute_loss_uses_the_coefficient_in_force(gate):
    normalizer = LossNormalizer(num_tokens=2.0, num_sequences=1.0, max_response_length=3)
    plain, _ = compute_loss("grpo", bonus_batch(), ControlState(), ObjectiveParams(), normalizer)
    batch = bonus_batch()
    control = ControlState(entropy_coef=0.1, entropy_gate=gate)
    loss, _ = compute_loss("grpo", batch, control, ObjectiveParams(), normalizer)
    expected = 0.0 if gate is False else -0.1 * (1.0 + 2.0) / 2.0
    assert float((loss - plain).detach()) == pytest.approx(expected, abs=1e-12)
    assert control.applied_entropy_coef == (0.0 if gate is False else 0.1)


def test_entropy_coef_has_one_home():
    assert not hasattr(ObjectiveParams(), "entropy_coef")
    with pytest.raises(ValueError, match="objective.control.entropy_coef"):
        ObjectiveParams.from_config({"name": "grpo", "entropy_coef": 0.1})
    cfg = compose_config(["model=tiny", "objective.control.entropy_coef=0.01"])
    validate_config(cfg)
    assert cfg.objective.control.entropy_coef == 0.01
    with pytest.raises(ConfigError, match="moved to objective.control.entropy_coef"):
        validate_config(compose_config(["model=tiny", "+objective.entropy_coef=0.1"]))
    # A negative coefficient is an entropy penalty (entropy minimisation): allowed, but bounded.
    validate_config(compose_config(["model=tiny", "objective.control.entropy_coef=-0.1"]))
    with pytest.raises(ConfigError, match=r"objective.control.entropy_coef=-2.0 must be in \[-1, 1\]"):
        validate_config(compose_config(["model=tiny", "objective.control.entropy_coef=-2.0"]))


def test_updater_follows_the_coefficient_set_after_construction(tiny):
    """Zero advantages: only the entropy bonus moves the weights, so they move exactly when the
    control state's coefficient in force is non-zero at the time of the update."""
    torch.manual_seed(0)
    rollout, _ = collector(tiny, scripted_reward([0.0])).collect(ROWS[:2], {})
    assert float(rollout.data["advantages"].abs().max()) == 0.0
    control = ControlState()
    settings = UpdateSettings(epochs=1, mini_batches=1, max_new_tokens=6)
    policy = tiny[0].train()
    unit = PolicyUpdater(policy, "grpo", ObjectiveParams(aggregation="token-mean"), control, settings)
    optimizer = torch.optim.SGD(policy.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda update: 1.0)
    unit.old_logprobs(rollout)

    def moved() -> bool:
        before = [p.detach().clone() for p in policy.parameters()]
        unit.update(rollout, optimizer, scheduler, torch.Generator().manual_seed(1))
        return any(not torch.equal(b, p) for b, p in zip(before, policy.parameters(), strict=True))

    assert not moved()
    control.entropy_coef = 0.1  # a schedule raising it from 0 mid-run
    assert moved()
    control.entropy_gate = False  # the adaptive gate shut: no bonus
    assert not moved()
    policy.eval()


def test_schedules_measure_the_entropy_of_every_rank():
    """Token mean over all ranks, not the mean of per-rank means."""
    rollout = SimpleNamespace(data={
        "loss_mask": torch.tensor([[1.0, 1.0, 1.0, 0.0]]),
        "old_entropy": torch.tensor([[0.5, 1.0, 1.5, 7.0]]),
    })
    unit = PolicyUpdater(torch.nn.Linear(1, 1), "grpo", ObjectiveParams(), ControlState(), UpdateSettings())
    assert unit.rollout_entropy_all_ranks(rollout) == 1.0
    other_rank = torch.tensor([10.0, 2.0])  # entropy sum 10 over 2 tokens
    unit.hooks = ParallelHooks(reduce_sum=lambda values: values + other_rank, world_size=2)
    assert unit.rollout_entropy_all_ranks(rollout) == pytest.approx(13.0 / 5.0)


# ----------------------------------------------------------------------------- adaptive entropy


def test_adaptive_rule_step_by_step():
    schedule = AdaptiveEntropy(target_entropy=1.0, step_size=0.1, min_coef=0.05, max_coef=0.3)
    control = ControlState(entropy_coef=0.1)
    assert schedule.coef is None and schedule.gate is False  # shut until the first measurement
    expected = [
        (0.9, 0.2, True),    # below target: up one step, bonus on
        (1.0, 0.1, False),   # at target (`<` is strict): down, off
        (2.0, 0.05, False),  # down to min_coef ...
        (2.0, 0.05, False),  # ... and held there
        (0.5, 0.15, True),
        (0.5, 0.25, True),
        (0.5, 0.3, True),    # max_coef
        (0.5, 0.3, True),
    ]
    for k, (entropy, alpha, gate) in enumerate(expected):
        schedule.update(control, step(k, entropy))
        assert control.entropy_coef == pytest.approx(alpha, abs=1e-12), k
        assert control.entropy_gate is gate and schedule.gate is gate, k
        assert control.info["entropy_coef_applied"] == pytest.approx(alpha if gate else 0.0), k
        assert control.info["entropy/controller_measured"] == entropy
        assert control.info["entropy_target"] == 1.0
    assert not schedule.relies_on_clipping


def test_adaptive_target_relative_to_the_first_rollout():
    schedule = AdaptiveEntropy(target_entropy=0.5, relative_to_initial=True)
    control = ControlState()
    schedule.update(control, step(0, 4.0))  # target 2.0: 4.0 is above
    assert control.info["entropy_target"] == 2.0 and control.entropy_gate is False
    schedule.update(control, step(1, 1.9))  # H_init stays the first rollout's
    assert control.info["entropy_target"] == 2.0 and control.entropy_gate is True
    assert control.entropy_coef == pytest.approx(0.005)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: AdaptiveEntropy(step_size=0.0), "step_size must be"),
        (lambda: AdaptiveEntropy(target_entropy=-1.0), "target_entropy must be"),
        (lambda: AdaptiveEntropy(min_coef=0.5, max_coef=0.1), "min_coef <= max_coef"),
        (lambda: AdaptiveEntropy(min_coef=-0.1), "0 <= min_coef"),
    ],
)
def test_adaptive_bad_parameters_raise(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_adaptive_initial_coefficient_outside_the_bounds_raises():
    with pytest.raises(ValueError, match="entropy_coef = 0.7"):
        AdaptiveEntropy(max_coef=0.5).update(ControlState(entropy_coef=0.7), step(0, 1.0))
    with pytest.raises(ValueError, match="non-finite"):
        AdaptiveEntropy().update(ControlState(), step(0, math.nan))


def test_adaptive_state_survives_a_checkpoint():
    # Target 2 * H_init = 0.2; at step 3 a schedule that forgot H_init (0.25 then) would open.
    entropies = [0.1, 0.1, 0.3, 0.25, 0.1, 0.3]
    full = AdaptiveEntropy(target_entropy=2.0, relative_to_initial=True, step_size=0.01)
    full_out, _ = drive(full, entropies)
    assert flat(full_out) == pytest.approx(flat([(0.01, 0.01), (0.02, 0.02), (0.01, 0.0), (0.0, 0.0), (0.01, 0.01), (0.0, 0.0)]))
    first = AdaptiveEntropy(target_entropy=2.0, relative_to_initial=True, step_size=0.01)
    control = ControlState()
    drive(first, entropies[:3], control)
    resumed = AdaptiveEntropy(target_entropy=2.0, relative_to_initial=True, step_size=0.01)
    resumed.load_state_dict(first.state_dict())
    saved = ControlState()
    saved.load_state_dict(control.state_dict())
    assert resumed.state_dict() == {"coef": 0.01, "gate": False, "entropy_init": 0.1}
    out = []
    for k, entropy in enumerate(entropies[3:], start=3):
        resumed.update(saved, step(k, entropy))
        out.append((saved.entropy_coef, saved.applied_entropy_coef))
    assert out == full_out[3:]


# ----------------------------------------------------------------------------- target entropy


def controller(**overrides) -> TargetEntropy:
    options = dict(actuator="clip", target_start=2.0, curve="constant", relative_to_initial=False, kp=0.1, ki=0.0,
                   kd=0.0, integral_band=None, coef_feedforward=0.0, lead=0.0,
                   max_change_per_step=None, coef_max_change_per_step=None,
                   quantile_max_change_per_step=None)
    return TargetEntropy(**(options | overrides))


def test_entropy_coef_actuator():
    control = ControlState()
    pid = controller(actuator="entropy_coef", coef_scale=0.1, coef_max=0.05, coef_min=0.0)
    pid.update(control, step(0, 1.0))  # too low by 1 nat: u = 0.1, coef = 0.1 * 0.1
    assert control.entropy_coef == pytest.approx(0.01)
    assert control.info["controller_output"] == pytest.approx(0.1)
    pid.update(control, step(1, 3.0))  # too high: u = -0.1, held at the lower bound 0
    assert control.entropy_coef == 0.0
    pid.update(control, step(2, -10.0))  # u = 1.2: the upper bound
    assert control.entropy_coef == pytest.approx(0.05)
    # Nothing else moves, and no gate: the coefficient is the one the loss applies.
    assert (control.eps_low, control.eps_high, control.beta1, control.beta2) == (0.2, 0.2, 0.0, 0.0)
    assert control.entropy_gate is None and control.applied_entropy_coef == control.entropy_coef
    assert not pid.relies_on_clipping


def test_entropy_coef_actuator_goes_negative_down_to_coef_min():
    """Below 0 the coefficient is an entropy penalty: the controller's authority to lower
    entropy. It stops at coef_min, and the integral stops winding there too."""
    control = ControlState()
    pid = controller(actuator="entropy_coef", coef_scale=1.0, coef_min=-0.05, coef_max=0.1, ki=0.01)
    pid.update(control, step(0, 2.3))  # too high by 0.3: u = 0.1 * -0.3 + 0.01 * -0.3
    assert control.entropy_coef == pytest.approx(-0.033)
    assert control.applied_entropy_coef == pytest.approx(-0.033)  # the loss penalises entropy
    for k in range(1, 4):
        pid.update(control, step(k, 4.0))  # far too high: held at coef_min
        assert control.entropy_coef == pytest.approx(-0.05)
    assert control.info["controller_saturated"] == 1.0
    assert pid.ki * pid.integral >= -0.05 - 1e-12  # anti-windup: no more than the bound's worth
    pid.update(control, step(4, 2.0))  # on target: the penalty falls to what the integral holds
    assert control.entropy_coef == pytest.approx(pid.ki * pid.integral)


def test_derivative_term_acts_on_the_measured_entropy_only():
    """kd: u gains -kd * (H_k - H_{k-1}); nothing at the first rollout, no kick when the target
    moves, and the previous entropy survives a checkpoint."""
    control = ControlState()
    pid = controller(actuator="entropy_coef", coef_scale=1.0, coef_min=-0.5, coef_max=0.5, kp=0.1, kd=0.2)
    pid.update(control, step(0, 2.0))  # on target, no previous entropy: u = 0
    assert control.entropy_coef == 0.0
    pid.update(control, step(1, 1.5))  # fell 0.5: u = 0.1 * 0.5 + 0.2 * 0.5
    assert control.info["controller_output"] == pytest.approx(0.15)
    resumed = controller(actuator="entropy_coef", coef_scale=1.0, coef_min=-0.5, coef_max=0.5, kp=0.1, kd=0.2)
    resumed.load_state_dict(pid.state_dict())
    for schedule, state in ((pid, control), (resumed, ControlState())):
        schedule.update(state, step(2, 1.5))  # steady: only the proportional term, 0.1 * 0.5
        assert state.info["controller_output"] == pytest.approx(0.05)
    moving = TargetEntropy(actuator="entropy_coef", target_fn=lambda k, total: 2.0 - k, relative_to_initial=False,
                           kp=0.1, ki=0.0, kd=1.0, coef_scale=1.0, coef_min=-0.5, coef_max=0.5,
                           coef_max_change_per_step=None)
    state = ControlState()
    moving.update(state, step(0, 2.0))
    moving.update(state, step(1, 2.0))  # the target fell by 1, the entropy did not: no derivative kick
    assert state.info["controller_output"] == pytest.approx(0.1 * (1.0 - 2.0))
    with pytest.raises(ValueError, match="kd must be finite and >= 0"):
        controller(kd=-1.0)


def test_lead_makes_the_carried_output_close_its_gap_by_lead_per_rollout():
    """The optimizer's momentum carries a bias-corrected average of the outputs applied (weight
    w_k = (1 - rho) / (1 - rho**(k+1)) for the newest); the lead applies more than u so that this
    average closes `lead` of its gap to u each rollout, or u itself once w_k >= lead."""
    rho, lead = 0.9, 0.5
    pid = controller(actuator="entropy_coef", coef_scale=0.1, coef_min=-1.0, coef_max=1.0, kp=1.0,
                     lead=lead, optimizer_momentum=rho)
    control = ControlState()
    entropies = [1.9, 1.5, 1.5, 1.7, 2.4, 2.4, 2.0]  # target 2.0: u = 2.0 - H
    momentum_sum, weight_sum, carried = 0.0, 0.0, 0.0
    for k, entropy in enumerate(entropies):
        pid.update(control, step(k, entropy))
        wanted, applied = 2.0 - entropy, control.info["controller_output"]
        assert control.entropy_coef == pytest.approx(0.1 * applied)  # inside the bounds
        newest = (1.0 - rho) / (1.0 - rho ** (k + 1))
        if k == 0 or newest >= lead:
            assert applied == pytest.approx(wanted)  # Adam's first update applies it whole
        # Adam's bias-corrected first moment of the applied values:
        momentum_sum = rho * momentum_sum + (1.0 - rho) * applied
        weight_sum = rho * weight_sum + (1.0 - rho)
        new_carried = momentum_sum / weight_sum
        assert control.info["controller_carried"] == pytest.approx(new_carried)
        if k > 0:
            assert new_carried - carried == pytest.approx(max(lead, newest) * (wanted - carried))
        carried = new_carried
    # A checkpoint keeps what the momentum carries.
    resumed = controller(actuator="entropy_coef", coef_scale=0.1, coef_min=-1.0, coef_max=1.0, kp=1.0,
                         lead=lead, optimizer_momentum=rho)
    resumed.load_state_dict(pid.state_dict())
    a, b = ControlState(), ControlState()
    pid.update(a, step(7, 1.0))
    resumed.update(b, step(7, 1.0))
    assert a.info["controller_output"] == b.info["controller_output"]


def test_no_lead_without_momentum_or_with_lead_zero():
    entropies = [1.9, 1.5, 1.7, 2.4, 2.0]
    outputs = {}
    for name, options in (("plain", dict(lead=0.0, optimizer_momentum=0.9)),
                          ("no momentum", dict(lead=0.5, optimizer_momentum=0.0)),
                          ("outside a trainer", dict(lead=0.5))):  # None: nothing to read, 0
        pid = controller(actuator="entropy_coef", coef_scale=1.0, coef_min=-1.0, coef_max=1.0, ki=0.05, **options)
        control = ControlState()
        outputs[name] = []
        for k, entropy in enumerate(entropies):
            pid.update(control, step(k, entropy))
            outputs[name].append(control.entropy_coef)
    assert outputs["plain"] == outputs["no momentum"] == outputs["outside a trainer"]
    for options, message in ((dict(lead=1.5), "lead must lie in"), (dict(lead=-0.1), "lead must lie in"),
                             (dict(optimizer_momentum=1.0), "optimizer_momentum must lie in"),
                             (dict(coef_feedforward=math.inf), "coef_feedforward must be finite")):
        with pytest.raises(ValueError, match=message):
            controller(**options)


def test_optimizer_momentum_is_read_per_rollout():
    from rlvr_lightning.schedulers.schedules import _optimizer_momentum

    weight = torch.nn.Parameter(torch.zeros(2))
    adamw = SimpleNamespace(optimizers=[torch.optim.AdamW([weight], betas=(0.9, 0.999))])
    assert _optimizer_momentum(adamw, SimpleNamespace(updates_per_rollout=2)) == pytest.approx(0.81)
    sgd = SimpleNamespace(optimizers=[torch.optim.SGD([weight], lr=0.1, momentum=0.5)])
    assert _optimizer_momentum(sgd, SimpleNamespace(updates_per_rollout=3)) == pytest.approx(0.125)
    plain = SimpleNamespace(optimizers=[torch.optim.SGD([weight], lr=0.1)])
    assert _optimizer_momentum(plain, SimpleNamespace(updates_per_rollout=1)) == 0.0
    assert _optimizer_momentum(SimpleNamespace(optimizers=[]), SimpleNamespace()) == 0.0


def test_feedforward_adds_a_standing_coefficient_within_the_bounds():
    control = ControlState(entropy_coef=0.01)
    pid = controller(actuator="entropy_coef", coef_scale=1.0, coef_min=-0.05, coef_max=0.1, coef_feedforward=0.04)
    pid.update(control, step(0, 2.0))  # on target: the objective's 0.01 plus the feed-forward
    assert control.entropy_coef == pytest.approx(0.05)
    pid.update(control, step(1, 1.0))  # too low by 1: u = 0.1, up to the bound 0.1
    assert control.entropy_coef == pytest.approx(0.1)
    capped = controller(actuator="entropy_coef", coef_max=0.1, coef_feedforward=0.5)
    capped.update(control := ControlState(), step(0, 2.0))
    assert control.entropy_coef == pytest.approx(0.1)  # clamped to coef_max
    # The feed-forward moves only the coefficient: clip bounds keep their objective values.
    both = controller(actuator=["clip", "entropy_coef"], coef_feedforward=0.04)
    both.update(control := ControlState(), step(0, 2.0))
    assert (control.eps_low, control.eps_high, control.entropy_coef) == pytest.approx((0.2, 0.2, 0.04))


def test_integral_band_holds_the_integral_during_large_errors():
    control = ControlState()
    pid = controller(actuator="entropy_coef", coef_scale=1.0, coef_min=-1.0, coef_max=1.0, kp=0.0, ki=0.1,
                     integral_band=0.25)
    pid.update(control, step(0, 1.0))  # error 1.0 = 50% of the target 2.0: outside the band
    assert pid.integral == 0.0 and control.entropy_coef == 0.0
    pid.update(control, step(1, 1.8))  # error 0.2 = 10%: integrated
    assert pid.integral == pytest.approx(0.2)
    assert control.entropy_coef == pytest.approx(0.02)
    unbanded = controller(actuator="entropy_coef", coef_scale=1.0, coef_min=-1.0, coef_max=1.0, kp=0.0, ki=0.1)
    unbanded.update(ControlState(), step(0, 1.0))
    assert unbanded.integral == pytest.approx(1.0)
    with pytest.raises(ValueError, match="integral_band must be > 0 or None"):
        controller(integral_band=0.0)


def test_entropy_coef_actuator_rate_limit_and_initial_value():
    control = ControlState(entropy_coef=0.02)
    pid = controller(actuator="entropy_coef", coef_scale=1.0, coef_max=0.1, coef_max_change_per_step=0.005)
    values = []
    for k in range(4):
        pid.update(control, step(k, 1.0))  # wanted: 0.02 + 0.1
        values.append(control.entropy_coef)
    assert values == pytest.approx([0.025, 0.03, 0.035, 0.04])
    with pytest.raises(ValueError, match="initial entropy_coef = 0.2"):
        controller(actuator="entropy_coef", coef_max=0.1).update(ControlState(entropy_coef=0.2), step(0, 1.0))


def test_entropy_quantile_actuator():
    control = ControlState()
    assert control.entropy_quantile == 1.0  # the mask is off
    pid = controller(actuator="entropy_quantile", quantile_scale=2.0, quantile_min=0.2)
    pid.update(control, step(0, 1.0))  # entropy too low: keep fewer, higher-entropy tokens
    assert control.entropy_quantile == pytest.approx(1.0 - 2.0 * 0.1)
    pid.update(control, step(1, 3.0))  # too high: back to the upper bound 1 (off)
    assert control.entropy_quantile == 1.0
    pid.update(control, step(2, -10.0))  # u = 1.2: the lower bound
    assert control.entropy_quantile == pytest.approx(0.2)
    limited = controller(actuator="entropy_quantile", quantile_max_change_per_step=0.05)
    other = ControlState()
    limited.update(other, step(0, 1.0))
    assert other.entropy_quantile == pytest.approx(0.95)
    assert (other.eps_low, other.eps_high, other.entropy_coef) == (0.2, 0.2, 0.0)


def test_combined_mode_is_one_controller():
    """actuator=[clip, entropy_coef]: one error, one integral, one u; each actuator has its own
    gain, bounds and rate limit, and integration stops only once every actuator is held."""
    options = dict(target_start=1.5, kp=0.0, ki=0.1, eps_min=0.02, eps_max=0.6, coef_scale=0.1,
                   coef_max=0.002)
    combined, clip_only = controller(actuator=["clip", "entropy_coef"], **options), controller(**options)
    both, alone = ControlState(), ControlState()
    saturated = []
    for k in range(12):  # entropy 1.0: error +0.5 every step
        combined.update(both, step(k, 1.0))
        clip_only.update(alone, step(k, 1.0))
        u = both.info["controller_output"]
        assert both.entropy_coef == pytest.approx(min(0.1 * u, 0.002))
        assert both.eps_high == pytest.approx(min(0.2 + u, 0.6))
        assert both.eps_low == pytest.approx(max(0.2 - u, 0.02))
        saturated.append(both.info["controller_saturated"])
        if k < 3:  # before any bound: the clip side is exactly the clip-only controller
            assert (both.eps_low, both.eps_high) == (alone.eps_low, alone.eps_high)
            assert both.info["controller_integral"] == alone.info["controller_integral"]
    # The coefficient hits its bound at u = 0.02 (step 0), eps_low at u = 0.18, eps_high at
    # u = 0.4 (the integral 4.0 after step 7): integration goes on until then, then holds.
    assert saturated == [0.0] * 7 + [1.0] * 5
    assert both.info["controller_integral"] == pytest.approx(3.5)
    assert combined.relies_on_clipping


def test_combined_mode_rate_limits_each_actuator():
    control = ControlState()
    pid = controller(actuator=["entropy_coef", "clip"], kp=1.0, max_change_per_step=0.02,
                     coef_max_change_per_step=0.001, coef_scale=1.0, coef_max=0.5)
    pid.update(control, step(0, 1.0))  # u = 1: every actuator at its own rate limit
    assert (control.eps_low, control.eps_high, control.entropy_coef) == pytest.approx((0.18, 0.22, 0.001))
    assert control.info["controller_saturated"] == 1.0


def test_single_actuator_list_equals_the_string():
    entropies = [1.0, 1.2, 0.7, 2.5, 0.3, 1.1]
    for actuator in ("clip", "beta", "entropy_coef"):
        as_string, as_list = ControlState(beta1=0.5, beta2=1.0), ControlState(beta1=0.5, beta2=1.0)
        a = TargetEntropy(actuator=actuator, relative_to_initial=False, target_start=1.5, curve="constant")
        b = TargetEntropy(actuator=[actuator], relative_to_initial=False, target_start=1.5, curve="constant")
        for k, entropy in enumerate(entropies):
            a.update(as_string, step(k, entropy))
            b.update(as_list, step(k, entropy))
            assert as_string.state_dict() == as_list.state_dict(), (actuator, k)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: TargetEntropy(actuator=["clip", "lr"]), "actuator must be one of"),
        (lambda: TargetEntropy(actuator=["clip", "clip"]), "distinct"),
        (lambda: TargetEntropy(actuator=[]), "actuator must be one of"),
        (lambda: TargetEntropy(actuator="entropy_coef", coef_scale=0.0), "coef_scale must be"),
        (lambda: TargetEntropy(coef_max=0.0), "coef_max must be"),
        (lambda: TargetEntropy(quantile_min=1.0), "quantile_min must lie"),
        (lambda: TargetEntropy(coef_max_change_per_step=0.0), "coef_max_change_per_step must be"),
        (lambda: TargetEntropy(quantile_max_change_per_step=-1.0), "quantile_max_change_per_step"),
    ],
)
def test_target_entropy_bad_actuator_parameters_raise(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_high_and_low_scale_zero_is_fine_without_clip_or_beta():
    pid = controller(actuator="entropy_coef", high_scale=0.0, low_scale=0.0)
    control = ControlState()
    pid.update(control, step(0, 1.0))
    assert control.entropy_coef > 0.0


def test_target_entropy_actuator_state_survives_a_checkpoint():
    entropies = [1.0, 1.4, 0.6, 2.0, 1.3, 0.9]
    options = dict(actuator=["clip", "entropy_coef", "entropy_quantile"], ki=0.05, coef_scale=0.1)
    full, control = controller(**options), ControlState()
    history = []
    for k, entropy in enumerate(entropies):
        full.update(control, step(k, entropy))
        history.append(control.state_dict())
    first, partial = controller(**options), ControlState()
    for k, entropy in enumerate(entropies[:3]):
        first.update(partial, step(k, entropy))
    resumed, saved = controller(**options), ControlState()
    resumed.load_state_dict(first.state_dict())
    saved.load_state_dict(partial.state_dict())
    for k, entropy in enumerate(entropies[3:], start=3):
        resumed.update(saved, step(k, entropy))
        assert saved.state_dict() == history[k], k
    assert len({round(state["entropy_coef"], 12) for state in history}) > 1


# ----------------------------------------------------------------------------- training runs

# The commands: model=tiny trainer.max_steps=2 rollout.epochs=2 (and the test sizes).
COMMAND = [*TINY_OVERRIDES, "rollout.epochs=2", "validate_before_training=false", "trainer.val_check_interval=100"]


def train(tmp_path: Path, name: str, *overrides: str) -> dict[str, list[float]]:
    run(compose_config(COMMAND + list(overrides)), run_dir=tmp_path / name)
    return {tag: [value for _, value in points] for tag, points in read_scalars(tmp_path / name).items()}


def test_train_adaptive_entropy(tmp_path: Path) -> None:
    shut = train(tmp_path, "shut", "scheduler=adaptive_entropy")
    # The tiny model's entropy is far above 0.2 nats: the gate stays shut, alpha at its floor.
    assert shut["control/entropy_coef"] == [0.0, 0.0]
    assert shut["control/entropy_coef_applied"] == [0.0, 0.0]
    assert shut["control/entropy_target"] == pytest.approx([0.2, 0.2])
    assert shut["entropy/controller_measured"] == shut["entropy/rollout"]
    assert shut["control/entropy_gate"] == [0.0, 0.0]

    # A target of twice the first entropy: the gate opens and alpha rises from the first step.
    open_ = train(tmp_path, "open", "scheduler=adaptive_entropy", "scheduler.relative_to_initial=true",
                  "scheduler.target_entropy=2.0")
    assert open_["control/entropy_coef"] == pytest.approx([0.005, 0.01])
    assert open_["control/entropy_coef_applied"] == pytest.approx([0.005, 0.01])
    assert open_["control/entropy_target"] == pytest.approx([2.0 * open_["entropy/rollout"][0]] * 2)
    # Same seed, same first rollout: the loss of step 0 differs by the bonus, -0.005 * H.
    assert open_["entropy/rollout"][0] == shut["entropy/rollout"][0]
    difference = open_["optim/loss"][0] - shut["optim/loss"][0]
    assert difference == pytest.approx(-0.005 * open_["entropy/update"][0], rel=1e-2)
    # The bonus raised the entropy: step 1 samples the same prompts after different updates.
    assert open_["entropy/rollout"][1] > shut["entropy/rollout"][1]


def test_train_target_entropy_entropy_coef(tmp_path: Path) -> None:
    # The shipped target falls from 1.0 to 0.5 of H_init: on target at step 0 (no coefficient),
    # then above it, so the coefficient turns negative (a penalty), as far as its rate limit.
    plain = train(tmp_path, "plain", "scheduler=target_entropy")
    assert plain["control/entropy_coef"][0] == 0.0
    assert plain["control/entropy_coef"][1] == pytest.approx(max(-0.05, plain["control/controller_output"][1]))
    assert plain["control/entropy_coef"][1] < 0.0
    assert plain["control/eps_high"] == pytest.approx([0.2, 0.2])  # not an actuator by default
    # The controller read the optimizer's momentum per rollout, AdamW's beta1 ** updates_per_rollout:
    # after output 0 at step 0 and r at step 1, the bias-corrected carried output is r / (1 + rho).
    config = compose_config(COMMAND)
    rho = 0.9 ** (config.rollout.epochs * config.rollout.mini_batches)
    applied = plain["control/entropy_coef"][1]
    assert plain["control/controller_carried"] == pytest.approx([0.0, applied / (1.0 + rho)], abs=1e-7)
    # A target far above it: the coefficient ramps at its rate limit (0.1 a rollout).
    above = train(tmp_path, "above", "scheduler=target_entropy", "scheduler.target_start=2.0")
    assert above["control/entropy_coef"] == pytest.approx([0.1, 0.2])
    # With the lead and a feed-forward: the coefficient starts at the feed-forward, ramps at its
    # rate limit, and at step 1 the lead weighs the output against the 0.1 the momentum carries.
    led = train(tmp_path, "led", "scheduler=target_entropy", "scheduler.target_start=2.0", "scheduler.lead=0.5",
                "scheduler.coef_feedforward=0.04")
    assert led["control/entropy_coef"] == pytest.approx([0.14, min(0.24, 0.04 + led["control/controller_output"][1])])
    # Combined: the same output moves the clip bounds (0.02 a rollout) and the coefficient.
    both = train(tmp_path, "both", "scheduler=target_entropy", "scheduler.actuator=[clip,entropy_coef]",
                 "scheduler.target_start=2.0")
    assert both["control/entropy_coef"] == pytest.approx([0.1, 0.2])
    assert both["control/eps_high"] == pytest.approx([0.22, 0.24])
    assert both["control/eps_low"] == pytest.approx([0.18, 0.16])
    # One output drives both (the step-1 entropies differ in the last bits: other clip bounds).
    assert both["control/controller_output"][0] == above["control/controller_output"][0]
    assert both["control/controller_output"] == pytest.approx(above["control/controller_output"], rel=1e-4)


def test_adaptive_entropy_survives_resume(tmp_path: Path) -> None:
    common = ["scheduler=adaptive_entropy", "scheduler.relative_to_initial=true", "scheduler.target_entropy=2.0"]
    full = train(tmp_path, "full", *common, "trainer.max_steps=3")
    train(tmp_path, "first", *common)
    ckpt = tmp_path / "first" / "checkpoints" / "last.ckpt"
    resumed = train(tmp_path, "resumed", *common, "trainer.max_steps=3", f"ckpt_path={ckpt}")
    assert full["control/entropy_coef"] == pytest.approx([0.005, 0.01, 0.015])
    for tag in ("control/entropy_coef", "control/entropy_coef_applied", "control/entropy_target",
                "control/entropy_gate", "entropy/controller_measured", "optim/loss"):
        assert resumed[tag] == [full[tag][2]], tag
