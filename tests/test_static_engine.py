"""The static-cache engine (rollout/engine=static): its forward against transformers' on the
tiny models of each supported family, its samples against the shared-prefix engine's (greedy:
tests/test_rollout.py), and its refusals. CUDA graph capture itself needs a GPU: tools/gpu_checks.sh checks it there."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from rlvr_lightning.models import apply_lora, build_tiny_model
from rlvr_lightning.rollout import generate_rollout, response_mask_from_ids, sample_next
from rlvr_lightning.rollout.static import (
    StaticDecoder,
    _Decoding,
    _prefill,
    forced_logits,
    sample_static,
)

PROMPTS = ["<|im_start|>user\nWhat is 1 + 2?<|im_end|>\n<|im_start|>assistant\n", "Hi", "a b c"]
SHAPE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)


def _family(name: str, vocab_size: int) -> torch.nn.Module:
    torch.manual_seed(1)
    if name == "qwen2":  # biases on q/k/v
        return Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab_size, **SHAPE)).eval()
    if name == "qwen3":  # RMSNorm on each head's queries and keys, head_dim set apart from hidden_size
        return Qwen3ForCausalLM(Qwen3Config(vocab_size=vocab_size, head_dim=32, **SHAPE)).eval()
    if name == "mistral":
        return MistralForCausalLM(MistralConfig(vocab_size=vocab_size, sliding_window=None, **SHAPE)).eval()
    raise ValueError(name)


def _reference_logits(model, prompt_ids, prompt_mask, forced: torch.Tensor) -> torch.Tensor:
    """transformers' forward over ``[prompt | forced]``: the logits at the last prompt position and after."""
    ids = torch.cat([prompt_ids, forced], 1)
    mask = torch.cat([prompt_mask, torch.ones_like(forced)], 1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    return logits[:, prompt_ids.shape[1] - 1:].float()


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral", "llama+lora"])
def test_forward_matches_transformers_on_left_padded_prompts(tiny, family: str) -> None:
    base, tokenizer = tiny
    if family == "llama":
        model = base
    elif family == "llama+lora":
        pytest.importorskip("peft")
        model, _ = build_tiny_model(seed=0)
        model = apply_lora(model.eval(), r=4, alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"])
        torch.manual_seed(2)
        with torch.no_grad():  # adapters start at B = 0; give them weight so they matter
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(std=0.2)
    else:
        model = _family(family, len(tokenizer))
    encoded = tokenizer(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    assert len(set(encoded["attention_mask"].sum(-1).tolist())) == 3  # three prompt lengths, left-padded
    forced = torch.randint(3, len(tokenizer), (len(PROMPTS), 6), generator=torch.Generator().manual_seed(0))
    ours = forced_logits(model, encoded["input_ids"], encoded["attention_mask"], forced)
    reference = _reference_logits(model, encoded["input_ids"], encoded["attention_mask"], forced)
    assert ours.shape == reference.shape
    assert torch.allclose(ours, reference, atol=2e-5, rtol=1e-4), (ours - reference).abs().max()


def test_groups_share_their_prompt_cache(tiny) -> None:
    """Group rows get copies of their prompt's keys and values: forcing the same tokens into every
    row of a group gives every row the logits of that prompt alone."""
    model, tokenizer = tiny
    encoded = tokenizer(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    decoder = StaticDecoder(model, torch.float32)
    state = _Decoding(decoder, 3 * len(PROMPTS), ids.shape[1] + 2, ids.device)
    first = _prefill(decoder, state, ids, mask, 3)
    state.tokens.fill_(7)
    second = state.step()
    reference = _reference_logits(model, ids, mask, torch.full((len(PROMPTS), 1), 7))
    for logits, column in ((first, 0), (second, 1)):
        assert torch.allclose(logits, reference[:, column].repeat_interleave(3, 0), atol=2e-5, rtol=1e-4)


def test_forced_length_sampling_draws_what_the_shared_prefix_engine_draws(tiny) -> None:
    """With every row decoding every step, both engines draw the same uniform numbers for the
    same logits, so a seed gives the same completions."""
    model, tokenizer = tiny
    results = []
    for engine in ("static", "shared_prefix"):
        torch.manual_seed(5)
        results.append(generate_rollout(model, tokenizer, PROMPTS, 4, 12, temperature=1.3, engine=engine,
                                        ignore_eos=True))
    assert results[0].completions == results[1].completions
    assert results[0].response_lengths.tolist() == [12] * 12


def test_rows_stop_at_eos_and_decoding_stops_when_all_have(tiny) -> None:
    model, tokenizer = tiny
    encoded = tokenizer(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    eos = list(range(0, len(tokenizer), 3))  # a third of the vocabulary ends a response
    calls = []

    def sample(logits: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return sample_next(logits, 1.0, 1.0, False)

    torch.manual_seed(0)
    ids = sample_static(model, encoded["input_ids"], encoded["attention_mask"], 4, 40, eos, tokenizer.pad_token_id,
                        sample, check_every=1)
    mask, truncated = response_mask_from_ids(ids, eos)
    lengths = mask.sum(-1).long()
    assert len(set(lengths.tolist())) > 2 and not bool(truncated.any())
    for row, length in zip(ids, lengths.tolist(), strict=True):
        assert row[length - 1].item() in eos
        assert bool((row[length:] == tokenizer.pad_token_id).all())
    assert len(calls) == int(lengths.max())  # no step after the last row finished


def test_bf16_autocast_decodes_in_bf16_close_to_transformers(tiny) -> None:
    model, tokenizer = tiny
    encoded = tokenizer(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    forced = torch.randint(3, len(tokenizer), (len(PROMPTS), 4), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        decoder = StaticDecoder(model, torch.bfloat16)
        assert decoder.layers[0].qkv.dtype == torch.bfloat16 and decoder.lm_head.dtype == torch.bfloat16
        ours = forced_logits(model, encoded["input_ids"], encoded["attention_mask"], forced)
    reference = _reference_logits(model, encoded["input_ids"], encoded["attention_mask"], forced)
    assert (ours - reference).abs().max() < 0.05 * reference.abs().max()
    # Under autocast the rollout runs in bf16 through generate_rollout too.
    dtypes = []
    original = StaticDecoder.__init__

    def spy(self, model, dtype):
        dtypes.append(dtype)
        original(self, model, dtype)

    StaticDecoder.__init__ = spy
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rollout = generate_rollout(model, tokenizer, PROMPTS, 2, 6, engine="static", ignore_eos=True)
        generate_rollout(model, tokenizer, PROMPTS, 2, 6, engine="static", ignore_eos=True)
    finally:
        StaticDecoder.__init__ = original
    assert dtypes == [torch.bfloat16, torch.float32]
    assert rollout.response_lengths.tolist() == [6] * 6


def test_unsupported_models_and_settings_are_refused_with_the_fix(tiny) -> None:
    _, tokenizer = tiny
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2)).eval()
    with pytest.raises(ValueError, match=r"'gpt2'.*rollout/engine=shared_prefix"):
        generate_rollout(gpt2, tokenizer, PROMPTS, 2, 4, engine="static")
    windowed = MistralForCausalLM(MistralConfig(vocab_size=len(tokenizer), sliding_window=8, **SHAPE)).eval()
    with pytest.raises(ValueError, match=r"sliding window of 8.*rollout/engine=shared_prefix"):
        generate_rollout(windowed, tokenizer, PROMPTS, 2, 12, engine="static")
    model, _ = tiny
    with pytest.raises(ValueError, match=r"cuda_graphs=true needs a CUDA device"):
        generate_rollout(model, tokenizer, PROMPTS, 2, 4, engine="static", cuda_graphs="true")
    with pytest.raises(ValueError, match=r"cuda_graphs='sometimes' is unknown"):
        generate_rollout(model, tokenizer, PROMPTS, 2, 4, engine="static", cuda_graphs="sometimes")
    with pytest.raises(ValueError, match=r"gather_for_rollout=true or use rollout/engine=shared_prefix"):
        generate_rollout(model, tokenizer, PROMPTS, 2, 4, engine="static", synced=True)


def test_compiled_decoding_matches_eager_and_compiles_once_per_shape(tiny) -> None:
    """``compile_decoding=true``: the step compiled by torch.compile gives the eager step's
    tokens; a second rollout of the same shape reuses the compiled step, and a new length
    compiles once more (dynamic), after which lengths reuse it."""
    from torch._dynamo.utils import counters

    model, tokenizer = tiny
    eager = generate_rollout(model, tokenizer, PROMPTS, 2, 6, greedy=True, engine="static", compile_decoding="false")
    graphs = []
    for length in (6, 6, 9, 12):
        compiled = generate_rollout(model, tokenizer, PROMPTS, 2, length, greedy=True, engine="static",
                                    compile_decoding="true")
        if length == 6:
            assert compiled.completions == eager.completions
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1] == graphs[0] and graphs[2] == graphs[1] + 1 and graphs[3] == graphs[2]
