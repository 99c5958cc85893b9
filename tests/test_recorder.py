"""The MLflow helper process (app.tracking.helper, one worker of a ProcessPoolExecutor): the command submits the calls
of app.tracking.calls and never imports MLflow; the helper makes them in order, a failed call is one line, and it ends
with the command, even one killed with SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY, app_checked_at_exit


def _runs(uri: str):
    from app.tracking import backend

    c = backend.client(uri)  # the app's lock: reading while the command creates the store does not break it
    experiment = c.get_experiment_by_name("madminer-sweeper")
    return c, ([] if experiment is None else c.search_runs([experiment.experiment_id], max_results=100))


def _alive(pid: str) -> bool:
    try:  # a zombie (ended, not yet reaped by init) is not alive
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_a_tracked_run_never_imports_mlflow_in_its_process(tmp_path, test_cache):
    """The job's process hands everything to the helper; with tracking.background=false it imports MLflow itself."""
    code = app_checked_at_exit("'MLFLOW', 'mlflow' in sys.modules")
    env = dict(os.environ, MADMINER_SWEEPER_CACHE=str(test_cache))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    for background, imported in (("true", False), ("false", True)):
        proc = subprocess.run(
            [sys.executable, "-c", code, "stage=sample", *TINY, "tracking=local", f"tracking.uri={uri}",
             f"tracking.background={background}", f"hydra.run.dir={tmp_path}/run-{background}"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
        )
        assert proc.returncode == 0 and f"MLFLOW {imported}" in proc.stderr, proc.stderr[-3000:]
    c, runs = _runs(uri)
    assert [r.info.status for r in runs] == ["FINISHED", "FINISHED"]
    for run in runs:  # the same record either way
        assert run.data.params["sampling.n_samples"] == "600" and run.data.tags["data"] == "toy"
        run_json = json.loads((Path(run.data.tags["output_dir"]) / "run.json").read_text())
        assert run_json["mlflow_run_id"] == run.info.run_id
        assert run.data.tags["cache.sample.status"] in ("computed", "reused")
    assert {r.data.params["tracking.background"] for r in runs} == {"true", "false"}


def _job_dir(tmp_path, name: str) -> Path:
    out = tmp_path / name
    (out / "results").mkdir(parents=True)
    (out / "run.json").write_text("{}")
    (out / "results" / "metrics.json").write_text('{"limits_cl68_area": 1.5}')
    return out


@pytest.mark.slow
def test_calls_are_made_in_order_and_a_failure_is_one_line(tmp_path):
    """A job's end is submitted before its start has been made (handles, not run ids); a failed call is one line
    that names where the job's outputs are, and the later calls of that run add no second line."""
    from app.tracking import calls, helper

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = _job_dir(tmp_path, "job")
    tracker = helper.start(uri, "madminer-sweeper")
    try:
        started = tracker.submit(calls.start_parent, handle="p", name="sweep", tags={"sweep_dir": str(tmp_path)},
                                 start_time=int(time.time() * 1000), sweep_dir=str(tmp_path))
        common = dict(uri=uri, experiment_name="madminer-sweeper", tags={"t": "x"}, output_dir=str(out),
                      params={"training.method": "alices", "training.alpha": "1"}, start_time=int(time.time() * 1000))
        job = tracker.submit(calls.start_job, handle="j1", run_name="job-1", parent={"handle": "p"}, **common)
        tracker.submit(calls.finish_job, handle="j1", status="FINISHED", error=None, register_model=False,
                       objective=0.5, parent={"handle": "p"}, job_num=0)
        # a parent that was never created: that job's creation fails, and its later calls add no second line
        tracker.submit(calls.start_job, handle="j2", run_name="job-2", parent={"handle": "nope"}, **common)
        tracker.submit(calls.finish_job, handle="j2", status="FINISHED", error=None, register_model=False)
        errors = tracker.wait()
        tracker.submit(calls.end_parent, parent={"handle": "p"}, metric="limits_cl68_area", direction=None,
                       register_model=False)
        assert tracker.wait() == []
    finally:
        tracker.close()
    assert len(errors) == 1 and "while recording a job's run" in errors[0] and str(out) in errors[0], errors
    c, runs = _runs(uri)
    by_name = {r.info.run_name: r for r in runs}
    assert set(by_name) == {"sweep", "job-1"}
    assert started.result()["run_id"] == by_name["sweep"].info.run_id
    assert by_name["job-1"].data.tags["mlflow.parentRunId"] == by_name["sweep"].info.run_id
    assert by_name["job-1"].info.status == by_name["sweep"].info.status == "FINISHED"
    metrics = by_name["job-1"].data.metrics
    assert metrics["objective"] == 0.5 and metrics["limits_cl68_area"] == 1.5
    assert [m.value for m in c.get_metric_history(by_name["sweep"].info.run_id, "objective")] == [0.5]
    assert json.loads((out / "run.json").read_text())["mlflow_run_id"] == job.result()
    assert by_name["sweep"].data.tags["best_run_name"] == "job-1"
    # jobs in other processes read the parent from the sweep dir
    assert calls.parent_run({"file": str(tmp_path / calls.PARENT_FILE)}, wait=0) == (
        by_name["sweep"].info.run_id, by_name["sweep"].info.experiment_id)


def test_a_store_that_cannot_be_opened_is_reported_once(tmp_path):
    from app.tracking import calls, helper

    (tmp_path / "afile").write_text("")
    uri = f"sqlite:///{tmp_path}/afile/mlflow.db"  # a file where the database's folder should be
    tracker = helper.start(uri, "madminer-sweeper")
    try:
        tracker.submit(calls.start_job, handle="j", uri=uri, experiment_name="madminer-sweeper", run_name="j",
                       params={}, tags={}, output_dir=str(tmp_path), start_time=0)
        tracker.submit(calls.finish_job, handle="j", status="FINISHED", error=None, register_model=False)
        errors = tracker.wait()
    finally:
        tracker.close()
    assert len(errors) == 1 and "is unreachable" in errors[0] and "afile" in errors[0], errors


@pytest.mark.slow
def test_a_helper_that_dies_is_one_line_and_ctrl_c_does_not_reach_it(tmp_path):
    """SIGINT to the helper (a Ctrl-C reaches the whole process group) is ignored; a helper killed otherwise ends
    the calls with one line, once."""
    from app.tracking import calls, helper

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = helper.start(uri, "madminer-sweeper")
    try:
        (pid,) = _helper_pids()
        os.kill(pid, signal.SIGINT)  # at once: it may still be starting (SIGINT blocked), or opening the store
        assert tracker.wait() == [] and _alive(str(pid))
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
        tracker.submit(calls.end_run, handle="x", status="FINISHED")
        tracker.submit(calls.end_run, handle="y", status="FINISHED")
        assert tracker.wait() == [helper.HELPER_GONE]
    finally:
        tracker.close()


def _helper_pids() -> list[int]:
    """This process's children that multiprocessing spawned (not its resource tracker)."""
    me = os.getpid()
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == me and b"spawn_main" in cmdline:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.slow
def test_the_helper_ends_with_a_killed_command(tmp_path, test_cache):
    """kill -9 of the command: the helper makes the calls it was handed and ends (no process holds the console's
    pipes); the run it created stays RUNNING until the next run closes it as an orphan."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = dict(os.environ, MADMINER_SWEEPER_CACHE=str(test_cache), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "app", *TINY, "training.n_epochs=500", "sampling.n_samples=4000",
           "tracking=local", f"tracking.uri={uri}", f"hydra.run.dir={tmp_path}/run"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 180
    for line in proc.stdout:
        if "epoch   3/500" in line or time.time() > deadline:
            break
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    helpers = [pid for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert len(helpers) == 1, children
    while not _runs(uri)[1]:  # the helper creates the run in the background
        assert time.time() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    start = time.time()
    proc.stdout.read()  # EOF once no process holds the pipe: the helper has ended too
    assert time.time() - start < 60 and not _alive(helpers[0])
    assert [r.info.status for r in _runs(uri)[1]] == ["RUNNING"]
    again = subprocess.run([*cmd[:3], *TINY, "stage=sample", "tracking=local", f"tracking.uri={uri}",
                            f"hydra.run.dir={tmp_path}/again"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "closed orphaned run" in again.stdout + again.stderr
    statuses = sorted((r.info.run_name.startswith("alices"), r.info.status) for r in _runs(uri)[1])
    assert [s for _, s in statuses] == ["FAILED", "FINISHED"], statuses


def test_a_sweep_whose_store_fails_lists_it_and_exits_1(run_app, tmp_path):
    """The jobs' work is done, but MLflow holds none of it: the sweep says so in its summary, exit code 1."""
    (tmp_path / "adir").mkdir()  # a folder where the database file should be: the port/folder precheck passes
    proc = run_app("-m", *TINY, "stage=sample", "training.alpha=1,2", "tracking=local",
                   f"tracking.uri=sqlite:///{tmp_path}/adir", f"hydra.sweep.dir={tmp_path}/sw", check=False)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = proc.stdout + proc.stderr
    errors = [line for line in out.splitlines() if "error: MLflow tracking store" in line]
    assert len(errors) == 1 and "is unreachable" in errors[0], out[-3000:]
    assert "0 of 2 jobs failed; 1 MLflow call(s) failed" in out and "Traceback" not in out
    assert all((tmp_path / "sw" / str(i) / "samples" / "x_train.npy").exists() for i in (0, 1))


@pytest.mark.slow
def test_run_times_are_the_jobs_not_the_helpers(run_app, tmp_path):
    """The helper makes the calls later (after importing MLflow; behind the jobs): the runs still start and end when
    the sweep and its jobs did, so the durations the MLflow UI shows are the real ones."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_app("-m", *TINY, "stage=sample", "training.alpha=1,2", "tracking=local", f"tracking.uri={uri}",
            f"hydra.sweep.dir={tmp_path}/sw")
    _, runs = _runs(uri)
    parent = next(r for r in runs if r.data.tags.get("kind") == "sweep")
    jobs = sorted((r for r in runs if "mlflow.parentRunId" in r.data.tags), key=lambda r: int(r.data.tags["job.num"]))
    assert len(jobs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    times = [(r.info.run_name, r.info.start_time, r.info.end_time) for r in [parent, *jobs]]
    assert parent.info.start_time <= jobs[0].info.start_time, times  # the sweep started before its first job
    assert jobs[0].info.end_time <= jobs[1].info.start_time, times  # serial jobs: one ends before the next starts
    assert jobs[1].info.end_time <= parent.info.end_time, times


def test_a_database_that_cannot_be_opened_fails_in_seconds(run_app, tmp_path, postgres_db):
    """A PostgreSQL server that is up but has no such database: MLflow alone retries creating its engine for ~101 s;
    the run fails with one line after a few attempts (tracking.DB_CONNECT_ATTEMPTS, ~12 s), well within the timeout."""
    url = postgres_db()  # the server answers (trust auth); the database below does not exist
    missing = url.rsplit("/", 1)[0] + "/no_such_database"
    start = time.monotonic()
    proc = run_app(*TINY, "stage=sample", "tracking=local", f"tracking.uri={missing}", check=False, timeout=60)
    seconds = time.monotonic() - start
    assert proc.returncode == 2, proc.out[-3000:]
    errors = [line for line in proc.out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "no_such_database" in errors[0] and "does not exist" in errors[0], proc.out[-3000:]
    assert "Traceback" not in proc.out
    assert seconds < 45, f"{seconds:.0f} s: MLflow's own ~101-s engine retries were not bounded"


def test_a_store_gone_for_good_skips_the_later_calls(monkeypatch):
    """Once a request has used up the ride-out window (~2 min), the command's later calls are skipped instead of
    each waiting as long again; any other failure only concerns its own call."""
    from app.tracking import calls

    store = calls.Store(uri="http://127.0.0.1:1", runs={"a": "run-a", "b": "run-b"},
                        dirs={"a": "/out/a", "b": "/out/b"})
    monkeypatch.setattr(calls, "STORE", store)

    @calls.reported
    def finish_job(*, handle):
        raise error

    error = ValueError("INVALID_PARAMETER_VALUE: bad metric")
    with pytest.raises(calls.CallFailed, match="run run-a") as other:
        finish_job(handle="a")
    assert "/out/a" in str(other.value) and store.failure is None
    error = RuntimeError("API request to http://127.0.0.1:1/api/2.0/mlflow/runs/log-batch failed with exception "
                         "HTTPConnectionPool(host='127.0.0.1', port=1): Max retries exceeded with url: ...")
    with pytest.raises(calls.CallFailed, match="unreachable while recording run run-a") as gone:
        finish_job(handle="a")
    assert "/out/a" in str(gone.value) and store.failure
    with pytest.raises(calls.Skipped):  # no second line
        calls.end_run(handle="b", status="FINISHED")


@pytest.mark.slow
def test_system_metrics_are_logged_into_each_job_run(tmp_path, monkeypatch):
    """tracking.system_metrics=true: MLflow's own monitor samples CPU and memory into the job's run until its end
    (a job shorter than the sampling interval still gets its samples); a run without it gets none."""
    from mlflow.tracking import MlflowClient

    from app.tracking import calls, helper

    monkeypatch.setattr(calls, "STORE", calls.Store())  # this process's own view of the store, for this test only
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.3")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = _job_dir(tmp_path, "job")
    tracker = helper.Tracker()  # the calls made here, as in a launcher's worker
    tracker.submit(calls.open_store, uri=uri, experiment_name="madminer-sweeper")
    common = dict(uri=uri, experiment_name="madminer-sweeper", params={}, tags={}, output_dir=str(out), start_time=0)
    for handle, on in (("with", True), ("without", False)):
        tracker.submit(calls.start_job, handle=handle, run_name=handle, system_metrics=on, **common)
        time.sleep(0.8)
        tracker.submit(calls.finish_job, handle=handle, status="FINISHED", error=None, register_model=False)
    assert tracker.wait() == []
    c, runs = _runs(uri)
    by_name = {r.info.run_name: r for r in runs}
    with_run = by_name["with"]
    assert with_run.info.status == "FINISHED" and with_run.data.tags["system_metrics.gpu"] == "false"
    history = MlflowClient(uri).get_metric_history(with_run.info.run_id, "system/cpu_utilization_percentage")
    assert len(history) >= 2 and all(0 <= m.value <= 100 for m in history), history
    assert with_run.data.metrics["system/system_memory_usage_megabytes"] > 10
    assert not [k for k in by_name["without"].data.metrics if k.startswith("system/")]
    assert not calls.STORE.monitors  # every monitor stopped
