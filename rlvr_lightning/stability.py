"""The exploding-update guard: an optimizer update that is finite but would wreck the weights.

A NaN/Inf loss or gradient is caught by ``update.PolicyUpdater`` before the optimizer steps. An
update can also be finite and still destroy the model (``optim.lr=1e12``: the first update moves
every weight by about 1e12). ``explosion_reason`` checks, before the step is taken, the bounds
``optim.stop_loss`` (|loss|), ``optim.stop_grad_norm`` (the gradient norm before clipping) and
``optim.stop_update_ratio`` (the size of the update AdamW is about to take, relative to the
weights: ``||delta|| / ||theta||``); the updater skips such an update (the weights and the
optimizer state stay as they were) and the module stops the run with a checkpoint of that state.

AdamW's next update is a function of the gradients and the optimizer state, so it is known
before the step: ``delta = -lr * (wd * theta + m_hat / (sqrt(v_hat) + eps))`` with ``m`` and
``v`` advanced by this gradient. Computing it reads every parameter, gradient and both moments
(about twice the time of the fused step), so ``update_ratio`` does it only when a bound that
reads nothing but the weights' norm says the ratio could exceed the limit: for moments
accumulated from zero under the current betas, Cauchy-Schwarz gives, per element,
``|m_hat| / sqrt(v_hat) <= F(t) = (1 - b1) / sqrt(1 - b2) * sqrt(sum_{j<t} (b1^2 / b2)^j) *
sqrt(1 - b2^t) / (1 - b1^t)`` (``F(1) = 1``; about 7.3 for the default betas), hence
``||delta|| <= lr * (wd * ||theta|| + F(t) * sqrt(N))`` over ``N`` elements. In ordinary training
the bound is far below the limit and the check costs one norm of the weights per update.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from rlvr_lightning.distributed import _local


def _adam_factor(beta1: float, beta2: float, step: float) -> float:
    """``F(t)``: a bound on ``|m_hat| / sqrt(v_hat)`` at step ``t`` (see the module docstring)."""
    if beta2 <= 0.0:
        return math.inf
    ratio = beta1 * beta1 / beta2
    try:
        terms = step if ratio == 1.0 else (1.0 - ratio**step) / (1.0 - ratio)
        return (
            (1.0 - beta1) / math.sqrt(1.0 - beta2) * math.sqrt(terms)
            * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)
        )
    except (OverflowError, ZeroDivisionError, ValueError):
        return math.inf


def _step_sq(param: torch.Tensor, state: dict, lr: float, beta1: float, beta2: float, eps: float, decay: float) -> float:
    """``||delta||^2`` of AdamW's next update of ``param`` (this rank's shard); reads only."""
    grad = _local(param.grad).detach().float()
    step = float(state.get("step", 0.0)) + 1.0
    exp_avg, exp_avg_sq = state.get("exp_avg"), state.get("exp_avg_sq")
    m = grad * (1.0 - beta1) if exp_avg is None else torch.lerp(_local(exp_avg).float(), grad, 1.0 - beta1)
    v = grad.square().mul_(1.0 - beta2) if exp_avg_sq is None else (
        _local(exp_avg_sq).float().mul(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    )
    denominator = v.sqrt_().div_(math.sqrt(1.0 - beta2**step)).add_(eps)
    delta = m.div_(denominator).mul_(lr / (1.0 - beta1**step))
    if decay:
        delta.add_(_local(param).detach().float(), alpha=lr * decay)
    return float(delta.square().sum(dtype=torch.float64))


def update_ratio(
    optimizer: torch.optim.Optimizer,
    limit: float,
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
    exact: bool = False,
) -> float | None:
    """``||delta|| / ||theta||`` of the AdamW update ``optimizer.step()`` would take now, over the
    parameters that have a gradient; None when the bound shows it is at most ``limit`` (or the
    optimizer is not Adam-like, or the weights are all zero). ``reduce_sum``: the sum over ranks
    when parameters are sharded (every rank must call this). ``exact``: skip the bound (the
    moments were accumulated under other betas, where it does not hold)."""
    groups = []
    for group in optimizer.param_groups:
        params = [p for p in group["params"] if p.grad is not None]
        if params and "betas" in group:
            groups.append((group, params))
    if not groups:
        return None
    device = _local(groups[0][1][0]).device
    sizes = torch.tensor(
        [[float(torch.nn.utils.get_total_norm([_local(p).detach() for p in params]).double()) ** 2,
          float(sum(_local(p).numel() for p in params))] for _, params in groups],
        dtype=torch.float64,
    )
    if reduce_sum is not None:
        sizes = reduce_sum(sizes.to(device)).cpu()
    weights = math.sqrt(float(sizes[:, 0].sum()))
    if weights == 0.0:
        return None
    if not exact:
        bound = 0.0
        for (group, params), (square, count) in zip(groups, sizes.tolist(), strict=True):
            beta1, beta2 = group["betas"]
            steps = {float(optimizer.state.get(p, {}).get("step", 0.0)) + 1.0 for p in params}
            factor = max(_adam_factor(float(beta1), float(beta2), t) for t in steps)
            bound += float(group["lr"]) * (float(group.get("weight_decay", 0.0)) * math.sqrt(square) + factor * math.sqrt(count))
        if bound <= limit * weights:
            return None
    squares = torch.tensor(
        [sum(_step_sq(p, optimizer.state.get(p, {}), float(group["lr"]), float(group["betas"][0]),
                      float(group["betas"][1]), float(group.get("eps", 1e-8)), float(group.get("weight_decay", 0.0)))
             for p in params) for group, params in groups],
        dtype=torch.float64,
    )
    if reduce_sum is not None:
        squares = reduce_sum(squares.to(device)).cpu()
    return math.sqrt(float(squares.sum())) / weights


def nonfinite_stop_message(step: int, count: int, limit: int, path: object) -> str:
    """Why the run stopped after ``count`` NaN/Inf updates in a row, what ``path`` holds, what to try."""
    return (
        f"training stopped at step {step}: {count} optimizer updates "
        f"in a row had a NaN/Inf loss or gradient and were skipped "
        f"(optim.max_consecutive_nonfinite_updates={limit}). {path} holds the state before "
        f"them: the skipped updates changed nothing, so the weights and optimizer moments are "
        f"those the last update taken left (if the loss or optim/grad_norm was already climbing "
        f"before, resume from an earlier step_*.ckpt instead). Try a lower optim.lr or "
        f"optim.max_grad_norm, check the data and rewards of the last steps "
        f"(optim/skipped_nonfinite_updates in TensorBoard), then resume with ckpt_path={path} "
        f"(a changed optim.lr takes effect on resume)"
    )


def exploding_stop_message(step: int, what: str, path: object) -> str:
    """Why the run stopped before an exploding update (``what``), what ``path`` holds, what to try."""
    return (
        f"training stopped at step {step}: {what}. That update and the rest of the step were "
        f"not taken, so {path} holds the state before it: the weights and optimizer moments "
        f"as the last update taken left them, and the step counter at {step + 1}. Lower "
        f"optim.lr, or loosen the bound if it is too tight for this "
        f"model (optim.stop_update_ratio, optim.stop_grad_norm, optim.stop_loss; null turns "
        f"one off), then resume with ckpt_path={path} (a changed optim.lr takes effect on resume)"
    )


def explosion_reason(
    loss: float,
    grad_norm: float,
    optimizer: torch.optim.Optimizer,
    stop_loss: float | None,
    stop_grad_norm: float | None,
    stop_update_ratio: float | None,
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
    exact: bool = False,
) -> str | None:
    """Why the update about to be taken (finite loss and gradient) would blow up the weights,
    naming the bound it exceeds; None when it is within every bound that is set."""
    ratio = None
    if stop_update_ratio is not None:  # first: under sharding it is a collective on every rank
        ratio = update_ratio(optimizer, stop_update_ratio, reduce_sum, exact)
    if stop_loss is not None and abs(loss) > stop_loss:
        return f"its loss {loss:.4g} is beyond optim.stop_loss={stop_loss:g} (|loss| > stop_loss)"
    if stop_grad_norm is not None and grad_norm > stop_grad_norm:
        return (
            f"its gradient norm {grad_norm:.4g} (before clipping to optim.max_grad_norm) is above "
            f"optim.stop_grad_norm={stop_grad_norm:g}"
        )
    if ratio is not None and ratio > stop_update_ratio:
        rates = sorted({float(group["lr"]) for group in optimizer.param_groups})
        return (
            f"it would change the weights by {ratio:.3g} times their norm (||update|| / ||weights|| "
            f"above optim.stop_update_ratio={stop_update_ratio:g}; learning rate {', '.join(f'{r:g}' for r in rates)})"
        )
    return None
