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
    pruner: Any = None  # not for a grid: +hydra/sweeper/pruner=... is refused in one line


@dataclass
class TolerantOptunaSweeperConf:
    """Hydra's Optuna sweeper's interface (sampler group, direction, storage, study_name, n_trials, n_jobs, params,
    custom_search_space, max_failure_rate); ``max_failure_rate`` counts over all trials so far, not per batch."""

    _target_: str = "hydra_plugins.madminer_sweeper.optuna_sweeper.TolerantOptunaSweeper"
    defaults: list[Any] = field(default_factory=lambda: [{"sampler": "tpe"}, {"pruner": "nop"}])
    sampler: SamplerConfig = MISSING
    pruner: Any = MISSING  # hydra/sweeper/pruner=median|percentile|hyperband|successive_halving|threshold|nop
    direction: Any = Direction.minimize  # or a list of directions (several objectives)
    storage: Any = None  # e.g. sqlite:///multirun/optuna.db; null: in memory
    study_name: str | None = None
    n_trials: int = 20  # per invocation: the same command again adds n_trials to a stored study
    n_jobs: int = 1  # trials running at once (one batch, or with asynchronous=true as many as run at any time)
    asynchronous: bool = False  # true: a new trial starts as soon as any running one ends (joblib, submitit)
    n_trials_scope: str = "invocation"  # study: n_trials counts every trial of the study, from all workers
    max_failure_rate: float = 0.5
    params: dict[str, str] | None = None  # the search space: choice(...), range(...), interval(...), tag(log, ...)
    custom_search_space: str | None = None  # dotpath of f(cfg, trial) that suggests more parameters


# hydra/sweeper/pruner: Optuna's pruners with their parameters (Optuna 2.10's defaults)
@dataclass
class NopPrunerConf:
    _target_: str = "optuna.pruners.NopPruner"


@dataclass
class MedianPrunerConf:
    _target_: str = "optuna.pruners.MedianPruner"
    n_startup_trials: int = 5  # trials that are never pruned, before pruning starts
    n_warmup_steps: int = 0  # epochs of each trial that are never pruned
    interval_steps: int = 1
    n_min_trials: int = 1  # trials that reported at an epoch before one can be pruned there


@dataclass
class PercentilePrunerConf(MedianPrunerConf):
    _target_: str = "optuna.pruners.PercentilePruner"
    percentile: float = 25.0  # prune below the best percentile % of the trials at the same epoch


@dataclass
class HyperbandPrunerConf:
    _target_: str = "optuna.pruners.HyperbandPruner"
    min_resource: int = 1  # epochs
    max_resource: Any = "auto"  # epochs; auto: the most epochs a trial reported
    reduction_factor: int = 3
    bootstrap_count: int = 0


@dataclass
class SuccessiveHalvingPrunerConf:
    _target_: str = "optuna.pruners.SuccessiveHalvingPruner"
    min_resource: Any = "auto"  # epochs
    reduction_factor: int = 4
    min_early_stopping_rate: int = 0
    bootstrap_count: int = 0


@dataclass
class ThresholdPrunerConf:
    _target_: str = "optuna.pruners.ThresholdPruner"
    lower: float | None = None  # prune a trial whose value falls below lower or rises above upper
    upper: float | None = None
    n_warmup_steps: int = 0
    interval_steps: int = 1


PRUNERS = {"nop": NopPrunerConf, "median": MedianPrunerConf, "percentile": PercentilePrunerConf,
           "hyperband": HyperbandPrunerConf, "successive_halving": SuccessiveHalvingPrunerConf,
           "threshold": ThresholdPrunerConf}

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
    pruner = options.get("pruner")
    target = str(options.get("_target_", ""))
    if target.endswith("grid.TolerantSweeper") and pruner and "NopPruner" not in str(pruner.get("_target_", "")):
        raise ValueError("hydra/sweeper/pruner prunes the trials of an Optuna search; hydra/sweeper=tolerant runs "
                         "every job of its grid to the end: drop hydra/sweeper/pruner or use "
                         "hydra/sweeper=tolerant_optuna (hydra/sweeper/sampler=grid searches a grid)")
    if pruner and str(pruner.get("_target_", "")).endswith("ThresholdPruner") and pruner.get("lower") is None \
            and pruner.get("upper") is None:
        raise ValueError("hydra/sweeper/pruner=threshold needs a bound; set hydra.sweeper.pruner.upper=<value> (or "
                         "lower=<value>): a trial whose reported value passes it is pruned")
    scope = options.get("n_trials_scope")
    if scope is not None and scope not in ("invocation", "study"):
        raise ValueError(f"hydra.sweeper.n_trials_scope={scope} is not invocation or study; set "
                         "hydra.sweeper.n_trials_scope=study (n_trials over all workers of the study) or invocation")


ConfigStore.instance().store(group="hydra/sweeper", name="tolerant", node=TolerantSweeperConf,
                             provider="madminer-sweeper")
ConfigStore.instance().store(group="hydra/sweeper", name="tolerant_optuna", node=TolerantOptunaSweeperConf,
                             provider="madminer-sweeper")
for _name, _node in PRUNERS.items():
    ConfigStore.instance().store(group="hydra/sweeper/pruner", name=_name, node=_node, provider="madminer-sweeper")
