"""Speed options that must not change the result: pi_old from the update pass, fused AdamW."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rlvr_lightning.train import run
from tests.conftest import read_scalars

# One update per rollout; random rewards so that advantages (and the update) are not all zero.
ONE_UPDATE = ("trainer.max_steps=2", "validate_before_training=false", "rollout.mini_batches=1",
              "reward.random_reward_probability=0.5", "optim.lr=1e-3")


def _train(tiny_config, run_dir: Path, *extra: str) -> tuple[dict, dict]:
    run(tiny_config(*ONE_UPDATE, *extra), run_dir=run_dir)
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    return state["state_dict"], read_scalars(run_dir)


@pytest.mark.parametrize("option", ["rollout.old_logprobs_from_update=false", "optim.fused=false"])
def test_speed_options_leave_training_unchanged(tiny_config, tmp_path: Path, option: str) -> None:
    fast_weights, fast = _train(tiny_config, tmp_path / "fast")
    slow_weights, slow = _train(tiny_config, tmp_path / "slow", option)
    if option.startswith("rollout."):
        assert "time/old_logprobs_seconds" in slow and "time/old_logprobs_seconds" not in fast
    for tag in ("entropy/rollout", "entropy/region_pa_hp_fraction", "objective/policy_loss", "optim/grad_norm"):
        assert [v for _, v in fast[tag]] == pytest.approx([v for _, v in slow[tag]], rel=1e-4, abs=1e-5), tag
    for key, value in slow_weights.items():
        assert torch.allclose(fast_weights[key], value, atol=1e-5), key
