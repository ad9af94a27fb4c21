"""``rollout/engine=hf``: transformers' own ``model.generate`` on every row.

The engine for architectures the static engine does not cover on a GPU: with
``cache: static`` transformers preallocates the KV cache and compiles the decoding step.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlvr_lightning.rollout.engine import (
    COMPILE_MODES,
    RolloutEngine,
    SamplingParams,
    choice,
    register_engine,
)

CACHES = ("dynamic", "static")


@register_engine("hf")
class HFGenerateEngine(RolloutEngine):
    """``cache``: ``dynamic`` or ``static`` (preallocated for ``prompt + max_new_tokens``
    positions); ``compile_decoding`` (static cache): transformers compiles the decoding step on
    GPUs (``auto``), on every device (``true``) or never (``false``)."""

    encodes_each_row = True

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        pad_prompts_to_multiple_of: int | None = None,
        cache: str = "dynamic",
        compile_decoding: str = "auto",
    ) -> None:
        super().__init__(model, tokenizer, pad_prompts_to_multiple_of)
        self.cache = choice("cache", cache, CACHES)
        self.compile_decoding = choice("compile_decoding", compile_decoding, COMPILE_MODES)
        # The static cache decodes outside autocast (below): in the parameters' dtype.
        self.casts_weights_once = self.cache == "dynamic"

    def response_ids(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, group_size: int, sampling: SamplingParams,
        eos: list[int], lockstep: bool,
    ) -> torch.Tensor:
        if sampling.greedy:
            sample: dict[str, Any] = dict(do_sample=False)
        else:
            sample = dict(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
        options: dict[str, Any] = {}
        if self.cache == "static":
            options["cache_implementation"] = "static"
        if self.compile_decoding == "false":
            options["disable_compile"] = True
        elif self.compile_decoding == "true":
            from transformers import CompileConfig

            compile_config = CompileConfig()
            # transformers compiles only on accelerators unless told to compile on every device.
            compile_config._compile_all_devices = True
            options["compile_config"] = compile_config
        precision = contextlib.nullcontext()
        device_type = prompt_ids.device.type
        if self.cache == "static" and torch.is_autocast_enabled(device_type):
            # Under autocast the keys reach the cache in float32 (rotary embeddings promote them)
            # and the values in bfloat16, and transformers' static cache (5.17, for one) allocates
            # both in the keys' dtype, so the first value write fails. Decoding with the static
            # cache therefore runs in the parameters' dtype.
            precision = torch.autocast(device_type, enabled=False)
        with precision:
            output = self.model.generate(
                input_ids=prompt_ids,
                attention_mask=prompt_mask,
                max_new_tokens=sampling.max_new_tokens,
                eos_token_id=eos,
                pad_token_id=self.tokenizer.pad_token_id,
                min_new_tokens=sampling.max_new_tokens if sampling.ignore_eos else None,
                synced_gpus=lockstep,
                **sample,
                **options,
            )
        return output[:, prompt_ids.shape[1]:]
