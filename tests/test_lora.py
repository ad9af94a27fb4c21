"""LoRA through peft (optional extra): only the adapters train."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rlvr_lightning.models import apply_lora, build_tiny_model
from rlvr_lightning.train import run

pytest.importorskip("peft")


def test_lora_freezes_the_base_and_starts_as_the_base_model() -> None:
    base, tokenizer = build_tiny_model(seed=0)
    ids = tokenizer(["What is 1 + 2?"], return_tensors="pt")["input_ids"]
    before = base(input_ids=ids).logits
    model = apply_lora(base, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    assert any("q_proj.lora_A" in name for name in trainable) and not any("k_proj" in n for n in trainable)
    # LoRA's B starts at zero: the adapted model computes what the base model did.
    assert torch.allclose(model(input_ids=ids).logits, before)


def test_training_with_lora_changes_only_the_adapters(tiny_config, tmp_path: Path) -> None:
    # The entropy bonus gives a gradient even when every reward (so every advantage) is zero.
    run(tiny_config("trainer.max_steps=1", "validate_before_training=false", "model.lora.r=4",
                    "optim.lr=1e-2", "objective.control.entropy_coef=0.1"), run_dir=tmp_path)
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    base, _ = build_tiny_model(seed=0)
    reference = {f"policy.{k}": v for k, v in base.state_dict().items()}
    adapters = [k for k in state if "lora_B" in k]
    assert adapters and any(state[k].abs().sum() > 0 for k in adapters)  # B moved away from zero
    for key, value in reference.items():
        adapted = key.replace(".q_proj.weight", ".q_proj.base_layer.weight").replace(
            ".k_proj.weight", ".k_proj.base_layer.weight").replace(
            ".v_proj.weight", ".v_proj.base_layer.weight").replace(".o_proj.weight", ".o_proj.base_layer.weight")
        assert torch.equal(state[adapted], value), key
