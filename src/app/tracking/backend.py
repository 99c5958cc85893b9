"""The store: its URI, the checks that fail fast with one line, the experiment, params/tags/metrics in batches, and
orphaned runs (``python -m app.tracking close-orphans``).

Used by :mod:`app.tracking.calls` and the callback; stages never import MLflow. MLflow itself is imported lazily.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from app.errors import UserError, first_line
from app.store.files import locked, sqlite_path
from app.tracking.redaction import redact_text

TRUNCATED = "...[truncated; full value in the config artifact]"
BATCH = 100  # MLflow's per-request limit for params and tags

# An unreachable server takes minutes with MLflow's default retries: the first contact fails within seconds ...
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
CONNECT_TIMEOUT = 5.0  # seconds for the TCP probe that decides "unreachable"
# ... and once the server's port accepts a connection, requests ride out a busy or restarting server: 7 retries
# after 0, 2, 4, ... 64 s (urllib3's backoff), each request at most 10 s: a server that refuses connections for up to
# ~2 min (a restart on a loaded machine) loses nothing; one that never answers fails the call after ~3.5 min.
# A server that is up but slow (a sweep's workers importing torch on the same 2 cores) is not "unreachable".
HTTP_RIDE_OUT = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "7", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
_SET_HERE: set[str] = set()  # the variables this module set (a user's own values are never changed)
# A database store (PostgreSQL, MySQL, ...) that accepts connections but cannot be opened (a wrong database name or
# password): MLflow retries creating its engine 10 times, 0.1 * (2**k - 1) s apart, ~101 s in all, before the error.
# check_database connects first, with SQLAlchemy, DB_CONNECT_ATTEMPTS times DB_RETRY_WAIT * 2**k s apart (~12.6 s of
# waiting): enough for a database that is finishing its start (a cluster job that starts PostgreSQL beside the
# sweep), while a misconfigured one fails in seconds. A sqlite file is there or not: one attempt.
DB_CONNECT_ATTEMPTS = 7
DB_RETRY_WAIT = 0.2
_CHECKED: set[str] = set()  # database URIs that this process has opened once


def effective_uri(tracking_cfg) -> str | None:
    """The store the runs go to: inside ``mlflow run`` (``MLFLOW_RUN_ID`` set) the run's own store,
    ``MLFLOW_TRACKING_URI``; otherwise ``tracking.uri``."""
    if os.environ.get("MLFLOW_RUN_ID") and os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return tracking_cfg.uri


def ui_line(uri: str) -> str:
    """How to look at the runs of ``uri``: the server's page, or the ``mlflow ui`` command for a local store."""
    view = "#/experiments?workflowType=machine_learning"  # MLflow 3's 'Model training' view
    if uri.startswith(("http://", "https://")):
        return f"compare runs: open {redact_text(uri).rstrip('/')}/{view}"
    return (f"compare runs: mlflow ui --backend-store-uri {redact_text(uri)} --host 127.0.0.1, then open "
            f"http://127.0.0.1:5000/{view}")


class TrackingUnavailable(UserError):
    """The tracking store cannot be reached."""


def flatten(tree: Mapping, prefix: str = "") -> dict[str, str]:
    """Dotted keys for nested dicts; lists (and empty dicts) as compact JSON; values as strings."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return flat


def truncate(value: str, limit: int) -> str:
    return value if len(value) <= limit else value[: limit - len(TRUNCATED)] + TRUNCATED


def set_http_defaults() -> None:
    """Fail fast until the store answered (HTTP_DEFAULTS), unless the user chose; the MLflow helper inherits them."""
    for name, default in HTTP_DEFAULTS.items():
        if name not in os.environ:
            os.environ[name] = default
            _SET_HERE.add(name)


def configure(uri: str) -> None:
    """Point MLflow at ``uri``; a database store is opened once first (:func:`check_database`)."""
    set_http_defaults()
    check_database(uri)
    import mlflow

    mlflow.set_tracking_uri(uri)


def check_database(uri: str) -> None:
    """Open a database store once with SQLAlchemy (bounded retries) before MLflow does; raises TrackingUnavailable
    with the driver's first line (``database "x" does not exist``) when it cannot be opened."""
    if not db_scheme(uri) or uri in _CHECKED:
        return
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    attempts = 1 if db_scheme(uri) == "sqlite" else DB_CONNECT_ATTEMPTS
    for attempt in range(attempts):
        try:
            engine = sqlalchemy.create_engine(uri, poolclass=NullPool)
            try:
                engine.connect().close()
            finally:
                engine.dispose()
            _CHECKED.add(uri)
            return
        except Exception as err:  # noqa: BLE001 - whatever the driver raises, the fix is the user's
            if attempt == attempts - 1:
                raise unreachable(uri, first_line(err)) from None
            time.sleep(DB_RETRY_WAIT * 2**attempt)


def client(uri: str):
    """An MlflowClient; a database store opens here (and creates MLflow's tables when it is new). Two processes that
    create a fresh sqlite store at once corrupt it (each runs MLflow's migrations: "table _alembic_tmp_experiments
    already exists" for ever after), so the app's processes open a sqlite store one at a time (a lock on its
    folder)."""
    from mlflow.tracking import MlflowClient

    path = sqlite_path(uri)
    if path is None or not path.parent.is_dir():  # no folder: MLflow says so
        return MlflowClient(tracking_uri=uri)
    with locked(path.parent):
        return MlflowClient(tracking_uri=uri)


def ride_out_restarts() -> None:
    """After the first contact: retry requests for a bounded time (HTTP_RIDE_OUT), unless the user chose."""
    for name, value in HTTP_RIDE_OUT.items():
        if name not in os.environ or name in _SET_HERE:
            os.environ[name] = value
            _SET_HERE.add(name)


def ensure_experiment(uri: str, name: str) -> str:
    """The experiment id, created if needed; fails fast with one line if the store is unreachable or a database
    cannot be opened.

    For an HTTP server, "unreachable" means its port refuses or does not accept a TCP connection within
    CONNECT_TIMEOUT: then the command fails within seconds. A port that accepts is a server that is there, maybe
    busy, so the requests themselves already ride out slow answers (HTTP_RIDE_OUT)."""
    try:
        configure(uri)
    except TrackingUnavailable:
        raise
    except Exception as err:  # noqa: BLE001 - MLflow's own checks of the URI
        raise unreachable(uri, first_line(err)) from None
    if probe_server(uri):
        ride_out_restarts()
    try:
        c = client(uri)  # a database store connects here (a wrong database name, password, ...)
    except Exception as err:  # noqa: BLE001 - reported like any other failure to reach the store
        raise unreachable(uri, first_line(err)) from None
    experiment_id = _ensure_experiment(c, uri, name)
    ride_out_restarts()
    return experiment_id


DB_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}


def db_scheme(uri: str) -> str | None:
    """``sqlite``, ``postgresql``, ``mysql`` or ``mssql`` for a database store (``postgresql+psycopg2://`` too);
    None for a server or a folder."""
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower()
    return scheme if scheme == "sqlite" or scheme in DB_PORTS else None


def precheck(uri: str) -> None:
    """What can be checked before the jobs start without importing MLflow (which the helper process of
    :mod:`app.tracking.helper` imports meanwhile): a server's or database's port accepts a TCP connection, a sqlite
    database's folder exists and is writable. Raises TrackingUnavailable with the one line to report."""
    from urllib.parse import urlsplit

    scheme = db_scheme(uri)
    if scheme == "sqlite":
        path = sqlite_path(uri)
        if path is not None and not (path.parent.is_dir() and os.access(path.parent, os.W_OK | os.X_OK)):
            raise unreachable(uri, f"no writable folder {path.parent} for the database file")
    elif scheme in DB_PORTS:
        parts = urlsplit(uri)
        try:
            port = parts.port or DB_PORTS[scheme]
        except ValueError:
            raise unreachable(uri, f"no valid port in {parts.netloc.rsplit('@', 1)[-1]}") from None
        if parts.hostname:
            try:
                socket.create_connection((parts.hostname, port), timeout=CONNECT_TIMEOUT).close()
            except OSError as err:
                raise unreachable(uri, f"cannot connect to {parts.hostname}:{port}: "
                                       f"{err.strerror or type(err).__name__}") from None
    else:
        probe_server(uri)


def probe_server(uri: str) -> bool:
    """True when ``uri`` is an HTTP(S) server whose port accepts a TCP connection; raises TrackingUnavailable when
    it refuses or times out. False (nothing probed) for other stores and where a proxy carries the requests."""
    from urllib.parse import urlsplit
    from urllib.request import getproxies, proxy_bypass

    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False
    proxies = getproxies()
    if proxies.get(parts.scheme) and not proxy_bypass(parts.hostname):
        return False  # requests goes through the proxy: the first request decides, with HTTP_DEFAULTS
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:  # http://host:abc
        raise unreachable(uri, f"no valid port in {parts.netloc.rsplit('@', 1)[-1]}") from None
    try:
        socket.create_connection((parts.hostname, port), timeout=CONNECT_TIMEOUT).close()
    except OSError as err:
        raise unreachable(uri, f"cannot connect to {parts.hostname}:{port}: {err.strerror or type(err).__name__}") \
            from None
    return True


def unreachable(uri: str, why: str) -> TrackingUnavailable:
    return TrackingUnavailable(
        f"MLflow tracking store {redact_text(uri)} is unreachable ({redact_text(why)[:200]}); start the server, "
        "fix tracking.uri / MLFLOW_TRACKING_URI, or run with tracking=local or tracking=disabled"
    )


def _ensure_experiment(c, uri: str, name: str) -> str:
    try:
        experiment = c.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        try:
            # Without this tag MLflow 3's UI opens the experiment in its GenAI view.
            return c.create_experiment(name, tags={"mlflow.experimentKind": "custom_model_development"})
        except Exception:  # created concurrently by another process
            experiment = c.get_experiment_by_name(name)
            if experiment is None:
                raise
            return experiment.experiment_id
    except Exception as err:  # noqa: BLE001 - any failure to reach the store is reported the same way
        raise unreachable(uri, first_line(err)) from None


def log_params(c, run_id: str, params: Mapping[str, str]) -> None:
    from mlflow.entities import Param
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    items = [Param(k, truncate(str(v), MAX_PARAM_VAL_LENGTH)) for k, v in params.items()]
    for batch in _chunks(items, BATCH):
        c.log_batch(run_id, params=batch)


def set_tags(c, run_id: str, tags: Mapping[str, Any]) -> None:
    from mlflow.entities import RunTag
    from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

    items = [RunTag(k, truncate(redact_text(str(v)), MAX_TAG_VAL_LENGTH)) for k, v in tags.items() if v is not None]
    for batch in _chunks(items, BATCH):
        c.log_batch(run_id, tags=batch)


def log_metrics(c, run_id: str, metrics: Iterable[tuple[str, float, int]]) -> None:
    """(key, value, step) triples in batches."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, int(step)) for k, v, step in metrics]
    for batch in _chunks(items, 1000):
        c.log_batch(run_id, metrics=batch)


def _chunks(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


# --------------------------------------------------------------------------- orphaned runs
def process_tags() -> dict[str, str]:
    """Where this run's process lives: a later run closes the run as FAILED if this process has died."""
    pid = os.getpid()
    return {"process.host": socket.gethostname(), "process.pid": str(pid), "process.start": _start_time(pid) or ""}


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc), which tells a reused pid from the original."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: str, start: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return not start or _start_time(int(pid)) == start


def close_orphans(c, experiment_id: str, stale_hours: float | None = None) -> list[str]:
    """End RUNNING runs whose process has died (this host) as FAILED; with ``stale_hours`` also RUNNING runs of any
    host started more than that long ago. Returns their ids. Called when a run or sweep starts, and by
    ``python -m app.tracking close-orphans``."""
    host = socket.gethostname()
    closed = []
    for run in c.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000):
        tags = run.data.tags
        mine = tags.get("process.host") == host and tags.get("process.pid")
        if mine and not _alive(tags["process.pid"], tags.get("process.start", "")):
            why = f"orphaned: its process {tags['process.pid']} on {host} ended without closing the run"
        elif stale_hours is not None and run.info.start_time < (time.time() - 3600 * stale_hours) * 1000:
            why = f"orphaned: still RUNNING {stale_hours:g} h after its start (python -m app.tracking close-orphans)"
        else:
            continue
        set_tags(c, run.info.run_id, {"error": why})
        c.set_terminated(run.info.run_id, "FAILED")
        closed.append(run.info.run_id)
    return closed


def main(argv: list[str] | None = None) -> int:
    """python -m app.tracking close-orphans --uri URI [--experiment NAME] [--stale-hours H]"""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m app.tracking", description=main.__doc__)
    parser.add_argument("command", choices=["close-orphans"])
    parser.add_argument("--uri", default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"))
    parser.add_argument("--experiment", default="madminer-sweeper")
    parser.add_argument("--stale-hours", type=float, default=None,
                        help="also close RUNNING runs of any host started more than this many hours ago")
    args = parser.parse_args(argv)
    try:
        experiment_id = ensure_experiment(args.uri, args.experiment)
    except TrackingUnavailable as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    closed = close_orphans(client(args.uri), experiment_id, args.stale_hours)
    print(f"closed {len(closed)} orphaned run(s) as FAILED in {redact_text(args.uri)}: {' '.join(closed) or '-'}")
    return 0

