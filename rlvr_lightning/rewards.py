"""Verifiable rewards: extract a completion's final answer and check it against the reference.

Two checks are offered:

* ``numeric``: the extracted answer and the reference are compared as exact rational numbers
  (with a relative tolerance for rounded decimals). Pure Python, microseconds per check; the
  choice for GSM8K and the synthetic arithmetic task.
* ``math_verify``: the ``math_verify`` package parses LaTeX with SymPy and compares the
  expressions symbolically, the choice for MATH500 / AIME / AMC style answers.

``RewardFunction`` runs a batch of checks so that no completion can break a training step: a
check that raises scores as incorrect and is counted in ``num_failures``, and a check that runs
past ``timeout_seconds`` scores as incorrect and is counted in ``num_timeouts``. SymPy can hang
on adversarial input (``\\boxed{9^{9^{9^{9}}}}``), and a hung thread cannot be stopped, so
math_verify checks run in worker processes, and a worker whose check overruns is killed and
replaced. Numeric checks cannot hang in practice and run on a helper thread instead, which keeps
their overhead to milliseconds per batch while still bounding the wait.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import math
import os
import pickle
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, NamedTuple

METHODS = ("numeric", "math_verify")
ANSWER_MODES = ("boxed", "last_number", "boxed_or_last")

# ---------------------------------------------------------------------------------------------
# Answer extraction
# ---------------------------------------------------------------------------------------------

_BOXED_PATTERN = re.compile(r"\\(?:boxed|fbox)\s*\{")

# An unsigned number: digits with optional thousands separators, an optional decimal part.
_UNSIGNED = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+"
# A minus sign counts only where it cannot be a binary minus ("10-5" ends in 5, not -5).
_SIGN = r"(?:(?<![\w)\]}])[-\u2212])?"
_NUMBER_PATTERN = re.compile(
    rf"\\[dt]?frac\{{\s*(?P<frac_num>-?(?:{_UNSIGNED}))\s*\}}\{{\s*(?P<frac_den>{_UNSIGNED})\s*\}}"
    rf"|(?P<num>{_SIGN}(?:{_UNSIGNED}))(?:\s*/\s*(?P<den>{_UNSIGNED}))?"
)


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, braces matched.

    Returns the stripped content (``""`` for an empty box), or None when there is no box or
    the last box is not closed.
    """
    matches = list(_BOXED_PATTERN.finditer(text))
    if not matches:
        return None
    start = matches[-1].end()
    depth = 1
    for position in range(start, len(text)):
        character = text[position]
        if character == "{":
            depth += 1
        elif character == "}":
            depth -= 1
            if depth == 0:
                return text[start:position].strip()
    return None


def _normalize_number(match: re.Match[str]) -> str:
    if match.group("frac_num") is not None:
        numerator, denominator = match.group("frac_num"), match.group("frac_den")
    else:
        numerator, denominator = match.group("num"), match.group("den")
    numerator = numerator.replace("\u2212", "-").replace(",", "")
    if denominator is None:
        return numerator
    return f"{numerator}/{denominator.replace(',', '')}"


def extract_last_number(text: str) -> str | None:
    """The last number in ``text``, normalized: ``"1,234"`` -> ``"1234"``, ``"-5"`` stays.

    Fractions are kept whole (``"3/4"``, and ``\\frac{3}{4}`` becomes ``"3/4"``); a sentence's
    final period is not part of the number.
    """
    matches = list(_NUMBER_PATTERN.finditer(text))
    return _normalize_number(matches[-1]) if matches else None


def extract_answer(text: str, mode: str = "boxed_or_last") -> str | None:
    """The answer a completion commits to.

    ``mode``: ``"boxed"`` (only a non-empty ``\\boxed{}``), ``"last_number"`` (the last number
    anywhere), or ``"boxed_or_last"`` (the box when there is one, else the last number).
    """
    if mode not in ANSWER_MODES:
        raise ValueError(f"unknown answer mode {mode!r}; expected one of {ANSWER_MODES}")
    if mode == "last_number":
        return extract_last_number(text)
    boxed = extract_boxed(text)
    if boxed:
        return boxed
    return None if mode == "boxed" else extract_last_number(text)


def parse_gsm8k_answer(answer_field: str) -> str:
    """The final number of a GSM8K ``answer`` field (the text after the last ``#### ``).

    Thousands separators are removed: ``"... #### 1,234"`` -> ``"1234"``.
    """
    if "####" not in answer_field:
        raise ValueError(f"GSM8K answer has no '#### <number>' line: {answer_field[-80:]!r}")
    final = answer_field.rsplit("####", 1)[1].strip().replace(",", "")
    if not re.fullmatch(r"-?\d+(?:\.\d+)?(?:/\d+)?", final):
        raise ValueError(f"GSM8K answer after '####' is not a number: {final!r}")
    return final


# ---------------------------------------------------------------------------------------------
# Equality checks
# ---------------------------------------------------------------------------------------------

# LaTeX and symbols that never change a number's value: spacing commands, $ and %, degrees.
_LATEX_NOISE = re.compile(r"\\[,!;: ]|\\?\$|\\?%|\^\s*\{?\\circ\}?|\\left|\\right")
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|textrm|mathrm|mbox)\s*\{([^{}]*)\}")
# A label before the number ("x = 5") and unit words after it ("18 dollars") are allowed;
# anything else around it ("5x", "x^2", "3 or 4") makes the answer not a plain number.
_LABELLED = re.compile(r"(?:[A-Za-z]\w*\s*=\s*)?(?P<value>.+?)(?:\s+[A-Za-z][A-Za-z\s]*)?")
# Exponents are capped at three digits: Fraction("1e999999999") would build a huge integer.
_PLAIN = r"[-+]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d{1,3})?"
_PLAIN_PATTERN = re.compile(_PLAIN)
_FRACTION_PATTERN = re.compile(
    rf"(?P<sign>[-+]?)(?:\\[dt]?frac\{{(?P<latex_num>{_PLAIN})\}}\{{(?P<latex_den>{_PLAIN})\}}"
    rf"|(?P<num>{_PLAIN})/(?P<den>{_PLAIN}))"
)


def _parse_plain(text: str) -> Fraction:
    return Fraction(text.replace(",", "").rstrip("."))


def _to_fraction(text: str) -> Fraction | None:
    """Parse a numeric answer exactly; None when it is not a single number."""
    text = _TEXT_WRAPPER.sub(r" \1 ", text)
    text = _LATEX_NOISE.sub(" ", text).replace("\u2212", "-").strip().rstrip(".").strip()
    labelled = _LABELLED.fullmatch(text)
    if labelled is None:
        return None
    value = re.sub(r"\s*([{}/])\s*", r"\1", labelled.group("value"))
    if _PLAIN_PATTERN.fullmatch(value):
        return _parse_plain(value)
    fraction = _FRACTION_PATTERN.fullmatch(value)
    if fraction is None:
        return None
    numerator = _parse_plain(fraction.group("latex_num") or fraction.group("num"))
    denominator = _parse_plain(fraction.group("latex_den") or fraction.group("den"))
    if denominator == 0:
        return None
    result = numerator / denominator
    return -result if fraction.group("sign") == "-" else result


def numeric_equal(pred: str, ref: str, rel_tol: float = 1e-6) -> bool:
    """Whether two answers are the same number.

    Accepts integers, decimals, thousands separators, a leading ``+``, a trailing ``.``,
    fractions ``a/b`` and ``\\frac{a}{b}``; ``"7.0"`` equals ``"7"``. Values within ``rel_tol``
    (relative to the larger magnitude) are equal, so ``"0.3333333"`` matches ``"1/3"``.
    False when either side is not a number.
    """
    try:
        pred_value, ref_value = _to_fraction(pred), _to_fraction(ref)
    except (ValueError, ZeroDivisionError, OverflowError):
        return False
    if pred_value is None or ref_value is None:
        return False
    if pred_value == ref_value:
        return True
    return abs(pred_value - ref_value) <= Fraction(rel_tol) * max(abs(pred_value), abs(ref_value))


class _DropTimeoutDisabledWarning(logging.Filter):
    """math_verify warns once that its timeouts are off; ours (a killable process) are on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


_WARNING_FILTER = _DropTimeoutDisabledWarning()


def _gold_latex(ref: str) -> str:
    ref = ref.strip()
    if "\\boxed" in ref or (len(ref) > 1 and ref.startswith("$") and ref.endswith("$")):
        return ref
    return f"\\boxed{{{ref}}}"


def _math_verify_compare(pred_text: str, ref: str) -> tuple[bool, str | None]:
    """math_verify's verdict and the prediction text it extracted (None: nothing found)."""
    from math_verify import parse, verify

    for name in ("math_verify.parser", "math_verify.grader"):
        logger = logging.getLogger(name)
        if _WARNING_FILTER not in logger.filters:
            logger.addFilter(_WARNING_FILTER)
    prediction = parse(pred_text, parsing_timeout=None)
    if not prediction:
        return False, None
    # parse returns [sympy expression, matched text]; the text is what the model committed to.
    extracted = prediction[-1] if isinstance(prediction[-1], str) else str(prediction[0])
    gold = parse(_gold_latex(ref), parsing_timeout=None) or parse(ref, parsing_timeout=None)
    if not gold:
        return False, extracted
    return bool(verify(gold, prediction, timeout_seconds=None)), extracted


def math_verify_equal(pred_text: str, ref: str) -> bool:
    """Whether a completion's answer equals the reference, by ``math_verify`` (SymPy).

    ``pred_text`` may be a whole completion: math_verify takes its last ``\\boxed{}`` or, failing
    that, its last LaTeX or plain expression. ``ref`` is a bare answer (``"\\frac{1}{2}"``,
    ``"18"``), which is boxed before parsing; an already boxed or ``$...$`` reference is kept.

    math_verify's own timeouts use ``signal.alarm`` and so fail outside the main thread; they
    are switched off here and ``RewardFunction`` bounds the time instead (a killable process).
    """
    return _math_verify_compare(pred_text, ref)[0]


# ---------------------------------------------------------------------------------------------
# One check per completion (module level so that worker processes can unpickle them)
# ---------------------------------------------------------------------------------------------


def _check_numeric(completion: str, answer: str, answer_mode: str) -> tuple[bool, str | None]:
    extracted = extract_answer(completion, answer_mode)
    return extracted is not None and numeric_equal(extracted, answer), extracted


def _check_math_verify(completion: str, answer: str, answer_mode: str) -> tuple[bool, str | None]:
    if answer_mode == "boxed_or_last":
        # math_verify finds the box or the last expression itself, including non-numbers (\pi).
        return _math_verify_compare(completion, answer)
    extracted = extract_answer(completion, answer_mode)
    if extracted is None:
        return False, None
    return math_verify_equal(f"\\boxed{{{extracted}}}", answer), extracted


_CHECKS: dict[str, Callable[[str, str, str], tuple[bool, str | None]]] = {
    "numeric": _check_numeric,
    "math_verify": _check_math_verify,
}


class _Outcome(NamedTuple):
    status: str  # "ok", "failure" (the check raised) or "timeout"
    correct: bool = False
    extracted: str | None = None


_TIMEOUT = _Outcome("timeout")
_FAILURE = _Outcome("failure")


def _guarded(check: Callable[..., tuple[bool, str | None]], task: tuple[Any, ...]) -> _Outcome:
    """Run one check; an exception becomes a failure outcome (exceptions may not pickle)."""
    try:
        correct, extracted = check(*task)
        return _Outcome("ok", bool(correct), extracted)
    except Exception:
        return _Outcome("failure")


# ---------------------------------------------------------------------------------------------
# Runners: run a batch of checks with a time limit per check
# ---------------------------------------------------------------------------------------------


class _SequentialThread(threading.Thread):
    """Runs checks in order on a daemon thread; the caller waits for each with a time limit.

    A check that overruns cannot be stopped: the thread is abandoned (it is a daemon, so it
    does not hold up interpreter exit) and its later results are ignored.
    """

    def __init__(self, check: Callable[..., Any], tasks: Sequence[tuple[Any, ...]]) -> None:
        super().__init__(name="reward-check", daemon=True)
        self._check = check
        self._tasks = tasks
        self._condition = threading.Condition()
        self._abandoned = False
        self.outcomes: list[_Outcome] = []

    def run(self) -> None:
        for task in self._tasks:
            outcome = _guarded(self._check, task)
            with self._condition:
                if self._abandoned:
                    return
                self.outcomes.append(outcome)
                self._condition.notify()

    def wait_for_outcome(self, index: int, timeout_seconds: float) -> bool:
        with self._condition:
            return self._condition.wait_for(lambda: len(self.outcomes) > index, timeout_seconds)

    def abandon(self) -> None:
        with self._condition:
            self._abandoned = True


def _run_in_thread(
    check: Callable[..., Any], tasks: Sequence[tuple[Any, ...]], timeout_seconds: float
) -> list[_Outcome]:
    outcomes: list[_Outcome] = []
    while len(outcomes) < len(tasks):
        offset = len(outcomes)
        worker = _SequentialThread(check, tasks[offset:])
        worker.start()
        for index in range(len(tasks) - offset):
            if not worker.wait_for_outcome(index, timeout_seconds):
                worker.abandon()
                outcomes.append(_TIMEOUT)
                break  # the rest go to a fresh thread
            outcomes.append(worker.outcomes[index])
    return outcomes


# The worker's command line: take the parent's import path, then serve checks.
_WORKER_BOOTSTRAP = (
    "import pickle, sys; sys.path[:] = pickle.load(sys.stdin.buffer); "
    "from rlvr_lightning.rewards import _worker_main; _worker_main()"
)
_WORKER_READY = "ready"


def _worker_main() -> None:
    """Serve checks in a worker process: read ``(check, task)`` pickles, write ``_Outcome``s."""
    if sys.platform.startswith("linux"):
        try:  # Die with the parent even while stuck in C code (PR_SET_PDEATHSIG = 1).
            ctypes.CDLL(None).prctl(1, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
    requests = sys.stdin.buffer
    # The protocol owns the real stdout; anything a check prints goes to stderr instead.
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    # Exercise math_verify once (imports, ANTLR parser set-up) before any check is timed.
    math_verify_equal("\\boxed{\\frac{1}{2}}", "0.5")
    pickle.dump(_WORKER_READY, replies)
    replies.flush()
    while True:
        try:
            check, task = pickle.load(requests)
        except EOFError:
            return
        pickle.dump(_guarded(check, task), replies)
        replies.flush()


class _Worker:
    """One verifier process, fed one check at a time over its stdin and stdout pipes.

    On Linux the process is killed when the thread that started it exits (PR_SET_PDEATHSIG), so
    a hung check never outlives a crashed trainer; workers found dead are replaced before the
    next batch.
    """

    def __init__(self, startup_timeout_seconds: float) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", _WORKER_BOOTSTRAP], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert self.process.stdin is not None and self.process.stdout is not None
        self.requests, self.replies = self.process.stdin, self.process.stdout
        self.ready = False
        self.task_index: int | None = None
        self.deadline = time.monotonic() + startup_timeout_seconds
        self.send(sys.path)

    def fileno(self) -> int:
        return self.replies.fileno()

    def send(self, message: Any) -> None:
        pickle.dump(message, self.requests)
        self.requests.flush()

    def receive(self) -> Any:
        return pickle.load(self.replies)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        for pipe in (self.requests, self.replies):
            try:
                pipe.close()
            except OSError:  # unsent bytes to a dead process
                pass


class _ProcessRunner:
    """Worker processes for checks that may hang; an overrunning check's worker is killed.

    The workers are plain ``python -c`` subprocesses rather than a multiprocessing pool, so they
    never re-import the training script's main module (torch and all) and never depend on its
    ``if __name__ == "__main__"`` guard. Each check's time is counted from when its worker
    receives it, so waiting in the queue does not count against it.
    """

    def __init__(self, num_workers: int, startup_timeout_seconds: float) -> None:
        self.num_workers = num_workers
        self.startup_timeout_seconds = startup_timeout_seconds
        self._workers: list[_Worker] = []
        self._owner_pid = os.getpid()
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._kill_all()

    def _kill_all(self) -> None:
        if self._owner_pid == os.getpid():  # a copy inherited through fork owns nothing
            for worker in self._workers:
                worker.kill()
        self._workers, self._owner_pid = [], os.getpid()

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        self._workers[self._workers.index(worker)] = _Worker(self.startup_timeout_seconds)

    def run(
        self, check: Callable[..., Any], tasks: Sequence[tuple[Any, ...]], timeout_seconds: float
    ) -> list[_Outcome]:
        with self._lock:
            if self._owner_pid != os.getpid():
                self._kill_all()
            for worker in list(self._workers):
                if worker.process.poll() is not None:
                    self._replace(worker)
            while len(self._workers) < self.num_workers:
                self._workers.append(_Worker(self.startup_timeout_seconds))
            try:
                return self._dispatch(check, tasks, timeout_seconds)
            except BaseException:
                # Interrupted or a worker failed to start: leave no half-finished workers behind.
                self._kill_all()
                raise

    def _dispatch(
        self, check: Callable[..., Any], tasks: Sequence[tuple[Any, ...]], timeout_seconds: float
    ) -> list[_Outcome]:
        outcomes: list[_Outcome] = [_FAILURE] * len(tasks)
        queue = collections.deque(range(len(tasks)))
        while True:
            for worker in list(self._workers):
                if not queue or not worker.ready or worker.task_index is not None:
                    continue
                index = queue.popleft()
                try:
                    worker.send((check, tasks[index]))
                except OSError:  # the worker died while idle: not the check's fault
                    queue.appendleft(index)
                    self._replace(worker)
                    continue
                worker.task_index, worker.deadline = index, time.monotonic() + timeout_seconds
            busy = [worker for worker in self._workers if worker.task_index is not None]
            if not queue and not busy:
                return outcomes
            waiting = [
                worker
                for worker in self._workers
                if worker.task_index is not None or not worker.ready
            ]
            timeout = max(0.0, min(worker.deadline for worker in waiting) - time.monotonic())
            # poll, not select: a large training process may hold file descriptors above 1024.
            poller = select.poll()
            for worker in waiting:
                poller.register(worker.fileno(), select.POLLIN)
            readable = {fd for fd, _ in poller.poll(math.ceil(timeout * 1000))}
            now = time.monotonic()
            for worker in waiting:
                if worker.fileno() in readable:  # data, or end of file if it died
                    try:
                        message = worker.receive()
                    except (EOFError, OSError, pickle.UnpicklingError):
                        message = None  # the process died (crash, out-of-memory kill)
                elif now >= worker.deadline:
                    message = _TIMEOUT
                else:
                    continue
                if not worker.ready:
                    if message != _WORKER_READY:
                        raise RuntimeError(
                            "a reward worker process failed to start (its stderr says why) or "
                            f"took longer than {self.startup_timeout_seconds} s to start"
                        )
                    worker.ready = True
                    continue
                outcomes[worker.task_index] = message if isinstance(message, _Outcome) else _FAILURE
                worker.task_index = None
                if message is None or message is _TIMEOUT:
                    self._replace(worker)


# ---------------------------------------------------------------------------------------------
# Reward function
# ---------------------------------------------------------------------------------------------


@dataclass
class RewardResult:
    """Per-completion rewards of one batch, with what the verifier saw."""

    # correct_reward or incorrect_reward, plus format_reward when the completion has a box.
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
    ``incorrect_reward``; ``format_reward`` on top for a boxed answer.

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

        rewards = []
        if self.random_reward_probability is not None:
            # Spurious rewards (arXiv 2509.26114): independent of correctness, drawn from the
            # global torch RNG, which the trainer seeds per step. (torch is imported here only:
            # the math_verify workers import this module and should start fast.)
            import torch

            hits = (torch.rand(len(outcomes)) < self.random_reward_probability).tolist()
        else:
            hits = [outcome.correct for outcome in outcomes]
        for completion, hit in zip(completions, hits, strict=True):
            reward = self.correct_reward if hit else self.incorrect_reward
            if self.format_reward and extract_boxed(completion):
                reward += self.format_reward
            rewards.append(reward)
        return RewardResult(
            rewards=rewards,
            correct=[outcome.correct for outcome in outcomes],
            extracted=[outcome.extracted for outcome in outcomes],
            num_failures=sum(outcome.status == "failure" for outcome in outcomes),
            num_timeouts=sum(outcome.status == "timeout" for outcome in outcomes),
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
        return state

    def __repr__(self) -> str:
        return (
            f"RewardFunction(method={self.method!r}, answer_mode={self.answer_mode!r}, "
            f"format_reward={self.format_reward}, correct_reward={self.correct_reward}, "
            f"incorrect_reward={self.incorrect_reward}, timeout_seconds={self.timeout_seconds})"
        )
