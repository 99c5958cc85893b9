"""Hydra callback that forwards every job to MLflow (configured under ``hydra.callbacks``).

- a run (or multirun) start checks the tracking store (no MLflow import) and has it opened, before any job;
- a multirun is one parent run; its id is written into the sweep dir, where jobs in other processes (joblib,
  submitit workers) read it, so children nest under it whatever the launcher; a single run nests under the run in
  ``$MADMINER_SWEEPER_PARENT_RUN_ID`` (a step of the Yadage workflow);
- each job is one run: the resolved config as params (batched), group choices and provenance as tags, then at its
  end the metrics, the event file as input dataset, and the artifacts;
- the run ends FINISHED, FAILED (first line of the error in a tag) or KILLED, never RUNNING; a trial that the
  search's pruner stopped ends KILLED with the tag ``optuna.trial_state=PRUNED`` and its per-epoch series;
- a single run ends with the ``mlflow ui`` line for the store its run went to.

The callback gathers what to record; the functions of :mod:`app.tracking.calls` make the MLflow calls, by default in
the helper process of :mod:`app.tracking.helper` (``tracking.background``) so that the command never imports MLflow
or waits for the store. Secrets are redacted before anything reaches MLflow.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import io
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from app.errors import Pruned, error_line
from app.store.files import update_json
from app.sweeps import outcomes
from app.tracking import backend, calls, comparison, helper, redaction

log = logging.getLogger("app.tracking")

PRUNED_TAG = "optuna.trial_state"  # PRUNED on the run of a job that the search's pruner stopped (run ends KILLED)
PARENT_ENV = "MADMINER_SWEEPER_PARENT_RUN_ID"  # a parent run given by the caller (the Yadage workflow)
# This process's job run ({"handle", "parent", "tracking_seconds"}) and sweep ({"parent": start_parent's future,
# "uri", "dir"})
_active: dict[str, Any] = {}
_sweep: dict[str, Any] = {}


def _enabled(config: DictConfig) -> bool:
    return "tracking" in config and config.tracking.mode != "disabled"


def _multirun(config: DictConfig) -> bool:
    return str(config.hydra.mode).endswith("MULTIRUN")


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _ms() -> int:
    return int(time.time() * 1000)


class MLflowCallback(Callback):
    def __init__(self) -> None:
        self.parent: dict | None = None  # {"handle"} of the sweep's parent run (plain: joblib pickles the callback)
        self.objective: dict = {}
        self.register_model = False

    # ------------------------------------------------------------------ run / multirun
    def _start(self, config: DictConfig):
        """Check the store (a TCP connect for a server: no MLflow import) and have it opened: by the helper process,
        which imports MLflow meanwhile, or here."""

        uri, name = backend.effective_uri(config.tracking), config.tracking.experiment_name
        if not uri:
            _fail(f"tracking={config.tracking.mode} needs a tracking URI; set MLFLOW_TRACKING_URI or tracking.uri=...")
        try:
            backend.precheck(uri)
        except backend.TrackingUnavailable as err:
            _fail(str(err))
        tracker = None
        if config.tracking.get("background", True):
            try:
                tracker = helper.start(uri, name)
            except Exception as err:  # noqa: BLE001 - the calls are then made here
                log.warning("MLflow helper process not started (%s): tracking in this process", err)
        if tracker is None:
            tracker = helper.Tracker()
            opened = tracker.submit(calls.open_store, uri=uri, experiment_name=name)
            if opened.exception() is not None:
                _fail(tracker.wait()[0])
        helper.set_current(tracker)
        self.register_model = bool(config.tracking.register_model)
        direction = config.objective.direction
        self.objective = {"metric": config.objective.metric,
                          "direction": None if direction is None else str(getattr(direction, "value", direction))}
        return tracker

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if _enabled(config):
            self._start(config)

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        """The helper's end (after the run's calls), then how to look at the run."""
        if not _enabled(config):
            return

        tracker = helper.current()
        if tracker is not None:
            tracker.close()
        log.info("%s", backend.ui_line(backend.effective_uri(config.tracking)))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not _enabled(config):
            return

        tracker = self._start(config)
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / calls.PARENT_FILE).unlink(missing_ok=True)  # an earlier sweep's, into the same dir
        sweeper = config.hydra.sweeper
        name = (sweeper.get("study_name") if "study_name" in sweeper else None) or f"sweep-{sweep_dir.name}"
        tags = {"sweep_dir": str(sweep_dir), "kind": "sweep", **backend.process_tags(), **_source_tags(),
                "overrides": _typed(config.hydra.overrides.task)}
        if sweeper.get("storage") or "optuna" in str(sweeper.get("_target_", "")):
            # A resumed study gets a new parent run: these tags tie every invocation to its study.
            tags.update({
                "optuna.study_name": sweeper.get("study_name"),
                "optuna.storage": redaction.redact_text(str(sweeper.get("storage"))),
                "optuna.n_trials": sweeper.get("n_trials"),
            })
        handle = calls.new_handle()
        # started now, whenever the helper creates it (it imports MLflow first): the UI shows the sweep's duration
        started = tracker.submit(calls.start_parent, handle=handle, name=name, tags=tags, start_time=_ms(),
                                 sweep_dir=str(sweep_dir))
        if not tracker.remote and started.exception() is not None:
            _fail(tracker.wait()[0])
        if tracker.remote:  # the comparison at the sweep's end draws plots: the helper imports matplotlib meanwhile
            tracker.submit(comparison.warm_plots)
        self.parent = {"handle": handle}
        _sweep.update(parent=started, uri=backend.effective_uri(config.tracking), dir=str(sweep_dir))
        # Hydra skips on_multirun_end when a job's error or Ctrl-C ends the sweep: close the parent anyway.
        _watch_uncaught_exceptions()
        atexit.register(self._close_parent_at_exit)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not _enabled(config) or self.parent is None:
            return

        tracker, parent = helper.current(), self.parent
        self.parent = None
        record = outcomes.load(config.hydra.sweep.dir)  # this project's sweepers: why the sweep stopped early
        # a job that SLURM ended never ran its on_job_end: the sweeper's record says how it ended
        failed_jobs = {j.job: j.error for j in record.failures} if record else {}
        tracker.submit(calls.end_parent, parent=parent, register_model=self.register_model,
                       stopped=record.stopped if record else None, failed_jobs=failed_jobs, **self.objective)
        lines = tracker.wait()  # every job's calls were submitted before: their failures too
        tracker.close()
        for line in lines:
            log.error("error: %s", line)
        outcomes.add_tracking_errors(config.hydra.sweep.dir, lines)  # the sweep's report counts them: exit code 1

    def _close_parent_at_exit(self) -> None:
        """The interpreter's exit has waited for the helper's calls (and ended it): the parent run is closed here."""
        if self.parent is None:
            return

        self.parent = None
        started = _sweep.get("parent")
        if started is None or not started.done() or started.exception() is not None:
            return  # no parent run to close (its failure was reported)
        parent = {**started.result(), "uri": _sweep["uri"]}
        killed = issubclass(_uncaught.get("type") or Exception, KeyboardInterrupt)
        record = outcomes.load(_sweep["dir"])
        here = helper.Tracker()
        here.submit(calls.end_parent, parent=parent, register_model=False, killed=killed,
                    stopped=record.stopped if record else None, **self.objective)
        for line in here.wait():
            log.error("error: %s", line)

    # ------------------------------------------------------------------ jobs
    def on_job_start(self, config: DictConfig, *, task_function: Any = None, **kwargs: Any) -> None:
        if not _enabled(config):
            return
        started = time.perf_counter()

        hydra = config.hydra
        tracker, parent = helper.current(), None
        if _multirun(config):
            # the sweep's own process (in-process launcher) names the parent by handle; a worker process of another
            # launcher (joblib, submitit) makes its own calls, under the parent run the helper wrote into the sweep dir
            parent = self.parent if "parent" in _sweep else {"file": str(Path(hydra.sweep.dir) / calls.PARENT_FILE)}
        if tracker is None:  # a process without a run or sweep start: a launcher's worker
            tracker = helper.Tracker()
            helper.set_current(tracker)
        job_only = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
        job_cfg = OmegaConf.to_container(job_only, resolve=True, enum_to_str=True)
        handle = calls.new_handle()
        created = tracker.submit(
            calls.start_job, handle=handle, uri=backend.effective_uri(config.tracking),
            experiment_name=config.tracking.experiment_name, run_name=_run_name(config),
            params=backend.flatten(redaction.redact(job_cfg)), tags={**_job_tags(config), **backend.process_tags()},
            output_dir=str(hydra.runtime.output_dir), start_time=_ms(), parent=parent,
            parent_env=os.environ.get(PARENT_ENV), env_run=os.environ.get("MLFLOW_RUN_ID"),
            system_metrics=bool(config.tracking.get("system_metrics", False)))
        if not tracker.remote and created.exception() is not None:  # the store failed here: one line, as at the end
            _report(tracker, config)
        _active.update(handle=handle, parent=parent, tracking_seconds=time.perf_counter() - started)
        self.register_model = bool(config.tracking.register_model)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if not _enabled(config) or not _active.get("handle"):
            return
        from hydra.core.utils import JobStatus


        started = time.perf_counter()
        tracker, handle = helper.current(), _active.pop("handle")
        failed = job_return.status == JobStatus.FAILED
        pruned = failed and _pruned(job_return)  # the search's pruner stopped it: KILLED, tagged, not an error
        value = None if failed else job_return.return_value
        objective = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        job_num = OmegaConf.select(config, "hydra.job.num", default=0, throw_on_missing=False)
        status = "KILLED" if pruned else "FAILED" if failed else "FINISHED"
        tracker.submit(calls.finish_job, handle=handle, status=status,
                       error=_job_error(job_return) if failed and not pruned else None,
                       tags={PRUNED_TAG: "PRUNED"} if pruned else None,
                       register_model=bool(config.tracking.register_model), objective=objective,
                       parent=_active.get("parent"), job_num=int(job_num or 0), end_time=_ms())
        if _multirun(config) and not tracker.remote:  # the calls were made here
            for line in tracker.wait():
                log.error("error: %s", line)
        # the job's own tracking time (bench/sweeps.py reads it)
        spent = _active.pop("tracking_seconds", 0.0) + time.perf_counter() - started
        update_json(Path(config.hydra.runtime.output_dir) / "run.json", {"tracking_seconds": round(spent, 3)})
        if not _multirun(config):
            _report(tracker, config)  # a run: its calls are made before the command ends; a failure is one line


def _pruned(job_return) -> bool:
    with contextlib.redirect_stderr(io.StringIO()):
        try:
            _ = job_return.return_value
        except Pruned:
            return True
        except Exception:  # noqa: BLE001 - any other error: a failure
            return False
    return False


def _job_error(job_return) -> str:
    """``Type: first line`` of a failed job's error, read through JobReturn's public ``return_value`` (which raises
    it, after writing an "Error executing job" line to stderr: that line is Hydra's or the sweep's to print)."""
    with contextlib.redirect_stderr(io.StringIO()):
        try:
            _ = job_return.return_value
        except Exception as err:  # noqa: BLE001 - the job's own error, whatever it is
            return error_line(err)
    return "failed"


def _report(tracker, config: DictConfig) -> None:
    """A run (not a sweep): the first failed call ends the command with one line and exit code 2."""
    errors = tracker.wait()
    if not errors:
        return
    if _multirun(config):
        for line in errors:
            log.error("error: %s", line)
        return
    _fail(errors[0])


_uncaught: dict[str, Any] = {}


def _watch_uncaught_exceptions() -> None:
    """Remember the exception that ends the process (sys.excepthook runs before atexit handlers)."""
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        _uncaught.update(type=exc_type)
        previous(exc_type, exc, tb)

    sys.excepthook = hook


def end_active_run(status: str, error: BaseException | None = None) -> None:
    """End this process's job run; called by the task wrapper on Ctrl-C and on bad input (which skip on_job_end)."""

    handle = _active.pop("handle", None)
    tracker = helper.current()
    if handle is None or tracker is None:
        return
    tracker.submit(calls.end_run, handle=handle, status=status, error=None if error is None else error_line(error),
                   end_time=_ms())
    for line in tracker.wait():
        log.error("error: %s", line)


def _run_name(config: DictConfig) -> str:
    method = config.training.method
    hydra = config.hydra
    if _multirun(config):
        return f"{method}-{hydra.job.num}"
    if os.environ.get(PARENT_ENV):
        return f"{getattr(config.stage, 'value', config.stage)}-{method}"
    return f"{method}-{time.strftime('%H%M%S')}"


def _typed(task) -> str:
    """The overrides as typed: OmegaConf would resolve a ``${oc.env:VAR}`` inside them on access."""
    return " ".join(OmegaConf.to_container(task, resolve=False))


def _job_tags(config: DictConfig) -> dict:
    hydra = config.hydra
    tags: dict[str, Any] = {
        group: choice
        for group, choice in hydra.runtime.choices.items()
        if not group.startswith(("hydra", "schema")) and choice is not None
    }
    tags.update(
        {
            "mlflow.runName": _run_name(config),
            "overrides": _typed(hydra.overrides.task),
            "job.name": hydra.job.name,
            "job.num": OmegaConf.select(config, "hydra.job.num", default=None, throw_on_missing=False),
            "output_dir": hydra.runtime.output_dir,
            "sweep_dir": hydra.sweep.dir if _multirun(config) else None,
            "objective.metric": config.objective.metric,
            "objective.direction": str(getattr(config.objective.direction, "value", config.objective.direction)),
        }
    )
    tags.update({f"version.{package}": found for package, found in _versions().items()})
    tags.update(_source_tags())
    return tags


def _source_tags() -> dict[str, str]:
    """What the MLflow UI shows as a run's Source and commit (what mlflow.start_run would add; `mlflow run` has added
    them to its own run)."""
    tags = {}
    commit = _git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    if not os.environ.get("MLFLOW_RUN_ID"):
        import getpass

        try:
            tags["mlflow.user"] = getpass.getuser()
        except (KeyError, OSError):
            pass
        tags.update({"mlflow.source.name": sys.argv[0], "mlflow.source.type": "LOCAL"})
    return tags


@functools.cache
def _versions() -> dict[str, str]:
    """The installed versions of the packages a run depends on (looked up once per process, not per job)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("madminer-sweeper", "madminer", "torch", "mlflow"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


@functools.cache
def _git_commit() -> str | None:
    """The checkout's commit (once per process: a sweep's jobs run the code this process imported)."""
    checkout = Path(__file__).resolve().parents[3]
    if not (checkout / ".git").exists():
        return None
    try:
        out = subprocess.run(
            ["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None
