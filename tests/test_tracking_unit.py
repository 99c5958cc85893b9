"""The pieces of the MLflow layer that need no job: redaction, flattening, truncation, the store checks, the dataset
entity and the `mlflow ui` line."""

from __future__ import annotations

import time

import pytest

from app.tracking import backend, redaction, results


def test_redact_keys_and_uri_credentials():
    tree = {
        "db_password": "hunter2",
        "nested": {"API_KEY": "abc", "apikey": "def", "credentials": {"user": "x"}, "ok": 1},
        "uri": "postgresql://alice:hunter2@db:5432/mlflow",
        "plain": "http://db:5000",
        "list": ["https://bob:pw@host/x", "fine"],
        "session_token": None,
    }
    out = redaction.redact(tree)
    assert out["db_password"] == "***" and out["session_token"] == "***"
    assert out["nested"] == {"API_KEY": "***", "apikey": "***", "credentials": "***", "ok": 1}
    assert out["uri"] == "postgresql://***@db:5432/mlflow"
    assert out["plain"] == "http://db:5000"
    assert out["list"] == ["https://***@host/x", "fine"]


def test_redact_text_key_value_pairs():
    text = "+vars.db_password=hunter2 training=alices secret: s3cr3t api_key=abc,token=t0k"
    out = redaction.redact_text(text)
    assert "hunter2" not in out and "s3cr3t" not in out and "abc" not in out and "t0k" not in out
    assert "training=alices" in out and "+vars.db_password=***" in out


def test_flatten_dotted_keys_and_compact_json():
    flat = backend.flatten(
        {"training": {"alpha": 1.0, "n_hidden": [100, 100], "clip": None, "early": True},
         "sampling": {"theta0": {"priors": [["gaussian", 0.0, 1.0]]}}, "vars": {}, "stage": "all"}
    )
    assert flat == {
        "training.alpha": "1.0",
        "training.n_hidden": "[100,100]",
        "training.clip": "null",
        "training.early": "true",
        "sampling.theta0.priors": '[["gaussian",0.0,1.0]]',
        "vars": "{}",
        "stage": "all",
    }


def test_truncate_marks_long_values():
    value = "x" * 7000
    out = backend.truncate(value, 6000)
    assert len(out) == 6000 and out.endswith(backend.TRUNCATED)
    assert backend.truncate("short", 6000) == "short"


def _serve(handler_delay: float):
    """An HTTP server on a free port that answers MLflow's get-experiment-by-name after ``handler_delay`` s."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Slow(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            time.sleep(handler_delay)
            body = json.dumps({"experiment": {"experiment_id": "7", "name": "toy", "artifact_location": "/tmp/a",
                                              "lifecycle_stage": "active"}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _fresh_http_env(monkeypatch):
    for name in {*backend.HTTP_DEFAULTS, *backend.HTTP_RIDE_OUT}:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(backend, "_SET_HERE", set())


@pytest.mark.slow
def test_a_busy_server_is_not_unreachable(monkeypatch):
    """The CI failure of stop 14: eight joblib workers importing torch on 2 cores kept the MLflow server from
    answering the parent's first request within the fast-fail timeout (5 s), and the sweep ended as
    "unreachable". A server whose port accepts is there: its slow first answer (7 s here) is waited for."""
    _fresh_http_env(monkeypatch)
    server = _serve(7.0)
    try:
        uri = f"http://127.0.0.1:{server.server_address[1]}"
        assert backend.ensure_experiment(uri, "toy") == "7"
    finally:
        server.shutdown()


def test_a_refused_port_fails_within_seconds(monkeypatch):
    import socket

    _fresh_http_env(monkeypatch)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        start = time.time()
        with pytest.raises(backend.TrackingUnavailable, match=rf"unreachable \(cannot connect to 127.0.0.1:{port}"):
            backend.ensure_experiment(f"http://127.0.0.1:{port}", "toy")
    assert time.time() - start < 3


class _FakeClient:
    """An MlflowClient whose ``log_inputs`` records the calls and raises the given errors first."""

    def __init__(self, errors):
        self.errors, self.calls = errors, []

    def log_inputs(self, run_id, datasets=None, models=None):
        (item,) = datasets
        context = {t.key: t.value for t in item.tags}["mlflow.data.context"]
        self.calls.append((run_id, item.dataset.name, item.dataset.digest, context))
        if self.errors:
            raise self.errors.pop(0)


def test_the_dataset_insert_race_is_retried(tmp_path):
    """Eight jobs of a sweep logging the same event file at once: the store's look-up-then-insert races and all
    but one job got `duplicate key value violates unique constraint "dataset_pk"` (CI, PostgreSQL-backed server),
    which left that job's run RUNNING. The dataset exists by then: linking it again succeeds."""
    from mlflow.exceptions import MlflowException

    events = tmp_path / "events.h5"
    events.write_bytes(b"x")
    race = MlflowException('BAD_REQUEST: (psycopg2.errors.UniqueViolation) duplicate key value violates unique '
                           'constraint "dataset_pk"')
    client = _FakeClient([race])
    results.log_dataset(client, "r1", {"data_path": str(events), "data_sha256": "ab" * 32})
    assert client.calls == [("r1", "events.h5", "ab" * 8, "events")] * 2

    client = _FakeClient([MlflowException("RESOURCE_DOES_NOT_EXIST: run gone")])
    with pytest.raises(MlflowException, match="run gone"):  # anything else is not retried
        results.log_dataset(client, "r1", {"data_path": str(events), "data_sha256": "ab" * 32})
    assert len(client.calls) == 1


@pytest.mark.slow
def test_processes_opening_a_fresh_sqlite_store_at_once_all_get_it(tmp_path):
    """A run starting while another process opens the same new mlflow.db (CI: a test reading the store as the
    command's tracking helper created it): MLflow's table creation raced and left the database half-migrated for
    ever ("table _alembic_tmp_experiments already exists"). Four processes at once all open it now."""
    import subprocess
    import sys

    code = (f"from app.tracking import backend\n"
            f"backend.client('sqlite:///{tmp_path}/mlflow.db').search_experiments()\nprint('ok')")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [o.strip() for o, _ in outs] == ["ok"] * 4, [e.strip().splitlines()[-1:] for _, e in outs]
    assert not (tmp_path / "mlflow.db.lock").exists()  # the folder is the lock: nothing beside the store


def test_a_uri_without_a_valid_port_is_one_line():
    with pytest.raises(backend.TrackingUnavailable, match=r"unreachable \(no valid port in db:abc\)"):
        backend.probe_server("http://user:pw@db:abc")


def test_the_dataset_entity_is_the_event_file(tmp_path):
    """The input dataset as MLflow's UI and search show it: a local source naming the resolved file, the file's name,
    the first 16 hex of its sha256 (the public Dataset entity that MetaDataset over a local source produced)."""
    import json

    events = tmp_path / "sub" / ".." / "events.h5"
    (tmp_path / "events.h5").write_bytes(b"x")
    entity = results.dataset(str(events), "ab" * 32)
    assert (entity.name, entity.digest, entity.source_type) == ("events.h5", "ab" * 8, "local")
    assert json.loads(entity.source) == {"uri": str(tmp_path / "events.h5")}
    assert entity.schema is None and len(results.dataset(str(events), None).digest) == 16


def test_a_database_that_cannot_be_opened_is_one_line_without_retries_for_sqlite(tmp_path):
    """SQLAlchemy opens a database store before MLflow does (MLflow alone retries for ~101 s): a sqlite path that is a
    folder fails at once, with the driver's first line."""
    uri = f"sqlite:///{tmp_path}"
    start = time.monotonic()
    with pytest.raises(backend.TrackingUnavailable, match=r"unreachable \(.*unable to open database file"):
        backend.check_database(uri)
    assert time.monotonic() - start < 2
    good = f"sqlite:///{tmp_path}/ok.db"
    backend.check_database(good)
    assert good in backend._CHECKED  # opened once per process


def test_the_waits_between_database_attempts_are_bounded():
    waits = [backend.DB_RETRY_WAIT * 2**k for k in range(backend.DB_CONNECT_ATTEMPTS - 1)]
    assert 10 <= sum(waits) <= 15  # a database finishing its start is ridden out; a wrong name fails in seconds


def test_the_ui_line_names_the_store_the_runs_went_to(monkeypatch, caplog):
    """Under `mlflow run` (MLFLOW_RUN_ID set) the runs go to MLFLOW_TRACKING_URI, not tracking.uri: the line at the end
    of a run names that store (issue 18: the runs landed in m.db but the line said sqlite:///mlflow.db)."""
    import logging

    from omegaconf import OmegaConf

    from app.tracking.callback import MLflowCallback

    cfg = OmegaConf.create({"tracking": {"mode": "local", "uri": "sqlite:///mlflow.db"}})
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    assert "--backend-store-uri sqlite:///mlflow.db " in backend.ui_line(backend.effective_uri(cfg.tracking))
    monkeypatch.setenv("MLFLOW_RUN_ID", "abc")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////work/m.db")
    with caplog.at_level(logging.INFO, logger="app.tracking"):
        MLflowCallback().on_run_end(cfg)
    (line,) = [r.getMessage() for r in caplog.records if "compare runs" in r.getMessage()]
    assert "--backend-store-uri sqlite:////work/m.db " in line
    server = OmegaConf.create({"tracking": {"mode": "server", "uri": "http://bob:pw@host:5000/"}})
    monkeypatch.delenv("MLFLOW_RUN_ID")
    assert backend.ui_line(backend.effective_uri(server.tracking)).startswith("compare runs: open http://***@host:5000/#")
