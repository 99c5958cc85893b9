"""Hydra callback that forwards every job to MLflow (configured under ``hydra.callbacks``).

- a run (or multirun) start checks the tracking store and creates the experiment, before any job;
- a multirun is one parent run; its id is written into the sweep dir, where every job (in this
  process or in joblib / submitit workers) reads it, so children nest under it; a single run nests
  under the run in ``$MADMINER_SWEEPER_PARENT_RUN_ID`` (a step of the Yadage workflow);
- each job is one run: the resolved config as params (batched), group choices and provenance as
  tags, then at its end the metrics, the event file as input dataset, and the artifacts;
- the run ends FINISHED, FAILED (first line of the error in a tag) or KILLED, never RUNNING.

The callback gathers what to record; :mod:`app.tracking.recorder` makes the MLflow calls, by default in a helper process
(``tracking.background``) so that neither this process nor a joblib worker imports MLflow or waits for the store.
Secrets are redacted before anything reaches MLflow.
"""

from __future__ import annotations

import atexit
import functools
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("app.tracking.backend")

PARENT_FILE = ".mlflow_parent.json"
PARENT_ENV = "MADMINER_SWEEPER_PARENT_RUN_ID"  # a parent run given by the caller (the Yadage workflow)
_active: dict[str, Any] = {}  # the job run this process records: {"handle", "parent", "tracking_seconds"}


def _tracking(config: DictConfig) -> tuple[str, str | None, str]:
    """(mode, uri, experiment name); inside ``mlflow run`` the run's own store is used."""
    t = config.tracking
    uri = t.uri
    if os.environ.get("MLFLOW_RUN_ID") and os.environ.get("MLFLOW_TRACKING_URI"):
        uri = os.environ["MLFLOW_TRACKING_URI"]
    return t.mode, uri, t.experiment_name


def _enabled(config: DictConfig) -> bool:
    return "tracking" in config and config.tracking.mode != "disabled"


def _fail(err: Exception) -> None:
    print(f"error: {err}", file=sys.stderr)
    raise SystemExit(2)


def _background(config: DictConfig) -> bool:
    """The MLflow helper process (app.tracking.recorder) serves this process and joblib workers on the same machine; the
    workers of other launchers (submitit: maybe other machines) make their calls themselves."""
    if not config.tracking.get("background", True):
        return False
    if str(config.hydra.mode).endswith("MULTIRUN"):
        target = str(OmegaConf.select(config, "hydra.launcher._target_", default="") or "")
        return "joblib" in target or "BasicLauncher" in target
    return True


class MLflowCallback(Callback):
    def __init__(self) -> None:
        self.parent: dict | None = None  # {"handle"} (helper) or {"run_id", "experiment_id"}
        self.objective: dict = {}
        self.register_model = False

    # ------------------------------------------------------------------ run / multirun
    def _start(self, config: DictConfig):
        """Check the store (a TCP connect for a server: no MLflow import) and open it: in the helper process,
        which imports MLflow meanwhile, or here."""
        from app.tracking import backend, recorder

        mode, uri, name = _tracking(config)
        if not uri:
            _fail(backend.TrackingUnavailable(
                f"tracking={mode} needs a tracking URI; set MLFLOW_TRACKING_URI or tracking.uri=..."
            ))
        try:
            backend.precheck(uri)
        except backend.TrackingUnavailable as err:
            _fail(err)
        tracker = None
        if _background(config):
            try:
                tracker = recorder.start(uri)
            except Exception as err:  # noqa: BLE001 - the calls are then made here
                log.warning("MLflow helper process not started (%s): tracking in this process", err)
        if tracker is None:
            tracker = recorder.Local()
            try:
                tracker.call("connect", uri=uri, experiment_name=name)
            except backend.TrackingUnavailable as err:
                _fail(err)
        else:
            tracker.post("connect", uri=uri, experiment_name=name)
            atexit.register(tracker.close)  # registered first, so it runs after the parent's closing below
        recorder.set_current(tracker)
        self.register_model = bool(config.tracking.register_model)
        direction = config.objective.direction
        self.objective = {"metric": config.objective.metric,
                          "direction": None if direction is None else str(getattr(direction, "value", direction))}
        return tracker

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if _enabled(config):
            self._start(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not _enabled(config):
            return
        from app.tracking import backend, recorder

        tracker = self._start(config)
        sweep_dir = Path(config.hydra.sweep.dir)
        sweeper = config.hydra.sweeper
        name = sweeper.get("study_name") if "study_name" in sweeper else None
        name = name or f"sweep-{sweep_dir.name}"
        tags = {"sweep_dir": str(sweep_dir), "kind": "sweep", **backend.process_tags(),
                "overrides": _typed(config.hydra.overrides.task)}
        if sweeper.get("storage") or "optuna" in str(sweeper.get("_target_", "")):
            # A resumed study gets a new parent run: these tags tie every invocation to its study.
            tags.update({
                "optuna.study_name": sweeper.get("study_name"),
                "optuna.storage": backend.redact_text(str(sweeper.get("storage"))),
                "optuna.n_trials": sweeper.get("n_trials"),
            })
        handle = recorder.new_handle()
        started = int(time.time() * 1000)  # the helper may create the run seconds later (it imports MLflow first)
        if tracker.remote:
            tracker.post("start_parent", handle=handle, name=name, tags=tags, start_time=started)
            self.parent = {"handle": handle}
            shared = {"parent": self.parent, "recorder": tracker.share()}
        else:
            try:
                run_id = tracker.call("start_parent", handle=handle, name=name, tags=tags, start_time=started)
            except Exception as err:  # noqa: BLE001 - one line, as for an unreachable store
                _fail(backend.TrackingUnavailable(tracker.ops.describe("start_parent", {"handle": handle}, err)))
            self.parent = {"run_id": run_id, "experiment_id": tracker.ops.experiment_id}
            shared = {"parent": self.parent}
        sweep_dir.mkdir(parents=True, exist_ok=True)
        # the jobs need the ids (and the helper's socket and key) only; the URI, maybe with user:password@, stays out
        parent_file = sweep_dir / PARENT_FILE
        parent_file.touch(mode=0o600)
        parent_file.write_text(json.dumps(shared))
        # Hydra skips on_multirun_end when a job's error or Ctrl-C ends the sweep: close the parent anyway.
        _watch_uncaught_exceptions()
        atexit.register(self._close_parent_at_exit)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not _enabled(config) or self.parent is None:
            return
        from app.sweep import FAILURES, STATE, TRACKING_ERRORS

        tracker, parent = _recorder(), self.parent
        self.parent = None
        tracker.post("end_parent", parent=parent, register_model=self.register_model,
                     failed_jobs="; ".join(f.line() for f in FAILURES) or None, stopped=STATE.get("stopped"),
                     **self.objective)
        for line in _flush(tracker):  # every job's calls were handed over before: their failures too
            log.error("error: %s", line)
            TRACKING_ERRORS.append(line)

    def _close_parent_at_exit(self) -> None:
        if self.parent is None:
            return
        tracker, parent = _recorder(), self.parent
        self.parent = None
        killed = issubclass(_uncaught.get("type") or Exception, KeyboardInterrupt)
        try:
            tracker.post("end_parent", parent=parent, register_model=False, killed=killed, **self.objective)
            for line in _flush(tracker):
                log.error("error: %s", line)
        except Exception as err:  # noqa: BLE001 - best effort on the way out
            log.warning("could not close the sweep's parent run: %s", err)

    # ------------------------------------------------------------------ jobs
    def on_job_start(self, config: DictConfig, *, task_function: Any = None, **kwargs: Any) -> None:
        if not _enabled(config):
            return
        started = time.perf_counter()
        from app.tracking import backend, recorder

        _, uri, name = _tracking(config)
        hydra = config.hydra
        tracker, parent = recorder.current(), self.parent
        if hydra.mode is not None and str(hydra.mode).endswith("MULTIRUN"):
            parent_file = Path(hydra.sweep.dir) / PARENT_FILE
            if parent_file.exists():
                shared = json.loads(parent_file.read_text())
                parent = shared["parent"]
                if tracker is None:  # a worker process of the launcher
                    tracker = recorder.connect(shared["recorder"]) if "recorder" in shared else recorder.Local()
                    recorder.set_current(tracker)
        if tracker is None:  # a job without a run or sweep start in this process
            tracker = recorder.Local()
            recorder.set_current(tracker)
        job_only = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
        job_cfg = OmegaConf.to_container(job_only, resolve=True, enum_to_str=True)
        handle = recorder.new_handle()
        out = Path(hydra.runtime.output_dir)
        run_id = tracker.post(
            "start_job", handle=handle, uri=uri, experiment_name=name, run_name=_run_name(config),
            params=backend.flatten(backend.redact(job_cfg)), tags={**_job_tags(config), **backend.process_tags()},
            output_dir=str(out), start_time=int(time.time() * 1000), parent=parent,
            parent_env=os.environ.get(PARENT_ENV), env_run=os.environ.get("MLFLOW_RUN_ID"))
        if not tracker.remote and run_id is None:  # the store failed here: one line, as at the job's end
            _report(tracker, config)
        _active.update(handle=handle, parent=parent, tracking_seconds=time.perf_counter() - started)
        self.register_model = bool(config.tracking.register_model)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if not _enabled(config) or not _active.get("handle"):
            return
        from hydra.core.utils import JobStatus

        from app.store.files import update_json

        started = time.perf_counter()
        tracker, handle = _recorder(), _active.pop("handle")
        failed = job_return.status == JobStatus.FAILED
        value = getattr(job_return, "_return_value", None)
        objective = value if isinstance(value, (int, float)) and not isinstance(value, bool) and not failed else None
        job_num = OmegaConf.select(config, "hydra.job.num", default=0, throw_on_missing=False)
        out = Path(config.hydra.runtime.output_dir)
        # the job's own tracking time (bench/sweeps.py reads it); written before the helper may write run.json
        spent = _active.pop("tracking_seconds", 0.0) + time.perf_counter() - started
        update_json(out / "run.json", {"tracking_seconds": round(spent, 3)})
        tracker.post("finish_job", handle=handle, status="FAILED" if failed else "FINISHED",
                     error=_error_line(value) if failed else None, register_model=bool(config.tracking.register_model),
                     objective=objective, parent=_active.get("parent"), job_num=int(job_num or 0),
                     end_time=int(time.time() * 1000))  # the helper may get to it later (a run's duration)
        if not str(config.hydra.mode).endswith("MULTIRUN"):
            _report(tracker, config)  # a run: its calls are made before the command ends; a failure is one line
        elif not tracker.remote:
            for line in _flush(tracker):
                log.error("error: %s", line)


def _recorder():
    from app.tracking import recorder

    return recorder.current()


def _flush(tracker) -> list[str]:
    """Wait for every call handed over so far; the one-line failures among them."""
    try:
        return tracker.call("flush")["errors"]
    except Exception as err:  # noqa: BLE001 - the helper itself is gone
        return [str(err)]


def _report(tracker, config: DictConfig) -> None:
    """A run (not a sweep): the first failed call ends the command with one line and exit code 2."""
    errors = _flush(tracker)
    if not errors:
        return
    if str(config.hydra.mode).endswith("MULTIRUN"):
        for line in errors:
            log.error("error: %s", line)
        return
    print(f"error: {errors[0]}", file=sys.stderr)
    raise SystemExit(2) from None


def _error_line(error: BaseException | None) -> str | None:
    if error is None:
        return None
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"{type(error).__name__}: {first}"


_uncaught: dict[str, Any] = {}


def _watch_uncaught_exceptions() -> None:
    """Remember the exception that ends the process (sys.excepthook runs before atexit handlers)."""
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        _uncaught.update(type=exc_type, message=str(exc).strip().splitlines()[0] if str(exc).strip() else "")
        previous(exc_type, exc, tb)

    sys.excepthook = hook


def end_active_run(status: str, error: BaseException | None = None) -> None:
    """End this process's job run; called by the task wrapper on Ctrl-C and on bad input (which skip on_job_end)."""
    handle = _active.pop("handle", None)
    tracker = _recorder()
    if handle is None or tracker is None:
        return
    tracker.post("end_run", handle=handle, status=status, error=_error_line(error), end_time=int(time.time() * 1000))
    for line in _flush(tracker):
        log.error("error: %s", line)


def _run_name(config: DictConfig) -> str:
    method = config.training.method
    hydra = config.hydra
    if str(hydra.mode).endswith("MULTIRUN"):
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
            "sweep_dir": hydra.sweep.dir if str(hydra.mode).endswith("MULTIRUN") else None,
            "objective.metric": config.objective.metric,
            "objective.direction": str(getattr(config.objective.direction, "value", config.objective.direction)),
        }
    )
    tags.update({f"version.{package}": found for package, found in _versions().items()})
    commit = _git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    if not os.environ.get("MLFLOW_RUN_ID"):  # what mlflow.start_run would add (`mlflow run` has added them)
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
