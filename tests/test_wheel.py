"""The built wheel stands alone: installed apart from the source tree, it trains from any folder
(configs ship inside the package; outputs/ is relative to the working folder)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import FLOAT32

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installed_elsewhere_trains_from_an_unrelated_folder(tmp_path: Path) -> None:
    source = tmp_path / "source"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for name in files:  # a clean copy: the build leaves nothing in the checkout
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    wheels, site, work = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(source)],
                   check=True, capture_output=True, text=True)
    wheel = next(wheels.glob("rlvr_lightning-*.whl"))
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True)
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    where = subprocess.run([sys.executable, "-c", "import rlvr_lightning; print(rlvr_lightning.__file__)"],
                           cwd=work, env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(site), where  # the installed copy, not the checkout
    result = subprocess.run(
        [sys.executable, "-m", "rlvr_lightning.train", "model=tiny", "trainer.max_steps=1",
         "validate_before_training=false", "trainer.enable_progress_bar=false", "rollout.max_new_tokens=8",
         "data.num_val=4", "data.val_batch_size=4", FLOAT32],
        cwd=work, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    runs = list((work / "outputs" / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "checkpoints" / "last.ckpt").is_file()
    assert (runs[0] / "config.yaml").is_file()
