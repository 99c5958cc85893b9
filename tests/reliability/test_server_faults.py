"""The MLflow server (PostgreSQL backend) restarted during a sweep, or gone for good.

A restart within the retry window (app.tracking.backend.HTTP_RIDE_OUT, about 2 min of refused connections) loses no run,
param or metric. A server that stays down ends the job with one line, and the run it leaves RUNNING is closed as
FAILED by ``python -m app.tracking close-orphans`` (or by the next run) once the store is back.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY, free_port, server_env


class Server:
    """`mlflow server` on 127.0.0.1:port with a PostgreSQL backend, that can be stopped and started again."""

    def __init__(self, tmp: Path, backend: str) -> None:
        self.tmp, self.backend, self.port, self.proc = tmp, backend, free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", self.backend, "--artifacts-destination", str(self.tmp / "artifacts"),
             "--workers", "1"],
            cwd=self.tmp, stdout=subprocess.DEVNULL, stderr=open(self.tmp / "server.log", "a"), start_new_session=True,
            env=server_env())
        deadline = time.time() + 120
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    pytest.fail(f"mlflow server did not start: {(self.tmp / 'server.log').read_text()[-2000:]}")
                time.sleep(0.5)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            self.proc.wait(timeout=60)


@pytest.fixture
def server(tmp_path, postgres_db):
    s = Server(tmp_path, postgres_db("mlflow_restart"))
    s.start()
    yield s
    s.stop()


def _runs(uri: str):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=uri)
    return c, c.search_runs([c.get_experiment_by_name("madminer-sweeper").experiment_id], max_results=100)


def _n_runs(uri: str) -> int:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=uri)
    experiment = c.get_experiment_by_name("madminer-sweeper")
    return 0 if experiment is None else len(c.search_runs([experiment.experiment_id]))


@pytest.mark.slow
def test_a_server_restart_during_a_sweep_loses_nothing(tmp_path, test_cache, server):
    env = dict(os.environ, MADMINER_SWEEPER_CACHE=str(test_cache), MLFLOW_TRACKING_URI=server.uri,
               PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "app", "-m", *TINY, "training.alpha=1,2,3", "tracking=server",
         f"hydra.sweep.dir={tmp_path}/sw"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:  # restart the server while the second job runs
        lines.append(line)
        if "#1 :" in line:
            break
    server.stop()
    time.sleep(5)
    server.start()
    out = "".join(lines) + proc.communicate(timeout=900)[0]
    assert proc.returncode == 0, out[-3000:]
    c, runs = _runs(server.uri)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(runs) == 4 and len(children) == 3
    assert all(r.info.status == "FINISHED" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    for child in children:
        assert {"training.alpha", "sampling.n_samples"} <= set(child.data.params)
        assert {"val_improved_xe", "limits_cl68_area", "objective"} <= set(child.data.metrics)
        assert len(c.get_metric_history(child.info.run_id, "epoch_val_loss")) == 2


@pytest.mark.slow
def test_a_server_that_stays_down_fails_the_job_in_one_line_and_the_run_is_closed_later(
        tmp_path, test_cache, server):
    env = dict(os.environ, MADMINER_SWEEPER_CACHE=str(test_cache), MLFLOW_TRACKING_URI=server.uri,
               PYTHONUNBUFFERED="1", MLFLOW_HTTP_REQUEST_MAX_RETRIES="1", MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1")
    proc = subprocess.Popen(  # training long enough for the stop to fall inside the job
        [sys.executable, "-m", "app", *TINY, "training.n_epochs=40", "tracking=server",
         f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "stage data " in line:
            break
    # the MLflow helper (app.tracking.helper) creates the run in the background: once it exists, stop the server
    # for good
    deadline = time.time() + 120
    while not _n_runs(server.uri):
        assert time.time() < deadline and proc.poll() is None, "the run was never created"
        time.sleep(0.2)
    assert proc.poll() is None, "the job ended before the server stopped"
    server.stop()
    stdout, stderr = proc.communicate(timeout=600)
    stdout = "".join(seen) + stdout
    assert proc.returncode == 2, stdout[-2000:] + stderr[-2000:]
    errors = [x for x in stderr.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1 and "unreachable" in errors[0] and "close-orphans" in errors[0], stderr[-2000:]
    assert "Traceback" not in stdout + stderr
    assert (tmp_path / "run" / "results" / "metrics.json").exists()  # the work itself is kept

    server.start()
    _, runs = _runs(server.uri)
    assert [r.info.status for r in runs] == ["RUNNING"]
    closed = subprocess.run([sys.executable, "-m", "app.tracking", "close-orphans", "--uri", server.uri],
                            capture_output=True, text=True, env=env, timeout=120)
    assert closed.returncode == 0 and "closed 1 orphaned run" in closed.stdout, closed.stdout + closed.stderr
    _, runs = _runs(server.uri)
    assert [r.info.status for r in runs] == ["FAILED"] and "orphaned" in runs[0].data.tags["error"]


@pytest.mark.slow
def test_eight_concurrent_jobs_log_to_one_server(tmp_path, test_cache, server):
    """Load: 8 joblib jobs at once on 2 cores, one MLflow server on PostgreSQL; prints the wall time."""
    env = dict(os.environ, MADMINER_SWEEPER_CACHE=str(test_cache), MLFLOW_TRACKING_URI=server.uri)
    start = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "app", "-m", *TINY, "training.alpha=1,2,3,4,5,6,7,8", "tracking=server",
         "evaluation.fisher.enabled=false", "hydra/launcher=joblib", "hydra.launcher.n_jobs=8",
         f"hydra.sweep.dir={tmp_path}/sw"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    wall = time.time() - start
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    c, runs = _runs(server.uri)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    said = [x for x in (proc.stdout + proc.stderr).splitlines() if "error" in x.lower() or "failed" in x.lower()]
    assert len(children) == 8 and all(r.info.status == "FINISHED" for r in runs), (
        [(r.info.run_name, r.info.status, r.data.tags.get("error")) for r in runs if r.info.status != "FINISHED"],
        said[-10:], (tmp_path / "server.log").read_text()[-1500:])
    assert sorted(float(r.data.params["training.alpha"]) for r in children) == [1, 2, 3, 4, 5, 6, 7, 8]
    n_params = {len(r.data.params) for r in children}
    assert len(n_params) == 1, n_params  # every job logged the same full set of params
    for child in children:
        assert {"val_improved_xe", "val_loss", "limits_cl68_area", "objective"} <= set(child.data.metrics)
        assert len(c.get_metric_history(child.info.run_id, "epoch_val_loss")) == 2  # no duplicate, none lost
    print(f"8 concurrent jobs on {os.cpu_count()} cores logging to one server: {wall:.0f} s wall")
