"""Token-budget packing: whole groups into micro-batches of at most a given number of tokens."""

from __future__ import annotations

import torch

from rlvr_lightning.rollout import Rollout


def micro_batches(groups: torch.Tensor, rollout: Rollout, budget_tokens: int, share_prompt: bool) -> list[torch.Tensor]:
    """Rows of ``groups`` in micro-batches of whole groups under the token budget.

    A group costs its prompt once plus ``G`` padded responses when prompts are shared
    (``rollout.share_prompt_forward``), else ``G`` padded rows; groups are taken longest first,
    and a micro-batch is closed when the next group would take it over ``budget_tokens``.
    """
    size = rollout.group_size
    prompt_lengths = (rollout.attention_mask.sum(-1) - rollout.response_lengths).view(-1, size)[:, 0].cpu()
    response_lengths = rollout.response_lengths.view(-1, size).max(-1).values.cpu()
    groups = groups.cpu()
    order = groups[torch.argsort((prompt_lengths + response_lengths)[groups], descending=True)]
    micro, current = [], []
    longest_prompt = longest_response = 0
    for group in order.tolist():
        prompt = max(longest_prompt, int(prompt_lengths[group]))
        response = max(longest_response, int(response_lengths[group]))
        count = len(current) + 1
        cost = count * prompt + count * size * response if share_prompt else count * size * (prompt + response)
        if current and cost > budget_tokens:
            micro.append(current)
            current, prompt, response = [], int(prompt_lengths[group]), int(response_lengths[group])
        current.append(group)
        longest_prompt, longest_response = prompt, response
    if current:
        micro.append(current)
    return [(torch.tensor(chunk).unsqueeze(-1) * size + torch.arange(size)).view(-1) for chunk in micro]
