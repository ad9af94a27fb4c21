r"""Plot TensorBoard scalars of one or more runs: one subplot per tag, one line per run.

    python tools/plot_run.py outputs/runs/A outputs/runs/B \
        --tags entropy/rollout reward/mean objective/eps_high_in_force --out plot.png

Events files are found recursively under each run folder (a resumed run may hold several; a
later file wins where two log the same step). The x axis is the logged step, i.e. the number
of rollouts completed before the value was measured.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

DEFAULT_TAGS = (
    "entropy/rollout",
    "reward/mean",
    "val/accuracy",
    "objective/eps_high_in_force",
    "objective/eps_low_in_force",
)

# Runs with the same curve (e.g. before a schedule first acts) would hide each other: each run
# gets its own line style as well as its own colour.
LINE_STYLES = ("-", "--", "-.", ":")

Series = list[tuple[int, float]]


def _write_order(path: Path) -> tuple[int, float, str]:
    """Events files are named ``events.out.tfevents.<creation time in s>.<host>...``: order by
    that time, then by modification time (several files created within one second)."""
    created = path.name.split(".")[3]
    return (int(created) if created.isdigit() else 0, path.stat().st_mtime, path.name)


def read_scalars(run_dir: str | Path) -> dict[str, Series]:
    """All scalars of a run folder: tag -> [(step, value), ...] sorted by step.

    Raises ``FileNotFoundError`` when the folder holds no TensorBoard events file, and
    ``ValueError`` when it holds events files in several folders (a parent of several runs).
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist")
    files = sorted(run_dir.rglob("events.out.tfevents.*"), key=_write_order)
    if not files:
        raise FileNotFoundError(
            f"no TensorBoard events file (events.out.tfevents.*) under {run_dir}; "
            "is it a run folder written by rlvr_lightning.train?"
        )
    folders = sorted({str(p.parent.relative_to(run_dir)) for p in files})
    if len(folders) > 1:
        raise ValueError(
            f"{run_dir} holds events files in {len(folders)} folders ({', '.join(folders[:4])}"
            f"{', ...' if len(folders) > 4 else ''}): several runs? Pass each run folder."
        )
    by_tag: dict[str, dict[int, float]] = {}
    for events in files:
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            points = by_tag.setdefault(tag, {})
            for event in accumulator.Scalars(tag):
                points[event.step] = event.value
    return {tag: sorted(points.items()) for tag, points in by_tag.items()}


def run_labels(run_dirs: Sequence[Path]) -> list[str]:
    """Folder names, or parent/name where two runs share a folder name."""
    names = [Path(d).resolve().name for d in run_dirs]
    if len(set(names)) == len(names):
        return names
    return [f"{Path(d).resolve().parent.name}/{Path(d).resolve().name}" for d in run_dirs]


def _hide_float_noise(ax: plt.Axes) -> None:
    """A constant logged in float32 (0.19999999, 0.2000001) would fill the axis with noise:
    give a flat subplot a fixed range around its value instead."""
    values = [float(y) for line in ax.lines for y in line.get_ydata()]
    low, high = min(values), max(values)
    if high - low <= 1e-6 * max(abs(low), abs(high)):
        centre = 0.5 * (low + high)
        margin = max(0.05 * abs(centre), 0.05)
        ax.set_ylim(centre - margin, centre + margin)


def plot_runs(
    run_dirs: Sequence[str | Path],
    tags: Sequence[str] = DEFAULT_TAGS,
    out: str | Path = "plot.png",
    labels: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Write one PNG with a subplot per tag and a line per run; returns its path."""
    run_dirs = [Path(d) for d in run_dirs]
    if not run_dirs:
        raise ValueError("give at least one run folder")
    if not tags:
        raise ValueError("give at least one tag")
    if labels is None:
        labels = run_labels(run_dirs)
    if len(labels) != len(run_dirs):
        raise ValueError(f"{len(labels)} labels for {len(run_dirs)} run folders")
    runs = [read_scalars(d) for d in run_dirs]

    columns = 1 if len(tags) == 1 else 2
    rows = math.ceil(len(tags) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(6.0 * columns, 3.4 * rows), squeeze=False)
    handles: dict[str, object] = {}
    for index, tag in enumerate(tags):
        ax = axes[index // columns][index % columns]
        for number, (label, scalars) in enumerate(zip(labels, runs, strict=True)):
            points = scalars.get(tag)
            if not points:
                continue
            steps, values = zip(*points, strict=True)
            (line,) = ax.plot(
                steps,
                values,
                color=f"C{number % 10}",
                linestyle=LINE_STYLES[number % len(LINE_STYLES)],
                marker="o",
                markersize=3,
                linewidth=1.5,
                label=label,
            )
            handles.setdefault(label, line)
        if not ax.lines:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
            print(f"plot_run: no run logged {tag!r}", file=sys.stderr)
        else:
            _hide_float_noise(ax)
        ax.set_title(tag, fontsize=10)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
        if index + columns >= len(tags):  # the lowest subplot of its column
            ax.set_xlabel("step (rollouts completed)", fontsize=9)
    for index in range(len(tags), rows * columns):
        axes[index // columns][index % columns].set_visible(False)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    # One colour per run across subplots: one legend for the figure, below the subplots
    # (bbox_inches="tight" grows the image to hold it).
    figure.legend(
        list(handles.values()),
        list(handles),
        loc="upper center",
        bbox_to_anchor=(0.5, 0.0),
        ncol=min(len(handles), 4),
        fontsize=9,
        frameon=False,
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return out


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run folders (searched recursively)")
    parser.add_argument("--tags", nargs="+", default=list(DEFAULT_TAGS), help="scalar tags to plot")
    parser.add_argument("--labels", nargs="+", default=None, help="legend names, one per run")
    parser.add_argument("--out", type=Path, default=Path("plot.png"), help="PNG to write")
    parser.add_argument("--title", default=None, help="figure title")
    args = parser.parse_args(argv)
    try:
        out = plot_runs(args.run_dirs, args.tags, args.out, args.labels, args.title)
    except (FileNotFoundError, ValueError) as error:
        parser.exit(2, f"plot_run.py: error: {error}\n")
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
