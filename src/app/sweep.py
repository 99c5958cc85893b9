"""Sweeps that survive a bad trial: a failure budget around the launcher, and one line per failed job at the end.

Hydra's BasicSweeper re-raises the first failed job's exception (with its traceback) after a batch, and the Optuna
sweeper's ``max_failure_rate`` counts failures per batch (with ``n_jobs=1`` one failure is a rate of 1). The
sweepers of ``hydra_plugins.madminer_sweeper`` launch through :class:`FailureBudget`, which records every failed
job and stops launching once the failed fraction of all jobs so far exceeds ``max_failure_rate``; the
:class:`SweepReport` callback ends the command with one line per failed job and exit code 1.

Imported at Hydra's plugin discovery: nothing heavy here.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("app.sweep")


@dataclass
class Failure:
    job: int | None
    overrides: list[str]
    error: str

    def line(self) -> str:
        job = "?" if self.job is None else self.job
        return f"failed: job {job} [{' '.join(self.overrides)}]: {self.error}"


FAILURES: list[Failure] = []  # failed jobs of this process's sweep (the sweeper and the callbacks share it)
STATE: dict[str, Any] = {"launched": 0, "stopped": None}
TRACKING_ERRORS: list[str] = []  # MLflow calls of the sweep that failed for good (app.tracking.callback), one line each


class BudgetExceeded(Exception):
    """More jobs failed than ``max_failure_rate`` allows: launch no more."""


def error_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


class FailureBudget:
    """Wraps a launcher's ``launch``: records failures, raises BudgetExceeded after a batch that overspends."""

    def __init__(self, launch, max_failure_rate: float) -> None:
        if not 0.0 <= max_failure_rate <= 1.0:
            raise ValueError(f"hydra.sweeper.max_failure_rate must be in [0, 1], got {max_failure_rate}")
        self._launch = launch
        self.max_failure_rate = max_failure_rate
        FAILURES.clear()
        STATE.update(launched=0, stopped=None)

    def __call__(self, job_overrides, initial_job_idx: int):
        from hydra.core.utils import JobStatus

        returns = self._launch(job_overrides, initial_job_idx=initial_job_idx)
        for i, ret in enumerate(returns):
            if ret.status == JobStatus.FAILED:
                num = _job_num(ret, initial_job_idx + i)
                FAILURES.append(Failure(num, list(ret.overrides or []), error_line(ret._return_value)))
        STATE["launched"] += len(returns)
        rate = len(FAILURES) / max(1, STATE["launched"])
        if FAILURES and rate > self.max_failure_rate:
            STATE["stopped"] = (
                f"stopped after {STATE['launched']} jobs: {len(FAILURES)} failed, more than "
                f"hydra.sweeper.max_failure_rate={self.max_failure_rate}"
            )
            log.error(STATE["stopped"])
            raise BudgetExceeded(STATE["stopped"])
        return returns


def _job_num(ret, default: int) -> int:
    try:
        return int(ret.hydra_cfg.hydra.job.num)
    except Exception:  # noqa: BLE001 - a job that failed early may lack its hydra config
        return default


def prepare_storage(storage: Any) -> None:
    """sqlite needs the folder of its database file to exist before Optuna opens it."""
    if isinstance(storage, str) and storage.startswith("sqlite:///"):
        path = Path(storage[len("sqlite:///"):])
        if str(path) not in ("", ":memory:"):
            path.parent.mkdir(parents=True, exist_ok=True)


class StartWorkers(Callback):
    """With ``hydra/launcher=joblib``: start the worker processes when the sweep starts and let each import what a
    job needs (Hydra, torch, MadMiner, MLflow, matplotlib) while the parent opens the MLflow store, creates the
    parent run and composes every job's config to validate the batch. The launcher's ``Parallel`` call then finds
    them (joblib reuses an executor created with the same arguments) and the first jobs start with warm imports:
    1.4–2.7 s less per 8-trial sweep on 2 cores (bench/sweeps.py, docs/performance.md). Anything unexpected only
    costs the warm-up, never the sweep."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from omegaconf import OmegaConf

        launcher = OmegaConf.select(config, "hydra.launcher", default=None)
        if launcher is None or "joblib" not in str(launcher.get("_target_", "")):
            return
        try:
            # with the MLflow helper (tracking.background) the workers never import MLflow
            tracking = OmegaConf.select(config, "tracking.mode", default="disabled") != "disabled" and \
                not OmegaConf.select(config, "tracking.background", default=True)
            start_workers({k: v for k, v in OmegaConf.to_container(launcher, resolve=True).items() if k != "_target_"},
                          tracking=tracking)
        except Exception as err:  # noqa: BLE001 - an optimisation: the launcher starts its workers itself
            log.debug("could not start the joblib workers early: %s", err)


def start_workers(joblib_kwargs: dict, tracking: bool = True) -> list:
    """Create the loky executor exactly as the Hydra joblib launcher will (its arguments, normalised by the
    launcher's own function) and queue one warm-up per worker; returns their futures (each the worker's pid)."""
    from hydra_plugins.hydra_joblib_launcher._core import process_joblib_cfg
    from joblib import Parallel

    cfg = dict(joblib_kwargs, backend="loky")
    process_joblib_cfg(cfg)
    with Parallel(**cfg) as parallel:
        executor = getattr(parallel._backend, "_workers", None)
        if executor is None:  # one job: joblib runs it in this process
            return []
        return [executor.submit(warm_imports, tracking) for _ in range(parallel._effective_n_jobs())]


def warm_imports(tracking: bool) -> int:
    """What every job of this app imports, imported once per worker process ahead of its first job."""
    import importlib
    import os

    for name in ("app.main", "torch", "madminer.sampling", "madminer.ml", "madminer.limits",
                 "madminer.fisherinformation", "matplotlib.pyplot", "app.stages.sample", "app.stages.train",
                 "app.stages.evaluate", "app.stages.plot", *(("mlflow",) if tracking else ())):
        importlib.import_module(name)
    return os.getpid()


def release_workers() -> None:
    """End the joblib launcher's idle worker processes now. loky keeps them for reuse and shuts them down only at
    interpreter exit, waiting while each one tears down torch, MLflow and MadMiner (about 2 s of a 2-core sweep's
    wall time). Called once every job has returned and been tracked; a no-op without joblib."""
    reusable = sys.modules.get("joblib.externals.loky.reusable_executor")
    executor = getattr(reusable, "_executor", None)
    if executor is not None:
        executor.shutdown(wait=False, kill_workers=True)


class SweepReport(Callback):
    """Ends a multirun with one line per failed job (overrides and error) and exit code 1; listed first under
    ``hydra.callbacks`` so that its ``on_multirun_end`` runs last (after the MLflow summary)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        release_workers()
        if not FAILURES and not TRACKING_ERRORS:
            return
        sys.stdout.flush()
        launched = STATE["launched"]
        for failure in FAILURES:
            print(failure.line(), file=sys.stderr)
        summary = f"{len(FAILURES)} of {launched} jobs failed"
        if STATE["stopped"]:
            summary += f"; {STATE['stopped']}"
        if TRACKING_ERRORS:  # the jobs' work is done, but MLflow lacks what they did
            summary += f"; {len(TRACKING_ERRORS)} MLflow call(s) failed (the lines above)"
        print(f"error: {summary} (outputs: {config.hydra.sweep.dir})", file=sys.stderr)
        raise SystemExit(1)
