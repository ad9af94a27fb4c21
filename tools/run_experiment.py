r"""Run an experiment recipe from ``conf/experiment/``: every variant and seed, then plot and tabulate.

    python tools/run_experiment.py random_rewards
    python tools/run_experiment.py ce_gppo_betas --extra trainer.max_steps=20
    python tools/run_experiment.py schedules --model tiny --extra trainer.max_steps=2   # smoke run

A recipe is a YAML file with ``description``, ``base`` (Hydra overrides shared by every run),
``variants`` (name -> overrides), ``seeds``, ``tags`` (what to plot) and ``expected`` (the
effects the papers report, restated for the reader). Each run goes through
``rlvr_lightning.train.run`` in this process, one after another; ``--extra`` overrides come last
and win. The output folder gets one run folder per variant and seed, ``<recipe>.png`` (the tags
against the step, one line per run) and ``summary.md`` (the command, the overrides, a table of
first/last rollout entropy, mean clip fractions, last reward and the wall time of each run).
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make `tools` and `rlvr_lightning` importable
    sys.path.insert(0, str(REPO))

from tools.compare_schedules import compose, format_cell, last_value, mean_value  # noqa: E402
from tools.plot_run import plot_runs, read_scalars  # noqa: E402

RECIPES = REPO / "conf" / "experiment"
REQUIRED = ("description", "base", "variants", "tags")


def load_recipe(name: str) -> dict:
    """The recipe ``conf/experiment/<name>.yaml``, checked for the required keys."""
    path = RECIPES / f"{name}.yaml"
    if not path.is_file():
        available = ", ".join(sorted(p.stem for p in RECIPES.glob("*.yaml")))
        raise FileNotFoundError(f"no recipe {path}; available: {available}")
    recipe = yaml.safe_load(path.read_text())
    missing = [key for key in REQUIRED if key not in recipe]
    if missing:
        raise ValueError(f"recipe {path} lacks {missing}")
    recipe.setdefault("seeds", [0])
    recipe.setdefault("expected", [])
    return recipe


def run_overrides(recipe: dict, variant: str, seed: int, model: str | None, extra: Sequence[str]) -> list[str]:
    overrides = [*recipe["base"], *recipe["variants"][variant], f"seed={seed}"]
    if model:
        overrides.append(f"model={model}")
    return [*overrides, *extra]


def first_value(points: list[tuple[int, float]] | None) -> float | None:
    return points[0][1] if points else None


def summary_table(runs: dict[str, Path], seconds: dict[str, float]) -> str:
    lines = [
        "| run | steps | entropy first | entropy last | clip-low frac (mean) | clip-high frac (mean) "
        "| reward last | accuracy last | wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, run_dir in runs.items():
        scalars = read_scalars(run_dir)
        entropy = scalars.get("entropy/rollout")
        cells = [
            format_cell(first_value(entropy)),
            format_cell(last_value(entropy)),
            format_cell(mean_value(scalars.get("objective/clip_low_fraction"))),
            format_cell(mean_value(scalars.get("objective/clip_high_fraction"))),
            format_cell(last_value(scalars.get("reward/mean"))),
            format_cell(last_value(scalars.get("reward/accuracy"))),
            f"{seconds[name]:.0f}",
        ]
        lines.append(f"| {name} | {len(entropy or [])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_recipe(
    name: str,
    out_dir: str | Path | None = None,
    model: str | None = None,
    extra: Sequence[str] = (),
) -> Path:
    """Train every variant and seed of recipe ``name``; write the figure and the summary."""
    from rlvr_lightning.train import run

    recipe = load_recipe(name)
    if out_dir is None:
        stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        out_dir = REPO / "outputs" / "experiments" / f"{stamp}_{name}"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Compose every config first, so a typo in a recipe fails before any training.
    configs = {
        f"{variant}_seed{seed}": compose(run_overrides(recipe, variant, seed, model, extra))
        for variant in recipe["variants"]
        for seed in recipe["seeds"]
    }
    runs: dict[str, Path] = {}
    seconds: dict[str, float] = {}
    for index, (run_name, cfg) in enumerate(configs.items(), start=1):
        print(f"[run_experiment] {name} {index}/{len(configs)}: {run_name}", flush=True)
        runs[run_name] = out_dir / run_name
        start = time.perf_counter()
        run(cfg, run_dir=runs[run_name])
        seconds[run_name] = time.perf_counter() - start
    figure = out_dir / f"{name}.png"
    plot_runs(list(runs.values()), recipe["tags"], figure, labels=list(runs), title=recipe["description"])
    command = " ".join(["python tools/run_experiment.py", name, *(["--model", model] if model else [])])
    if extra:
        command += " --extra " + " ".join(extra)
    lines = [
        f"# {recipe['description']}",
        "",
        f"Command: `{command}`",
        "",
        f"Shared overrides: `{' '.join(recipe['base'])}`",
        "",
        "Variants: " + "; ".join(f"`{v}`: `{' '.join(o)}`" for v, o in recipe["variants"].items()),
        "",
        "Expected: " + "; ".join(recipe["expected"]),
        "",
        summary_table(runs, seconds),
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
    parser.add_argument("recipe", help="name of a file in conf/experiment/ (without .yaml)")
    parser.add_argument("--model", default=None, help="override the recipe's model (tiny for a smoke run)")
    parser.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every run")
    parser.add_argument("--out-dir", type=Path, default=None, help="output folder")
    args = parser.parse_args(argv)
    return run_recipe(args.recipe, args.out_dir, args.model, args.extra)


if __name__ == "__main__":
    main()
