"""The default engine (``rollout/engine=shared_prefix``): one prefill per prompt, and rows that
reached EOS leave the batch. Exact for any causal LM transformers runs; the engine of CPUs."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from rlvr_lightning.distributed import all_ranks
from rlvr_lightning.logprobs import cache_argument, encode_prompts_once
from rlvr_lightning.rollout.engine import RolloutEngine, SamplingParams, register_engine
from rlvr_lightning.rollout.sampling import sample_next, sample_next_with_logprobs


@register_engine("shared_prefix")
class SharedPrefixEngine(RolloutEngine):
    """``sample_shared_prefix`` behind the engine protocol. Returns the drawn tokens' log-probs
    always (a gather per decoding step), so the mismatch metrics are logged on every run."""

    returns_logprobs = True
    casts_weights_once = True

    def response_ids(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, group_size: int, sampling: SamplingParams,
        eos: list[int], lockstep: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return sample_shared_prefix(
            self.model, prompt_ids, prompt_mask, group_size, sampling.max_new_tokens, eos,
            self.tokenizer.pad_token_id, sampling.temperature, sampling.top_p, sampling.greedy,
            sampling.ignore_eos, lockstep, return_logprobs=True,
        )


@torch.no_grad()
def sample_shared_prefix(
    model: PreTrainedModel,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    group_size: int,
    max_new_tokens: int,
    eos_token_ids: list[int],
    pad_token_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    ignore_eos: bool = False,
    synced: bool = False,
    return_logprobs: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sample ``group_size`` completions per (left-padded) prompt; returns ``[P * G, T]`` ids
    (with ``return_logprobs``: and each drawn token's log-prob after temperature and top-p,
    ``[P * G, T]`` float32, 0 after EOS; the draws are the same either way).

    Each prompt is encoded once and its KV cache repeated for the group (generation's prefill
    costs ``P`` prompts, not ``P * G``), and rows that reached EOS leave the batch, so decoding
    costs only the unfinished rows. Tokens after EOS are ``pad_token_id``.

    ``ignore_eos``: EOS is never sampled, so every response is ``max_new_tokens`` long (for
    benchmarks that need a fixed amount of work). ``synced`` (FSDP, where every forward gathers
    parameters from all ranks): no row leaves the batch and decoding stops only when every rank
    is done, so all ranks run the same number of forward passes.
    """
    cache_name = cache_argument(model)
    cache, logits = encode_prompts_once(model, prompt_ids, prompt_mask, group_size)
    mask = prompt_mask.repeat_interleave(group_size, 0)
    next_position = mask.sum(-1)
    rows = prompt_ids.shape[0] * group_size
    result = torch.full((rows, max_new_tokens), pad_token_id, dtype=torch.long, device=prompt_ids.device)
    active = torch.arange(rows, device=prompt_ids.device)  # result rows still being decoded
    eos = torch.tensor(eos_token_ids, device=prompt_ids.device)
    finished = torch.zeros(rows, dtype=torch.bool, device=prompt_ids.device)  # synced mode only
    logprobs = torch.zeros((rows, max_new_tokens), device=prompt_ids.device) if return_logprobs else None
    for t in range(max_new_tokens):
        if ignore_eos:
            logits[:, eos] = float("-inf")
        if synced:
            # Finished rows ride along, fed padding; only the others draw, so the random stream
            # (and the completions) are those of unsynced decoding, which drops finished rows.
            tokens = torch.full_like(active, pad_token_id)
            if not finished.all():
                drawn, logp = _draw(logits[~finished], temperature, top_p, greedy, return_logprobs)
                tokens[~finished] = drawn
                if logprobs is not None:
                    logprobs[active[~finished], t] = logp
        else:
            tokens, logp = _draw(logits, temperature, top_p, greedy, return_logprobs)
            if logprobs is not None:
                logprobs[active, t] = logp
        result[active, t] = tokens
        alive = ~torch.isin(tokens, eos)
        if synced:
            finished |= ~alive
            if t == max_new_tokens - 1 or all_ranks(bool(finished.all()), prompt_ids.device):
                break
            alive = torch.ones_like(alive)
        elif t == max_new_tokens - 1 or not alive.any():
            break
        if not alive.all():
            keep = alive.nonzero().squeeze(-1)
            cache.batch_select_indices(keep)
            active, tokens, mask, next_position = active[keep], tokens[keep], mask[keep], next_position[keep]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        out = model(
            input_ids=tokens.unsqueeze(-1), attention_mask=mask, position_ids=next_position.unsqueeze(-1),
            use_cache=True, **{cache_name: cache},
        )
        cache = getattr(out, "cache", None) or out.past_key_values
        logits = out.logits[:, -1]
        next_position = next_position + 1
    return (result, logprobs) if logprobs is not None else result


def _draw(
    logits: torch.Tensor, temperature: float, top_p: float, greedy: bool, with_logprobs: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if with_logprobs:
        return sample_next_with_logprobs(logits, temperature, top_p, greedy)
    return sample_next(logits, temperature, top_p, greedy), None
