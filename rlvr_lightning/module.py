"""``RLVRModule``: one training step is one rollout followed by several policy updates.

The way through this file is the way the data goes:
prompts -> rollout (generate) -> reward -> advantage -> old log-probs and entropies ->
schedule callbacks set the control state -> ``updates_per_rollout`` optimizer steps, each over
one mini-batch accumulated in micro-batches under a token budget -> metrics.

Lightning counts one global step per rollout: the optimizer steps inside a rollout are taken on
the plain torch optimizer, and the module advances Lightning's step counter once at the end of
the training step, so ``trainer.max_steps`` is the number of rollouts.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import resource
import time
import warnings
from collections import defaultdict
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torchmetrics

from rlvr_lightning import distributed
from rlvr_lightning.advantages import constant_groups, group_advantages, overlong_penalty
from rlvr_lightning.checkpoints import rng_states, set_rng_states
from rlvr_lightning.control import ControlState
from rlvr_lightning.data.prompts import DEFAULT_INSTRUCTION, build_prompt
from rlvr_lightning.evaluation import default_k_values, majority_vote, pass_at_k
from rlvr_lightning.logprobs import (
    recomputes_activations,
    response_logprobs,
    shared_prefix_response_logprobs,
)
from rlvr_lightning.metrics import entropy_by_region
from rlvr_lightning.models import load_model_and_tokenizer
from rlvr_lightning.objectives import (
    LossNormalizer,
    ObjectiveParams,
    PolicyBatch,
    compute_loss,
    get_objective,
)
from rlvr_lightning.rewards import RewardFunction
from rlvr_lightning.rollout import Rollout, generate_rollout
from rlvr_lightning.schedulers.base import ConstantSchedule, ControlCallback, StepInfo

log = logging.getLogger(__name__)


class RLVRModule(pl.LightningModule):
    """Policy (a Hugging Face causal LM) trained with a pluggable objective.

    Args mirror the config groups: ``model`` (see ``models.load_model_and_tokenizer``),
    ``objective`` (``conf/objective/*.yaml``), ``rollout`` (generation and update shape),
    ``optim`` (optimizer and LR schedule), ``reward`` (``rewards.RewardFunction``),
    ``prompt`` (instruction and system prompt), ``logging`` (sample logging).
    """

    def __init__(
        self,
        model: dict[str, Any],
        objective: dict[str, Any],
        rollout: dict[str, Any],
        optim: dict[str, Any],
        reward: dict[str, Any],
        prompt: dict[str, Any] | None = None,
        logging: dict[str, Any] | None = None,
        validation: dict[str, Any] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.seed = seed
        self.rollout_cfg = dict(rollout)
        self.optim_cfg = dict(optim)
        self.prompt_cfg = {"instruction": DEFAULT_INSTRUCTION, "system_prompt": None, **(prompt or {})}
        self.logging_cfg = {"sample_every_n_steps": 5, "num_samples": 4, **(logging or {})}
        # Held-out accuracy: mean correctness over n_samples completions per problem (avg@n),
        # sampled at ``temperature`` (null: the rollout temperature; 0: greedy, one sample).
        self.validation_cfg = {"n_samples": 4, "temperature": None, **(validation or {})}

        self.objective_name = objective["name"]
        self.objective_spec = get_objective(self.objective_name)
        self.objective_cfg = dict(objective)
        self.objective_params = ObjectiveParams(
            aggregation=objective.get("aggregation") or self.objective_spec.default_aggregation,
            kl_coef=float(objective.get("kl_coef", 0.0)),
            entropy_coef=float(objective.get("entropy_coef", 0.0)),
            nll_coef=float(objective.get("nll_coef", 0.0)),
            options=dict(objective.get("options") or {}),
        )
        self.control = ControlState(**dict(objective.get("control") or {}))

        model = dict(model)
        gradient_checkpointing = bool(model.pop("gradient_checkpointing", False))
        self.policy, self.tokenizer = load_model_and_tokenizer(**model, seed=seed)
        if gradient_checkpointing:
            # Recompute activations in the backward pass: less memory, about a third more time.
            # transformers 5 renamed gradient_checkpointing_enable (kept as a deprecated alias).
            enable = getattr(self.policy, "activation_checkpointing_enable", None)
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.policy.train()
        self.ref_policy = None
        if self.objective_params.kl_coef > 0:
            self.ref_policy = copy.deepcopy(self.policy).eval().requires_grad_(False)
        self.reward_fn = RewardFunction(**reward)
        # Held-out metrics as per-problem means (synchronised across ranks by torchmetrics):
        # accuracy (avg@n), pass@k (unbiased) and maj@k for k in 1, 2, 4, ..., n.
        samples = self._validation_samples()
        self.val_k_values = default_k_values(samples)
        self.val_metrics = torch.nn.ModuleDict(
            {name: torchmetrics.MeanMetric() for name in self._validation_metric_names()}
        )
        self.nonfinite_updates = 0
        # NaN/Inf updates skipped in a row; the run stops (with a checkpoint) when it reaches
        # optim.max_consecutive_nonfinite_updates (0: never).
        self.consecutive_nonfinite_updates = 0
        self.max_consecutive_nonfinite_updates = int(optim.get("max_consecutive_nonfinite_updates", 5))
        self.overlong_prompts_seen = 0

        epochs, mini_batches = int(rollout["epochs"]), int(rollout["mini_batches"])
        self.updates_per_rollout = epochs * mini_batches
        if self.updates_per_rollout == 1 and self.objective_spec.uses_clipping:
            warnings.warn(
                f"updates_per_rollout == 1: objective {self.objective_name!r} relies on clipping, "
                "but with one optimizer step per rollout the ratio is exactly 1 and nothing is "
                "ever clipped; raise rollout.epochs or rollout.mini_batches",
                stacklevel=2,
            )

    # ------------------------------------------------------------------ Lightning plumbing

    def configure_model(self) -> None:
        # FSDP2 (trainer=fsdp2) shards the policy and the reference policy here; other
        # strategies have nothing to do (DDP wraps the module itself).
        if isinstance(self.trainer.strategy, distributed.FSDP2Strategy):
            self.trainer.strategy.shard([m for m in (self.policy, self.ref_policy) if m is not None])

    def configure_optimizers(self) -> dict[str, Any]:
        cfg = self.optim_cfg
        params = [p for p in self.policy.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params,
            lr=float(cfg["lr"]),
            betas=tuple(cfg.get("betas", (0.9, 0.999))),
            weight_decay=float(cfg.get("weight_decay", 0.0)),
            eps=float(cfg.get("eps", 1e-8)),
            # One fused kernel over all parameters: several times faster than the per-tensor loop.
            fused=bool(cfg.get("fused", True)) and all(p.device.type in ("cpu", "cuda") for p in params),
        )
        max_steps = self.trainer.max_steps if self._trainer is not None else -1
        total_updates = max(1, max_steps * self.updates_per_rollout) if max_steps and max_steps > 0 else None
        warmup = int(cfg.get("warmup_updates", 0))
        kind = cfg.get("lr_schedule", "constant")

        def factor(update: int) -> float:
            if warmup and update < warmup:
                return (update + 1) / warmup
            if kind == "constant" or total_updates is None:
                return 1.0
            progress = min(1.0, (update - warmup) / max(1, total_updates - warmup))
            floor = float(cfg.get("min_lr_ratio", 0.0))
            if kind == "cosine":
                return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
            if kind == "linear":
                return floor + (1 - floor) * (1 - progress)
            raise ValueError(f"optim.lr_schedule={kind!r}; use constant, linear or cosine")

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_fit_start(self) -> None:
        schedules = [cb for cb in self.trainer.callbacks if isinstance(cb, ControlCallback)]
        if self.updates_per_rollout == 1 and any(not isinstance(cb, ConstantSchedule) for cb in schedules):
            warnings.warn(
                "updates_per_rollout == 1: a clip-threshold schedule has no effect because nothing "
                "is clipped with one optimizer step per rollout",
                stacklevel=2,
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["rlvr_control_state"] = self.control.state_dict()
        checkpoint["rlvr_nonfinite_updates"] = self.nonfinite_updates
        checkpoint["rlvr_consecutive_nonfinite_updates"] = self.consecutive_nonfinite_updates
        checkpoint["rlvr_rng_states"] = rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "rlvr_control_state" not in checkpoint:
            raise ValueError("checkpoint has no rlvr_lightning control state; was it written by rlvr_lightning?")
        self.control.load_state_dict(checkpoint["rlvr_control_state"])
        self.nonfinite_updates = int(checkpoint.get("rlvr_nonfinite_updates", 0))
        self.consecutive_nonfinite_updates = int(checkpoint.get("rlvr_consecutive_nonfinite_updates", 0))
        set_rng_states(checkpoint.get("rlvr_rng_states", {}))

    def _advance_step_counter(self) -> None:
        # Optimizer steps go to the plain optimizer; one Lightning step is one rollout.
        progress = self.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
        progress.increment_ready()
        progress.increment_completed()

    def _step_seed(self, step: int, salt: int = 0) -> int:
        # Ranks sample different completions (rank 0 keeps the single-process seeds).
        return (self.seed * 1_000_003 + step * 7_919 + salt + self.global_rank * 104_729) % (2**63 - 1)

    def _old_from_update(self) -> bool:
        """Whether pi_old's log-probs and entropies come from the update pass itself.

        With one optimizer update per rollout the policy of that update is pi_old (the ratio is
        exactly 1), so the separate pre-update pass would recompute what the update pass computes
        anyway: skipping it saves a forward pass over the rollout. It is kept when a schedule other
        than ``constant`` runs, because schedules read the rollout entropy before the update, and
        when ``rollout.old_logprobs_from_update`` is false. (The update pass runs in train mode: a
        model with dropout would see its pi_old values differ from an eval-mode pass.)
        """
        if self.updates_per_rollout != 1 or not self.rollout_cfg.get("old_logprobs_from_update", True):
            return False
        schedules = [cb for cb in self.trainer.callbacks if isinstance(cb, ControlCallback)]
        return all(isinstance(cb, ConstantSchedule) for cb in schedules)

    # ------------------------------------------------------------------ training step

    def training_step(self, batch: list[dict[str, Any]], batch_idx: int) -> None:
        step = self.global_step
        timings: dict[str, float] = defaultdict(float)
        step_start = time.perf_counter()
        # Every random draw of a step (sampling, mini-batch order, Clip-Cov) derives from
        # (seed, step), so a resumed run makes the same draws as an uninterrupted one.
        torch.manual_seed(self._step_seed(step))

        batch, prompt_metrics = self._limit_prompt_length(batch)
        if prompt_metrics and not distributed.all_ranks(bool(batch), self.device):
            self._skip_step_without_prompts(step, prompt_metrics)
            return
        rollout, rollout_metrics = self._collect_rollout(batch, timings)
        rollout_metrics.update(prompt_metrics)
        old_from_update = self._old_from_update()
        if not old_from_update:
            with self._timed(timings, "old_logprobs"):
                self._old_logprobs(rollout)
        if self.ref_policy is not None:
            with self._timed(timings, "ref_logprobs"):
                self._ref_logprobs(rollout)
        if not old_from_update:
            rollout_metrics.update(self._rollout_entropy_metrics(rollout))

        info = StepInfo(
            step=step,
            total_steps=max(int(self.trainer.max_steps), 1),
            # NaN when pi_old comes from the update pass: only constant schedules run then.
            rollout_entropy=float(rollout_metrics.get("entropy/rollout", math.nan)),
            reward_mean=float(rollout_metrics["reward/mean"]),
        )
        for callback in self.trainer.callbacks:
            if isinstance(callback, ControlCallback):
                callback.on_rollout_end(self.trainer, self, info)

        with self._timed(timings, "update"):
            update_metrics = self._update_policy(rollout, step)
        if old_from_update:
            rollout_metrics.update(self._rollout_entropy_metrics(rollout))

        step_seconds = time.perf_counter() - step_start
        completion_tokens = float(rollout.response_mask.sum())
        metrics = {**rollout_metrics, **update_metrics}
        metrics.update({f"control/{k}": v for k, v in self.control.scalars().items()})
        metrics["control/updates_per_rollout"] = float(self.updates_per_rollout)
        metrics.update({f"time/{k}_seconds": v for k, v in timings.items()})
        metrics["time/step_seconds"] = step_seconds
        metrics["perf/completion_tokens_per_second"] = completion_tokens / max(step_seconds, 1e-9)
        metrics["perf/peak_memory_gib"] = self._peak_memory_gib()
        metrics["optim/lr"] = self.lr_schedulers().get_last_lr()[0]
        # Data parallel: every scalar is the mean over ranks (each rank trained on its own prompts).
        metrics = distributed.mean_across_ranks({k: float(v) for k, v in metrics.items()}, self.device)
        self._log_at_step(metrics, step)
        self.log("reward", metrics["reward/mean"], prog_bar=True, on_step=True, logger=False, batch_size=len(rollout))
        self.log("entropy", metrics["entropy/rollout"], prog_bar=True, on_step=True, logger=False, batch_size=len(rollout))
        self._log_samples(rollout, step)
        self._advance_step_counter()
        self._stop_if_nonfinite(step)

    def _log_at_step(self, metrics: dict[str, float], step: int) -> None:
        """Write scalars at x = ``step`` (rollouts completed before them): Lightning's own logging
        step counts batches, which drifts from the rollout count across a resume."""
        if self.logger is not None and self.trainer.is_global_zero:
            self.logger.log_metrics(metrics, step=step)

    # ------------------------------------------------------------------ faults

    def _limit_prompt_length(self, rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, float]]:
        """Apply ``rollout.max_prompt_tokens`` to a step's rows: with ``overlong_prompts=drop``
        over-long rows leave the step; with ``truncate`` they stay and generation keeps their last
        ``max_prompt_tokens`` tokens. Returns the rows and the counts to log (none without a limit)."""
        limit = self.rollout_cfg.get("max_prompt_tokens")
        if limit is None:
            return rows, {}
        mode = self.rollout_cfg.get("overlong_prompts", "drop")
        encoded = self.tokenizer(self._prompts(rows), add_special_tokens=False)["input_ids"]
        overlong = [len(ids) > int(limit) for ids in encoded]
        count = sum(overlong)
        if count and not self.overlong_prompts_seen:
            warnings.warn(
                f"prompts longer than rollout.max_prompt_tokens={limit} tokens are "
                f"{'dropped' if mode == 'drop' else 'truncated to their last tokens'} "
                f"(rollout.overlong_prompts={mode}); counted per step in data/overlong_prompts_"
                f"{'dropped' if mode == 'drop' else 'truncated'}",
                stacklevel=2,
            )
        self.overlong_prompts_seen += count
        if mode == "drop":
            rows = [row for row, too_long in zip(rows, overlong, strict=True) if not too_long]
            return rows, {"data/overlong_prompts_dropped": float(count)}
        return rows, {"data/overlong_prompts_truncated": float(count)}

    def _skip_step_without_prompts(self, step: int, prompt_metrics: dict[str, float]) -> None:
        """Every prompt of the step was dropped for its length: no rollout and no update, but the
        step counts, so the run still ends after ``trainer.max_steps`` steps."""
        warnings.warn(
            f"step {step}: every prompt is longer than rollout.max_prompt_tokens="
            f"{self.rollout_cfg['max_prompt_tokens']} tokens and was dropped, so the step is skipped "
            "(no update); raise max_prompt_tokens or set rollout.overlong_prompts=truncate",
            stacklevel=2,
        )
        metrics = {**prompt_metrics, "optim/skipped_steps_without_prompts": 1.0}
        self._log_at_step(distributed.mean_across_ranks(metrics, self.device), step)
        self._advance_step_counter()

    def _stop_if_nonfinite(self, step: int) -> None:
        """After ``optim.max_consecutive_nonfinite_updates`` skipped NaN/Inf updates in a row,
        save ``checkpoints/nonfinite_stop.ckpt`` (the weights are those before the bad updates,
        which changed nothing) and stop the run with an error that says what to try."""
        limit = self.max_consecutive_nonfinite_updates
        if limit <= 0 or self.consecutive_nonfinite_updates < limit:
            return
        callback = self.trainer.checkpoint_callback
        folder = Path(getattr(callback, "dirpath", None) or Path(self.trainer.default_root_dir) / "checkpoints")
        path = folder / "nonfinite_stop.ckpt"
        self.trainer.save_checkpoint(path)  # atomic: the trainer's checkpoint I/O (train.build)
        raise RuntimeError(
            f"training stopped at step {step}: {self.consecutive_nonfinite_updates} optimizer updates "
            f"in a row had a NaN/Inf loss or gradient and were skipped "
            f"(optim.max_consecutive_nonfinite_updates={limit}). A checkpoint of the last good "
            f"weights is at {path}. Try a lower optim.lr or optim.max_grad_norm, check the data and "
            f"rewards of the last steps (optim/skipped_nonfinite_updates in TensorBoard), then resume "
            f"with ckpt_path={path}"
        )

    @contextmanager
    def _timed(self, timings: dict[str, float], stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            timings[stage] += time.perf_counter() - start

    def _prompts(self, rows: list[dict[str, Any]]) -> list[str]:
        return [
            build_prompt(self.tokenizer, row["question"], self.prompt_cfg["instruction"], self.prompt_cfg["system_prompt"])
            for row in rows
        ]

    def _generate(
        self, rows: list[dict[str, Any]], group_size: int, greedy: bool = False, temperature: float | None = None
    ) -> Rollout:
        cfg = self.rollout_cfg
        # FSDP2 with gather_for_rollout: the policy is gathered once, decoding is rank-local.
        with self._gathered(self.policy) as gathered:
            return generate_rollout(
                self.policy,
                self.tokenizer,
                self._prompts(rows),
                group_size=group_size,
                max_new_tokens=int(cfg["max_new_tokens"]),
                temperature=float(cfg["temperature"] if temperature is None else temperature),
                top_p=float(cfg.get("top_p", 1.0)),
                greedy=greedy,
                max_prompt_tokens=cfg.get("max_prompt_tokens"),
                engine=cfg.get("engine", "shared_prefix"),
                ignore_eos=bool(cfg.get("ignore_eos", False)),
                synced=not gathered and distributed.needs_synced_forwards(self.policy),
                cache_implementation=str(cfg.get("hf_cache", "dynamic")),
                compile_decoding=str(cfg.get("compile_decoding", "auto")),
                pad_prompts_to_multiple_of=cfg.get("pad_prompts_to_multiple_of"),
                cuda_graphs=str(cfg.get("cuda_graphs", "auto")),
                vllm_options=dict(cfg.get("vllm") or {}),
            )

    def _gathered(self, model: torch.nn.Module) -> AbstractContextManager[bool]:
        """``FSDP2Strategy.gathered`` under trainer=fsdp2 (whole model gathered for the block,
        when ``gather_for_rollout``), else a block that yields False."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        if isinstance(strategy, distributed.FSDP2Strategy):
            return strategy.gathered(model)
        return nullcontext(False)

    def _score(self, rollout: Rollout, answers: list[str]) -> dict[str, torch.Tensor]:
        result = self.reward_fn(rollout.completions, answers)
        rewards = torch.tensor(result.rewards, dtype=torch.float32)
        correct = torch.tensor(result.correct, dtype=torch.bool)
        return {
            "rewards": rewards,
            "correct": correct,
            "failures": torch.tensor(float(result.num_failures)),
            "timeouts": torch.tensor(float(result.num_timeouts)),
        }

    def _collect_rollout(
        self, rows: list[dict[str, Any]], timings: dict[str, float]
    ) -> tuple[Rollout, dict[str, float]]:
        """Generate, score and compute advantages; with dynamic sampling (DAPO), keep drawing
        generation batches and dropping constant-reward groups until the batch is full."""
        cfg, obj = self.rollout_cfg, self.objective_cfg
        group_size = int(cfg["group_size"])
        # This rank's share of the step's prompts (the data module gives each rank its share).
        prompts_per_step = int(cfg["prompts_per_step"]) // max(self.trainer.world_size, 1)
        dynamic = bool(obj.get("dynamic_sampling", False))
        max_batches = int(obj.get("max_num_gen_batches", 1)) if dynamic else 1
        kept: list[Rollout] = []
        kept_groups, seen_groups, dropped_groups, gen_batches = 0, 0, 0, 0
        all_rewards, all_correct, failures, timeouts = [], [], 0.0, 0.0
        all_lengths, all_truncated = [], []
        for gen_batch in range(max_batches):
            chunk = rows[gen_batch * prompts_per_step : (gen_batch + 1) * prompts_per_step]
            if not chunk:
                break
            gen_batches += 1
            with self._timed(timings, "generate"):
                rollout = self._generate(chunk, group_size)
            with self._timed(timings, "reward"):
                scores = self._score(rollout, [row["answer"] for row in chunk for _ in range(group_size)])
            rewards = scores["rewards"]
            all_rewards.append(rewards)
            all_correct.append(scores["correct"])
            all_lengths.append(rollout.response_lengths.cpu())
            all_truncated.append(rollout.truncated.cpu())
            failures += float(scores["failures"])
            timeouts += float(scores["timeouts"])
            buffer = int(obj.get("overlong_buffer_tokens", 0))
            if buffer > 0:
                rewards = rewards + overlong_penalty(
                    rollout.response_lengths.cpu(), int(cfg["max_new_tokens"]), buffer
                )
            rollout.data["rewards"] = rewards
            rollout.data["correct"] = scores["correct"]
            seen_groups += len(chunk)
            if dynamic:
                keep_group = ~constant_groups(rewards, group_size)
                dropped_groups += int((~keep_group).sum())
                keep_rows = keep_group.repeat_interleave(group_size).nonzero().squeeze(-1)
                if keep_rows.numel():
                    kept.append(rollout.select(keep_rows.to(rollout.input_ids.device)))
                    kept_groups += int(keep_group.sum())
                if kept_groups >= prompts_per_step:
                    break
            else:
                kept.append(rollout)
                kept_groups += len(chunk)
        if not kept:
            # Every group had equal rewards: no signal this step. Train on the last batch anyway
            # (its advantages are all zero, so the policy loss is zero) to keep steps uniform.
            kept = [rollout]
        merged = merge_rollouts(kept, self.tokenizer.pad_token_id)
        if dynamic and len(merged) > prompts_per_step * group_size:
            merged = merged.select(torch.arange(prompts_per_step * group_size, device=merged.input_ids.device))
        estimator = self.objective_cfg.get("advantage", "grpo")
        advantages = group_advantages(merged.data["rewards"], group_size, estimator)
        merged.data["advantages"] = advantages
        loss_mask = merged.response_mask.clone()
        if obj.get("overlong_filter", False):
            loss_mask[merged.truncated] = 0.0
        merged.data["loss_mask"] = loss_mask

        rewards_seen = torch.cat(all_rewards)
        lengths = torch.cat(all_lengths).float()
        metrics = {
            "reward/mean": float(merged.data["rewards"].mean()),
            "reward/accuracy": float(torch.cat(all_correct).float().mean()),
            "reward/mean_all_generated": float(rewards_seen.mean()),
            "reward/verifier_failures": failures,
            "reward/verifier_timeouts": timeouts,
            "reward/advantage_abs_mean": float(advantages.abs().mean()),
            "length/response_mean": float(lengths.mean()),
            "length/response_max": float(lengths.max()),
            "length/truncated_fraction": float(torch.cat(all_truncated).float().mean()),
            "sampling/generation_batches": float(gen_batches),
            "sampling/dropped_group_fraction": dropped_groups / max(seen_groups, 1),
            "sampling/num_sequences": float(len(merged)),
        }
        return merged, metrics

    def _micro_batches(self, groups: torch.Tensor, rollout: Rollout) -> list[torch.Tensor]:
        """Rows of ``groups`` in micro-batches of whole groups under the token budget.

        A group costs its prompt once plus ``G`` padded responses when prompts are shared
        (``rollout.share_prompt_forward``), else ``G`` padded rows; groups are taken longest first.
        """
        budget = int(self.rollout_cfg.get("max_tokens_per_micro_batch", 1024))
        shared = bool(self.rollout_cfg.get("share_prompt_forward", True))
        size = rollout.group_size
        prompt_lengths = (rollout.attention_mask.sum(-1) - rollout.response_lengths).view(-1, size)[:, 0].cpu()
        response_lengths = rollout.response_lengths.view(-1, size).max(-1).values.cpu()
        groups = groups.cpu()
        order = groups[torch.argsort((prompt_lengths + response_lengths)[groups], descending=True)]
        micro, current = [], []
        longest_prompt = longest_response = 0
        for group in order.tolist():
            prompt = max(longest_prompt, int(prompt_lengths[group]))
            response = max(longest_response, int(response_lengths[group]))
            count = len(current) + 1
            cost = count * prompt + count * size * response if shared else count * size * (prompt + response)
            if current and cost > budget:
                micro.append(current)
                current, prompt, response = [], int(prompt_lengths[group]), int(response_lengths[group])
            current.append(group)
            longest_prompt, longest_response = prompt, response
        if current:
            micro.append(current)
        return [
            (torch.tensor(chunk).unsqueeze(-1) * size + torch.arange(size)).view(-1) for chunk in micro
        ]

    def _forward_logprobs(
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
        temperature = float(self.rollout_cfg["temperature"])
        shared = self.rollout_cfg.get("share_prompt_forward", True)
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
    def _old_logprobs(self, rollout: Rollout) -> None:
        """Pre-update pass: log pi_old and H(pi_old) for every response token."""
        self._fill_logprobs(rollout, self.policy, "old_logp", "old_entropy", with_entropy=True)

    @torch.no_grad()
    def _ref_logprobs(self, rollout: Rollout) -> None:
        self._fill_logprobs(rollout, self.ref_policy, "ref_logp", None, with_entropy=False)

    def _fill_logprobs(
        self, rollout: Rollout, model: torch.nn.Module, logp_key: str, entropy_key: str | None, with_entropy: bool
    ) -> None:
        n, length = len(rollout), rollout.response_length
        logp_all = torch.zeros(n, length, device=rollout.input_ids.device)
        entropy_all = torch.zeros(n, length, device=rollout.input_ids.device)
        was_training = model.training
        model.eval()
        micro_batches = self._micro_batches(torch.arange(n // rollout.group_size), rollout)
        with self._gathered(model) as gathered:
            if not gathered and distributed.needs_synced_forwards(model):  # FSDP: as many forwards on every rank
                micro_batches = [rows for rows, _ in distributed.equal_micro_batches(micro_batches, self.device)]
            for rows in micro_batches:
                logp, entropy, used = self._forward_logprobs(model, rollout, rows, with_entropy)
                logp_all[rows.to(logp_all.device), used] = logp
                if entropy is not None:
                    entropy_all[rows.to(logp_all.device), used] = entropy
        model.train(was_training)
        rollout.data[logp_key] = logp_all * rollout.response_mask
        if entropy_key is not None:
            rollout.data[entropy_key] = entropy_all * rollout.response_mask

    def _rollout_entropy_metrics(self, rollout: Rollout) -> dict[str, float]:
        mask = rollout.data["loss_mask"]
        entropy = rollout.data["old_entropy"]
        metrics = {"entropy/rollout": float((entropy * mask).sum() / mask.sum().clamp_min(1))}
        advantages = rollout.data["advantages"].to(mask.device).unsqueeze(-1).expand_as(mask)
        metrics.update(entropy_by_region(entropy, rollout.data["old_logp"], advantages, mask))
        return metrics

    def _update_policy(self, rollout: Rollout, step: int) -> dict[str, float]:
        cfg = self.rollout_cfg
        optimizer = self.optimizers(use_pl_optimizer=False)
        scheduler = self.lr_schedulers()
        num_groups = len(rollout) // rollout.group_size
        # Dynamic sampling can leave fewer groups than mini-batches: then one group per update.
        # Every rank takes the same number of updates (their gradients are reduced together).
        mini_batches = min(int(cfg["mini_batches"]), distributed.min_across_ranks(num_groups, self.device))
        generator = torch.Generator().manual_seed(self._step_seed(step, salt=1))
        device = rollout.input_ids.device
        advantages = rollout.data["advantages"].to(device)
        loss_mask = rollout.data["loss_mask"].to(device)
        correct = rollout.data["correct"].to(device)
        need_entropy_grad = self.objective_params.entropy_coef > 0
        old_from_update = self._old_from_update()
        if old_from_update:  # filled below from the (single) update pass
            for key in ("old_logp", "old_entropy"):
                rollout.data[key] = torch.zeros(len(rollout), rollout.response_length, device=device)
        totals: dict[str, float] = defaultdict(float)
        weights: dict[str, float] = defaultdict(float)
        losses, grad_norms, skipped = [], [], 0
        limit = self.max_consecutive_nonfinite_updates
        stop_run = False  # the NaN/Inf limit was reached: no more updates (see _stop_if_nonfinite)
        for _epoch in range(int(cfg["epochs"])):
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
                counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
                normalizer = LossNormalizer(
                    num_tokens=float(counts[0]),
                    num_sequences=float(counts[1]),
                    max_response_length=int(cfg["max_new_tokens"]),
                    world_size=self.trainer.world_size,
                    num_correct_tokens=float(counts[2]),
                )
                optimizer.zero_grad(set_to_none=True)
                mini_loss = 0.0
                micro_batches = distributed.equal_micro_batches(self._micro_batches(mini_groups, rollout), device)
                for micro, weight in micro_batches:
                    logp, entropy, used = self._forward_logprobs(
                        self.policy, rollout, micro, with_entropy=True, entropy_grad=need_entropy_grad
                    )
                    micro_dev = micro.to(device)
                    if old_from_update:
                        rollout.data["old_logp"][micro_dev, used] = logp.detach()
                        rollout.data["old_entropy"][micro_dev, used] = entropy.detach()
                    batch = PolicyBatch(
                        logp=logp,
                        old_logp=rollout.data["old_logp"][micro_dev, used],
                        advantages=advantages[micro_dev].unsqueeze(-1).expand_as(logp),
                        mask=loss_mask[micro_dev, used],
                        entropy=entropy,
                        old_entropy=rollout.data["old_entropy"][micro_dev, used],
                        ref_logp=rollout.data["ref_logp"][micro_dev, used] if "ref_logp" in rollout.data else None,
                        correct=correct[micro_dev],
                        generator=generator,
                    )
                    loss, metrics = compute_loss(
                        self.objective_name, batch, self.control, self.objective_params, normalizer
                    )
                    if weight == 0.0:
                        # A repeat that only keeps this rank in step with the gradient reduction.
                        self.manual_backward(loss * 0.0)
                        continue
                    self.manual_backward(loss)
                    mini_loss += float(loss.detach())
                    tokens = float(batch.mask.sum())
                    metrics["entropy/update"] = (entropy.detach() * batch.mask).sum() / batch.mask.sum().clamp_min(1)
                    for key, value in metrics.items():
                        totals[key] += float(value) * tokens
                        weights[key] += tokens
                grad_norm = distributed.clip_grad_norm(
                    self.policy.parameters(),
                    float(self.optim_cfg.get("max_grad_norm", 1.0)),
                    sharded=distributed.is_sharded(self.policy),
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
                self.consecutive_nonfinite_updates = 0
                optimizer.step()
                scheduler.step()
                losses.append(mini_loss)
                grad_norms.append(float(grad_norm))
        if old_from_update:
            for key in ("old_logp", "old_entropy"):
                rollout.data[key] = rollout.data[key] * rollout.response_mask
        out = {key: totals[key] / max(weights[key], 1e-9) for key in totals}
        out["optim/loss"] = sum(losses) / max(len(losses), 1)
        out["optim/grad_norm"] = sum(grad_norms) / max(len(grad_norms), 1)
        out["optim/skipped_nonfinite_updates"] = float(skipped)
        return out

    def _peak_memory_gib(self) -> float:
        if torch.cuda.is_available() and self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux

    def _log_samples(self, rollout: Rollout, step: int) -> None:
        every = int(self.logging_cfg["sample_every_n_steps"])
        if every <= 0 or step % every:
            return
        count = min(int(self.logging_cfg["num_samples"]), len(rollout))
        rewards = rollout.data["rewards"]
        records = [
            {"step": step, "prompt": rollout.prompts[i], "completion": rollout.completions[i], "reward": float(rewards[i])}
            for i in range(0, len(rollout), max(1, len(rollout) // count))[:count]
        ]
        log_dir = self.trainer.log_dir  # a broadcast under DDP: every rank must ask, once
        if log_dir and self.trainer.is_global_zero:
            path = Path(log_dir) / "samples.jsonl"
            with path.open("a") as handle:
                for record in records:
                    handle.write(json.dumps(record) + "\n")
        experiment = getattr(self.logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "add_text"):
            text = "\n\n".join(
                f"**reward {r['reward']:.2f}**\n\n```\n{r['prompt']}{r['completion']}\n```" for r in records
            )
            experiment.add_text("samples/completions", text, global_step=step)

    # ------------------------------------------------------------------ validation

    def _validation_temperature(self) -> float:
        temperature = self.validation_cfg["temperature"]
        return float(self.rollout_cfg["temperature"] if temperature is None else temperature)

    def _validation_samples(self) -> int:
        return 1 if self._validation_temperature() == 0.0 else int(self.validation_cfg["n_samples"])

    def _validation_metric_names(self) -> list[str]:
        names = ["accuracy", "reward", "response_length"]
        names += [f"pass_at_{k}" for k in self.val_k_values if k > 1]
        names += [f"maj_at_{k}" for k in self.val_k_values if k > 1]
        return names

    def validation_step(self, batch: list[dict[str, Any]], batch_idx: int) -> None:
        temperature = self._validation_temperature()
        greedy = temperature == 0.0
        samples = self._validation_samples()
        # The same seed at every validation, so accuracies at different steps see the same draws
        # of sampling noise; the training RNG stream is left untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self._step_seed(0, salt=10_000 + batch_idx))
            rollout = self._generate(batch, group_size=samples, greedy=greedy, temperature=temperature)
        answers = [row["answer"] for row in batch for _ in range(samples)]
        result = self.reward_fn(rollout.completions, answers)
        meters = self.val_metrics
        meters["accuracy"].update(torch.tensor(result.correct, dtype=torch.float32))
        meters["reward"].update(torch.tensor(result.rewards, dtype=torch.float32))
        meters["response_length"].update(rollout.response_lengths.float().cpu())
        for problem in range(len(batch)):
            flags = result.correct[problem * samples : (problem + 1) * samples]
            extracted = result.extracted[problem * samples : (problem + 1) * samples]
            for k in self.val_k_values:
                if k > 1:
                    meters[f"pass_at_{k}"].update(pass_at_k(samples, sum(flags), k))
                    meters[f"maj_at_{k}"].update(float(majority_vote(extracted[:k], flags[:k])[1]))

    def on_validation_epoch_end(self) -> None:
        # Validation after k rollouts is logged at step k (step 0: before any update).
        metrics = {}
        for name, meter in self.val_metrics.items():
            metrics["val/" + name.replace("_at_", "@")] = float(meter.compute())
            meter.reset()
        self._log_at_step(metrics, self.global_step)
        self.log("val/accuracy", metrics["val/accuracy"], prog_bar=True, logger=False)


def merge_rollouts(parts: list[Rollout], pad_token_id: int) -> Rollout:
    """Concatenate rollouts of different prompt/response widths, re-padding to a common one."""
    if len(parts) == 1:
        return parts[0]
    prompt_width = max(p.input_ids.shape[1] - p.response_length for p in parts)
    response_width = max(p.response_length for p in parts)

    def pad(part: Rollout, tensor: torch.Tensor, value: float) -> torch.Tensor:
        prompt_length = part.input_ids.shape[1] - part.response_length
        left = prompt_width - prompt_length
        right = response_width - part.response_length
        return torch.nn.functional.pad(tensor, (left, right), value=value)

    def pad_response(part: Rollout, tensor: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(tensor, (0, response_width - part.response_length), value=0)

    data_keys = set(parts[0].data)
    data: dict[str, torch.Tensor] = {}
    for key in data_keys:
        values = [p.data[key] for p in parts]
        if values[0].dim() == 2:
            values = [pad_response(p, v) for p, v in zip(parts, values, strict=True)]
        data[key] = torch.cat(values)
    return Rollout(
        input_ids=torch.cat([pad(p, p.input_ids, pad_token_id) for p in parts]),
        attention_mask=torch.cat([pad(p, p.attention_mask, 0) for p in parts]),
        response_mask=torch.cat([pad_response(p, p.response_mask) for p in parts]),
        response_lengths=torch.cat([p.response_lengths for p in parts]),
        truncated=torch.cat([p.truncated for p in parts]),
        completions=[c for p in parts for c in p.completions],
        prompts=[q for p in parts for q in p.prompts],
        group_size=parts[0].group_size,
        data=data,
    )
