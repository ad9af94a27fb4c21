"""Preemption: SIGTERM or SIGINT during training finishes the step, writes a checkpoint, prints
the command that resumes the run and exits 143 or 130; the resumed run continues exactly."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

import rlvr_lightning.train as train_module
from rlvr_lightning.checkpoints import checksum_path, read_resume_checkpoint
from rlvr_lightning.preemption import Preempted, PreemptionCallback, exit_code, resume_command
from rlvr_lightning.train import run
from tests.conftest import TINY_OVERRIDES, compose_config, read_scalars

REPO = Path(__file__).resolve().parents[1]
STEPS = 12
OVERRIDES = TINY_OVERRIDES + [
    f"trainer.max_steps={STEPS}",
    "trainer.val_check_interval=100",
    "validate_before_training=false",
]
# Every scalar that shapes or measures the next steps of a run.
COMPARED = ("reward/", "control/", "objective/policy_loss", "optim/loss", "entropy/rollout")


def assert_same_steps(full: dict, resumed: dict, steps: list[int]) -> None:
    tags = sorted(tag for tag in full if tag.startswith(COMPARED))
    assert "reward/mean" in tags and "optim/loss" in tags
    differences = []
    for tag in tags:
        expected = [(step, value) for step, value in full[tag] if step in steps]
        got = resumed.get(tag, [])
        if [s for s, _ in got] != steps or any(abs(a - b) > 1e-6 for (_, a), (_, b) in zip(expected, got, strict=True)):
            differences.append(f"{tag}: uninterrupted {expected}, resumed {got}")
    assert not differences, "\n".join(differences)


def test_exit_codes_and_resume_command_without_hydra(tmp_path: Path) -> None:
    assert exit_code(signal.SIGTERM) == 143 and exit_code(signal.SIGINT) == 130
    stop = Preempted(signal.SIGTERM, tmp_path / "preempted.ckpt", "python -m rlvr_lightning.train ckpt_path=x")
    assert isinstance(stop, SystemExit) and stop.code == 143
    path = tmp_path / "my run" / "preempted.ckpt"
    assert resume_command(path) == f"python -m rlvr_lightning.train 'ckpt_path={path}'"


def test_second_ctrl_c_stops_at_once_and_sigterm_outranks_sigint() -> None:
    callback = PreemptionCallback()
    callback._handle(signal.SIGINT, None)
    assert callback.received == signal.SIGINT
    with pytest.raises(KeyboardInterrupt):
        callback._handle(signal.SIGINT, None)
    callback = PreemptionCallback()
    callback._handle(signal.SIGINT, None)
    callback._handle(signal.SIGTERM, None)
    assert callback.received == signal.SIGTERM


class SignalAtStep(pl.Callback):
    """Sends ``signum`` to this process as training step ``step`` begins."""

    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            handler = signal.getsignal(self.signum)
            # Without the callback's handler the signal would end the test process itself.
            assert isinstance(getattr(handler, "__self__", None), PreemptionCallback), handler
            os.kill(os.getpid(), self.signum)


def build_with(*extra: pl.Callback):
    """``train.build`` plus ``extra`` callbacks."""
    original = train_module.build

    def build(cfg, run_dir, **options):
        trainer, module, datamodule = original(cfg, run_dir, **options)
        trainer.callbacks[:0] = list(extra)
        return trainer, module, datamodule

    return build


def test_sigterm_in_process_stops_after_the_step_and_resumes_exactly(tmp_path: Path, monkeypatch) -> None:
    overrides = TINY_OVERRIDES + ["trainer.max_steps=4", "trainer.val_check_interval=100", "validate_before_training=false"]
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    with monkeypatch.context() as patch:
        patch.setattr(train_module, "build", build_with(SignalAtStep(1, signal.SIGTERM)))
        with pytest.raises(Preempted) as stop:
            run(compose_config(overrides), run_dir=tmp_path / "stopped")
    assert stop.value.code == 143
    assert {signum: signal.getsignal(signum) for signum in handlers} == handlers  # put back
    ckpt = tmp_path / "stopped" / "checkpoints" / "preempted.ckpt"
    assert stop.value.checkpoint == ckpt.resolve()
    assert read_resume_checkpoint(ckpt)["global_step"] == 2  # step 1 ran to its end
    assert [s for s, _ in read_scalars(tmp_path / "stopped")["reward/mean"]] == [0, 1]
    run(compose_config(overrides), run_dir=tmp_path / "full")
    run(compose_config(overrides + [f"ckpt_path={ckpt}"]), run_dir=tmp_path / "resumed")
    assert_same_steps(read_scalars(tmp_path / "full"), read_scalars(tmp_path / "resumed"), [2, 3])


def test_signal_during_the_last_step_lets_the_run_finish(tmp_path: Path, monkeypatch) -> None:
    overrides = TINY_OVERRIDES + ["validate_before_training=false"]  # 2 steps
    monkeypatch.setattr(train_module, "build", build_with(SignalAtStep(1, signal.SIGTERM)))
    run(compose_config(overrides), run_dir=tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.ckpt", "last.ckpt.sha256"]


class LightningGotSigterm(pl.Callback):
    """Records a SIGTERM in Lightning's own flag, as its handler does before training starts."""

    def on_train_start(self, trainer, pl_module) -> None:
        trainer._signal_connector.received_sigterm = True


def test_a_sigterm_lightning_caught_first_is_taken_over(tmp_path: Path, monkeypatch) -> None:
    """Left to Lightning, it would end fit with SIGTERMException: status 0, no checkpoint."""
    overrides = TINY_OVERRIDES + ["trainer.max_steps=4", "validate_before_training=false"]
    monkeypatch.setattr(train_module, "build", build_with(LightningGotSigterm()))
    with pytest.raises(Preempted) as stop:
        run(compose_config(overrides), run_dir=tmp_path)
    assert stop.value.code == 143
    assert read_resume_checkpoint(tmp_path / "checkpoints" / "preempted.ckpt")["global_step"] == 1


def train_and_signal(run_dir: Path, signum: int) -> tuple[int, str]:
    """``python -m rlvr_lightning.train`` with OVERRIDES, sent ``signum`` once step 1 is under
    way; returns its exit status and its output (stdout, then stderr)."""
    out, err = run_dir.parent / f"{run_dir.name}.out", run_dir.parent / f"{run_dir.name}.err"
    command = [sys.executable, "-m", "rlvr_lightning.train", *OVERRIDES, f"hydra.run.dir={run_dir}"]
    with out.open("w") as stdout, err.open("w") as stderr:
        process = subprocess.Popen(command, cwd=REPO, stdout=stdout, stderr=stderr,
                                   env={**os.environ, "PYTHONWARNINGS": "ignore"})
        try:
            deadline = time.monotonic() + 600
            while not step_started(run_dir, 1):
                assert process.poll() is None, f"the run ended before step 1:\n{out.read_text()}{err.read_text()}"
                assert time.monotonic() < deadline, "step 1 did not start in time"
                time.sleep(0.02)
            process.send_signal(signum)
            status = process.wait(timeout=600)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    return status, out.read_text() + err.read_text()


def step_started(run_dir: Path, step: int) -> bool:
    """Whether the run has logged sample completions of ``step`` (written during the step)."""
    for samples in run_dir.rglob("samples.jsonl"):
        for line in samples.read_text().splitlines():
            try:
                if json.loads(line).get("step", -1) >= step:
                    return True
            except json.JSONDecodeError:  # the line being written
                pass
    return False


def printed_resume_command(output: str) -> list[str]:
    lines = [line for line in output.splitlines() if line.startswith("python -m rlvr_lightning.train ")]
    assert len(lines) == 1, output[-3000:]
    return shlex.split(lines[0])


def test_sigterm_exits_143_with_a_checkpoint_and_the_resume_command_continues_exactly(tmp_path: Path) -> None:
    status, output = train_and_signal(tmp_path / "stopped", signal.SIGTERM)
    assert status == 143, output[-3000:]
    assert "SIGTERM received: finishing the current step" in output
    ckpt = (tmp_path / "stopped" / "checkpoints" / "preempted.ckpt").resolve()
    assert checksum_path(ckpt).is_file()
    stopped_at = int(read_resume_checkpoint(ckpt)["global_step"])
    assert 2 <= stopped_at < STEPS, stopped_at  # stopped mid-run, after the step under way
    # The command repeats the run's overrides and adds the checkpoint.
    command = printed_resume_command(output)
    assert command[:3] == ["python", "-m", "rlvr_lightning.train"]
    assert command[3:] == OVERRIDES + [f"ckpt_path={ckpt}"]
    # Run as printed, the run continues as if it had never stopped.
    run(compose_config(command[3:]), run_dir=tmp_path / "resumed")
    run(compose_config(OVERRIDES), run_dir=tmp_path / "full")
    assert_same_steps(read_scalars(tmp_path / "full"), read_scalars(tmp_path / "resumed"), list(range(stopped_at, STEPS)))


def test_sigint_exits_130_with_a_checkpoint(tmp_path: Path) -> None:
    status, output = train_and_signal(tmp_path / "stopped", signal.SIGINT)
    assert status == 130, output[-3000:]
    assert "SIGINT received" in output and "press Ctrl-C again to stop at once" in output
    ckpt = (tmp_path / "stopped" / "checkpoints" / "preempted.ckpt").resolve()
    assert printed_resume_command(output)[-1] == f"ckpt_path={ckpt}"
    checkpoint = read_resume_checkpoint(ckpt)  # verified against its sha256
    assert 2 <= checkpoint["global_step"] < STEPS
    assert isinstance(checkpoint["state_dict"], dict) and all(torch.is_tensor(v) for v in checkpoint["state_dict"].values())
