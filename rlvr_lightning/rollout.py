"""Rollout: sample ``group_size`` completions per prompt and lay them out for training.

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
    # Filled in later by the module (rewards, advantages, old log-probs ...).
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


@torch.no_grad()
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
) -> Rollout:
    """Generate ``group_size`` completions for every prompt (rows grouped by prompt).

    Sampling uses the global torch RNG; the caller seeds it per step for reproducibility.
    """
    device = next(model.parameters()).device
    repeated = [p for p in prompts for _ in range(group_size)]
    encoded = tokenizer(
        repeated,
        return_tensors="pt",
        padding=True,
        add_special_tokens=False,
        truncation=max_prompt_tokens is not None,
        max_length=max_prompt_tokens,
    ).to(device)
    was_training = model.training
    model.eval()
    eos = eos_token_ids(model, tokenizer)
    sampling = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    output = model.generate(
        **encoded,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
        **sampling,
    )
    model.train(was_training)
    prompt_length = encoded["input_ids"].shape[1]
    response_ids = output[:, prompt_length:]
    if response_ids.shape[1] == 0:  # nothing generated at all: keep one padded column
        response_ids = torch.full((len(repeated), 1), tokenizer.pad_token_id, device=device)
    response_mask, truncated = response_mask_from_ids(response_ids, eos)
    # Positions after EOS carry the pad token so decoding and the forward pass ignore them.
    response_ids = torch.where(response_mask.bool(), response_ids, tokenizer.pad_token_id)
    lengths = response_mask.sum(-1).long()
    completions = tokenizer.batch_decode(response_ids, skip_special_tokens=True)
    return Rollout(
        input_ids=torch.cat([encoded["input_ids"], response_ids], dim=1),
        attention_mask=torch.cat([encoded["attention_mask"], response_mask.long()], dim=1),
        response_mask=response_mask,
        response_lengths=lengths,
        truncated=truncated,
        completions=completions,
        prompts=repeated,
        group_size=group_size,
    )
