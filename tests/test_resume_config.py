"""Reliability items 2, 4 and 5: a resume compares its config with the checkpoint's run's
(changed settings take effect and are listed, the control state stays the checkpoint's unless
asked, another objective or model is refused), an exploding finite update stops the run with the
state before it, and bad settings fail before the model loads and before anything is written."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import rlvr_lightning.module as module_module
import rlvr_lightning.preflight as preflight_module
from rlvr_lightning.checkpoints import CheckpointError, read_resume_checkpoint
from rlvr_lightning.config import ConfigError
from rlvr_lightning.models import build_tiny_model
from rlvr_lightning.preflight import OutputFolderError, warn_long_prompts
from rlvr_lightning.resume import ResumeConfigError, ResumeWarning
from rlvr_lightning.stability import _adam_factor, update_ratio
from rlvr_lightning.train import build, run
from tests.conftest import TINY_OVERRIDES, compose_config, read_scalars

REPO = Path(__file__).resolve().parents[1]
QUIET = ["validate_before_training=false", "trainer.val_check_interval=100"]
# The tiny model earns no reward, so its advantages (and gradients) are zero: random rewards give
# the updates of items 4's tests something to move.
SIGNAL = "reward.random_reward_probability=0.5"


def forbid_model_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the error")

    monkeypatch.setattr(module_module, "load_model_and_tokenizer", refuse)


def tiny(*extra: str):
    return compose_config(TINY_OVERRIDES + QUIET + list(extra))


def values(scalars: dict, tag: str) -> list[tuple[int, float]]:
    return [(step, value) for step, value in scalars.get(tag, [])]


# ---------------------------------------------------------------------------------------------
# 2. Resume with a changed config
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory) -> Path:
    """2 steps of GRPO (constant schedule) at optim.lr=1e-3: the checkpoint the resumes change."""
    folder = tmp_path_factory.mktemp("grpo")
    run(tiny("optim.lr=1e-3"), run_dir=folder)
    return folder


def test_changed_lr_takes_effect_on_resume_and_is_reported(grpo_run: Path, tmp_path: Path, capsys) -> None:
    ckpt = grpo_run / "checkpoints" / "last.ckpt"
    assert read_resume_checkpoint(ckpt)["rlvr_config"]["optim"]["lr"] == pytest.approx(1e-3)
    run(tiny("optim.lr=1e-5", "optim.weight_decay=0.01", "optim.betas=[0.8,0.99]", "trainer.max_steps=3",
             f"ckpt_path={ckpt}"), run_dir=tmp_path / "resumed")
    out = capsys.readouterr().out
    assert f"resuming from {ckpt} (after step 2)" in out and "its config: stored in the checkpoint" in out, out
    assert "optim.lr: 0.001 -> 1e-05 (applied)" in out and "optim.weight_decay: 0.0 -> 0.01 (applied)" in out, out
    assert "trainer.max_steps: 2 -> 3 (applied)" in out, out
    # The update of step 2 ran at the new rate (logged as such), and the optimizer holds it.
    assert values(read_scalars(tmp_path / "resumed"), "optim/lr") == [(2, pytest.approx(1e-5))]
    saved = read_resume_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    group = saved["optimizer_states"][0]["param_groups"][0]
    assert group["lr"] == pytest.approx(1e-5) and group["initial_lr"] == pytest.approx(1e-5)
    assert group["weight_decay"] == pytest.approx(0.01) and tuple(group["betas"]) == (0.8, 0.99)
    assert saved["lr_schedulers"][0]["base_lrs"] == [pytest.approx(1e-5)]


def test_checkpoint_without_stored_config_is_compared_with_its_run_config_yaml(grpo_run: Path, tmp_path: Path, capsys) -> None:
    saved = torch.load(grpo_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    del saved["rlvr_config"]  # as written before checkpoints stored their config
    old = grpo_run / "checkpoints" / "old_style.ckpt"
    torch.save(saved, old)
    try:
        run(tiny("optim.lr=1e-5", "trainer.max_steps=3", f"ckpt_path={old}"), run_dir=tmp_path / "resumed")
    finally:
        old.unlink()
    out = capsys.readouterr().out
    assert f"its config: {grpo_run / 'config.yaml'}" in out and "optim.lr: 0.001 -> 1e-05 (applied)" in out, out


def test_changed_control_value_is_not_applied_and_said_so_unless_reset(grpo_run: Path, tmp_path: Path) -> None:
    ckpt = grpo_run / "checkpoints" / "last.ckpt"
    changed = ["optim.lr=1e-3", "trainer.max_steps=3", "objective.control.eps_high=0.35", f"ckpt_path={ckpt}"]
    with pytest.warns(ResumeWarning) as warned:
        run(tiny(*changed), run_dir=tmp_path / "kept")
    message = " ".join(str(w.message) for w in warned if issubclass(w.category, ResumeWarning))
    assert "objective.control.eps_high: 0.2 -> 0.35 NOT applied" in message, message
    assert "eps_high=0.2 in force" in message and "resume.reset_control=true" in message, message
    assert values(read_scalars(tmp_path / "kept"), "control/eps_high") == [(2, pytest.approx(0.2))]

    run(tiny(*changed, "resume.reset_control=true"), run_dir=tmp_path / "reset")
    assert values(read_scalars(tmp_path / "reset"), "control/eps_high") == [(2, pytest.approx(0.35))]


@pytest.fixture(scope="module")
def dapo_run(tmp_path_factory) -> Path:
    """2 steps of DAPO under the oscillatory schedule."""
    folder = tmp_path_factory.mktemp("dapo")
    run(tiny("objective=dapo", "scheduler=oscillatory"), run_dir=folder)
    return folder


def test_another_objective_and_schedule_are_refused_listing_the_keys(dapo_run: Path, tmp_path: Path, monkeypatch) -> None:
    ckpt = dapo_run / "checkpoints" / "last.ckpt"
    forbid_model_loading(monkeypatch)
    with pytest.raises(ResumeConfigError) as error:
        run(tiny("objective=ce_gppo", "scheduler=target_entropy", "trainer.max_steps=3", f"ckpt_path={ckpt}"),
            run_dir=tmp_path / "run")
    message = str(error.value)
    assert isinstance(error.value, CheckpointError)
    for fragment in (
        f"checkpoint {ckpt} was written with another objective or schedule",
        "objective.name: 'dapo' in the checkpoint's run, 'ce_gppo' now",
        "scheduler._target_: 'rlvr_lightning.schedulers.OscillatoryDecay' in the checkpoint's run, "
        "'rlvr_lightning.schedulers.TargetEntropy' now",
        "resume.allow_objective_change=true",
    ):
        assert fragment in message, message
    assert not (tmp_path / "run").exists()


def test_allowed_objective_change_starts_control_and_schedule_from_the_config(dapo_run: Path, tmp_path: Path) -> None:
    ckpt = dapo_run / "checkpoints" / "last.ckpt"
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        run(tiny("objective=ce_gppo", "scheduler=target_entropy", "trainer.max_steps=3", f"ckpt_path={ckpt}",
                 "resume.allow_objective_change=true"), run_dir=tmp_path / "run")
    assert not [w for w in warned if "Please add the following callbacks" in str(w.message)]
    scalars = read_scalars(tmp_path / "run")
    # ce_gppo's betas are in force (the DAPO checkpoint's control state had beta1 = beta2 = 0) ...
    assert values(scalars, "control/beta1") == [(2, pytest.approx(0.5))]
    assert values(scalars, "control/beta2") == [(2, pytest.approx(1.0))]
    # ... and the target-entropy controller started fresh at step 2: its initial entropy is this
    # rollout's: target = (1 - 0.5 * 2/3) x H_init at step 2 of 3.
    [(_, entropy)] = values(scalars, "entropy/rollout")
    assert values(scalars, "control/target_entropy") == [(2, pytest.approx((1 - 0.5 * 2 / 3) * entropy, rel=1e-5))]


def test_another_model_is_refused_before_it_loads(grpo_run: Path, tmp_path: Path, monkeypatch) -> None:
    ckpt = grpo_run / "checkpoints" / "last.ckpt"
    forbid_model_loading(monkeypatch)
    with pytest.raises(ResumeConfigError) as error:
        run(tiny("optim.lr=1e-3", "model.tiny.hidden_size=32", "trainer.max_steps=3", f"ckpt_path={ckpt}",
                 "resume.allow_objective_change=true"), run_dir=tmp_path / "run")
    message = str(error.value)
    assert "model.tiny.hidden_size: 64 in the checkpoint's run, 32 now" in message, message
    assert "A model change cannot be resumed" in message and "python -m rlvr_lightning.export" in message, message
    assert not (tmp_path / "run").exists()


def test_max_steps_not_beyond_the_checkpoint_is_refused(grpo_run: Path, tmp_path: Path, monkeypatch) -> None:
    forbid_model_loading(monkeypatch)
    with pytest.raises(ResumeConfigError, match=r"trainer.max_steps=2, and checkpoint .* written after step 2: "
                                                r"nothing is left to train; set trainer.max_steps above 2"):
        run(tiny("optim.lr=1e-3", f"ckpt_path={grpo_run / 'checkpoints' / 'last.ckpt'}"), run_dir=tmp_path / "run")


# ---------------------------------------------------------------------------------------------
# 4. Exploding finite updates
# ---------------------------------------------------------------------------------------------


def test_update_ratio_predicts_adamw_exactly() -> None:
    """The predicted ||update|| / ||weights|| equals the change optimizer.step() then makes, at
    the first step and with moments, with weight decay, fused or not; the bound is above it."""
    for fused in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.3, betas=(0.8, 0.99), weight_decay=0.1, fused=fused)
        for _ in range(3):
            model(torch.randn(5, 8)).square().sum().backward()
            predicted = update_ratio(optimizer, limit=0.0)  # limit 0: always computed
            before = [p.detach().clone() for p in model.parameters()]
            optimizer.step()
            change = math.sqrt(sum(float((p - b).square().sum()) for p, b in zip(model.parameters(), before, strict=True)))
            norm = math.sqrt(sum(float(b.square().sum()) for b in before))
            assert predicted == pytest.approx(change / norm, rel=1e-4)
            optimizer.zero_grad()
    assert _adam_factor(0.9, 0.999, 1.0) == pytest.approx(1.0)


def test_update_ratio_bound_never_prunes_an_update_above_the_limit() -> None:
    torch.manual_seed(1)
    model = torch.nn.Linear(32, 32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    for _ in range(20):
        model(torch.randn(4, 32)).sum().backward()
        exact = update_ratio(optimizer, limit=0.0)
        assert update_ratio(optimizer, limit=exact * 0.999) is not None  # the bound never hides it
        optimizer.step()
        optimizer.zero_grad()


def test_exploding_finite_update_stops_with_the_state_before_it(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError) as error:
        run(tiny(SIGNAL, "optim.lr=1e12", "trainer.max_steps=4"), run_dir=tmp_path / "run")
    message = str(error.value)
    path = tmp_path / "run" / "checkpoints" / "exploding_update_stop.ckpt"
    for fragment in ("training stopped at step 0: update 1 of 2 of the step: it would change the weights by",
                     "optim.stop_update_ratio=1", "learning rate 1e+12", f"{path} holds the state before it",
                     "Lower optim.lr", f"ckpt_path={path}"):
        assert fragment in message, message
    checkpoint = read_resume_checkpoint(path)
    assert checkpoint["global_step"] == 1
    initial = build_tiny_model(seed=0)[0].state_dict()
    for name, tensor in initial.items():  # the exploding update was not taken
        assert torch.equal(checkpoint["state_dict"][f"policy.{name}"], tensor), name
    # The message's advice works: a lower lr takes effect on resume and trains finitely.
    run(tiny(SIGNAL, "optim.lr=1e-5", "trainer.max_steps=2", f"ckpt_path={path}"), run_dir=tmp_path / "resumed")
    scalars = read_scalars(tmp_path / "resumed")
    assert values(scalars, "optim/lr") == [(1, pytest.approx(1e-5))]
    assert values(scalars, "optim/skipped_nonfinite_updates") == [(1, 0.0)]
    assert math.isfinite(values(scalars, "optim/loss")[0][1])


def test_without_the_bound_the_same_update_wrecks_the_weights(tmp_path: Path) -> None:
    """What the guard prevents: with optim.stop_update_ratio=null the update is taken."""
    try:
        run(tiny(SIGNAL, "optim.lr=1e12", "trainer.max_steps=1", "optim.stop_update_ratio=null"), run_dir=tmp_path)
    except RuntimeError as error:  # NaN/Inf stop: fine too, the point is the weights
        assert "NaN/Inf" in str(error)
    saved = next((tmp_path / "checkpoints").glob("*.ckpt"))
    weights = read_resume_checkpoint(saved)["state_dict"]
    assert max(float(t.abs().max()) for t in weights.values() if t.is_floating_point()) > 1e6


def test_gradient_norm_bound_stops_before_the_update(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=r"update 1 of 2 of the step: its gradient norm \S+ \(before clipping to "
                                           r"optim.max_grad_norm\) is above optim.stop_grad_norm=1e-12"):
        run(tiny(SIGNAL, "optim.stop_grad_norm=1e-12"), run_dir=tmp_path)
    checkpoint = read_resume_checkpoint(tmp_path / "checkpoints" / "exploding_update_stop.ckpt")
    initial = build_tiny_model(seed=0)[0].state_dict()
    assert all(torch.equal(checkpoint["state_dict"][f"policy.{n}"], t) for n, t in initial.items())


# ---------------------------------------------------------------------------------------------
# 5. Bad settings fail before the model loads and before anything is written
# ---------------------------------------------------------------------------------------------

LATE_FAILURES = [
    ("objective.control.eps_high=28", "objective.control.eps_high=28 must be in [0, 10]"),
    ("logging.num_groups=-1", "logging.num_groups=-1 must be >= 1"),
    ("model.lora.r=-1", "model.lora.r=-1 must be >= 0"),
    ("trainer.val_check_interval=0", "trainer.val_check_interval=0 must be >= 1"),
    ("optim.betas=[0.9,1.5]", "optim.betas=[0.9, 1.5] must be two numbers in [0, 1)"),
    ("data.num_train=0", "data.num_train=0 must be >= 1"),
    ("scheduler=linear scheduler.field=eps_hihg", "scheduler.field 'eps_hihg' is not a float field of ControlState"),
    ("scheduler=target_entropy scheduler.kp=-1", "scheduler.kp must be finite and >= 0 (got -1)"),
    ("model=hf model.name_or_path=/no/such/folder/model", "model.name_or_path='/no/such/folder/model' is not an existing folder"),
    ("seed=abc", "seed='abc' must be an integer in [0, 4294967295]"),
]


@pytest.mark.parametrize("override,expected", LATE_FAILURES, ids=[o for o, _ in LATE_FAILURES])
def test_late_failing_values_fail_before_the_model_loads(override: str, expected: str, tmp_path: Path, monkeypatch) -> None:
    forbid_model_loading(monkeypatch)
    with pytest.raises(ConfigError) as error:
        run(compose_config(TINY_OVERRIDES + override.split()), run_dir=tmp_path / "run")
    assert expected in str(error.value), str(error.value)
    assert not (tmp_path / "run").exists()


def test_unwritable_checkpoint_folder_fails_before_the_model_loads(tmp_path: Path, monkeypatch) -> None:
    forbid_model_loading(monkeypatch)
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    real_access = os.access
    # Read-only for this process (root ignores permission bits, so the denial is simulated).
    monkeypatch.setattr(preflight_module.os, "access",
                        lambda path, mode: False if Path(path) == run_dir / "checkpoints" else real_access(path, mode))
    with pytest.raises(OutputFolderError) as error:
        run(tiny(), run_dir=run_dir)
    assert f"cannot write the checkpoint folder {run_dir / 'checkpoints'}: permission denied" in str(error.value)
    assert "hydra.run.dir=" in str(error.value)
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints"]


def test_checkpoint_path_taken_by_a_file_fails_before_the_model_loads(tmp_path: Path, monkeypatch) -> None:
    forbid_model_loading(monkeypatch)
    (tmp_path / "checkpoints").write_text("not a folder")
    with pytest.raises(OutputFolderError, match=r"cannot write the checkpoint folder .*checkpoints: it is a file, not a folder"):
        run(tiny(), run_dir=tmp_path)


def test_rejected_config_on_the_command_line_creates_no_run_folder(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    run_dir = tmp_path / "run"
    base = [sys.executable, "-m", "rlvr_lightning.train", *TINY_OVERRIDES, f"hydra.run.dir={run_dir}"]
    result = subprocess.run([*base, "objective.control.eps_high=28"], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode != 0
    assert "objective.control.eps_high=28 must be in [0, 10]" in result.stderr, result.stderr[-2000:]
    assert not run_dir.exists(), sorted(p.name for p in run_dir.rglob("*"))
    # A config that passes gets Hydra's files, written once it passed.
    result = subprocess.run([*base, "trainer.max_steps=1", *QUIET], cwd=REPO, capture_output=True, text=True,
                            timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("config.yaml", ".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml"):
        assert (run_dir / name).is_file(), name
    assert "objective.control.eps_high=28" not in (run_dir / ".hydra" / "overrides.yaml").read_text()


def test_prompts_longer_than_the_context_are_warned(tmp_path: Path) -> None:
    import json

    rows = [{"question": f"What is {a} + 1?", "answer": str(a + 1)} for a in range(6)]
    rows.append({"question": "Add one. " * 2200 + "What is 2 + 1?", "answer": "3"})  # ~20,000 characters
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    overrides = [o for o in TINY_OVERRIDES if not o.startswith("data.")] + QUIET + [
        "data=jsonl", f"data.path={data}", "data.val_size=0", "trainer.max_steps=1"]
    cfg = compose_config(overrides)
    _, module, datamodule = build(cfg, tmp_path / "unused")
    with pytest.warns(UserWarning) as warned:
        tokens = warn_long_prompts(module, datamodule.train_rows, cfg)
    message = " ".join(str(w.message) for w in warned)
    assert tokens > 19_000
    for fragment in (f"the longest training prompt is {tokens} tokens", "the model's context of 1024 tokens",
                     "rollout.max_prompt_tokens is not set", "set rollout.max_prompt_tokens=1012"):
        assert fragment in message, message
    # A limit inside the context: no warning; one past it: warned, through train.run.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_long_prompts(module, datamodule.train_rows, compose_config(overrides + ["rollout.max_prompt_tokens=500"]))
    with pytest.warns(UserWarning, match="rollout.max_prompt_tokens=2000 lets them past it"):
        run(compose_config(overrides + ["rollout.max_prompt_tokens=2000"]), run_dir=tmp_path / "run")
