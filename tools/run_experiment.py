r"""Run an experiment recipe from ``conf/experiment/``: every arm and seed, then plot and tabulate.

    python tools/run_experiment.py random_rewards
    python tools/run_experiment.py ce_gppo_betas --seeds 0 1 2 --extra trainer.max_steps=20
    python tools/run_experiment.py schedules --arms constant oscillatory --seeds 0 1
    python tools/run_experiment.py schedules --model tiny --extra trainer.max_steps=2   # smoke run

A recipe is a folder of Hydra experiment configs, ``rlvr_lightning/conf/experiment/<recipe>/``:
``_base.yaml`` holds the settings every arm shares and the ``recipe`` block (``description``,
``seeds``, ``tags`` to plot, ``expected`` effects; defaults and run-folder names in
``conf/experiment/_recipe.yaml``), and every other file is one arm, selectable on its own as
``+experiment=<recipe>/<arm>``. This tool runs each arm with each seed, i.e. the
overrides ``+experiment=<recipe>/<arm> seed=<seed> [model=<--model>] <--extra>`` (the same run as
``python -m rlvr_lightning.train`` with those overrides), through ``rlvr_lightning.train.run`` in
this process, one after another. The output folder gets one run folder per arm and seed,
``<recipe>.png`` (the tags against the step: per arm the mean over seeds, with a band from the
minimum to the maximum when there are several seeds) and ``summary.md`` (the command, the
settings, a table per run and a table per arm: mean and [min, max] over seeds).
"""

from __future__ import annotations

import argparse
import datetime
import math
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make `tools` and `rlvr_lightning` importable
    sys.path.insert(0, str(REPO))

from tools.compare_schedules import compose, format_cell, last_value, mean_value  # noqa: E402
from tools.plot_run import LINE_STYLES, _hide_float_noise, figure_legend, read_scalars, style_panel  # noqa: E402

RECIPES = REPO / "rlvr_lightning" / "conf" / "experiment"
BASE = "_base.yaml"  # a recipe's shared settings; files starting with "_" are not arms

# Columns of both tables: (header, tag, reduction of the tag's points to one number).
COLUMNS = (
    ("entropy first", "entropy/rollout", "first"),
    ("entropy last", "entropy/rollout", "last"),
    ("clip-low frac (mean)", "objective/clip_low_fraction", "mean"),
    ("clip-high frac (mean)", "objective/clip_high_fraction", "mean"),
    ("reward last", "reward/mean", "last"),
    ("accuracy last", "reward/accuracy", "last"),
)


def recipes() -> list[str]:
    """The recipes: folders of ``conf/experiment/`` with a ``_base.yaml``."""
    return sorted(p.parent.name for p in RECIPES.glob(f"*/{BASE}"))


def _natural_key(name: str) -> list[tuple[int, float | str]]:
    """Sort key that orders numbers by value: b1_0 < b1_0.5 < b1_1."""
    parts = re.findall(r"\d+(?:\.\d+)?|[^\d]+", name)
    return [(0, float(p)) if p[0].isdigit() else (1, p) for p in parts]


def arms(recipe: str) -> list[str]:
    """The arms of ``recipe``: its config files other than ``_base.yaml`` (numbers by value)."""
    folder = RECIPES / recipe
    if not (folder / BASE).is_file():
        available = ", ".join(recipes()) or "none"
        raise FileNotFoundError(f"no recipe {folder} (with a {BASE}); available: {available}")
    found = [p.stem for p in folder.glob("*.yaml") if not p.name.startswith("_")]
    if not found:
        raise FileNotFoundError(f"recipe {folder} has no arm (a .yaml file next to {BASE})")
    return sorted(found, key=_natural_key)


def arm_overrides(
    recipe: str, arm: str, seed: int, model: str | None, extra: Sequence[str]
) -> list[str]:
    """The overrides of one run: the arm, the seed, then ``model`` and ``extra`` (they win)."""
    return [
        f"+experiment={recipe}/{arm}",
        f"seed={seed}",
        *([f"model={model}"] if model else []),
        *extra,
    ]


def compose_arm(
    recipe: str, arm: str, seed: int, model: str | None = None, extra: Sequence[str] = ()
):
    """The composed config of one run, checked to be the arm it was asked for."""
    cfg = compose(arm_overrides(recipe, arm, seed, model, extra))
    named = (cfg.get("recipe") or {}).get("name"), (cfg.get("recipe") or {}).get("arm")
    if named != (recipe, arm):
        raise ValueError(
            f"conf/experiment/{recipe}/{arm}.yaml sets recipe.name/arm to {named}, not {(recipe, arm)}"
        )
    return cfg


def _flatten(node: object, prefix: str = "") -> list[str]:
    if isinstance(node, dict) and node:
        return [item for key, value in node.items() for item in _flatten(value, f"{prefix}{key}.")]
    if isinstance(node, bool) or node is None:  # as Hydra's override syntax writes them
        node = {True: "true", False: "false", None: "null"}[node]
    return [f"{prefix[:-1]}={node}"]


def file_settings(path: Path) -> str:
    """What a recipe file sets, in override form: the arm it builds on (if any), its group
    overrides, then its keys (without the ``recipe`` block and Hydra's settings)."""
    content = yaml.safe_load(path.read_text()) or {}
    settings = []
    for entry in content.pop("defaults", []):
        if isinstance(entry, str) and not Path(entry).name.startswith("_"):  # built on another arm
            settings.append(f"+{entry.lstrip('/').replace('/', '=', 1)}")
        elif isinstance(entry, dict):
            for key, value in entry.items():
                settings.append(f"{key.removeprefix('override').strip().lstrip('/')}={value}")
    for key in ("recipe", "hydra"):
        content.pop(key, None)
    settings += _flatten(content) if content else []  # an arm that only swaps groups sets no keys
    return " ".join(settings) if settings else "-"


REDUCTIONS = "first, last, mean, mean_from_<step>, max_from_<step>, mean_to_<step>"


def reduce(points: list[tuple[int, float]] | None, how: str) -> float | None:
    """``points`` reduced to one number: ``first``, ``last``, ``mean``, the mean or maximum over
    the steps from a given one on (``mean_from_5``, ``max_from_5``), or the mean up to a step
    (``mean_to_4``: steps 0 to 4)."""
    if how == "first":
        return points[0][1] if points else None
    if how.startswith(("mean_from_", "max_from_", "mean_to_")):
        kind, bound = how.rsplit("_", 1)
        if kind == "mean_to":
            kept = [value for step, value in points or [] if step <= int(bound)]
        else:
            kept = [value for step, value in points or [] if step >= int(bound)]
        return (max(kept) if kind == "max_from" else sum(kept) / len(kept)) if kept else None
    if how not in ("last", "mean"):
        raise ValueError(f"column reduction {how!r} is unknown; use one of {REDUCTIONS}")
    return last_value(points) if how == "last" else mean_value(points)


def recipe_columns(recipe) -> tuple[tuple[str, str, str], ...]:
    """The recipe's table columns (``recipe.columns``: [header, tag, reduction] each), or COLUMNS."""
    columns = recipe.get("columns")
    if not columns:
        return COLUMNS
    out = []
    for column in columns:
        if len(column) != 3:
            raise ValueError(f"recipe.columns entry {list(column)} must be [header, tag, reduction]")
        header, tag, how = (str(part) for part in column)
        reduce([], how)  # an unknown reduction fails here, before any training
        out.append((header, tag, how))
    return tuple(out)


def spread_cell(values: list[float | None]) -> str:
    """``mean [min, max]`` of the runs that logged the value (just the value for one run)."""
    present = [v for v in values if v is not None]
    if len(present) <= 1:
        return format_cell(present[0] if present else None)
    mean = sum(present) / len(present)
    return f"{format_cell(mean)} [{format_cell(min(present))}, {format_cell(max(present))}]"


def run_table(runs: dict[str, Path], seconds: dict[str, float], columns=COLUMNS) -> str:
    """One row per run."""
    lines = [
        "| run | steps | " + " | ".join(header for header, _, _ in columns) + " | wall s |",
        "|---|---|" + "---|" * len(columns) + "---|",
    ]
    for name, run_dir in runs.items():
        scalars = read_scalars(run_dir)
        cells = [format_cell(reduce(scalars.get(tag), how)) for _, tag, how in columns]
        steps = len(scalars.get("entropy/rollout") or [])
        lines.append(f"| {name} | {steps} | " + " | ".join(cells) + f" | {seconds[name]:.0f} |")
    return "\n".join(lines) + "\n"


def arm_table(by_arm: dict[str, dict[int, Path]], seconds: dict[str, float], columns=COLUMNS) -> str:
    """One row per arm: mean [min, max] over its seeds."""
    lines = [
        "| arm | seeds | " + " | ".join(header for header, _, _ in columns) + " | wall s |",
        "|---|---|" + "---|" * len(columns) + "---|",
    ]
    for arm, run_dirs in by_arm.items():
        scalars = [read_scalars(d) for d in run_dirs.values()]
        cells = [spread_cell([reduce(s.get(tag), how) for s in scalars]) for _, tag, how in columns]
        walls = [seconds[run_name(arm, seed)] for seed in run_dirs]
        seeds = ",".join(str(seed) for seed in run_dirs)
        lines.append(
            f"| {arm} | {seeds} | " + " | ".join(cells) + f" | {sum(walls) / len(walls):.0f} |"
        )
    return "\n".join(lines) + "\n"


def plot_arms(
    by_arm: dict[str, dict[int, Path]], tags: Sequence[str], out: Path, title: str
) -> Path:
    """One subplot per tag; per arm the mean over seeds at every step all its seeds logged, and a
    band from the minimum to the maximum over seeds."""
    import matplotlib.pyplot as plt

    scalars = {
        arm: [read_scalars(d) for d in run_dirs.values()] for arm, run_dirs in by_arm.items()
    }
    columns = 1 if len(tags) == 1 else 2
    rows = math.ceil(len(tags) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(6.0 * columns, 3.4 * rows), squeeze=False)
    handles: dict[str, object] = {}
    for index, tag in enumerate(tags):
        ax = axes[index // columns][index % columns]
        for number, (arm, runs) in enumerate(scalars.items()):
            series = [dict(run.get(tag) or []) for run in runs]
            steps = sorted(set.intersection(*(set(s) for s in series)))
            if not steps:
                continue
            values = [[s[step] for s in series] for step in steps]
            label = f"{arm} ({len(runs)} seed{'s' if len(runs) > 1 else ''})"
            (line,) = ax.plot(
                steps,
                [sum(v) / len(v) for v in values],
                color=f"C{number % 10}",
                linestyle=LINE_STYLES[number % len(LINE_STYLES)],
                marker="o",
                markersize=3,
                linewidth=1.5,
                label=label,
            )
            if len(runs) > 1:
                lows, highs = [min(v) for v in values], [max(v) for v in values]
                ax.fill_between(steps, lows, highs, color=f"C{number % 10}", alpha=0.2, linewidth=0)
            handles.setdefault(label, line)
        if not ax.lines:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
            print(f"run_experiment: no run logged {tag!r}", file=sys.stderr)
        else:
            _hide_float_noise(ax)
        ax.set_title(tag, fontsize=10)
        style_panel(ax, lowest_in_column=index + columns >= len(tags))
    for index in range(len(tags), rows * columns):
        axes[index // columns][index % columns].set_visible(False)
    figure.suptitle(title)
    figure.tight_layout()
    figure_legend(figure, handles)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return out


def run_name(arm: str, seed: int) -> str:
    return f"{arm}_seed{seed}"


def run_recipe(
    name: str,
    out_dir: str | Path | None = None,
    model: str | None = None,
    extra: Sequence[str] = (),
    seeds: Sequence[int] | None = None,
    only_arms: Sequence[str] | None = None,
    report_only: bool = False,
) -> Path:
    """Train every arm (or ``only_arms``) of recipe ``name`` with every seed (default: the
    recipe's ``recipe.seeds``); write the figure and the summary; returns the output folder.
    ``report_only``: train nothing, rebuild the figure and summary from the run folders already
    in ``out_dir`` (wall time then is the sum of the runs' ``time/step_seconds``)."""
    from rlvr_lightning.train import run

    available = arms(name)
    chosen = list(only_arms) if only_arms else available
    unknown = [arm for arm in chosen if arm not in available]
    if unknown:
        raise ValueError(f"recipe {name} has no arm {unknown}; its arms: {', '.join(available)}")
    recipe = compose_arm(name, chosen[0], 0, model, extra).recipe
    columns = recipe_columns(recipe)
    if report_only and out_dir is None:
        raise ValueError("report_only needs the output folder of the runs (--out-dir)")
    seeds = [int(s) for s in (seeds if seeds else recipe.seeds)]
    if out_dir is None:
        stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        out_dir = REPO / "outputs" / "experiments" / f"{stamp}_{name}"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Compose every config first, so a typo in a recipe fails before any training.
    configs = {
        (arm, seed): compose_arm(name, arm, seed, model, extra) for arm in chosen for seed in seeds
    }
    by_arm: dict[str, dict[int, Path]] = {arm: {} for arm in chosen}
    runs: dict[str, Path] = {}
    seconds: dict[str, float] = {}
    for index, ((arm, seed), cfg) in enumerate(configs.items(), start=1):
        label = run_name(arm, seed)
        print(f"[run_experiment] {name} {index}/{len(configs)}: {label}", flush=True)
        runs[label] = by_arm[arm][seed] = out_dir / label
        if report_only:
            if not runs[label].is_dir():
                raise FileNotFoundError(f"{runs[label]} is missing: run that arm and seed first (without --report)")
            seconds[label] = sum(v for _, v in read_scalars(runs[label]).get("time/step_seconds", []))
            continue
        start = time.perf_counter()
        run(cfg, run_dir=runs[label])
        seconds[label] = time.perf_counter() - start

    figure = out_dir / f"{name}.png"
    band = ", mean and min-max band over seeds" if len(seeds) > 1 else ""
    plot_arms(by_arm, list(recipe.tags), figure, f"{recipe.description}{band}")
    command = " ".join(
        [
            "python tools/run_experiment.py",
            name,
            *(["--arms", *chosen] if only_arms else []),
            *(["--seeds", *map(str, seeds)] if seeds != list(recipe.seeds) else []),
            *(["--model", model] if model else []),
            *(["--extra", *extra] if extra else []),
        ]
    )
    train_command = " ".join(
        [
            "python -m rlvr_lightning.train -m",
            "+experiment=" + ",".join(f"{name}/{arm}" for arm in chosen),
            "seed=" + ",".join(map(str, seeds)),
            *([f"model={model}"] if model else []),
            *extra,
        ]
    )
    lines = [
        f"# {recipe.description}",
        "",
        f"Command: `{command}`",
        "",
        f"The same runs with the train command (a Hydra multirun): `{train_command}`",
        "",
        f"Shared settings (`conf/experiment/{name}/{BASE}`): `{file_settings(RECIPES / name / BASE)}`",
        "",
        "Arms: "
        + "; ".join(
            f"`{arm}`: `{file_settings(RECIPES / name / f'{arm}.yaml')}`" for arm in chosen
        ),
        "",
        "Expected: " + "; ".join(recipe.expected),
        "",
        f"Per arm, over seeds {', '.join(map(str, seeds))}: mean [min, max]",
        "",
        arm_table(by_arm, seconds, columns),
        "Per run:",
        "",
        run_table(runs, seconds, columns),
        f"![{name}]({figure.name})",
        "",
    ]
    (out_dir / "summary.md").write_text("\n".join(lines))
    print(f"[run_experiment] wrote {figure} and {out_dir / 'summary.md'}", flush=True)
    return out_dir


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]),
    )
    parser.add_argument("recipe", help="a folder of conf/experiment/: " + ", ".join(recipes()))
    parser.add_argument(
        "--arms", nargs="+", default=None, help="run only these arms, in this order (default: all)"
    )
    parser.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=None,
        help="seeds (default: the recipe's recipe.seeds)",
    )
    parser.add_argument(
        "--model", default=None, help="override the recipe's model (tiny for a smoke run)"
    )
    parser.add_argument(
        "--extra", nargs="*", default=[], help="more Hydra overrides for every run (they win)"
    )
    parser.add_argument("--out-dir", type=Path, default=None, help="output folder")
    parser.add_argument(
        "--report",
        action="store_true",
        help="train nothing: rebuild the figure and summary.md from the runs in --out-dir",
    )
    args = parser.parse_args(argv)
    if args.report and args.out_dir is None:
        parser.error("--report needs --out-dir, the folder holding the runs")
    try:
        arms(args.recipe)
    except FileNotFoundError as error:
        parser.exit(2, f"run_experiment.py: error: {error}\n")
    return run_recipe(args.recipe, args.out_dir, args.model, args.extra, args.seeds, args.arms, args.report)


if __name__ == "__main__":
    main()
