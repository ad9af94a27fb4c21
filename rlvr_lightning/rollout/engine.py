"""The rollout engine protocol and its registry.

Every engine turns prompts into a ``Rollout`` the same way: the prompts are tokenised here
(left-padded, optionally truncated to ``max_prompt_tokens``), the engine draws the response
token ids (``RolloutEngine.response_ids``), and this module lays them out (EOS mask, padding
after EOS, trimmed width, decoded completions). An engine is one file that subclasses
``RolloutEngine``, registers itself with ``@register_engine("name")`` and has one YAML in
``conf/rollout/engine/`` whose keys are its constructor's options; ``rollout/engine=<name>``
selects it in ``train`` and ``evaluate`` alike. The module that owns an engine closes it.

An engine may also return the log-prob of each drawn token under the distribution it sampled
from (after temperature and top-p); the layout keeps them as ``rollout.data["rollout_logp"]``,
the rollout correction's mu (``objectives/correction.py``).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlvr_lightning.precision import weights_cast_once
from rlvr_lightning.rollout.types import Rollout, eos_token_ids, response_mask_from_ids

COMPILE_MODES = ("auto", "true", "false")  # compile the decoding step: on CUDA only | always | never


def choice(option: str, value: Any, choices: tuple[str, ...]) -> str:
    """``value`` as a lower-case string if it is one of ``choices``, else a ValueError naming
    ``rollout.engine.<option>``."""
    value = str(value).lower()
    if value not in choices:
        raise ValueError(f"rollout.engine.{option}={value!r} is unknown; use one of {', '.join(choices)}")
    return value


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one rollout: the same for every engine."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    greedy: bool = False  # argmax decoding (temperature and top_p ignored)
    ignore_eos: bool = False  # never sample EOS: every response is max_new_tokens long (benchmarks)
    max_prompt_tokens: int | None = None  # keep each prompt's last tokens up to this many
    # Return each drawn token's log-prob (after temperature and top-p) as rollout.data["rollout_logp"];
    # an engine that has them at no cost may return them anyway.
    logprobs: bool = False


class RolloutEngine:
    """Generates ``group_size`` completions per prompt with ``model``.

    Subclasses implement ``response_ids``; constructor keyword arguments are the engine's
    options (the keys of its YAML). Sampling draws from the global torch RNG, which the caller
    seeds per step, so a seeded step samples the same completions on every run.
    """

    name: str = ""
    # hf's generate takes every row of a group as its own prompt; the others encode each once.
    encodes_each_row: bool = False
    # Whether response_ids can return the drawn tokens' log-probs (SamplingParams.logprobs).
    returns_logprobs: bool = False
    # Whether decoding calls the model's own linear layers, whose weights are then cast once per
    # rollout under CPU bf16 autocast (trainer.precision=bf16-mixed; precision.weights_cast_once).
    casts_weights_once: bool = False

    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pad_prompts_to_multiple_of: int | None = None
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.pad_prompts_to_multiple_of = pad_prompts_to_multiple_of

    def response_ids(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, group_size: int, sampling: SamplingParams,
        eos: list[int], lockstep: bool,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """Response token ids ``[P * G, T]`` (rows grouped by prompt) for left-padded prompts, or
        the ids and the log-prob ``[P * G, T]`` of each drawn token under the distribution it was
        drawn from (after temperature and top-p; NaN where unknown). Engines with
        ``returns_logprobs`` return them when ``sampling.logprobs`` asks."""
        raise NotImplementedError

    def close(self) -> None:
        """Free what the engine holds (a vLLM instance, cached buffers); idempotent."""

    def __enter__(self) -> RolloutEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @torch.no_grad()
    def generate(
        self, prompts: list[str], group_size: int, sampling: SamplingParams, lockstep: bool = False
    ) -> Rollout:
        """``group_size`` completions for every prompt, rows grouped by prompt.

        ``lockstep``: FSDP ranks decode with sharded weights, so every rank must run the same
        number of forward passes (engines that cannot refuse it).
        """
        model, tokenizer = self.model, self.tokenizer
        device = next(model.parameters()).device
        repeated = [p for p in prompts for _ in range(group_size)]
        encoded = tokenizer(
            repeated if self.encodes_each_row else prompts,
            return_tensors="pt",
            padding=True,
            add_special_tokens=False,
            truncation=sampling.max_prompt_tokens is not None,
            max_length=sampling.max_prompt_tokens,
            pad_to_multiple_of=self.pad_prompts_to_multiple_of,
        ).to(device)
        was_training = model.training
        model.eval()
        eos = eos_token_ids(model, tokenizer)
        prompt_ids, prompt_mask = encoded["input_ids"], encoded["attention_mask"]
        with weights_cast_once(model) if self.casts_weights_once else nullcontext():
            drawn = self.response_ids(prompt_ids, prompt_mask, group_size, sampling, eos, lockstep)
        response_ids, response_logp = drawn if isinstance(drawn, tuple) else (drawn, None)
        if sampling.logprobs and response_logp is None:
            raise ValueError(
                f"rollout/engine={self.name or type(self).__name__} returned no log-probs of the sampled tokens, "
                "which the rollout correction needs: use correction=none, or rollout/engine=shared_prefix, "
                "static or vllm"
            )
        if not self.encodes_each_row:
            prompt_ids = prompt_ids.repeat_interleave(group_size, 0)
            prompt_mask = prompt_mask.repeat_interleave(group_size, 0)
        model.train(was_training)
        if response_ids.shape[1] == 0:  # nothing generated at all: keep one padded column
            response_ids = torch.full((len(repeated), 1), tokenizer.pad_token_id, device=device)
            response_logp = None if response_logp is None else torch.zeros(len(repeated), 1, device=device)
        response_mask, truncated = response_mask_from_ids(response_ids, eos)
        # Positions after EOS carry the pad token so decoding and the forward pass ignore them.
        response_ids = torch.where(response_mask.bool(), response_ids, tokenizer.pad_token_id)
        # Trim columns after the longest response (rows finished early in every group).
        width = max(int(response_mask.sum(-1).max()), 1)
        response_ids, response_mask = response_ids[:, :width], response_mask[:, :width]
        lengths = response_mask.sum(-1).long()
        completions = tokenizer.batch_decode(response_ids, skip_special_tokens=True)
        data: dict[str, torch.Tensor] = {}
        if response_logp is not None:  # masked like the other per-token data (0 after EOS)
            response_logp = response_logp[:, :width].to(device=device, dtype=torch.float32)
            data["rollout_logp"] = torch.where(response_mask.bool(), response_logp, torch.zeros_like(response_logp))
        return Rollout(
            input_ids=torch.cat([prompt_ids, response_ids], dim=1),
            attention_mask=torch.cat([prompt_mask, response_mask.long()], dim=1),
            response_mask=response_mask,
            response_lengths=lengths,
            truncated=truncated,
            completions=completions,
            prompts=repeated,
            group_size=group_size,
            data=data,
        )


ENGINES: dict[str, type[RolloutEngine]] = {}
EngineClass = TypeVar("EngineClass", bound=type[RolloutEngine])


def register_engine(name: str) -> Callable[[EngineClass], EngineClass]:
    """Class decorator: make an engine selectable as ``rollout/engine=<name>``."""

    def add(cls: EngineClass) -> EngineClass:
        if name in ENGINES:
            raise ValueError(f"rollout engine {name!r} is registered twice")
        cls.name = name
        ENGINES[name] = cls
        return cls

    return add


def engine_class(name: str) -> type[RolloutEngine]:
    """The engine registered as ``name``, or, for a dotted path (``my_package.my_module.MyEngine``
    or ``my_package.my_module:MyEngine``), the ``RolloutEngine`` subclass it names."""
    if name in ENGINES:
        return ENGINES[name]
    module_name, _, attribute = name.replace(":", ".").rpartition(".")
    cls = None
    if module_name:
        try:
            cls = getattr(importlib.import_module(module_name), attribute, None)
        except ImportError as error:
            raise ValueError(f"rollout.engine.name={name!r}: cannot import {module_name!r} ({error})") from error
    if not (isinstance(cls, type) and issubclass(cls, RolloutEngine)):
        raise ValueError(
            f"rollout.engine.name={name!r} is unknown; available: {', '.join(sorted(ENGINES))}, or the dotted "
            "path of a RolloutEngine subclass (my_package.my_module.MyEngine)"
        )
    return cls


def engine_options(name: str) -> dict[str, Any]:
    """The options an engine takes, with their Python defaults (its YAML states the same)."""
    options: dict[str, Any] = {}
    for cls in reversed(engine_class(name).__mro__):
        if issubclass(cls, RolloutEngine):
            for parameter in list(inspect.signature(cls.__init__).parameters.values())[3:]:
                options[parameter.name] = parameter.default
    return options


def check_engine_options(name: str, options: dict[str, Any]) -> None:
    """Raise ValueError for an unknown engine or an option it does not take."""
    allowed = engine_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"rollout.engine.{unknown[0]} is not an option of rollout/engine={name}; its options: "
            f"{', '.join(allowed) or 'none'}"
        )


def build_engine(
    options: dict[str, Any], model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> RolloutEngine:
    """The engine ``options["name"]`` (the ``rollout.engine`` block) for ``model``."""
    options = dict(options)
    name = options.pop("name", "shared_prefix")
    check_engine_options(name, options)
    return engine_class(name)(model, tokenizer, **options)


def generate_rollout(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    group_size: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    max_prompt_tokens: int | None = None,
    ignore_eos: bool = False,
    synced: bool = False,
    engine: str = "shared_prefix",
    logprobs: bool = False,
    **options: Any,
) -> Rollout:
    """One rollout with a fresh engine ``engine`` (options as in its YAML), closed afterwards.

    For scripts and tests; training and evaluation keep one engine for the whole run.
    ``logprobs``: ask for the drawn tokens' log-probs (``rollout.data["rollout_logp"]``).
    """
    sampling = SamplingParams(max_new_tokens, temperature, top_p, greedy, ignore_eos, max_prompt_tokens, logprobs)
    with build_engine({"name": engine, **options}, model, tokenizer) as instance:
        return instance.generate(prompts, group_size, sampling, lockstep=synced)
