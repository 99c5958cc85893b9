"""The sweepers' options, their valid ranges (one place) and their ConfigStore entries."""

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra_plugins.hydra_optuna_sweeper.config import Direction, SamplerConfig  # registers hydra/sweeper/sampler
from omegaconf import MISSING, ListConfig


@dataclass
class TolerantSweeperConf:
    _target_: str = "hydra_plugins.madminer_sweeper.grid.TolerantSweeper"
    max_batch_size: int | None = None  # jobs handed to the launcher at once; null: all of them
    params: dict[str, str] | None = None  # sweeps of the config, as on the command line
    max_failure_rate: float = 1.0  # a grid runs every job; lower it to stop launching after too many failures


@dataclass
class TolerantOptunaSweeperConf:
    """Hydra's Optuna sweeper's interface (sampler group, direction, storage, study_name, n_trials, n_jobs, params,
    custom_search_space, max_failure_rate); ``max_failure_rate`` counts over all trials so far, not per batch."""

    _target_: str = "hydra_plugins.madminer_sweeper.optuna_sweeper.TolerantOptunaSweeper"
    defaults: list[Any] = field(default_factory=lambda: [{"sampler": "tpe"}])
    sampler: SamplerConfig = MISSING
    direction: Any = Direction.minimize  # or a list of directions (several objectives)
    storage: Any = None  # e.g. sqlite:///multirun/optuna.db; null: in memory
    study_name: str | None = None
    n_trials: int = 20  # per invocation: the same command again adds n_trials to a stored study
    n_jobs: int = 1  # trials launched at once (one batch)
    max_failure_rate: float = 0.5
    params: dict[str, str] | None = None  # the search space: choice(...), range(...), interval(...), tag(log, ...)
    custom_search_space: str | None = None  # dotpath of f(cfg, trial) that suggests more parameters


# option: (lowest, highest); None: unbounded
RANGES = {"max_failure_rate": (0.0, 1.0), "n_trials": (1, None), "n_jobs": (1, None), "max_batch_size": (1, None)}


def check(options: Any) -> None:
    """Raise ValueError (one line: option, value, range) for an option of these sweepers outside its range."""
    for key, (low, high) in RANGES.items():
        value = options.get(key)
        if value is None:
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or value < low or (high is not None and value > high):
            allowed = f"[{low}, {high}]" if high is not None else f">= {low}"
            raise ValueError(f"hydra.sweeper.{key}={value} is outside its range {allowed}; set "
                             f"hydra.sweeper.{key}=<a value in {allowed}>")
    if "direction" in options:
        direction = options.get("direction")
        several = isinstance(direction, (list, tuple, ListConfig))
        names = [getattr(d, "name", d) for d in (direction if several else [direction])]
        wrong = [str(d) for d in names if d not in ("minimize", "maximize")]
        if wrong or not names:
            raise ValueError(f"hydra.sweeper.direction={direction} is not minimize or maximize; set "
                             "hydra.sweeper.direction=minimize (or maximize, or a list of them)")


ConfigStore.instance().store(group="hydra/sweeper", name="tolerant", node=TolerantSweeperConf,
                             provider="madminer-sweeper")
ConfigStore.instance().store(group="hydra/sweeper", name="tolerant_optuna", node=TolerantOptunaSweeperConf,
                             provider="madminer-sweeper")
