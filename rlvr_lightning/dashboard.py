"""What a run shows in TensorBoard beyond its scalars: the controls it uses, a custom-scalars
layout, an HParams summary, histograms and readable sample tables.

- ``UsedControls``: which ``ControlState`` fields are logged under ``control/`` (the ones the
  objective and the schedule use; every field's starting value goes to the HParams summary once)
  and which ``objective/*_in_force`` tags would only repeat a ``control/`` tag.
- ``LAYOUT``: the custom-scalars layout written into every run (the same for every run, so a
  sweep under one ``--logdir`` merges into one set of charts).
- ``hparams_summaries``: the HParams plugin's experiment, session-start and session-end protos
  (a "session" is that plugin's name for one run).
- ``samples_markdown``: a step's sampled groups as markdown tables for the text tab.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from rlvr_lightning.control import ControlState

# The clip bounds are logged whenever the update reads them, even at their default values: they
# are the thresholds a reader looks for first. Every other field is logged only when it is on.
PRIMARY_CONTROLS = ("eps_low", "eps_high")
# A bound that probability-dependent shaping (docs/algorithms.md 4.2) can vary per token, and the
# weight that turns the shaping on: without it, ``objective/<bound>_in_force`` is
# ``control/<bound>`` again (a float32 token mean of a constant), so it is not logged.
PER_TOKEN_WEIGHTS = {"eps_low": "low_prob_weight", "eps_high": "high_prob_weight"}
_IN_FORCE = re.compile(r"objective/(\w+)_in_force")


def _field_defaults() -> dict[str, Any]:
    return {f.name: f.default for f in fields(ControlState) if f.name != "info" and f.default is not MISSING}


class UsedControls:
    """The ``ControlState`` fields a run logs under ``control/``.

    A field is logged from the first step at which

    - a schedule wrote it (even the value it had), or its value differs from the one the run
      started with (something moved it), or
    - the policy update read it and it is on: it is a clip bound (``PRIMARY_CONTROLS``), or its
      value differs from the ``ControlState`` default (the defaults are the "off" values:
      ``dual_clip=None``, ``beta1=0``, ``entropy_coef=0``, ``entropy_quantile=1``, ...),

    and at every step after it (the set only grows, and is saved in checkpoints, so a resumed run
    logs the same tags). The schedule's own state (``ControlState.info``) is always logged. A
    field never logged keeps its starting value all run: it is in the HParams summary.
    """

    def __init__(self, control: ControlState) -> None:
        self.defaults = _field_defaults()
        self.initial = {name: getattr(control, name) for name in self.defaults}
        self.logged: set[str] = set()

    def note(self, control: ControlState, read: set[str], written: set[str]) -> None:
        """Add the fields this step used: ``read`` by the update, ``written`` by the schedules."""
        for name in self.defaults:
            value = getattr(control, name)
            moved = name in written or value != self.initial[name]
            on = name in PRIMARY_CONTROLS or value != self.defaults[name]
            if moved or (name in read and on):
                self.logged.add(name)

    def shaped_per_token(self, bound: str) -> bool:
        weight = PER_TOKEN_WEIGHTS.get(bound)
        return weight is not None and weight in self.logged

    def filter(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """``metrics`` without the ``control/<field>`` tags of unused fields and without the
        ``objective/<field>_in_force`` tags that repeat a logged ``control/<field>``."""
        out = {}
        for tag, value in metrics.items():
            prefix, _, name = tag.partition("/")
            if prefix == "control" and name in self.defaults and name not in self.logged:
                continue
            match = _IN_FORCE.fullmatch(tag)
            if match and match.group(1) in self.logged and not self.shaped_per_token(match.group(1)):
                continue
            out[tag] = value
        return out

    def state_dict(self) -> list[str]:
        return sorted(self.logged)

    def load_state_dict(self, state: Sequence[str]) -> None:
        self.logged = set(state) & set(self.defaults)


# ----------------------------------------------------------------------------- custom scalars

# Each chart overlays the tags its regular expressions match (TensorBoard's multiline charts); a
# tag a run does not log is simply absent, so one layout serves every objective and schedule.
THRESHOLDS = r"(eps_low|eps_high|beta1|beta2|erc_beta_low|erc_beta_high|entropy_quantile|entropy_coef)"
LAYOUT: dict[str, dict[str, list[Any]]] = {
    "entropy story": {
        "entropy (nats/token): rollout, update, controller target": [
            "Multiline", [r"^entropy/(rollout|update)$", r"^control/target_entropy$"],
        ],
        "thresholds: set (control/) vs in force (objective/*_in_force)": [
            "Multiline", [rf"^control/{THRESHOLDS}$", r"^objective/\w+_in_force$"],
        ],
        "clip fractions by side (fraction of loss tokens)": [
            "Multiline", [r"^objective/\w*clip\w*_fraction$"],
        ],
        "reward and held-out accuracy": [
            "Multiline", [r"^reward/(mean|accuracy)$", r"^val/accuracy$"],
        ],
        "entropy by token region (nats/token; absent when a region is empty)": [
            "Multiline", [r"^entropy/region_(pa|na)_(hp|lp)$"],
        ],
    },
    "data health": {
        "reward spread (std of the step's rewards)": ["Multiline", [r"^reward/std$"]],
        "zero-variance groups, token regions, truncation (fractions)": [
            "Multiline",
            [r"^reward/zero_variance_group_fraction$", r"^entropy/region_\w+_fraction$",
             r"^length/truncated_fraction$"],
        ],
        "held-out pass@k and maj@k": ["Multiline", [r"^val/(pass|maj)@\d+$"]],
        "response length (tokens)": ["Multiline", [r"^length/response_(mean|max)$", r"^val/response_length$"]],
    },
}


# ----------------------------------------------------------------------------- hparams

# Scalars the HParams tab shows per run: TensorBoard takes each one's last logged value.
HPARAMS_METRICS = ("entropy/rollout", "entropy/update", "reward/mean", "reward/accuracy", "val/accuracy")


def control_hparams(control: ControlState) -> dict[str, float | bool | None]:
    """Every control field's value as ``control.<field>`` (None: off)."""
    out: dict[str, float | bool | None] = {}
    for name in _field_defaults():
        value = getattr(control, name)
        out[f"control.{name}"] = value if value is None or isinstance(value, bool) else float(value)
    return out


def _choice(group: str) -> str | None:
    """The option Hydra picked for config group ``group`` (None outside a Hydra job)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    choice = HydraConfig.get().runtime.choices.get(group)
    return None if choice is None else str(choice)


def scheduler_name(cfg: Any) -> str:
    """The ``scheduler=`` option of a composed config: Hydra's choice, else the file of
    ``conf/scheduler`` with the same ``_target_``, else the class name."""
    from omegaconf import OmegaConf

    target = str(OmegaConf.select(cfg, "scheduler._target_", default=""))
    choice = _choice("scheduler")
    if choice is not None:
        return choice
    folder = Path(__file__).resolve().parent / "conf" / "scheduler"
    for path in sorted(folder.glob("*.yaml")):
        if str(OmegaConf.load(path).get("_target_", "")) == target:
            return path.stem
    return target.rsplit(".", 1)[-1] or "none"


def run_hparams(cfg: Any, control: ControlState) -> dict[str, str | float | bool | None]:
    """The HParams tab's columns for a run: the config's key choices and every control's
    starting value (the controls a run does not log under ``control/`` are only here)."""
    from omegaconf import OmegaConf

    def get(key: str, default: Any = None) -> Any:
        return OmegaConf.select(cfg, key, default=default)

    def number(key: str, default: float | None = None) -> float | None:
        value = get(key, default)
        return None if value is None else float(value)

    model = get("model.name_or_path") or _choice("model") or {"smollm2_gguf": "smollm2_135m"}.get(
        str(get("model.source")), str(get("model.source"))
    )
    hparams: dict[str, str | float | bool | None] = {
        "objective": _choice("objective") or str(get("objective.name")),
        "scheduler": scheduler_name(cfg),
        "model": str(model),
        "advantage": str(get("advantage.name", "grpo")),
        "sampling.dynamic": bool(get("sampling.dynamic", False)),
        "optim.lr": number("optim.lr"),
        "optim.lr_schedule": str(get("optim.lr_schedule", "constant")),
        "rollout.prompts_per_step": number("rollout.prompts_per_step"),
        "rollout.group_size": number("rollout.group_size"),
        "rollout.max_new_tokens": number("rollout.max_new_tokens"),
        "rollout.temperature": number("rollout.temperature"),
        "updates_per_rollout": float(get("rollout.epochs", 1) * get("rollout.mini_batches", 1)),
        "trainer.max_steps": number("trainer.max_steps"),
        "objective.kl_coef": number("objective.kl_coef", 0.0),
        "seed": number("seed", 0),
    }
    hparams.update(control_hparams(control))
    return hparams


def _hparam_type(name: str, value: Any) -> str:
    if isinstance(value, bool):
        return "DATA_TYPE_BOOL"
    if isinstance(value, (int, float)):
        return "DATA_TYPE_FLOAT64"
    if value is None and name.startswith("control."):
        # The type the field has when set, so that every run declares the same experiment.
        annotation = str(next(f.type for f in fields(ControlState) if f.name == name.split(".", 1)[1]))
        return "DATA_TYPE_BOOL" if "bool" in annotation else "DATA_TYPE_FLOAT64"
    return "DATA_TYPE_FLOAT64" if value is None else "DATA_TYPE_STRING"  # None: an unset number


def hparams_summaries(
    hparams: Mapping[str, str | float | int | bool | None], metrics: Sequence[str] = HPARAMS_METRICS
) -> tuple[Any, Any]:
    """The HParams plugin's experiment and session-start summaries (``Summary`` protos for
    ``FileWriter.add_summary``). Every key is declared in the experiment, with the same type in
    every run, so the runs of a sweep share one table; None values are left out of the session."""
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    experiment = api_pb2.Experiment(
        hparam_infos=[
            api_pb2.HParamInfo(name=name, type=api_pb2.DataType.Value(_hparam_type(name, value)))
            for name, value in hparams.items()
        ],
        metric_infos=[api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag)) for tag in metrics],
    )
    start = plugin_data_pb2.SessionStartInfo(start_time_secs=time.time())
    for name, value in hparams.items():
        if isinstance(value, bool):
            start.hparams[name].bool_value = value
        elif isinstance(value, (int, float)):
            start.hparams[name].number_value = float(value)
        elif value is not None:
            start.hparams[name].string_value = str(value)

    def summary(tag: str, **data: Any) -> Summary:
        content = plugin_data_pb2.HParamsPluginData(version=metadata.PLUGIN_DATA_VERSION, **data)
        plugin = SummaryMetadata.PluginData(plugin_name=metadata.PLUGIN_NAME, content=content.SerializeToString())
        return Summary(value=[Summary.Value(tag=tag, metadata=SummaryMetadata(plugin_data=plugin))])

    return (
        summary(metadata.EXPERIMENT_TAG, experiment=experiment),
        summary(metadata.SESSION_START_INFO_TAG, session_start_info=start),
    )


def session_end_summary(success: bool) -> Any:
    """The HParams session-end summary: the run finished (``STATUS_SUCCESS``) or failed."""
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    end = plugin_data_pb2.SessionEndInfo(
        status=api_pb2.Status.Value("STATUS_SUCCESS" if success else "STATUS_FAILURE"), end_time_secs=time.time()
    )
    content = plugin_data_pb2.HParamsPluginData(version=metadata.PLUGIN_DATA_VERSION, session_end_info=end)
    plugin = SummaryMetadata.PluginData(plugin_name=metadata.PLUGIN_NAME, content=content.SerializeToString())
    return Summary(value=[Summary.Value(tag=metadata.SESSION_END_INFO_TAG, metadata=SummaryMetadata(plugin_data=plugin))])


# ----------------------------------------------------------------------------- samples


_MARKDOWN_SPECIAL = frozenset("&<>\"'\\`*_{}[]()#+-.!|~")


def escape_markdown(text: str) -> str:
    """``text`` as literal characters in TensorBoard's markdown (table cells included): HTML and
    markdown punctuation become character references, line breaks a visible ``⏎``."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    escaped = "".join(f"&#{ord(c)};" if c in _MARKDOWN_SPECIAL else c for c in text)
    return escaped.replace("\n", " ⏎ ")


SAMPLE_COLUMNS = ("#", "reward", "advantage", "correct", "answer read", "tokens", "entropy", "completion")


def samples_markdown(step: int, groups: Sequence[Mapping[str, Any]], answer_mode: str) -> str:
    """One markdown block per group: the prompt once, the reference answer, then a table row per
    completion (reward, advantage, verdict, the answer the verifier read, length, mean entropy)."""
    blocks = []
    for group in groups:
        rows = group["completions"]
        lines = [
            f"#### step {step}, group {group['group']}: reference answer "
            f"**{escape_markdown(str(group['answer']))}**",
            "",
            f"**prompt** (chat template omitted): {escape_markdown(group['question'])}",
            "",
            "| " + " | ".join(SAMPLE_COLUMNS) + " |",
            "|" + "---|" * len(SAMPLE_COLUMNS),
        ]
        for number, row in enumerate(rows, start=1):
            extracted = "none" if row["extracted"] is None else escape_markdown(str(row["extracted"]))
            length = f"{row['length']}{' (cut)' if row['truncated'] else ''}"
            cells = [
                str(number),
                f"{row['reward']:.3g}",
                f"{row['advantage']:+.3f}",
                "yes" if row["correct"] else "no",
                extracted,
                length,
                f"{row['entropy']:.3f}",
                escape_markdown(row["completion"]) or "(empty)",
            ]
            lines.append("| " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines))
    blocks.append(
        f"*answer read*: what the verifier read (reward.answer_mode={answer_mode}); *entropy*: the "
        "completion's mean token entropy under pi_old (nats); *(cut)*: no EOS within max_new_tokens"
    )
    return "\n\n".join(blocks)
