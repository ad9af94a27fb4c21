"""The rollout engine protocol: registry, options (Python defaults = YAML), errors, a user's own
engine by dotted path (the README's example), and the module closing its engine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from examples.top_k_engine import TopKEngine
from rlvr_lightning.config import ConfigError, validate_config
from rlvr_lightning.rollout import (
    ENGINES,
    SamplingParams,
    build_engine,
    engine_options,
    generate_rollout,
)
from rlvr_lightning.train import CONFIG_DIR, run
from tests.conftest import TINY_OVERRIDES, compose_config, read_scalars

ENGINE_DIR = Path(CONFIG_DIR) / "rollout" / "engine"
PROMPTS = ["<|im_start|>user\nWhat is 1 + 2?<|im_end|>\n<|im_start|>assistant\n", "Hi"]


def test_every_registered_engine_has_a_yaml_with_its_python_defaults() -> None:
    assert sorted(p.stem for p in ENGINE_DIR.glob("*.yaml")) == sorted(ENGINES)
    for name in ENGINES:
        yaml = OmegaConf.to_container(OmegaConf.load(ENGINE_DIR / f"{name}.yaml"))
        assert yaml.pop("name") == name
        assert yaml == engine_options(name), f"conf/rollout/engine/{name}.yaml differs from the class defaults"


def test_unknown_engine_option_and_name_are_refused_with_the_allowed_ones(tiny) -> None:
    model, tokenizer = tiny
    with pytest.raises(ValueError, match=r"rollout.engine.cuda_graph is not an option of rollout/engine=static.*"
                                         r"cuda_graphs"):
        build_engine({"name": "static", "cuda_graph": "true"}, model, tokenizer)
    with pytest.raises(ValueError, match=r"rollout.engine.name='sglang' is unknown; available: hf, shared_prefix"):
        build_engine({"name": "sglang"}, model, tokenizer)
    with pytest.raises(ValueError, match="cannot import 'no_such_package'"):
        build_engine({"name": "no_such_package.Engine"}, model, tokenizer)
    with pytest.raises(ConfigError, match=r"rollout.engine.top_kk is not an option of .*TopKEngine.*top_k"):
        validate_config(compose_config(TINY_OVERRIDES + [
            "rollout.engine.name=examples.top_k_engine.TopKEngine", "+rollout.engine.top_kk=5"]))


def test_a_users_engine_by_dotted_path_samples_and_trains(tiny, tmp_path: Path) -> None:
    model, tokenizer = tiny
    greedy = generate_rollout(model, tokenizer, PROMPTS, 3, 8, greedy=True)
    ours = generate_rollout(model, tokenizer, PROMPTS, 3, 8, greedy=True, engine="examples.top_k_engine:TopKEngine")
    assert ours.completions == greedy.completions  # greedy: the same tokens whatever the engine
    engine = build_engine({"name": "examples.top_k_engine.TopKEngine", "top_k": 1}, model, tokenizer)
    assert isinstance(engine, TopKEngine)
    torch.manual_seed(0)
    top_1 = engine.generate(PROMPTS, 3, SamplingParams(max_new_tokens=8, temperature=1.0))
    assert top_1.completions == greedy.completions  # top-1 sampling is greedy decoding

    run(compose_config(TINY_OVERRIDES + [
        "trainer.max_steps=1", "validate_before_training=false",
        "rollout.engine.name=examples.top_k_engine.TopKEngine", "+rollout.engine.top_k=20",
    ]), run_dir=tmp_path / "run")
    assert [step for step, _ in read_scalars(tmp_path / "run")["reward/mean"]] == [0]


def test_the_module_closes_its_engine_when_training_ends(tmp_path: Path, monkeypatch) -> None:
    from rlvr_lightning.rollout.shared_prefix import SharedPrefixEngine

    closed: list[int] = []
    monkeypatch.setattr(SharedPrefixEngine, "close", lambda self: closed.append(id(self)))
    run(compose_config(TINY_OVERRIDES + ["trainer.max_steps=1", "validate_before_training=false"]),
        run_dir=tmp_path / "run")
    assert len(closed) == 1
