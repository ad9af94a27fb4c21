"""tools/bench.py end to end on the tiny model (TRL only when the `bench` extra is installed)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from rlvr_lightning.models import build_tiny_model
from tools import bench

FRAMEWORKS = ["ours", "trl"] if importlib.util.find_spec("trl") else ["ours"]


@pytest.mark.slow
def test_bench_runs_every_framework_on_the_same_forced_length_work(tmp_path: Path) -> None:
    model, tokenizer = build_tiny_model(seed=0)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    out = tmp_path / "bench.json"
    results = bench.main([
        "--model", str(tmp_path / "model"), "--prompts", "2", "--group-size", "2",
        "--completion-tokens", "5", "--steps", "1", "--warmup", "1", "--threads", "1",
        "--frameworks", *FRAMEWORKS, "--out", str(out),
        # ours on transformers' generate with a static KV cache: forced lengths must hold there too
        "--override", "rollout/engine=hf", "--override", "rollout.engine.cache=static",
        "--random-weights",  # both frameworks get the same seeded random weights of that shape
    ])
    assert sorted(results) == sorted(FRAMEWORKS) and out.is_file()
    assert "model model shape, seeded random weights" in json.loads(out.read_text())["setup"]
    for result in results.values():
        assert result["completion_tokens_per_step"] == 2 * 2 * 5
        assert result["step_seconds"] > 0 and result["peak_memory_gib"] > 0
        assert result["mean_completion_length"] and set(result["mean_completion_length"]) == {5.0}
    assert set(results["ours"]["stage_seconds"]) >= {"generate", "update", "step"}
    assert results["ours"]["overrides"] == ["rollout/engine=hf", "rollout.engine.cache=static"]


def test_a_failing_framework_is_reported_and_the_others_kept(tmp_path: Path) -> None:
    model, tokenizer = build_tiny_model(seed=0)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    out = tmp_path / "bench.json"
    with pytest.raises(SystemExit, match="failed: ours"):
        bench.main([
            "--model", str(tmp_path / "model"), "--prompts", "2", "--group-size", "2", "--completion-tokens", "3",
            "--steps", "1", "--warmup", "1", "--threads", "1", "--frameworks", "ours", "--out", str(out),
            "--override", "rollout/engine=nope",
        ])
    written = json.loads(out.read_text())
    assert written["results"] == {} and "Could not find 'rollout/engine/nope'" in written["failures"]["ours"]
