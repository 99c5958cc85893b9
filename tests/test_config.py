"""Every option of every config group composes; the typed schemas reject bad keys and types; every numeric or
enumerated option outside its range is one line naming the option, the value and the range (in-process)."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from app import config as app_config
from app.domain.methods import METHODS
from app.domain.validate import check_options
from app.errors import UserError
from app.main import config_dir

CONF = Path(config_dir())
GROUPS = ["data", "sampling", "training", "evaluation", "tracking"]


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    # paths.* use ${hydra:...}, only set inside a running app: resolve the rest.
    return OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "paths"]), resolve=True)


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS + ["hparams_search"] for o in _options(g)])
def test_every_option_composes(group, option):
    overrides = [f"{group}={option}"]
    if group == "data" and option == "file":
        overrides.append("data.path=/some/events.h5")
    if group == "sampling":  # a sampling kind needs a method of that kind
        method = next(m for m in METHODS.values() if m.sampling == option)
        overrides.append(f"training={method.name}")
    if group == "hparams_search":  # a global package: it switches the sweeper and sets the objective
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            full = compose(config_name="config", overrides=overrides, return_hydra_config=True)
        # Optuna searches, or a grid over methods (the failure-tolerant basic sweeper)
        assert ("Optuna" in full.hydra.sweeper._target_) != (option == "methods"), full.hydra.sweeper._target_
        assert full.objective.metric and full.hydra.sweeper.params
        return
    cfg = _compose(*overrides)
    assert cfg[group] is not None


@pytest.mark.parametrize("experiment", _options("experiment"))
def test_every_experiment_composes(experiment):
    cfg = _compose(f"+experiment={experiment}")
    assert cfg["training"]["n_epochs"] > 0


def test_training_presets_cover_the_method_table():
    assert set(_options("training")) == set(METHODS)
    for name, method in METHODS.items():
        cfg = _compose(f"training={name}")
        assert cfg["training"]["method"] == name
        assert cfg["sampling"]["kind"] == method.sampling  # the preset brings its sampling kind
        assert cfg["training"]["estimator"] in method.estimators


def test_seed_workflow_picks_per_method_settings():
    alices = _compose("+experiment=seed_workflow", "training=alices")
    sally = _compose("+experiment=seed_workflow", "training=sally")
    assert alices["training"]["n_hidden"] == [100, 100, 100] and alices["training"]["n_epochs"] == 2
    assert (alices["training"]["initial_lr"], alices["training"]["final_lr"]) == (0.001, 0.0001)  # the seed's
    assert alices["sampling"]["theta0"]["priors"] == [["gaussian", 0.0, 1.0], ["gaussian", 0.0, 1.0]]
    assert sally["training"]["n_hidden"] == [100] and sally["training"]["n_epochs"] == 50
    assert sally["sampling"]["kind"] == "local" and sally["training"]["estimator"] == "score"


@pytest.mark.parametrize(
    "override",
    [
        "training.n_epochs=abc",  # wrong type
        "training.estimator=magic",  # not an estimator
        "training.unknown_key=1",  # unknown key
        "sampling.theta0.type=everywhere",  # not a theta type
        "evaluation.modes=[rate,guess]",  # not a limit mode
        "+data.n_events=5",  # toy key on top of toy is fine, but '+' on an existing key is rejected
    ],
)
def test_schema_rejects_bad_keys_and_types(override):
    with pytest.raises((ConfigCompositionException, ValidationError, ConfigKeyError)):
        _compose(override)


def test_file_data_has_no_toy_keys():
    with pytest.raises((ConfigCompositionException, ConfigKeyError)):
        _compose("data=file", "data.path=x.h5", "data.n_events=5")


def _checked(*overrides: str):
    """Compose as the app does and run the config-only checks (what runs before any work)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    return check_options(cfg)


# A new user's values: (overrides, the range the one-line message must state). The message also names the option
# and the value as typed.
OUT_OF_RANGE = [
    (["training.batch_size=0"], "an integer >= 1"),
    (["training.n_hidden=[]"], "a list of one or more integers >= 1"),
    (["training.n_hidden=[0]"], "a list of one or more integers >= 1"),
    (["training.n_hidden=[16,-2]"], "a list of one or more integers >= 1"),
    (["training.dropout_prob=1.5"], "a number in [0, 1)"),
    (["training.dropout_prob=1"], "a number in [0, 1)"),  # runs today, and trains a constant
    (["training.alpha=-1"], "a number >= 0"),
    (["training.initial_lr=0"], "a number > 0"),
    (["training.final_lr=-1"], "a number > 0"),
    (["training.clip_gradient=0"], "a number > 0"),
    (["training=nde", "training.n_mades=0"], "an integer >= 1"),
    (["training=nde", "training.n_components=0"], "an integer >= 1"),
    (["training.n_estimators=0"], "an integer >= 1"),
    (["training.n_epochs=0"], "an integer >= 1"),
    (["training.n_workers=-1"], "an integer >= 0"),
    (["training.validation_split=1"], "a number in [0, 1)"),
    (["sampling.n_samples=0"], "an integer >= 1"),
    (["sampling.n_validation_samples=0"], "an integer >= 1"),
    (["sampling.n_processes=0"], "an integer >= 1"),
    (["sampling.test_split=0"], "a number in (0, 1)"),
    (["sampling.validation_split=-0.1"], "a number in [0, 1)"),
    (["sampling.seed=-3"], "an integer in [0, 4294967295]"),
    (["sampling.theta0.n=0"], "an integer >= 1"),
    (["seed=-1"], "an integer in [0, 4294967295]"),
    (["seed=4294967296"], "an integer in [0, 4294967295]"),
    (["evaluation.grid.resolutions=1"], "an integer >= 2 or a list of such"),
    (["evaluation.grid.resolutions=[9,1]"], "an integer >= 2 or a list of such"),
    (["evaluation.grid.resolutions=2.5"], "an integer >= 2 or a list of such"),
    (["evaluation.hist_bins=0"], "an integer >= 2 (the number of bins) or a list with one entry per histogram axis"),
    (["evaluation.hist_bins=[[0,2,1]]"], "a list of two or more increasing bin edges"),
    (["evaluation.fisher.bins=1"], "an integer >= 2 (the number of bins) or a list of two or more increasing bin"),
    (["evaluation.fisher.bins=[100.0,30.0]"], "a list of two or more increasing bin edges"),
    (["evaluation.n_test_samples=0"], "an integer >= 1"),
    (["evaluation.luminosity=0"], "a number > 0"),
]


@pytest.mark.parametrize("overrides,expected", OUT_OF_RANGE, ids=[" ".join(o) for o, _ in OUT_OF_RANGE])
def test_out_of_range_is_one_line_naming_option_value_and_range(overrides, expected):
    with pytest.raises(UserError) as caught:
        _checked(*overrides)
    message = str(caught.value)
    key, value = overrides[-1].split("=", 1)
    head, _, fix = message.partition(" is out of range; ")
    assert "\n" not in message and head.startswith(f"{key}=") and fix.startswith(f"set {key} to "), message
    assert expected in fix, message
    shown = head.split("=", 1)[1]
    assert shown.replace(" ", "") == value if value.startswith("[") else float(shown) == float(value), message


# Other options a new user gets wrong, each one line before any work: (overrides, fragments of the message).
MISCHOSEN = [
    (["data.n_events=5"], ["data.n_events=5", "n_events >= 60"]),
    (["data.smearing=-1"], ["data.smearing=-1.0", ">= 0"]),
    (["data.n_parameters=3"], ["data.n_parameters=3", "n_parameters=1 or 2"]),
    (["data.seed=-1"], ["data.seed=-1", "non-negative"]),
    (["+training.nope=1"], ["training.nope is not an option", "n_hidden"]),  # '+' adds keys Hydra lets through
    (["+evaluation.grid.step=1"], ["evaluation.grid.step is not an option", "resolutions"]),
    (["data.kind=csv"], ["data.kind=csv is not a choice", "toy, file"]),
    (["training.alpha=nan"], ["training.alpha=nan is not a finite number"]),
    (["evaluation.theta_true=[inf,0]"], ["evaluation.theta_true[0]=inf is not a finite number"]),
    (["sampling.test_split=0.6", "sampling.validation_split=0.4"], ["0.6 + 0.4 leaves no training events"]),
    (["evaluation.include_xsec=3"], ["evaluation.include_xsec=3 is not a choice", "[true,false]"]),
    (["training=sally", "sampling=ratio"], ["trains on sampling=local samples but sampling=ratio"]),
    (["training=sally", "training.estimator=parameterized"], ["cannot train method sally", "score"]),
    (["training=sally", "evaluation.modes=[ml]"], ["needs a ratio or density model"]),
    (["objective.metric=val_los"], ["objective.metric=val_los is not a metric"]),
]


@pytest.mark.parametrize("overrides,fragments", MISCHOSEN, ids=[" ".join(o) for o, _ in MISCHOSEN])
def test_mischosen_options_are_one_line(overrides, fragments):
    with pytest.raises(UserError) as caught:
        _checked(*overrides)
    message = str(caught.value)
    assert "\n" not in message and all(f in message for f in fragments), message


# Enumerated options are typed enums: Hydra refuses another value when it composes, naming key, value and choices.
@pytest.mark.parametrize("key,value,choice", [
    ("training.activation", "gelu", "tanh"), ("training.optimizer", "adamw", "amsgrad"),
    ("training.device", "tpu", "cuda"), ("training.trainer", "lightning", "madminer"),
    ("tracking.mode", "remote", "server"), ("stage", "deploy", "evaluate"), ("training.estimator", "magic", "score"),
    ("objective.direction", "up", "maximize"), ("evaluation.modes", "[rate,guess]", "adaptive_sally"),
])
def test_unknown_choice_fails_at_composition_naming_it(key, value, choice):
    with pytest.raises(ConfigCompositionException) as caught:
        _compose(f"{key}={value}")
    message = f"{caught.value}\n{caught.value.__cause__}"
    assert key in message and value.strip("[]").split(",")[-1] in message and choice in message, message


@pytest.mark.parametrize("overrides", [
    [], ["training=sally"], ["training=nde"], ["+experiment=seed_workflow", "training=sally"],
    ["+experiment=quickstart"], ["data=file", "data.path=/some/events.h5"],
    # the edges of the ranges are inside them
    ["training.dropout_prob=0", "training.alpha=0", "training.n_workers=0", "training.validation_split=0",
     "sampling.validation_split=0", "seed=0", "seed=4294967295", "evaluation.grid.resolutions=2",
     "evaluation.fisher.bins=2", "evaluation.hist_bins=2", "training.n_hidden=[1]", "training.clip_gradient=0.5"],
    ["evaluation.grid.resolutions=[5,9]", "evaluation.fisher.bins=[30.0,100.0,400.0]",
     "evaluation.hist_bins=[[0.0,1.0,2.0],4]", "sampling.n_validation_samples=1"],
])
def test_valid_options_pass(overrides):
    assert _checked(*overrides).name in METHODS


def _fields(cls: type, prefix: str = ""):
    """(key, field, type) of every option of a schema, nested dataclasses walked."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        inner = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)]
        if dataclasses.is_dataclass(hint) or inner:
            yield from _fields(inner[0] if inner else hint, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, hint


# Numeric options without a Range, each for a reason: the toy's ranges are its generator's own (ToySettings.validate,
# checked with the options); theta_true is any finite point with one value per parameter of the data file.
NO_RANGE = {"data.n_events", "data.seed", "data.n_parameters", "data.smearing", "evaluation.theta_true"}


def _numeric(hint) -> bool:
    return hint in (int, float) or any(_numeric(a) for a in typing.get_args(hint))


def test_every_numeric_option_has_a_range_that_holds_its_default():
    keys = [*_fields(app_config.Config), *_fields(app_config.ToyDataConfig, "data.")]
    numeric = set()
    for key, f, hint in keys:
        found = f.metadata.get("range")
        if found is not None:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            assert default is None or found.contains(default), (key, default)
            numeric.add(key)
        elif _numeric(hint):
            numeric.add(key)
            assert key in NO_RANGE, f"{key} is numeric but has no Range in app.config"
    assert NO_RANGE <= numeric and len(numeric) >= 30
