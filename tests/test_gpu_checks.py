"""tools/gpu_checks.sh and tools/prepare_offline_wheels.sh: their syntax, their usage errors, and
that the GPU checks stop at once, with a clear message, where no CUDA GPU is visible."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = [REPO / "tools" / "gpu_checks.sh", REPO / "tools" / "prepare_offline_wheels.sh"]


def _bash(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", *args], capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_syntax_and_usage_error(script: Path) -> None:
    assert _bash("-n", str(script)).returncode == 0
    result = _bash(str(script))
    assert result.returncode == 2
    assert f"usage: bash tools/{script.name}" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible: the checks would run")
def test_gpu_checks_stop_without_a_gpu(tmp_path: Path) -> None:
    out = tmp_path / "new" / "out"
    env = {**os.environ, "PYTHON": sys.executable}
    result = _bash(str(SCRIPTS[0]), str(out), env=env)
    assert result.returncode == 1
    assert "no CUDA GPU visible" in result.stderr
    assert out.is_dir() and not any(out.iterdir())
