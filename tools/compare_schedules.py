r"""Compare entropy schedules on one setup: train each in turn, then plot and summarise.

    python tools/compare_schedules.py --steps 20
    python tools/compare_schedules.py --model tiny --steps 4 --schedules constant oscillatory \
        --extra rollout.prompts_per_step=2 validate_before_training=false

Every schedule trains with ``rlvr_lightning.train.run`` in this process, one after another,
with the same seed and the same overrides: ``model=<--model> objective=<--objective>
rollout.epochs=2`` (4 optimizer updates per rollout with the default 2 mini-batches, so the clip
binds), ``trainer.max_steps=<--steps>``, then ``--extra``. The output folder gets one run folder
per schedule, ``schedules.png`` (rollout entropy, the eps bounds in force and the mean reward
against the step) and ``summary.md`` (a table of final entropy, final reward and the mean bounds
in force per run).
"""

from __future__ import annotations

import argparse
import datetime
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make `tools` and `rlvr_lightning` importable
    sys.path.insert(0, str(REPO))

from tools.plot_run import plot_runs, read_scalars  # noqa: E402

DEFAULT_SCHEDULES = ("constant", "increase_then_decrease", "oscillatory", "target_entropy")
PLOT_TAGS = (
    "entropy/rollout",
    "objective/eps_high_in_force",
    "objective/eps_low_in_force",
    "reward/mean",
)
# Several updates per rollout: with one, the ratio is exactly 1 and no schedule has any effect.
BASE_OVERRIDES = ("rollout.epochs=2",)


def run_overrides(
    schedule: str,
    model: str,
    objective: str,
    steps: int,
    seed: int,
    trainer: str,
    extra: Sequence[str] = (),
) -> list[str]:
    """The Hydra overrides of one run of the comparison (``extra`` last, so it wins)."""
    return [
        f"model={model}",
        f"objective={objective}",
        f"scheduler={schedule}",
        f"trainer={trainer}",
        f"trainer.max_steps={steps}",
        f"seed={seed}",
        *BASE_OVERRIDES,
        *extra,
    ]


def compose(overrides: Sequence[str]):
    """The project config with ``overrides``, as ``python -m rlvr_lightning.train`` builds it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from rlvr_lightning.train import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


def last_value(points: list[tuple[int, float]] | None) -> float | None:
    return points[-1][1] if points else None


def mean_value(points: list[tuple[int, float]] | None) -> float | None:
    return sum(value for _, value in points) / len(points) if points else None


def format_cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def summary_table(run_dirs: dict[str, Path]) -> str:
    """Markdown table, one row per run: final entropy and reward, mean bounds in force."""
    lines = [
        "| run | steps | final entropy | final reward | mean eps_low in force "
        "| mean eps_high in force | final val accuracy |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, run_dir in run_dirs.items():
        scalars = read_scalars(run_dir)
        entropy = scalars.get("entropy/rollout")
        cells = [
            format_cell(last_value(entropy)),
            format_cell(last_value(scalars.get("reward/mean"))),
            format_cell(mean_value(scalars.get("objective/eps_low_in_force"))),
            format_cell(mean_value(scalars.get("objective/eps_high_in_force"))),
            format_cell(last_value(scalars.get("val/accuracy"))),
        ]
        lines.append(f"| {name} | {len(entropy or [])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def compare(
    schedules: Sequence[str] = DEFAULT_SCHEDULES,
    out_dir: str | Path | None = None,
    model: str = "smollm2_135m",
    objective: str = "grpo",
    steps: int = 20,
    seed: int = 0,
    trainer: str | None = None,
    extra: Sequence[str] = (),
) -> Path:
    """Train every schedule, then write ``schedules.png`` and ``summary.md``; returns the folder."""
    from rlvr_lightning.train import run

    if not schedules:
        raise ValueError("give at least one schedule")
    if len(set(schedules)) != len(schedules):
        raise ValueError(f"a schedule is listed twice: {list(schedules)}")
    if trainer is None:
        import torch

        trainer = "gpu" if torch.cuda.is_available() else "cpu"
    if out_dir is None:
        stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        out_dir = Path("outputs") / "compare_schedules" / stamp
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Compose every config first, so a typo in an override fails before any training.
    configs = {
        name: compose(run_overrides(name, model, objective, steps, seed, trainer, extra))
        for name in schedules
    }
    run_dirs: dict[str, Path] = {}
    for index, (name, cfg) in enumerate(configs.items(), start=1):
        print(f"[compare_schedules] {index}/{len(configs)}: scheduler={name}", flush=True)
        run_dirs[name] = out_dir / name
        run(cfg, run_dir=run_dirs[name])

    title = f"model={model} objective={objective} seed={seed}"
    plot_runs(
        list(run_dirs.values()),
        PLOT_TAGS,
        out_dir / "schedules.png",
        labels=list(run_dirs),
        title=title,
    )
    common = run_overrides("<schedule>", model, objective, steps, seed, trainer, extra)
    summary = [
        "# Schedule comparison",
        "",
        f"Overrides of every run: `{' '.join(common)}`",
        "",
        summary_table(run_dirs),
        "![schedules](schedules.png)",
        "",
    ]
    (out_dir / "summary.md").write_text("\n".join(summary))
    print(f"[compare_schedules] wrote {out_dir / 'schedules.png'} and {out_dir / 'summary.md'}")
    return out_dir


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]),
    )
    add = parser.add_argument
    add("--schedules", nargs="+", default=list(DEFAULT_SCHEDULES), help="conf/scheduler names")
    add("--steps", type=int, default=20, help="rollouts per run (trainer.max_steps)")
    add("--model", default="smollm2_135m", help="conf/model name (tiny for a smoke run)")
    add("--objective", default="grpo", help="conf/objective name")
    add("--seed", type=int, default=0, help="the seed every run shares")
    add("--trainer", default=None, help="conf/trainer name (default: gpu with CUDA, else cpu)")
    add("--extra", nargs="*", default=[], help="more Hydra overrides for every run")
    add(
        "--out-dir",
        type=Path,
        default=None,
        help="output folder (default outputs/compare_schedules/<timestamp>)",
    )
    args = parser.parse_args(argv)
    return compare(
        args.schedules,
        args.out_dir,
        args.model,
        args.objective,
        args.steps,
        args.seed,
        args.trainer,
        args.extra,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
