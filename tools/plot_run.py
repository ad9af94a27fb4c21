r"""Plot TensorBoard scalars of one or more runs: one subplot per tag, one line per run.

    python tools/plot_run.py outputs/runs/A outputs/runs/B \
        --tags entropy/rollout reward/mean objective/eps_high_in_force --out plot.png
    python tools/plot_run.py outputs/runs/A --overlay eps_low,eps_high --overlay rollout,update
    python tools/plot_run.py outputs/runs/A --list-tags

Events files are found recursively under each run folder (a resumed run may hold several; a
later file wins where two log the same step). The x axis is the logged step, i.e. the number
of rollouts completed before the value was measured; each y axis is labelled with its unit.
``--overlay a,b,...`` draws several tags in one subplot (a name without ``/`` is every tag whose
last part is that name: ``eps_low`` is ``control/eps_low``). A tag no run logged is an error
(exit status 2) that names the closest tags; ``--list-tags`` prints what each run logged.

``objective/eps_{low,high}_in_force`` are logged only where they differ from ``control/eps_*``
(probability-dependent bounds); elsewhere ``read_scalars`` takes them from ``control/eps_*``, the
bound that was in force, so they can be plotted and compared for every run.
"""

from __future__ import annotations

import argparse
import difflib
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

# Tags logged only where they differ from another tag, which holds their value elsewhere.
DERIVED = {
    "objective/eps_low_in_force": "control/eps_low",
    "objective/eps_high_in_force": "control/eps_high",
}

# Unit of a tag's values (the y-axis label): the first rule that matches wins.
UNITS: tuple[tuple[str, str], ...] = (
    ("_fraction", "fraction"),
    ("val/accuracy", "fraction (avg@n)"),
    ("val/pass@", "fraction"),
    ("val/maj@", "fraction"),
    ("reward/accuracy", "fraction"),
    ("entropy/", "nats/token"),
    ("control/target_entropy", "nats/token"),
    ("control/entropy_error", "nats/token"),
    ("control/od_", "nats/token"),
    ("_in_force", "threshold"),
    ("control/eps_", "threshold"),
    ("control/beta", "coefficient"),
    ("control/", "setting"),
    ("length/", "tokens"),
    ("val/response_length", "tokens"),
    ("time/", "seconds"),
    ("perf/completion_tokens_per_second", "tokens/s"),
    ("perf/peak_memory_gib", "GiB"),
    ("reward/verifier_", "checks"),
    ("reward/advantage", "advantage"),
    ("reward/", "reward"),
    ("val/reward", "reward"),
    ("objective/ratio_", "ratio pi/pi_old"),
    ("objective/approx_kl_old", "nats/token"),
    ("objective/kl_ref", "nats/token"),
    ("objective/policy_loss", "loss"),
    ("optim/loss", "loss"),
    ("optim/grad_norm", "L2 norm"),
    ("optim/lr", "learning rate"),
    ("optim/skipped", "updates"),
    ("sampling/num_sequences", "sequences"),
    ("sampling/generation_batches", "batches"),
    ("data/", "prompts"),
)


def unit_of(tag: str) -> str:
    """The unit of ``tag``'s values ("" when unknown)."""
    for pattern, unit in UNITS:
        if pattern in tag:
            return unit
    return ""


def _write_order(path: Path) -> tuple[int, float, str]:
    """Events files are named ``events.out.tfevents.<creation time in s>.<host>...``: order by
    that time, then by modification time (several files created within one second)."""
    created = path.name.split(".")[3]
    return (int(created) if created.isdigit() else 0, path.stat().st_mtime, path.name)


def read_scalars(run_dir: str | Path, derived: bool = True) -> dict[str, Series]:
    """All scalars of a run folder: tag -> [(step, value), ...] sorted by step; with ``derived``
    also the ``DERIVED`` tags the run did not log, from the tag that holds their value.

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
    scalars = {tag: sorted(points.items()) for tag, points in by_tag.items()}
    if derived:
        for tag, source in DERIVED.items():
            if tag not in scalars and source in scalars:
                scalars[tag] = list(scalars[source])
    return scalars


def resolve(name: str, known: set[str]) -> list[str]:
    """The tags ``name`` stands for: itself when it holds a ``/``, else every known tag whose
    last part is ``name`` (``eps_low`` -> ``control/eps_low``). Raises ``ValueError`` naming the
    closest known tags when there is none."""
    if "/" in name:
        matches = [name] if name in known else []
    else:
        matches = sorted(tag for tag in known if tag.rsplit("/", 1)[-1] == name)
    if not matches:
        close = difflib.get_close_matches(name, sorted(known), n=4, cutoff=0.5)
        if "/" not in name:
            close += sorted(tag for tag in known if name in tag.rsplit("/", 1)[-1] and tag not in close)[:4]
        hint = f"; did you mean {', '.join(close[:4])}?" if close else ""
        raise ValueError(f"no run logged {name!r}{hint} (--list-tags lists every tag of a run)")
    return matches


def tag_listing(run_dirs: Sequence[str | Path]) -> str:
    """What each run logged: one line per tag with its number of points, step range and last value."""
    lines = []
    for run_dir in run_dirs:
        scalars = read_scalars(run_dir, derived=False)
        lines.append(f"{run_dir}: {len(scalars)} tags")
        width = max((len(tag) for tag in scalars), default=0)
        for tag, points in sorted(scalars.items()):
            steps = f"steps {points[0][0]}-{points[-1][0]}" if len(points) > 1 else f"step {points[0][0]}"
            unit = unit_of(tag)
            lines.append(
                f"  {tag:<{width}}  {len(points):>4} points, {steps}, last {points[-1][1]:.6g}"
                + (f" {unit}" if unit else "")
            )
    return "\n".join(lines)


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


def style_panel(ax: plt.Axes, lowest_in_column: bool) -> None:
    """What every panel shares: whole-number steps, no axis offset, a light grid, and the x label
    under the lowest panel of each column."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize=8)
    if lowest_in_column:
        ax.set_xlabel("step (rollouts completed)", fontsize=9)


def figure_legend(figure: plt.Figure, handles: dict[str, object]) -> None:
    """One legend for the figure (a colour per run), below the panels: bbox_inches="tight" grows
    the image to hold it."""
    if handles:
        figure.legend(
            list(handles.values()),
            list(handles),
            loc="upper center",
            bbox_to_anchor=(0.5, 0.0),
            ncol=min(len(handles), 4),
            fontsize=9,
            frameon=False,
        )


def _panel_unit(tags: Sequence[str]) -> str:
    units = list(dict.fromkeys(unit_of(tag) for tag in tags if unit_of(tag)))
    return " / ".join(units)


def plot_runs(
    run_dirs: Sequence[str | Path],
    tags: Sequence[str] | None = DEFAULT_TAGS,
    out: str | Path = "plot.png",
    labels: Sequence[str] | None = None,
    title: str | None = None,
    overlays: Sequence[Sequence[str]] = (),
) -> Path:
    """Write one PNG with a subplot per tag and a line per run, then a subplot per overlay (its
    tags in one subplot: a colour per tag, a line style per run); returns its path.

    A tag or overlay name no run logged raises ``ValueError`` naming the closest tags; of the
    default tags (``tags=None`` or ``DEFAULT_TAGS``) those no run logged are left out.
    """
    run_dirs = [Path(d) for d in run_dirs]
    if not run_dirs:
        raise ValueError("give at least one run folder")
    defaults = tags is None or tuple(tags) == DEFAULT_TAGS
    tags = list(DEFAULT_TAGS if tags is None else tags)
    if not tags and not overlays:
        raise ValueError("give at least one tag")
    if labels is None:
        labels = run_labels(run_dirs)
    if len(labels) != len(run_dirs):
        raise ValueError(f"{len(labels)} labels for {len(run_dirs)} run folders")
    runs = [read_scalars(d) for d in run_dirs]
    known = set().union(*runs)

    panels: list[tuple[list[str], bool]] = []  # (tags, overlay?)
    for tag in tags:
        if tag in known:
            panels.append(([tag], False))
        elif defaults:
            print(f"plot_run: no run logged {tag!r}; left out", file=sys.stderr)
        else:
            resolve(tag, known)  # raises, naming the closest tags
    for names in overlays:
        group = list(dict.fromkeys(tag for name in names for tag in resolve(name, known)))
        panels.append((group, True))
    if not panels:
        raise ValueError(f"no run logged any of {', '.join(tags)}")

    columns = 1 if len(panels) == 1 else 2
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(6.0 * columns, 3.4 * rows), squeeze=False)
    handles: dict[str, object] = {}
    for index, (panel_tags, overlay) in enumerate(panels):
        ax = axes[index // columns][index % columns]
        for number, (label, scalars) in enumerate(zip(labels, runs, strict=True)):
            for tag_number, tag in enumerate(panel_tags):
                points = scalars.get(tag)
                if not points:
                    continue
                steps, values = zip(*points, strict=True)
                colour = tag_number if overlay else number
                (line,) = ax.plot(
                    steps,
                    values,
                    color=f"C{colour % 10}",
                    linestyle=LINE_STYLES[number % len(LINE_STYLES)],
                    marker="o",
                    markersize=3,
                    linewidth=1.5,
                    label=(tag if len(runs) == 1 else f"{label}: {tag}") if overlay else label,
                )
                if not overlay:
                    handles.setdefault(label, line)
        _hide_float_noise(ax)
        if overlay:
            ax.legend(fontsize=7, loc="best")
        ax.set_title(", ".join(panel_tags) if overlay else panel_tags[0], fontsize=10 if not overlay else 9)
        ax.set_ylabel(_panel_unit(panel_tags), fontsize=9)
        style_panel(ax, lowest_in_column=index + columns >= len(panels))
    for index in range(len(panels), rows * columns):
        axes[index // columns][index % columns].set_visible(False)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure_legend(figure, handles)  # one colour per run across the single-tag subplots
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return out


def main(argv: Sequence[str] | None = None) -> Path | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run folders (searched recursively)")
    parser.add_argument(
        "--tags", nargs="+", default=None, help=f"scalar tags to plot, a subplot each (default: {' '.join(DEFAULT_TAGS)})"
    )
    parser.add_argument(
        "--overlay",
        action="append",
        default=[],
        metavar="A,B,...",
        help="tags drawn together in one subplot, comma-separated; a name without '/' is every tag whose "
        "last part it is (eps_low,eps_high); repeat for more subplots",
    )
    parser.add_argument("--list-tags", action="store_true", help="print every tag each run logged, then exit")
    parser.add_argument("--labels", nargs="+", default=None, help="legend names, one per run")
    parser.add_argument("--out", type=Path, default=Path("plot.png"), help="PNG to write")
    parser.add_argument("--title", default=None, help="figure title")
    args = parser.parse_args(argv)
    overlays = [[name.strip() for name in group.split(",") if name.strip()] for group in args.overlay]
    tags = args.tags if args.tags is not None or not overlays else []
    try:
        if args.list_tags:
            print(tag_listing(args.run_dirs))
            return None
        out = plot_runs(args.run_dirs, tags, args.out, args.labels, args.title, overlays=overlays)
    except (FileNotFoundError, ValueError) as error:
        parser.exit(2, f"plot_run.py: error: {error}\n")
    print(f"wrote {out}")
    return out

if __name__ == "__main__":
    main(sys.argv[1:])
