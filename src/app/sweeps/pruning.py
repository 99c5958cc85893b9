"""A job's side of ``hydra/sweeper/pruner``: report each epoch to its Optuna trial, stop when the pruner says so.

The job learns everything from its config, so it works under every launcher (in-process, joblib, submitit local and
SLURM): the study's storage, name and pruner from ``hydra.sweeper``, its trial's number from ``search.trial`` (set
per trial by ``hydra/sweeper=tolerant_optuna``). It talks to the study's storage only (never to MLflow): each epoch's
value of the objective (the per-epoch validation term, e.g. ``val_improved_xe``; ``val_loss`` for an objective that
is not one) goes to the trial as its intermediate value at step = epoch, and :class:`app.errors.Pruned` ends
training when ``trial.should_prune()``. The sweeper then tells the study the trial was PRUNED.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from omegaconf import OmegaConf

from app.errors import Pruned

log = logging.getLogger("app")

NOP = "optuna.pruners.NopPruner"


def active(pruner: Any) -> bool:
    """Whether ``hydra.sweeper.pruner`` (a config or an instance) prunes anything (not null, not ``nop``)."""
    if pruner is None:
        return False
    target = OmegaConf.select(pruner, "_target_", default=None) if OmegaConf.is_config(pruner) else None
    if target is not None:
        return target != NOP
    return type(pruner).__name__ != "NopPruner"


def reporter(cfg: Any) -> Any:
    """``on_record(entry, objective)`` for :func:`app.pipeline.run`, or None when this job is not a pruned trial."""
    number = OmegaConf.select(cfg, "search.trial", default=None)
    if number is None:
        return None
    from hydra.core.hydra_config import HydraConfig

    sweeper = HydraConfig.get().sweeper
    pruner, storage = sweeper.get("pruner"), sweeper.get("storage")
    if not active(pruner) or not storage:
        return None
    return TrialReporter(str(storage), str(sweeper.study_name), pruner, int(number))


class TrialReporter:
    """Reports a job's epochs to the RUNNING trial ``number`` of a stored study, through Optuna's public API."""

    def __init__(self, storage: str, study_name: str, pruner_config: Any, number: int) -> None:
        import optuna
        from hydra.utils import instantiate

        self.storage = optuna.storages.get_storage(storage)
        study = optuna.load_study(study_name=study_name, storage=self.storage, pruner=instantiate(pruner_config),
                                  sampler=optuna.samplers.RandomSampler())  # the trial's parameters are set already
        study_id = self.storage.get_study_id_from_name(study_name)
        self.trial = optuna.trial.Trial(study, self.storage.get_trial_id_from_study_id_trial_number(study_id, number))
        self.number = number
        self.minimize = study.direction == optuna.study.StudyDirection.MINIMIZE
        self.history: list[dict] = []

    def __call__(self, entry: dict, objective: str) -> None:
        self.history.append(entry)
        if objective not in entry and not self.minimize:  # val_loss stands in for a minimised objective only
            return
        value = entry.get(objective, entry.get("val_loss"))
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return
        self.trial.report(float(value), int(entry["epoch"]))
        if self.trial.should_prune():
            log.info("trial %d pruned after epoch %d (%s = %.6g)", self.number, entry["epoch"],
                     objective if objective in entry else "val_loss", value)
            raise Pruned(int(entry["epoch"]), list(self.history))
