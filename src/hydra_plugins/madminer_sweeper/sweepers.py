"""Failure-tolerant sweepers (``hydra/sweeper=tolerant``, ``hydra/sweeper=tolerant_optuna``): see app.sweep.

Hydra only instantiates sweepers that live in the ``hydra_plugins`` namespace; the logic is in :mod:`app.sweep`
(imported when a sweep starts, so Hydra's plugin scan stays cheap).
"""

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.plugins.sweeper import Sweeper
from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf
from omegaconf import OmegaConf


@dataclass
class TolerantSweeperConf:
    _target_: str = "hydra_plugins.madminer_sweeper.sweepers.TolerantSweeper"
    max_batch_size: int | None = None
    params: dict[str, str] | None = None
    max_failure_rate: float = 1.0  # a grid runs every job; lower it to stop early


@dataclass
class TolerantOptunaSweeperConf(OptunaSweeperConf):
    _target_: str = "hydra_plugins.madminer_sweeper.sweepers.TolerantOptunaSweeper"
    n_jobs: int = 1
    max_failure_rate: float = 0.5  # over all trials so far, not per batch


ConfigStore.instance().store(group="hydra/sweeper", name="tolerant", node=TolerantSweeperConf,
                             provider="madminer-sweeper")
ConfigStore.instance().store(group="hydra/sweeper", name="tolerant_optuna", node=TolerantOptunaSweeperConf,
                             provider="madminer-sweeper")


class TolerantSweeper(BasicSweeper):
    """Hydra's BasicSweeper (grids), but a failed job does not end the sweep (see app.sweep)."""

    def __init__(self, max_batch_size: int | None, params: dict[str, str] | None = None,
                 max_failure_rate: float = 1.0) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)
        self.max_failure_rate = max_failure_rate

    def sweep(self, arguments: list[str]) -> Any:
        params_conf = self._parse_config()
        params_conf.extend(arguments)
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        overrides = parser.parse_overrides(params_conf)
        self.overrides = self.split_arguments(overrides, self.max_batch_size)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")

        from app.sweep import BudgetExceeded, FailureBudget

        launch = FailureBudget(self.launcher.launch, self.max_failure_rate)
        returns = []
        initial_job_idx = 0
        while not self.is_done():
            batch = self.get_job_batch()
            with _compose_once(self.hydra_context.config_loader, self.launcher):
                self.validate_batch_is_legal(batch)
                try:
                    results = launch(batch, initial_job_idx=initial_job_idx)
                except BudgetExceeded:
                    break
            initial_job_idx += len(batch)
            returns.append(results)
        return returns


@contextlib.contextmanager
def _compose_once(config_loader, launcher):
    """Hydra composes every job's config twice: once to validate the batch, once more in the launcher. With the
    in-process launcher the launcher takes the validated config instead (each used once; about 0.15 s a job).
    Launchers that compose in other processes (joblib, submitit) are left alone."""
    if type(launcher).__name__ != "BasicLauncher" or "load_sweep_config" in vars(config_loader):
        yield
        return
    load = config_loader.load_sweep_config
    validated: dict = {}

    def load_sweep_config(master_config, sweep_overrides):
        key = (id(master_config), tuple(sweep_overrides))
        if key in validated:
            return validated.pop(key)  # the launcher's call: the config composed for validation, unused since
        config = load(master_config, sweep_overrides)
        validated[key] = config
        return config

    config_loader.load_sweep_config = load_sweep_config
    try:
        yield
    finally:
        del config_loader.load_sweep_config


class TolerantOptunaSweeper(Sweeper):
    """The Optuna sweeper with a failure budget over all trials, and a sqlite storage folder created first."""

    def __init__(self, max_failure_rate: float = 0.5, **kwargs: Any) -> None:
        from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper

        self._inner = OptunaSweeper(max_failure_rate=1.0, **kwargs)  # the budget below decides
        self.max_failure_rate = max_failure_rate
        self.storage = kwargs.get("storage")

    def setup(self, *, hydra_context, task_function, config) -> None:
        self._inner.setup(hydra_context=hydra_context, task_function=task_function, config=config)
        from app.sweep import FailureBudget

        impl = self._inner.sweeper
        impl.launcher.launch = FailureBudget(impl.launcher.launch, self.max_failure_rate)

    def sweep(self, arguments: list[str]) -> None:
        from app.sweep import BudgetExceeded, prepare_storage

        prepare_storage(self.storage)
        try:
            with _trials_asked() as asked:
                try:
                    self._inner.sweep(arguments)
                except KeyboardInterrupt:
                    _fail_running(asked)  # Ctrl-C: no trial of this invocation stays RUNNING in the storage
                    raise
        except BudgetExceeded:
            pass
        except ValueError as err:  # study.best_trial when no trial completed: the report says why
            if "No trials are completed" not in str(err) and "Record does not exist" not in str(err):
                raise


@contextlib.contextmanager
def _trials_asked():
    """Record the trials this process asks for (the sweeper's loop keeps them to itself)."""
    from optuna.study import Study

    asked: list = []
    ask = Study.ask

    def recording_ask(study, *args, **kwargs):
        trial = ask(study, *args, **kwargs)
        asked.append((study, trial._trial_id))
        return trial

    Study.ask = recording_ask
    try:
        yield asked
    finally:
        Study.ask = ask


def _fail_running(asked: list) -> None:
    """End this invocation's trials that are still RUNNING as FAIL; other workers' trials are left alone."""
    from optuna.trial import TrialState

    for study, trial_id in asked:
        try:
            if study._storage.get_trial(trial_id).state == TrialState.RUNNING:
                study._storage.set_trial_state(trial_id, TrialState.FAIL)
        except Exception:  # noqa: BLE001 - a storage gone at Ctrl-C: nothing more to close
            pass
