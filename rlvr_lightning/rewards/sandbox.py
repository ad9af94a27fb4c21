"""The sandbox that runs a batch of checks so that no completion can break a training step.

A check that raises scores as incorrect and is counted as a failure; a check that runs past its
time limit scores as incorrect and is counted as a timeout. SymPy can hang on adversarial input
(``\\boxed{9^{9^{9^{9}}}}``), and a hung thread cannot be stopped, so math_verify checks run in
worker processes (``_ProcessRunner``), and a worker whose check overruns is killed and replaced.
Numeric checks cannot hang in practice and run on a helper thread instead (``_run_in_thread``),
which keeps their overhead to milliseconds per batch while still bounding the wait.
"""

from __future__ import annotations

import collections
import ctypes
import math
import os
import pickle
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from rlvr_lightning.rewards.verification import math_verify_equal


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
    "from rlvr_lightning.rewards.sandbox import _worker_main; _worker_main()"
)
_WORKER_READY = "ready"


def _worker_main() -> None:
    """Serve checks in a worker process: read ``(check, task)`` pickles, write ``_Outcome``s."""
    if sys.platform.startswith("linux"):
        try:  # Die with the parent even while stuck in C code (PR_SET_PDEATHSIG = 1).
            ctypes.CDLL(None).prctl(1, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
    # Ctrl-C in a terminal reaches the whole process group: the trainer finishes its step and
    # saves (preemption.py), so its workers must keep serving the step's checks.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
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
