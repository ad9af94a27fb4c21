"""End-to-end: the real Hydra entry point on the tiny model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlvr_lightning.train import run
from tests.conftest import TINY_OVERRIDES, compose_config, read_scalars

REPO = Path(__file__).resolve().parents[1]


def test_cli_two_steps_writes_tensorboard_scalars(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "rlvr_lightning.train", *TINY_OVERRIDES, f"hydra.run.dir={run_dir}"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"run directory: {run_dir.resolve()}" in result.stdout
    scalars = read_scalars(run_dir)
    for tag in ("entropy/rollout", "entropy/update", "reward/mean", "control/eps_low", "control/eps_high",
                "objective/clip_low_fraction", "objective/clip_high_fraction", "time/generate_seconds",
                "perf/completion_tokens_per_second", "val/accuracy", "entropy/region_pa_hp_fraction"):
        assert tag in scalars, f"{tag} missing; have {sorted(scalars)}"
    assert [step for step, _ in scalars["reward/mean"]] == [0, 1]
    # Validation before training (step 0) and after the second rollout (step 2).
    assert [step for step, _ in scalars["val/accuracy"]] == [0, 2]
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "tensorboard" / "samples.jsonl").is_file()


def test_resume_continues_step_counter_and_control_state(tiny_config, tmp_path: Path) -> None:
    first = tmp_path / "first"
    run(tiny_config(), run_dir=first)
    ckpt = first / "checkpoints" / "last.ckpt"
    import torch

    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert saved["global_step"] == 2
    assert saved["rlvr_control_state"]["eps_high"] == pytest.approx(0.2)
    assert saved["optimizer_states"] and saved["lr_schedulers"]
    second = tmp_path / "second"
    run(tiny_config("trainer.max_steps=3", f"ckpt_path={ckpt}"), run_dir=second)
    scalars = read_scalars(second)
    assert [step for step, _ in scalars["reward/mean"]] == [2]


def test_training_on_a_set_without_held_out_rows_skips_validation(tmp_path: Path) -> None:
    rows = [{"problem": f"What is {a} + 1?", "answer": str(a + 1)} for a in range(6)]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(__import__("json").dumps(r) for r in rows))
    overrides = [o for o in TINY_OVERRIDES if not o.startswith("data.")]
    cfg = compose_config(overrides + ["data=jsonl", f"data.path={data}", "data.question_field=problem", "data.val_size=0"])
    run(cfg, run_dir=tmp_path / "run")
    scalars = read_scalars(tmp_path / "run")
    assert "reward/mean" in scalars and "val/accuracy" not in scalars


def test_validation_logs_pass_and_majority_at_k(tiny_config, tmp_path: Path) -> None:
    run(tiny_config("trainer.max_steps=1", "trainer.val_check_interval=1", "validation.n_samples=4"), run_dir=tmp_path)
    scalars = read_scalars(tmp_path)
    for tag in ("val/accuracy", "val/pass@2", "val/pass@4", "val/maj@2", "val/maj@4"):
        assert [step for step, _ in scalars[tag]] == [0, 1], tag
    # pass@k can only grow with k, and pass@1 is the accuracy.
    for (_, p2), (_, p4), (_, acc) in zip(scalars["val/pass@2"], scalars["val/pass@4"], scalars["val/accuracy"], strict=True):
        assert acc <= p2 + 1e-6 <= p4 + 2e-6


def test_multirun_sweeps_two_objectives(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    overrides = [o for o in TINY_OVERRIDES if o != "trainer.max_steps=2"]
    cmd = [sys.executable, "-m", "rlvr_lightning.train", "-m", "objective=grpo,dapo", *overrides,
           "trainer.max_steps=1", "validate_before_training=false", f"hydra.sweep.dir={sweep}"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    runs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert runs == ["0_grpo_constant", "1_dapo_constant"]  # <job>_<objective>_<schedule>
    for name in runs:
        assert "reward/mean" in read_scalars(sweep / name)


@pytest.mark.parametrize("engine", [
    ["rollout/engine=static"],
    ["rollout/engine=hf", "rollout.engine.cache=static", "rollout.engine.pad_prompts_to_multiple_of=8"],
])
def test_training_runs_on_the_other_rollout_engines(tiny_config, tmp_path: Path, engine: list[str]) -> None:
    run(tiny_config("trainer.max_steps=1", "validate_before_training=false", *engine), run_dir=tmp_path / "run")
    scalars = read_scalars(tmp_path / "run")
    assert [step for step, _ in scalars["reward/mean"]] == [0]
    assert scalars["length/response_mean"][0][1] > 0


def test_gradient_checkpointing_trains_like_plain_backward(tiny_config, tmp_path: Path) -> None:
    """Checkpointed layers keep no KV cache under autograd, so the update pass encodes each row's
    prompt (as with rollout.share_prompt_forward=false) and reaches the same weights."""
    import torch

    from rlvr_lightning.logprobs import recomputes_activations

    plain = ("reward.random_reward_probability=0.5", "rollout.share_prompt_forward=false")
    run(tiny_config(*plain), run_dir=tmp_path / "plain")
    run(tiny_config(*plain[:1], "model.gradient_checkpointing=true"), run_dir=tmp_path / "checkpointed")
    weights = [
        torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
        for name in ("plain", "checkpointed")
    ]
    for key, value in weights[0].items():
        assert torch.allclose(weights[1][key], value, atol=1e-6), key
    assert any(not torch.equal(weights[0][k], v) for k, v in _initial_weights().items())

    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    from rlvr_lightning.models import build_tiny_model

    model, _ = build_tiny_model(seed=0)
    assert not recomputes_activations(model)
    model.model.layers[0] = checkpoint_wrapper(model.model.layers[0])  # FSDP's activation checkpointing
    assert recomputes_activations(model)
    model, _ = build_tiny_model(seed=0)
    model.activation_checkpointing_enable()  # HF's (gradient_checkpointing_enable before transformers 5)
    assert recomputes_activations(model)


def _initial_weights() -> dict:
    from rlvr_lightning.models import build_tiny_model

    model, _ = build_tiny_model(seed=0)
    return {f"policy.{k}": v for k, v in model.state_dict().items()}
