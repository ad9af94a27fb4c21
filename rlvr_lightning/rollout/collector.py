"""The rollout collector: a step's prompts -> generate -> score -> dynamic sampling -> advantages.

``RolloutCollector`` needs no ``Trainer``: generation comes in as a function (the module's,
which holds the engine and gathers FSDP weights around it), so a test can drive it with any
engine, tokenizer and reward.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from rlvr_lightning.advantages import compute_advantages, constant_groups, overlong_penalty
from rlvr_lightning.data.prompts import DEFAULT_INSTRUCTION, build_prompt
from rlvr_lightning.rollout.engine import SamplingParams
from rlvr_lightning.rollout.types import Rollout, merge_rollouts

Generate = Callable[[list[str], int, SamplingParams], Rollout]


@contextmanager
def timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    """Add the block's wall time to ``timings[stage]`` (logged as ``time/<stage>_seconds``)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start


@dataclass
class CollectorSettings:
    """The ``rollout``, ``prompt`` and ``sampling`` keys the collector reads, and the advantage
    estimator's name (``advantage.name``) and options (the advantage block's other keys).
    Defaults: the shipped configs' (``sampling/plain.yaml``)."""

    group_size: int = 8
    prompts_per_step: int = 8  # over all ranks; each rank collects its share
    max_new_tokens: int = 40
    temperature: float = 1.0
    top_p: float = 1.0
    ignore_eos: bool = False
    max_prompt_tokens: int | None = None
    overlong_prompts: str = "drop"  # drop | truncate
    instruction: str = DEFAULT_INSTRUCTION
    system_prompt: str | None = None
    advantage: str = "grpo"
    advantage_options: dict[str, Any] = field(default_factory=dict)  # e.g. pass_at_k's k, grpo's scale_rewards
    dynamic: bool = False  # DAPO dynamic sampling
    max_generation_batches: int = 4
    overlong_buffer_tokens: int = 0
    overlong_filter: bool = False
    # Training rollouts ask the engine for the sampled tokens' log-probs (the rollout correction).
    rollout_logprobs: bool = False

    @classmethod
    def from_config(cls, *blocks: dict[str, Any]) -> CollectorSettings:
        """The fields found in the config blocks (``rollout``, ``prompt``, ``sampling``); keys
        the collector does not read are left to their owners."""
        names = {f.name for f in fields(cls)}
        return cls(**{key: value for block in blocks for key, value in block.items() if key in names})

    def sampling(
        self, greedy: bool = False, temperature: float | None = None, logprobs: bool = False
    ) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature if temperature is None else temperature,
            top_p=self.top_p,
            greedy=greedy,
            ignore_eos=self.ignore_eos,
            max_prompt_tokens=self.max_prompt_tokens,
            logprobs=logprobs,
        )


class RolloutCollector:
    """Turns a step's data rows (``question``, ``answer``) into a scored rollout with advantages."""

    def __init__(
        self, tokenizer: Any, reward_fn: Callable[..., Any], generate: Generate, settings: CollectorSettings
    ) -> None:
        self.tokenizer = tokenizer
        self.reward_fn = reward_fn
        self.generate = generate
        self.settings = settings
        self.overlong_prompts_seen = 0
        # Sum over data-parallel ranks (the module sets it): batch statistics of the advantage.
        self.reduce_sum: Callable[[torch.Tensor], torch.Tensor] = lambda values: values

    def prompts(self, rows: list[dict[str, Any]]) -> list[str]:
        s = self.settings
        return [build_prompt(self.tokenizer, row["question"], s.instruction, s.system_prompt) for row in rows]

    def sample(
        self, rows: list[dict[str, Any]], group_size: int, greedy: bool = False, temperature: float | None = None,
        logprobs: bool = False,
    ) -> Rollout:
        return self.generate(self.prompts(rows), group_size, self.settings.sampling(greedy, temperature, logprobs))

    def limit_prompt_length(self, rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, float]]:
        """Apply ``rollout.max_prompt_tokens`` to a step's rows: with ``overlong_prompts=drop``
        over-long rows leave the step; with ``truncate`` they stay and generation keeps their last
        ``max_prompt_tokens`` tokens. Returns the rows and the counts to log (none without a limit)."""
        limit, mode = self.settings.max_prompt_tokens, self.settings.overlong_prompts
        if limit is None:
            return rows, {}
        encoded = self.tokenizer(self.prompts(rows), add_special_tokens=False)["input_ids"]
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

    def score(self, rollout: Rollout, answers: list[str]) -> dict[str, torch.Tensor]:
        result = self.reward_fn(rollout.completions, answers)
        return {
            "rewards": torch.tensor(result.rewards, dtype=torch.float32),
            "correct": torch.tensor(result.correct, dtype=torch.bool),
            "failures": torch.tensor(float(result.num_failures)),
            "timeouts": torch.tensor(float(result.num_timeouts)),
        }

    def collect(
        self, rows: list[dict[str, Any]], timings: dict[str, float], ranks: int = 1
    ) -> tuple[Rollout, dict[str, float]]:
        """Generate, score and compute advantages; with dynamic sampling (DAPO), keep drawing
        generation batches and dropping constant-reward groups until the batch is full.
        ``ranks``: data-parallel ranks; the data module gives each its share of the prompts."""
        s = self.settings
        group_size, prompts_per_step = s.group_size, s.prompts_per_step // max(ranks, 1)
        max_batches = s.max_generation_batches if s.dynamic else 1
        kept: list[Rollout] = []
        kept_groups, seen_groups, zero_variance_groups, gen_batches = 0, 0, 0, 0
        all_rewards, all_correct, failures, timeouts = [], [], 0.0, 0.0
        all_lengths, all_truncated = [], []
        for gen_batch in range(max_batches):
            chunk = rows[gen_batch * prompts_per_step : (gen_batch + 1) * prompts_per_step]
            if not chunk:
                break
            gen_batches += 1
            with timed(timings, "generate"):
                rollout = self.sample(chunk, group_size, logprobs=s.rollout_logprobs)
            with timed(timings, "reward"):
                scores = self.score(rollout, [row["answer"] for row in chunk for _ in range(group_size)])
            rewards = scores["rewards"]
            all_rewards.append(rewards)
            all_correct.append(scores["correct"])
            all_lengths.append(rollout.response_lengths.cpu())
            all_truncated.append(rollout.truncated.cpu())
            failures += float(scores["failures"])
            timeouts += float(scores["timeouts"])
            if s.overlong_buffer_tokens > 0:
                rewards = rewards + overlong_penalty(
                    rollout.response_lengths.cpu(), s.max_new_tokens, s.overlong_buffer_tokens
                )
            rollout.data["rewards"] = rewards
            rollout.data["correct"] = scores["correct"]
            seen_groups += len(chunk)
            constant = constant_groups(rewards, group_size)  # zero variance: every advantage is 0
            zero_variance_groups += int(constant.sum())
            if s.dynamic:
                keep_group = ~constant
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
        if s.dynamic and len(merged) > prompts_per_step * group_size:
            merged = merged.select(torch.arange(prompts_per_step * group_size, device=merged.input_ids.device))
        advantages, advantage_metrics = compute_advantages(
            merged.data["rewards"], group_size, s.advantage, s.advantage_options, self.reduce_sum
        )
        merged.data["advantages"] = advantages
        loss_mask = merged.response_mask.clone()
        if s.overlong_filter:
            loss_mask[merged.truncated] = 0.0
        merged.data["loss_mask"] = loss_mask

        rewards_seen = torch.cat(all_rewards)
        lengths = torch.cat(all_lengths).float()
        trained = merged.data["rewards"]
        metrics = {
            "reward/mean": float(trained.mean()),
            "reward/accuracy": float(torch.cat(all_correct).float().mean()),
            "reward/std": float(trained.std(correction=0)),  # spread of the trained batch (population std)
            # Of every group generated this step: dynamic sampling drops exactly these.
            "reward/zero_variance_group_fraction": zero_variance_groups / max(seen_groups, 1),
            "reward/verifier_failures": failures,
            "reward/verifier_timeouts": timeouts,
            "reward/advantage_abs_mean": float(advantages.abs().mean()),
            **advantage_metrics,
            "length/response_mean": float(lengths.mean()),
            "length/response_max": float(lengths.max()),
            "length/truncated_fraction": float(torch.cat(all_truncated).float().mean()),
            "sampling/num_sequences": float(len(merged)),
        }
        if s.dynamic or s.overlong_buffer_tokens > 0:
            # Before filtering and shaping; without either it is reward/mean again.
            metrics["reward/mean_all_generated"] = float(rewards_seen.mean())
        if s.dynamic:
            metrics["sampling/generation_batches"] = float(gen_batches)
        return merged, metrics
