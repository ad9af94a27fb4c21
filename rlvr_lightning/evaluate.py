"""Evaluation entry point: ``python -m rlvr_lightning.evaluate model=... data=... n_samples=k``.

Samples ``n_samples`` completions for every problem of the data set, scores them with the
configured reward and reports avg@n, unbiased pass@k and maj@k (see ``evaluation``). Writes
``generations.jsonl`` (one line per completion, written as it goes), ``metrics.json`` and the
resolved ``config.yaml`` to the output folder.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import InterpolationResolutionError
from tqdm.auto import tqdm

from rlvr_lightning.data.prompts import DEFAULT_INSTRUCTION, build_prompt
from rlvr_lightning.evaluation import default_k_values, summarize
from rlvr_lightning.models import load_model_and_tokenizer
from rlvr_lightning.rewards import RewardFunction
from rlvr_lightning.rollout import RolloutEngine, SamplingParams, build_engine

CONFIG_DIR = str(Path(__file__).resolve().parent / "conf")
# Sampling temperature when n_samples > 1 and none is given (a common choice for math evals).
DEFAULT_SAMPLING_TEMPERATURE = 0.6


def sampling_settings(n_samples: int, temperature: float | None) -> tuple[bool, float]:
    """``(greedy, temperature)``: greedy for one sample unless a temperature is given, and for
    temperature 0; otherwise sampling at ``temperature`` (default 0.6)."""
    if n_samples < 1:
        raise ValueError(f"n_samples={n_samples} must be >= 1")
    if temperature is None:
        return n_samples == 1, DEFAULT_SAMPLING_TEMPERATURE
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0: greedy)")
    if temperature == 0:
        return True, 1.0
    return False, float(temperature)


def load_eval_rows(data: DictConfig) -> list[dict[str, Any]]:
    """Every row to evaluate: for a file data set (``data.val_size`` exists) all usable rows of
    ``data.path`` after ``data.limit``, nothing held out; otherwise (``data=arithmetic``) the
    data module's held-out validation split."""
    if "val_size" in data:
        datamodule = instantiate(data, val_size=0, val_path=None)
        return datamodule.load_rows()[0]
    return instantiate(data).load_rows()[1]


def generate_and_score(
    engine: RolloutEngine,
    rows: Sequence[dict[str, Any]],
    reward_fn: RewardFunction,
    n_samples: int,
    sampling: SamplingParams,
    instruction: str = DEFAULT_INSTRUCTION,
    system_prompt: str | None = None,
    first_problem_index: int = 0,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Sample and score ``n_samples`` completions for each row (one generate call).

    Returns one record per completion (``problem_index`` counts from ``first_problem_index``)
    and the verifier's ``{"verifier_failures", "verifier_timeouts"}`` counts for the batch.
    """
    prompts = [build_prompt(engine.tokenizer, row["question"], instruction, system_prompt) for row in rows]
    rollout = engine.generate(prompts, n_samples, sampling)
    answers = [str(row["answer"]) for row in rows for _ in range(n_samples)]
    result = reward_fn(rollout.completions, answers)
    records = []
    for position, completion in enumerate(rollout.completions):
        row = rows[position // n_samples]
        records.append({
            "problem_index": first_problem_index + position // n_samples,
            "source_index": row.get("index"),
            "sample_index": position % n_samples,
            "question": row["question"],
            "answer": str(row["answer"]),
            "completion": completion,
            "extracted": result.extracted[position],
            "correct": bool(result.correct[position]),
            "reward": float(result.rewards[position]),
            "response_tokens": int(rollout.response_lengths[position]),
            "truncated": bool(rollout.truncated[position]),
        })
    counts = {"verifier_failures": result.num_failures, "verifier_timeouts": result.num_timeouts}
    return records, counts


def output_dir_of(cfg: DictConfig) -> Path:
    """The Hydra run folder (``output_dir``, or the sweep's job folder in a multirun); outside a
    Hydra app ``output_dir``, or ``outputs/eval/<time>`` where it needs Hydra to resolve."""
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    try:
        output_dir = cfg.get("output_dir")
    except InterpolationResolutionError:  # ${hydra:...} in a config composed without Hydra's app
        output_dir = None
    return Path(output_dir or Path("outputs/eval") / time.strftime("%Y-%m-%d_%H-%M-%S"))


# Metrics that count things, printed as integers.
COUNT_METRICS = ("num_problems", "n_samples", "verifier_failures", "verifier_timeouts")


def format_metrics(metrics: dict[str, float]) -> str:
    """A two-column table of the metrics, one per line."""
    width = max(len(name) for name in metrics)
    lines = []
    for name, value in metrics.items():
        shown = f"{int(value)}" if name in COUNT_METRICS else f"{value:.4f}"
        lines.append(f"{name:<{width}}  {shown}")
    return "\n".join(lines)


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Evaluate as configured (see ``conf/evaluate.yaml``); returns the metrics it writes."""
    start = time.perf_counter()
    if cfg.get("num_threads"):
        # OpenMP threads spin-wait on each other; on a busy CPU fewer threads run much faster.
        torch.set_num_threads(int(cfg.num_threads))
    n_samples = int(cfg.n_samples)
    greedy, temperature = sampling_settings(n_samples, cfg.temperature)
    batch_size = int(cfg.batch_size)
    if batch_size < 1 or int(cfg.max_new_tokens) < 1:
        raise ValueError(
            f"batch_size={batch_size} and max_new_tokens={cfg.max_new_tokens} must be >= 1"
        )
    k_values = list(cfg.k_values) if cfg.get("k_values") else default_k_values(n_samples)
    output_dir = output_dir_of(cfg)
    output_dir.mkdir(parents=True, exist_ok=True)
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.output_dir = str(output_dir)
    (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))

    rows = load_eval_rows(cfg.data)
    model_cfg: dict[str, Any] = OmegaConf.to_container(cfg.model, resolve=True)  # type: ignore[assignment]
    model_cfg.pop("gradient_checkpointing", None)  # a training option; nothing to recompute here
    model, tokenizer = load_model_and_tokenizer(**model_cfg, seed=int(cfg.seed))
    model.eval()
    prompt_cfg = {"instruction": DEFAULT_INSTRUCTION, "system_prompt": None,
                  **OmegaConf.to_container(cfg.prompt, resolve=True)}  # type: ignore[dict-item]
    reward_cfg: dict[str, Any] = OmegaConf.to_container(cfg.reward, resolve=True)  # type: ignore[assignment]

    records: list[dict[str, Any]] = []
    counts = {"verifier_failures": 0, "verifier_timeouts": 0}
    progress = tqdm(total=len(rows), unit="problem", desc="evaluate",
                    disable=not cfg.get("progress_bar", True))
    sampling = SamplingParams(
        max_new_tokens=int(cfg.max_new_tokens), temperature=temperature, top_p=float(cfg.top_p), greedy=greedy,
        max_prompt_tokens=cfg.max_prompt_tokens,
    )
    engine_options: dict[str, Any] = OmegaConf.to_container(cfg.rollout.engine, resolve=True)  # type: ignore[assignment]
    with RewardFunction(**reward_cfg) as reward_fn, build_engine(engine_options, model, tokenizer) as engine, \
            (output_dir / "generations.jsonl").open("w", encoding="utf-8") as generations:
        for batch_number, first in enumerate(range(0, len(rows), batch_size)):
            # Seeded per batch: a batch's samples do not depend on how long earlier ones ran.
            torch.manual_seed(int(cfg.seed) * 1_000_003 + batch_number)
            batch_records, batch_counts = generate_and_score(
                engine, rows[first:first + batch_size], reward_fn, n_samples, sampling,
                first_problem_index=first, **prompt_cfg,
            )
            for record in batch_records:
                generations.write(json.dumps(record, ensure_ascii=False) + "\n")
            generations.flush()
            records.extend(batch_records)
            for key, value in batch_counts.items():
                counts[key] += value
            progress.update(len(rows[first:first + batch_size]))
            accuracy = sum(record["correct"] for record in records) / len(records)
            progress.set_postfix(accuracy=f"{accuracy:.3f}")
    progress.close()

    metrics = summarize(records, k_values)
    metrics["reward_mean"] = sum(r["reward"] for r in records) / len(records)
    metrics["response_tokens_mean"] = sum(r["response_tokens"] for r in records) / len(records)
    metrics["truncated_fraction"] = sum(r["truncated"] for r in records) / len(records)
    metrics.update({key: float(value) for key, value in counts.items()})
    metrics["wall_seconds"] = time.perf_counter() - start
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(format_metrics(metrics))
    print(f"[rlvr_lightning] evaluation written to {output_dir.resolve()}")
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> float:
    metrics = evaluate(cfg)
    return metrics["pass@1"]


if __name__ == "__main__":
    main()
