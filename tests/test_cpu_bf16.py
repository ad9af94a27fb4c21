"""trainer.precision=auto and bf16 on CPUs (rlvr_lightning/precision.py).

- ``auto`` resolves to bf16-mixed on a CPU whose flags include avx512_bf16 or amx_bf16, and to
  32-true without them, when the CPU cannot be identified, on GPUs and under FSDP2; other values
  pass through; the CPU default is auto (trainer=gpu: bf16-mixed, trainer=fsdp2/fsdp: 32-true), and
  the suite pins 32-true (its numbers are float32's); a bad value is a ConfigError naming the allowed
  ones.
- Under CPU bf16 autocast, decoding runs in bfloat16 with each linear weight cast once per
  rollout (the same numbers as autocast's per-call casts); the sampler gets bfloat16 logits and
  returns float32 log-probs, close to float32's; the master weights stay float32.
- Two training steps of the tiny model run in both modes; in bf16 every phase (generation, the
  old-log-prob and reference passes, the update) computes in bfloat16, the weights and the
  optimizer state stay float32, and the run prints and records its choice.
"""

from __future__ import annotations

import math
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from rlvr_lightning import precision as precision_module
from rlvr_lightning import train
from rlvr_lightning.config import ConfigError, validate_config
from rlvr_lightning.logprobs import response_logprobs
from rlvr_lightning.precision import cpu_bf16_support, resolve_precision, weights_cast_once
from rlvr_lightning.rollout import RolloutEngine, SamplingParams, build_engine, sample_shared_prefix
from rlvr_lightning.update import PolicyUpdater
from tests.conftest import FLOAT32, TINY_OVERRIDES, compose_config

BF16 = torch.autocast("cpu", dtype=torch.bfloat16)
PROMPTS = ["12+7=", "3*4=", "100-1="]


def cpuinfo(tmp_path: Path, flags: str | None, model: str = "Test CPU 9000") -> Path:
    """A /proc/cpuinfo with two processors (x86 form); ``flags`` None: an ARM-like file without them."""
    lines = []
    for processor in range(2):
        lines += [f"processor\t: {processor}", f"model name\t: {model}"]
        lines += [f"flags\t\t: {flags}"] if flags is not None else ["Features\t: fp asimd bf16"]
        lines.append("")
    path = tmp_path / "cpuinfo"
    path.write_text("\n".join(lines))
    return path


# ------------------------------------------------------------------ detection and resolution


@pytest.mark.parametrize("flag", ["avx512_bf16", "amx_bf16"])
def test_a_bf16_flag_means_native_bf16_and_auto_picks_bf16_mixed(tmp_path: Path, flag: str) -> None:
    path = cpuinfo(tmp_path, f"fpu sse2 avx2 avx512f {flag} avx512_vnni")
    support = cpu_bf16_support(path)
    assert (support.supported, support.flag, support.cpu) == (True, flag, "Test CPU 9000")
    choice = resolve_precision({"accelerator": "cpu", "precision": "auto"}, path)
    assert choice.precision == "bf16-mixed"
    # The reason names the CPU and the flag, and the record (hyper-parameters) keeps all three.
    assert choice.describe() == f"trainer.precision=auto -> bf16-mixed: Test CPU 9000 has native bf16 ({flag} in {path})"
    assert choice.record() == {"requested": "auto", "trainer": "bf16-mixed", "reason": choice.reason}


def test_without_a_bf16_flag_auto_picks_float32(tmp_path: Path) -> None:
    path = cpuinfo(tmp_path, "fpu sse2 avx2 avx512f avx512bw avx512_vnni")  # AVX-512 without BF16
    assert cpu_bf16_support(path).supported is False
    choice = resolve_precision({"accelerator": "cpu", "precision": "auto"}, path)
    assert choice.precision == "32-true"
    assert "Test CPU 9000 has no native bf16 (neither amx_bf16 nor avx512_bf16" in choice.reason


@pytest.mark.parametrize("readable", [True, False])
def test_an_unknown_cpu_gets_float32(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, readable: bool) -> None:
    """No flags to read (an ARM cpuinfo, or no file at all) and torch's probe says no: unknown."""
    path = cpuinfo(tmp_path, None) if readable else tmp_path / "missing"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    assert cpu_bf16_support(path).supported is None
    choice = resolve_precision({"accelerator": "cpu", "precision": "auto"}, path)
    assert choice.precision == "32-true" and "unknown" in choice.reason
    # Where torch's probe finds avx512_bf16, it is believed.
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert resolve_precision({"accelerator": "cpu", "precision": "auto"}, path).precision == "bf16-mixed"


def test_auto_is_float32_on_gpus_and_under_fsdp2(tmp_path: Path) -> None:
    path = cpuinfo(tmp_path, "avx512f avx512_bf16 amx_bf16")
    gpu = resolve_precision({"accelerator": "gpu", "precision": "auto"}, path)
    assert gpu.precision == "32-true" and "not a CPU" in gpu.reason
    fsdp2 = {"accelerator": "cpu", "precision": "auto", "strategy": {"_target_": "rlvr_lightning.distributed.FSDP2Strategy"}}
    assert resolve_precision(fsdp2, path).precision == "32-true"


@pytest.mark.parametrize("value", ["32-true", "bf16-mixed", "bf16-true", 32])
def test_other_values_pass_through(tmp_path: Path, value: object) -> None:
    path = cpuinfo(tmp_path, "avx512_bf16")
    choice = resolve_precision({"accelerator": "cpu", "precision": value}, path)
    assert choice.precision == value and choice.requested == value
    if value == "32-true":  # on a bf16 CPU, the float32 run says what auto would use
        assert "trainer.precision=auto or bf16-mixed would use it" in choice.reason


def test_the_cpu_default_is_auto_and_one_line_pins_float32(tmp_path: Path) -> None:
    (tmp_path / "plain").mkdir()
    bf16, plain = cpuinfo(tmp_path, "avx512_bf16"), cpuinfo(tmp_path / "plain", "avx2 avx512f")
    for trainer in ("cpu", "ddp"):  # trainer=ddp inherits trainer=cpu's
        cfg = compose_config(["model=tiny", f"trainer={trainer}"])
        assert cfg.trainer.precision == "auto"
        assert resolve_precision(cfg.trainer, bf16).precision == "bf16-mixed"
        assert resolve_precision(cfg.trainer, plain).precision == "32-true"
    # The suite's numbers (the golden scalars among them) are float32's on any CPU.
    assert FLOAT32 in TINY_OVERRIDES
    assert resolve_precision(compose_config(TINY_OVERRIDES).trainer, bf16).precision == "32-true"
    assert compose_config(["trainer=gpu"]).trainer.precision == "bf16-mixed"  # GPUs: as before
    for trainer in ("fsdp2", "fsdp"):  # FSDP2's own mixed precision is trainer.strategy.mixed_precision
        assert compose_config([f"trainer={trainer}"]).trainer.precision == "32-true"
    for value in ("auto", "bf16-mixed", "32-true"):
        validate_config(compose_config(["model=tiny", f"trainer.precision={value}"]))


@pytest.mark.parametrize("value", ["fp32", "bf17", "float32"])
def test_an_unknown_precision_is_a_config_error(value: str) -> None:
    with pytest.raises(ConfigError) as error:
        validate_config(compose_config(["model=tiny", f"trainer.precision={value}"]))
    message = str(error.value)
    assert message.startswith(f"trainer.precision='{value}' is unknown; available: auto, ")
    for allowed in ("auto", "32-true", "bf16-mixed"):
        assert allowed in message


# ------------------------------------------------------------------ decoding and log-probs


def _engine_run(model, tokenizer, engine: str, autocast: bool, monkeypatch: pytest.MonkeyPatch):
    """One rollout, recording the dtype a decoder linear layer returns, whether it computed with
    a weight cast once (its forward replaced), and the dtype of the logits the sampler gets."""
    seen, logits_dtypes = set(), set()
    layer = model.model.layers[0].self_attn.q_proj
    hook = layer.register_forward_hook(lambda m, i, o: seen.add((o.dtype, "forward" in m.__dict__)))
    from rlvr_lightning.rollout import shared_prefix, static

    sampling = SamplingParams(max_new_tokens=12, logprobs=engine != "hf")
    torch.manual_seed(3)
    with monkeypatch.context() as patch:
        for engine_module in (shared_prefix, static):
            def sampler(logits, *args, _original=engine_module.sample_next_with_logprobs):
                logits_dtypes.add(logits.dtype)
                return _original(logits, *args)

            patch.setattr(engine_module, "sample_next_with_logprobs", sampler)
        try:
            with BF16 if autocast else nullcontext(), build_engine({"name": engine}, model, tokenizer) as instance:
                rollout = instance.generate(PROMPTS, 4, sampling)
        finally:
            hook.remove()
    return rollout, seen, logits_dtypes


@pytest.mark.parametrize("engine", ["shared_prefix", "hf", "static"])
def test_decoding_under_cpu_bf16_autocast_runs_in_bf16_with_weights_cast_once(tiny, monkeypatch, engine: str) -> None:
    """shared_prefix and hf call the model's layers (weights cast once); static runs its own
    decoder on weights it casts to autocast's dtype itself (no layer is called)."""
    model, tokenizer = tiny
    rollout, seen, logits_dtypes = _engine_run(model, tokenizer, engine, True, monkeypatch)
    assert seen == (set() if engine == "static" else {(torch.bfloat16, True)})
    if engine != "hf":  # hf: transformers' sampler
        assert logits_dtypes == {torch.bfloat16}  # the sampler upcasts them itself
        assert rollout.data["rollout_logp"].dtype == torch.float32
    # Afterwards: the layers are the model's own again, and the weights still float32.
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert {p.dtype for p in model.parameters()} == {torch.float32}

    rollout32, seen32, logits32 = _engine_run(model, tokenizer, engine, False, monkeypatch)
    assert seen32 == (set() if engine == "static" else {(torch.float32, False)})
    assert logits32 == (set() if engine == "hf" else {torch.float32})


def test_weights_cast_once_gives_autocasts_numbers(tiny) -> None:
    """Casting each weight once per rollout rounds as autocast's per-call cast: the same draws
    and log-probs, bit for bit."""
    model, tokenizer = tiny
    encoded = tokenizer(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)

    def sample(cast_once: bool):
        torch.manual_seed(5)
        with BF16, torch.no_grad(), weights_cast_once(model) if cast_once else nullcontext() as applied:
            assert applied is (True if cast_once else None)
            return sample_shared_prefix(model, encoded["input_ids"], encoded["attention_mask"], 4, 16,
                                        [tokenizer.eos_token_id], tokenizer.pad_token_id, return_logprobs=True)

    (ids, logp), (ids_once, logp_once) = sample(False), sample(True)
    assert torch.equal(ids, ids_once) and torch.equal(logp, logp_once)


def test_weights_cast_once_applies_only_to_cpu_bf16_autocast_without_gradients(tiny) -> None:
    model, _ = tiny
    with weights_cast_once(model) as applied:  # float32: nothing to do
        assert applied is False
    with torch.autocast("cpu", dtype=torch.float16), torch.no_grad(), weights_cast_once(model) as applied:
        assert applied is False
    with BF16, weights_cast_once(model) as applied:  # gradients on (the update): autocast's own casts
        assert applied is False
    with BF16, torch.no_grad(), weights_cast_once(model) as applied:
        assert applied is True and "forward" in model.lm_head.__dict__
    assert "forward" not in model.lm_head.__dict__


def test_bf16_log_probs_are_float32_and_close_to_float32s(tiny) -> None:
    model, tokenizer = tiny
    sampling = SamplingParams(max_new_tokens=16, logprobs=True)
    torch.manual_seed(7)
    with BF16, build_engine({"name": "shared_prefix"}, model, tokenizer) as engine:
        rollout = engine.generate(PROMPTS, 4, sampling)
    mask = rollout.response_mask.bool()
    with torch.no_grad():
        full, _ = response_logprobs(model, rollout.input_ids, rollout.attention_mask, rollout.response_length)
        with BF16, weights_cast_once(model):
            half, entropy = response_logprobs(model, rollout.input_ids, rollout.attention_mask, rollout.response_length)
    assert half.dtype == entropy.dtype == rollout.data["rollout_logp"].dtype == torch.float32
    # bf16 keeps 8 bits of mantissa: log-probs of a few nats move by a few thousandths.
    assert (half - full)[mask].abs().max() < 0.03
    assert (rollout.data["rollout_logp"] - full)[mask].abs().max() < 0.03
    assert (half - full)[mask].abs().max() > 0  # they are bf16's numbers, not float32's


# ------------------------------------------------------------------ training


def _record_phases(monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, set], list]:
    """(dtype a decoder linear layer returns, weight cast once) per phase of the step."""
    seen: dict[str, set] = defaultdict(set)
    phase = ["other"]

    def in_phase(original, label):
        def wrapped(self, *args, **kwargs):
            phase.append(label)
            try:
                return original(self, *args, **kwargs)
            finally:
                phase.pop()

        return wrapped

    for cls, name, label in ((RolloutEngine, "generate", "generate"), (PolicyUpdater, "old_logprobs", "old"),
                             (PolicyUpdater, "ref_logprobs", "ref"), (PolicyUpdater, "update", "update")):
        monkeypatch.setattr(cls, name, in_phase(getattr(cls, name), label))
    built: list = []
    original_build = train.build

    def build(*args, **kwargs):
        trainer, module, datamodule = original_build(*args, **kwargs)
        for model in (module.policy, module.ref_policy):
            model.model.layers[0].mlp.down_proj.register_forward_hook(
                lambda m, i, o: seen[phase[-1]].add((o.dtype, "forward" in m.__dict__))
            )
        built[:] = [trainer, module]
        return trainer, module, datamodule

    monkeypatch.setattr(train, "build", build)
    return seen, built


@pytest.mark.parametrize("mode", ["bf16", "fp32"])
def test_two_training_steps(tiny_config, tmp_path: Path, monkeypatch, capsys, mode: str) -> None:
    monkeypatch.setattr(precision_module, "CPUINFO", cpuinfo(tmp_path, "avx512f avx512_bf16"))
    seen, built = _record_phases(monkeypatch)
    overrides = ["validate_before_training=false", "objective.kl_coef=0.01", "rollout.old_logprobs_from_update=false"]
    if mode == "bf16":
        overrides.append("trainer.precision=auto")  # resolved on the (fake) bf16 CPU
    metrics = train.run(tiny_config(*overrides), run_dir=tmp_path / "run")
    trainer, module = built
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    assert trainer.precision == ("bf16-mixed" if mode == "bf16" else "32-true")
    # Every phase computed in the mode's dtype; passes without gradients with weights cast once.
    assert dict(seen) == {
        "generate": {(dtype, mode == "bf16")}, "old": {(dtype, mode == "bf16")},
        "ref": {(dtype, mode == "bf16")}, "update": {(dtype, False)},
    }
    # Mixed precision: the master weights and AdamW's moments stay float32.
    assert {p.dtype for p in module.policy.parameters()} == {torch.float32}
    state = trainer.optimizers[0].state
    assert state and {t.dtype for s in state.values() for t in s.values() if t.is_floating_point()} == {torch.float32}
    assert math.isfinite(metrics["val/accuracy"]) and module.global_step == 2
    # The choice is printed with its reason and kept in the hyper-parameters.
    printed = capsys.readouterr().out
    if mode == "bf16":
        assert "precision: trainer.precision=auto -> bf16-mixed: Test CPU 9000 has native bf16 (avx512_bf16 in" in printed
    else:
        assert "precision: trainer.precision=32-true (as configured; Test CPU 9000 has native bf16" in printed
    assert module.hparams["precision"]["trainer"] == trainer.precision
    hparams = next((tmp_path / "run").rglob("hparams.yaml")).read_text()
    assert f"trainer: {trainer.precision}" in hparams
