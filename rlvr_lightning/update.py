"""The policy updater: log-prob passes over a rollout, then epochs x mini-batches x micro-batches.

``PolicyUpdater`` needs no ``Trainer``: what crosses ranks or belongs to Lightning (the backward
call, sums over ranks, FSDP weight gathering) comes in as ``ParallelHooks``, whose defaults are
those of one process, so a test drives it with a model, an optimizer and a rollout.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from rlvr_lightning import distributed
from rlvr_lightning.control import ControlState
from rlvr_lightning.logprobs import (
    recomputes_activations,
    response_logprobs,
    shared_prefix_response_logprobs,
)
from rlvr_lightning.metrics import entropy_by_region
from rlvr_lightning.objectives import LossNormalizer, ObjectiveParams, PolicyBatch, compute_loss
from rlvr_lightning.objectives.base import log_ratio as policy_log_ratio
from rlvr_lightning.objectives.correction import (
    CorrectionSettings,
    correction_weights,
    known_rollout_logp,
    mismatch_metrics,
)
from rlvr_lightning.objectives.entropy_mask import (
    EntropyMaskStats,
    check_entropy_quantile,
    entropy_quantile_threshold,
    top_entropy_mask,
)
from rlvr_lightning.packing import micro_batches
from rlvr_lightning.precision import weights_cast_once
from rlvr_lightning.rollout import Rollout
from rlvr_lightning.stability import explosion_reason


def _not_gathered(model: torch.nn.Module) -> AbstractContextManager[bool]:
    return nullcontext(False)


@dataclass
class ParallelHooks:
    """What the updater asks of the training loop; the defaults are one process's."""

    backward: Callable[[torch.Tensor], None] = lambda loss: loss.backward()
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] = lambda values: values
    # FSDP2 with gather_for_rollout: the whole model gathered for a block (yields True).
    gathered: Callable[[torch.nn.Module], AbstractContextManager[bool]] = _not_gathered
    world_size: int = 1


@dataclass
class UpdateSettings:
    """The ``rollout`` and ``optim`` keys the updater reads (defaults: conf/config.yaml's)."""

    epochs: int = 1
    mini_batches: int = 2
    max_new_tokens: int = 40  # L_max, the Dr. GRPO normaliser
    temperature: float = 1.0
    max_tokens_per_micro_batch: int = 1024
    share_prompt_forward: bool = True
    max_grad_norm: float = 1.0
    max_consecutive_nonfinite_updates: int = 5
    # Exploding-update bounds (stability.py; null = off): an update beyond one is not taken and
    # the run stops with a checkpoint of the state before it.
    stop_update_ratio: float | None = 1.0
    stop_grad_norm: float | None = None
    stop_loss: float | None = None

    @classmethod
    def from_config(cls, *blocks: dict[str, Any]) -> UpdateSettings:
        """The fields found in the config blocks (``rollout``, ``optim``)."""
        names = {f.name for f in fields(cls)}
        return cls(**{key: value for block in blocks for key, value in block.items() if key in names})

    @property
    def updates_per_rollout(self) -> int:
        return self.epochs * self.mini_batches


@dataclass
class PolicyUpdater:
    """Log-prob passes and optimizer updates for one rollout at a time.

    Counts the NaN/Inf updates it skipped (``nonfinite_updates``, and in a row:
    ``consecutive_nonfinite_updates``; saved in checkpoints by the module).
    """

    policy: torch.nn.Module
    objective_name: str
    objective_params: ObjectiveParams
    control: ControlState
    settings: UpdateSettings
    ref_policy: torch.nn.Module | None = None
    hooks: ParallelHooks = field(default_factory=ParallelHooks)
    nonfinite_updates: int = 0
    consecutive_nonfinite_updates: int = 0
    # Set when an update was not taken for exploding (stability.explosion_reason): what and why.
    exploding_update: str | None = None
    # The AdamW moments were accumulated under other betas (a resume that changed optim.betas):
    # the update-size check then computes every update exactly.
    moments_from_other_betas: bool = False
    # Rollout/training mismatch correction (objectives/correction.py; the ``correction`` group).
    correction: CorrectionSettings = field(default_factory=CorrectionSettings)
    # Keep every loss token's importance ratio of the next update in ``last_ratios`` (the
    # ``hist/ratio`` histogram; set by callbacks.DashboardLogger on histogram steps).
    record_ratios: bool = False
    last_ratios: torch.Tensor | None = None

    def micro_batches(self, groups: torch.Tensor, rollout: Rollout) -> list[torch.Tensor]:
        return micro_batches(
            groups, rollout, self.settings.max_tokens_per_micro_batch, self.settings.share_prompt_forward
        )

    def forward_logprobs(
        self, model: torch.nn.Module, rollout: Rollout, rows: torch.Tensor, with_entropy: bool, entropy_grad: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None, slice]:
        """Log-probs (and entropies) of the responses of ``rows`` (whole groups, in order), with
        padding shared by all rows trimmed; returns them with the response columns they cover."""
        device = rollout.input_ids.device
        rows = rows.to(device)
        ids, attention = rollout.input_ids[rows], rollout.attention_mask[rows]
        prompt_length = ids.shape[1] - rollout.response_length
        prompt_used = attention[:, :prompt_length].any(0).nonzero()
        left = int(prompt_used[0]) if prompt_used.numel() else prompt_length
        used = slice(0, int(rollout.response_lengths[rows].max().clamp_min(1)))
        temperature = float(self.settings.temperature)
        shared = self.settings.share_prompt_forward
        if shared and torch.is_grad_enabled() and recomputes_activations(model):
            shared = False  # checkpointed layers keep no KV cache under autograd: full rows
        if shared:
            size = rollout.group_size
            logp, entropy = shared_prefix_response_logprobs(
                model,
                ids[::size, left:prompt_length],
                attention[::size, left:prompt_length],
                ids[:, prompt_length + used.start : prompt_length + used.stop],
                rollout.response_mask[rows, used],
                size,
                temperature,
                with_entropy=with_entropy,
                entropy_grad=entropy_grad,
            )
        else:
            right = prompt_length + used.stop
            logp, entropy = response_logprobs(
                model, ids[:, left:right], attention[:, left:right], used.stop, temperature,
                with_entropy=with_entropy, entropy_grad=entropy_grad,
            )
        return logp, entropy, used

    @torch.no_grad()
    def old_logprobs(self, rollout: Rollout) -> None:
        """Pre-update pass: log pi_old and H(pi_old) for every response token."""
        self._fill_logprobs(rollout, self.policy, "old_logp", "old_entropy", with_entropy=True)

    @torch.no_grad()
    def ref_logprobs(self, rollout: Rollout) -> None:
        """Log-probs of the frozen reference policy (the KL term's)."""
        assert self.ref_policy is not None
        self._fill_logprobs(rollout, self.ref_policy, "ref_logp", None, with_entropy=False)

    def _fill_logprobs(
        self, rollout: Rollout, model: torch.nn.Module, logp_key: str, entropy_key: str | None, with_entropy: bool
    ) -> None:
        n, length = len(rollout), rollout.response_length
        device = rollout.input_ids.device
        logp_all = torch.zeros(n, length, device=device)
        entropy_all = torch.zeros(n, length, device=device)
        was_training = model.training
        model.eval()
        batches = self.micro_batches(torch.arange(n // rollout.group_size), rollout)
        # (CPU bf16 autocast: the weights cast to bfloat16 once for the pass, not per micro-batch.)
        with self.hooks.gathered(model) as gathered, weights_cast_once(model):
            if not gathered and distributed.needs_synced_forwards(model):  # FSDP: as many forwards on every rank
                batches = [rows for rows, _ in distributed.equal_micro_batches(batches, device)]
            for rows in batches:
                logp, entropy, used = self.forward_logprobs(model, rollout, rows, with_entropy)
                logp_all[rows.to(device), used] = logp
                if entropy is not None:
                    entropy_all[rows.to(device), used] = entropy
        model.train(was_training)
        rollout.data[logp_key] = logp_all * rollout.response_mask
        if entropy_key is not None:
            rollout.data[entropy_key] = entropy_all * rollout.response_mask

    @staticmethod
    def rollout_entropy_metrics(rollout: Rollout) -> dict[str, float]:
        """``entropy/rollout`` (pi_old's mean token entropy) and the entropy by token region."""
        mask = rollout.data["loss_mask"]
        entropy = rollout.data["old_entropy"]
        metrics = {"entropy/rollout": float((entropy * mask).sum() / mask.sum().clamp_min(1))}
        advantages = rollout.data["advantages"].to(mask.device).unsqueeze(-1).expand_as(mask)
        metrics.update(entropy_by_region(entropy, rollout.data["old_logp"], advantages, mask))
        return metrics

    def rollout_correction(self, rollout: Rollout) -> dict[str, float]:
        """The mismatch metrics between the engine's log-probs (``rollout_logp``) and pi_old's
        (``old_logp``) over the loss mask, and under a weighting correction the importance
        weights, stored as ``rollout.data["is_weights"]`` for every mini-batch and epoch. Empty
        when the engine gave no log-probs (only allowed with ``correction.mode=none``)."""
        if "rollout_logp" not in rollout.data:
            self._require_rollout_logp(rollout)
            return {}
        mask = rollout.data["loss_mask"]
        old_logp = rollout.data["old_logp"]
        rollout_logp = rollout.data["rollout_logp"].to(old_logp.device)
        weights = truncated = None
        if self.correction.weighted:
            weights, truncated = correction_weights(old_logp, rollout_logp, mask, self.correction)
            rollout.data["is_weights"] = weights
        return mismatch_metrics(old_logp, rollout_logp, mask, weights, truncated)

    def _require_rollout_logp(self, rollout: Rollout) -> None:
        if self.correction.needs_rollout_logprobs and "rollout_logp" not in rollout.data:
            raise ValueError(
                f"correction.mode={self.correction.mode} needs the rollout engine's log-probs of the sampled "
                "tokens (rollout.data['rollout_logp']), and this rollout has none: use an engine that returns "
                "them (shared_prefix, static, vllm) or correction=none"
            )

    def rollout_entropy_all_ranks(self, rollout: Rollout) -> float:
        """pi_old's mean token entropy over the loss mask of every rank's rollout (the value
        schedules act on, so that all ranks agree; one rank: ``entropy/rollout``)."""
        mask = rollout.data["loss_mask"]
        entropy = rollout.data["old_entropy"]
        totals = self.hooks.reduce_sum(torch.stack([(entropy * mask).sum(), mask.sum().to(entropy.dtype)]))
        return float(totals[0] / totals[1].clamp_min(1))

    def _explosion(self, loss: float, grad_norm: float, optimizer: torch.optim.Optimizer, device: Any) -> str | None:
        """Why this finite update would blow up the weights (``stability.explosion_reason``), or
        None; every rank agrees (a rank over a bound stops them all)."""
        s = self.settings
        if s.stop_update_ratio is None and s.stop_grad_norm is None and s.stop_loss is None:
            return None
        sharded = distributed.is_sharded(self.policy) and distributed.world_size() > 1
        reason = explosion_reason(
            loss, grad_norm, optimizer, s.stop_loss, s.stop_grad_norm, s.stop_update_ratio,
            reduce_sum=self.hooks.reduce_sum if sharded else None, exact=self.moments_from_other_betas,
        )
        if distributed.all_ranks(reason is None, device):
            return None
        return reason or "another rank's update exceeded optim.stop_loss, stop_grad_norm or stop_update_ratio"

    def update(
        self,
        rollout: Rollout,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: Any,
        generator: torch.Generator,
        old_from_update: bool = False,
    ) -> dict[str, float]:
        """``epochs`` passes of ``mini_batches`` optimizer updates over ``rollout``.

        Mini-batches hold whole groups in the order ``generator`` draws. ``old_from_update``:
        there is one update, and its own forward pass gives pi_old's log-probs and entropies
        (written into ``rollout.data``); the rollout correction's weights are then computed per
        micro-batch from that pass (rows are whole responses, so the values are those of
        ``rollout_correction``). Under ``correction.mode=bypass`` the engine's log-probs are
        ``logp_old`` of the objective. An update whose loss or gradient is NaN/Inf on any rank
        is skipped on every rank; after ``max_consecutive_nonfinite_updates`` of them in a row no
        more updates are taken (the module then stops the run). A finite update beyond a bound of
        ``stability.explosion_reason`` (``optim.stop_update_ratio``, ``stop_grad_norm``,
        ``stop_loss``) is not taken either, nor any after it (``exploding_update`` says why).
        """
        settings = self.settings
        num_groups = len(rollout) // rollout.group_size
        device = rollout.input_ids.device
        # Dynamic sampling can leave fewer groups than mini-batches: then one group per update.
        # Every rank takes the same number of updates (their gradients are reduced together).
        mini_batches = min(settings.mini_batches, distributed.min_across_ranks(num_groups, device))
        advantages = rollout.data["advantages"].to(device)
        loss_mask = rollout.data["loss_mask"].to(device)
        correct = rollout.data["correct"].to(device)
        # The coefficient in force for this rollout: schedules set it before the update.
        need_entropy_grad = self.control.applied_entropy_coef != 0.0
        # Top-entropy-quantile mask (objectives/entropy_mask.py): its threshold needs pi_old's
        # entropies of the whole mini-batch before the first micro-batch's backward pass.
        entropy_quantile = check_entropy_quantile(self.control.entropy_quantile)
        if entropy_quantile < 1.0 and old_from_update:
            raise ValueError(
                "objective.control.entropy_quantile < 1 needs pi_old's entropies before the update: "
                "run the pre-update log-prob pass (old_from_update=False)"
            )
        mask_stats = EntropyMaskStats()
        correction = self.correction
        self._require_rollout_logp(rollout)
        rollout_logp = rollout.data["rollout_logp"].to(device) if correction.needs_rollout_logprobs else None
        if correction.weighted and not old_from_update and "is_weights" not in rollout.data:
            self.rollout_correction(rollout)
        if old_from_update:  # filled below from the (single) update pass
            for key in ("old_logp", "old_entropy"):
                rollout.data[key] = torch.zeros(len(rollout), rollout.response_length, device=device)
        totals: dict[str, float] = defaultdict(float)
        weights: dict[str, float] = defaultdict(float)
        losses, grad_norms, skipped = [], [], 0
        ratios: list[torch.Tensor] = []  # with record_ratios
        limit = settings.max_consecutive_nonfinite_updates
        stop_run = False  # the NaN/Inf limit was reached: no more updates
        for _epoch in range(settings.epochs):
            # Mini-batches of whole groups, so each group's prompt is encoded once per pass.
            group_order = torch.randperm(num_groups, generator=generator)
            for mini_groups in group_order.tensor_split(mini_batches):
                if stop_run:
                    break
                mini = (mini_groups.unsqueeze(-1) * rollout.group_size + torch.arange(rollout.group_size)).view(-1)
                mini_mask = loss_mask[mini]
                counts = torch.tensor(
                    [mini_mask.sum(), float(len(mini)), (mini_mask * correct[mini].unsqueeze(-1)).sum()],
                    device=device,
                )
                counts = self.hooks.reduce_sum(counts)
                normalizer = LossNormalizer(
                    num_tokens=float(counts[0]),
                    num_sequences=float(counts[1]),
                    max_response_length=settings.max_new_tokens,
                    world_size=self.hooks.world_size,
                    num_correct_tokens=float(counts[2]),
                )
                threshold = None
                if entropy_quantile < 1.0:
                    # tau over the valid tokens of the whole mini-batch on every rank, so the mask
                    # does not depend on micro-batch size or data-parallel layout.
                    values = distributed.gather_across_ranks(rollout.data["old_entropy"][mini][mini_mask.bool()])
                    threshold = entropy_quantile_threshold(values, entropy_quantile)
                    if threshold is not None:
                        mask_stats.add(values, threshold)
                optimizer.zero_grad(set_to_none=True)
                mini_loss = 0.0
                batches = distributed.equal_micro_batches(self.micro_batches(mini_groups, rollout), device)
                for micro, weight in batches:
                    logp, entropy, used = self.forward_logprobs(
                        self.policy, rollout, micro, with_entropy=True, entropy_grad=need_entropy_grad
                    )
                    micro_dev = micro.to(device)
                    if old_from_update:
                        rollout.data["old_logp"][micro_dev, used] = logp.detach()
                        rollout.data["old_entropy"][micro_dev, used] = entropy.detach()
                    old_logp = rollout.data["old_logp"][micro_dev, used]
                    is_weights = None
                    if correction.weighted and old_from_update:
                        is_weights, _ = correction_weights(
                            old_logp, rollout_logp[micro_dev, used], loss_mask[micro_dev, used], correction
                        )
                    elif correction.weighted:
                        is_weights = rollout.data["is_weights"][micro_dev, used]
                    if correction.bypass:  # logp_old := logp_rollout (the ratio anchors on mu)
                        old_logp = known_rollout_logp(old_logp, rollout_logp[micro_dev, used])
                    batch = PolicyBatch(
                        logp=logp,
                        old_logp=old_logp,
                        advantages=advantages[micro_dev].unsqueeze(-1).expand_as(logp),
                        mask=loss_mask[micro_dev, used],
                        entropy=entropy,
                        old_entropy=rollout.data["old_entropy"][micro_dev, used],
                        ref_logp=rollout.data["ref_logp"][micro_dev, used] if "ref_logp" in rollout.data else None,
                        correct=correct[micro_dev],
                        generator=generator,
                        token_mask=None if threshold is None else top_entropy_mask(
                            rollout.data["old_entropy"][micro_dev, used], loss_mask[micro_dev, used], threshold
                        ),
                        is_weights=is_weights,
                    )
                    loss, metrics = compute_loss(
                        self.objective_name, batch, self.control, self.objective_params, normalizer
                    )
                    if weight == 0.0:
                        # A repeat that only keeps this rank in step with the gradient reduction.
                        self.hooks.backward(loss * 0.0)
                        continue
                    self.hooks.backward(loss)
                    mini_loss += float(loss.detach())
                    tokens = float(batch.mask.sum())
                    if self.record_ratios:
                        ratios.append(policy_log_ratio(batch).detach().exp()[batch.mask.bool()].cpu())
                    metrics["entropy/update"] = (entropy.detach() * batch.mask).sum() / batch.mask.sum().clamp_min(1)
                    for key, value in metrics.items():
                        totals[key] += float(value) * tokens
                        weights[key] += tokens
                grad_norm = distributed.clip_grad_norm(
                    self.policy.parameters(), settings.max_grad_norm, sharded=distributed.is_sharded(self.policy)
                )
                finite = math.isfinite(mini_loss) and bool(torch.isfinite(grad_norm))
                if not distributed.all_ranks(finite, device):  # ranks skip or step together
                    # A NaN/Inf loss or gradient: skip this update rather than corrupt the weights.
                    optimizer.zero_grad(set_to_none=True)
                    skipped += 1
                    self.nonfinite_updates += 1
                    self.consecutive_nonfinite_updates += 1
                    stop_run = 0 < limit <= self.consecutive_nonfinite_updates
                    continue
                explosion = self._explosion(mini_loss, float(grad_norm), optimizer, device)
                if explosion is not None:  # finite, but it would wreck the weights: not taken
                    optimizer.zero_grad(set_to_none=True)
                    total = settings.epochs * mini_batches
                    self.exploding_update = f"update {len(losses) + skipped + 1} of {total} of the step: {explosion}"
                    stop_run = True
                    continue
                self.consecutive_nonfinite_updates = 0
                optimizer.step()
                lr_scheduler.step()
                losses.append(mini_loss)
                grad_norms.append(float(grad_norm))
        if old_from_update:
            for key in ("old_logp", "old_entropy"):
                rollout.data[key] = rollout.data[key] * rollout.response_mask
        out = {key: totals[key] / max(weights[key], 1e-9) for key in totals}
        out["optim/loss"] = sum(losses) / max(len(losses), 1)
        out["optim/grad_norm"] = sum(grad_norms) / max(len(grad_norms), 1)
        out["optim/skipped_nonfinite_updates"] = float(skipped)
        out.update(mask_stats.metrics())
        self.last_ratios = torch.cat(ratios) if ratios else None
        return out
