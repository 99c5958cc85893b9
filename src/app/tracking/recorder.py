"""MLflow off the jobs' critical path: one helper process makes a command's MLflow calls.

With ``tracking.background=true`` (the default) the tracking callback (:mod:`app.tracking.callback`) starts this helper
when a run or sweep starts. The helper imports MLflow and opens the store on the idle core while Hydra composes and
the first job imports torch and MadMiner: 2-4 s that were on the critical path of every command and of every joblib
worker (docs/performance.md). Jobs hand it their records over a local socket and go on: a run's creation, params and
tags when the job starts; its metrics, dataset, artifacts, registered model and end when it ends. The helper makes
the calls in the order it was handed them (one queue for the command and its joblib workers); the command waits for
it before it ends, so every run's final status is in the store when the command returns, and a call that failed is
reported as before: one line and exit code 2 for a run, one line per job in a sweep's summary.

``tracking.background=false``, launchers whose workers may run on other machines (submitit), and a helper that
cannot start make the same calls in the job's own process (:class:`Local`). Both run the same :class:`Ops`.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("app.tracking.backend")

KEY_ENV = "MADMINER_SWEEPER_RECORDER_KEY"
START_TIMEOUT = 30.0  # seconds for the helper to open its socket (a Python start and one small import)
DATASET_ATTEMPTS = 3
GONE = "Max retries exceeded"  # urllib3's words once every retry of a request failed to reach the server


class Skipped(Exception):
    """A call for a run whose creation (or whose store) already failed: that failure is the one reported."""


class RecorderError(RuntimeError):
    """The helper process is gone or refused a call."""


def new_handle() -> str:
    """A job's or sweep's name for its run before the helper has created it (the run id comes later)."""
    return uuid.uuid4().hex


# --------------------------------------------------------------------------------------------------- the calls
class Ops:
    """Every MLflow call of a command, by handle. Runs in the helper process, or in the job's (:class:`Local`)."""

    def __init__(self) -> None:
        self.uri: str | None = None
        self.experiment_id: str | None = None
        self.failure: str | None = None  # the store could not be opened: every later call is skipped
        self.runs: dict[str, str] = {}  # handle -> run id
        self.failed: set[str] = set()  # handles whose run could not be created
        self.dirs: dict[str, str] = {}  # handle -> the job's output dir
        self.errors: list[str] = []  # one line each, reported by flush()
        self.idle_work: list[Callable[[], None]] = []  # done by the helper while it waits for records

    # ---------------------------------------------------------------- connection
    def warm(self, uri: str) -> None:
        """Import MLflow and the store's modules before the first call needs them."""
        import mlflow  # noqa: F401

        from app.tracking.backend import db_scheme

        if db_scheme(uri):
            import mlflow.store.tracking.sqlalchemy_store  # noqa: F401

    def connect(self, uri: str, experiment_name: str) -> str:
        from app.tracking import backend

        self.uri = uri
        try:
            self.experiment_id = backend.ensure_experiment(uri, experiment_name)
        except Exception as err:
            if not isinstance(err, backend.TrackingUnavailable):
                text = str(err).strip()
                err = backend.unreachable(uri, text.splitlines()[0] if text else type(err).__name__)
            self.failure = str(err)
            raise err from None
        try:  # runs left RUNNING by a process that died (kill -9, a lost node) end FAILED
            for run_id in backend.close_orphans(backend.client(uri), self.experiment_id):
                log.warning("closed orphaned run %s as FAILED (its process had died)", run_id)
        except Exception as err:  # noqa: BLE001 - housekeeping must not stop the run
            log.warning("could not look for orphaned runs: %s", err)
        return self.experiment_id

    def _client(self):
        from app.tracking import backend

        if self.failure:
            raise Skipped(self.failure)
        return backend.client(self.uri)

    def _run(self, handle: str) -> str:
        if handle in self.failed or self.failure:
            raise Skipped(handle)
        return self.runs[handle]

    def run_id(self, ref: dict | None) -> str | None:
        """A parent: ``{"handle": ...}`` (created by this helper) or ``{"run_id": ...}``."""
        if not ref:
            return None
        return ref.get("run_id") or self._run(ref["handle"])

    # ---------------------------------------------------------------- runs
    def start_parent(self, handle: str, name: str, tags: dict, start_time: int | None = None) -> str:
        """The sweep's parent run, started at ``start_time`` (ms; when the sweep started, not when this call is made:
        the helper makes it after importing MLflow, seconds later)."""
        from app.tracking import backend

        c = self._client()
        self.dirs[handle] = tags.get("sweep_dir", "")
        try:
            run = c.create_run(self.experiment_id, run_name=name, tags={"kind": "sweep"}, start_time=start_time)
        except Exception:
            self.failed.add(handle)
            raise
        self.runs[handle] = run.info.run_id
        backend.set_tags(c, run.info.run_id, tags)
        log.info("MLflow parent run %s (%s) in %s", name, run.info.run_id, backend.redact_text(self.uri))
        self.idle_work.append(_warm_plots)  # the sweep's comparison ends with plots: import matplotlib meanwhile
        return run.info.run_id

    def start_job(self, handle: str, uri: str, experiment_name: str, run_name: str, params: dict, tags: dict,
                  output_dir: str, start_time: int, parent: dict | None = None, parent_env: str | None = None,
                  env_run: str | None = None) -> str:
        """Create the job's run (or take over the one ``mlflow run`` made) with its params and tags."""
        from app.store.files import update_json
        from app.tracking import backend

        self.dirs[handle] = output_dir
        try:
            if self.uri is None:  # a worker of a sweep, in its own process: the parent opened the store
                backend.configure(uri)
                backend.ride_out_restarts()
                self.uri = uri
            c = self._client()
            parent_id, experiment_id = self.run_id(parent), self.experiment_id
            if parent and parent.get("experiment_id"):
                experiment_id = parent["experiment_id"]
            elif parent_id is None and parent_env:  # a step of the Yadage workflow (app.workflow)
                parent_id = parent_env
                experiment_id = c.get_run(parent_env).info.experiment_id
            if experiment_id is None:
                experiment_id = self.experiment_id = backend.ensure_experiment(uri, experiment_name)
            if env_run:  # launched by `mlflow run`: log into its run, never a duplicate
                run_id = env_run
            else:
                first = {"mlflow.runName": run_name, **({"mlflow.parentRunId": parent_id} if parent_id else {})}
                run_id = c.create_run(experiment_id, start_time=start_time, run_name=run_name,
                                      tags=first).info.run_id
        except Exception:
            self.failed.add(handle)
            raise
        self.runs[handle] = run_id
        # The pipeline records it as the producer of the stage outputs it caches (app.store.provenance).
        update_json(Path(output_dir) / "run.json", {"mlflow_run_id": run_id})
        backend.log_params(c, run_id, params)
        backend.set_tags(c, run_id, tags)
        return run_id

    def finish_job(self, handle: str, status: str, error: str | None, register_model: bool,
                   objective: float | None = None, parent: dict | None = None, job_num: int = 0,
                   end_time: int | None = None) -> None:
        """Everything the job produced (read from its output dir), then its end: FINISHED or FAILED. If the store
        fails on the way, the run stays RUNNING (closed as FAILED later: ``close-orphans``, or the next run)."""
        run_id = self._run(handle)
        _log_job_results(self, run_id, Path(self.dirs[handle]), register_model, objective, parent, job_num)
        self.end_run(handle, status, error, end_time)

    def end_run(self, handle: str, status: str, error: str | None = None, end_time: int | None = None) -> None:
        """End a job's run at ``end_time`` (ms; when the job ended, not when this call is made); also for Ctrl-C and
        bad input, which skip the job's end."""
        from app.tracking import backend

        run_id = self._run(handle)
        c = self._client()
        if error is not None:
            backend.set_tags(c, run_id, {"error": error})
        c.set_terminated(run_id, status, end_time=end_time)
        self.failed.add(handle)  # ended: nothing more is recorded for it

    def end_parent(self, parent: dict, metric: str | None, direction: str | None, register_model: bool,
                   failed_jobs: str | None = None, stopped: str | None = None, killed: bool | None = None) -> None:
        """The sweep's comparison on the parent run, then its end. ``killed`` set: the sweep ended early (at exit:
        an uncaught error, True for Ctrl-C)."""
        from app.tracking import backend, comparison

        c = self._client()
        ref = {"run_id": self.run_id(parent), "experiment_id": self.experiment_id, "uri": self.uri}
        status = "FINISHED"
        try:
            best = comparison.summarise_sweep(c, ref, metric, direction)
            if best and register_model and killed is None:
                from app.tracking import registry

                name = registry.alias_best(c, best)
                if name:
                    backend.set_tags(c, ref["run_id"], {"best_model": f"models:/{name}@{registry.BEST_ALIAS}"})
        except Exception as err:  # noqa: BLE001 - the sweep's summary must not leave the parent RUNNING
            log.warning("sweep comparison failed: %s", err)
            if killed is None:
                backend.set_tags(c, ref["run_id"], {"error": str(err).splitlines()[0] if str(err) else "?"})
                status = "FAILED"
        if failed_jobs:
            backend.set_tags(c, ref["run_id"], {"failed_jobs": failed_jobs, "stopped": stopped})
        if killed is not None:
            reason = "interrupted" if killed else "the sweep ended early: a job failed (see the FAILED child runs)"
            backend.set_tags(c, ref["run_id"], {"error": reason})
            status = "KILLED" if killed else "FAILED"
        c.set_terminated(ref["run_id"], status)

    def flush(self) -> dict:
        """Called after everything handed over before it: the errors since the last flush, and the run ids."""
        errors, self.errors = self.errors, []
        return {"errors": errors, "runs": dict(self.runs)}

    # ---------------------------------------------------------------- errors
    def describe(self, op: str, kwargs: dict, err: BaseException) -> str | None:
        """The one line a failed call is reported with (None: nothing new to report)."""
        from app.tracking import backend

        if isinstance(err, Skipped):
            return None
        if isinstance(err, backend.TrackingUnavailable):
            return str(err)
        text = str(err).strip()
        first = backend.redact_text(text.splitlines()[0] if text else repr(err))[:200]
        if GONE in text and not self.failure:
            # the requests rode out the retry window (backend.HTTP_RIDE_OUT, ~2 min) and the store is still gone:
            # the command's later calls are skipped, rather than each waiting that long again
            self.failure = f"the store stayed unreachable: {first}"
        handle = kwargs.get("handle") or (kwargs.get("parent") or {}).get("handle")
        if op in ("start_parent", "end_parent"):
            return (f"MLflow tracking store unreachable while recording the sweep's parent run ({first}); the jobs' "
                    f"outputs are in {self.dirs.get(handle, '?')}")
        run = self.runs.get(handle)
        where = f"run {run}" if run else "a job's run"
        return (f"MLflow tracking store unreachable while recording {where} ({first}); the job's outputs are in "
                f"{self.dirs.get(handle, '?')}; once the store is back, `python -m app.tracking close-orphans` "
                "(or the next run) closes the run as FAILED")


def _log_job_results(ops: Ops, run_id: str, out: Path, register_model: bool, objective: float | None,
                     parent: dict | None, job_num: int) -> None:
    import mlflow

    from app.store import provenance
    from app.store.files import read_json
    from app.tracking import backend

    c = ops._client()
    try:
        run_info = read_json(out / "run.json")
    except (OSError, ValueError):
        run_info = {}
    tags = {f"reused.{k}": str(v).lower() for k, v in run_info.get("reused", {}).items()}
    for stage, record in (run_info.get("cache") or {}).items():  # cache.sample.key, .status, .source, ...
        if record.get("source") and not record.get("source_run"):  # made by a job that had no run id yet
            record["source_run"] = provenance.source_run({"output_dir": record["source"]})
        tags.update({f"cache.{stage}.{k}": v for k, v in record.items()})
    if run_info.get("data_path"):
        tags.update({"data.path": run_info["data_path"], "data.sha256": run_info.get("data_sha256")})
        _log_dataset(c, run_id, run_info)
    backend.set_tags(c, run_id, tags)

    objective_of = run_info.get("objective") or {}
    backend.set_tags(c, run_id, {f"objective.{k}": v for k, v in objective_of.items()})
    try:
        metrics = read_json(out / "results" / "metrics.json")
    except (OSError, ValueError):
        metrics = {}
    triples = []
    for entry in metrics.get("loss_history", []):  # the totals and every loss term, per epoch
        for key, value in entry.items():
            if key.startswith(("train_", "val_")) and isinstance(value, (int, float)):
                triples.append((f"epoch_{key}", value, entry["epoch"]))
    triples += [(k, v, 0) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if objective is not None:
        triples.append(("objective", objective, 0))
        parent_id = ops.run_id(parent) if parent else None
        if parent_id:  # the parent's chart of the objective per trial (step = job number)
            backend.log_metrics(c, parent_id, [("objective", objective, int(job_num or 0))])
    backend.log_metrics(c, run_id, triples)

    with tempfile.TemporaryDirectory() as tmp:
        import yaml  # plain YAML in and out (the files as Hydra saved them, interpolations as text): cheaper

        hydra_dir = out / ".hydra"
        loader, dumper = getattr(yaml, "CSafeLoader", yaml.SafeLoader), getattr(yaml, "CSafeDumper", yaml.SafeDumper)
        for name in ("config.yaml", "overrides.yaml", "hydra.yaml"):
            if (hydra_dir / name).exists():
                content = yaml.load((hydra_dir / name).read_text(), Loader=loader)
                (Path(tmp) / name).write_text(yaml.dump(backend.redact(content), Dumper=dumper, sort_keys=False))
        if any(Path(tmp).iterdir()):
            c.log_artifacts(run_id, tmp, "hydra")
    for folder in ("results", "plots", "model"):
        if (out / folder).is_dir():
            c.log_artifacts(run_id, str(out / folder), folder)
    trained_here = not run_info.get("reused", {}).get("model", True)
    if register_model and trained_here and (out / "model" / "model.json").exists():
        from app.tracking import registry

        mlflow.start_run(run_id=run_id)  # the model is logged into the active run
        try:
            name, model_version = registry.log_and_register(out / "model")
        finally:
            mlflow.end_run()
        backend.set_tags(c, run_id, {"registered_model": f"{name}/{model_version}"})


def _log_dataset(c, run_id: str, run_info: dict) -> None:
    """The event file as the run's input dataset."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    path = run_info["data_path"]
    with warnings.catch_warnings():  # MLflow warns that a local path matches two equivalent source types
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(str(Path(path).resolve()))
    dataset = MetaDataset(
        source=source,
        name=Path(path).name,
        digest=(run_info.get("data_sha256") or "")[:16] or None,
    )
    events = DatasetInput(dataset=dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, "events")])
    for attempt in range(DATASET_ATTEMPTS):
        try:
            c.log_inputs(run_id, datasets=[events])
            return
        except Exception as err:  # noqa: BLE001 - only the insert race is retried
            # The store looks the dataset up, then inserts it: jobs logging the same event file at the same
            # moment race, and all but one get a unique-key violation (PostgreSQL: "duplicate key value violates
            # unique constraint dataset_pk"; sqlite: "UNIQUE constraint failed"). The row exists now: link again.
            text = str(err).lower()
            if attempt == DATASET_ATTEMPTS - 1 or not ("duplicate key" in text or "unique constraint" in text):
                raise
            time.sleep(0.2 * (attempt + 1))


# --------------------------------------------------------------------------------------------------- transports
class Local:
    """The calls in this process, at once."""

    remote = False

    def __init__(self) -> None:
        self.ops = Ops()

    def post(self, op: str, **kwargs: Any) -> Any:
        """Make the call; a failure is kept for :meth:`flush` (as the helper does)."""
        try:
            return getattr(self.ops, op)(**kwargs)
        except Exception as err:  # noqa: BLE001 - reported by flush, in one line
            line = self.ops.describe(op, kwargs, err)
            if line:
                self.ops.errors.append(line)
            return None

    def call(self, op: str, **kwargs: Any) -> Any:
        return getattr(self.ops, op)(**kwargs)

    def close(self) -> None:
        return None


class Remote:
    """The calls handed to the helper process: ``post`` returns once the helper has queued it, ``call`` once it is
    made (with its result)."""

    remote = True

    def __init__(self, address: str, key: bytes, proc: subprocess.Popen | None = None) -> None:
        from multiprocessing.connection import Client

        self.address, self.key, self.proc = address, key, proc
        self.conn = Client(address, family="AF_UNIX", authkey=key)
        self.lock = threading.Lock()

    def _send(self, kind: str, op: str, kwargs: dict) -> Any:
        with self.lock:
            try:
                self.conn.send((kind, op, kwargs))
                status, value = self.conn.recv()
            except (OSError, EOFError) as err:
                code = self.proc.poll() if self.proc is not None else None
                raise RecorderError(
                    f"the MLflow helper process ended unexpectedly ({type(err).__name__}"
                    f"{f', exit code {code}' if code is not None else ''}); rerun with tracking.background=false "
                    "to make the calls in the job's process") from None
        if status == "err":
            raise RecorderError(value)
        return value

    def post(self, op: str, **kwargs: Any) -> None:
        self._send("post", op, kwargs)

    def call(self, op: str, **kwargs: Any) -> Any:
        return self._send("call", op, kwargs)

    def share(self) -> dict:
        """What a joblib worker needs to hand its calls to the same helper (written into the sweep dir)."""
        return {"address": self.address, "key": self.key.hex()}

    def close(self, timeout: float = 120.0) -> None:
        """Disconnect; the command's own connection also waits for the helper to finish and end."""
        try:
            self.conn.close()
        except OSError:
            pass
        if self.proc is not None:
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()


_current: Local | Remote | None = None


def current() -> Local | Remote | None:
    return _current


def set_current(tracker: Local | Remote | None) -> None:
    global _current
    _current = tracker


def start(uri: str) -> Remote:
    """Start the helper process for ``uri`` and connect to it (it ends when this connection closes)."""
    folder = tempfile.mkdtemp(prefix="madminer-sweeper-mlflow-")
    address = os.path.join(folder, "socket")
    key = os.urandom(16)
    env = dict(os.environ, **{KEY_ENV: key.hex()})
    proc = subprocess.Popen([sys.executable, "-m", "app.tracking.recorder", address, uri], env=env,
                            stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + START_TIMEOUT
    while True:  # the socket file exists a moment before the helper listens on it: retry until it accepts
        try:
            return Remote(address, key, proc)
        except (FileNotFoundError, ConnectionRefusedError) as err:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                shutil.rmtree(folder, ignore_errors=True)
                raise RecorderError(f"the MLflow helper process did not start (exit code {proc.poll()}; "
                                    f"{type(err).__name__})") from None
            time.sleep(0.005)
        except BaseException:
            proc.kill()
            proc.wait()
            shutil.rmtree(folder, ignore_errors=True)
            raise


def connect(shared: dict) -> Remote:
    """A joblib worker's connection to the command's helper."""
    return Remote(shared["address"], bytes.fromhex(shared["key"]))


# --------------------------------------------------------------------------------------------------- the helper
def serve(address: str, uri: str) -> None:
    """The helper's main loop: accept connections, queue their calls, make them in order. Ends when the connection
    of the command that started it closes (after the calls queued before)."""
    from multiprocessing.connection import Listener

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the command's to handle: it ends its runs through here
    logging.basicConfig(level=logging.WARNING, stream=sys.stdout,
                        format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    logging.getLogger("app").setLevel(logging.INFO)
    from app.tracking.backend import redact_log_records

    redact_log_records()
    key = bytes.fromhex(os.environ.pop(KEY_ENV))
    listener = Listener(address, family="AF_UNIX", authkey=key)
    work: queue.Queue = queue.Queue()
    owner = threading.Event()
    threading.Thread(target=_accept, args=(listener, work, owner), daemon=True).start()
    threading.Thread(target=_orphaned, args=(work, owner), daemon=True).start()
    ops = Ops()
    try:
        ops.warm(uri)
    except Exception as err:  # noqa: BLE001 - the first call reports it
        log.debug("warm-up failed: %s", err)
    _execute(ops, work)
    try:
        listener.close()
        shutil.rmtree(os.path.dirname(address), ignore_errors=True)
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(0)  # nothing left to do: skip the teardown of MLflow's modules


def _warm_plots() -> None:
    """matplotlib's import and first figure (its font cache): ~0.45 s that the sweep's comparison, at the very end of
    the command, would otherwise wait for."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1, 1))
    ax.set_title("warm-up")
    fig.savefig(io.BytesIO(), format="png")
    plt.close(fig)


IDLE_AFTER = 0.2  # seconds without a record before the helper does its idle work (Ops.idle_work)


def _execute(ops: Ops, work: queue.Queue) -> None:
    while True:
        try:
            item = work.get(timeout=IDLE_AFTER) if ops.idle_work else work.get()
        except queue.Empty:
            task = ops.idle_work.pop(0)
            try:
                task()
            except Exception as err:  # noqa: BLE001 - a warm-up only: the call that needs it reports any error
                log.debug("idle work %s failed: %s", getattr(task, "__name__", task), err)
            continue
        if item is None:
            return
        op, kwargs, box = item
        try:
            value, error = getattr(ops, op)(**kwargs), None
        except Exception as err:  # noqa: BLE001 - reported by flush (posted) or to the caller (called)
            value, error = None, ops.describe(op, kwargs, err)
            if box is None and error:
                ops.errors.append(error)
            elif box is not None and error is None:
                error = str(err)
        if box is not None:
            box.put((error, value))


def _orphaned(work: queue.Queue, owner: threading.Event) -> None:
    """The command that started the helper never connected (it died, or gave up on it): end."""
    if not owner.wait(START_TIMEOUT):
        work.put(None)


def _accept(listener, work: queue.Queue, owner: threading.Event) -> None:
    while True:
        try:
            conn = listener.accept()
        except OSError:
            return
        except Exception:  # noqa: BLE001 - a wrong key: refuse that one, keep serving
            continue
        threading.Thread(target=_read, args=(conn, work, not owner.is_set()), daemon=True).start()
        owner.set()


def _read(conn, work: queue.Queue, owner: bool) -> None:
    try:
        while True:
            kind, op, kwargs = conn.recv()
            if op not in ("connect", "start_parent", "start_job", "finish_job", "end_run", "end_parent", "flush"):
                conn.send(("err", f"unknown call {op!r}"))
            elif kind == "post":
                work.put((op, kwargs, None))
                conn.send(("ok", None))
            else:
                box: queue.Queue = queue.Queue(1)
                work.put((op, kwargs, box))
                error, value = box.get()
                conn.send(("err", error) if error else ("ok", value))
    except (EOFError, OSError):
        pass
    finally:
        conn.close()
        if owner:
            work.put(None)


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2])
