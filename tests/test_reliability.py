"""Reliability (issue 6): exact resume, config validation, bad input, numerical faults,
checkpoint files and safe model loading. Every run is the tiny model on CPU for a few steps."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.errors import HydraException

import rlvr_lightning.module as module_module
import rlvr_lightning.train as train_module
import rlvr_lightning.update as update_module
from rlvr_lightning.checkpoints import (
    AtomicCheckpointIO,
    CheckpointError,
    atomic_torch_save,
    read_resume_checkpoint,
)
from rlvr_lightning.config import ConfigError, validate_config
from rlvr_lightning.control import ControlState
from rlvr_lightning.data.prompts import build_prompt
from rlvr_lightning.models import build_tiny_model, load_model_and_tokenizer
from rlvr_lightning.objectives import compute_loss
from rlvr_lightning.schedulers import ControlCallback, StepInfo
from rlvr_lightning.train import build, run
from tests.conftest import TINY_OVERRIDES, compose_config, read_scalars

REPO = Path(__file__).resolve().parents[1]
# Every scalar that shapes or measures the next steps of a run.
COMPARED = ("reward/", "control/", "objective/policy_loss", "optim/loss", "entropy/rollout")


def folder_snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> content hash of every file under ``folder``."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def assert_same_steps(full: dict, resumed: dict, steps: list[int]) -> None:
    """Every compared tag of ``resumed`` equals the uninterrupted run's at ``steps``."""
    tags = sorted(tag for tag in full if tag.startswith(COMPARED))
    assert "reward/mean" in tags and "control/eps_high" in tags and "optim/loss" in tags
    differences = []
    for tag in tags:
        expected = [(step, value) for step, value in full[tag] if step in steps]
        got = resumed.get(tag, [])
        if [s for s, _ in got] != steps or any(
            abs(a - b) > 1e-6 for (_, a), (_, b) in zip(expected, got, strict=True)
        ):
            differences.append(f"{tag}: uninterrupted {expected}, resumed {got}")
    assert not differences, "\n".join(differences)


def forbid_model_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the error")

    monkeypatch.setattr(module_module, "load_model_and_tokenizer", refuse)


# ---------------------------------------------------------------------------------------------
# 1. Exact resume
# ---------------------------------------------------------------------------------------------


def test_resumed_run_matches_uninterrupted_run_step_by_step(tiny_config, tmp_path: Path) -> None:
    """4 steps straight vs 2 steps, then resume from last.ckpt to 4: steps 2 and 3 agree."""
    run(tiny_config("trainer.max_steps=4"), run_dir=tmp_path / "full")
    run(tiny_config("trainer.max_steps=2"), run_dir=tmp_path / "first")
    ckpt = tmp_path / "first" / "checkpoints" / "last.ckpt"
    run(tiny_config("trainer.max_steps=4", f"ckpt_path={ckpt}"), run_dir=tmp_path / "resumed")
    assert_same_steps(read_scalars(tmp_path / "full"), read_scalars(tmp_path / "resumed"), [2, 3])


class SimulatedKill(Exception):
    pass


class KillDuringStep(ControlCallback):
    """Raises in the middle of training step ``step``: after its rollout, before its updates."""

    def __init__(self, step: int) -> None:
        self.step = step

    def update(self, control: ControlState, info: StepInfo) -> None:
        if info.step == self.step:
            raise SimulatedKill(f"killed during step {info.step}")


def test_killed_run_resumes_from_its_latest_step_checkpoint(tmp_path: Path, monkeypatch) -> None:
    """A run killed mid-step resumes from its latest step checkpoint exactly: stateful closed-loop
    schedule, cosine LR with warm-up, optimizer moments and the data order all carry over."""
    overrides = TINY_OVERRIDES + [
        "trainer.max_steps=4",
        "trainer.val_check_interval=100",
        "validate_before_training=false",
        "checkpoint.every_n_steps=1",
        "scheduler=target_entropy",
        "optim.lr_schedule=cosine",
        "optim.warmup_updates=1",
        "optim.lr=1e-3",  # large enough that the updates move the policy visibly
    ]
    run(compose_config(overrides), run_dir=tmp_path / "full")

    original_build = train_module.build

    def build_with_kill(cfg, run_dir, **options):
        trainer, module, datamodule = original_build(cfg, run_dir, **options)
        trainer.callbacks.append(KillDuringStep(step=2))
        return trainer, module, datamodule

    killed = tmp_path / "killed"
    with monkeypatch.context() as patch:
        patch.setattr(train_module, "build", build_with_kill)
        with pytest.raises(SimulatedKill):
            run(compose_config(overrides), run_dir=killed)
    step_checkpoints = sorted((killed / "checkpoints").glob("step_*.ckpt"), key=os.path.getmtime)
    assert len(step_checkpoints) == 2, sorted(p.name for p in (killed / "checkpoints").iterdir())
    latest = step_checkpoints[-1]
    assert torch.load(latest, map_location="cpu", weights_only=True)["global_step"] == 2
    assert not list(killed.rglob("*.tmp")), "an atomic write left its temporary file"

    run(compose_config(overrides + [f"ckpt_path={latest}"]), run_dir=tmp_path / "resumed")
    full, resumed = read_scalars(tmp_path / "full"), read_scalars(tmp_path / "resumed")
    assert_same_steps(full, resumed, [2, 3])
    # The compared steps trained with a moving LR and a moving closed-loop entropy coefficient
    # (the controller's integral and previous entropy, for its derivative term, carry over).
    assert len({value for _, value in full["optim/lr"]}) > 1
    assert len({value for _, value in full["control/entropy_coef"]}) > 1


# ---------------------------------------------------------------------------------------------
# 2. Config validation
# ---------------------------------------------------------------------------------------------

BAD_VALUES = [
    ("objective.control.eps_low=-0.1", ["objective.control.eps_low=-0.1", ">= 0"]),
    ("objective.control.eps_high=-1", ["objective.control.eps_high=-1", ">= 0"]),
    ("objective.control.beta1=-0.5", ["objective.control.beta1=-0.5", ">= 0"]),
    ("rollout.epochs=0", ["rollout.epochs=0", ">= 1", "updates_per_rollout"]),
    ("rollout.mini_batches=0", ["rollout.mini_batches=0", ">= 1", "updates_per_rollout"]),
    ("rollout.group_size=1", ["rollout.group_size=1", "grpo", "group_size >= 2"]),
    ("rollout.mini_batches=3", ["rollout.mini_batches=3", "does not divide", "prompts_per_step=2"]),
    ("rollout.top_p=1.5", ["rollout.top_p=1.5", "in (0, 1]"]),
    ("rollout.temperature=0", ["rollout.temperature=0", "> 0"]),
    ("rollout.max_prompt_tokens=0", ["rollout.max_prompt_tokens=0", ">= 1"]),
    ("rollout.overlong_prompts=cut", ["rollout.overlong_prompts='cut'", "drop, truncate"]),
    ("rollout.group_size=two", ["rollout.group_size='two'", "an integer >= 1"]),
    ("malloc_threshold_mib=0", ["malloc_threshold_mib=0", "in [1, 2047]"]),
    ("rollout.engine=static", ["rollout.engine='static' must be an engine block", "rollout/engine=<name>"]),
    ("+rollout.temprature=0.7", ["rollout.temprature is not a setting of rollout", "temperature"]),
    ("+objective.control.eps_hihg=0.3", ["objective.control.eps_hihg is not a setting", "eps_high"]),
    ("+scheduler.warmup=3", ["scheduler.warmup is not a setting of scheduler", "_target_"]),
    ("+model.nme=x", ["model.nme is not a setting of model", "name_or_path"]),
    ("+lr=0.1", ["lr is not a setting", "optim"]),
    ("rollout.engine.name=sglang", ["rollout.engine.name='sglang'", "hf, shared_prefix, static, vllm"]),
    ("+rollout.engine.cuda_graph=true", ["rollout.engine.cuda_graph is not an option of rollout/engine=shared_prefix",
                                         "pad_prompts_to_multiple_of"]),
    ("rollout/engine=static rollout.engine.cuda_graphs=maybe", ["rollout.engine.cuda_graphs='maybe'", "auto, true, false"]),
    ("rollout/engine=hf rollout.engine.cache=paged", ["rollout.engine.cache='paged'", "dynamic, static"]),
    ("rollout/engine=static rollout.engine.compile_decoding=maybe",
     ["rollout.engine.compile_decoding='maybe'", "auto, true, false"]),
    ("rollout.engine.pad_prompts_to_multiple_of=0", ["rollout.engine.pad_prompts_to_multiple_of=0", ">= 1"]),
    ("objective.name=nope", ["objective.name='nope'", "grpo", "ce_gppo"]),
    ("advantage.name=mean", ["advantage.name='mean'", "grpo, dr_grpo"]),
    ("sampling.max_generation_batches=0", ["sampling.max_generation_batches=0", ">= 1"]),
    ("sampling.dynamic=maybe", ["sampling.dynamic='maybe'", "true or false"]),
    ("optim.lr=0", ["optim.lr=0", "> 0"]),
    ("optim.lr_schedule=step", ["optim.lr_schedule='step'", "constant, linear, cosine"]),
    ("optim.min_lr_ratio=2", ["optim.min_lr_ratio=2", "in [0, 1]"]),
    ("optim.max_consecutive_nonfinite_updates=-1", ["optim.max_consecutive_nonfinite_updates=-1", ">= 0"]),
    ("reward.method=regex", ["reward.method='regex'", "numeric, math_verify"]),
    ("reward.answer_mode=first", ["reward.answer_mode='first'", "boxed, last_number, boxed_or_last"]),
    ("validation.n_samples=0", ["validation.n_samples=0", ">= 1"]),
    ("trainer.max_steps=0", ["trainer.max_steps=0", ">= 1"]),
    ("trainer.max_steps=null", ["trainer.max_steps is not set"]),
    ("~trainer.max_steps", ["trainer.max_steps is not set"]),
    ("~scheduler._target_", ["scheduler has no _target_", "scheduler._target_="]),
    ("model.source=onnx", ["model.source='onnx'", "smollm2_gguf, pretrained, tiny"]),
    ("model.trust_remote_code=yes", ["model.trust_remote_code='yes'", "true or false"]),
    # Values that used to fail only after the model loaded or a step ran (tests/test_resume_config.py
    # checks those of the issue through train.run); more of the same kind:
    ("optim.betas=[0.9]", ["optim.betas=[0.9]", "two numbers in [0, 1)"]),
    ("optim.eps=0", ["optim.eps=0", "> 0"]),
    ("optim.stop_update_ratio=0", ["optim.stop_update_ratio=0", "> 0", "null turns"]),
    ("optim.stop_grad_norm=-1", ["optim.stop_grad_norm=-1", "> 0"]),
    ("resume.reset_control=maybe", ["resume.reset_control='maybe'", "true or false"]),
    ("logging.sample_every_n_steps=-1", ["logging.sample_every_n_steps=-1", ">= 0"]),
    ("model.lora.r=4 model.lora.alpha=0", ["model.lora.alpha=0", "> 0"]),
    ("model.lora.r=4 model.lora.dropout=1", ["model.lora.dropout=1", "in [0, 1)"]),
    ("data.max_digits=0", ["data.max_digits=0", ">= 1"]),
    ("data.min_digits=2", ["data.max_digits=1", ">= data.min_digits=2"]),
    ("seed=-1", ["seed=-1", "in [0, 4294967295]"]),
    ("scheduler=beta_stages scheduler.stages=[[0.5,0,1],[0.2,1,1]]", ["scheduler.stages must be sorted"]),
    ("scheduler._target_=nope.Nope", ["scheduler._target_='nope.Nope' cannot be imported"]),
]


@pytest.mark.parametrize("override,fragments", BAD_VALUES, ids=[o for o, _ in BAD_VALUES])
def test_invalid_value_names_the_field_and_the_allowed_range(override: str, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as error:
        validate_config(compose_config(TINY_OVERRIDES + override.split()))
    for fragment in fragments:
        assert fragment in str(error.value), str(error.value)


def test_static_engine_under_fsdp_needs_gathered_weights() -> None:
    fsdp2 = TINY_OVERRIDES + ["rollout/engine=static", "trainer=fsdp2"]
    validate_config(compose_config(fsdp2))
    with pytest.raises(ConfigError, match="trainer.strategy.gather_for_rollout=true or use rollout/engine=shared_prefix"):
        validate_config(compose_config(fsdp2 + ["trainer.strategy.gather_for_rollout=false"]))


def test_shipped_configs_are_valid() -> None:
    for group in ("objective", "scheduler"):
        for path in sorted((REPO / "rlvr_lightning" / "conf" / group).glob("*.yaml")):
            validate_config(compose_config(TINY_OVERRIDES + [f"{group}={path.stem}"]))
    # The built-in arithmetic data configs (the file-backed ones need a path or the network).
    for path in sorted((REPO / "rlvr_lightning" / "conf" / "data").glob("arithmetic*.yaml")):
        validate_config(compose_config(TINY_OVERRIDES + [f"data={path.stem}"]))


def test_invalid_config_fails_before_the_model_loads(tmp_path: Path, monkeypatch) -> None:
    forbid_model_loading(monkeypatch)
    with pytest.raises(ConfigError, match="objective.control.eps_low=-0.1 must be >= 0"):
        run(compose_config(TINY_OVERRIDES + ["objective.control.eps_low=-0.1"]), run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("group,option", [("objective", "grpo"), ("scheduler", "linear"), ("model", "tiny"), ("data", "gsm8k")])
def test_unknown_group_option_lists_the_available_ones(group: str, option: str) -> None:
    with pytest.raises(HydraException) as error:
        compose_config(TINY_OVERRIDES + [f"{group}=nope"])
    message = str(error.value)
    assert f"Could not find '{group}/nope'" in message and f"Available options in '{group}'" in message
    assert option in message


def test_cli_unknown_objective_lists_the_available_ones(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "rlvr_lightning.train", *TINY_OVERRIDES, "objective=nope",
           f"hydra.run.dir={tmp_path / 'run'}"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode != 0
    assert "Could not find 'objective/nope'" in result.stderr, result.stderr[-2000:]
    assert "Available options in 'objective'" in result.stderr and "ce_gppo" in result.stderr
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# 3. Bad data
# ---------------------------------------------------------------------------------------------


def jsonl_overrides(path: Path, *extra: str) -> list[str]:
    overrides = [o for o in TINY_OVERRIDES if not o.startswith("data.")]
    return overrides + ["data=jsonl", f"data.path={path}", "data.val_size=0",
                        "validate_before_training=false", *extra]


def test_malformed_rows_are_skipped_counted_and_warned(tmp_path: Path) -> None:
    good = [json.dumps({"question": f"What is {a} + 1?", "answer": a + 1}) for a in range(4)]
    bad = [
        json.dumps({"question": "What is 2 + 2?"}),  # missing answer
        json.dumps({"question": "   ", "answer": 3}),  # empty question
        json.dumps({"question": "What is 5 + 5?", "answer": "ten"}),  # unparsable number
        '{"question": "What is 1 + 1?", "answer": ',  # invalid JSON
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(good[:2] + bad + good[2:]) + "\n")
    cfg = compose_config(jsonl_overrides(path, "data.answer_format=number", "trainer.max_steps=1"))
    with pytest.warns(UserWarning, match=r"skipped 4 malformed row\(s\) of 8") as warned:
        run(cfg, run_dir=tmp_path / "run")
    message = next(str(w.message) for w in warned if "malformed" in str(w.message))
    for reason in ("missing field 'answer'", "empty question", "unparsable answer", "invalid JSON"):
        assert reason in message, message
    assert "reward/mean" in read_scalars(tmp_path / "run")


def test_dataset_without_a_valid_row_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"problem": "What is 1 + 1?", "answer": 2}) + "\n")
    forbid_model_loading(monkeypatch)
    with pytest.raises(ValueError, match="has no usable row") as error:
        run(compose_config(jsonl_overrides(path)), run_dir=tmp_path / "run")
    assert "question_field='question'" in str(error.value)
    assert "check the field names" in str(error.value)


def overlong_data(tmp_path: Path) -> tuple[Path, int]:
    """Rows of two lengths and a token limit between their prompt lengths."""
    short = [f"What is {a} + 1?" for a in range(4)]
    long = [f"Take the number {a}, add one to it, and say what you get. What is {a} + 1?" for a in range(4)]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps({"question": q, "answer": str(a + 1)})
                              for a, q in enumerate(short + long)) + "\n")
    tokenizer = build_tiny_model()[1]
    length = [len(tokenizer(build_prompt(tokenizer, q), add_special_tokens=False)["input_ids"]) for q in short + long]
    assert max(length[:4]) < min(length[4:])
    return path, max(length[:4]) + 2


def test_overlong_prompts_are_dropped_and_counted(tmp_path: Path) -> None:
    path, limit = overlong_data(tmp_path)
    cfg = compose_config(jsonl_overrides(path, "trainer.max_steps=4", f"rollout.max_prompt_tokens={limit}"))
    with pytest.warns(UserWarning, match="are dropped"):
        run(cfg, run_dir=tmp_path / "run")
    scalars = read_scalars(tmp_path / "run")
    dropped = [value for _, value in scalars["data/overlong_prompts_dropped"]]
    sequences = [value for _, value in scalars["sampling/num_sequences"]]
    assert sum(dropped) > 0, dropped
    # Each step trains on the prompts that fit: 2 per step minus the dropped, 4 samples each.
    assert sequences == [(2 - d) * 4 for d in dropped if d < 2]


def test_step_whose_prompts_are_all_dropped_is_skipped(tmp_path: Path) -> None:
    path, _ = overlong_data(tmp_path)
    cfg = compose_config(jsonl_overrides(path, "rollout.max_prompt_tokens=5"))
    with pytest.warns(UserWarning, match="step 0: every prompt is longer than rollout.max_prompt_tokens=5"):
        run(cfg, run_dir=tmp_path / "run")
    scalars = read_scalars(tmp_path / "run")
    assert scalars["data/overlong_prompts_dropped"] == [(0, 2.0), (1, 2.0)]
    assert scalars["optim/skipped_steps_without_prompts"] == [(0, 1.0), (1, 1.0)]
    assert "reward/mean" not in scalars
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 2  # the skipped steps still count toward trainer.max_steps


def test_overlong_prompts_are_truncated_to_their_end(tmp_path: Path) -> None:
    path, limit = overlong_data(tmp_path)
    cfg = compose_config(jsonl_overrides(path, "trainer.max_steps=4", f"rollout.max_prompt_tokens={limit}",
                                         "rollout.overlong_prompts=truncate"))
    run(cfg, run_dir=tmp_path / "run")
    scalars = read_scalars(tmp_path / "run")
    assert sum(value for _, value in scalars["data/overlong_prompts_truncated"]) > 0
    assert [value for _, value in scalars["sampling/num_sequences"]] == [8.0] * 4

    _, module, datamodule = build(cfg, tmp_path / "unused")
    rows = [row for row in datamodule.train_rows if "Take the number" in row["question"]][:2]
    rollout = module.collector.sample(rows, group_size=2)
    prompt_width = rollout.input_ids.shape[1] - rollout.response_length
    assert prompt_width <= limit
    prompt = module.tokenizer.decode(rollout.input_ids[0, :prompt_width])
    # The end survives: the question's last words, the instruction, the assistant header.
    assert prompt.endswith("\\boxed{}.<|im_end|>\n<|im_start|>assistant\n"), prompt


# ---------------------------------------------------------------------------------------------
# 4. Numerical faults
# ---------------------------------------------------------------------------------------------


def nan_loss_on(calls: set[int] | None):
    """compute_loss whose loss is NaN on the given call numbers (None: always)."""
    count = [0]

    def patched(*args, **kwargs):
        loss, metrics = compute_loss(*args, **kwargs)
        count[0] += 1
        if calls is None or count[0] - 1 in calls:
            loss = loss * float("nan")
        return loss, metrics

    return patched


def test_nonfinite_updates_stop_the_run_with_a_checkpoint(tiny_config, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(update_module, "compute_loss", nan_loss_on(None))
    cfg = tiny_config("trainer.max_steps=4", "optim.max_consecutive_nonfinite_updates=3",
                      "validate_before_training=false")
    with pytest.raises(RuntimeError) as error:
        run(cfg, run_dir=tmp_path)
    message = str(error.value)
    path = tmp_path / "checkpoints" / "nonfinite_stop.ckpt"
    for fragment in ("training stopped at step 1", "3 optimizer updates in a row had a NaN/Inf loss",
                     "optim.max_consecutive_nonfinite_updates=3", str(path), "lower optim.lr",
                     f"ckpt_path={path}"):
        assert fragment in message, message
    # 2 updates per rollout: both skipped at step 0, the first at step 1 reaches 3 in a row.
    scalars = read_scalars(tmp_path)
    assert scalars["optim/skipped_nonfinite_updates"] == [(0, 2.0), (1, 1.0)]
    checkpoint = read_resume_checkpoint(path)
    assert checkpoint["global_step"] == 2
    assert checkpoint["rlvr_consecutive_nonfinite_updates"] == 3
    # Every update was skipped, so the saved weights are the initial ones.
    initial = build_tiny_model(seed=0)[0].state_dict()
    for name, tensor in initial.items():
        assert torch.equal(checkpoint["state_dict"][f"policy.{name}"], tensor), name
    # The advice works: with the fault gone, training resumes from the checkpoint at step 2.
    monkeypatch.undo()
    run(tiny_config("trainer.max_steps=3", f"ckpt_path={path}"), run_dir=tmp_path / "resumed")
    resumed = read_scalars(tmp_path / "resumed")
    assert resumed["optim/skipped_nonfinite_updates"] == [(2, 0.0)]


def test_nonfinite_updates_that_are_not_in_a_row_do_not_stop(tiny_config, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(update_module, "compute_loss", nan_loss_on({0, 2}))  # first update of each step
    cfg = tiny_config("optim.max_consecutive_nonfinite_updates=2", "validate_before_training=false")
    run(cfg, run_dir=tmp_path)
    assert read_scalars(tmp_path)["optim/skipped_nonfinite_updates"] == [(0, 1.0), (1, 1.0)]
    assert not (tmp_path / "checkpoints" / "nonfinite_stop.ckpt").exists()


# ---------------------------------------------------------------------------------------------
# 5. Checkpoint files
# ---------------------------------------------------------------------------------------------


def test_interrupted_checkpoint_write_keeps_the_previous_file(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "checkpoints" / "last.ckpt"
    atomic_torch_save({"global_step": 1}, path)
    before = path.read_bytes()

    def dies_mid_write(obj, stream):
        stream.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        AtomicCheckpointIO().save_checkpoint({"global_step": 2}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt", "last.ckpt.sha256"]


def test_trainer_writes_checkpoints_atomically(tiny_config, tmp_path: Path) -> None:
    trainer, _, _ = build(tiny_config(), tmp_path)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A 1-step tiny run whose checkpoint the resume-error tests corrupt copies of."""
    folder = tmp_path_factory.mktemp("finished")
    run(compose_config(TINY_OVERRIDES + ["trainer.max_steps=1", "validate_before_training=false"]), run_dir=folder)
    return folder


def resume_config(ckpt: Path, *extra: str):
    return compose_config(TINY_OVERRIDES + ["trainer.max_steps=2", f"ckpt_path={ckpt}", *extra])


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_checkpoint_is_a_clear_error_and_touches_nothing(
    finished_run: Path, damage: str, monkeypatch
) -> None:
    data = (finished_run / "checkpoints" / "last.ckpt").read_bytes()
    broken = finished_run / "checkpoints" / f"{damage}.ckpt"
    broken.write_bytes(data[: len(data) // 2] if damage == "truncated" else os.urandom(4096))
    before = folder_snapshot(finished_run)
    forbid_model_loading(monkeypatch)
    try:
        # Resuming into the old run's own folder must not write there either.
        with pytest.raises(CheckpointError) as error:
            run(resume_config(broken), run_dir=finished_run)
    finally:
        after = folder_snapshot(finished_run)
        broken.unlink()
    assert after == before
    message = str(error.value)
    assert f"checkpoint {broken} cannot be read" in message and "truncated or corrupt" in message
    assert "ckpt_path=" in message


def test_missing_checkpoint_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    forbid_model_loading(monkeypatch)
    with pytest.raises(FileNotFoundError, match="does not exist; pass ckpt_path=outputs/runs/<run>/checkpoints/last.ckpt"):
        run(resume_config(tmp_path / "nope.ckpt"), run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_checkpoint_of_another_model_size_is_a_clear_error(finished_run: Path, tmp_path: Path, monkeypatch) -> None:
    before = folder_snapshot(finished_run)
    ckpt = finished_run / "checkpoints" / "last.ckpt"
    with monkeypatch.context() as patch:
        forbid_model_loading(patch)  # the config stored in the checkpoint names the model
        with pytest.raises(CheckpointError) as error:
            run(resume_config(ckpt, "model.tiny.hidden_size=32"), run_dir=tmp_path / "run")
    message = str(error.value)
    assert f"checkpoint {ckpt} was written with another model" in message, message
    assert "model.tiny.hidden_size: 64 in the checkpoint's run, 32 now" in message, message
    assert folder_snapshot(finished_run) == before
    assert not (tmp_path / "run").exists()
    # A checkpoint that records no config (copied alone, its config stripped): the weights'
    # shapes are compared once the model is built.
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    del saved["rlvr_config"], saved["hyper_parameters"]
    alone = tmp_path / "alone" / "last.ckpt"
    alone.parent.mkdir()
    torch.save(saved, alone)
    with pytest.raises(CheckpointError) as error:
        run(resume_config(alone, "model.tiny.hidden_size=32"), run_dir=tmp_path / "run")
    message = str(error.value)
    assert f"checkpoint {alone} does not fit the configured model" in message
    assert "shape mismatch" in message and "64) in the file vs (" in message and "32) configured" in message
    assert not (tmp_path / "run").exists()


def test_checkpoint_without_control_state_is_a_clear_error(finished_run: Path, tmp_path: Path) -> None:
    saved = torch.load(finished_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    del saved["rlvr_control_state"]
    foreign = tmp_path / "foreign.ckpt"
    torch.save(saved, foreign)
    with pytest.raises(CheckpointError, match="has no rlvr_lightning control state: it was not written by rlvr_lightning"):
        run(resume_config(foreign), run_dir=tmp_path / "run")
    torch.save({"weight": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="holds no Lightning state_dict"):
        run(resume_config(foreign), run_dir=tmp_path / "run")


# ---------------------------------------------------------------------------------------------
# 6. Model loading
# ---------------------------------------------------------------------------------------------


def test_model_folder_with_safetensors_loads(tmp_path: Path) -> None:
    model, tokenizer = build_tiny_model(seed=3)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded, _ = load_model_and_tokenizer(source="pretrained", name_or_path=str(tmp_path))
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_pickle_weights_are_refused_unless_allowed(tmp_path: Path) -> None:
    model, tokenizer = build_tiny_model(seed=3)
    model.config.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError) as error:
        load_model_and_tokenizer(source="pretrained", name_or_path=str(tmp_path))
    message = str(error.value)
    assert "no safetensors weights, only pickle files (pytorch_model.bin)" in message
    assert "model.allow_pickle_weights=true" in message
    loaded, _ = load_model_and_tokenizer(source="pretrained", name_or_path=str(tmp_path), allow_pickle_weights=True)
    assert torch.equal(loaded.state_dict()["lm_head.weight"], model.state_dict()["lm_head.weight"])


def test_remote_code_and_pickles_are_off_by_default(tmp_path: Path, monkeypatch) -> None:
    for path in sorted((REPO / "rlvr_lightning" / "conf" / "model").glob("*.yaml")):
        cfg = compose_config(TINY_OVERRIDES + [f"model={path.stem}"])
        assert cfg.model.trust_remote_code is False and cfg.model.allow_pickle_weights is False, path.name
    model, tokenizer = build_tiny_model()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    seen: list[dict] = []
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    load_model_and_tokenizer(source="pretrained", name_or_path=str(tmp_path))
    assert seen[0]["trust_remote_code"] is False and seen[0]["use_safetensors"] is True
