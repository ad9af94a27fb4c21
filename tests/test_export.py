"""Exporting a trained policy as a Hugging Face folder (``python -m rlvr_lightning.export``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlvr_lightning.checkpoints import CheckpointError
from rlvr_lightning.export import export_policy
from rlvr_lightning.models import apply_lora, build_tiny_model, load_model_and_tokenizer
from rlvr_lightning.train import run

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["<|im_start|>user\nWhat is 1 + 2?", "<|im_start|>user\n7 + 5 = ?"]


def _policy_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    return {k.removeprefix("policy."): v for k, v in state.items() if k.startswith("policy.")}


def _logits(model: torch.nn.Module, tokenizer) -> torch.Tensor:
    encoded = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**encoded).logits


def test_exported_folder_loads_as_the_trained_policy(tiny_config, tmp_path: Path) -> None:
    run(tiny_config("reward.random_reward_probability=0.5", "optim.lr=1e-3"), run_dir=tmp_path / "run")
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    cmd = [sys.executable, "-m", "rlvr_lightning.export", str(checkpoint), str(tmp_path / "exported")]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "model=hf model.name_or_path=" in result.stdout
    assert (tmp_path / "exported" / "model.safetensors").is_file()

    exported, tokenizer = load_model_and_tokenizer(source="pretrained", name_or_path=str(tmp_path / "exported"))
    trained, _ = build_tiny_model(seed=0)
    initial = _logits(trained, tokenizer)
    trained.load_state_dict(_policy_weights(checkpoint))
    assert torch.equal(_logits(exported, tokenizer), _logits(trained, tokenizer))
    assert not torch.allclose(initial, _logits(trained, tokenizer))  # training changed the policy


def test_lora_adapters_are_merged_into_the_exported_weights(tiny_config, tmp_path: Path) -> None:
    pytest.importorskip("peft")
    run(tiny_config("trainer.max_steps=1", "validate_before_training=false", "model.lora.r=4",
                    "optim.lr=1e-2", "objective.control.entropy_coef=0.1"), run_dir=tmp_path / "run")
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    export_policy(checkpoint, tmp_path / "exported")
    exported, tokenizer = load_model_and_tokenizer(source="pretrained", name_or_path=str(tmp_path / "exported"))
    assert not any("lora" in name for name in exported.state_dict())
    base, _ = build_tiny_model(seed=0)
    adapted = apply_lora(base, r=4, alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    adapted.load_state_dict(_policy_weights(checkpoint))
    assert torch.allclose(_logits(exported, tokenizer), _logits(adapted, tokenizer), atol=1e-5)


def test_export_refuses_an_existing_folder_and_a_foreign_file(tiny_config, tmp_path: Path) -> None:
    run(tiny_config("trainer.max_steps=1", "validate_before_training=false"), run_dir=tmp_path / "run")
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists; export into a new folder"):
        export_policy(checkpoint, existing)
    assert (existing / "keep.txt").read_text() == "mine"
    bare = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(2)}, bare)
    with pytest.raises(CheckpointError, match="holds no Lightning state_dict"):
        export_policy(bare, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
