"""Every option of every config group composes; the typed schemas reject bad keys and types."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from app.domain.methods import METHODS
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
