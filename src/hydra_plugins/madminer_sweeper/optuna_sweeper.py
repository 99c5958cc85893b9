"""``hydra/sweeper=tolerant_optuna``: an Optuna search on Optuna's public API (see :mod:`._search`)."""

from typing import Any

from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from .config import check


class TolerantOptunaSweeper(Sweeper):
    def __init__(self, sampler: Any, direction: Any, storage: Any, study_name: str | None, n_trials: int,
                 n_jobs: int, max_failure_rate: float, params: dict[str, str] | None,
                 custom_search_space: str | None = None, pruner: Any = None, asynchronous: bool = False,
                 n_trials_scope: str = "invocation") -> None:
        check({"n_trials": n_trials, "n_jobs": n_jobs, "max_failure_rate": max_failure_rate, "direction": direction,
               "n_trials_scope": n_trials_scope})
        self.sampler, self.direction, self.storage, self.study_name = sampler, direction, storage, study_name
        self.n_trials, self.n_jobs, self.max_failure_rate = n_trials, n_jobs, max_failure_rate
        self.params, self.custom_search_space = params or {}, custom_search_space
        self.pruner, self.asynchronous, self.n_trials_scope = pruner, asynchronous, n_trials_scope
        self.hydra_context: HydraContext | None = None
        self.config: DictConfig | None = None
        self.launcher = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> list[Any]:
        from ._search import search  # Optuna is imported when a search starts, not at Hydra's plugin scan

        return search(self, arguments)
