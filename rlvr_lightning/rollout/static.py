"""The static-cache decoding engine (``rollout/engine=static``), with CUDA graphs on GPUs.

Decoding a small model for a few hundred rows is bound by kernel launches, not arithmetic: a
Python-driven forward of SmolLM2-135M's 30 layers took about 28 ms per decoding step on an H200
whatever the batch (docs/benchmarks.md). This engine removes what makes a decoding step
dynamic, so one step can be captured once as a CUDA graph and replayed:

- the KV cache is preallocated for ``prompt + max_new_tokens`` positions, one buffer per layer,
  written in place at one column per step (every row's prompt is left-padded to the same end);
- which cache columns a row may attend to is a boolean buffer updated in place;
- rows that finished stay in the batch, fed padding, until every row is done;
- the decoder's forward is written out here for the Llama family (Llama, Mistral, Qwen2,
  Qwen3: RMSNorm, rotary embeddings, grouped-query attention, gated MLP) from the model's own
  weights, cast once per rollout to the compute dtype (autocast's when it is on, e.g. bf16
  under ``precision=bf16-mixed``) with the q/k/v and gate/up projections fused into one matrix
  each, and LoRA adapters merged in.

Each prompt is encoded once for its whole group (as in the shared-prefix engine) and its keys
and values are copied into the group's rows. Sampling (``rollout.sampling.sample_next``) runs outside
the graph on the logits the graph leaves in its output buffer, so the random stream is the one
the other engines draw from. On CPUs, or with ``cuda_graphs=false``, the same step runs eagerly.
Under DDP and FSDP (gathered weights) each rank runs its own engine on its policy's device, for
its own prompts, with its own seed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlvr_lightning.rollout.engine import (
    COMPILE_MODES,
    RolloutEngine,
    SamplingParams,
    choice,
    register_engine,
)
from rlvr_lightning.rollout.sampling import sample_next_with_logprobs

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
CUDA_GRAPH_MODES = ("auto", "true", "false")


@dataclass
class _Layer:
    """One decoder layer's weights in the compute dtype (norm weights in float32)."""

    input_norm: torch.Tensor
    qkv: torch.Tensor  # [(H + 2 KV) * D, hidden]: q_proj, k_proj and v_proj stacked
    qkv_bias: torch.Tensor | None
    q_norm: torch.Tensor | None  # Qwen3: RMSNorm over each head's query and key
    k_norm: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor
    gate_up: torch.Tensor  # [2 * I, hidden]: gate_proj and up_proj stacked
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor
    down_bias: torch.Tensor | None
    act: Callable[[torch.Tensor], torch.Tensor]


def linear_weight(module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A linear layer's effective weight and bias, with peft LoRA adapters merged in."""
    if hasattr(module, "base_layer") and hasattr(module, "get_delta_weight"):  # a peft LoRA layer
        weight, bias = linear_weight(module.base_layer)
        if not module.disable_adapters and not module.merged:
            for name in module.active_adapters:
                if name not in module.lora_A:
                    continue
                if getattr(module, "use_dora", {}).get(name, False):
                    raise ValueError(
                        "rollout/engine=static cannot merge DoRA adapters; use rollout/engine=shared_prefix"
                    )
                weight = weight + module.get_delta_weight(name).to(weight.dtype)
        return weight, bias
    if not isinstance(module, torch.nn.Linear):
        raise ValueError(
            f"rollout/engine=static expects linear projections, found {type(module).__name__}; "
            "use rollout/engine=shared_prefix for this model"
        )
    return module.weight, module.bias


def _stack(modules: list[torch.nn.Module], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    weights, biases = zip(*(linear_weight(m) for m in modules), strict=True)
    weight = torch.cat([w.detach().to(dtype) for w in weights]) if len(weights) > 1 else weights[0].detach().to(dtype)
    if all(b is None for b in biases):
        return weight, None
    bias = torch.cat([
        (b.detach() if b is not None else w.new_zeros(w.shape[0])).to(dtype) for w, b in zip(weights, biases, strict=True)
    ])
    return weight, bias


def _norm_weight(norm: torch.nn.Module) -> torch.Tensor:
    return norm.weight.detach().float()


def _norm_eps(norm: torch.nn.Module, default: float) -> float:
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", default)))


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in float32, as the Llama family computes it (one fused kernel where torch has one)."""
    return F.rms_norm(x.float(), (x.shape[-1],), weight, eps)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in float32: ``x cos + rotate_half(x) sin``, where ``rotate_half(x) sin`` is
    ``x`` with its halves swapped times ``sin`` with its first half negated (``sin_signed``)."""
    x = x.float()
    swapped = x.unflatten(-1, (2, -1)).flip(-2).flatten(-2)
    return torch.addcmul(x * cos, swapped, sin_signed)


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The causal LM under a peft wrapper, if any."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class StaticDecoder:
    """The weights and shapes of a Llama-family causal LM, read for one rollout.

    Raises ``ValueError`` naming the problem when the model is not one the engine can run.
    """

    def __init__(self, model: PreTrainedModel, dtype: torch.dtype) -> None:
        base = base_model(model)
        config = base.config
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"rollout/engine=static runs the Llama family ({', '.join(SUPPORTED_MODEL_TYPES)}); "
                f"this model is {model_type!r}: use rollout/engine=shared_prefix"
            )
        decoder = getattr(base, "model", None)
        lm_head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
        if decoder is None or lm_head is None or not hasattr(decoder, "layers") or not hasattr(decoder, "rotary_emb"):
            raise ValueError(
                f"rollout/engine=static could not find the decoder layers of {type(base).__name__}; "
                "use rollout/engine=shared_prefix"
            )
        rope_type = getattr(decoder.rotary_emb, "rope_type", "default")
        if rope_type in ("dynamic", "longrope"):
            raise ValueError(
                f"rollout/engine=static needs fixed rotary frequencies; this model's rope_type is {rope_type!r} "
                "(recomputed from the sequence length): use rollout/engine=shared_prefix"
            )
        self.config = config
        self.dtype = dtype
        self.rotary_emb = decoder.rotary_emb
        self.embed = decoder.embed_tokens.weight.detach()
        self.final_norm = _norm_weight(decoder.norm)
        self.final_eps = _norm_eps(decoder.norm, config.rms_norm_eps)
        self.lm_head = linear_weight(lm_head)[0].detach().to(dtype)
        self.lm_head_bias = lm_head.bias.detach().to(dtype) if getattr(lm_head, "bias", None) is not None else None
        first = decoder.layers[0].self_attn
        self.head_dim = int(first.head_dim)
        self.num_heads = int(config.num_attention_heads)
        self.num_kv_heads = int(config.num_key_value_heads)
        self.scaling = float(getattr(first, "scaling", self.head_dim**-0.5))
        self.layers: list[_Layer] = []
        for layer in decoder.layers:
            attn, mlp = layer.self_attn, layer.mlp
            missing = [
                name for owner, names in ((attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                                          (mlp, ("gate_proj", "up_proj", "down_proj", "act_fn")))
                for name in names if not hasattr(owner, name)
            ]
            if missing:
                raise ValueError(
                    f"rollout/engine=static found no {', '.join(missing)} in {type(layer).__name__}; "
                    "use rollout/engine=shared_prefix"
                )
            qkv, qkv_bias = _stack([attn.q_proj, attn.k_proj, attn.v_proj], dtype)
            o, o_bias = _stack([attn.o_proj], dtype)
            gate_up, gate_up_bias = _stack([mlp.gate_proj, mlp.up_proj], dtype)
            down, down_bias = _stack([mlp.down_proj], dtype)
            has_qk_norm = hasattr(attn, "q_norm") and hasattr(attn, "k_norm")
            self.layers.append(_Layer(
                input_norm=_norm_weight(layer.input_layernorm), qkv=qkv, qkv_bias=qkv_bias,
                q_norm=_norm_weight(attn.q_norm) if has_qk_norm else None,
                k_norm=_norm_weight(attn.k_norm) if has_qk_norm else None,
                o=o, o_bias=o_bias, post_norm=_norm_weight(layer.post_attention_layernorm),
                gate_up=gate_up, gate_up_bias=gate_up_bias, down=down, down_bias=down_bias, act=mlp.act_fn,
            ))
        self.eps = _norm_eps(decoder.layers[0].input_layernorm, config.rms_norm_eps)
        self.qk_eps = _norm_eps(first.q_norm, config.rms_norm_eps) if hasattr(first, "q_norm") else self.eps

    def check_length(self, length: int) -> None:
        """Sliding-window attention is not implemented: refuse sequences longer than the window."""
        config = self.config
        window = getattr(config, "sliding_window", None)
        windowed = window is not None and (
            config.model_type == "mistral"
            or bool(getattr(config, "use_sliding_window", False))
            or "sliding_attention" in (getattr(config, "layer_types", None) or [])
        )
        if windowed and length > window:
            raise ValueError(
                f"rollout/engine=static attends to every cached position, but this model uses a sliding window of "
                f"{window} and the rollout needs {length} positions: use rollout/engine=shared_prefix"
            )

    def rope_table(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for positions ``0 .. length - 1``, ``[length, head_dim]`` float32 each; the
        first half of sin negated (see ``_rope``)."""
        positions = torch.arange(length, device=device)[None]
        cos, sin = self.rotary_emb(torch.zeros(1, device=device, dtype=torch.float32), positions)
        if cos.shape[-1] != self.head_dim:
            raise ValueError(
                f"rollout/engine=static applies rotary embeddings to the whole head ({self.head_dim}), "
                f"this model to {cos.shape[-1]} dimensions: use rollout/engine=shared_prefix"
            )
        sin = sin[0].float()
        half = self.head_dim // 2
        return cos[0].float(), torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)

    # The layer pieces, shared by the prefill and the decoding step. Few kernels per layer: a
    # decoding step replays every one of them, and at a few hundred rows each costs about as much
    # as its launch.
    def qkv(
        self, layer: _Layer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``h`` ``[B, T, hidden]`` float32, ``cos``/``sin`` ``[B, T, 1, D]`` -> q ``[B, H, T, D]``,
        k and v ``[B, KV, T, D]`` in the compute dtype. Queries and keys get their rotary
        embedding together."""
        batch, length = h.shape[:2]
        heads, kv_heads, dim = self.num_heads, self.num_kv_heads, self.head_dim
        x = _rms_norm(h, layer.input_norm, self.eps).to(self.dtype)
        qkv = F.linear(x, layer.qkv, layer.qkv_bias)
        qk = qkv[..., : (heads + kv_heads) * dim].unflatten(-1, (heads + kv_heads, dim))
        if layer.q_norm is not None:
            qk = torch.cat([
                _rms_norm(qk[:, :, :heads], layer.q_norm, self.qk_eps),
                _rms_norm(qk[:, :, heads:], layer.k_norm, self.qk_eps),
            ], dim=2)
        qk = _rope(qk, cos, sin).to(self.dtype)
        q, k = qk[:, :, :heads].transpose(1, 2), qk[:, :, heads:].transpose(1, 2)
        v = qkv[..., (heads + kv_heads) * dim:].unflatten(-1, (kv_heads, dim)).transpose(1, 2)
        return q, k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Grouped-query attention without repeating keys: the ``H / KV`` query heads that share a
        key head become extra query rows of it. q ``[B, H, T, D]``, k/v ``[B, KV, S, D]``, mask
        ``[B, 1, T, S]`` boolean (True: attend) -> ``[B, T, H * D]``."""
        batch, _, length, dim = q.shape
        groups = self.num_heads // self.num_kv_heads
        q = q.reshape(batch, self.num_kv_heads, groups * length, dim)
        if groups > 1 and length > 1:  # one query position: its mask row serves every group row
            mask = mask.repeat(1, 1, groups, 1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling)
        # reshape, not view: CUDA kernels may return the output in another memory layout.
        return out.reshape(batch, self.num_heads, length, dim).transpose(1, 2).reshape(batch, length, -1)

    def finish(self, layer: _Layer, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """The rest of the layer: output projection, residual, gated MLP, residual (float32 stream)."""
        h = h + F.linear(attn, layer.o, layer.o_bias)
        x = _rms_norm(h, layer.post_norm, self.eps).to(self.dtype)
        gate, up = F.linear(x, layer.gate_up, layer.gate_up_bias).chunk(2, dim=-1)
        return h + F.linear(layer.act(gate) * up, layer.down, layer.down_bias)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        x = _rms_norm(h, self.final_norm, self.final_eps).to(self.dtype)
        return F.linear(x, self.lm_head, self.lm_head_bias)


def use_cuda_graphs(mode: str, device: torch.device) -> bool:
    mode = str(mode).lower()
    if mode not in CUDA_GRAPH_MODES:
        raise ValueError(f"rollout.engine.cuda_graphs={mode!r} is unknown; use one of {', '.join(CUDA_GRAPH_MODES)}")
    if mode == "true" and device.type != "cuda":
        raise ValueError(
            f"rollout.engine.cuda_graphs=true needs a CUDA device, the policy is on {device.type}: "
            "use rollout.engine.cuda_graphs=auto (graphs on CUDA only) or false"
        )
    return device.type == "cuda" and mode != "false"


class _Decoding:
    """The static state of one rollout's decoding and its one-token step."""

    def __init__(
        self, decoder: StaticDecoder, rows: int, length: int, device: torch.device, compiled: bool = False
    ) -> None:
        self.decoder = decoder
        self.compiled = compiled
        shape = (rows, decoder.num_kv_heads, length, decoder.head_dim)
        # Zeros, not empty: a masked column's weight is 0, and 0 * NaN garbage would be NaN.
        self.keys = [torch.zeros(shape, dtype=decoder.dtype, device=device) for _ in decoder.layers]
        self.values = [torch.zeros(shape, dtype=decoder.dtype, device=device) for _ in decoder.layers]
        self.visible = torch.zeros(rows, length, dtype=torch.bool, device=device)  # cache columns a row attends to
        self.tokens = torch.zeros(rows, dtype=torch.long, device=device)  # the step's input tokens
        self.positions = torch.zeros(rows, dtype=torch.long, device=device)  # their position ids
        self.column = torch.zeros(1, dtype=torch.long, device=device)  # the cache column they are written to
        self.cos, self.sin = decoder.rope_table(length, device)

    def step(self) -> torch.Tensor:
        """Decode one token per row from the static buffers, advance them; returns ``[rows, V]`` logits."""
        return (_compiled_decode() if self.compiled else _decode)(self)


def _decode(state: _Decoding) -> torch.Tensor:
    """``_Decoding.step``, a plain function so that ``torch.compile`` compiles it once per process."""
    d = state.decoder
    state.visible.index_fill_(1, state.column, True)
    mask = state.visible[:, None, None, :]
    cos = state.cos.index_select(0, state.positions)[:, None, None, :]  # [rows, T = 1, 1, D]
    sin = state.sin.index_select(0, state.positions)[:, None, None, :]
    h = F.embedding(state.tokens[:, None], d.embed).float()
    for layer, keys, values in zip(d.layers, state.keys, state.values, strict=True):
        q, k, v = d.qkv(layer, h, cos, sin)
        keys.index_copy_(2, state.column, k)
        values.index_copy_(2, state.column, v)
        h = d.finish(layer, h, d.attend(q, keys, values, mask))
    state.positions.add_(1)
    state.column.add_(1)
    return d.logits(h)[:, 0]


_COMPILED: list[Callable[[_Decoding], torch.Tensor]] = []


def _compiled_decode() -> Callable[[_Decoding], torch.Tensor]:
    """``_decode`` compiled by ``torch.compile`` (fused element-wise kernels), made on first use."""
    if not _COMPILED:
        _COMPILED.append(torch.compile(_decode, fullgraph=True))
    return _COMPILED[0]


def _capture(step: Callable[[], torch.Tensor]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Warm ``step`` up on a side stream, then capture one call of it as a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        output = step()
    return graph, output


def compute_dtype(model: torch.nn.Module, device: torch.device) -> torch.dtype:
    """Autocast's dtype where autocast is on (``precision=bf16-mixed``), else the weights' dtype."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return next(model.parameters()).dtype


@torch.no_grad()
def sample_static(
    model: PreTrainedModel,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    group_size: int,
    max_new_tokens: int,
    eos_token_ids: list[int],
    pad_token_id: int,
    sample_next: Callable[[torch.Tensor], torch.Tensor | tuple[torch.Tensor, torch.Tensor]],
    ignore_eos: bool = False,
    cuda_graphs: str = "auto",
    compile_decoding: str = "auto",
    check_every: int | None = None,
    return_logprobs: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sample ``group_size`` completions per (left-padded) prompt; returns ``[P * G, T]`` ids.

    ``sample_next`` turns ``[rows, V]`` logits into ``[rows]`` tokens (with ``return_logprobs``:
    into tokens and their log-probs ``[rows]``, and the function returns the ids and the
    ``[P * G, T]`` float32 log-probs, 0 after EOS). Tokens after EOS are ``pad_token_id``.
    Decoding stops when every row has sampled EOS, checked every
    ``check_every`` steps (each check waits for the GPU; default: 16 on CUDA, 1 elsewhere).
    ``cuda_graphs``: ``auto`` (captured on CUDA), ``true`` or ``false``. ``compile_decoding``:
    the decoding step compiled by ``torch.compile`` (fewer, fused kernels; compiled once per
    process, once more when a second sequence length comes) on CUDA (``auto``), always
    (``true``) or never (``false``).
    """
    device = prompt_ids.device
    graphs = use_cuda_graphs(cuda_graphs, device)
    compile_decoding = str(compile_decoding).lower()
    compiled = compile_decoding == "true" or (compile_decoding == "auto" and device.type == "cuda")
    unique, prompt_length = prompt_ids.shape
    rows = unique * group_size
    result = torch.full((rows, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    logprobs = torch.zeros((rows, max_new_tokens), device=device) if return_logprobs else None
    if max_new_tokens == 0:
        return (result, logprobs) if logprobs is not None else result
    length = prompt_length + max_new_tokens
    check_every = check_every or (16 if device.type == "cuda" else 1)
    # Every dtype below is explicit; autocast would only add casts (and caches that a captured
    # graph must not hold on to).
    dtype = compute_dtype(model, device)  # read before autocast is switched off below
    with torch.autocast(device.type, enabled=False) if device.type in ("cuda", "cpu") else contextlib.nullcontext():
        decoder = StaticDecoder(model, dtype)
        decoder.check_length(length)
        state = _Decoding(decoder, rows, length, device, compiled=compiled)
        graph = None
        if graphs:
            # Warm-up and capture write to the buffers; the prefill below overwrites them.
            graph, graph_logits = _capture(state.step)
        logits = _prefill(decoder, state, prompt_ids, prompt_mask, group_size)
        eos = torch.tensor(eos_token_ids, device=device, dtype=torch.long)
        finished = torch.zeros(rows, dtype=torch.bool, device=device)
        for t in range(max_new_tokens):
            if t > 0:
                if graph is not None:
                    graph.replay()
                    logits = graph_logits
                else:
                    logits = state.step()
            if ignore_eos:
                logits[:, eos] = float("-inf")
            if logprobs is not None:
                tokens, logp = sample_next(logits)
                logprobs[:, t] = logp.masked_fill(finished, 0.0)
            else:
                tokens = sample_next(logits)
            tokens = tokens.masked_fill(finished, pad_token_id)
            result[:, t] = tokens
            state.tokens.copy_(tokens)
            if ignore_eos:
                continue
            finished |= torch.isin(tokens, eos)
            if (t + 1) % check_every == 0 and bool(finished.all()):
                break
    return (result, logprobs) if logprobs is not None else result


@torch.no_grad()
def forced_logits(
    model: PreTrainedModel, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, forced: torch.Tensor,
    compiled: bool = False,
) -> torch.Tensor:
    """The engine's logits for each (left-padded) prompt followed by the ``forced`` tokens
    ``[U, T]``, in the compute dtype: ``[U, T + 1, V]`` float32, comparable position by position
    with a transformers forward over ``[prompt | forced]`` (the checks of the engine use it)."""
    decoder = StaticDecoder(model, compute_dtype(model, prompt_ids.device))
    state = _Decoding(decoder, prompt_ids.shape[0], prompt_ids.shape[1] + forced.shape[1], prompt_ids.device, compiled)
    logits = [_prefill(decoder, state, prompt_ids, prompt_mask, 1)]
    for t in range(forced.shape[1]):
        state.tokens.copy_(forced[:, t])
        logits.append(state.step())
    return torch.stack(logits, 1).float()


def _prefill(
    decoder: StaticDecoder,
    state: _Decoding,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    group_size: int,
) -> torch.Tensor:
    """Encode each prompt once, copy its keys and values into its group's rows of the cache, set
    the decoding state to the first generated position; returns the first logits ``[rows, V]``."""
    unique, length = prompt_ids.shape
    valid = prompt_mask.bool()
    positions = (prompt_mask.long().cumsum(-1) - 1).clamp(min=0)
    cos, sin = state.cos[positions][:, :, None], state.sin[positions][:, :, None]  # [U, P, 1, D]
    causal = torch.ones(length, length, dtype=torch.bool, device=prompt_ids.device).tril()
    # A padding position attends to itself only (its row must not be empty); nothing attends to it.
    mask = (causal & valid[:, None, :]) | torch.eye(length, dtype=torch.bool, device=prompt_ids.device)
    mask = mask[:, None]  # [U, 1, P, P]
    h = F.embedding(prompt_ids, decoder.embed).float()
    for layer, keys, values in zip(decoder.layers, state.keys, state.values, strict=True):
        q, k, v = decoder.qkv(layer, h, cos, sin)
        keys.view(unique, group_size, *keys.shape[1:])[:, :, :, :length] = k[:, None]
        values.view(unique, group_size, *values.shape[1:])[:, :, :, :length] = v[:, None]
        h = decoder.finish(layer, h, decoder.attend(q, k, v, mask))
    logits = decoder.logits(h[:, -1:])[:, 0].repeat_interleave(group_size, 0)
    state.visible.zero_()
    state.visible[:, :length] = valid.repeat_interleave(group_size, 0)
    state.positions.copy_(prompt_mask.long().sum(-1).repeat_interleave(group_size, 0))
    state.column.fill_(length)
    return logits


@register_engine("static")
class StaticEngine(RolloutEngine):
    """``sample_static`` behind the engine protocol. ``cuda_graphs``: ``auto`` (captured on
    CUDA), ``true`` or ``false`` (eager decoding, e.g. to debug); ``compile_decoding``: the step
    compiled by torch.compile on CUDA (``auto``), always (``true``) or never (``false``). Returns
    the drawn tokens' log-probs always (sampling runs outside the graph: a gather per step)."""

    returns_logprobs = True

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        pad_prompts_to_multiple_of: int | None = None,
        cuda_graphs: str = "auto",
        compile_decoding: str = "auto",
    ) -> None:
        super().__init__(model, tokenizer, pad_prompts_to_multiple_of)
        self.cuda_graphs = choice("cuda_graphs", cuda_graphs, CUDA_GRAPH_MODES)
        self.compile_decoding = choice("compile_decoding", compile_decoding, COMPILE_MODES)

    def response_ids(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, group_size: int, sampling: SamplingParams,
        eos: list[int], lockstep: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if lockstep:
            raise ValueError(
                "rollout/engine=static runs the whole model on each rank, and this FSDP run decodes in lock-step "
                "with sharded weights: set trainer.strategy.gather_for_rollout=true or use rollout/engine=shared_prefix"
            )
        device = prompt_ids.device
        # Each rank decodes on its policy's device (cuda:<local rank>): side streams and CUDA graphs
        # are made on the current device, which is made that one whatever it was.
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            return sample_static(
                self.model, prompt_ids, prompt_mask, group_size, sampling.max_new_tokens, eos,
                self.tokenizer.pad_token_id,
                lambda logits: sample_next_with_logprobs(logits, sampling.temperature, sampling.top_p, sampling.greedy),
                sampling.ignore_eos, self.cuda_graphs, self.compile_decoding, return_logprobs=True,
            )
