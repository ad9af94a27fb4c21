"""The reward function: score a batch of completions against their reference answers.

``RewardFunction`` extracts each completion's answer (``extraction``), checks it against the
reference (``verification``) inside the timeout sandbox (``sandbox``), and turns the verdicts
into rewards; or, with ``function`` (``reward.function``), takes the rewards from a user's
callable (``custom``) and keeps the verifier's verdicts as ``correct``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from rlvr_lightning.rewards.custom import (
    FUNCTION_KEY,
    UserReward,
    call_reward_function,
    describe,
    load_reward_function,
)
from rlvr_lightning.rewards.extraction import ANSWER_MODES, extract_boxed
from rlvr_lightning.rewards.sandbox import _ProcessRunner, _run_in_thread
from rlvr_lightning.rewards.verification import _CHECKS, METHODS


@dataclass
class RewardResult:
    """Per-completion rewards of one batch, with what the verifier saw."""

    # correct_reward or incorrect_reward, plus format_reward when the completion has a box;
    # with a user's function (reward.function), the scores it returned.
    rewards: list[float]
    # The verifier judged the answer equal to the reference.
    correct: list[bool]
    # The answer the check read: extract_answer(completion, answer_mode), or with math_verify
    # and boxed_or_last the text math_verify picked (None: none found, or the check failed).
    extracted: list[str | None]
    # Checks that raised an exception (scored as incorrect).
    num_failures: int = 0
    # Checks that ran past timeout_seconds (scored as incorrect).
    num_timeouts: int = 0


class RewardFunction:
    """Rule-based verifiable reward: ``correct_reward`` for a correct final answer, else
    ``incorrect_reward``; ``format_reward`` on top for a boxed answer. Or, with ``function``,
    a user's own reward.

    Args:
        method: ``"numeric"`` (exact rational comparison, fast) or ``"math_verify"``
            (symbolic comparison of LaTeX answers with the math_verify package).
        answer_mode: which answer a completion commits to: ``"boxed"``, ``"last_number"`` or
            ``"boxed_or_last"`` (see ``extract_answer``). With math_verify and
            ``"boxed_or_last"`` the whole completion goes to math_verify, which picks the box or
            the last expression itself.
        format_reward: bonus added when the completion contains a non-empty ``\\boxed{}``,
            whether or not the answer is right (0 disables it).
        correct_reward: reward of a correct answer.
        incorrect_reward: reward of a wrong, missing, failed or timed-out answer.
        timeout_seconds: time limit of one check; an overrunning check scores as incorrect.
        num_workers: worker processes for math_verify (default: min(4, CPU count)).
        worker_startup_timeout_seconds: time allowed for a math_verify worker process to start
            (it imports this module and math_verify, then checks one answer as a warm-up).
        random_reward_probability: when set, the reward ignores correctness: ``correct_reward``
            with this probability, else ``incorrect_reward`` (random rewards, arXiv 2509.26114);
            ``correct`` still reports the real verdict.
        function: a user's reward (``reward.function``): a callable
            ``(completions: list[str], answers: list[str]) -> list[float]``, or its dotted path
            ``"package.module.function"`` (or ``"package.module:function"``), imported and
            checked here. The rewards are then the scores it returns, as they are
            (``correct_reward``, ``incorrect_reward`` do not apply; ``format_reward`` and
            ``random_reward_probability`` must be off). ``correct`` (accuracy, pass@k) is still
            the verdict of ``method``, so it stays comparable across reward designs. The
            function runs in this process, without the time limit; an exception it raises
            propagates, and a return value that is not one finite number per completion raises
            ``UserRewardError``. None (the default): the verifier's reward above.
    """

    def __init__(
        self,
        method: str = "numeric",
        answer_mode: str = "boxed_or_last",
        format_reward: float = 0.0,
        correct_reward: float = 1.0,
        incorrect_reward: float = 0.0,
        timeout_seconds: float = 5.0,
        num_workers: int | None = None,
        worker_startup_timeout_seconds: float = 120.0,
        random_reward_probability: float | None = None,
        function: str | Callable[..., Any] | None = None,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"unknown reward method {method!r}; expected one of {METHODS}")
        if answer_mode not in ANSWER_MODES:
            raise ValueError(f"unknown answer mode {answer_mode!r}; expected one of {ANSWER_MODES}")
        if timeout_seconds <= 0:
            raise ValueError(f"timeout_seconds must be positive, got {timeout_seconds}")
        self.method = method
        self.answer_mode = answer_mode
        self.format_reward = float(format_reward)
        self.correct_reward = float(correct_reward)
        self.incorrect_reward = float(incorrect_reward)
        self.timeout_seconds = float(timeout_seconds)
        self.num_workers = num_workers or min(4, os.cpu_count() or 1)
        self.worker_startup_timeout_seconds = float(worker_startup_timeout_seconds)
        if random_reward_probability is not None and not 0.0 <= random_reward_probability <= 1.0:
            raise ValueError(
                f"random_reward_probability={random_reward_probability} must be in [0, 1] or null"
            )
        self.random_reward_probability = random_reward_probability
        self.function = function
        self._user_function: UserReward | None = None
        if function is not None:
            for key, value, off in (
                ("format_reward", self.format_reward, 0.0),
                ("random_reward_probability", random_reward_probability, None),
            ):
                if value != off:
                    raise ValueError(
                        f"reward.{key}={value} does not apply with {FUNCTION_KEY}="
                        f"{describe(function)!r}, whose scores are the rewards as they are: "
                        f"set reward.{key}={'null' if off is None else off}, or build it into "
                        f"the function"
                    )
            self._user_function = load_reward_function(function)
        self._process_runner: _ProcessRunner | None = None

    def __call__(self, completions: Sequence[str], answers: Sequence[str]) -> RewardResult:
        if len(completions) != len(answers):
            raise ValueError(
                f"got {len(completions)} completions but {len(answers)} reference answers"
            )
        if not completions:
            return RewardResult(rewards=[], correct=[], extracted=[])
        tasks = [
            (completion, str(answer), self.answer_mode)
            for completion, answer in zip(completions, answers, strict=True)
        ]
        check = _CHECKS[self.method]
        if self.method == "numeric":
            outcomes = _run_in_thread(check, tasks, self.timeout_seconds)
        else:
            if self._process_runner is None:
                self._process_runner = _ProcessRunner(
                    self.num_workers, self.worker_startup_timeout_seconds
                )
            outcomes = self._process_runner.run(check, tasks, self.timeout_seconds)

        if self.function is not None:
            rewards = self._user_rewards(completions, [task[1] for task in tasks])
        else:
            rewards = self._verifier_rewards(completions, [outcome.correct for outcome in outcomes])
        return RewardResult(
            rewards=rewards,
            correct=[outcome.correct for outcome in outcomes],
            extracted=[outcome.extracted for outcome in outcomes],
            num_failures=sum(outcome.status == "failure" for outcome in outcomes),
            num_timeouts=sum(outcome.status == "timeout" for outcome in outcomes),
        )

    def _verifier_rewards(self, completions: Sequence[str], verdicts: list[bool]) -> list[float]:
        """correct_reward or incorrect_reward by verdict (or at random), plus format_reward."""
        rewards = []
        if self.random_reward_probability is not None:
            # Spurious rewards (arXiv 2509.26114): independent of correctness, drawn from the
            # global torch RNG, which the trainer seeds per step. (torch is imported here only:
            # the math_verify workers import this module and should start fast.)
            import torch

            hits = (torch.rand(len(verdicts)) < self.random_reward_probability).tolist()
        else:
            hits = verdicts
        for completion, hit in zip(completions, hits, strict=True):
            reward = self.correct_reward if hit else self.incorrect_reward
            if self.format_reward and extract_boxed(completion):
                reward += self.format_reward
            rewards.append(reward)
        return rewards

    def _user_rewards(self, completions: Sequence[str], answers: list[str]) -> list[float]:
        """The scores of the user's function (``reward.function``), checked."""
        if self._user_function is None:  # unpickled: import it again by its path
            self._user_function = load_reward_function(self.function)
        return call_reward_function(
            self._user_function, describe(self.function), completions, answers
        )

    def close(self) -> None:
        """Stop the math_verify worker processes (restarted on the next call if needed)."""
        if self._process_runner is not None:
            self._process_runner.close()

    def __enter__(self) -> RewardFunction:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __getstate__(self) -> dict[str, Any]:
        # Worker processes do not travel (deepcopy, checkpoint hyperparameters, DDP spawn).
        state = self.__dict__.copy()
        state["_process_runner"] = None
        if isinstance(self.function, str):  # imported again by path where it arrives
            state["_user_function"] = None
        return state

    def __repr__(self) -> str:
        return (
            f"RewardFunction(method={self.method!r}, answer_mode={self.answer_mode!r}, "
            f"format_reward={self.format_reward}, correct_reward={self.correct_reward}, "
            f"incorrect_reward={self.incorrect_reward}, timeout_seconds={self.timeout_seconds}"
            + (f", function={describe(self.function)!r})" if self.function is not None else ")")
        )
