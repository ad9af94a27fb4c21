"""Schedules and a closed-loop controller for the clip thresholds (docs/algorithms.md section 4).

Every class here is a ``ControlCallback``: the training module calls ``update(control, info)``
once per rollout, after the rollout's entropy is measured and before the policy updates that
use it, and the callback rewrites fields of the ``ControlState``.

- ``LinearSchedule`` / ``CosineSchedule``: anneal any float field(s) of the control state.
- ``IncreaseThenDecrease`` (ID), ``DecreaseIncreaseDecrease`` (DID), ``OscillatoryDecay`` (OD):
  the scheduled probability-dependent bounds of arXiv 2602.09782 (sections 4.2 and 4.3).
- ``BetaStages``: the CE-GPPO stage switch of (beta1, beta2) (arXiv 2509.20712, section 2.5).
- ``TargetEntropy``: a bounded PI controller that tracks a target entropy curve (section 4.4),
  moving the clip bounds, the CE-GPPO betas, the entropy coefficient or the entropy quantile.
- ``AdaptiveEntropy``: Skywork-OR1's adaptive entropy coefficient (arXiv 2505.22312).

The section 4.3 bounds are written through the mixing weights of ``ControlState``:
``E+ = high_prob_weight * H(p) + (1 - high_prob_weight) * eps_std_high`` and
``E- = low_prob_weight * M(p) + (1 - low_prob_weight) * eps_std_low``, where ``eps_std_*`` is
the plain epsilon the objective's config set. The schedules remember those plain values at
their first ``update`` call and write them back every step, so the bounds never drift.

All schedules measure progress as ``k / T`` with ``k = info.step`` (rollouts completed before
this one) and ``T = info.total_steps`` (``trainer.max_steps``), or the ``total_steps`` given to
the constructor, which takes precedence; progress past ``T`` is held at 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields
from typing import Any

import lightning.pytorch as pl

from rlvr_lightning.control import ControlState
from rlvr_lightning.schedulers.base import ControlCallback, StepInfo

# ----------------------------------------------------------------------------- helpers


def float_fields() -> tuple[str, ...]:
    """Names of the ControlState fields a schedule may anneal (float, possibly optional)."""
    return tuple(
        f.name for f in fields(ControlState) if f.name != "info" and "float" in str(f.type)
    )


def _check_total_steps(total_steps: int | None) -> None:
    if total_steps is not None and (int(total_steps) != total_steps or total_steps <= 0):
        raise ValueError(f"total_steps must be a positive integer or None (got {total_steps})")


def _horizon(info: StepInfo, total_steps: int | None, name: str) -> int:
    """The run length T: the constructor's ``total_steps`` if set, else ``info.total_steps``."""
    horizon = total_steps if total_steps is not None else info.total_steps
    if horizon is None or horizon <= 0:
        raise ValueError(
            f"{name} needs the run length: total_steps must be > 0 (got {horizon}); set "
            "trainer.max_steps or pass total_steps to the schedule"
        )
    return int(horizon)


def _progress(info: StepInfo, total_steps: int | None, name: str) -> float:
    """``k / T`` clamped to [0, 1]."""
    horizon = _horizon(info, total_steps, name)
    return min(max(info.step / horizon, 0.0), 1.0)


def _cosine(start: float, end: float, fraction: float) -> float:
    """Half-cosine from ``start`` (fraction 0) to ``end`` (fraction 1)."""
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * fraction))


def _check_finite_entropy(value: float, name: str) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} got a non-finite rollout entropy ({value})")
    return value


# ----------------------------------------------------------------------------- annealing


class _AnnealSchedule(ControlCallback):
    """Shared code of ``LinearSchedule`` and ``CosineSchedule``."""

    shape = "linear"

    def __init__(
        self,
        field: str | Sequence[str] = "eps_high",
        start: float | Sequence[float] = 0.28,
        end: float | Sequence[float] = 0.2,
        start_step: int = 0,
        end_step: int | None = None,
    ) -> None:
        names = [field] if isinstance(field, str) else list(field)
        if not names:
            raise ValueError("field must name at least one ControlState field")
        valid = float_fields()
        for name in names:
            if name not in valid:
                raise ValueError(
                    f"field {name!r} is not a float field of ControlState; valid fields: "
                    f"{', '.join(valid)}"
                )
        if len(set(names)) != len(names):
            raise ValueError(f"field lists a name twice: {names}")
        starts = self._per_field(start, len(names), "start")
        ends = self._per_field(end, len(names), "end")
        if int(start_step) != start_step or start_step < 0:
            raise ValueError(f"start_step must be an integer >= 0 (got {start_step})")
        if end_step is not None and (int(end_step) != end_step or end_step <= start_step):
            raise ValueError(
                f"end_step must be an integer > start_step ({start_step}) or None (got {end_step})"
            )
        self.fields = names
        self.starts = starts
        self.ends = ends
        self.start_step = int(start_step)
        self.end_step = None if end_step is None else int(end_step)

    @staticmethod
    def _per_field(value: float | Sequence[float], count: int, name: str) -> list[float]:
        values = [value] * count if isinstance(value, (int, float)) else list(value)
        if len(values) != count:
            raise ValueError(f"{name} needs one value per field ({count}), got {len(values)}")
        out = [float(v) for v in values]
        if not all(math.isfinite(v) for v in out):
            raise ValueError(f"{name} values must be finite (got {out})")
        return out

    @property
    def state_key(self) -> str:
        # Several annealers may run at once on different fields: keep their states apart.
        return self._generate_state_key(fields=tuple(self.fields))

    def fraction(self, info: StepInfo) -> float:
        """Position in [start_step, end_step] as a fraction in [0, 1]."""
        end_step = self.end_step if self.end_step is not None else info.total_steps
        if end_step is None or end_step <= self.start_step:
            raise ValueError(
                f"{type(self).__name__} needs end_step > start_step ({self.start_step}); got "
                f"end_step={end_step} (set end_step or trainer.max_steps)"
            )
        span = end_step - self.start_step
        return min(max((info.step - self.start_step) / span, 0.0), 1.0)

    def value(self, start: float, end: float, fraction: float) -> float:
        raise NotImplementedError

    def update(self, control: ControlState, info: StepInfo) -> None:
        fraction = self.fraction(info)
        for name, start, end in zip(self.fields, self.starts, self.ends, strict=True):
            setattr(control, name, self.value(start, end, fraction))
        control.info["schedule_progress"] = fraction

    def state_dict(self) -> dict[str, Any]:
        return {}  # the values are a pure function of the step

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        return None


class LinearSchedule(_AnnealSchedule):
    """Linear annealing of ControlState float field(s) from ``start`` to ``end``.

    ``value(k) = start + (end - start) * f`` with ``f = (k - start_step) / (end_step -
    start_step)`` clamped to [0, 1]; ``end_step`` defaults to ``trainer.max_steps``. Before
    ``start_step`` the field holds ``start``, after ``end_step`` it holds ``end``.

    Args:
        field: a field name (``"eps_high"``, ``"beta1"``, ``"erc_beta_high"``, ...) or a list.
        start, end: one value, or one per field.
        start_step, end_step: the annealing window in rollouts.

    The defaults (as ``conf/scheduler/linear.yaml``) relax clip-high early and tighten it:
    ``eps_high`` from DAPO's 0.28 to the symmetric 0.2 over the whole run.
    """

    def value(self, start: float, end: float, fraction: float) -> float:
        return start + (end - start) * fraction


class CosineSchedule(_AnnealSchedule):
    """Half-cosine annealing of ControlState float field(s) from ``start`` to ``end``.

    ``value(k) = end + (start - end) * (1 + cos(pi * f)) / 2`` with ``f`` as in
    ``LinearSchedule``. Same arguments as ``LinearSchedule``.
    """

    def value(self, start: float, end: float, fraction: float) -> float:
        return _cosine(start, end, fraction)


# ----------------------------------------------------------------------------- section 4.3


class _ProbBoundSchedule(ControlCallback):
    """Remembers the plain epsilons (``eps_std``) at the first update and restores them."""

    def __init__(self, total_steps: int | None = None) -> None:
        _check_total_steps(total_steps)
        self.total_steps = total_steps
        self.eps_std_low: float | None = None
        self.eps_std_high: float | None = None

    def _apply(self, control: ControlState, high_weight: float, low_weight: float) -> None:
        if self.eps_std_low is None or self.eps_std_high is None:
            self.eps_std_low = float(control.eps_low)
            self.eps_std_high = float(control.eps_high)
        control.eps_low = self.eps_std_low
        control.eps_high = self.eps_std_high
        control.high_prob_weight = float(high_weight)
        control.low_prob_weight = float(low_weight)

    def state_dict(self) -> dict[str, Any]:
        return {"eps_std_low": self.eps_std_low, "eps_std_high": self.eps_std_high}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.eps_std_low = state_dict.get("eps_std_low")
        self.eps_std_high = state_dict.get("eps_std_high")


class _PhasedSchedule(_ProbBoundSchedule):
    """ID and DID: a two-phase schedule driven by ``lam`` (section 4.3)."""

    def __init__(self, phase_split: float = 0.5, total_steps: int | None = None) -> None:
        super().__init__(total_steps)
        if not 0.0 < phase_split < 1.0:
            raise ValueError(f"phase_split must lie in the open interval (0, 1) (got {phase_split})")
        self.phase_split = float(phase_split)

    def phase_and_lambda(self, info: StepInfo) -> tuple[int, float]:
        """Phase 0 while ``k/T <= phase_split``; ``lam`` falls linearly 1 -> 0 -> -1.

        With ``phase_split = s``: ``lam = 1 - (k/T)/s`` in phase 0 and
        ``lam = -(k/T - s)/(1 - s)`` in phase 1; for ``s = 0.5`` both are ``1 - 2k/T``.
        """
        fraction = _progress(info, self.total_steps, type(self).__name__)
        split = self.phase_split
        if fraction <= split:
            return 0, 1.0 - fraction / split
        return 1, -(fraction - split) / (1.0 - split)

    def weights(self, phase: int, lam: float) -> tuple[float, float]:
        raise NotImplementedError

    def update(self, control: ControlState, info: StepInfo) -> None:
        phase, lam = self.phase_and_lambda(info)
        high_weight, low_weight = self.weights(phase, lam)
        self._apply(control, high_weight, low_weight)
        control.info["schedule_phase"] = float(phase)
        control.info["schedule_lambda"] = lam


class IncreaseThenDecrease(_PhasedSchedule):
    """Increase-then-decrease (ID) bounds, arXiv 2602.09782 (docs/algorithms.md section 4.3).

    With ``lam = 1 - 2k/T`` (for ``phase_split = 0.5``; see ``phase_and_lambda``):

    - ``k <= T/2``: ``E+ = lam*H(p) + (1-lam)*eps_std``, ``E- = eps_std``
      (``high_prob_weight = lam``, ``low_prob_weight = 0``);
    - ``k > T/2``: ``E+ = eps_std``, ``E- = (1+lam)*M(p) - lam*eps_std``
      (``high_prob_weight = 0``, ``low_prob_weight = 1 + lam``).

    ``H(p)``/``M(p)`` are the probability-dependent bounds of section 4.2 whose coefficients
    live in the control state. The paper found ID best overall, and the split 0.5 best among
    {0.3, 0.4, 0.5, 0.6}. Logs ``schedule_phase`` (0 or 1) and ``schedule_lambda``.

    Args:
        phase_split: fraction of the run spent in the first phase, in (0, 1).
        total_steps: run length T; None reads ``trainer.max_steps``.
    """

    def weights(self, phase: int, lam: float) -> tuple[float, float]:
        return (lam, 0.0) if phase == 0 else (0.0, 1.0 + lam)


class DecreaseIncreaseDecrease(_PhasedSchedule):
    """Decrease-increase-decrease (DID) bounds, arXiv 2602.09782 (docs/algorithms.md section 4.3).

    With ``lam = 1 - 2k/T`` (for ``phase_split = 0.5``):

    - ``k <= T/2``: ``E+ = lam*eps_std + (1-lam)*H(p)``, ``E- = eps_std``
      (``high_prob_weight = 1 - lam``, ``low_prob_weight = 0``);
    - ``k > T/2``: ``E+ = H(p)``, ``E- = (1+lam)*M(p) - lam*eps_std``
      (``high_prob_weight = 1``, ``low_prob_weight = 1 + lam``).

    Logs ``schedule_phase`` (0 or 1) and ``schedule_lambda``. Arguments as for
    ``IncreaseThenDecrease``.
    """

    def weights(self, phase: int, lam: float) -> tuple[float, float]:
        return (1.0 - lam, 0.0) if phase == 0 else (1.0, 1.0 + lam)


BOOST = 1
SUPPRESS = -1
_OD_STATES = {"boost": BOOST, "suppress": SUPPRESS}


class OscillatoryDecay(_ProbBoundSchedule):
    """Oscillatory decay (OD) bounds, arXiv 2602.09782 (docs/algorithms.md section 4.3).

    A hysteresis (bang-bang) switch on the measured rollout entropy ``H_k``:
    ``H_init`` = entropy of the first rollout seen, ``H_min = min_ratio * H_init``,
    ``tau_low = H_min``, ``tau_high(k) = H_min + (H_init - H_min) * (1 - k/T)``.

    - boost when ``H_k <= tau_low``: ``(E+, E-) = (H(p), eps_std)``
      (``high_prob_weight = 1``, ``low_prob_weight = 0``);
    - suppress when ``H_k > tau_high(k)``: ``(E+, E-) = (eps_std, M(p))``
      (``high_prob_weight = 0``, ``low_prob_weight = 1``);
    - otherwise keep the previous state.

    The first step is decided by the same rule; there ``H_k = H_init = tau_high(0)``, so with
    ``min_ratio < 1`` and a positive entropy it falls between the thresholds and the state is
    ``initial_state``, by default ``"suppress"``: the run starts on the decaying ceiling and
    the schedule lets entropy fall towards ``H_min`` before the first boost, as the name says.

    Logs ``od_state`` (+1 boost, -1 suppress), ``od_tau_high``, ``od_tau_low``,
    ``od_entropy_init``. ``H_init``, the current state and ``eps_std`` are checkpointed.

    Args:
        min_ratio: ``H_min / H_init``, in (0, 1); the paper uses 0.2.
        initial_state: ``"suppress"`` or ``"boost"``, the state before any threshold is crossed.
        total_steps: run length T; None reads ``trainer.max_steps``.
    """

    def __init__(
        self,
        min_ratio: float = 0.2,
        initial_state: str = "suppress",
        total_steps: int | None = None,
    ) -> None:
        super().__init__(total_steps)
        if not 0.0 < min_ratio < 1.0:
            raise ValueError(f"min_ratio must lie in the open interval (0, 1) (got {min_ratio})")
        if initial_state not in _OD_STATES:
            raise ValueError(
                f"initial_state must be one of {sorted(_OD_STATES)} (got {initial_state!r})"
            )
        self.min_ratio = float(min_ratio)
        self.initial_state = initial_state
        self.entropy_init: float | None = None
        self.state: int = _OD_STATES[initial_state]

    def thresholds(self, info: StepInfo) -> tuple[float, float]:
        """``(tau_low, tau_high(k))``; needs ``entropy_init`` to be set."""
        assert self.entropy_init is not None
        entropy_min = self.min_ratio * self.entropy_init
        fraction = _progress(info, self.total_steps, type(self).__name__)
        tau_high = entropy_min + (self.entropy_init - entropy_min) * (1.0 - fraction)
        return entropy_min, tau_high

    def update(self, control: ControlState, info: StepInfo) -> None:
        entropy = _check_finite_entropy(info.rollout_entropy, type(self).__name__)
        if self.entropy_init is None:
            self.entropy_init = entropy
        tau_low, tau_high = self.thresholds(info)
        if entropy <= tau_low:
            self.state = BOOST
        elif entropy > tau_high:
            self.state = SUPPRESS
        if self.state == BOOST:
            self._apply(control, high_weight=1.0, low_weight=0.0)
        else:
            self._apply(control, high_weight=0.0, low_weight=1.0)
        control.info["od_state"] = float(self.state)
        control.info["od_tau_high"] = tau_high
        control.info["od_tau_low"] = tau_low
        control.info["od_entropy_init"] = self.entropy_init

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update({"entropy_init": self.entropy_init, "state": self.state})
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.entropy_init = state_dict.get("entropy_init")
        self.state = int(state_dict.get("state", _OD_STATES[self.initial_state]))


# ----------------------------------------------------------------------------- CE-GPPO stages


class BetaStages(ControlCallback):
    """CE-GPPO stage switch of the gradient coefficients, arXiv 2509.20712 (section 2.5).

    ``stages`` is a list of ``(step, beta1, beta2)`` (lists or mappings with those keys); from
    ``step`` on, ``(beta1, beta2)`` is in force, until the next stage starts. Before the first
    stage the control state keeps the objective's values. The paper reports that switching
    from (beta1, beta2) = (0, 1) to (0.5, 1) mid-training helped; e.g.
    ``stages=[(0, 0.0, 1.0), (0.5, 0.5, 1.0)]`` with ``unit="fraction"``.

    beta1 scales the negative-advantage, low-ratio side (larger beta1 lowers entropy faster);
    beta2 the positive-advantage, high-ratio side (larger beta2 raises it). Logs ``beta_stage``
    (index of the stage in force, -1 before the first).

    Args:
        stages: stage starts sorted strictly increasing, betas >= 0. Default (as
            ``conf/scheduler/beta_stages.yaml``): the paper's switch, ``[(0, 0, 1), (0.5, 0.5, 1)]``.
        unit: ``"fraction"`` (default: starts are fractions ``k/T`` of the run, in [0, 1]) or
            ``"step"`` (starts are rollout indices).
        total_steps: run length T for ``unit="fraction"``; None reads ``trainer.max_steps``.
    """

    def __init__(
        self,
        stages: Sequence[Sequence[float] | Mapping[str, float]] = (
            (0.0, 0.0, 1.0),
            (0.5, 0.5, 1.0),
        ),
        unit: str = "fraction",
        total_steps: int | None = None,
    ) -> None:
        if unit not in ("step", "fraction"):
            raise ValueError(f"unit must be 'step' or 'fraction' (got {unit!r})")
        _check_total_steps(total_steps)
        parsed: list[tuple[float, float, float]] = []
        for index, stage in enumerate(stages):
            if isinstance(stage, Mapping):
                try:
                    values = (stage["step"], stage["beta1"], stage["beta2"])
                except KeyError as missing:
                    raise ValueError(
                        f"stages[{index}] needs keys step, beta1, beta2 (missing {missing})"
                    ) from None
            else:
                values = tuple(stage)
                if len(values) != 3:
                    raise ValueError(
                        f"stages[{index}] must be (step, beta1, beta2), got {len(values)} values"
                    )
            start, beta1, beta2 = (float(v) for v in values)
            if unit == "step" and (start != int(start) or start < 0):
                raise ValueError(f"stages[{index}] step must be an integer >= 0 (got {start})")
            if unit == "fraction" and not 0.0 <= start <= 1.0:
                raise ValueError(
                    f"stages[{index}] start must be a fraction in [0, 1] (got {start}); "
                    "pass unit='step' for starts in rollouts"
                )
            for name, beta in (("beta1", beta1), ("beta2", beta2)):
                if not (math.isfinite(beta) and beta >= 0.0):
                    raise ValueError(f"stages[{index}] {name} must be finite and >= 0 (got {beta})")
            if parsed and start <= parsed[-1][0]:
                raise ValueError(
                    f"stages must be sorted by strictly increasing step: stages[{index}] starts "
                    f"at {start}, not after {parsed[-1][0]}"
                )
            parsed.append((start, beta1, beta2))
        if not parsed:
            raise ValueError("stages must hold at least one (step, beta1, beta2) stage")
        self.stages = parsed
        self.unit = unit
        self.total_steps = total_steps

    def stage_index(self, info: StepInfo) -> int:
        """Index of the stage in force at ``info.step`` (-1 before the first stage)."""
        if self.unit == "step":
            position = float(info.step)
        else:
            position = info.step / _horizon(info, self.total_steps, type(self).__name__)
        index = -1
        for i, (start, _, _) in enumerate(self.stages):
            if position >= start:
                index = i
        return index

    def update(self, control: ControlState, info: StepInfo) -> None:
        index = self.stage_index(info)
        if index >= 0:
            _, control.beta1, control.beta2 = self.stages[index]
        control.info["beta_stage"] = float(index)

    def state_dict(self) -> dict[str, Any]:
        return {}  # the stage is a pure function of the step

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        return None


# ----------------------------------------------------------------------------- section 4.4

_CURVES = ("constant", "linear", "cosine")
_ACTUATORS = ("clip", "beta", "entropy_coef", "entropy_quantile")


class TargetEntropy(ControlCallback):
    """Bounded PID controller tracking a target entropy curve (docs/algorithms.md section 4.4).

    Beyond the papers: where ID/DID (arXiv 2602.09782) are open-loop and OD is bang-bang, this
    closes the loop. Each rollout, with measured token-mean entropy ``H_k``::

        e_k = target(k) - H_k                  (positive: entropy too low)
        I_k = I_{k-1} + e_k                    (unless saturated in the direction of e_k, or
                                                |e_k| > integral_band * target(k))
        u_k = kp * e_k + ki * I_k - kd * (H_k - H_{k-1})

    Momentum lead: an actuator acts through the optimizer, whose momentum (AdamW's beta1 per
    update, ``rho = beta1 ** updates_per_rollout`` per rollout) carries on the last rollouts'
    actuator values: if rollout k applies ``v_k``, the updates move as if driven by the
    bias-corrected average ``m_k = ((1 - rho) * sum_j rho**(k-j) v_j) / (1 - rho**(k+1))``, which
    moves towards a new value only by the weight ``w_k = (1 - rho) / (1 - rho**(k+1))`` of the
    newest rollout (0.19 a rollout for beta1 0.9 and 2 updates). That lag made a plain PID ring
    (docs/experiments.md section 5). The controller keeps ``m`` itself and applies::

        v_k = m_{k-1} + max(lead / w_k, 1) * (u_k - m_{k-1})

    so that the carried value closes the fraction ``lead`` of its gap to ``u_k`` in one rollout
    instead of ``w_k``; ``lead = 0`` (or ``rho = 0``) applies ``u_k`` as it is.

    The single signal ``v`` (``u`` without a lead) moves the actuators around the values they
    had at the first update (``*_0``), then each is clamped to its bounds and rate-limited:

    - ``actuator="clip"``: ``eps_high = eps_high_0 + high_scale*u``, ``eps_low = eps_low_0 -
      low_scale*u``, both in ``[eps_min, eps_max]``. Relaxing clip-high and tightening
      clip-low both raise entropy (section 4.1, arXiv 2509.26114).
    - ``actuator="beta"``: ``beta2 = beta2_0 + high_scale*u``, ``beta1 = beta1_0 -
      low_scale*u``, both in ``[0, beta_max]``. In CE-GPPO (arXiv 2509.20712) a larger beta1 or
      a smaller beta2 lowers entropy.
    - ``actuator="entropy_coef"``: ``entropy_coef = entropy_coef_0 + coef_feedforward +
      coef_scale*u`` in ``[coef_min, coef_max]``: a larger entropy bonus raises entropy (section
      2.9), and a negative one (an entropy penalty, when ``coef_min < 0``) lowers it. The
      feed-forward is the standing bonus that holds entropy level (the balance point a step
      response measures), so the integral only has to learn how far the policy drifts from it.
    - ``actuator="entropy_quantile"``: ``entropy_quantile = entropy_quantile_0 -
      quantile_scale*u`` in ``[quantile_min, 1]`` (1: mask off): training on fewer, higher-entropy
      tokens keeps entropy up (arXiv 2506.01939, ALGORITHMS_NEXT A1).
    - A list, e.g. ``actuator=["clip", "entropy_coef"]``: the same one controller (one error,
      one integral, one ``u``) drives every listed actuator at once, each through its own gain
      (``*_scale``), bounds and rate limit, as above.

    Rate limit: each actuator moves at most its rate limit per rollout: ``max_change_per_step``
    for eps_low/eps_high/beta1/beta2, ``coef_max_change_per_step`` for entropy_coef,
    ``quantile_max_change_per_step`` for entropy_quantile.

    Anti-windup, two layers: (1) conditional integration: the integral keeps its value when
    every active actuator is held by its bound or its rate limit in the direction the error
    pushes it; (2) ``ki * I`` is clamped to the range of ``u`` over which some actuator still
    moves, so the integral stays bounded even when only one side saturates. With several
    actuators both layers span all of them: integration stops only when every one is held.

    Target curves (with ``T`` the run length and ``f = k/T``): ``constant`` = ``target_start``;
    ``linear`` from ``target_start`` to ``target_end``; ``cosine`` the half-cosine between
    them; or ``target_fn(step, total_steps) -> float`` in Python, which overrides ``curve``.
    With ``relative_to_initial`` every target is multiplied by the first rollout's entropy.

    Logs ``target_entropy``, ``entropy_error``, ``tracking_error`` (``|H_k - target(k)| /
    target(k)``, the relative tracking error; the absolute one when the target is 0),
    ``controller_integral``, ``controller_output`` (the ``u`` applied) and
    ``controller_saturated`` (1 when integration was held) and ``controller_carried`` (``m``,
    what the optimizer's momentum carries, in units of ``u``). The integral, ``m``, the initial
    actuator values, the last outputs and ``H_init`` are checkpointed.

    Args:
        target_start: target entropy (nats, or a ratio to ``H_init`` when relative) at step 0.
        target_end: target at the end for ``linear``/``cosine``; None means ``target_start``.
        curve: ``"constant"``, ``"linear"`` or ``"cosine"``.
        target_fn: optional Python callable ``(step, total_steps) -> target``.
        relative_to_initial: targets are multiples of the first rollout's entropy.
        actuator: ``"clip"`` (eps_low/eps_high), ``"beta"`` (beta1/beta2), ``"entropy_coef"``,
            ``"entropy_quantile"``, or a list of them driven together.
        kp, ki: proportional and integral gains (actuator units per nat), >= 0, not both 0.
        kd: derivative gain on the measured entropy (actuator units per nat of change between
            rollouts), >= 0; it brakes a fall or rise the optimizer's momentum would carry on
            (the lead does that without differentiating a noisy measurement).
        lead: fraction of the gap between ``u`` and the value the optimizer's momentum carries
            that one rollout closes, in [0, 1]; 0 applies ``u`` as it is (no lead).
        optimizer_momentum: ``rho``, the per-rollout persistence of the optimizer's momentum, in
            [0, 1); None reads it at the first rollout from the optimizer (``betas[0]`` of
            AdamW, or SGD's ``momentum``) raised to the power ``updates_per_rollout``, and uses
            0 when ``update`` is called outside a trainer.
        integral_band: integrate only while ``|e_k| <= integral_band * target(k)`` (keeps the
            first steps' transient out of the integral), > 0; None: always.
        eps_min, eps_max: bounds for eps_low and eps_high in clip mode, 0 <= eps_min < eps_max.
        beta_max: upper bound for beta1 and beta2 in beta mode (lower bound 0), > 0.
        max_change_per_step: rate limit per actuator and rollout, > 0; None for no limit.
        high_scale, low_scale: weight of ``u`` on the high-side actuator (eps_high/beta2) and
            the low side (eps_low/beta1), >= 0, not both 0; 0 leaves that actuator untouched.
        total_steps: run length T; None reads ``trainer.max_steps``.
        coef_scale: weight of ``u`` on entropy_coef (coefficient per unit of ``u``), > 0.
        coef_feedforward: standing entropy coefficient added to ``entropy_coef_0`` (clamped to
            the bounds), finite; the balance point of a step response (tools/step_response.py).
        coef_max: upper bound of entropy_coef, > 0.
        coef_min: lower bound of entropy_coef, in [-1, coef_max); below 0 the controller can
            penalise entropy (an entropy-minimisation term), its authority to lower entropy.
        coef_max_change_per_step: rate limit of entropy_coef per rollout, > 0; None: no limit.
        quantile_scale: weight of ``u`` on entropy_quantile (it falls as ``u`` grows), > 0.
        quantile_min: lower bound of entropy_quantile (upper bound 1), in (0, 1).
        quantile_max_change_per_step: rate limit of entropy_quantile per rollout, > 0; None: no
            limit.

    The defaults are those of ``conf/scheduler/target_entropy.yaml``: a target falling linearly
    from 1.0 to 0.5 times the first rollout's entropy, the entropy coefficient as actuator
    (``kp`` 0.2, ``ki`` 0.08, ``kd`` 0.15, integral band 0.5, no lead, no feed-forward,
    coefficient in [-0.05, 0.5], at most 0.1 per rollout), measured from step responses of
    SmolLM2-135M-Instruct (docs/experiments.md section 5). For an absolute, constant target pass
    ``curve="constant", relative_to_initial=False``.
    """

    def __init__(
        self,
        target_start: float = 1.0,
        target_end: float | None = 0.5,
        curve: str = "linear",
        target_fn: Callable[[int, int], float] | None = None,
        relative_to_initial: bool = True,
        actuator: str | Sequence[str] = "entropy_coef",
        kp: float = 0.2,
        ki: float = 0.08,
        kd: float = 0.15,
        lead: float = 0.0,
        optimizer_momentum: float | None = None,
        integral_band: float | None = 0.5,
        eps_min: float = 0.02,
        eps_max: float = 0.6,
        beta_max: float = 2.0,
        max_change_per_step: float | None = 0.02,
        high_scale: float = 1.0,
        low_scale: float = 1.0,
        total_steps: int | None = None,
        coef_scale: float = 1.0,
        coef_feedforward: float = 0.0,
        coef_max: float = 0.5,
        coef_min: float = -0.05,
        coef_max_change_per_step: float | None = 0.1,
        quantile_scale: float = 1.0,
        quantile_min: float = 0.1,
        quantile_max_change_per_step: float | None = 0.05,
    ) -> None:
        if curve not in _CURVES:
            raise ValueError(f"curve must be one of {_CURVES} (got {curve!r})")
        names = [actuator] if isinstance(actuator, str) else [str(name) for name in actuator]
        if not names or any(name not in _ACTUATORS for name in names) or len(set(names)) != len(names):
            raise ValueError(
                f"actuator must be one of {_ACTUATORS} or a list of distinct ones (got {actuator!r})"
            )
        if target_fn is not None and not callable(target_fn):
            raise ValueError("target_fn must be a callable (step, total_steps) -> float or None")
        for name, value in (("target_start", target_start), ("target_end", target_end)):
            if value is not None and not (math.isfinite(value) and value >= 0.0):
                raise ValueError(f"{name} must be finite and >= 0 (got {value})")
        for name, value in (
            ("kp", kp),
            ("ki", ki),
            ("kd", kd),
            ("high_scale", high_scale),
            ("low_scale", low_scale),
        ):
            if not (math.isfinite(value) and value >= 0.0):
                raise ValueError(f"{name} must be finite and >= 0 (got {value})")
        if kp == 0.0 and ki == 0.0:
            raise ValueError("kp and ki are both 0: the controller would never act")
        if not (math.isfinite(lead) and 0.0 <= lead <= 1.0):
            raise ValueError(f"lead must lie in [0, 1] (got {lead}); 0 applies the controller output as it is")
        if optimizer_momentum is not None and not (
            math.isfinite(optimizer_momentum) and 0.0 <= optimizer_momentum < 1.0
        ):
            raise ValueError(
                f"optimizer_momentum must lie in [0, 1) or be None to read it from the optimizer "
                f"(got {optimizer_momentum})"
            )
        if not math.isfinite(coef_feedforward):
            raise ValueError(f"coef_feedforward must be finite (got {coef_feedforward})")
        if integral_band is not None and not (math.isfinite(integral_band) and integral_band > 0.0):
            raise ValueError(f"integral_band must be > 0 or None (got {integral_band})")
        if high_scale == 0.0 and low_scale == 0.0 and {"clip", "beta"} & set(names):
            raise ValueError("high_scale and low_scale are both 0: no actuator would move")
        for name, value in (("coef_scale", coef_scale), ("coef_max", coef_max), ("quantile_scale", quantile_scale)):
            if not (math.isfinite(value) and value > 0.0):
                raise ValueError(f"{name} must be finite and > 0 (got {value})")
        if not (math.isfinite(coef_min) and -1.0 <= coef_min < coef_max):
            raise ValueError(
                f"coef_min must be finite with -1 <= coef_min < coef_max = {coef_max} (got {coef_min}); "
                "a negative coef_min lets the controller penalise entropy"
            )
        if not 0.0 < quantile_min < 1.0:
            raise ValueError(f"quantile_min must lie in the open interval (0, 1) (got {quantile_min})")
        for name, value in (
            ("coef_max_change_per_step", coef_max_change_per_step),
            ("quantile_max_change_per_step", quantile_max_change_per_step),
        ):
            if value is not None and not value > 0.0:
                raise ValueError(f"{name} must be > 0 or None (got {value})")
        if not (0.0 <= eps_min < eps_max and math.isfinite(eps_max)):
            raise ValueError(
                f"eps bounds must satisfy 0 <= eps_min < eps_max < inf (got {eps_min}, {eps_max})"
            )
        if not (math.isfinite(beta_max) and beta_max > 0.0):
            raise ValueError(f"beta_max must be finite and > 0 (got {beta_max})")
        if max_change_per_step is not None and not max_change_per_step > 0.0:
            raise ValueError(f"max_change_per_step must be > 0 or None (got {max_change_per_step})")
        _check_total_steps(total_steps)
        self.target_start = float(target_start)
        self.target_end = float(target_start if target_end is None else target_end)
        self.curve = curve
        self.target_fn = target_fn
        self.relative_to_initial = bool(relative_to_initial)
        self.actuator = actuator if isinstance(actuator, str) else list(names)
        self.actuators = tuple(names)
        self.kp = float(kp)
        self.ki = float(ki)
        self.kd = float(kd)
        self.lead = float(lead)
        self.optimizer_momentum = None if optimizer_momentum is None else float(optimizer_momentum)
        self.integral_band = None if integral_band is None else float(integral_band)
        self.eps_min = float(eps_min)
        self.eps_max = float(eps_max)
        self.beta_max = float(beta_max)
        self.max_change_per_step = None if max_change_per_step is None else float(max_change_per_step)
        self.high_scale = float(high_scale)
        self.low_scale = float(low_scale)
        self.total_steps = total_steps
        self.coef_scale = float(coef_scale)
        self.coef_feedforward = float(coef_feedforward)
        self.coef_max = float(coef_max)
        self.coef_min = float(coef_min)
        self.coef_max_change_per_step = (
            None if coef_max_change_per_step is None else float(coef_max_change_per_step)
        )
        self.quantile_scale = float(quantile_scale)
        self.quantile_min = float(quantile_min)
        self.quantile_max_change_per_step = (
            None if quantile_max_change_per_step is None else float(quantile_max_change_per_step)
        )
        # Controller state (checkpointed).
        self.integral = 0.0
        self.entropy_init: float | None = None
        self.initial: dict[str, float] | None = None  # actuator values at the first update
        self.last: dict[str, float] | None = None  # actuator values written last step
        self.last_output = 0.0
        self.last_entropy: float | None = None  # the previous rollout's, for the derivative term
        # What the optimizer's momentum carries (units of u): the rho-weighted sum of the
        # outputs applied, and how many rollouts it holds (for Adam's bias correction).
        self.carried_sum = 0.0
        self.carried_count = 0
        # rho in use: optimizer_momentum, or what on_rollout_end reads from the optimizer.
        self.momentum = 0.0 if optimizer_momentum is None else float(optimizer_momentum)

    @property
    def relies_on_clipping(self) -> bool:  # type: ignore[override]
        return bool({"clip", "beta"} & set(self.actuators))

    def _actuators(self) -> list[tuple[str, float, float, float, float, float | None]]:
        """Every field moved, as (name, direction of u, scale, lower, upper, rate limit);
        direction +1: the field grows with u (raises entropy when it grows)."""
        out: list[tuple[str, float, float, float, float, float | None]] = []
        for actuator in self.actuators:
            if actuator in ("clip", "beta"):
                high, low = ("eps_high", "eps_low") if actuator == "clip" else ("beta2", "beta1")
                lower, upper = (self.eps_min, self.eps_max) if actuator == "clip" else (0.0, self.beta_max)
                if self.high_scale > 0.0:
                    out.append((high, 1.0, self.high_scale, lower, upper, self.max_change_per_step))
                if self.low_scale > 0.0:
                    out.append((low, -1.0, self.low_scale, lower, upper, self.max_change_per_step))
            elif actuator == "entropy_coef":
                out.append(
                    ("entropy_coef", 1.0, self.coef_scale, self.coef_min, self.coef_max,
                     self.coef_max_change_per_step)
                )
            else:  # entropy_quantile: fewer, higher-entropy tokens raise entropy
                out.append(
                    ("entropy_quantile", -1.0, self.quantile_scale, self.quantile_min, 1.0,
                     self.quantile_max_change_per_step)
                )
        return out

    def target(self, info: StepInfo) -> float:
        """Target entropy at ``info.step`` (absolute, nats)."""
        if self.target_fn is not None:
            horizon = self.total_steps if self.total_steps is not None else info.total_steps
            value = float(self.target_fn(info.step, horizon))
        elif self.curve == "constant":
            value = self.target_start
        else:
            fraction = _progress(info, self.total_steps, type(self).__name__)
            if self.curve == "linear":
                value = self.target_start + (self.target_end - self.target_start) * fraction
            else:
                value = _cosine(self.target_start, self.target_end, fraction)
        if self.relative_to_initial:
            assert self.entropy_init is not None
            value *= self.entropy_init
        return value

    def _output_range(self) -> tuple[float, float]:
        """Range of ``u`` over which at least one actuator is still inside its bounds."""
        assert self.initial is not None
        u_min, u_max = math.inf, -math.inf
        for name, direction, scale, lower, upper, _ in self._actuators():
            # value = initial + direction*scale*u must lie in [lower, upper].
            ends = sorted(
                ((lower - self.initial[name]) / (direction * scale),
                 (upper - self.initial[name]) / (direction * scale))
            )
            u_min, u_max = min(u_min, ends[0]), max(u_max, ends[1])
        return u_min, u_max

    def _actuate(self, output: float) -> tuple[dict[str, float], bool, bool]:
        """Actuator values for ``output``; and whether all are held going up / going down.

        "Held going up" means no actuator can follow a larger ``u`` this step (each sits at
        its bound or its rate limit in the direction a larger ``u`` would move it).
        """
        assert self.initial is not None and self.last is not None
        values: dict[str, float] = {}
        held_up, held_down = True, True
        tolerance = 1e-12
        for name, direction, scale, lower, upper, max_change in self._actuators():
            wanted = self.initial[name] + direction * scale * output
            low_limit, high_limit = lower, upper
            if max_change is not None:
                low_limit = max(low_limit, self.last[name] - max_change)
                high_limit = min(high_limit, self.last[name] + max_change)
            value = min(max(wanted, low_limit), high_limit)
            values[name] = value
            # A larger u moves this actuator in `direction`; it is held if the limit bites there.
            if direction > 0:
                held_up &= wanted >= high_limit - tolerance
                held_down &= wanted <= low_limit + tolerance
            else:
                held_up &= wanted <= low_limit + tolerance
                held_down &= wanted >= high_limit - tolerance
        return values, held_up, held_down

    def update(self, control: ControlState, info: StepInfo) -> None:
        entropy = _check_finite_entropy(info.rollout_entropy, type(self).__name__)
        if self.entropy_init is None:
            self.entropy_init = entropy
        if self.initial is None:
            self.initial = {}
            for name, _, _, lower, upper, _ in self._actuators():
                value = float(getattr(control, name))
                if not lower <= value <= upper:
                    raise ValueError(
                        f"TargetEntropy: initial {name} = {value} lies outside the actuator "
                        f"bounds [{lower}, {upper}]; widen them or change the objective config"
                    )
                if name == "entropy_coef":
                    value = min(max(value + self.coef_feedforward, lower), upper)
                self.initial[name] = value
            self.last = dict(self.initial)
        target = self.target(info)
        error = target - entropy
        # Derivative on the measurement, not the error: a moving target gives no kick. Falling
        # entropy raises u before the error grows (the actuators act through the optimizer's
        # momentum, so their effect lags).
        slope = 0.0 if self.last_entropy is None else entropy - self.last_entropy
        damping = -self.kd * slope

        # Conditional integration: try the new integral, keep the old one if saturated, or
        # (integral_band) while the error is large, e.g. in the first steps' transient.
        candidate = self.integral + error
        _, held_up, held_down = self._actuate(self._lead(self.kp * error + self.ki * candidate + damping))
        saturated = (error > 0 and held_up) or (error < 0 and held_down)
        outside_band = self.integral_band is not None and abs(error) > self.integral_band * abs(target)
        integral = self.integral if saturated or outside_band else candidate
        # Bound the integral term to the useful range of u.
        if self.ki > 0.0:
            u_min, u_max = self._output_range()
            integral = min(max(integral, u_min / self.ki), u_max / self.ki)
        self.integral = integral
        output = self._lead(self.kp * error + self.ki * integral + damping)
        values, _, _ = self._actuate(output)
        for name, value in values.items():
            setattr(control, name, value)
        self.last = values
        self.last_output = output
        self.last_entropy = entropy
        # What the optimizer will carry: the output the actuators took, after bounds and limits.
        self.carried_sum = self.momentum * self.carried_sum + (1.0 - self.momentum) * self._applied_output(values)
        self.carried_count += 1
        control.info["target_entropy"] = target
        control.info["entropy_error"] = error
        # Relative tracking error |H - target| / target (the absolute error when the target is 0).
        control.info["tracking_error"] = abs(error) / abs(target) if target != 0.0 else abs(error)
        control.info["controller_integral"] = integral
        control.info["controller_output"] = output
        control.info["controller_saturated"] = float(saturated)
        control.info["controller_carried"] = self._carried()

    def on_rollout_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, info: StepInfo) -> None:
        if self.optimizer_momentum is None:  # one float from the optimizer, each rollout
            self.momentum = _optimizer_momentum(trainer, pl_module)
        super().on_rollout_end(trainer, pl_module, info)

    def _carried(self) -> float:
        """The bias-corrected output the optimizer's momentum carries (0 before any rollout)."""
        if self.carried_count == 0:
            return 0.0
        return self.carried_sum / (1.0 - self.momentum**self.carried_count)

    def _lead(self, output: float) -> float:
        """The output to apply so that the carried output closes ``lead`` of its gap to
        ``output`` this rollout (see the class docstring); ``output`` itself without a lead."""
        if self.lead == 0.0 or self.momentum == 0.0 or self.carried_count == 0:
            return output  # nothing carried yet: Adam's first update applies the gradient whole
        newest_weight = (1.0 - self.momentum) / (1.0 - self.momentum ** (self.carried_count + 1))
        carried = self._carried()
        return carried + max(self.lead / newest_weight, 1.0) * (output - carried)

    def _applied_output(self, values: dict[str, float]) -> float:
        """The output the actuators' values amount to (after bounds and rate limits), averaged
        over the actuators."""
        assert self.initial is not None
        outputs = [
            (values[name] - self.initial[name]) / (direction * scale)
            for name, direction, scale, _, _, _ in self._actuators()
        ]
        return sum(outputs) / len(outputs)

    def state_dict(self) -> dict[str, Any]:
        return {
            "integral": self.integral,
            "carried_sum": self.carried_sum,
            "carried_count": self.carried_count,
            "entropy_init": self.entropy_init,
            "initial": None if self.initial is None else dict(self.initial),
            "last": None if self.last is None else dict(self.last),
            "last_output": self.last_output,
            "last_entropy": self.last_entropy,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.integral = float(state_dict.get("integral", 0.0))
        self.entropy_init = state_dict.get("entropy_init")
        initial = state_dict.get("initial")
        last = state_dict.get("last")
        self.initial = None if initial is None else dict(initial)
        self.last = None if last is None else dict(last)
        self.last_output = float(state_dict.get("last_output", 0.0))
        self.last_entropy = state_dict.get("last_entropy")
        self.carried_sum = float(state_dict.get("carried_sum", 0.0))
        self.carried_count = int(state_dict.get("carried_count", 0))


def _optimizer_momentum(trainer: pl.Trainer, pl_module: pl.LightningModule) -> float:
    """Per-rollout persistence of the first optimizer's momentum: ``beta1 ** updates_per_rollout``
    (AdamW), ``momentum ** updates_per_rollout`` (SGD), 0 without momentum or optimizer."""
    optimizers = getattr(trainer, "optimizers", None) or []
    if not optimizers:
        return 0.0
    group = optimizers[0].param_groups[0]
    if "betas" in group:
        beta = float(group["betas"][0])
    else:
        beta = float(group.get("momentum", 0.0) or 0.0)
    updates = int(getattr(pl_module, "updates_per_rollout", 1))
    return beta**updates


# ----------------------------------------------------------------------------- adaptive entropy


class AdaptiveEntropy(ControlCallback):
    """Adaptive entropy coefficient of Skywork-OR1 (arXiv 2505.22312; ALGORITHMS_NEXT A2).

    The state is the coefficient ``alpha`` (``control.entropy_coef``, initially the objective's
    ``objective.control.entropy_coef``) and a gate (``control.entropy_gate``, shut until the
    first measurement). Each rollout, with measured entropy ``e_k``::

        if e_k < target:  alpha <- min(alpha + step_size, max_coef); gate <- open
        else:             alpha <- max(alpha - step_size, min_coef); gate <- shut
        loss:             L = L_policy - (gate * alpha) * token_mean_m(H_t)

    so the coefficient keeps moving every step, and the bonus applies only while the entropy
    is below target. ``e_k`` is the full-vocabulary entropy of pi_old (the pre-update pass),
    token mean over the loss mask of every rank (``entropy/rollout``), measured once per
    rollout and applied to that rollout's updates (no lag). Skywork measures ``-mean(logp_old)``
    after the update, for the next step; TRL compares with ``<=`` and measures pi_theta per
    optimizer step. The defaults are TRL's numbers (alpha_0 = 0, step 0.005, alpha in [0, 1],
    target 0.2 nats); Skywork's 7B/32B scripts use alpha_0 = 0.005, step 0.001, [0, 0.5].

    Logs ``control/entropy_coef`` (alpha), ``control/entropy_gate``,
    ``control/entropy_coef_applied`` (gate * alpha), ``control/entropy_target`` and
    ``entropy/controller_measured`` (e_k). Checkpoints alpha, the gate and ``H_init``.

    Args:
        target_entropy: target in nats (0.2: Skywork's value for DeepSeek-R1-Distill models),
            or a ratio to the first rollout's entropy ``H_init`` when ``relative_to_initial``.
        step_size: change of alpha per rollout, > 0.
        min_coef, max_coef: bounds of alpha, 0 <= min_coef <= max_coef.
        relative_to_initial: the target is ``target_entropy * H_init``.
    """

    relies_on_clipping = False  # the bonus acts with one optimizer step per rollout too

    def __init__(
        self,
        target_entropy: float = 0.2,
        step_size: float = 0.005,
        min_coef: float = 0.0,
        max_coef: float = 1.0,
        relative_to_initial: bool = False,
    ) -> None:
        if not (math.isfinite(target_entropy) and target_entropy >= 0.0):
            raise ValueError(f"target_entropy must be finite and >= 0 (got {target_entropy})")
        if not (math.isfinite(step_size) and step_size > 0.0):
            raise ValueError(f"step_size must be finite and > 0 (got {step_size})")
        if not (0.0 <= min_coef <= max_coef and math.isfinite(max_coef)):
            raise ValueError(
                f"coefficient bounds must satisfy 0 <= min_coef <= max_coef < inf (got {min_coef}, {max_coef})"
            )
        self.target_entropy = float(target_entropy)
        self.step_size = float(step_size)
        self.min_coef = float(min_coef)
        self.max_coef = float(max_coef)
        self.relative_to_initial = bool(relative_to_initial)
        # State (checkpointed): alpha (None until the first update reads the objective's), gate.
        self.coef: float | None = None
        self.gate = False
        self.entropy_init: float | None = None

    def target(self) -> float:
        """The target entropy in nats."""
        if self.relative_to_initial:
            assert self.entropy_init is not None
            return self.target_entropy * self.entropy_init
        return self.target_entropy

    def update(self, control: ControlState, info: StepInfo) -> None:
        entropy = _check_finite_entropy(info.rollout_entropy, type(self).__name__)
        if self.entropy_init is None:
            self.entropy_init = entropy
        if self.coef is None:
            coef = float(control.entropy_coef)
            if not self.min_coef <= coef <= self.max_coef:
                raise ValueError(
                    f"AdaptiveEntropy: initial objective.control.entropy_coef = {coef} lies outside "
                    f"[min_coef, max_coef] = [{self.min_coef}, {self.max_coef}]"
                )
            self.coef = coef
        target = self.target()
        if entropy < target:
            self.coef, self.gate = min(self.coef + self.step_size, self.max_coef), True
        else:
            self.coef, self.gate = max(self.coef - self.step_size, self.min_coef), False
        control.entropy_coef = self.coef
        control.entropy_gate = self.gate
        control.info["entropy_coef_applied"] = control.applied_entropy_coef
        control.info["entropy_target"] = target
        control.info["entropy/controller_measured"] = entropy

    def state_dict(self) -> dict[str, Any]:
        return {"coef": self.coef, "gate": self.gate, "entropy_init": self.entropy_init}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.coef = state_dict.get("coef")
        self.gate = bool(state_dict.get("gate", False))
        self.entropy_init = state_dict.get("entropy_init")
