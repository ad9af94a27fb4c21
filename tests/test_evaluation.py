"""Sampling metrics (avg@k, pass@k, maj@k) and the evaluation entry point on the tiny model."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from rlvr_lightning import rewards
from rlvr_lightning.evaluate import CONFIG_DIR, evaluate, sampling_settings
from rlvr_lightning.evaluation import (
    avg_at_k,
    default_k_values,
    majority_vote,
    pass_at_k,
    summarize,
)

REPO = Path(__file__).resolve().parents[1]


# --- pass@k, avg@k, maj@k ------------------------------------------------------------------


def closed_form_pass_at_k(n: int, c: int, k: int) -> float:
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8, 10, 16, 33, 64])
def test_pass_at_k_matches_the_closed_form(n: int) -> None:
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(closed_form_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_edge_cases() -> None:
    assert pass_at_k(10, 0, 1) == 0.0 and pass_at_k(10, 0, 10) == 0.0  # c = 0
    assert pass_at_k(10, 10, 1) == 1.0 and pass_at_k(10, 10, 10) == 1.0  # c = n
    assert pass_at_k(10, 8, 3) == 1.0  # n - c < k: every draw holds a correct sample
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 = c / n
    assert pass_at_k(1, 1, 1) == 1.0 and pass_at_k(1, 0, 1) == 0.0
    # Large n, where C(n, k) overflows a float, stays finite and exact enough.
    assert pass_at_k(2000, 1, 1000) == pytest.approx(0.5)
    assert pass_at_k(5000, 7, 2500) == pytest.approx(closed_form_pass_at_k(5000, 7, 2500))
    for bad in [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_avg_at_k() -> None:
    assert avg_at_k([True, False, True, True]) == 0.75
    assert avg_at_k([0.5, 1.0]) == 0.75
    with pytest.raises(ValueError):
        avg_at_k([])


def test_majority_vote_ties_none_and_correctness() -> None:
    # The most frequent answer wins, whichever sample came first.
    assert majority_vote(["3", "4", "4"], [True, False, False]) == ("4", False)
    # Ties go to the answer seen first.
    assert majority_vote(["4", "3", "3", "4"], [False, True, True, False]) == ("4", False)
    assert majority_vote(["3", "4", "4", "3"], [True, False, False, True]) == ("3", True)
    # None does not vote, even when it is the most frequent.
    assert majority_vote([None, None, "5"], [False, False, True]) == ("5", True)
    assert majority_vote([None, None], [False, False]) == (None, False)
    # Answers are compared stripped; one timed-out check of the majority answer does not flip it.
    assert majority_vote([" 7", "7 ", "2"], [True, False, False]) == ("7", True)
    with pytest.raises(ValueError):
        majority_vote(["1"], [True, False])


def test_default_k_values() -> None:
    assert default_k_values(1) == [1]
    assert default_k_values(4) == [1, 2, 4]
    assert default_k_values(6) == [1, 2, 4, 6]


def test_summarize_aggregates_per_problem_samples() -> None:
    def samples(problem: int, answers: list[str | None], correct: list[bool]) -> list[dict]:
        return [
            {"problem_index": problem, "sample_index": i, "extracted": a, "correct": c}
            for i, (a, c) in enumerate(zip(answers, correct, strict=True))
        ]

    records = (
        samples(0, ["1", "1", "2", "1"], [True, True, False, True])  # 3 of 4 correct
        + samples(1, ["5", "6", "6", None], [True, False, False, False])  # 1 of 4, wrong majority
        + samples(2, [None, "9", None, "8"], [False, False, False, False])  # none
    )
    metrics = summarize(reversed(records))  # record order does not matter
    assert metrics["avg@4"] == pytest.approx((0.75 + 0.25 + 0) / 3)
    assert metrics["pass@1"] == pytest.approx(metrics["avg@4"])
    expected_pass2 = (pass_at_k(4, 3, 2) + pass_at_k(4, 1, 2) + 0) / 3
    assert metrics["pass@2"] == pytest.approx(expected_pass2)
    assert metrics["pass@4"] == pytest.approx(2 / 3)
    assert metrics["maj@4"] == pytest.approx(1 / 3)
    # maj@2 votes over the first two samples: "1","1" correct; "5","6" tie -> "5" correct.
    assert metrics["maj@2"] == pytest.approx(2 / 3)
    assert metrics["num_problems"] == 3 and metrics["n_samples"] == 4
    assert "maj@1" not in metrics
    assert set(summarize(records, [1, 3])) >= {"avg@4", "pass@1", "pass@3", "maj@3"}
    with pytest.raises(ValueError, match="sample counts"):
        summarize(records[:-1])
    with pytest.raises(ValueError, match="k values"):
        summarize(records, [5])


def test_sampling_settings() -> None:
    assert sampling_settings(1, None) == (True, 0.6)
    assert sampling_settings(4, None) == (False, 0.6)
    assert sampling_settings(1, 0.8) == (False, 0.8)
    assert sampling_settings(4, 0.0)[0] is True
    with pytest.raises(ValueError):
        sampling_settings(0, None)


# --- the entry point on the tiny model -----------------------------------------------------

PROBLEMS = [
    {"question": "What is 2 + 2?", "answer": "#### 4"},
    {"question": "What is 3 + 5?", "answer": "#### 8"},
    {"question": "What is 7 - 2?", "answer": "#### 5"},
]


def tiny_overrides(tmp_path: Path) -> list[str]:
    data = tmp_path / "problems.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in PROBLEMS))
    return [
        "model=tiny", "data=gsm8k", f"data.path={data}", "n_samples=2", "max_new_tokens=8",
        "batch_size=2", f"output_dir={tmp_path / 'eval'}", "progress_bar=false",
    ]


def compose_evaluate(overrides: list[str]):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="evaluate", overrides=overrides)


def read_generations(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_evaluate_writes_generations_and_metrics(tmp_path: Path) -> None:
    metrics = evaluate(compose_evaluate(tiny_overrides(tmp_path)))
    out = tmp_path / "eval"
    generations = read_generations(out / "generations.jsonl")
    assert len(generations) == len(PROBLEMS) * 2
    assert [(g["problem_index"], g["sample_index"]) for g in generations] == [
        (p, s) for p in range(3) for s in range(2)
    ]
    assert [g["answer"] for g in generations[::2]] == ["4", "8", "5"]
    assert set(generations[0]) >= {"problem_index", "question", "answer", "sample_index",
                                   "completion", "extracted", "correct", "reward"}
    written = json.loads((out / "metrics.json").read_text())
    assert set(written) >= {"avg@2", "pass@1", "pass@2", "maj@2", "num_problems", "reward_mean",
                            "verifier_failures", "verifier_timeouts"}
    assert written["num_problems"] == 3 and written == pytest.approx(metrics)
    assert (out / "config.yaml").is_file()


def test_a_raising_verifier_scores_zero_and_the_evaluation_goes_on(tmp_path, monkeypatch) -> None:
    def broken(*args):
        raise RuntimeError("verifier crashed")

    monkeypatch.setitem(rewards.verification._CHECKS, "numeric", broken)
    metrics = evaluate(compose_evaluate(tiny_overrides(tmp_path)))
    generations = read_generations(tmp_path / "eval" / "generations.jsonl")
    assert len(generations) == 6 and not any(g["correct"] for g in generations)
    assert metrics["verifier_failures"] == 6 and metrics["pass@2"] == 0.0


def test_cli_runs_and_writes_results(tmp_path: Path) -> None:
    overrides = tiny_overrides(tmp_path)
    cmd = [sys.executable, "-m", "rlvr_lightning.evaluate", *overrides, "n_samples=1"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "pass@1" in result.stdout
    assert f"evaluation written to {(tmp_path / 'eval').resolve()}" in result.stdout
    assert len(read_generations(tmp_path / "eval" / "generations.jsonl")) == 3
    assert "avg@1" in json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert (tmp_path / "eval" / ".hydra" / "config.yaml").is_file()  # output_dir is Hydra's run dir


def test_evaluation_on_the_static_engine_matches_the_default_engine_when_greedy(tmp_path: Path) -> None:
    """The evaluation config's engine settings reach generation: greedy completions of the
    static engine (CUDA graphs off the GPU: eager) are the shared-prefix engine's."""
    results = []
    for engine in ("shared_prefix", "static"):
        (tmp_path / engine).mkdir()
        overrides = tiny_overrides(tmp_path / engine) + ["temperature=0", "n_samples=1", f"rollout/engine={engine}"]
        evaluate(compose_evaluate(overrides))
        results.append([g["completion"] for g in read_generations(tmp_path / engine / "eval" / "generations.jsonl")])
    assert results[0] == results[1] and len(results[0]) == len(PROBLEMS)
