"""One home for every default: the shipped YAML configs agree with the Python defaults.

- Every ``conf/scheduler`` YAML lists its class's constructor arguments with exactly the Python
  defaults, so ``TargetEntropy()`` in Python and ``scheduler=target_entropy`` on the command line
  build the same controller.
- Every ``conf/objective`` YAML inherits ``_shared/base.yaml`` (whose values are the
  ``ObjectiveParams`` / ``ControlState`` defaults) and states only what differs; its aggregation
  comes from the registry unless it differs, and its options are the ones the objective
  declares, with the declared defaults.
- Unknown objective options are errors that name the key, the objective and the allowed keys.
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra.errors import ConfigCompositionException
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from rlvr_lightning.control import ControlState
from rlvr_lightning.objectives import (
    AGGREGATIONS,
    LossNormalizer,
    ObjectiveParams,
    PolicyBatch,
    available_objectives,
    check_objective_options,
    compute_loss,
    get_objective,
    objective_options,
    resolve_aggregation,
)
from tests.conftest import compose_config

CONF = Path(__file__).resolve().parents[1] / "rlvr_lightning" / "conf"
SCHEDULERS = sorted(path.stem for path in (CONF / "scheduler").glob("*.yaml"))
OBJECTIVES = sorted(path.stem for path in (CONF / "objective").glob("*.yaml"))
BASE_PATH = CONF / "objective" / "_shared" / "base.yaml"
BASE_DEFAULTS = ["_shared/base@_here_", "_self_"]
# Constructor arguments with no YAML form (Python callables).
PYTHON_ONLY = {"target_fn"}


def plain(value: Any) -> Any:
    """Tuples as lists, OmegaConf containers as Python ones: comparable with YAML values."""
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def own_lines(name: str) -> dict[str, Any]:
    """What ``conf/objective/<name>.yaml`` states itself (without its defaults list)."""
    path = CONF / "objective" / f"{name}.yaml"
    raw = OmegaConf.to_container(OmegaConf.load(path))
    defaults = raw.pop("defaults", None)
    if path.read_text().startswith("# @package _global_"):
        # An objective that picks a sampling/ or advantage/ config: global package, the base
        # merged into `objective`, then only group overrides, then its own lines.
        assert defaults[0] == {"/objective/_shared@objective": "base"} and defaults[-1] == "_self_", (
            f"objective/{name}.yaml must start with `defaults: [/objective/_shared@objective: base, ...]`"
        )
        for entry in defaults[1:-1]:
            (group, _), = entry.items()
            assert group in ("override /sampling", "override /advantage"), f"objective/{name}.yaml: {entry}"
        assert set(raw) - {"objective"} <= {"sampling", "advantage"}, f"objective/{name}.yaml: {sorted(raw)}"
        return raw["objective"]
    assert defaults == BASE_DEFAULTS, (
        f"objective/{name}.yaml must start with `defaults: [{', '.join(BASE_DEFAULTS)}]`"
    )
    return raw


def base() -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.load(BASE_PATH))


# ----------------------------------------------------------------------------- schedulers


def test_every_scheduler_config_is_found():
    assert {"constant", "linear", "target_entropy", "beta_stages"} <= set(SCHEDULERS)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_scheduler_yaml_equals_python_defaults(name):
    config = compose_config([f"scheduler={name}"]).scheduler
    cls = get_class(config._target_)
    parameters = inspect.signature(cls).parameters
    stated = {key: plain(value) for key, value in config.items() if key != "_target_"}
    for key, value in stated.items():
        assert key in parameters, (
            f"scheduler/{name}.yaml: {key!r} is not an argument of {cls.__name__}; "
            f"arguments: {', '.join(parameters)}"
        )
        default = parameters[key].default
        assert default is not inspect.Parameter.empty, (
            f"scheduler/{name}.yaml: {key!r} has no Python default in {cls.__name__}; give it "
            f"the YAML's value ({value!r})"
        )
        assert plain(default) == value, (
            f"scheduler/{name}.yaml: {key} = {value!r} but {cls.__name__}'s default is "
            f"{default!r}: make them equal (one home for every default)"
        )
    missing = [key for key in parameters if key not in stated and key not in PYTHON_ONLY]
    assert not missing, (
        f"scheduler/{name}.yaml does not list {', '.join(missing)} (list each argument with "
        f"its Python default so scheduler.<key>=... overrides it)"
    )
    # The command-line schedule and the Python default are the same object.
    built, python = instantiate(config), cls()
    assert type(built) is cls
    assert plain(vars(built)) == plain(vars(python))


# ----------------------------------------------------------------------------- objectives


def test_objective_base_equals_python_defaults():
    shared = base()
    assert shared["name"] == "???"
    assert shared["aggregation"] is None and ObjectiveParams().aggregation is None
    assert shared["options"] == {} and ObjectiveParams().options == {}
    for key in ("kl_coef", "kl_estimator", "kl_importance_weight", "nll_coef"):
        assert shared[key] == getattr(ObjectiveParams(), key), key
    # The entropy bonus coefficient has one home: the control state (schedules may move it).
    assert "entropy_coef" not in shared and not hasattr(ObjectiveParams(), "entropy_coef")
    assert shared["control"]["entropy_coef"] == ControlState().entropy_coef == 0.0
    control_defaults = {f.name: f.default for f in dataclasses.fields(ControlState)}
    for key, value in shared["control"].items():
        assert key in control_defaults, (
            f"_shared/base.yaml: control.{key} is not a ControlState field"
        )
        assert value == control_defaults[key], (
            f"_shared/base.yaml: control.{key} = {value!r} but ControlState's default is "
            f"{control_defaults[key]!r}"
        )


def test_every_registered_objective_has_a_config():
    missing = sorted(set(available_objectives()) - set(OBJECTIVES))
    assert not missing, f"no conf/objective/<name>.yaml for {', '.join(missing)}"


@pytest.mark.parametrize("name", OBJECTIVES)
def test_objective_yaml_states_only_what_differs(name):
    shared, own = base(), own_lines(name)
    assert "name" in own, f"objective/{name}.yaml must set name"
    objective = own["name"]
    registered = get_objective(objective)  # KeyError lists the registered objectives
    for key, value in own.items():
        assert key in shared, (
            f"objective/{name}.yaml: unknown key {key!r}; allowed: {', '.join(shared)}"
        )
        if key == "control":
            for field, number in value.items():
                assert field in shared["control"], (
                    f"objective/{name}.yaml: unknown key control.{field!r}; allowed: "
                    f"{', '.join(shared['control'])}"
                )
                assert number != shared["control"][field], (
                    f"objective/{name}.yaml restates control.{field} = {number!r} from "
                    "_shared/base.yaml: remove the line"
                )
        elif key == "options":
            check_objective_options(objective, value)
            declared = objective_options(objective)
            for option, setting in value.items():
                assert setting == declared[option], (
                    f"objective/{name}.yaml: options.{option} = {setting!r} but the objective's "
                    f"Python default is {declared[option]!r}"
                )
        elif key == "aggregation":
            assert value != registered.default_aggregation, (
                f"objective/{name}.yaml restates the registered aggregation {value!r}: remove "
                "the line (null takes the registry default)"
            )
        elif key != "name":
            assert value != shared[key], (
                f"objective/{name}.yaml restates {key} = {value!r} from _shared/base.yaml: "
                "remove the line"
            )


@pytest.mark.parametrize("name", OBJECTIVES)
def test_objective_composes_to_base_plus_own_lines(name):
    composed = plain(compose_config([f"objective={name}"]).objective)
    expected = OmegaConf.to_container(OmegaConf.merge(base(), own_lines(name)))
    assert composed == expected
    assert composed["name"] in available_objectives()
    assert resolve_aggregation(composed["name"], composed["aggregation"]) in AGGREGATIONS


def test_base_is_not_an_objective_choice():
    with pytest.raises(
        ConfigCompositionException, match="Available options in 'objective'"
    ) as error:
        compose_config(["objective=_shared"])
    assert "_shared" not in str(error.value).split("Available options", 1)[1]


# ----------------------------------------------------------------------------- aggregation


@pytest.mark.parametrize("name", ["ppo", "grpo", "dr_grpo"])
def test_null_aggregation_takes_the_registry_default(name):
    config = compose_config([f"objective={name}", "objective.aggregation=null"]).objective
    assert config.aggregation is None
    assert resolve_aggregation(name, config.aggregation) == get_objective(name).default_aggregation
    explicit = compose_config([f"objective={name}", "objective.aggregation=seq-mean-token-sum"])
    assert resolve_aggregation(name, explicit.objective.aggregation) == "seq-mean-token-sum"


def tiny_batch() -> PolicyBatch:
    logp = torch.tensor([[-1.0, -0.5, -2.0], [-0.3, -1.2, -0.7]], requires_grad=True)
    return PolicyBatch(
        logp=logp,
        old_logp=logp.detach() - 0.05,
        advantages=torch.tensor([[1.0, 1.0, 1.0], [-0.5, -0.5, -0.5]]),
        mask=torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]),
    )


def test_compute_loss_applies_the_registry_aggregation_when_none():
    normalizer = LossNormalizer(num_tokens=5.0, num_sequences=2.0, max_response_length=3)

    def loss(name: str, aggregation: str | None) -> torch.Tensor:
        params = ObjectiveParams(aggregation=aggregation)
        return compute_loss(name, tiny_batch(), ControlState(), params, normalizer)[0]

    for name in ("grpo", "dr_grpo", "ppo"):
        mode = get_objective(name).default_aggregation
        assert torch.equal(loss(name, None), loss(name, mode)), name
    # The batch tells the aggregations apart, so the check above can fail.
    assert not torch.equal(loss("grpo", None), loss("grpo", "token-mean"))


# ----------------------------------------------------------------------------- options


def test_unknown_option_names_the_key_the_objective_and_the_allowed_keys():
    with pytest.raises(ValueError) as error:
        check_objective_options("clip_cov", {"clip_cov_ration": 0.001})
    message = str(error.value)
    assert "objective.options.clip_cov_ration" in message and "'clip_cov'" in message
    assert "allowed: clip_cov_lower, clip_cov_ratio, clip_cov_upper" in message
    with pytest.raises(
        ValueError,
        match=r"objective.options.eps is unknown for objective 'ppo'; "
        r"this objective takes no options",
    ):
        check_objective_options("ppo", {"eps": 0.1})
    check_objective_options("clip_cov", {"clip_cov_ratio": 0.001})
    check_objective_options("ppo", {})
    check_objective_options("ppo", None)


def test_compute_loss_rejects_unknown_options():
    normalizer = LossNormalizer(num_tokens=5.0, num_sequences=2.0, max_response_length=3)
    params = ObjectiveParams(options={"kl_cov_ration": 0.5})
    with pytest.raises(
        ValueError, match="objective.options.kl_cov_ration is unknown for objective 'kl_cov'"
    ):
        compute_loss("kl_cov", tiny_batch(), ControlState(), params, normalizer)


def test_misspelled_option_on_the_command_line_is_an_error():
    # Without `+`: Hydra refuses a key the config does not have.
    with pytest.raises(ConfigCompositionException, match="clip_cov_ration"):
        compose_config(["objective=clip_cov", "objective.options.clip_cov_ration=0.001"])
    # With `+` the key gets in; the option check names it.
    config = compose_config(["objective=clip_cov", "+objective.options.clip_cov_ration=0.001"])
    with pytest.raises(ValueError, match="clip_cov_ration is unknown for objective 'clip_cov'"):
        check_objective_options(config.objective.name, config.objective.options)


@pytest.mark.parametrize("name", sorted(available_objectives()))
def test_declared_options_are_read_with_their_defaults(name):
    """Every declared option passed at its declared default changes nothing: the registry's
    defaults are the ones the objective uses when the option is absent."""
    normalizer = LossNormalizer(num_tokens=5.0, num_sequences=2.0, max_response_length=3)
    control = ControlState(beta1=0.5, beta2=1.0)
    generator_seed = 0

    def loss(options: dict[str, Any]) -> torch.Tensor:
        batch = tiny_batch()
        batch.generator = torch.Generator().manual_seed(generator_seed)
        value, _ = compute_loss(name, batch, control, ObjectiveParams(options=options), normalizer)
        return value

    assert torch.equal(loss({}), loss(objective_options(name)))


# ----------------------------------------------------------------------------- sampling, advantage


def test_sampling_plain_yaml_equals_the_collector_defaults():
    from dataclasses import fields

    from rlvr_lightning.rollout.collector import CollectorSettings

    plain_yaml = OmegaConf.to_container(OmegaConf.load(CONF / "sampling" / "plain.yaml"))
    defaults = {f.name: f.default for f in fields(CollectorSettings)}
    for key, value in plain_yaml.items():
        assert key in defaults and defaults[key] == value, f"sampling/plain.yaml: {key} = {value!r}"


def test_every_advantage_yaml_names_a_registered_estimator():
    from rlvr_lightning.advantages import ADVANTAGE_ESTIMATORS

    names = {OmegaConf.load(path).name for path in (CONF / "advantage").glob("*.yaml")}
    assert names == set(ADVANTAGE_ESTIMATORS)
    assert compose_config([]).advantage.name == "grpo"
