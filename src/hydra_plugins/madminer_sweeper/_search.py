"""The search loop of ``hydra/sweeper=tolerant_optuna``: ask -> launch -> tell, on Optuna's public API.

Each round asks the study for ``n_jobs`` trials (``study.ask`` with the search space), launches them as one batch
and tells the study each trial's end: COMPLETE with the job's objective, FAIL for a failed job or an objective that
is not a finite number. A stored study (``storage`` + ``study_name``) is loaded if it exists, so the same command
again adds ``n_trials`` trials. Whatever ends the loop early (Ctrl-C, a launcher that fails) ends this invocation's
trials that are still RUNNING as FAIL (``study.tell``); trials of other processes on the same storage are untouched.
"""

import contextlib
import functools
import logging
import math
import signal
import threading
from pathlib import Path
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import get_method
from omegaconf import ListConfig, OmegaConf
from optuna.trial import TrialState

from app.sweeps.outcomes import FAILED, FINISHED, PRUNED, JobOutcome, SweepRecord, stop
from app.sweeps.pruning import active
from app.sweeps.storage import prepare_storage

from . import _async, _space

log = logging.getLogger(__name__)


def search(sweeper: Any, arguments: list[str]) -> list[Any]:
    """Run the search; returns the ``JobReturn``s of each batch."""
    config = sweeper.config
    parser = OverridesParser.create(config_loader=sweeper.hydra_context.config_loader)
    space, fixed = _space.split(parser.parse_overrides([f"{k}={v}" for k, v in sweeper.params.items()] + arguments))
    sampler, n_trials = sweeper.sampler, sweeper.n_trials
    if isinstance(sampler, functools.partial) and sampler.func is optuna.samplers.GridSampler:
        values = _space.grid(space)
        sampler = sampler(values)
        n_trials = min(n_trials, math.prod(len(v) for v in values.values()))
    directions = [getattr(d, "name", str(d)) for d in
                  (sweeper.direction if isinstance(sweeper.direction, (list, tuple, ListConfig)) else
                   [sweeper.direction])]
    prepare_storage(sweeper.storage)
    pruning = _pruning(sweeper, config, len(directions))
    shared = _async.shared_lock(sweeper.storage, str(sweeper.study_name))
    with shared():
        study = optuna.create_study(study_name=sweeper.study_name, storage=sweeper.storage, sampler=sampler,
                                    pruner=sweeper.pruner if pruning else None, directions=directions,
                                    load_if_exists=True)
    log.info("Optuna study %s (storage %s, sampler %s, %s%s): %d trials%s, %d at a time%s", study.study_name,
             sweeper.storage, type(sampler).__name__, "/".join(directions),
             f", pruner {type(sweeper.pruner).__name__}" if pruning else "", n_trials,
             " in the study" if sweeper.n_trials_scope == "study" else "", sweeper.n_jobs,
             ", asynchronous" if sweeper.asynchronous else "")
    extend = get_method(sweeper.custom_search_space) if sweeper.custom_search_space else None
    sweep_dir = Path(config.hydra.sweep.dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(config, sweep_dir / "multirun.yaml")
    record = SweepRecord(str(sweep_dir), sweeper.max_failure_rate)
    record.save()  # a record from an earlier sweep into this folder is gone
    claims = _async.Claims(study, space, n_trials, sweeper.n_trials_scope, shared)
    batches = []

    def build(trial: Any) -> list[str]:
        return _overrides(trial, fixed, extend, config) + ([f"search.trial={trial.number}"] if pruning else [])

    def tell(trial: Any, ret: Any) -> tuple[BaseException | None, bool]:  # an asynchronous trial: a batch of one
        error = _tell(study, trial, ret, record, len(directions))
        over = record.over_budget()
        record.save()
        return error, over

    try:
        if sweeper.asynchronous:
            batches = _async.run(sweeper, claims, build, tell, lambda error: stop(record, config, error))
        while not sweeper.asynchronous:
            trials = []
            for _ in range(min(sweeper.n_jobs, claims.remaining())):
                with _interrupt_after():  # the trial is RUNNING in the storage before ask() returns its number
                    claimed = claims.ask()
                if claimed is None:
                    break
                trials.append(claimed[0])
            if not trials:
                break
            batch = [build(trial) for trial in trials]
            sweeper.validate_batch_is_legal(batch)
            returns = sweeper.launcher.launch(batch, initial_job_idx=len(record.jobs))
            batches.append(returns)
            errors = [_tell(study, trial, ret, record, len(directions)) for trial, ret in zip(trials, returns)]
            over = record.over_budget()
            record.save()
            if over:
                stop(record, config, next((e for e in errors if e is not None), None))
                break
    except BaseException:
        _fail_running(study, claims.asked)
        raise
    _save_best(study, sweep_dir, len(directions))
    return batches


def _pruning(sweeper: Any, config: Any, n_objectives: int) -> bool:
    """Whether the jobs report their epochs to their trials; one log line when a pruner is set but cannot act."""
    if not active(sweeper.pruner):
        return False
    reason = None
    if not sweeper.storage:
        reason = ("an in-memory study (hydra.sweeper.storage=null) cannot be reached from the jobs; set "
                  "hydra.sweeper.storage=sqlite:///... (or postgresql://...) to prune")
    elif n_objectives > 1:
        reason = "Optuna prunes single-objective studies only"
    elif OmegaConf.select(config, "search", default=None) is None:
        reason = "this app's config has no search.trial to tell a job its trial"
    if reason:
        log.info("hydra/sweeper/pruner ignored: %s", reason)
        return False
    return True


@contextlib.contextmanager
def _interrupt_after():
    """Hold a Ctrl-C that comes while the block runs until it ends (main thread only; elsewhere no signals come)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def _overrides(trial: Any, fixed: dict[str, str], extend: Any, config: Any) -> list[str]:
    if extend is not None:
        extend(config, trial)  # suggests more parameters on the trial (Hydra's custom_search_space)
    searched = [f"{key}={value}" for key, value in trial.params.items()]
    return searched + list(fixed.values())


def _tell(study: Any, trial: Any, ret: Any, record: SweepRecord, n_objectives: int) -> BaseException | None:
    """Record the job, tell the study how its trial ended; the job's exception when it failed."""
    found, error = record.add(ret)
    if found.status == FINISHED and not _valid(found, n_objectives):
        found.status = FAILED
        found.error = (f"ValueError: the job returned {ret.return_value!r}, not "
                       f"{'a finite number' if n_objectives == 1 else f'{n_objectives} finite numbers'} to optimise")
    if found.status == PRUNED:
        study.tell(trial, state=TrialState.PRUNED)
        return None
    if found.status == FAILED:
        log.warning("job %d failed: %s", found.job, found.error)
        study.tell(trial, state=TrialState.FAIL)
        return error or ValueError(found.error)
    try:
        study.tell(trial, found.objective)
    except RuntimeError as err:  # GridSampler: every point was run; the trial itself is stored
        if "Study.stop" not in str(err):
            raise
    return None


def _valid(found: JobOutcome, n_objectives: int) -> bool:
    value = found.objective
    if n_objectives == 1:
        return isinstance(value, float)
    return isinstance(value, list) and len(value) == n_objectives


def _fail_running(study: Any, asked: list[int]) -> None:
    """End the trials this invocation asked for that are still RUNNING as FAIL."""
    mine = set(asked)
    try:
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if trial.number in mine:
                study.tell(trial.number, state=TrialState.FAIL)
    except Exception as err:  # noqa: BLE001 - a storage gone with the interruption: nothing more to end
        log.warning("could not end the running trials of this search as FAIL: %s", err)


def _save_best(study: Any, sweep_dir: Path, n_objectives: int) -> None:
    """``optimization_results.yaml`` as Hydra's Optuna sweeper writes it (over the whole study, resumed included)."""
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        log.warning("no trial of study %s completed: no best parameters", study.study_name)
        return
    if n_objectives == 1:
        best = study.best_trial
        results = {"name": "optuna", "best_params": best.params, "best_value": best.value}
        log.info("Best value %s with %s", best.value, best.params)
    else:
        results = {"name": "optuna", "solutions": [{"params": t.params, "values": t.values}
                                                   for t in study.best_trials]}
        log.info("%d Pareto-optimal trials", len(results["solutions"]))
    OmegaConf.save(OmegaConf.create(results), sweep_dir / "optimization_results.yaml")
