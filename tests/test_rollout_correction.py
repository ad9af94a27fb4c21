"""Rollout/training mismatch correction (ALGORITHMS_NEXT A3; objectives/correction.py).

Every test vector of A3; each mode's weights and the gradient they give against references
written out here (plain Python loops, independent of the implementation); the engines' log-probs
against a teacher-forced forward's processed log-probs (temperature, top-p) on the tiny model;
a forced mismatch (sampling at another temperature than the trainer's) checked for its weights
and metrics, through the updater and through full training runs; the config group.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from rlvr_lightning.config import ConfigError, validate_config
from rlvr_lightning.control import ControlState
from rlvr_lightning.objectives import (
    LossNormalizer,
    ObjectiveParams,
    PolicyBatch,
    compute_loss,
    get_objective,
)
from rlvr_lightning.objectives.correction import (
    METRIC_PREFIX,
    CorrectionSettings,
    correction_weights,
    loss_weights,
    mismatch_metrics,
    sequence_geometric_mean,
)
from rlvr_lightning.rollout import SamplingParams, generate_rollout, sample_shared_prefix
from rlvr_lightning.rollout.shared_prefix import SharedPrefixEngine
from rlvr_lightning.rollout.vllm import VLLMEngine, _sampled_logprobs
from rlvr_lightning.train import CONFIG_DIR, run
from rlvr_lightning.update import PolicyUpdater, UpdateSettings
from tests.conftest import TINY_OVERRIDES, compose_config, read_scalars

DT = torch.float64
PROMPTS = ["<|im_start|>user\nWhat is 1 + 2?<|im_end|>\n<|im_start|>assistant\n", "Hi", "a b c"]
CORRECTION_DIR = Path(CONFIG_DIR) / "correction"
BASE_TAGS = ["logp_abs_diff_mean", "logp_abs_diff_max", "kl_k1", "kl_k3", "ratio_p01", "ratio_p50",
             "ratio_p99", "ratio_min", "ratio_max", "chi2_token"]
WEIGHT_TAGS = ["weight_mean", "ess", "truncated_fraction", "masked_fraction"]


def tags(names: list[str]) -> set[str]:
    return {METRIC_PREFIX + name for name in names}


def settings(mode: str, **values) -> CorrectionSettings:
    return CorrectionSettings(mode=mode, **values)


# ----------------------------------------------------------------------------- A3.1 - A3.4

A31_OLD = [-0.5, -1.0, -2.0, -0.1]
A31_ROLLOUT = [-0.6, -0.2, -3.5, -0.1]


def a31() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    old, mu = torch.tensor([A31_OLD], dtype=DT), torch.tensor([A31_ROLLOUT], dtype=DT)
    return old, mu, torch.ones_like(old)


def test_a3_1_ratios_weights_and_metrics() -> None:
    old, mu, mask = a31()
    rho = [1.105171, 0.449329, 4.481689, 1.0]
    tis, cut = correction_weights(old, mu, mask, settings("token_truncate", cap=2.0))
    icepop, _ = correction_weights(old, mu, mask, settings("token_mask", mask_low=0.5, mask_high=5.0))
    assert tis[0].tolist() == pytest.approx([1.105171, 0.449329, 2.0, 1.0], abs=1e-6)
    assert icepop[0].tolist() == pytest.approx([1.105171, 0.0, 4.481689, 1.0], abs=1e-6)
    assert cut[0].tolist() == [False, False, True, False]
    metrics = {k.removeprefix(METRIC_PREFIX): v for k, v in mismatch_metrics(old, mu, mask, tis, cut).items()}
    assert metrics["ratio_min"] == pytest.approx(min(rho), abs=1e-6)
    assert metrics["ratio_max"] == pytest.approx(max(rho), abs=1e-6)
    expected = {
        "logp_abs_diff_mean": 0.6, "logp_abs_diff_max": 1.5, "kl_k1": -0.2, "kl_k3": 0.559047,
        "chi2_token": 4.627209, "ratio_p50": 1.052585, "weight_mean": 1.138625, "ess": 0.807353,
        "truncated_fraction": 0.25, "masked_fraction": 0.0,
    }
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-6), key
    icepop_metrics = mismatch_metrics(old, mu, mask, icepop)
    assert icepop_metrics[METRIC_PREFIX + "masked_fraction"] == 0.25
    assert icepop_metrics[METRIC_PREFIX + "truncated_fraction"] == 0.0


@pytest.mark.parametrize(
    ("mode", "loss", "weighted_grad"),
    [
        (settings("token_truncate", cap=2.0), -1.138625, [-0.276293, -0.112332, -0.5, -0.25]),
        (settings("token_mask", mask_low=0.5, mask_high=5.0), -1.646715, [-0.276293, 0.0, -1.120422, -0.25]),
    ],
)
def test_a3_2_ppo_loss_and_gradient(mode: CorrectionSettings, loss: float, weighted_grad: list[float]) -> None:
    old, mu, mask = a31()
    weights, _ = correction_weights(old, mu, mask, mode)
    logp = old.clone().requires_grad_(True)  # r = 1
    batch = PolicyBatch(logp=logp, old_logp=old, advantages=torch.ones_like(old), mask=mask.bool(),
                        is_weights=weights.double())
    value, _ = compute_loss("ppo", batch, ControlState(), ObjectiveParams(aggregation="token-mean"),
                            LossNormalizer(num_tokens=4, num_sequences=1, max_response_length=4))
    value.backward()
    assert float(value.detach()) == pytest.approx(loss, abs=1e-6)
    assert logp.grad[0].tolist() == pytest.approx(weighted_grad, abs=1e-6)


A33_DELTAS = [[0.1, -0.8, 1.5, 0.0], [0.3, 0.4, 0.5], [-0.05, -0.1, 0.02]]


def a33() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three sequences of lengths 4, 3, 3 (right-padded) with the deltas of A3.3."""
    delta = torch.zeros(3, 4, dtype=DT)
    mask = torch.zeros(3, 4, dtype=DT)
    for row, values in enumerate(A33_DELTAS):
        delta[row, : len(values)] = torch.tensor(values, dtype=DT)
        mask[row, : len(values)] = 1.0
    old = torch.full_like(delta, -1.0)
    return old, old - delta, mask


def per_sequence(weights: torch.Tensor, mask: torch.Tensor) -> list[float]:
    """The one value each row carries on its tokens (asserting it is one value)."""
    out = []
    for row in range(weights.shape[0]):
        values = weights[row][mask[row].bool()]
        assert torch.allclose(values, values[0].expand_as(values))
        out.append(float(values[0]))
    return out


def test_a3_3_sequence_modes_geometric_means_and_geo_reject() -> None:
    old, mu, mask = a33()
    seq_tis, cut = correction_weights(old, mu, mask, settings("sequence_truncate", cap=2.0))
    seq_mis, _ = correction_weights(old, mu, mask, settings("sequence_mask", mask_low=0.0, mask_high=3.0))
    assert per_sequence(seq_tis, mask) == pytest.approx([2.0, 2.0, 0.878095], abs=1e-6)
    assert per_sequence(seq_mis, mask) == pytest.approx([2.225541, 0.0, 0.878095], abs=1e-6)
    assert per_sequence(cut.double(), mask) == [1.0, 1.0, 0.0]
    # prod rho (a band too wide to cut anything) and the geometric means of the token ratios.
    product, _ = correction_weights(old, mu, mask, settings("sequence_mask", mask_low=0.0, mask_high=1e9))
    assert per_sequence(product, mask) == pytest.approx([2.225541, 3.320117, 0.878095], abs=1e-6)
    rho = (old - mu).exp()
    geo = sequence_geometric_mean(rho, mask)
    assert per_sequence(geo, mask) == pytest.approx([1.221403, 1.491825, 0.957592], abs=1e-6)
    rejected, _ = correction_weights(old, mu, mask, settings("token_truncate", cap=2.0, geo_low=0.8, geo_high=1.25))
    kept = [bool(rejected[row][mask[row].bool()].any()) for row in range(3)]
    assert kept == [True, False, True]
    tis, _ = correction_weights(old, mu, mask, settings("token_truncate", cap=2.0))
    assert torch.equal(rejected[0], tis[0]) and torch.equal(rejected[2], tis[2])  # kept rows keep TIS
    assert (rejected * (1 - mask)).abs().sum() == 0  # padding carries no weight


def test_a3_4_token_mask_bounds_the_ratio_not_its_inverse() -> None:
    rho = torch.tensor([[0.65, 1.5, 1.0, 0.7]], dtype=DT)
    old = torch.full_like(rho, -1.0)
    weights, _ = correction_weights(old, old - rho.log(), torch.ones_like(rho),
                                    settings("token_mask", mask_low=0.6, mask_high=1.4))
    assert (weights[0] != 0).tolist() == [True, False, True, True]
    assert weights[0].tolist() == pytest.approx([0.65, 0.0, 1.0, 0.7], abs=1e-6)


# ----------------------------------------------------------------------------- each mode vs a reference


def reference_weights(old: list[list[float]], mu: list[list[float]], lengths: list[int], s: CorrectionSettings):
    """iw per token from the formulas of A3, element by element."""
    out = []
    for row_old, row_mu, length in zip(old, mu, lengths, strict=True):
        deltas = [max(-20.0, min(20.0, o - m)) for o, m in zip(row_old[:length], row_mu[:length], strict=True)]
        if s.mode.startswith("token"):
            ratios = [math.exp(d) for d in deltas]
        else:
            ratios = [math.exp(sum(deltas))] * length
        if s.mode.endswith("truncate"):
            weights = [min(r, s.cap) for r in ratios]
        else:
            weights = [r if s.mask_low <= r <= s.mask_high else 0.0 for r in ratios]
        if s.geo_low is not None:
            geo = math.exp(sum(deltas) / length)
            if not s.geo_low <= geo <= s.geo_high:
                weights = [0.0] * length
        out.append(weights + [0.0] * (len(row_old) - length))
    return out


MODES = [
    settings("token_truncate", cap=1.5),
    settings("token_mask", mask_low=0.8, mask_high=1.25),
    settings("sequence_truncate", cap=1.2),
    settings("sequence_mask", mask_low=0.5, mask_high=2.0),
    settings("token_truncate", cap=2.0, geo_low=0.9, geo_high=1.1),
    settings("sequence_mask", mask_low=0.0, mask_high=3.0, geo_low=0.95, geo_high=1.05),
]


def random_rollout(seed: int = 0, rows: int = 6, width: int = 7):
    generator = torch.Generator().manual_seed(seed)
    lengths = [width, 3, 5, 1, width, 4][:rows]
    old = -torch.rand(rows, width, generator=generator, dtype=DT) * 3
    mu = old - torch.randn(rows, width, generator=generator, dtype=DT) * 0.3
    mu[0, 2] = old[0, 2] + 30.0  # beyond the delta clamp
    mask = torch.zeros(rows, width, dtype=DT)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1.0
    return old, mu, mask, lengths


@pytest.mark.parametrize("mode", MODES, ids=lambda s: f"{s.mode}{'+geo' if s.geo_low else ''}")
def test_each_mode_weights_match_the_reference(mode: CorrectionSettings) -> None:
    old, mu, mask, lengths = random_rollout()
    weights, _ = correction_weights(old, mu, mask, mode)
    expected = reference_weights(old.tolist(), mu.tolist(), lengths, mode)
    assert weights.tolist() == [pytest.approx(row, rel=1e-6, abs=1e-7) for row in expected]
    assert weights.dtype == torch.float32 and not weights.requires_grad


def reference_ppo_loss(logp, old, advantages, mask, weights, eps=0.2):
    """Token-mean of iw_t * -min(r A, clip(r, 1 - eps, 1 + eps) A), written out."""
    ratio = (logp - old).exp()
    per_token = -torch.minimum(ratio * advantages, ratio.clamp(1 - eps, 1 + eps) * advantages)
    return (per_token * weights * mask).sum() / mask.sum()


@pytest.mark.parametrize("mode", MODES, ids=lambda s: f"{s.mode}{'+geo' if s.geo_low else ''}")
def test_each_mode_gradient_matches_the_reference(mode: CorrectionSettings) -> None:
    old, mu, mask, lengths = random_rollout()
    weights = torch.tensor(reference_weights(old.tolist(), mu.tolist(), lengths, mode), dtype=DT)
    generator = torch.Generator().manual_seed(1)
    start = old + torch.randn(old.shape, generator=generator, dtype=DT) * 0.3  # ratios off 1: some clipped
    advantages = torch.randn(old.shape[0], 1, generator=generator, dtype=DT).expand_as(old)
    ours = start.clone().requires_grad_(True)
    batch = PolicyBatch(logp=ours, old_logp=old, advantages=advantages, mask=mask.bool(),
                        is_weights=correction_weights(old, mu, mask, mode)[0].double())
    normalizer = LossNormalizer(num_tokens=float(mask.sum()), num_sequences=6, max_response_length=7)
    loss, _ = compute_loss("ppo", batch, ControlState(), ObjectiveParams(aggregation="token-mean"), normalizer)
    loss.backward()
    reference = start.clone().requires_grad_(True)
    expected = reference_ppo_loss(reference, old, advantages, mask, weights)
    expected.backward()
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    assert torch.allclose(ours.grad, reference.grad, atol=1e-7)


@pytest.mark.parametrize("objective", ["gspo", "gmpo"])
def test_sequence_level_objectives_take_the_geometric_mean_of_the_token_weights(objective: str) -> None:
    old, mu, mask, lengths = random_rollout()
    mode = settings("token_truncate", cap=1.5)
    token_weights = torch.tensor(reference_weights(old.tolist(), mu.tolist(), lengths, mode), dtype=DT)
    geo = torch.zeros_like(token_weights)
    for row, length in enumerate(lengths):  # the geometric mean of each sequence's weights
        geo[row, :length] = math.exp(sum(math.log(w) for w in token_weights[row, :length].tolist()) / length)
    generator = torch.Generator().manual_seed(2)
    start = old + torch.randn(old.shape, generator=generator, dtype=DT) * 0.1
    advantages = torch.randn(old.shape[0], 1, generator=generator, dtype=DT).expand_as(old)
    params = ObjectiveParams(aggregation="seq-mean-token-mean")
    normalizer = LossNormalizer(num_tokens=float(mask.sum()), num_sequences=6, max_response_length=7)
    ours = start.clone().requires_grad_(True)
    batch = PolicyBatch(logp=ours, old_logp=old, advantages=advantages, mask=mask.bool(), is_weights=token_weights)
    loss, _ = compute_loss(objective, batch, ControlState(eps_low=0.4, eps_high=0.4), params, normalizer)
    loss.backward()
    # Reference: the objective's own per-token loss times the geometric means, seq-mean-token-mean.
    reference = start.clone().requires_grad_(True)
    plain = PolicyBatch(logp=reference, old_logp=old, advantages=advantages, mask=mask.bool())
    per_token = get_objective(objective).fn(plain, ControlState(eps_low=0.4, eps_high=0.4), params).per_token_loss
    expected = ((per_token * geo * mask).sum(-1) / mask.sum(-1)).sum() / 6
    expected.backward()
    assert float(loss) == pytest.approx(float(expected), rel=1e-9)
    assert torch.allclose(ours.grad, reference.grad, atol=1e-12)
    assert torch.allclose(loss_weights(objective, token_weights, mask) * mask, geo)
    assert torch.equal(loss_weights("ppo", token_weights, mask), token_weights)


def test_zero_weights_keep_the_normaliser_and_the_extras_unweighted() -> None:
    old, mu, mask, _ = random_rollout()
    generator = torch.Generator().manual_seed(3)
    ref_logp = old + torch.randn(old.shape, generator=generator, dtype=DT) * 0.2
    normalizer = LossNormalizer(num_tokens=float(mask.sum()), num_sequences=6, max_response_length=7)
    params = ObjectiveParams(kl_coef=0.5, nll_coef=0.3)
    control = ControlState(entropy_coef=0.1)
    entropy = torch.rand(old.shape, generator=generator, dtype=DT)
    results = []
    for advantages, weights in ((torch.ones_like(old), torch.zeros_like(old)), (torch.zeros_like(old), None)):
        logp = old.clone().requires_grad_(True)
        batch = PolicyBatch(logp=logp, old_logp=old, advantages=advantages, mask=mask.bool(), ref_logp=ref_logp,
                            entropy=entropy, correct=torch.ones(6, dtype=torch.bool), is_weights=weights)
        loss, metrics = compute_loss("grpo", batch, control, params, replace(normalizer, num_correct_tokens=1.0))
        loss.backward()
        results.append((float(loss), logp.grad, float(metrics["objective/policy_loss"])))
    # All weights 0 with A = 1 leave exactly the extras of A = 0 (no policy term), whose means
    # still divide by every token of the mask.
    (weighted, weighted_grad, policy), (extras, extras_grad, _) = results
    assert weighted == pytest.approx(extras, rel=1e-12) and extras != 0.0
    assert torch.allclose(weighted_grad, extras_grad, atol=1e-15)
    assert policy == 0.0


def test_unknown_rollout_logprobs_count_as_matched_tokens() -> None:
    old, mu, mask = a31()
    mu[0, 2] = float("nan")
    weights, _ = correction_weights(old, mu, mask, settings("token_truncate"))
    assert weights[0].tolist() == pytest.approx([1.105171, 0.449329, 1.0, 1.0], abs=1e-6)
    metrics = mismatch_metrics(old, mu, mask)
    assert all(math.isfinite(v) for v in metrics.values())
    assert metrics[METRIC_PREFIX + "logp_abs_diff_max"] == pytest.approx(0.8)


def test_metrics_skip_masked_tokens_and_settings_are_checked() -> None:
    old, mu, mask = a31()
    mask[0, 2] = 0.0  # the token with rho = 4.48 leaves
    metrics = mismatch_metrics(old, mu, mask)
    assert set(metrics) == tags(BASE_TAGS)
    assert metrics[METRIC_PREFIX + "ratio_max"] == pytest.approx(1.105171, abs=1e-6)
    assert mismatch_metrics(old, mu, torch.zeros_like(mask)) == {}
    with pytest.raises(ValueError, match=r"correction.mode='tls' is unknown; available: none, token_truncate"):
        CorrectionSettings(mode="tls")
    with pytest.raises(ValueError, match=r"correction.mask_low=2.0, correction.mask_high=1.0"):
        CorrectionSettings(mode="token_mask", mask_low=2.0, mask_high=1.0)
    with pytest.raises(ValueError, match=r"correction.geo_low.*mode='bypass' applies no weights"):
        CorrectionSettings(mode="bypass", geo_low=0.5, geo_high=2.0)
    with pytest.raises(ValueError, match=r"correction.cpa is not a setting of correction; its settings: mode, cap"):
        CorrectionSettings.from_config({"mode": "token_truncate", "cpa": 2.0})


# ----------------------------------------------------------------------------- engines


def processed_logprobs(model, rollout, temperature: float, top_p: float) -> torch.Tensor:
    """Teacher-forced: log-prob of each response token under softmax(logits / T) restricted to
    the top-p nucleus (the smallest prefix of the sorted probabilities reaching top_p) and
    renormalised, from one transformers forward over the whole rows."""
    width = rollout.response_length
    positions = (rollout.attention_mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        logits = model(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                       position_ids=positions).logits[:, -width - 1 : -1].double()
    probs = torch.softmax(logits / temperature, dim=-1)
    tokens = rollout.input_ids[:, -width:]
    out = torch.zeros(tokens.shape, dtype=DT)
    for row in range(tokens.shape[0]):
        for t in range(width):
            p = probs[row, t]
            ordered, order = p.sort(descending=True)
            before = ordered.cumsum(0) - ordered
            nucleus = order[before < top_p]
            token = int(tokens[row, t])
            if rollout.response_mask[row, t]:
                out[row, t] = math.log(p[token] / p[nucleus].sum()) if token in nucleus.tolist() else -math.inf
    return out


@pytest.mark.parametrize("engine", ["shared_prefix", "static"])
@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.7, 0.9), (1.3, 0.6)])
def test_engine_logprobs_equal_the_teacher_forced_processed_logprobs(tiny, engine, temperature, top_p) -> None:
    model, tokenizer = tiny
    torch.manual_seed(0)
    rollout = generate_rollout(model, tokenizer, PROMPTS, 4, 12, temperature=temperature, top_p=top_p,
                               engine=engine, logprobs=True)
    got = rollout.data["rollout_logp"]
    assert got.shape == rollout.response_mask.shape and got.dtype == torch.float32
    expected = processed_logprobs(model, rollout, temperature, top_p)
    assert torch.isfinite(expected).all()  # every drawn token lies in its nucleus
    assert torch.allclose(got.double(), expected, atol=2e-5), (got.double() - expected).abs().max()
    assert (got * (1 - rollout.response_mask)).abs().sum() == 0  # 0 after EOS, like other per-token data
    if top_p < 1.0:  # the nucleus renormalisation shows: above the plain tempered log-prob
        assert (expected > processed_logprobs(model, rollout, temperature, 1.0) + 1e-6).any()


def test_returning_logprobs_leaves_the_draws_unchanged(tiny) -> None:
    model, tokenizer = tiny
    encoded = tokenizer(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    args = (model, encoded["input_ids"], encoded["attention_mask"], 4, 12, [tokenizer.eos_token_id],
            tokenizer.pad_token_id, 0.8, 0.9)
    torch.manual_seed(5)
    plain = sample_shared_prefix(*args)
    after_plain = torch.rand(1)
    torch.manual_seed(5)
    ids, logp = sample_shared_prefix(*args, return_logprobs=True)
    assert torch.equal(ids, plain) and torch.equal(torch.rand(1), after_plain)
    assert logp.shape == ids.shape and (logp <= 0).all()


def test_engines_without_logprobs_are_refused_when_asked(tiny) -> None:
    model, tokenizer = tiny

    class IdsOnly(SharedPrefixEngine):
        def response_ids(self, *args, **kwargs):
            return super().response_ids(*args, **kwargs)[0]

    engine = IdsOnly(model, tokenizer)
    assert "rollout_logp" not in engine.generate(PROMPTS, 2, SamplingParams(max_new_tokens=4)).data
    with pytest.raises(ValueError, match="returned no log-probs of the sampled tokens"):
        engine.generate(PROMPTS, 2, SamplingParams(max_new_tokens=4, logprobs=True))


class _FakeLLM:
    """What ``VLLMEngine._generate`` reads of ``vllm.LLM.generate``'s outputs."""

    def __init__(self, completions):
        self.completions = completions
        self.params = []

    def generate(self, requests, params, use_tqdm=False):
        self.params = params
        return [SimpleNamespace(outputs=self.completions)]


def test_vllm_asks_for_logprobs_only_when_the_rollout_does() -> None:
    engine = VLLMEngine.__new__(VLLMEngine)

    def entry(token: int, value: float) -> dict[int, SimpleNamespace]:
        return {token: SimpleNamespace(logprob=value)}

    completions = [
        SimpleNamespace(index=0, token_ids=[5, 6, 2], finish_reason="stop", stop_reason=2,
                        logprobs=[entry(5, -0.5), entry(6, -1.5), entry(2, -0.25)]),
        SimpleNamespace(index=1, token_ids=[7], finish_reason="stop", stop_reason=2,  # EOS not kept
                        logprobs=[entry(7, -2.0)]),
    ]
    engine.llm = _FakeLLM(completions)
    engine.sampling_params = lambda **kwargs: kwargs
    rows, logprobs = engine._generate([[1, 2]], 2, 4, [2], 0, 1.0, 1.0, False, False)
    assert logprobs is None and all("logprobs" not in p for p in engine.llm.params)  # unchanged without
    rows_with, logprobs = engine._generate([[1, 2]], 2, 4, [2], 0, 1.0, 1.0, False, False, logprobs=True)
    assert all(p["logprobs"] == 0 for p in engine.llm.params)
    assert torch.equal(rows_with, rows) and rows[1].tolist() == [7, 2, 0, 0]
    assert logprobs[0, :3].tolist() == [-0.5, -1.5, -0.25]
    assert logprobs[1, 0] == -2.0 and torch.isnan(logprobs[1, 1])  # the appended EOS: unknown
    missing = SimpleNamespace(logprobs=None)
    assert torch.isnan(_sampled_logprobs(missing, [3, 4], 3)).all()


HAS_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed")
def test_vllm_logprobs_equal_the_teacher_forced_processed_logprobs() -> None:
    from rlvr_lightning.models import build_tiny_model

    model, tokenizer = build_tiny_model(seed=0, hidden_size=128, num_heads=2, num_kv_heads=1)  # vLLM's head sizes
    tokenizer.padding_side = "left"
    model.eval()
    torch.manual_seed(0)
    rollout = generate_rollout(model, tokenizer, PROMPTS, 4, 10, temperature=0.8, top_p=0.9, engine="vllm",
                               logprobs=True)
    expected = processed_logprobs(model, rollout, 0.8, 0.9)
    assert torch.allclose(rollout.data["rollout_logp"].double(), expected, atol=1e-3)


# ----------------------------------------------------------------------------- forced mismatch


def updater(model, correction: CorrectionSettings, **update) -> PolicyUpdater:
    return PolicyUpdater(model, "grpo", ObjectiveParams(), ControlState(),
                         UpdateSettings(temperature=1.0, **update), correction=correction)


def cold_rollout(model, tokenizer, temperature: float = 0.25):
    """Sampled at ``temperature``; the trainer's log-probs are at 1.0: a known mismatch."""
    torch.manual_seed(0)
    rollout = generate_rollout(model, tokenizer, PROMPTS, 4, 12, temperature=temperature, logprobs=True)
    rollout.data["loss_mask"] = rollout.response_mask.clone()
    generator = torch.Generator().manual_seed(0)
    rollout.data["advantages"] = torch.randn(len(rollout), generator=generator)
    rollout.data["correct"] = torch.zeros(len(rollout), dtype=torch.bool)
    return rollout


def test_forced_mismatch_weights_and_metrics(tiny) -> None:
    model, tokenizer = tiny
    rollout = cold_rollout(model, tokenizer)
    mode = settings("token_truncate", cap=2.0)
    worker = updater(model, mode)
    worker.old_logprobs(rollout)
    metrics = worker.rollout_correction(rollout)
    assert set(metrics) == tags(BASE_TAGS + WEIGHT_TAGS)
    # Reference: pi_old (T = 1) and mu (T = 0.25) from one teacher-forced forward.
    mask = rollout.response_mask.bool()
    old = processed_logprobs(model, rollout, 1.0, 1.0)[mask]
    mu = processed_logprobs(model, rollout, 0.25, 1.0)[mask]
    delta = (old - mu).clamp(-20, 20)
    rho = delta.exp()
    weights = rho.clamp(max=2.0)
    assert torch.allclose(rollout.data["is_weights"][mask].double(), weights, rtol=1e-4)
    assert (rollout.data["is_weights"][~mask] == 0).all()
    expected = {
        "logp_abs_diff_mean": (old - mu).abs().mean(), "logp_abs_diff_max": (old - mu).abs().max(),
        "kl_k1": (mu - old).mean(), "kl_k3": (rho - 1 - delta).mean(), "chi2_token": (rho**2).mean() - 1,
        "ratio_min": rho.min(), "ratio_max": rho.max(), "ratio_p50": rho.quantile(0.5),
        "ratio_p01": rho.quantile(0.01), "ratio_p99": rho.quantile(0.99),
        "weight_mean": weights.mean(), "ess": weights.mean() ** 2 / (weights**2).mean(),
        "truncated_fraction": (rho > 2.0).double().mean(), "masked_fraction": torch.tensor(0.0),
    }
    for key, value in expected.items():
        assert metrics[METRIC_PREFIX + key] == pytest.approx(float(value), rel=1e-4, abs=1e-5), key
    # The mismatch is real: a cold sampler puts more mass on the tokens it drew than pi_old does.
    assert metrics[METRIC_PREFIX + "kl_k3"] > 0.05 and metrics[METRIC_PREFIX + "ratio_p50"] < 0.9


def capture_batches(monkeypatch) -> list[PolicyBatch]:
    import rlvr_lightning.update as update_module

    seen: list[PolicyBatch] = []

    def spy(name, batch, *args):
        seen.append(batch)
        return compute_loss(name, batch, *args)

    monkeypatch.setattr(update_module, "compute_loss", spy)
    return seen


def by_row(batches: list[PolicyBatch], rollout, attribute: str) -> dict[int, torch.Tensor]:
    """Each row's tensor of the batches seen, matched to its rollout row by its advantage (one
    random value per row)."""
    out = {}
    for batch in batches:
        for values, advantage in zip(getattr(batch, attribute), batch.advantages[:, 0], strict=True):
            out[int((rollout.data["advantages"] - advantage).abs().argmin())] = values
    return out


@pytest.mark.parametrize("mode", [settings("token_truncate", cap=2.0), settings("sequence_mask", mask_high=3.0,
                                                                                 mask_low=0.0)])
def test_pi_old_from_the_update_pass_gives_the_same_weights(tiny, monkeypatch, mode) -> None:
    """With one update per rollout pi_old's log-probs come from the update pass, and the weights
    are computed per micro-batch from it: the same as from a separate pre-update pass."""
    model, tokenizer = tiny
    seen = capture_batches(monkeypatch)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: both passes see the same policy
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)

    separate = cold_rollout(model, tokenizer)
    worker = updater(model, mode, epochs=1, mini_batches=1)
    worker.old_logprobs(separate)
    worker.rollout_correction(separate)
    worker.update(separate, optimizer, scheduler, torch.Generator().manual_seed(0), old_from_update=False)
    before = by_row(seen, separate, "is_weights")
    seen.clear()
    joint = cold_rollout(model, tokenizer)
    worker.update(joint, optimizer, scheduler, torch.Generator().manual_seed(0), old_from_update=True)
    after = by_row(seen, joint, "is_weights")
    assert sorted(before) == sorted(after) == list(range(len(joint)))
    for row in before:
        assert torch.allclose(before[row], after[row], rtol=1e-5, atol=1e-6)
    assert any((values < 0.999).any() for values in after.values())  # real weights, not ones
    assert worker.rollout_correction(joint)[METRIC_PREFIX + "weight_mean"] == pytest.approx(
        float(separate.data["is_weights"].sum() / separate.response_mask.sum()), rel=1e-5)


def test_bypass_anchors_the_ratio_on_the_rollout_logprobs(tiny, monkeypatch) -> None:
    model, tokenizer = tiny
    seen = capture_batches(monkeypatch)
    rollout = cold_rollout(model, tokenizer)
    worker = updater(model, settings("bypass"), epochs=1, mini_batches=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    worker.update(rollout, optimizer, scheduler, torch.Generator().manual_seed(0), old_from_update=True)
    anchors = by_row(seen, rollout, "old_logp")
    mask = rollout.response_mask
    for row, anchor in anchors.items():
        width = anchor.shape[0]
        assert torch.allclose(anchor * mask[row, :width], rollout.data["rollout_logp"][row, :width])
    assert all(batch.is_weights is None for batch in seen)
    # pi_old's own log-probs (the update pass) differ from the anchor: the mismatch is forced.
    assert not torch.allclose(rollout.data["old_logp"], rollout.data["rollout_logp"], atol=1e-2)


# ----------------------------------------------------------------------------- training runs


class ColdEngine(SharedPrefixEngine):
    """Samples at a quarter of the rollout temperature (the trainer's log-probs stay at it): a
    known mismatch for a whole training run."""

    def response_ids(self, prompt_ids, prompt_mask, group_size, sampling, eos, lockstep):
        colder = replace(sampling, temperature=sampling.temperature / 4)
        return super().response_ids(prompt_ids, prompt_mask, group_size, colder, eos, lockstep)


RUN = TINY_OVERRIDES + ["validate_before_training=false", "trainer.val_check_interval=100"]


@pytest.mark.parametrize(
    ("name", "extra", "weighted"),
    [
        ("tis", ["rollout.epochs=2"], True),
        ("mis", ["rollout.epochs=2"], True),
        ("sequence_tis", [], True),
        ("sequence_mis", ["objective=gspo"], True),
        ("geo_reject", [], True),
        ("bypass", ["objective=dppo"], False),
        ("tis", ["rollout.mini_batches=1"], True),  # pi_old from the update pass
        ("none", [], False),
    ],
)
def test_training_runs_log_the_mismatch_metrics(tmp_path: Path, name, extra, weighted) -> None:
    run(compose_config(RUN + [f"correction={name}", *extra]), run_dir=tmp_path / "run")
    scalars = read_scalars(tmp_path / "run")
    logged = {tag for tag in scalars if tag.startswith(METRIC_PREFIX)}
    assert logged == tags(BASE_TAGS + (WEIGHT_TAGS if weighted else []))
    for tag in logged:
        assert [step for step, _ in scalars[tag]] == [0, 1]
    # On CPU the engine's and the trainer's log-probs agree to float32 rounding.
    assert max(value for _, value in scalars[METRIC_PREFIX + "logp_abs_diff_max"]) < 1e-4


def test_a_forced_mismatch_shows_in_a_training_run(tmp_path: Path) -> None:
    run(compose_config(RUN + ["correction=tis", f"rollout.engine.name={__name__}.ColdEngine"]),
        run_dir=tmp_path / "run")
    scalars = read_scalars(tmp_path / "run")
    last = {tag.removeprefix(METRIC_PREFIX): points[-1][1] for tag, points in scalars.items()
            if tag.startswith(METRIC_PREFIX)}
    assert last["kl_k3"] > 0.05 and last["logp_abs_diff_mean"] > 0.1
    assert last["weight_mean"] < 1.0 and last["ratio_min"] < 0.5
    assert 0.0 < last["ess"] < 1.0


# ----------------------------------------------------------------------------- config


def test_every_correction_yaml_composes_and_names_its_mode() -> None:
    expected = {"none": "none", "tis": "token_truncate", "mis": "token_mask", "sequence_tis": "sequence_truncate",
                "sequence_mis": "sequence_mask", "geo_reject": "token_truncate", "bypass": "bypass"}
    assert sorted(p.stem for p in CORRECTION_DIR.glob("*.yaml")) == sorted(expected)
    defaults = CorrectionSettings()
    for name, mode in expected.items():
        cfg = compose_config(TINY_OVERRIDES + [f"correction={name}"])
        validate_config(cfg)
        block = OmegaConf.to_container(cfg.correction)
        correction = CorrectionSettings.from_config(block)
        assert correction.mode == mode
        if mode == "token_truncate":
            assert correction.cap == defaults.cap  # the YAML states the Python default
        if mode == "token_mask":
            assert (correction.mask_low, correction.mask_high) == (defaults.mask_low, defaults.mask_high)
    assert compose_config(TINY_OVERRIDES).correction.mode == "none"  # the default


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["correction=tis", "rollout/engine=hf"], r"correction.mode=token_truncate needs the sampled tokens' "
                                                  r"log-probs, and rollout/engine=hf does not return them"),
        (["correction=mis", "correction.mask_low=6.0"], r"correction.mask_low=6.0 must be < correction.mask_high=5.0"),
        (["correction=tis", "correction.cap=0"], r"correction.cap=0 must be > 0"),
        (["correction=tis", "correction.mode=tls"], r"correction.mode='tls' is unknown; available: none"),
        (["correction=tis", "correction.geo_low=0.9"], r"correction.geo_low=0.9 and correction.geo_high=None"),
        (["correction=bypass", "+correction.geo_low=0.9", "+correction.geo_high=1.1"],
         r"correction.mode=bypass applies none"),
        (["correction=tis", "+correction.cpa=3"], r"correction.cpa is not a setting of correction"),
    ],
)
def test_bad_correction_settings_are_refused_naming_the_field(overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        validate_config(compose_config(TINY_OVERRIDES + overrides))
