"""``hydra/sweeper=tolerant``: a grid sweep (the cartesian product of the sweep overrides) that a failed job does
not end. Each batch (at most ``max_batch_size`` jobs) is checked (every job's config composed) and launched; every
job's outcome goes to ``<sweep dir>/sweep.json`` and, once more than ``max_failure_rate`` of the jobs so far failed,
no further batch is launched."""

import itertools
import logging
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.core.plugins import Plugins
from hydra.errors import HydraException
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from .config import check

log = logging.getLogger(__name__)


class TolerantSweeper(Sweeper):
    def __init__(self, max_batch_size: int | None = None, params: dict[str, str] | None = None,
                 max_failure_rate: float = 1.0, pruner: Any = None) -> None:
        check({"max_batch_size": max_batch_size, "max_failure_rate": max_failure_rate})
        if pruner is not None and type(pruner).__name__ != "NopPruner":
            raise ValueError("hydra/sweeper/pruner prunes the trials of an Optuna search; hydra/sweeper=tolerant "
                             "runs every job of its grid to the end: drop hydra/sweeper/pruner or use "
                             "hydra/sweeper=tolerant_optuna")
        self.max_batch_size = max_batch_size
        self.params = params or {}
        self.max_failure_rate = max_failure_rate
        self.hydra_context: HydraContext | None = None
        self.config: DictConfig | None = None
        self.launcher = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> list[Any]:
        from app.sweeps.outcomes import SweepRecord, stop

        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        jobs = expand(parser.parse_overrides([f"{k}={v}" for k, v in self.params.items()] + list(arguments)))
        size = self.max_batch_size or max(1, len(jobs))
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        record = SweepRecord(str(sweep_dir), self.max_failure_rate)
        record.save()  # a record from an earlier sweep into this folder is gone
        returns = []
        for start in range(0, len(jobs), size):
            batch = jobs[start:start + size]
            self.validate_batch_is_legal(batch)  # a config that cannot be composed stops the sweep before it runs
            results = self.launcher.launch(batch, initial_job_idx=start)
            returns.append(results)
            errors = []
            for ret in results:
                found, error = record.add(ret)
                errors.append(error)
                if error is not None:
                    log.warning("job %d failed: %s", found.job, found.error)
            over = record.over_budget()
            record.save()
            if over:
                stop(record, self.config, next((e for e in errors if e is not None), None))
                break
        return returns


def expand(overrides: list[Override]) -> list[list[str]]:
    """Every job's overrides: the cartesian product of the sweeps (lists, choice, range, glob), each key once (a
    later override of a key replaces an earlier one, so the command line wins over ``hydra.sweeper.params``)."""
    axes: dict[str, list[str]] = {}
    for override in overrides:
        key = override.get_key_element()
        if not override.is_sweep_override():
            axes[key] = [override.input_line]
        elif override.is_discrete_sweep():
            axes[key] = [f"{key}={value}" for value in override.sweep_string_iterator()]
        else:
            raise HydraException(
                f"hydra/sweeper=tolerant runs lists, choice(), range() and glob(), not {override.input_line}; "
                "use hydra/sweeper=tolerant_optuna (or an hparams_search preset) to search an interval")
    return [list(job) for job in itertools.product(*axes.values())]
