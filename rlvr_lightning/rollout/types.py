"""What a rollout engine returns: ``Rollout``, one step's samples laid out for training.

Each row of a ``Rollout`` is ``[left-padded prompt | right-padded response]``, so the response
of every row occupies the same last ``response_length`` columns and log-probs can be taken from
the last logits of one forward pass (see ``logprobs.response_logprobs``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class Rollout:
    """One step's samples; tensors are on the model's device, rows grouped prompt by prompt."""

    input_ids: torch.Tensor  # [N, P + T]
    attention_mask: torch.Tensor  # [N, P + T]
    response_mask: torch.Tensor  # [N, T] float: response tokens up to and including EOS
    response_lengths: torch.Tensor  # [N] long
    truncated: torch.Tensor  # [N] bool: no EOS within the generation budget
    completions: list[str]
    prompts: list[str]
    group_size: int
    # Filled in later by the collector and the updater (rewards, advantages, old log-probs ...).
    data: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def response_length(self) -> int:
        return self.response_mask.shape[1]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, rows: torch.Tensor) -> Rollout:
        """The rollout restricted to ``rows`` (a 1-D index tensor), trimming shared padding."""
        index = rows.tolist()
        return Rollout(
            input_ids=self.input_ids[rows],
            attention_mask=self.attention_mask[rows],
            response_mask=self.response_mask[rows],
            response_lengths=self.response_lengths[rows],
            truncated=self.truncated[rows],
            completions=[self.completions[i] for i in index],
            prompts=[self.prompts[i] for i in index],
            group_size=self.group_size,
            data={k: v[rows] for k, v in self.data.items()},
        )


def response_mask_from_ids(response_ids: torch.Tensor, eos_token_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of response tokens up to and including the first EOS, and the truncated flags."""
    is_eos = torch.zeros_like(response_ids, dtype=torch.bool)
    for eos in eos_token_ids:
        is_eos |= response_ids == eos
    # Number of EOS tokens strictly before each position: a token is valid while that is 0.
    eos_before = is_eos.long().cumsum(-1) - is_eos.long()
    mask = (eos_before == 0).float()
    truncated = ~is_eos.any(-1)
    return mask, truncated


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids




def merge_rollouts(parts: list[Rollout], pad_token_id: int) -> Rollout:
    """Concatenate rollouts of different prompt/response widths, re-padding to a common one."""
    if len(parts) == 1:
        return parts[0]
    prompt_width = max(p.input_ids.shape[1] - p.response_length for p in parts)
    response_width = max(p.response_length for p in parts)

    def pad(part: Rollout, tensor: torch.Tensor, value: float) -> torch.Tensor:
        prompt_length = part.input_ids.shape[1] - part.response_length
        left = prompt_width - prompt_length
        right = response_width - part.response_length
        return torch.nn.functional.pad(tensor, (left, right), value=value)

    def pad_response(part: Rollout, tensor: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(tensor, (0, response_width - part.response_length), value=0)

    data_keys = set(parts[0].data)
    data: dict[str, torch.Tensor] = {}
    for key in data_keys:
        values = [p.data[key] for p in parts]
        if values[0].dim() == 2:
            values = [pad_response(p, v) for p, v in zip(parts, values, strict=True)]
        data[key] = torch.cat(values)
    return Rollout(
        input_ids=torch.cat([pad(p, p.input_ids, pad_token_id) for p in parts]),
        attention_mask=torch.cat([pad(p, p.attention_mask, 0) for p in parts]),
        response_mask=torch.cat([pad_response(p, p.response_mask) for p in parts]),
        response_lengths=torch.cat([p.response_lengths for p in parts]),
        truncated=torch.cat([p.truncated for p in parts]),
        completions=[c for p in parts for c in p.completions],
        prompts=[q for p in parts for q in p.prompts],
        group_size=parts[0].group_size,
        data=data,
    )
