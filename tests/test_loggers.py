"""The ``logger`` config group: each of Lightning's loggers trains the tiny model for two steps
and writes the run's scalars into the run folder, where this test reads them back from the files.

W&B and MLflow are optional extras (``pip install 'rlvr_lightning[wandb]'`` / ``[mlflow]``); their
runs are skipped where the package is not installed.
"""

from __future__ import annotations

import csv
import importlib.util
import time
from pathlib import Path

import pytest

from rlvr_lightning.config import ConfigError, validate_config
from rlvr_lightning.loggers import build_logger
from rlvr_lightning.train import run
from tests.conftest import TINY_OVERRIDES, compose_config, read_scalars

CONF = Path(__file__).resolve().parents[1] / "rlvr_lightning" / "conf" / "logger"


def needs(package: str):
    return pytest.mark.skipif(importlib.util.find_spec(package) is None, reason=f"{package} is not installed")


def train(run_dir: Path, logger: str) -> dict[str, float]:
    return run(compose_config([*TINY_OVERRIDES, f"logger={logger}"]), run_dir=run_dir)


def check_points(points: dict[int, float], final: dict[str, float]) -> None:
    """``reward/mean`` at the two training steps, the last one equal to what the run reported."""
    assert sorted(points) == [0, 1]
    assert points[1] == pytest.approx(final["reward"], rel=1e-6)


def test_every_logger_config_is_tested() -> None:
    assert sorted(path.stem for path in CONF.glob("*.yaml")) == ["csv", "mlflow", "tensorboard", "wandb"]


def test_tensorboard_is_the_default_and_writes_event_files(tmp_path: Path) -> None:
    assert compose_config().logger._target_ == "lightning.pytorch.loggers.TensorBoardLogger"
    final = train(tmp_path / "run", "tensorboard")
    scalars = read_scalars(tmp_path / "run" / "tensorboard")
    check_points(dict(scalars["reward/mean"]), final)
    assert [step for step, _ in scalars["val/accuracy"]] == [0, 2]
    assert (tmp_path / "run" / "tensorboard" / "samples.jsonl").is_file()


def test_csv_writes_one_row_per_logged_step(tmp_path: Path) -> None:
    final = train(tmp_path / "run", "csv")
    folder = tmp_path / "run" / "csv"
    rows = list(csv.DictReader((folder / "metrics.csv").open()))
    points = {int(row["step"]): float(row["reward/mean"]) for row in rows if row["reward/mean"]}
    check_points(points, final)
    assert sorted(int(row["step"]) for row in rows if row["val/accuracy"]) == [0, 2]
    assert {"control/eps_high", "objective/policy_loss", "entropy/rollout"} <= set(rows[0])
    assert (folder / "hparams.yaml").is_file() and (folder / "samples.jsonl").is_file()


def wandb_history(path: Path, key: str) -> list[float]:
    """Values logged under ``key`` in an offline W&B run file (``run-*.wandb``): each history item
    is a protobuf message holding the key (field 2) and the value as JSON (field 16)."""
    data = path.read_bytes()
    needle = b"\x12" + bytes([len(key)]) + key.encode() + b"\x82\x01"
    values, start = [], 0
    while (found := data.find(needle, start)) >= 0:
        at = found + len(needle)
        length = data[at]
        values.append(float(data[at + 1 : at + 1 + length]))
        start = at + 1 + length
    return values


@needs("wandb")
def test_wandb_offline_writes_a_run_and_closes_it(tmp_path: Path) -> None:
    import wandb

    final = train(tmp_path / "run", "wandb")
    assert wandb.run is None  # closed by train.run, so the next run of the process starts its own
    (run_file,) = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    # W&B's service process writes the file; on a busy machine it may land just after finish().
    deadline = time.monotonic() + 60
    while 2.0 not in wandb_history(run_file, "trainer/global_step") and time.monotonic() < deadline:
        time.sleep(0.5)
    # The history, then the summary (the last values) at the end.
    assert wandb_history(run_file, "reward/mean")[-1] == pytest.approx(final["reward"], rel=1e-6)
    assert set(wandb_history(run_file, "trainer/global_step")) == {0.0, 1.0, 2.0}
    assert wandb_history(run_file, "control/eps_high")
    # A second run in the same process gets its own W&B run.
    train(tmp_path / "second", "wandb")
    assert len(list((tmp_path / "second" / "wandb").glob("offline-run-*/run-*.wandb"))) == 1


@needs("mlflow")
def test_mlflow_writes_a_file_store_in_the_run_folder(tmp_path: Path) -> None:
    final = train(tmp_path / "run", "mlflow")
    store = tmp_path / "run" / "mlruns"
    (metric_file,) = store.glob("*/*/metrics/reward/mean")
    # One line per point: "<timestamp ms> <value> <step>".
    points = {int(step): float(value) for _, value, step in (line.split() for line in metric_file.read_text().splitlines())}
    check_points(points, final)
    run_folder = metric_file.parents[2]
    steps = sorted(int(line.split()[2]) for line in (run_folder / "metrics" / "val" / "accuracy").read_text().splitlines())
    assert steps == [0, 2]
    assert (run_folder / "params").is_dir() and any((run_folder / "params").iterdir())


def test_save_dir_is_relative_to_the_run_folder(tmp_path: Path) -> None:
    logger = build_logger(compose_config(["logger=csv"]).logger, tmp_path / "run")
    assert Path(logger.log_dir) == tmp_path / "run" / "csv"
    absolute = build_logger(compose_config(["logger=csv", f"logger.save_dir={tmp_path / 'elsewhere'}"]).logger, tmp_path)
    assert Path(absolute.log_dir) == tmp_path / "elsewhere" / "csv"
    default = build_logger(None, tmp_path / "run")
    assert type(default).__name__ == "TensorBoardLogger" and Path(default.log_dir) == tmp_path / "run" / "tensorboard"


def test_logger_keys_and_packages_are_checked(monkeypatch) -> None:
    with pytest.raises(ConfigError, match=r"logger\.flush_every is not a setting of logger"):
        validate_config(compose_config([*TINY_OVERRIDES, "logger=csv", "+logger.flush_every=1"]))
    import rlvr_lightning.config as config_module

    real = config_module.importlib.util.find_spec
    monkeypatch.setattr(config_module.importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"logger=wandb needs the wandb package.*rlvr_lightning\[wandb\]"):
        validate_config(compose_config([*TINY_OVERRIDES, "logger=wandb"]))
