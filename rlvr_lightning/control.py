"""The mutable control state that objectives read and schedule callbacks write.

A training step reads the thresholds in force from one ``ControlState``; callbacks (see
``rlvr_lightning.schedulers``) may change any field before each rollout. The state is saved in
checkpoints so a resumed run continues with the thresholds it had.

Probability-dependent bounds follow docs/algorithms.md section 4.2 (arXiv 2602.09782):
``eps_high(p) = high_prob_slope * p + high_prob_intercept`` and
``eps_low(p) = low_prob_slope * p + low_prob_intercept`` with ``p`` the token's (detached)
probability under the policy being updated. Since ``p = r * p_old``, the constraint
``r <= 1 + eps_high(r * p_old)`` is ``r <= (1 + intercept_h) / (1 - slope_h * p_old)`` and
``r >= 1 - eps_low(r * p_old)`` is ``r >= (1 - intercept_l) / (1 + slope_l * p_old)``; we use these
closed forms, written as per-token epsilons ``H(p_old)`` and ``M(p_old)`` and clamped to
``[prob_eps_min, prob_eps_max]``, so the bounds depend only on the rollout and stay fixed across
the updates of one step. The bound in force mixes the plain epsilon with the shaped one:
``E+ = high_prob_weight * H + (1 - high_prob_weight) * eps_high`` (likewise ``E-`` with ``M``),
which covers every schedule of section 4.3.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch


@dataclass
class ControlAccess:
    """The ``ControlState`` fields read and written inside one ``ControlState.recording()`` block."""

    read: set[str] = field(default_factory=set)
    written: set[str] = field(default_factory=set)


@dataclass
class ControlState:
    """Thresholds and coefficients in force for the next policy update."""

    # Plain PPO clip range: clip(r, 1 - eps_low, 1 + eps_high).
    eps_low: float = 0.2
    eps_high: float = 0.2
    # Dual clip constant c > 1 for negative advantages; None turns dual clip off.
    dual_clip: float | None = None
    # CE-GPPO gradient coefficients (arXiv 2509.20712): beta1 on the negative-advantage,
    # low-ratio side; beta2 on the positive-advantage, high-ratio side.
    beta1: float = 0.0
    beta2: float = 0.0
    # Entropy bonus coefficient (docs/algorithms.md 2.9): L -= entropy_coef * token_mean(H_t).
    # Schedules may move it (scheduler=adaptive_entropy, scheduler=target_entropy with
    # actuator=entropy_coef); 0 turns the bonus off.
    entropy_coef: float = 0.0
    # Gate of the adaptive entropy coefficient (arXiv 2505.22312): False holds the bonus off
    # while entropy_coef keeps its value; None (no gate) applies entropy_coef as it is.
    entropy_gate: bool | None = None
    # Entropy Ratio Clipping band (arXiv 2512.05591); None turns ERC off.
    erc_beta_low: float | None = None
    erc_beta_high: float | None = None
    # Top-entropy-quantile token mask rho (arXiv 2506.01939; objectives/entropy_mask.py): only
    # the top rho fraction of the mini-batch's tokens by pi_old's entropy keep their loss.
    # 1.0 turns the mask off.
    entropy_quantile: float = 1.0
    # Probability-dependent bounds (section 4.2). Weight 0 means the plain epsilon alone.
    high_prob_weight: float = 0.0
    low_prob_weight: float = 0.0
    high_prob_slope: float = -0.25
    high_prob_intercept: float = 0.5
    low_prob_slope: float = -0.13
    low_prob_intercept: float = 0.3
    prob_eps_min: float = 0.05
    prob_eps_max: float = 0.6
    # Free-form, numeric description of the schedule's state (phase, OD state, target entropy),
    # logged every step under ``control/``; a key holding a ``/`` is a whole tag
    # (``entropy/controller_measured``).
    info: dict[str, float] = field(default_factory=dict)

    @property
    def erc_enabled(self) -> bool:
        return self.erc_beta_low is not None and self.erc_beta_high is not None

    @property
    def applied_entropy_coef(self) -> float:
        """The entropy bonus coefficient the loss uses: ``entropy_coef`` unless the gate is shut."""
        return 0.0 if self.entropy_gate is False else float(self.entropy_coef)

    @property
    def prob_dependent(self) -> bool:
        return self.high_prob_weight != 0.0 or self.low_prob_weight != 0.0

    def clip_bounds(self, old_logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token ``(E-, E+)`` as detached tensors shaped like ``old_logp``."""
        old_prob = old_logp.detach().exp()
        eps_high = torch.full_like(old_prob, self.eps_high)
        eps_low = torch.full_like(old_prob, self.eps_low)
        if self.high_prob_weight != 0.0:
            shaped = self.shaped_eps_high(old_prob)
            eps_high = self.high_prob_weight * shaped + (1.0 - self.high_prob_weight) * eps_high
        if self.low_prob_weight != 0.0:
            shaped = self.shaped_eps_low(old_prob)
            eps_low = self.low_prob_weight * shaped + (1.0 - self.low_prob_weight) * eps_low
        return eps_low, eps_high

    def shaped_eps_high(self, old_prob: torch.Tensor) -> torch.Tensor:
        """``H(p_old)``: ``(1 + intercept) / (1 - slope * p_old) - 1``, clamped (section 4.2)."""
        bound = (1.0 + self.high_prob_intercept) / (1.0 - self.high_prob_slope * old_prob)
        return (bound - 1.0).clamp(self.prob_eps_min, self.prob_eps_max)

    def shaped_eps_low(self, old_prob: torch.Tensor) -> torch.Tensor:
        """``M(p_old)``: ``1 - (1 - intercept) / (1 + slope * p_old)``, clamped (section 4.2)."""
        bound = (1.0 - self.low_prob_intercept) / (1.0 + self.low_prob_slope * old_prob)
        return (1.0 - bound).clamp(self.prob_eps_min, self.prob_eps_max)

    def scalars(self) -> dict[str, float]:
        """The numeric fields for logging (None fields are left out)."""
        out: dict[str, float] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "info" or value is None:
                continue
            out[f.name] = float(value)
        out.update({k: float(v) for k, v in self.info.items()})
        return out

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        known = {f.name for f in fields(self)}
        unknown = set(state) - known
        if unknown:
            raise ValueError(
                f"control state in checkpoint has unknown fields {sorted(unknown)}; "
                "it was written by a different rlvr_lightning version"
            )
        for key, value in state.items():
            setattr(self, key, dict(value) if key == "info" else value)

    # Which controls a run uses: the module records the fields the update reads and the fields
    # the schedules write, and logs only those (``rlvr_lightning.tensorboard.UsedControls``).

    @contextmanager
    def recording(self) -> Iterator[ControlAccess]:
        """Record the fields read and written inside the block (blocks may nest)."""
        access = ControlAccess()
        logs = self.__dict__.setdefault("_access_logs", [])
        logs.append(access)
        try:
            yield access
        finally:
            logs.remove(access)

    def __getattribute__(self, name: str) -> Any:
        if name in _FIELD_NAMES:
            for access in object.__getattribute__(self, "__dict__").get("_access_logs", ()):
                access.read.add(name)
        return object.__getattribute__(self, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _FIELD_NAMES:
            for access in self.__dict__.get("_access_logs", ()):
                access.written.add(name)
        object.__setattr__(self, name, value)


_FIELD_NAMES = frozenset(f.name for f in fields(ControlState))
