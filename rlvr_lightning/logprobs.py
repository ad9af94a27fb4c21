"""Per-token log-probabilities and entropies of response tokens, computed in chunks.

The forward pass keeps logits only for the positions that predict response tokens
(``logits_to_keep``); log-probs and full-vocabulary entropies (docs/algorithms.md section 1) are then
computed a few rows at a time in float32, so no ``[batch, seq, vocab]`` float32 tensor lives
longer than one chunk.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn


def logprobs_and_entropy_from_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = True,
    chunk_rows: int = 4,
    entropy_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``log softmax(z/T)[target]`` and ``H = logsumexp(z) - sum softmax(z) * z`` per position.

    ``logits`` is ``[batch, length, vocab]`` in any dtype; work happens in float32 chunks of
    ``chunk_rows`` rows. Gradients flow from the log-probs to ``logits`` when it requires grad;
    from the entropy only when ``entropy_grad`` (an entropy bonus), else it is detached.
    """
    logp_chunks, entropy_chunks = [], []
    for start in range(0, logits.shape[0], chunk_rows):
        z = logits[start : start + chunk_rows].float()
        if temperature != 1.0:
            z = z / temperature
        log_norm = torch.logsumexp(z, dim=-1)
        target_logits = z.gather(-1, targets[start : start + chunk_rows].unsqueeze(-1)).squeeze(-1)
        logp_chunks.append(target_logits - log_norm)
        if with_entropy:
            if entropy_grad:
                probs = torch.softmax(z, dim=-1)
                entropy_chunks.append(log_norm - (probs * z).sum(-1))
            else:
                with torch.no_grad():
                    # softmax from the log-normaliser already at hand (one exp pass, in place),
                    # and sum_v p_v z_v as a batched dot product (no [rows, length, V] product).
                    probs = (z - log_norm.unsqueeze(-1)).exp_()
                    expected = (probs.unsqueeze(-2) @ z.unsqueeze(-1)).view(log_norm.shape)
                    entropy_chunks.append(log_norm.detach() - expected)
                    del probs
        del z
    logp = torch.cat(logp_chunks)
    entropy = torch.cat(entropy_chunks) if with_entropy else None
    return logp, entropy


def response_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_length: int,
    temperature: float = 1.0,
    with_entropy: bool = True,
    chunk_rows: int = 4,
    entropy_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (and entropies) of the last ``response_length`` tokens of each row.

    Rows are ``[left-padded prompt | right-padded response]``; position ``t`` of the response is
    predicted by the logits one position earlier.
    """
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    outputs = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        logits_to_keep=response_length + 1,
        use_cache=False,
    )
    logits = outputs.logits[:, :-1]
    targets = input_ids[:, -response_length:]
    return logprobs_and_entropy_from_logits(
        logits, targets, temperature, with_entropy, chunk_rows, entropy_grad
    )


def cache_argument(model: nn.Module) -> str:
    """Name of the KV-cache argument of ``model.forward``: ``cache`` in transformers 5,
    ``past_key_values`` in 4.x."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def recomputes_activations(model: nn.Module) -> bool:
    """Whether a backward through ``model`` recomputes layer activations: Hugging Face gradient
    checkpointing (``model.gradient_checkpointing``) or torch's checkpoint wrappers (FSDP's
    ``activation_checkpointing``). Those layers cannot fill a KV cache under autograd (HF turns
    the cache off; a recomputed layer would append to it twice), so a gradient pass through them
    encodes each row's prompt itself instead of sharing it (``shared_prefix_response_logprobs``)."""
    return any(
        getattr(sub, "gradient_checkpointing", False) is True or type(sub).__name__ == "CheckpointWrapper"
        for sub in model.modules()
    )


def encode_prompts_once(
    model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, group_size: int
) -> tuple[object, torch.Tensor]:
    """Run each (left-padded) prompt once and repeat its KV cache for its group of ``group_size``.

    Returns the cache (rows ``u*G .. u*G+G-1`` belong to prompt ``u``) and the logits at each
    prompt's last position, ``[U * G, V]``: those predict the first response token.
    """
    positions = (prompt_mask.long().cumsum(-1) - 1).clamp_min(0)
    out = model(
        input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions,
        use_cache=True, logits_to_keep=1,
    )
    cache = getattr(out, "cache", None) or out.past_key_values
    cache.batch_repeat_interleave(group_size)
    return cache, out.logits[:, -1].repeat_interleave(group_size, 0)


def shared_prefix_response_logprobs(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    group_size: int,
    temperature: float = 1.0,
    with_entropy: bool = True,
    chunk_rows: int = 4,
    entropy_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Like ``response_logprobs`` for rows that share prompts, encoding each prompt once.

    ``prompt_ids``/``prompt_mask`` are ``[U, P]`` (left-padded, one row per distinct prompt);
    ``response_ids``/``response_mask`` are ``[U * G, T]`` with the ``G`` responses of prompt ``u``
    in rows ``u*G .. u*G+G-1``. The prompt's key/value cache is computed once and repeated for its
    group, and gradients flow through it to the prompt's computation, so the result and its
    gradient equal those of the full forward pass while the prompt costs ``U`` rows, not ``U*G``.
    """
    cache, first_logits = encode_prompts_once(model, prompt_ids, prompt_mask, group_size)
    first_logits = first_logits.unsqueeze(1)
    length = response_ids.shape[1]
    if length > 1:
        mask = torch.cat([prompt_mask.repeat_interleave(group_size, 0), response_mask[:, :-1].long()], dim=1)
        start = prompt_mask.long().sum(-1).repeat_interleave(group_size, 0)
        response_positions = start.unsqueeze(-1) + torch.arange(length - 1, device=start.device)
        out = model(
            input_ids=response_ids[:, :-1], attention_mask=mask, position_ids=response_positions,
            use_cache=True, **{cache_argument(model): cache},
        )
        logits = torch.cat([first_logits, out.logits], dim=1)
    else:
        logits = first_logits
    return logprobs_and_entropy_from_logits(
        logits, response_ids, temperature, with_entropy, chunk_rows, entropy_grad
    )
