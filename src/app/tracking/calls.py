"""Every MLflow call of a command, as plain functions of MLflow's public client API.

They run in the MLflow helper process (:mod:`app.tracking.helper`: one worker of a ``ProcessPoolExecutor``, so in the
order they were submitted) or, where there is no helper (``tracking.background=false``, a worker process of the
joblib or submitit launcher), in the job's own process. Either way :data:`STORE` is that process's view: the store it
opened and each run by *handle*, a name the callback gives a run before it exists, so that a job's end never waits
for its start. A call that fails raises :class:`CallFailed` with the one line to report; a call for a run whose start
(or whose store) already failed raises :class:`Skipped`: that failure is the one reported.
"""

from __future__ import annotations

import functools
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from app.errors import first_line
from app.store.files import update_json, write_json
from app.tracking import backend, comparison, redaction, results

log = logging.getLogger("app.tracking.backend")

GONE = "Max retries exceeded"  # urllib3's words once every retry of a request failed to reach the server
PARENT_FILE = ".mlflow_parent.json"  # in the sweep dir: the parent run's id, for jobs in other processes
PARENT_WAIT = 300.0  # seconds a job in another process waits for the parent run (the helper imports MLflow first)


class Skipped(Exception):
    """A call for a run whose creation (or whose store) already failed."""


class CallFailed(Exception):
    """A call that failed: its one line."""


@dataclass
class Store:
    uri: str | None = None
    experiment_id: str | None = None
    failure: str | None = None  # the store could not be opened, or stayed unreachable: later calls are skipped
    runs: dict[str, str] = field(default_factory=dict)  # handle -> run id
    closed: set[str] = field(default_factory=set)  # handles that take no more calls (start failed, or ended)
    dirs: dict[str, str] = field(default_factory=dict)  # handle -> the job's output dir (or the sweep dir)
    monitors: dict = field(default_factory=dict)  # handle -> MLflow's SystemMetricsMonitor of the job's run

    def client(self):

        if self.failure:
            raise Skipped(self.failure)
        return backend.client(self.uri)

    def run(self, handle: str) -> str:
        if handle in self.closed or self.failure:
            raise Skipped(handle)
        return self.runs[handle]


STORE = Store()


def new_handle() -> str:
    return uuid.uuid4().hex


def reported(call):
    """Turn any failure of ``call`` into CallFailed (one line naming the run and where the job's outputs are)."""

    @functools.wraps(call)
    def wrapper(*args, **kwargs):
        try:
            return call(*args, **kwargs)
        except (Skipped, CallFailed):
            raise
        except Exception as err:  # noqa: BLE001 - whatever MLflow or the store raised
            raise CallFailed(_line(call.__name__, kwargs, err)) from None

    return wrapper


def _line(op: str, kwargs: dict, err: BaseException) -> str:

    if isinstance(err, backend.TrackingUnavailable):
        return str(err)
    first = redaction.redact_text(first_line(err))[:200]
    if GONE in str(err) and not STORE.failure:
        # the requests rode out the retry window (backend.HTTP_RIDE_OUT, ~2 min) and the store is still gone:
        # the command's later calls are skipped, rather than each waiting that long again
        STORE.failure = f"the store stayed unreachable: {first}"
    handle = kwargs.get("handle") or (kwargs.get("parent") or {}).get("handle")
    where = STORE.dirs.get(handle, "?")
    if op in ("start_parent", "end_parent"):
        return (f"MLflow tracking store unreachable while recording the sweep's parent run ({first}); the jobs' "
                f"outputs are in {where}")
    run = STORE.runs.get(handle)
    what = f"run {run}" if run else "a job's run"
    return (f"MLflow tracking store unreachable while recording {what} ({first}); the job's outputs are in {where}; "
            "once the store is back, `python -m app.tracking close-orphans` (or the next run) closes the run as FAILED")


# --------------------------------------------------------------------------------------------------- the store
def open_store(uri: str, experiment_name: str) -> str:
    """The experiment (created if needed); runs left RUNNING by a process that died (kill -9, a lost node) end
    FAILED. Raises TrackingUnavailable (one line) if the store cannot be opened."""

    STORE.uri = uri
    try:
        STORE.experiment_id = backend.ensure_experiment(uri, experiment_name)
    except backend.TrackingUnavailable as err:
        STORE.failure = str(err)
        raise
    try:
        for run_id in backend.close_orphans(backend.client(uri), STORE.experiment_id):
            log.warning("closed orphaned run %s as FAILED (its process had died)", run_id)
    except Exception as err:  # noqa: BLE001 - housekeeping must not stop the run
        log.warning("could not look for orphaned runs: %s", err)
    return STORE.experiment_id


def parent_run(ref: dict | None, wait: float = PARENT_WAIT) -> tuple[str | None, str | None]:
    """(run id, experiment id) of a parent: ``{"handle"}`` (this process's), ``{"run_id", "experiment_id"}``, or
    ``{"file"}``: the sweep dir's :data:`PARENT_FILE`, written by the helper once it made the parent run."""
    if not ref:
        return None, None
    if "handle" in ref:
        return STORE.run(ref["handle"]), STORE.experiment_id
    if "file" in ref:
        path, deadline = Path(ref["file"]), time.monotonic() + wait
        while not path.exists():
            if time.monotonic() > deadline:
                raise CallFailed(f"the sweep's parent run was not recorded within {wait:.0f} s ({path} is missing)")
            time.sleep(0.05)
        ref = json.loads(path.read_text())
        if ref.get("failed"):
            raise Skipped(ref["failed"])  # reported once, by the sweep's own command
    return ref["run_id"], ref.get("experiment_id")


# --------------------------------------------------------------------------------------------------- runs
def _process(tags: dict) -> dict:
    """The ``process.*`` tags (backend.process_tags) are given with the run's creation: a run whose later calls never
    reach the store is still known as its process's, and closed as FAILED once that process has died."""
    return {k: v for k, v in tags.items() if k.startswith("process.")}


@reported
def start_parent(*, handle: str, name: str, tags: dict, start_time: int, sweep_dir: str) -> dict:
    """The sweep's parent run, started at ``start_time`` (ms: when the sweep started, not when the helper gets to
    it); ``{"run_id", "experiment_id"}`` goes to the sweep dir for jobs in other processes (written even when it
    failed: they stop waiting)."""

    STORE.dirs[handle] = sweep_dir
    record: dict = {"failed": "the sweep's parent run could not be created"}
    try:
        c = STORE.client()
        run_id = c.create_run(STORE.experiment_id, run_name=name, tags={"kind": "sweep", **_process(tags)},
                              start_time=start_time).info.run_id
        STORE.runs[handle] = run_id
        record = {"run_id": run_id, "experiment_id": STORE.experiment_id}
    except BaseException:
        STORE.closed.add(handle)
        raise
    finally:
        write_json(Path(sweep_dir) / PARENT_FILE, record)
    backend.set_tags(c, run_id, tags)
    log.info("MLflow parent run %s (%s) in %s", name, run_id, redaction.redact_text(STORE.uri))
    return record


@reported
def start_job(*, handle: str, uri: str, experiment_name: str, run_name: str, params: dict, tags: dict,
              output_dir: str, start_time: int, parent: dict | None = None, parent_env: str | None = None,
              env_run: str | None = None, system_metrics: bool = False) -> str:
    """Create the job's run (or take over the one ``mlflow run`` made) with its params and tags; with
    ``system_metrics``, MLflow's system-metrics logging into it until the job ends (:func:`start_system_metrics`)."""

    STORE.dirs[handle] = output_dir
    try:
        if STORE.uri is None:  # a launcher's worker: import MLflow while the helper makes the parent run, ...
            import mlflow  # noqa: F401
        # ... then wait for it: the helper has then opened the store (and created a fresh sqlite store's tables:
        # two processes creating them at once fail)
        parent_id, experiment_id = parent_run(parent)
        if STORE.uri is None:  # a job in a process that has not opened the store (a launcher's worker)
            backend.configure(uri)
            backend.ride_out_restarts()
            STORE.uri = uri
        c = STORE.client()
        if parent_id is None and parent_env:  # a step of the Yadage workflow (app.workflow)
            parent_id, experiment_id = parent_env, c.get_run(parent_env).info.experiment_id
        if experiment_id is None:
            experiment_id = STORE.experiment_id = STORE.experiment_id or backend.ensure_experiment(uri,
                                                                                                    experiment_name)
        if env_run:  # launched by `mlflow run`: log into its run, never a duplicate
            run_id = env_run
        else:
            first = {"mlflow.runName": run_name, **({"mlflow.parentRunId": parent_id} if parent_id else {}),
                     **_process(tags)}
            run_id = c.create_run(experiment_id, start_time=start_time, run_name=run_name, tags=first).info.run_id
    except BaseException:
        STORE.closed.add(handle)
        raise
    STORE.runs[handle] = run_id
    # The pipeline records it as the producer of the stage outputs it caches (app.store.provenance).
    update_json(Path(output_dir) / "run.json", {"mlflow_run_id": run_id})
    backend.log_params(c, run_id, params)
    backend.set_tags(c, run_id, tags)
    if system_metrics:
        start_system_metrics(handle, run_id)
    return run_id


def start_system_metrics(handle: str, run_id: str) -> None:
    """MLflow's own system-metrics logging (what ``mlflow.start_run(log_system_metrics=True)`` starts: CPU, memory,
    disk, network, and the GPUs with pynvml) into the job's run, from this process, until :func:`stop_system_metrics`.

    The monitor is MLflow's ``SystemMetricsMonitor`` itself: the runs here are made through the client, not the
    fluent API, whose active run would clash with the model registration's ``mlflow.start_run``. Its sampling interval
    is MLflow's (10 s; ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` sets it). A tag says whether GPU metrics are in.
    """
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    except ImportError as err:  # psutil missing
        log.warning("tracking.system_metrics=true needs psutil (pip install psutil): no system metrics (%s)", err)
        return
    monitor = SystemMetricsMonitor(run_id, tracking_uri=STORE.uri)
    gpu = any(type(m).__name__ in ("GPUMonitor", "ROCMMonitor") for m in monitor.monitors)
    backend.set_tags(STORE.client(), run_id, {"system_metrics.gpu": str(gpu).lower()})
    monitor.start()
    STORE.monitors[handle] = monitor


def stop_system_metrics(handle: str) -> None:
    """Stop the job's monitor; the samples taken since its last report (a job shorter than the interval has only
    those) are logged as one more step."""
    monitor = STORE.monitors.pop(handle, None)
    if monitor is None:
        return
    monitor.finish()
    leftover = monitor.aggregate_metrics()
    if leftover:
        monitor.publish_metrics(leftover)
        monitor.mlflow_logger.flush()


@reported
def finish_job(*, handle: str, status: str, error: str | None, register_model: bool, objective: float | None = None,
               parent: dict | None = None, job_num: int = 0, end_time: int | None = None,
               tags: dict | None = None) -> None:
    """Everything the job produced (read from its output dir), then its end. If the store fails on the way, the run
    stays RUNNING (closed as FAILED later: ``close-orphans``, or the next run)."""

    stop_system_metrics(handle)  # the job's work is over: what follows is this call's own
    run_id = STORE.run(handle)
    c = STORE.client()
    parent_id = None
    if objective is not None and parent:  # the parent's chart of the objective per trial
        try:
            parent_id = parent_run(parent)[0]
        except (Skipped, CallFailed):  # the parent's failure is reported on its own
            pass
    results.log_job(c, run_id, Path(STORE.dirs[handle]), register_model, objective, parent_id, job_num)
    if tags:
        backend.set_tags(c, run_id, tags)
    _end(c, handle, run_id, status, error, end_time)


@reported
def end_run(*, handle: str, status: str, error: str | None = None, end_time: int | None = None) -> None:
    """End a job's run at ``end_time`` (ms: when the job ended); for Ctrl-C and bad input, which skip the job's end."""
    stop_system_metrics(handle)
    _end(STORE.client(), handle, STORE.run(handle), status, error, end_time)


def _end(c, handle: str, run_id: str, status: str, error: str | None, end_time: int | None) -> None:

    if error is not None:
        backend.set_tags(c, run_id, {"error": error})
    c.set_terminated(run_id, status, end_time=end_time)
    STORE.closed.add(handle)  # ended: nothing more is recorded for it


@reported
def end_parent(*, parent: dict, metric: str | None, direction: str | None, register_model: bool,
               stopped: str | None = None, killed: bool | None = None, failed_jobs: dict | None = None) -> None:
    """The sweep's comparison on the parent run, then its end: FINISHED, or FAILED (the comparison failed, or the
    sweep ended early: ``killed=False``) or KILLED (Ctrl-C: ``killed=True``). ``stopped``: why the sweeper launched no
    more jobs (its failure budget), as a tag. ``failed_jobs``: {job number: error line} of the jobs the sweeper
    recorded as failed; their runs still RUNNING are closed FAILED first (:func:`close_failed_children`)."""

    if "uri" in parent and STORE.uri is None:  # at exit, in the command's own process: the helper has ended
        backend.configure(parent["uri"])
        STORE.uri = parent["uri"]
    c = STORE.client()
    run_id, experiment_id = parent_run(parent)
    ref = {"run_id": run_id, "experiment_id": experiment_id}
    if failed_jobs:
        close_failed_children(c, run_id, experiment_id, failed_jobs)
    status = "FINISHED"
    try:
        best = comparison.summarise_sweep(c, ref, metric, direction)
        if best and register_model and killed is None:
            from app.tracking import registry

            name = registry.alias_best(c, best)
            if name:
                backend.set_tags(c, run_id, {"best_model": f"models:/{name}@{registry.BEST_ALIAS}"})
    except Exception as err:  # noqa: BLE001 - the sweep's summary must not leave the parent RUNNING
        log.warning("sweep comparison failed: %s", err)
        if killed is None:
            backend.set_tags(c, run_id, {"error": first_line(err)})
            status = "FAILED"
    if stopped:
        backend.set_tags(c, run_id, {"stopped": stopped})
    if killed is not None:
        reason = "interrupted" if killed else "the sweep ended early (see the FAILED child runs)"
        backend.set_tags(c, run_id, {"error": reason})
        status = "KILLED" if killed else "FAILED"
    c.set_terminated(run_id, status)
    if "handle" in parent:
        STORE.closed.add(parent["handle"])


def close_failed_children(c, parent_id: str, experiment_id: str, failed_jobs: dict) -> list[str]:
    """End FAILED, with the job's error line as the tag ``error``, the child runs of ``parent_id`` still RUNNING whose
    job (tag ``job.num``) the sweeper recorded as failed: a job that SLURM ended (its time limit, ``scancel``) was
    killed before its end was recorded, and the sweeper learnt from the launcher how it ended."""
    closed = []
    running = c.search_runs([experiment_id], max_results=1000,
                            filter_string=f"tags.mlflow.parentRunId = '{parent_id}' and attributes.status = 'RUNNING'")
    for run in running:
        num = run.data.tags.get("job.num")
        error = failed_jobs.get(int(num)) if num is not None and num.isdigit() else None
        if error is not None:
            backend.set_tags(c, run.info.run_id, {"error": error})
            c.set_terminated(run.info.run_id, "FAILED")
            closed.append(run.info.run_id)
    return closed
