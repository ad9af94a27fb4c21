"""Objective interface, registry and loss aggregation (docs/algorithms.md sections 1 and 2.9).

An objective is a pure tensor function: it gets one micro-batch of per-token tensors
(``PolicyBatch``), the thresholds in force (``ControlState``) and its own parameters, and
returns the per-token loss ``l_t`` with a dict of named metrics. It knows nothing about models
or Lightning. ``compute_loss`` then applies ERC (section 3), aggregates over the mask with the
objective's aggregation mode and the true global counts of the optimizer mini-batch, and adds
the extras of section 2.9.

Adding an objective is one function plus one decorator::

    @register_objective("my_loss", aggregation="token-mean", options={"my_scale": 1.0})
    def my_loss(batch: PolicyBatch, control: ControlState, params: ObjectiveParams) -> ObjectiveTerms:
        scale = float(params.options.get("my_scale", 1.0))
        ...

The registry is the one home of an objective's defaults: ``aggregation`` applies whenever
``objective.aggregation`` is null, and ``options`` names every key the objective reads from
``objective.options`` with its default; any other key is an error (``check_objective_options``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from rlvr_lightning.control import ControlState
from rlvr_lightning.objectives.correction import loss_weights

LOG_RATIO_CLAMP = 20.0
KL_VALUE_CLAMP = 10.0  # k3 is clamped to [-10, 10] (verl, SkyRL, EasyR1)
# Estimators of the KL term (spec A8); the importance-weighted form r * k needs one whose
# expectation is the KL itself.
KL_ESTIMATORS = ("k1", "k2", "k3", "k3_plus")
KL_IMPORTANCE_WEIGHTED = ("k1", "k3")
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


@dataclass
class PolicyBatch:
    """Per-token tensors of one micro-batch, all ``[batch, response_length]``.

    ``logp`` carries the gradient; everything else is detached data from the rollout.
    """

    logp: torch.Tensor
    old_logp: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor
    # H(pi_theta) at each position from the update pass (needed by ERC and the entropy bonus).
    entropy: torch.Tensor | None = None
    # H(pi_old) from the pre-update pass on the rollout (needed by ERC).
    old_entropy: torch.Tensor | None = None
    # log pi_ref for the k3 KL penalty.
    ref_logp: torch.Tensor | None = None
    # [batch] bool: response judged correct (NLL on correct responses).
    correct: torch.Tensor | None = None
    # Random generator for objectives that sample tokens (Clip-Cov).
    generator: torch.Generator | None = None
    # Top-entropy-quantile mask e (objectives/entropy_mask.py, arXiv 2506.01939): multiplies the
    # objective's per-token loss, not the extras; None: off.
    token_mask: torch.Tensor | None = None
    # Rollout correction weights iw_t (objectives/correction.py, ALGORITHMS_NEXT A3), detached:
    # multiply the objective's per-token loss, not the extras; None: off.
    is_weights: torch.Tensor | None = None


@dataclass
class LossNormalizer:
    """Global counts of the optimizer mini-batch, over all micro-batches and ranks."""

    num_tokens: float
    num_sequences: float
    max_response_length: int
    # Data-parallel gradients are averaged over ranks; each rank's share is scaled back up so
    # the averaged gradient equals that of the global mean.
    world_size: int = 1
    # Global count of response tokens of correct responses (NLL extra, section 2.9).
    num_correct_tokens: float = 0.0


@dataclass
class ObjectiveParams:
    """Per-objective settings that are not control state (which schedules may change)."""

    # None: the objective's registered default (``ObjectiveSpec.default_aggregation``).
    aggregation: str | None = None
    # Extras of section 2.9, combinable with any objective. The entropy bonus coefficient is
    # control state (``ControlState.entropy_coef``), since schedules may move it.
    kl_coef: float = 0.0
    # The KL term's estimator: k1 | k2 | k3 (GRPO's) | k3_plus (k3's value, k2's gradient), and
    # whether it is weighted by the non-detached ratio r = pi_theta / pi_old (k1 or k3; spec A8).
    kl_estimator: str = "k3"
    kl_importance_weight: bool = False
    nll_coef: float = 0.0
    # Objective-specific options (Clip-Cov / KL-Cov ratios, GSPO log clamp, ...); only the names
    # the objective declares (``ObjectiveSpec.options``), absent ones take their defaults.
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, objective: dict[str, Any]) -> ObjectiveParams:
        """The settings of an ``objective`` config block (its other keys are not these)."""
        if "entropy_coef" in objective:
            raise ValueError(
                "objective.entropy_coef moved to objective.control.entropy_coef (the coefficient "
                "in force, which schedules may change)"
            )
        return cls(
            aggregation=resolve_aggregation(objective["name"], objective.get("aggregation")),
            kl_coef=float(objective.get("kl_coef", 0.0)),
            kl_estimator=str(objective.get("kl_estimator", "k3")),
            kl_importance_weight=bool(objective.get("kl_importance_weight", False)),
            nll_coef=float(objective.get("nll_coef", 0.0)),
            options=dict(objective.get("options") or {}),
        )


@dataclass
class ObjectiveTerms:
    """What an objective returns: per-token loss (to be aggregated) and named metrics."""

    per_token_loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


ObjectiveFn = Callable[[PolicyBatch, ControlState, ObjectiveParams], ObjectiveTerms]


@dataclass(frozen=True)
class ObjectiveSpec:
    name: str
    fn: ObjectiveFn
    default_aggregation: str
    uses_clipping: bool
    doc: str
    # Every key the objective reads from ``ObjectiveParams.options``, with its default.
    options: Mapping[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, ObjectiveSpec] = {}


def register_objective(
    name: str,
    *,
    aggregation: str = "token-mean",
    uses_clipping: bool = True,
    options: Mapping[str, Any] | None = None,
) -> Callable[[ObjectiveFn], ObjectiveFn]:
    """Register ``fn`` under ``name``.

    ``aggregation`` is the default when ``objective.aggregation`` is null; ``options`` maps
    every key ``fn`` reads from ``params.options`` to its default (none: the objective takes no
    options); ``uses_clipping`` drives the one-update warning.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; choose one of {AGGREGATIONS}")

    def decorator(fn: ObjectiveFn) -> ObjectiveFn:
        if name in _REGISTRY:
            raise ValueError(f"objective {name!r} is registered twice")
        _REGISTRY[name] = ObjectiveSpec(
            name,
            fn,
            aggregation,
            uses_clipping,
            (fn.__doc__ or "").strip(),
            dict(options or {}),
        )
        return fn

    return decorator


def declare_objective_options(name: str, **defaults: Any) -> None:
    """Declare the option names objective ``name`` reads, with their defaults.

    The same as ``register_objective(..., options=...)``, for an objective registered without
    them (``objectives/__init__.py`` declares those of the built-in objectives).
    """
    spec = get_objective(name)
    _REGISTRY[name] = replace(spec, options={**spec.options, **defaults})


def get_objective(name: str) -> ObjectiveSpec:
    if name not in _REGISTRY:
        raise KeyError(
            f"unknown objective {name!r}; available: {', '.join(available_objectives())}"
        )
    return _REGISTRY[name]


def available_objectives() -> list[str]:
    return sorted(_REGISTRY)


def objective_options(name: str) -> dict[str, Any]:
    """The options objective ``name`` reads, with their defaults (empty: it takes none)."""
    return dict(get_objective(name).options)


def check_objective_options(name: str, options: Mapping[str, Any] | None) -> None:
    """Raise ValueError for a key of ``options`` that objective ``name`` does not read.

    The message names the key, the objective and the allowed keys, e.g.
    ``objective.options.clip_cov_ration is unknown for objective 'clip_cov'; allowed:
    clip_cov_lower, clip_cov_ratio, clip_cov_upper``.
    """
    allowed = get_objective(name).options
    unknown = [str(key) for key in (options or {}) if key not in allowed]
    if not unknown:
        return
    keys = ", ".join(f"objective.options.{key}" for key in unknown)
    verb = "is" if len(unknown) == 1 else "are"
    if allowed:
        hint = f"allowed: {', '.join(sorted(allowed))}"
    else:
        hint = "this objective takes no options"
    raise ValueError(f"{keys} {verb} unknown for objective {name!r}; {hint}")


def resolve_aggregation(name: str, aggregation: str | None) -> str:
    """``aggregation``, or objective ``name``'s registered default when it is None."""
    mode = get_objective(name).default_aggregation if aggregation is None else aggregation
    if mode not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {mode!r}; choose one of {AGGREGATIONS}")
    return mode


# ----------------------------------------------------------------------------- helpers


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Plain token mean over ``mask`` (0 when the mask is empty). Used for metrics."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def masked_max(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Largest of ``values`` where ``mask`` is true (0 when none is). Used for metrics."""
    return values[mask].max() if mask.any() else values.new_zeros(())


def log_ratio(batch: PolicyBatch) -> torch.Tensor:
    """``logp - logp_old`` clamped to [-20, 20] before any ``exp`` (section 1)."""
    return (batch.logp - batch.old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def aggregate(
    per_token_loss: torch.Tensor, mask: torch.Tensor, mode: str, normalizer: LossNormalizer
) -> torch.Tensor:
    """This micro-batch's share of the mini-batch loss under ``mode`` (section 1).

    Summing the returned values over all micro-batches (and ranks, after the data-parallel
    average) gives exactly the mini-batch loss, so the gradient does not depend on how the
    mini-batch is split.
    """
    mask = mask.to(per_token_loss.dtype)
    masked = per_token_loss * mask
    scale = float(normalizer.world_size)
    if mode == "token-mean":
        return masked.sum() * scale / max(normalizer.num_tokens, 1.0)
    if mode == "seq-mean-token-mean":
        per_sequence = masked.sum(-1) / mask.sum(-1).clamp_min(1.0)
        return per_sequence.sum() * scale / max(normalizer.num_sequences, 1.0)
    if mode == "seq-mean-token-sum":
        return masked.sum() * scale / max(normalizer.num_sequences, 1.0)
    if mode == "seq-mean-token-sum-norm":
        denominator = max(normalizer.num_sequences, 1.0) * max(normalizer.max_response_length, 1)
        return masked.sum() * scale / denominator
    raise ValueError(f"unknown aggregation {mode!r}; choose one of {AGGREGATIONS}")


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(pi_theta || pi_ref) per token (section 2.2), clamped as specified."""
    diff = (ref_logp - logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return (diff.exp() - diff - 1.0).clamp(-10.0, 10.0)


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) (spec A8; Schulman 2020), with
    ``u = logp_ref - logp`` clamped to [-20, 20]:

    - ``k1 = -u``: ``g = 1``, zero gradient in expectation (no regularisation);
    - ``k2 = u^2 / 2``: ``g = logp - logp_ref``, the unbiased gradient of KL(pi || ref) (2510.01555);
    - ``k3 = e^u - u - 1``, clamped to [-10, 10]: ``g = 1 - e^u``, the gradient of the forward
      KL(ref || pi) (GRPO's, section 2.2);
    - ``k3_plus``: k3's value with k2's gradient (straight-through; verl ``k3+``).
    """
    if estimator == "k3":
        return k3_kl(logp, ref_logp)
    u = (ref_logp - logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    if estimator == "k1":
        return -u
    if estimator == "k2":
        return 0.5 * u.square()
    if estimator == "k3_plus":
        k2 = 0.5 * u.square()
        return k3_kl(logp, ref_logp).detach() + (k2 - k2.detach())
    raise ValueError(f"unknown objective.kl_estimator {estimator!r}; choose one of {', '.join(KL_ESTIMATORS)}")


def kl_term(batch: PolicyBatch, params: ObjectiveParams) -> torch.Tensor:
    """The per-token KL term, before ``kl_coef``: ``params.kl_estimator``, and with
    ``params.kl_importance_weight`` that estimate times the ratio ``r = exp(logp - logp_old)``
    (clamped log, not detached): ``r * k3`` has ``g = r * (logp - logp_ref)``, whose expectation
    over samples from pi_old is the gradient of KL(pi_theta || pi_ref) (DeepSeek-V3.2, arXiv
    2512.02556; TRL ``use_bias_correction_kl``); likewise ``r * k1``."""
    if batch.ref_logp is None:
        raise ValueError("kl_coef > 0 needs reference log-probs (ref_logp) in the batch")
    kl = kl_estimate(batch.logp, batch.ref_logp, params.kl_estimator)
    if not params.kl_importance_weight:
        return kl
    if params.kl_estimator not in KL_IMPORTANCE_WEIGHTED:
        raise ValueError(
            f"kl_importance_weight with kl_estimator={params.kl_estimator!r}: the r-weighted form needs an "
            f"estimator whose expectation is the KL ({' or '.join(KL_IMPORTANCE_WEIGHTED)})"
        )
    return log_ratio(batch).exp() * kl


def erc_in_band(
    batch: PolicyBatch, control: ControlState
) -> tuple[torch.Tensor, torch.Tensor]:
    """ERC band membership and entropy ratio ``rho`` per token (section 3).

    A token is in band when ``1 - beta_low < rho < 1 + beta_high`` (open interval).
    """
    if batch.entropy is None or batch.old_entropy is None:
        raise ValueError("ERC needs both the update-pass entropy and the rollout (old) entropy")
    rho = (batch.entropy.detach() + 1e-8) / (batch.old_entropy.detach() + 1e-8)
    return (rho > 1.0 - control.erc_beta_low) & (rho < 1.0 + control.erc_beta_high), rho


def compute_loss(
    name: str,
    batch: PolicyBatch,
    control: ControlState,
    params: ObjectiveParams,
    normalizer: LossNormalizer,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Objective ``name`` plus ERC and extras, aggregated: this micro-batch's loss share.

    Metrics are plain token means over this micro-batch's mask (not the loss aggregation),
    prefixed ``objective/``; the caller averages them over micro-batches weighted by tokens.
    Raises ValueError for an option the objective does not read (``check_objective_options``);
    ``params.aggregation`` None takes the objective's registered default.
    """
    spec = get_objective(name)
    check_objective_options(name, params.options)
    aggregation = resolve_aggregation(name, params.aggregation)
    terms = spec.fn(batch, control, params)
    per_token = terms.per_token_loss
    metrics = {f"objective/{k}": v.detach() for k, v in terms.metrics.items()}
    mask = batch.mask.to(per_token.dtype)
    if batch.token_mask is not None:
        # e_t * l_t (entropy_mask.py): the objective's loss only; the extras below keep the mask
        # m and the normaliser still counts every m token.
        # (A where, not a product: a dropped token's non-finite loss must not turn into NaN.)
        per_token = torch.where(batch.token_mask.bool(), per_token, torch.zeros_like(per_token))
    if batch.is_weights is not None:
        # iw_t * l_t (correction.py): after every clip of the objective, the extras below stay
        # unweighted and the normaliser unchanged; sequence-level objectives take each sequence's
        # geometric mean of the weights. (A where: a zero weight must not turn inf into NaN.)
        weights = loss_weights(name, batch.is_weights, mask).to(per_token.dtype)
        per_token = torch.where(weights != 0, per_token * weights, torch.zeros_like(per_token))
    policy_per_token = per_token

    if control.erc_enabled:
        in_band, rho = erc_in_band(batch, control)
        # Out-of-band tokens keep their loss value but lose their gradient, and still count in
        # the denominator (section 3).
        per_token = torch.where(in_band, per_token, per_token.detach())
        valid = mask.bool()
        metrics["objective/erc_in_band_fraction"] = masked_mean(in_band.float(), mask)
        metrics["objective/erc_above_band_fraction"] = masked_mean(
            (rho >= 1.0 + control.erc_beta_high).float(), mask
        )
        metrics["objective/erc_below_band_fraction"] = masked_mean(
            (rho <= 1.0 - control.erc_beta_low).float(), mask
        )
        if valid.any():
            values = rho[valid].float()
            for q in (0.05, 0.5, 0.95):
                metrics[f"objective/erc_rho_p{int(q * 100):02d}"] = values.quantile(q)

    if params.kl_coef:
        if batch.ref_logp is None:
            raise ValueError("kl_coef > 0 needs reference log-probs (ref_logp) in the batch")
        kl = kl_term(batch, params)
        per_token = per_token + params.kl_coef * kl
        metrics["objective/kl_ref"] = masked_mean(kl.detach(), mask)  # the term in use
        for estimator in ("k1", "k3"):  # each an unbiased estimate of the KL's value on-policy
            value = kl_estimate(batch.logp.detach(), batch.ref_logp, estimator)
            metrics[f"objective/kl_ref_{estimator}"] = masked_mean(value, mask)

    loss = aggregate(per_token, mask, aggregation, normalizer)
    metrics["objective/policy_loss"] = masked_mean(policy_per_token.detach(), mask)

    entropy_coef = control.applied_entropy_coef  # 0 while an adaptive gate is shut (A2)
    if entropy_coef:
        if batch.entropy is None:
            raise ValueError("entropy_coef > 0 needs the update-pass entropy in the batch")
        # Token mean over the same mask as the policy loss, over the whole mini-batch.
        loss = loss - entropy_coef * aggregate(batch.entropy, mask, "token-mean", normalizer)

    if params.nll_coef:
        if batch.correct is None:
            raise ValueError("nll_coef > 0 needs the per-response correctness in the batch")
        correct_mask = mask * batch.correct.to(mask.dtype).unsqueeze(-1)
        # Mean over the tokens of correct responses in the whole mini-batch.
        count = normalizer.num_correct_tokens
        if count > 0:
            nll = -(batch.logp * correct_mask).sum() * normalizer.world_size / count
            loss = loss + params.nll_coef * nll
            metrics["objective/nll_correct"] = masked_mean(-batch.logp.detach(), correct_mask)

    return loss, metrics
