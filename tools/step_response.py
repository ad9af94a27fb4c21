r"""Measure how an entropy actuator moves the rollout entropy, and suggest target_entropy gains.

    python tools/step_response.py --field entropy_coef --values 0 0.05 -0.05 --steps 10
    python tools/step_response.py --field entropy_coef --values 0 0.05 -0.05 --steps 10 \
        --extra model=hf model.name_or_path=Qwen/Qwen2.5-0.5B-Instruct data=gsm8k
    python tools/step_response.py --model tiny --steps 4 --values 0 0.1   # smoke run

Each value trains once from the same start, holding ``objective.control.<field>`` at that value
for the whole run (``scheduler=constant``; the first value is the baseline), with the same seed
and the overrides ``--extra`` (they win). The rollout entropy of a run is fitted with a straight
line; the difference between a run's slope and the baseline's, divided by the difference in the
field's value, is the actuator's gain ``b``: nats of entropy per step per unit of the field.
Entropy integrates the actuator (a bonus changes how fast entropy moves, not its level), so a
controller that moves the field by ``k`` per nat of error removes ``k * |b|`` of the error each
step. The tool suggests ``kp = fraction / |b|`` (``--fraction``, default 0.5: half the error
per step; above 1 the loop overshoots, above 2 it diverges) with the strongest gain measured,
and ``ki = kp * fraction / 4``. The balance point, the value at which entropy holds level (where
the slope crosses 0 between two measured values, interpolated linearly), is the feed-forward:
``scheduler.coef_feedforward`` (relative to the baseline, which should be the objective's own
coefficient) for the entropy coefficient, the objective's starting value for the other fields.
It also reports the baseline's step-to-step noise around a parabola, the floor under any
controller's worst tracking error (about 2.5 standard deviations over a 40-step run): more
completions per step lower it.

Writes ``step_response.json`` (slopes, gains, noise, the suggested overrides),
``step_response.png`` (entropy against the step, one line per value, with its fit) and
``summary.md`` into the output folder (default ``outputs/step_response/<time>_<field>``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make `tools` and `rlvr_lightning` importable
    sys.path.insert(0, str(REPO))

from tools.compare_schedules import compose  # noqa: E402
from tools.plot_run import read_scalars  # noqa: E402

ENTROPY_TAG = "entropy/rollout"
# Fields a step can be applied to, and how target_entropy drives each (its actuator and scales):
# the controller moves the field by  direction * scale * u  where u = kp*e + ki*sum(e).
FIELDS = {
    "entropy_coef": ("entropy_coef", "coef_scale", 1.0, []),
    "entropy_quantile": ("entropy_quantile", "quantile_scale", -1.0, []),
    "eps_high": ("clip", "high_scale", 1.0, ["scheduler.low_scale=0"]),
    "eps_low": ("clip", "low_scale", -1.0, ["scheduler.high_scale=0"]),
    "beta2": ("beta", "high_scale", 1.0, ["scheduler.low_scale=0"]),
    "beta1": ("beta", "low_scale", -1.0, ["scheduler.high_scale=0"]),
}
NOISE_FLOOR_SIGMAS = 2.5  # the largest of ~40 normal draws is about 2.5 standard deviations


def _steps_and_values(points: Sequence[tuple[int, float]]) -> tuple[np.ndarray, np.ndarray]:
    return np.array([float(step) for step, _ in points]), np.array([float(value) for _, value in points])


def fit_line(points: Sequence[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares ``(slope, intercept)`` of ``value`` against ``step``."""
    if len(points) < 2:
        raise ValueError(f"a slope needs at least 2 steps of {ENTROPY_TAG} (got {len(points)}); raise --steps")
    slope, intercept = np.polyfit(*_steps_and_values(points), 1)
    return float(slope), float(intercept)


def residual_std(points: Sequence[tuple[int, float]]) -> float:
    """Standard deviation of the values around a fitted parabola (n - 3 degrees of freedom): a
    learning run's entropy curves (it falls fast, then slower), and the residuals around a
    straight line would count that curvature as noise."""
    if len(points) < 4:
        raise ValueError(f"the noise needs at least 4 steps of {ENTROPY_TAG} (got {len(points)}); raise --steps")
    steps, values = _steps_and_values(points)
    residuals = values - np.polyval(np.polyfit(steps, values, 2), steps)
    return float(math.sqrt(float((residuals**2).sum()) / (len(points) - 3)))


def balance_point(slopes: dict[float, float]) -> float | None:
    """The value at which the entropy slope crosses 0, interpolated linearly between the two
    neighbouring measured values whose slopes differ in sign (the lowest such crossing); None
    when every slope has the same sign."""
    ordered = sorted(slopes.items())
    for (low, low_slope), (high, high_slope) in pairwise(ordered):
        if low_slope == 0.0:
            return low
        if low_slope * high_slope < 0.0:
            return low + (high - low) * low_slope / (low_slope - high_slope)
    return ordered[-1][0] if ordered[-1][1] == 0.0 else None


def analyse(field: str, series: dict[float, list[tuple[int, float]]], fraction: float = 0.5) -> dict:
    """Slopes, gains, noise and suggested gains from the entropy series of each value
    (the first key is the baseline)."""
    if field not in FIELDS:
        raise ValueError(f"field must be one of {', '.join(FIELDS)} (got {field!r})")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must lie in (0, 1] (got {fraction})")
    values = list(series)
    if len(values) < 2:
        raise ValueError(f"a step response needs a baseline and at least one other value (got {values})")
    baseline = values[0]
    slopes = {value: fit_line(points)[0] for value, points in series.items()}
    gains = {
        value: (slopes[value] - slopes[baseline]) / (value - baseline) for value in values[1:]
    }
    balance = balance_point(slopes)
    noise = residual_std(series[baseline])
    level = sum(v for _, v in series[baseline]) / len(series[baseline])
    actuator, scale_key, direction, extra = FIELDS[field]
    strongest = max(abs(gain) for gain in gains.values())
    result = {
        "field": field,
        "baseline": baseline,
        "slopes": {str(value): slope for value, slope in slopes.items()},
        "gains": {str(value): gain for value, gain in gains.items()},
        "noise_std": noise,
        "noise_relative": noise / level if level else math.inf,
        "noise_floor_worst_tracking_error": NOISE_FLOOR_SIGMAS * noise / level if level else math.inf,
        "fraction": fraction,
        "balance": balance,
    }
    # The gain must move entropy the way target_entropy assumes, or the loop would run away.
    wrong_way = {str(v): g for v, g in gains.items() if direction * g <= 0.0}
    if strongest == 0.0 or len(wrong_way) == len(gains):
        result["suggestion"] = None
        result["why_no_suggestion"] = (
            f"entropy did not move the way target_entropy assumes for {field} (gains {result['gains']}; "
            f"expected {'positive' if direction > 0 else 'negative'}): try larger steps, more steps, "
            "or several updates per rollout for clip and beta fields"
        )
        return result
    kp = fraction / strongest
    ki = kp * fraction / 4.0
    result["suggestion"] = {
        "kp": kp,
        "ki": ki,
        "overrides": [
            "scheduler=target_entropy",
            f"scheduler.actuator={actuator}",
            f"scheduler.{scale_key}=1.0",
            *extra,
            f"scheduler.kp={kp:.4g}",
            f"scheduler.ki={ki:.4g}",
        ],
    }
    overrides = result["suggestion"]["overrides"]
    if field == "entropy_coef":
        # Without a measured balance point, no feed-forward.
        overrides.append(f"scheduler.coef_feedforward={0.0 if balance is None else balance - baseline:.4g}")
    elif balance is not None:
        overrides.append(f"objective.control.{field}={balance:.4g}")
    if balance is None:
        result["warning_balance"] = (
            "no measured value held entropy level (every slope has the same sign): add a value beyond "
            "the measured ones to find the feed-forward"
        )
    if wrong_way:
        result["warning"] = f"values {sorted(wrong_way)} moved entropy the other way (gains {wrong_way})"
    return result


def run_overrides(field: str, value: float, steps: int, seed: int, model: str | None,
                  extra: Sequence[str]) -> list[str]:
    """The overrides of one run: the field held at ``value`` (``extra`` last, so it wins)."""
    return [
        *([f"model={model}"] if model else []),
        "scheduler=constant",
        f"objective.control.{field}={value}",
        f"trainer.max_steps={steps}",
        f"seed={seed}",
        "validate_before_training=false",
        "trainer.val_check_interval=1000000",
        *extra,
    ]


def plot(series: dict[float, list[tuple[int, float]]], field: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(7, 4))
    for value, points in series.items():
        slope, intercept = fit_line(points)
        steps = [s for s, _ in points]
        line = ax.plot(steps, [v for _, v in points], marker="o", label=f"{field}={value:g}")[0]
        ax.plot(steps, [slope * s + intercept for s in steps], linestyle="--", color=line.get_color())
    ax.set_xlabel("step")
    ax.set_ylabel(f"{ENTROPY_TAG} (nats)")
    ax.set_title(f"Step response of the rollout entropy to {field} (dashed: fitted lines)")
    ax.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]),
    )
    parser.add_argument("--field", default="entropy_coef", choices=sorted(FIELDS),
                        help="objective.control field to step (default entropy_coef)")
    parser.add_argument("--values", nargs="+", type=float, default=[0.0, 0.05, -0.05],
                        help="values of the field, the baseline first (default 0 0.05 -0.05)")
    parser.add_argument("--steps", type=int, default=10, help="training steps per value (default 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fraction", type=float, default=0.5,
                        help="share of the error the suggested gains remove per step (default 0.5)")
    parser.add_argument("--model", default=None, help="model config (default: the project's default)")
    parser.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every run (they win)")
    parser.add_argument("--out-dir", type=Path, default=None, help="output folder")
    args = parser.parse_args(argv)
    if len(set(args.values)) != len(args.values) or len(args.values) < 2:
        parser.error(f"--values needs a baseline and at least one other, distinct value (got {args.values})")
    if args.steps < 4:
        parser.error(f"--steps must be >= 4 to fit a line and the noise around a curve (got {args.steps})")
    if not 0.0 < args.fraction <= 1.0:
        parser.error(f"--fraction must lie in (0, 1] (got {args.fraction})")

    from rlvr_lightning.train import run

    # Compose every config first, so a typo fails before any training.
    configs = {
        value: compose(run_overrides(args.field, value, args.steps, args.seed, args.model, args.extra))
        for value in args.values
    }
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    out_dir = args.out_dir or REPO / "outputs" / "step_response" / f"{stamp}_{args.field}"
    out_dir.mkdir(parents=True, exist_ok=True)
    series: dict[float, list[tuple[int, float]]] = {}
    seconds: dict[float, float] = {}
    for index, (value, cfg) in enumerate(configs.items(), start=1):
        print(f"[step_response] {index}/{len(configs)}: {args.field}={value:g}", flush=True)
        start = time.perf_counter()
        run_dir = out_dir / f"{args.field}_{value:g}"
        run(cfg, run_dir=run_dir)
        seconds[value] = time.perf_counter() - start
        series[value] = read_scalars(run_dir)[ENTROPY_TAG]

    result = analyse(args.field, series, args.fraction)
    result["steps"] = args.steps
    result["seed"] = args.seed
    result["overrides"] = [*([f"model={args.model}"] if args.model else []), *args.extra]
    result["series"] = {str(value): points for value, points in series.items()}
    result["seconds"] = {str(value): s for value, s in seconds.items()}
    (out_dir / "step_response.json").write_text(json.dumps(result, indent=2))
    plot(series, args.field, out_dir / "step_response.png")
    lines = [
        f"# Step response of the rollout entropy to {args.field}",
        "",
        f"Command: `python tools/step_response.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        "",
        "| value | slope (nats/step) | gain b vs baseline (nats/step per unit) | wall s |",
        "|---|---|---|---|",
        *(
            f"| {value:g} | {result['slopes'][str(value)]:+.4f} | "
            f"{'baseline' if value == args.values[0] else format(result['gains'][str(value)], '+.3f')} | "
            f"{seconds[value]:.0f} |"
            for value in args.values
        ),
        "",
        f"Baseline noise around its line: {result['noise_std']:.3f} nats "
        f"({100 * result['noise_relative']:.1f}% of its mean); worst tracking error a controller "
        f"can expect from sampling alone over ~40 steps: about "
        f"{100 * result['noise_floor_worst_tracking_error']:.0f}%.",
        "",
    ]
    if result["balance"] is not None:
        lines.append(f"Balance point (entropy holds level): {args.field} = {result['balance']:.4g}.")
    else:
        lines.append("Balance point: none measured (every slope has the same sign).")
    lines.append("")
    if result["suggestion"]:
        lines.append("Suggested: `" + " ".join(result["suggestion"]["overrides"]) + "`")
    else:
        lines.append(f"No suggestion: {result['why_no_suggestion']}")
    if "warning" in result:
        lines.append(f"\nWarning: {result['warning']}")
    lines += ["", "![step response](step_response.png)", ""]
    (out_dir / "summary.md").write_text("\n".join(lines))
    print("\n".join(lines[4:-3]), flush=True)
    print(f"[step_response] wrote {out_dir}", flush=True)
    return result


if __name__ == "__main__":
    main()
