"""A rollout engine of your own: top-k sampling through transformers' ``model.generate``.

One file: subclass ``RolloutEngine``, give the constructor your options (after ``model`` and
``tokenizer``), return the response token ids from ``response_ids``. Select it with its dotted
path, or put the file in ``rlvr_lightning/rollout/`` with ``@register_engine("top_k")`` and a
YAML in ``rlvr_lightning/conf/rollout/engine/`` to make it ``rollout/engine=top_k``:

    python -m rlvr_lightning.train model=tiny trainer.max_steps=2 \\
        rollout.engine.name=examples.top_k_engine.TopKEngine +rollout.engine.top_k=20
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlvr_lightning.rollout import RolloutEngine, SamplingParams


class TopKEngine(RolloutEngine):
    """Samples among the ``top_k`` most likely tokens at every step (greedy when asked)."""

    encodes_each_row = True  # model.generate takes each row of a group as its own prompt

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        pad_prompts_to_multiple_of: int | None = None,
        top_k: int = 50,
    ) -> None:
        super().__init__(model, tokenizer, pad_prompts_to_multiple_of)
        if top_k < 1:
            raise ValueError(f"rollout.engine.top_k={top_k} must be >= 1")
        self.top_k = top_k

    def response_ids(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, group_size: int, sampling: SamplingParams,
        eos: list[int], lockstep: bool,
    ) -> torch.Tensor:
        output = self.model.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            max_new_tokens=sampling.max_new_tokens,
            do_sample=not sampling.greedy,
            temperature=sampling.temperature if not sampling.greedy else None,
            top_k=self.top_k if not sampling.greedy else None,
            top_p=None,
            eos_token_id=eos,
            pad_token_id=self.tokenizer.pad_token_id,
            synced_gpus=lockstep,
        )
        return output[:, prompt_ids.shape[1]:]
