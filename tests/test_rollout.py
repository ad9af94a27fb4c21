"""Rollout generation, log-probs and advantages on the tiny model."""

from __future__ import annotations

import pytest
import torch

from rlvr_lightning.advantages import constant_groups, group_advantages, overlong_penalty
from rlvr_lightning.logprobs import logprobs_and_entropy_from_logits, response_logprobs
from rlvr_lightning.models import build_tiny_model
from rlvr_lightning.rollout import (
    draw_categorical,
    generate_rollout,
    response_mask_from_ids,
    sample_next,
)

PROMPTS = ["<|im_start|>user\nWhat is 1 + 2?<|im_end|>\n<|im_start|>assistant\n", "Hi"]


def test_shared_prefix_engine_matches_generate_when_greedy(tiny) -> None:
    model, tokenizer = tiny
    ours = generate_rollout(model, tokenizer, PROMPTS, 3, 10, greedy=True, engine="shared_prefix")
    reference = generate_rollout(model, tokenizer, PROMPTS, 3, 10, greedy=True, engine="hf")
    assert ours.completions == reference.completions
    assert torch.equal(ours.response_mask, reference.response_mask)
    assert torch.equal(ours.input_ids, reference.input_ids)


def test_lock_step_decoding_samples_what_free_decoding_samples(tiny) -> None:
    """``synced`` (FSDP) keeps finished rows in the batch, but only unfinished rows draw, so a
    seed gives the same completions as decoding that drops finished rows (FSDP runs = DDP runs)."""
    from rlvr_lightning.rollout import sample_shared_prefix

    model, tokenizer = tiny
    encoded = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    # Half the vocabulary ends a response: rows finish at different steps.
    eos = list(range(0, len(tokenizer), 2))
    outputs = []
    for synced in (False, True):
        torch.manual_seed(3)
        outputs.append(sample_shared_prefix(
            model, encoded["input_ids"], encoded["attention_mask"], group_size=4, max_new_tokens=8,
            eos_token_ids=eos, pad_token_id=tokenizer.pad_token_id, temperature=1.3, synced=synced,
        ))
    lengths = response_mask_from_ids(outputs[0], eos)[0].sum(-1)
    assert len(set(lengths.tolist())) > 2  # rows did finish at different steps
    assert torch.equal(outputs[0], outputs[1])


def test_rollout_layout_groups_and_masks(tiny) -> None:
    model, tokenizer = tiny
    torch.manual_seed(0)
    rollout = generate_rollout(model, tokenizer, PROMPTS, 4, 8, temperature=1.0)
    assert len(rollout) == 8 and rollout.prompts[:4] == [PROMPTS[0]] * 4
    assert rollout.input_ids.shape[1] == rollout.attention_mask.shape[1]
    assert torch.equal(rollout.response_lengths, rollout.response_mask.sum(-1).long())
    # Log-probs of the sampled tokens from one forward pass are finite and <= 0.
    logp, entropy = response_logprobs(model, rollout.input_ids, rollout.attention_mask, rollout.response_length)
    valid = rollout.response_mask.bool()
    assert torch.isfinite(logp[valid]).all() and (logp[valid] <= 0).all()
    assert (entropy[valid] >= 0).all() and (entropy[valid] <= torch.log(torch.tensor(float(len(tokenizer))))).all()


def test_response_mask_includes_first_eos_only() -> None:
    ids = torch.tensor([[5, 6, 2, 7, 2], [5, 5, 5, 5, 5]])
    mask, truncated = response_mask_from_ids(ids, [2])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert truncated.tolist() == [False, True]


def test_top_p_keeps_only_the_nucleus() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    torch.manual_seed(0)
    draws = sample_next(logits, temperature=1.0, top_p=0.7, greedy=False)
    assert set(draws.tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.7; tokens 2 and 3 never drawn
    assert abs((draws == 0).float().mean().item() - 0.5 / 0.8) < 0.05
    assert sample_next(logits[:1], 1.0, 1.0, greedy=True).item() == 0


def test_categorical_draws_follow_the_weights_and_skip_zero_weight() -> None:
    torch.manual_seed(0)
    weights = torch.tensor([0.0, 1e-3, 0.25, 0.0, 0.749, 0.0])
    draws = draw_categorical(weights.expand(200_000, -1)).squeeze(-1)
    counts = torch.bincount(draws, minlength=6).double()
    expected = 200_000 * weights.double() / weights.sum()
    assert counts[weights == 0].sum() == 0
    # Each count within 5 standard deviations of its binomial mean.
    sd = (expected * (1 - expected / 200_000)).sqrt()
    assert bool(((counts - expected).abs() <= 5 * sd + 1e-9).all()), (counts, expected)
    # Unnormalised weights and rows with a single non-zero entry.
    assert draw_categorical(torch.tensor([[0.0, 0.0, 7.0], [3.0, 0.0, 0.0]])).view(-1).tolist() == [2, 0]


def test_chunked_logprobs_and_entropy_match_direct_formula() -> None:
    torch.manual_seed(0)
    logits = torch.randn(5, 7, 11, dtype=torch.float64)
    targets = torch.randint(11, (5, 7))
    logp, entropy = logprobs_and_entropy_from_logits(logits, targets, temperature=0.7, chunk_rows=2)
    log_probs = torch.log_softmax(logits.float() / 0.7, -1)
    assert torch.allclose(logp, log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1), atol=1e-5)
    assert torch.allclose(entropy, -(log_probs.exp() * log_probs).sum(-1), atol=1e-5)


def test_group_advantages() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    adv = group_advantages(rewards, 4, "grpo")
    first = rewards[:4]
    expected = (first - first.mean()) / (first.std(unbiased=True) + 1e-6)
    assert torch.allclose(adv[:4], expected)
    assert torch.equal(adv[4:], torch.zeros(4))  # constant group: no signal
    assert torch.allclose(group_advantages(rewards, 4, "dr_grpo")[:4], first - 0.25)
    assert constant_groups(rewards, 4).tolist() == [False, True]
    with pytest.raises(ValueError, match="group_size >= 2"):
        group_advantages(rewards, 1, "grpo")
    with pytest.raises(ValueError, match="unknown advantage"):
        group_advantages(rewards, 4, "nope")


def test_overlong_penalty_matches_dapo() -> None:
    # L_max 20, buffer 4: 0 up to 16, then (16 - len) / 4, -1 beyond 20.
    lengths = torch.tensor([10, 16, 17, 18, 20, 21])
    assert overlong_penalty(lengths, 20, 4).tolist() == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]
    assert overlong_penalty(lengths, 20, 0).tolist() == [0.0] * 6


def test_shared_prefix_logprobs_and_gradient_equal_full_forward() -> None:
    from rlvr_lightning.logprobs import shared_prefix_response_logprobs

    model, tokenizer = build_tiny_model(seed=1)
    tokenizer.padding_side = "left"
    model = model.double()
    torch.manual_seed(0)
    rollout = generate_rollout(model, tokenizer, [PROMPTS[0], "Hi there", "x"], 3, 9, temperature=1.5)
    width = rollout.response_length
    prompt = rollout.input_ids.shape[1] - width
    params = list(model.parameters())
    full, full_entropy = response_logprobs(model, rollout.input_ids, rollout.attention_mask, width, 1.3)
    full_grad = torch.autograd.grad((full * rollout.response_mask).sum(), params)
    shared, shared_entropy = shared_prefix_response_logprobs(
        model, rollout.input_ids[::3, :prompt], rollout.attention_mask[::3, :prompt],
        rollout.input_ids[:, prompt:], rollout.response_mask, 3, 1.3,
    )
    shared_grad = torch.autograd.grad((shared * rollout.response_mask).sum(), params)
    valid = rollout.response_mask.bool()
    assert torch.allclose(full[valid], shared[valid], atol=1e-9)
    assert torch.allclose(full_entropy[valid], shared_entropy[valid], atol=1e-9)
    for a, b in zip(full_grad, shared_grad, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("engine", ["shared_prefix", "static", "hf"])
def test_ignore_eos_forces_every_response_to_the_full_length(tiny, engine: str) -> None:
    model, tokenizer = tiny
    original = model.generation_config.eos_token_id
    # Half the vocabulary ends a response: without ignore_eos nearly every row stops early.
    model.generation_config.eos_token_id = list(range(len(tokenizer) // 2))
    try:
        torch.manual_seed(0)
        free = generate_rollout(model, tokenizer, PROMPTS, 4, 12, engine=engine)
        forced = generate_rollout(model, tokenizer, PROMPTS, 4, 12, engine=engine, ignore_eos=True)
    finally:
        model.generation_config.eos_token_id = original
    assert free.response_lengths.float().mean() < 6
    assert forced.response_lengths.tolist() == [12] * 8 and bool(forced.truncated.all())


@pytest.mark.parametrize("engine,options", [
    ("static", {}),
    ("hf", {"cache": "static"}),
    ("hf", {"cache": "static", "pad_prompts_to_multiple_of": 16}),
])
def test_other_engines_match_shared_prefix_when_greedy(tiny, engine: str, options: dict) -> None:
    model, tokenizer = tiny
    ours = generate_rollout(model, tokenizer, PROMPTS, 3, 10, greedy=True, engine="shared_prefix")
    other = generate_rollout(model, tokenizer, PROMPTS, 3, 10, greedy=True, engine=engine, **options)
    assert other.completions == ours.completions
    assert torch.equal(other.input_ids[:, -other.response_length:], ours.input_ids[:, -ours.response_length:])
    assert torch.equal(other.response_mask, ours.response_mask)


def test_compiled_static_decoding_matches_eager_on_cpu(tiny) -> None:
    """``compile_decoding=true`` compiles transformers' decoding step even on CPU (on GPUs
    ``auto`` already does): the same greedy tokens as the eager dynamic cache."""
    model, tokenizer = tiny
    eager = generate_rollout(model, tokenizer, PROMPTS, 2, 6, greedy=True, engine="hf")
    captured = torch._dynamo.utils.counters["stats"]["calls_captured"]
    compiled = generate_rollout(
        model, tokenizer, PROMPTS, 2, 6, greedy=True, engine="hf",
        cache="static", compile_decoding="true",
    )
    assert compiled.completions == eager.completions
    assert torch._dynamo.utils.counters["stats"]["calls_captured"] > captured  # dynamo traced the decode step


def test_static_cache_decodes_outside_autocast(tiny) -> None:
    """transformers' static cache (5.17, for one) keeps keys and values in one dtype, which autocast
    breaks (float32 keys after the rotary embedding, bfloat16 values): static-cache generation
    runs in the parameters' dtype; the dynamic cache keeps autocast."""
    model, tokenizer = tiny
    seen: list[torch.dtype] = []
    handle = model.model.layers[0].self_attn.v_proj.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    try:
        for cache in ("static", "dynamic"):
            seen.clear()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                generate_rollout(model, tokenizer, PROMPTS, 2, 4, greedy=True, engine="hf",
                                 cache=cache, compile_decoding="false")
            assert set(seen) == ({torch.float32} if cache == "static" else {torch.bfloat16}), (cache, set(seen))
    finally:
        handle.remove()
