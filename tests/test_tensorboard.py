"""What a run writes for TensorBoard besides its scalars, and which scalars: the custom-scalars
layout, histograms, the HParams summary, sample groups (text tab and samples.jsonl), the controls
logged under control/, reward spread and data health, and scalars on disk after every step."""

from __future__ import annotations

import json
import re
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from rlvr_lightning.control import ControlState
from rlvr_lightning.dashboard import HPARAMS_METRICS, LAYOUT, UsedControls, escape_markdown
from rlvr_lightning.train import build, run
from tests.conftest import TINY_OVERRIDES, compose_config, read_scalars

STEPS = 4
# 4 rollouts, samples and histograms every 2 and at the last one (steps 0, 2, 3); coin-flip
# rewards so that groups have mixed rewards (non-zero advantages, non-empty token regions).
OVERRIDES = [
    f"trainer.max_steps={STEPS}",
    f"trainer.val_check_interval={STEPS}",
    "logging.sample_every_n_steps=2",
    "logging.histogram_every_n_steps=2",
    "logging.num_groups=2",
    "reward.random_reward_probability=0.5",
]
LOGGED_STEPS = [0, 2, 3]


def events(run_dir: Path) -> list:
    """(file, EventAccumulator) of every events file of the run, loaded."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = []
    for path in sorted(Path(run_dir).rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(path), size_guidance={"tensors": 0, "histograms": 0, "scalars": 0})
        accumulator.Reload()
        out.append(accumulator)
    return out


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("tensorboard") / "run"
    run(compose_config(TINY_OVERRIDES + OVERRIDES), run_dir=run_dir)
    return run_dir


@pytest.fixture(scope="module")
def scalars(tiny_run: Path) -> dict:
    return read_scalars(tiny_run)


def test_custom_scalars_layout_is_written_and_matches_the_runs_tags(tiny_run: Path, scalars: dict) -> None:
    from tensorboard.plugins.custom_scalar import layout_pb2

    contents = [acc.Tensors("custom_scalars__config__") for acc in events(tiny_run)
                if "custom_scalars__config__" in acc.Tags()["tensors"]]
    assert len(contents) == 1, "one layout per run"
    layout = layout_pb2.Layout.FromString(contents[0][0].tensor_proto.string_val[0])
    assert [category.title for category in layout.category] == list(LAYOUT)
    first = layout.category[0]
    titles = [chart.title for chart in first.chart]
    assert titles[0].startswith("entropy (nats/token)")
    assert any(title.startswith("thresholds: set") for title in titles)
    for chart in first.chart:
        patterns = [re.compile(p) for p in chart.multiline.tag]
        matched = sorted(tag for tag in scalars if any(p.search(tag) for p in patterns))
        if chart.title.startswith("entropy (nats"):
            assert matched == ["entropy/rollout", "entropy/update"]
        if chart.title.startswith("thresholds"):
            assert matched == ["control/eps_high", "control/eps_low"]  # GRPO: plain bounds, nothing else
        if chart.title.startswith("clip fractions"):
            assert matched == ["objective/clip_high_fraction", "objective/clip_low_fraction",
                               "objective/dual_clip_fraction"]
        if chart.title.startswith("reward and held-out"):
            assert matched == ["reward/accuracy", "reward/mean", "val/accuracy"]
        if chart.title.startswith("entropy by token region"):
            assert matched and all(re.fullmatch(r"entropy/region_(pa|na)_(hp|lp)", tag) for tag in matched)


def test_histograms_of_entropy_ratio_and_advantage(tiny_run: Path) -> None:
    histograms = {}
    for acc in events(tiny_run):
        for tag in acc.Tags()["histograms"]:
            histograms[tag] = acc.Histograms(tag)
    assert sorted(histograms) == ["hist/advantage", "hist/entropy", "hist/ratio"]
    for tag, points in histograms.items():
        assert [point.step for point in points] == LOGGED_STEPS, tag
    for entropy, ratio, advantage in zip(*(histograms[t] for t in ("hist/entropy", "hist/ratio", "hist/advantage")),
                                         strict=True):
        # One value per loss token (one epoch: each token is updated once), one per completion.
        assert entropy.histogram_value.num == ratio.histogram_value.num > 0
        assert advantage.histogram_value.num == 8  # 2 prompts x 4 samples
        assert 0.0 < entropy.histogram_value.min <= entropy.histogram_value.max < 4.7  # ln(102) nats at most
        assert 0.5 < ratio.histogram_value.min <= ratio.histogram_value.max < 2.0


def test_hparams_summary_names_key_choices_and_final_metrics(tiny_run: Path, scalars: dict) -> None:
    from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

    data = {}
    for acc in events(tiny_run):
        try:
            contents = acc.PluginTagToContent("hparams")
        except KeyError:  # the events file of the validation before training
            continue
        for tag, content in contents.items():
            data[tag] = plugin_data_pb2.HParamsPluginData.FromString(content)
    assert sorted(data) == ["_hparams_/experiment", "_hparams_/session_end_info", "_hparams_/session_start_info"]
    experiment = data["_hparams_/experiment"].experiment
    names = [info.name for info in experiment.hparam_infos]
    for name in ("objective", "scheduler", "model", "optim.lr", "control.eps_low", "control.eps_high",
                 "control.dual_clip", "rollout.group_size", "seed", "updates_per_rollout"):
        assert name in names
    assert [info.name.tag for info in experiment.metric_infos] == list(HPARAMS_METRICS)
    start = data["_hparams_/session_start_info"].session_start_info.hparams
    assert start["objective"].string_value == "grpo" and start["scheduler"].string_value == "constant"
    assert start["model"].string_value == "tiny" and start["rollout.group_size"].number_value == 4
    assert start["control.eps_high"].number_value == pytest.approx(0.2)
    assert start["updates_per_rollout"].number_value == 2
    assert "control.dual_clip" not in start  # None: off, declared but without a value
    end = data["_hparams_/session_end_info"].session_end_info
    assert end.status == api_pb2.Status.Value("STATUS_SUCCESS")
    # The tab shows each metric's last value: every one is logged at the run's end.
    for tag in HPARAMS_METRICS:
        assert scalars[tag][-1][0] == (STEPS if tag.startswith("val/") else STEPS - 1), tag


def test_controls_logged_are_the_ones_grpo_uses(scalars: dict) -> None:
    controls = sorted(tag for tag in scalars if tag.startswith("control/"))
    assert controls == ["control/eps_high", "control/eps_low"]
    # The bounds are plain: their in-force means would repeat control/eps_* with float32 noise.
    assert not [tag for tag in scalars if tag.endswith("_in_force")]
    # A threshold that does not move is one value at every step: float32(0.2), no rounding noise.
    assert {value for _, value in scalars["control/eps_high"]} == {float(torch.tensor(0.2))}


def test_reward_spread_and_data_health(tiny_run: Path, scalars: dict) -> None:
    samples = [json.loads(line) for line in (tiny_run / "tensorboard" / "samples.jsonl").open()]
    for step in LOGGED_STEPS:
        rows = [row for row in samples if row["step"] == step]
        assert len(rows) == 8  # both groups: every completion of the step
        rewards = torch.tensor([row["reward"] for row in rows])
        assert dict(scalars["reward/std"])[step] == pytest.approx(float(rewards.std(correction=0)), abs=1e-6)
        groups = rewards.view(2, 4)
        constant = float((groups == groups[:, :1]).all(-1).float().mean())
        assert dict(scalars["reward/zero_variance_group_fraction"])[step] == constant
    for step in range(STEPS):
        fractions = {tag: dict(points)[step] for tag, points in scalars.items()
                     if re.fullmatch(r"entropy/region_\w+_fraction", tag)}
        assert len(fractions) == 5 and sum(fractions.values()) == pytest.approx(1.0, abs=1e-6)
        for tag, fraction in fractions.items():
            entropy = scalars.get(tag.removesuffix("_fraction"), [])
            if tag != "entropy/region_none_fraction":
                # A region's entropy is logged exactly at the steps it has tokens (never a false 0).
                assert (step in dict(entropy)) == (fraction > 0), (tag, step, fraction)


def test_samples_are_whole_groups_with_answer_advantage_length_entropy(tiny_run: Path) -> None:
    samples = [json.loads(line) for line in (tiny_run / "tensorboard" / "samples.jsonl").open()]
    assert sorted({row["step"] for row in samples}) == LOGGED_STEPS  # every 2 steps and the last
    for row in samples:
        assert set(row) == {"step", "group", "question", "answer", "completion", "reward", "correct",
                            "extracted", "advantage", "length", "truncated", "entropy"}
        a, b = map(int, re.match(r"What is (\d+) \+ (\d+)\?", row["question"]).groups())
        assert row["answer"] == str(a + b)  # the reference answer of that question
        assert "<|im_start|>" not in row["question"] and row["question"].endswith("\\boxed{}.")
        assert 1 <= row["length"] <= 12 and row["entropy"] > 0
    for step in LOGGED_STEPS:
        for group in (0, 1):
            rows = [row for row in samples if row["step"] == step and row["group"] == group]
            assert len(rows) == 4 and len({row["question"] for row in rows}) == 1
            rewards = torch.tensor([row["reward"] for row in rows])
            advantages = torch.tensor([row["advantage"] for row in rows])
            # GRPO: the group's rewards centred (and scaled), so the signs follow reward - mean.
            assert torch.equal(torch.sign(advantages), torch.sign(rewards - rewards.mean()))


def test_text_tab_shows_each_group_once_with_its_table(tiny_run: Path) -> None:
    texts = {}
    for acc in events(tiny_run):
        if "samples/completions/text_summary" in acc.Tags()["tensors"]:
            for event in acc.Tensors("samples/completions/text_summary"):
                texts[event.step] = event.tensor_proto.string_val[0].decode()
    assert sorted(texts) == LOGGED_STEPS
    samples = [json.loads(line) for line in (tiny_run / "tensorboard" / "samples.jsonl").open()]
    text = texts[0]
    assert text.count("reference answer") == 2 and text.count("**prompt**") == 2
    assert "| # | reward | advantage | correct | answer read | tokens | entropy | completion |" in text
    for row in (row for row in samples if row["step"] == 0):
        assert escape_markdown(row["completion"]) in text
    assert "<|im_start|>" not in text


def test_scalars_are_on_disk_after_every_step(tmp_path: Path, monkeypatch) -> None:
    """Read the events files from disk at the end of each step, while the writer is open.

    TensorBoard's own file layer appends each record to a local file at once; TensorFlow's, and
    any remote file system, keep records in a buffer until a flush (every 120 s by default).
    Without append the same layer buffers like them, so only an explicit flush puts a step on disk.
    """
    from tensorboard.compat.tensorflow_stub.io.gfile import LocalFileSystem

    monkeypatch.delattr(LocalFileSystem, "append")
    seen: list[list[int]] = []

    class ReadFromDisk(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            seen.append([step for step, _ in read_scalars(tmp_path / "run").get("entropy/rollout", [])])

    cfg = compose_config(TINY_OVERRIDES + ["trainer.max_steps=3", "validate_before_training=false"])
    trainer, module, datamodule = build(cfg, tmp_path / "run")
    trainer.callbacks.append(ReadFromDisk())
    trainer.fit(module, datamodule=datamodule)
    assert seen == [[0], [0, 1], [0, 1, 2]]


def test_run_folder_names_carry_objective_and_schedule() -> None:
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from rlvr_lightning.train import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            config_name="config", overrides=["objective=erc_dapo", "scheduler=target_entropy"], return_hydra_config=True
        )
    cfg.hydra.job.num = 3
    HydraConfig.instance().set_config(cfg)  # what a Hydra job sees (${hydra:runtime.choices...})
    try:
        assert re.fullmatch(r"outputs/runs/[\d_-]+_erc_dapo_target_entropy", cfg.hydra.run.dir)
        assert cfg.hydra.sweep.subdir == "3_erc_dapo_target_entropy"
    finally:
        HydraConfig.instance().cfg = None  # later tests run outside a Hydra job


def test_used_controls_rules() -> None:
    control = ControlState(beta1=0.5)
    used = UsedControls(control)
    # Read by the update: the clip bounds always, a switch only when on (beta1 0.5; weights at 0).
    used.note(control, read={"eps_low", "eps_high", "beta1", "high_prob_weight", "dual_clip"}, written=set())
    assert used.logged == {"eps_low", "eps_high", "beta1"}
    # Written by a schedule (even to its own value), or moved by anything: logged from then on.
    used.note(control, read=set(), written={"low_prob_weight"})
    control.entropy_coef = 0.01
    used.note(control, read=set(), written=set())
    assert used.logged == {"eps_low", "eps_high", "beta1", "low_prob_weight", "entropy_coef"}
    metrics = {
        "control/eps_low": 0.2, "control/high_prob_weight": 0.0, "control/schedule_phase": 1.0,
        "objective/eps_low_in_force": 0.19, "objective/eps_high_in_force": 0.2,
        "objective/beta1_in_force": 0.5, "objective/beta2_in_force": 1.0, "objective/dppo_delta_low_in_force": 0.1,
    }
    # eps_low is shaped per token (its weight is in use): its mean in force says something; eps_high
    # and beta1 would repeat control/ tags; beta2 is not a logged control (GPPO's fixed 1).
    assert used.filter(metrics) == {
        "control/eps_low": 0.2, "control/schedule_phase": 1.0, "objective/eps_low_in_force": 0.19,
        "objective/beta2_in_force": 1.0, "objective/dppo_delta_low_in_force": 0.1,
    }
    restored = UsedControls(ControlState())
    restored.load_state_dict(used.state_dict())
    assert restored.logged == used.logged


def test_control_state_records_reads_and_writes() -> None:
    control = ControlState()
    with control.recording() as outer:
        control.clip_bounds(torch.zeros(3))
        with control.recording() as inner:
            control.beta2 = 1.0
    assert outer.read == {"eps_low", "eps_high", "high_prob_weight", "low_prob_weight"}
    assert outer.written == inner.written == {"beta2"} and not inner.read
    control.eps_low = 0.3  # outside a block: nothing recorded
    assert outer.written == {"beta2"}
