"""Rollout: sample ``group_size`` completions per prompt and lay them out for training.

Each row of a ``Rollout`` is ``[left-padded prompt | right-padded response]``, so the response
of every row occupies the same last ``response_length`` columns and log-probs can be taken from
the last logits of one forward pass (see ``logprobs.response_logprobs``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from rlvr_lightning.distributed import all_ranks
from rlvr_lightning.logprobs import cache_argument, encode_prompts_once
from rlvr_lightning.static_engine import sample_static
from rlvr_lightning.vllm_engine import vllm_generate


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


def _sample_next(logits: torch.Tensor, temperature: float, top_p: float, greedy: bool) -> torch.Tensor:
    """One token per row: argmax, or a draw from softmax(logits / T) restricted to the top-p nucleus."""
    if greedy:
        return logits.argmax(-1)
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    probs = torch.softmax(z, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        return order.gather(-1, _draw_categorical(sorted_probs)).squeeze(-1)
    return _draw_categorical(probs).squeeze(-1)


def _draw_categorical(weights: torch.Tensor) -> torch.Tensor:
    """One index per row of ``weights`` (``[rows, V]``, non-negative), drawn with probability
    proportional to its weight; returns ``[rows, 1]``.

    Inverse-CDF sampling: the first index whose cumulative weight exceeds a uniform draw scaled
    to the row's total. One uniform number per row, where ``torch.multinomial`` draws one
    exponential per vocabulary entry (23 ms per decoding step for 32 x 49152 here, against about
    3 ms). The cumulative sum is float64, so a token keeps its share however small it is next to
    the running total; a token of weight 0 is never drawn.
    """
    cdf = weights.double().cumsum(-1)
    u = torch.rand(weights.shape[0], 1, dtype=torch.float64, device=weights.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=weights.shape[-1] - 1)


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
) -> torch.Tensor:
    """Sample ``group_size`` completions per (left-padded) prompt; returns ``[P * G, T]`` ids.

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
    for t in range(max_new_tokens):
        if ignore_eos:
            logits[:, eos] = float("-inf")
        if synced:
            # Finished rows ride along, fed padding; only the others draw, so the random stream
            # (and the completions) are those of unsynced decoding, which drops finished rows.
            tokens = torch.full_like(active, pad_token_id)
            if not finished.all():
                tokens[~finished] = _sample_next(logits[~finished], temperature, top_p, greedy)
        else:
            tokens = _sample_next(logits, temperature, top_p, greedy)
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
    return result


ENGINES = ("shared_prefix", "static", "hf", "continuous_batching", "vllm")
HF_CACHES = ("dynamic", "static")
COMPILE_MODES = ("auto", "true", "false")


def _hf_generate(
    model: PreTrainedModel,
    encoded: dict[str, torch.Tensor],
    max_new_tokens: int,
    eos: list[int],
    pad_token_id: int,
    sampling: dict[str, Any],
    ignore_eos: bool,
    synced: bool,
    cache_implementation: str,
    compile_decoding: str,
) -> torch.Tensor:
    """``model.generate`` on every row; returns the response columns ``[N, T]``.

    ``cache_implementation="static"`` preallocates the KV cache for ``prompt + max_new_tokens``
    positions; transformers then compiles the decoding step itself on GPUs (``compile_decoding``
    ``auto``), on every device (``true``) or never (``false``).
    """
    options: dict[str, Any] = {}
    if cache_implementation == "static":
        options["cache_implementation"] = "static"
    if compile_decoding == "false":
        options["disable_compile"] = True
    elif compile_decoding == "true":
        from transformers import CompileConfig

        compile_config = CompileConfig()
        # transformers compiles only on accelerators unless told to compile on every device.
        compile_config._compile_all_devices = True
        options["compile_config"] = compile_config
    precision = contextlib.nullcontext()
    device_type = encoded["input_ids"].device.type
    if cache_implementation == "static" and torch.is_autocast_enabled(device_type):
        # Under autocast the keys reach the cache in float32 (rotary embeddings promote them)
        # and the values in bfloat16, and transformers' static cache (5.17, for one) allocates
        # both in the keys' dtype, so the first value write fails. Decoding with the static
        # cache therefore runs in the parameters' dtype.
        precision = torch.autocast(device_type, enabled=False)
    with precision:
        output = model.generate(
            **encoded,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos,
            pad_token_id=pad_token_id,
            min_new_tokens=max_new_tokens if ignore_eos else None,
            synced_gpus=synced,
            **sampling,
            **options,
        )
    return output[:, encoded["input_ids"].shape[1]:]


def _continuous_batching_generate(
    model: PreTrainedModel,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    group_size: int,
    max_new_tokens: int,
    eos: list[int],
    pad_token_id: int,
    sampling: dict[str, Any],
) -> torch.Tensor:
    """transformers' continuous batching (``model.generate_batch``, paged KV cache): finished
    sequences free their cache blocks for waiting ones and a group's completions share their
    prompt's blocks. Returns ``[U * G, T]`` ids, rows grouped by prompt, padded with
    ``pad_token_id``. The sampling seed is drawn from the global torch RNG, so seeding that RNG
    makes the engine reproducible."""
    try:
        from transformers import ContinuousBatchingConfig
    except ImportError as error:
        import transformers

        raise ImportError(
            f"rollout.engine=continuous_batching needs transformers' continuous batching "
            f"(ContinuousBatchingConfig, generate_batch), which transformers {transformers.__version__} "
            "lacks: upgrade transformers (5.24 works) or use rollout.engine=shared_prefix"
        ) from error
    prompts = [ids[mask.bool()].tolist() for ids, mask in zip(prompt_ids, prompt_mask, strict=True)]
    greedy = not sampling.get("do_sample", False)
    # Greedy decoding is deterministic: G copies of the prompt; sampling forks G children instead.
    inputs = [p for p in prompts for _ in range(group_size)] if greedy else prompts
    generation_config = GenerationConfig(
        max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad_token_id,
        num_return_sequences=1 if greedy else group_size, **sampling,
    )
    # Size the paged cache to this rollout. Left to itself transformers sizes it from the free
    # memory of the device (on a CPU: the machine's RAM, which took 10 s per call here).
    page_size = 32
    pages_per_row = -(-(max(len(p) for p in prompts) + max_new_tokens) // page_size)
    config = ContinuousBatchingConfig(
        seed=int(torch.randint(0, 2**31 - 1, (1,))),
        page_size=page_size,
        num_blocks=pages_per_row * len(prompts) * group_size,
        max_batch_tokens=sum(len(p) for p in inputs) + len(prompts) * group_size,
    )
    on_cuda = prompt_ids.device.type == "cuda"
    # generate_batch reseeds the global RNGs from the seed: leave them as they were.
    with torch.random.fork_rng(devices=[prompt_ids.device] if on_cuda else []):
        outputs = model.generate_batch(
            inputs=inputs, generation_config=generation_config, continuous_batching_config=config,
            progress_bar=False, warmup=on_cuda,  # the warm-up captures CUDA graphs
        )
    results = list(outputs.values())
    failed = [r.request_id for r in results if r.error is not None]
    if len(results) != len(prompts) * group_size or failed:
        raise RuntimeError(
            f"rollout.engine=continuous_batching returned {len(results)} of {len(prompts) * group_size} "
            f"completions (failed: {failed or 'none'}); see transformers' log above, or use "
            "rollout.engine=shared_prefix"
        )
    rows = torch.full((len(results), max_new_tokens), pad_token_id, dtype=torch.long)
    for i, result in enumerate(results):
        tokens = result.generated_tokens[:max_new_tokens]
        rows[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    return rows.to(prompt_ids.device)


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
    engine: str = "shared_prefix",
    ignore_eos: bool = False,
    synced: bool = False,
    cache_implementation: str = "dynamic",
    compile_decoding: str = "auto",
    pad_prompts_to_multiple_of: int | None = None,
    cuda_graphs: str = "auto",
    vllm_options: dict[str, Any] | None = None,
) -> Rollout:
    """Generate ``group_size`` completions for every prompt (rows grouped by prompt).

    ``engine``: ``shared_prefix`` (``sample_shared_prefix``: one prefill per prompt, finished
    rows leave the batch), ``static`` (``static_engine.sample_static``: a preallocated KV cache
    and one decoding step replayed as a CUDA graph on GPUs, ``cuda_graphs`` ``auto``/``true``/
    ``false``, the step compiled per ``compile_decoding``), ``vllm`` (``vllm_engine``: vLLM in
    this process, weights synced per rollout; ``vllm_options`` are ``rollout.vllm``), ``hf``
    (``model.generate`` on every row, with a ``dynamic`` or ``static`` KV cache and
    ``compile_decoding`` ``auto``/``true``/``false``, see
    ``_hf_generate``) or ``continuous_batching`` (``model.generate_batch``). Sampling uses the
    global torch RNG; the caller seeds it per step for reproducibility. ``ignore_eos`` forces
    every response to ``max_new_tokens`` tokens; ``synced`` keeps FSDP ranks decoding in
    lock-step (see ``sample_shared_prefix``). ``pad_prompts_to_multiple_of`` left-pads the
    prompt batch to a multiple of that many tokens (fewer distinct shapes to compile).
    """
    if engine not in ENGINES:
        raise ValueError(f"rollout.engine={engine!r} is unknown; use one of {', '.join(ENGINES)}")
    if cache_implementation not in HF_CACHES:
        raise ValueError(f"rollout.hf_cache={cache_implementation!r} is unknown; use one of {', '.join(HF_CACHES)}")
    compile_decoding = str(compile_decoding).lower()
    if compile_decoding not in COMPILE_MODES:
        raise ValueError(f"rollout.compile_decoding={compile_decoding!r} is unknown; use one of {', '.join(COMPILE_MODES)}")
    if engine in ("static", "vllm") and synced:
        raise ValueError(
            f"rollout.engine={engine} runs the whole model on each rank, and this FSDP run decodes in lock-step "
            "with sharded weights: set trainer.strategy.gather_for_rollout=true or use rollout.engine=shared_prefix"
        )
    if engine == "continuous_batching" and ignore_eos:
        raise ValueError(
            "rollout.ignore_eos=true is not supported by rollout.engine=continuous_batching "
            "(transformers' continuous batching drops min_new_tokens); use shared_prefix or hf"
        )
    device = next(model.parameters()).device
    repeated = [p for p in prompts for _ in range(group_size)]
    encoded = tokenizer(
        repeated if engine == "hf" else prompts,
        return_tensors="pt",
        padding=True,
        add_special_tokens=False,
        truncation=max_prompt_tokens is not None,
        max_length=max_prompt_tokens,
        pad_to_multiple_of=pad_prompts_to_multiple_of,
    ).to(device)
    was_training = model.training
    model.eval()
    eos = eos_token_ids(model, tokenizer)
    prompt_ids, prompt_mask = encoded["input_ids"], encoded["attention_mask"]
    sampling = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    if engine == "hf":
        response_ids = _hf_generate(
            model, encoded, max_new_tokens, eos, tokenizer.pad_token_id, sampling, ignore_eos, synced,
            cache_implementation, compile_decoding,
        )
    else:
        if engine == "shared_prefix":
            response_ids = sample_shared_prefix(
                model, prompt_ids, prompt_mask, group_size, max_new_tokens, eos,
                tokenizer.pad_token_id, temperature, top_p, greedy, ignore_eos, synced,
            )
        elif engine == "vllm":
            response_ids = vllm_generate(
                model, tokenizer, prompt_ids, prompt_mask, group_size, max_new_tokens, eos, tokenizer.pad_token_id,
                temperature, top_p, greedy, ignore_eos, vllm_options,
            )
        elif engine == "static":
            response_ids = sample_static(
                model, prompt_ids, prompt_mask, group_size, max_new_tokens, eos, tokenizer.pad_token_id,
                lambda logits: _sample_next(logits, temperature, top_p, greedy), ignore_eos, cuda_graphs,
                compile_decoding,
            )
        else:
            response_ids = _continuous_batching_generate(
                model, prompt_ids, prompt_mask, group_size, max_new_tokens, eos, tokenizer.pad_token_id, sampling,
            )
        prompt_ids = prompt_ids.repeat_interleave(group_size, 0)
        prompt_mask = prompt_mask.repeat_interleave(group_size, 0)
    model.train(was_training)
    if response_ids.shape[1] == 0:  # nothing generated at all: keep one padded column
        response_ids = torch.full((len(repeated), 1), tokenizer.pad_token_id, device=device)
    response_mask, truncated = response_mask_from_ids(response_ids, eos)
    # Positions after EOS carry the pad token so decoding and the forward pass ignore them.
    response_ids = torch.where(response_mask.bool(), response_ids, tokenizer.pad_token_id)
    # Trim columns after the longest response (rows finished early in every group).
    width = max(int(response_mask.sum(-1).max()), 1)
    response_ids, response_mask = response_ids[:, :width], response_mask[:, :width]
    lengths = response_mask.sum(-1).long()
    completions = tokenizer.batch_decode(response_ids, skip_special_tokens=True)
    return Rollout(
        input_ids=torch.cat([prompt_ids, response_ids], dim=1),
        attention_mask=torch.cat([prompt_mask, response_mask.long()], dim=1),
        response_mask=response_mask,
        response_lengths=lengths,
        truncated=truncated,
        completions=completions,
        prompts=repeated,
        group_size=group_size,
    )
