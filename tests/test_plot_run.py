"""tools/plot_run.py's options on written event files: units, overlays, --list-tags, errors for
tags no run logged, and the bounds in force taken from control/ where they are not logged."""

from __future__ import annotations

from pathlib import Path

import pytest

from tools import plot_run

ENTROPY = [2.38, 1.9, 1.2, 0.63]


def write_run(folder: Path, eps_high: list[float] | None = None, validation: bool = True) -> Path:
    """A run folder as rlvr_lightning.train writes it: events under tensorboard/."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(folder / "tensorboard"))
    for step, entropy in enumerate(ENTROPY):
        writer.add_scalar("entropy/rollout", entropy, step)
        writer.add_scalar("entropy/update", entropy - 0.01, step)
        writer.add_scalar("reward/mean", 0.2 * step, step)
        writer.add_scalar("control/eps_low", 0.2, step)
        writer.add_scalar("control/eps_high", eps_high[step] if eps_high else 0.28, step)
        writer.add_scalar("objective/clip_high_fraction", 0.01 * step, step)
    if validation:
        writer.add_scalar("val/accuracy", 0.1, 0)
        writer.add_scalar("val/accuracy", 0.5, len(ENTROPY))
    writer.close()
    return folder


@pytest.fixture
def figures(monkeypatch) -> list:
    """The figures plot_runs draws (kept instead of closed)."""
    kept: list = []
    monkeypatch.setattr(plot_run.plt, "close", kept.append)
    return kept


def axes_by_title(figure) -> dict:
    return {ax.get_title(): ax for ax in figure.axes if ax.get_visible() and ax.get_title()}


def test_units_label_every_y_axis(tmp_path: Path, figures: list) -> None:
    run = write_run(tmp_path / "run")
    tags = ["entropy/rollout", "reward/mean", "val/accuracy", "control/eps_high", "objective/clip_high_fraction"]
    plot_run.plot_runs([run], tags, out=tmp_path / "plot.png")
    axes = axes_by_title(figures[0])
    assert {title: ax.get_ylabel() for title, ax in axes.items()} == {
        "entropy/rollout": "nats/token",
        "reward/mean": "reward",
        "val/accuracy": "fraction (avg@n)",
        "control/eps_high": "threshold",
        "objective/clip_high_fraction": "fraction",
    }
    values = list(axes["entropy/rollout"].lines[0].get_ydata())
    assert values == pytest.approx(ENTROPY)  # the values as logged: no smoothing


def test_overlay_draws_tags_in_one_subplot(tmp_path: Path, figures: list) -> None:
    run = write_run(tmp_path / "run")
    out = plot_run.main([str(run), "--overlay", "eps_low,eps_high", "--overlay", "rollout,update",
                         "--out", str(tmp_path / "overlay.png")])
    assert out == tmp_path / "overlay.png" and out.read_bytes()[:4] == b"\x89PNG"
    axes = axes_by_title(figures[0])
    assert sorted(axes) == ["control/eps_low, control/eps_high", "entropy/rollout, entropy/update"]
    bounds = axes["control/eps_low, control/eps_high"]
    assert [line.get_label() for line in bounds.lines] == ["control/eps_low", "control/eps_high"]
    assert list(bounds.lines[0].get_ydata()) == pytest.approx([0.2] * 4)
    assert list(bounds.lines[1].get_ydata()) == pytest.approx([0.28] * 4)
    assert bounds.get_ylabel() == "threshold"
    assert axes["entropy/rollout, entropy/update"].get_ylabel() == "nats/token"
    assert len({line.get_color() for line in bounds.lines}) == 2  # a colour per tag


def test_overlay_of_two_runs_labels_run_and_tag(tmp_path: Path, figures: list) -> None:
    a = write_run(tmp_path / "a")
    b = write_run(tmp_path / "b", eps_high=[0.28, 0.26, 0.24, 0.22])
    plot_run.plot_runs([a, b], [], out=tmp_path / "p.png", overlays=[["control/eps_high"]])
    (ax,) = axes_by_title(figures[0]).values()
    assert [line.get_label() for line in ax.lines] == ["a: control/eps_high", "b: control/eps_high"]
    assert len({line.get_linestyle() for line in ax.lines}) == 2  # a line style per run


def test_list_tags_prints_every_tag_with_steps_and_units(tmp_path: Path, capsys) -> None:
    run = write_run(tmp_path / "run")
    assert plot_run.main([str(run), "--list-tags"]) is None
    printed = capsys.readouterr().out
    assert f"{run}: 7 tags" in printed
    line = next(line for line in printed.splitlines() if "entropy/rollout" in line)
    assert "4 points, steps 0-3, last 0.63 nats/token" in line
    assert "val/accuracy" in printed and "objective/eps_high_in_force" not in printed  # as logged


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tags", "entropy/rolout"], "no run logged 'entropy/rolout'; did you mean entropy/rollout"),
        (["--overlay", "eps_lo,eps_high"], "no run logged 'eps_lo'; did you mean"),
        (["--tags", "reward/mean", "nope/nothing"], "no run logged 'nope/nothing'"),
    ],
)
def test_a_tag_no_run_logged_is_an_error(tmp_path: Path, capsys, args: list[str], message: str) -> None:
    run = write_run(tmp_path / "run")
    out = tmp_path / "x.png"
    with pytest.raises(SystemExit) as exit_info:
        plot_run.main([str(run), *args, "--out", str(out)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_default_tags_leave_out_what_no_run_logged(tmp_path: Path, figures: list, capsys) -> None:
    run = write_run(tmp_path / "run", validation=False)
    plot_run.main([str(run), "--out", str(tmp_path / "d.png")])
    assert "val/accuracy" not in axes_by_title(figures[0])
    assert "no run logged 'val/accuracy'; left out" in capsys.readouterr().err


def test_bounds_in_force_come_from_control_where_not_logged(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", eps_high=[0.28, 0.26, 0.24, 0.22])
    scalars = plot_run.read_scalars(run)
    assert scalars["objective/eps_high_in_force"] == scalars["control/eps_high"]
    assert [v for _, v in scalars["objective/eps_high_in_force"]] == pytest.approx([0.28, 0.26, 0.24, 0.22])
    assert "objective/eps_high_in_force" not in plot_run.read_scalars(run, derived=False)
