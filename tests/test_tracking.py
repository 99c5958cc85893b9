"""MLflow tracking through the Hydra callback: runs, sweeps, failures, secrets, server, MLproject."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, TINY

SECRET = "hunter2-not-for-mlflow"


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _runs(uri: str, experiment: str = "madminer-sweeper"):
    c = _client(uri)
    exp = c.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment} in {uri}"
    return c, c.search_runs([exp.experiment_id], max_results=1000)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def sqlite_uri(tmp_path) -> str:
    return f"sqlite:///{tmp_path}/mlflow.db"


def test_single_run_params_tags_metrics_artifacts(run_app, tmp_path, sqlite_uri):
    run_app("training=alices", *TINY, f"tracking.uri={sqlite_uri}", tracking="local")
    c, runs = _runs(sqlite_uri)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    params, tags, metrics = run.data.params, run.data.tags, run.data.metrics
    assert params["training.method"] == "alices" and params["sampling.n_samples"] == "600"
    assert params["sampling.theta0.priors"] == '[["flat",-5.0,5.0]]'  # one prior for each parameter
    assert params["training.n_hidden"] == "[16,16]"
    assert len(params) > 60
    assert tags["training"] == "alices" and tags["sampling"] == "ratio" and tags["data"] == "toy"
    assert tags["mlflow.runName"].startswith("alices-")
    assert "sampling.n_samples=600" in tags["overrides"]
    assert tags["version.madminer"] == "0.9.6" and "version.torch" in tags
    assert len(tags["data.sha256"]) == 64 and tags["data.path"].endswith(".h5")
    assert tags["reused.samples"] == "false"
    assert (REPO / ".git").exists() <= ("mlflow.source.git.commit" in tags)
    for key in ("train_loss", "val_loss", "objective", "limits_ml_cl68_fraction", "fisher_histo_sigma_CWL2"):
        assert key in metrics, key
    history = c.get_metric_history(run.info.run_id, "epoch_val_loss")
    assert [m.step for m in history] == [1, 2]
    for term in ("epoch_val_improved_xe", "epoch_val_mse_score", "epoch_train_improved_xe"):  # every loss term
        assert [m.step for m in c.get_metric_history(run.info.run_id, term)] == [1, 2], term
    artifacts = {a.path for a in c.list_artifacts(run.info.run_id)}
    assert {"hydra", "results", "plots", "model"} <= artifacts
    assert {a.path for a in c.list_artifacts(run.info.run_id, "hydra")} == {
        "hydra/config.yaml", "hydra/overrides.yaml", "hydra/hydra.yaml"
    }
    import json

    import yaml

    logged = Path(c.download_artifacts(run.info.run_id, "hydra", str(tmp_path / "logged")))
    assert yaml.safe_load((logged / "config.yaml").read_text())["training"]["method"] == "alices"
    assert "sampling.n_samples=600" in yaml.safe_load((logged / "overrides.yaml").read_text())
    spent = json.loads((tmp_path / "run" / "run.json").read_text())["tracking_seconds"]  # bench/sweeps.py reads it
    assert 0 < spent < 60
    assert "results/metrics.json" in {a.path for a in c.list_artifacts(run.info.run_id, "results")}
    model_files = {a.path for a in c.list_artifacts(run.info.run_id, "model")}
    assert "model/estimator_state_dict.pt" in model_files and "model/model.json" in model_files
    dataset = run.inputs.dataset_inputs[0].dataset
    assert dataset.digest == tags["data.sha256"][:16]


@pytest.mark.slow
def test_multirun_is_a_parent_with_children_in_worker_processes(run_app, tmp_path, sqlite_uri):
    run_app(
        "-m", *TINY, "training=alices,sally", f"tracking.uri={sqlite_uri}",
        "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={tmp_path}/sweep",
        "tracking.system_metrics=true", tracking="local",
    )
    c, runs = _runs(sqlite_uri)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    # MLflow's system metrics, logged by each worker into its child (the parent has none); no GPU here
    assert all("system/cpu_utilization_percentage" in r.data.metrics for r in children)
    assert not any(k.startswith("system/") for k in parents[0].data.metrics)
    assert all(r.data.tags["system_metrics.gpu"] == "false" and "gpu.index" not in r.data.tags for r in children)
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    assert {r.data.tags["training"] for r in children} == {"alices", "sally"}
    assert all(r.info.status == "FINISHED" for r in children)
    # Each method is scored with its own loss term (val_improved_xe, val_mse_score): no cross-method best.
    assert "best_run_id" not in parent.data.tags and "not comparable" in parent.data.tags["comparison"]
    assert {parent.data.tags["best_run_name.alices"], parent.data.tags["best_run_name.sally"]} == {
        r.data.tags["mlflow.runName"] for r in children}
    # The parent's chart: the children's objective per trial (step = job number)
    history = c.get_metric_history(parent.info.run_id, "objective")
    assert sorted(m.step for m in history) == [0, 1]
    assert c.get_experiment(parent.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    files = {a.path for a in c.list_artifacts(parent.info.run_id, "comparison")}
    assert {"comparison/comparison.csv", "comparison/best.json", "comparison/objective.png",
            "comparison/limits_by_method.png"} <= files
    csv_path = c.download_artifacts(parent.info.run_id, "comparison/comparison.csv", str(tmp_path))
    lines = Path(csv_path).read_text().splitlines()
    assert len(lines) == 3 and "training.method" in lines[0] and "val_loss" in lines[0]


@pytest.mark.slow
def test_failed_jobs_are_marked_failed(run_app, tmp_path, sqlite_uri):
    proc = run_app(*TINY, "training.n_epochs=0", f"tracking.uri={sqlite_uri}", tracking="local", check=False)
    assert proc.returncode == 2
    _, runs = _runs(sqlite_uri)
    assert [r.info.status for r in runs] == ["FAILED"]
    assert runs[0].data.tags["error"].startswith("UserError: training.n_epochs=0 is out of range")

    multi_uri = f"sqlite:///{tmp_path}/multi.db"
    proc = run_app(
        "-m", *TINY, "training.n_epochs=0,1", f"tracking.uri={multi_uri}", f"hydra.sweep.dir={tmp_path}/sw",
        tracking="local", check=False,
    )
    # The failed job does not end the sweep: the command ends with one line per failed job and exit code 1.
    assert proc.returncode == 1 and "Traceback" not in proc.out, proc.out[-3000:]
    failed = [line for line in proc.stderr.splitlines() if line.startswith("failed: ")]
    assert len(failed) == 1 and "training.n_epochs=0" in failed[0] and "out of range" in failed[0], proc.stderr
    _, runs = _runs(multi_uri)
    status = {r.data.tags.get("mlflow.runName", "").split("-")[-1]: r.info.status for r in runs}
    assert "RUNNING" not in status.values(), status
    by_epochs = {r.data.params.get("training.n_epochs"): r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert by_epochs["1"].info.status == "FINISHED" and by_epochs["0"].info.status == "FAILED"
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert parent.info.status == "FINISHED" and "training.n_epochs=0" in parent.data.tags["failed_jobs"]
    assert parent.data.tags["n_failed"] == "1"


@pytest.mark.slow
def test_ctrl_c_marks_the_run_killed(tmp_path, cache_dir, sqlite_uri):
    env = dict(os.environ, MADMINER_SWEEPER_CACHE=str(cache_dir), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "app", *TINY, "training.n_epochs=500", "sampling.n_samples=4000",
           f"tracking.uri={sqlite_uri}", f"hydra.run.dir={tmp_path}/run"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    for line in proc.stdout:
        if "epoch   3/500" in line or time.time() > deadline:
            break
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    _, runs = _runs(sqlite_uri)
    assert [r.info.status for r in runs] == ["KILLED"]


@pytest.mark.slow
def test_secrets_never_reach_mlflow(run_app, tmp_path, sqlite_uri):
    run_app(
        *TINY, "evaluation.fisher.enabled=false", f"tracking.uri={sqlite_uri}", f"+vars.db_password={SECRET}",
        f"+vars.store=postgresql://alice:{SECRET}@db.example/events", f"+vars.api_token={SECRET}",
        tracking="local",
    )
    c, runs = _runs(sqlite_uri)
    run = runs[0]
    assert run.data.params["vars.db_password"] == "***"
    assert run.data.params["vars.store"] == "postgresql://***@db.example/events"
    everything = [*run.data.params.values(), *run.data.tags.values()]
    assert not any(SECRET in value for value in everything)
    downloaded = Path(c.download_artifacts(run.info.run_id, "", str(tmp_path / "artifacts")))
    texts = [p.read_bytes() for p in downloaded.rglob("*") if p.is_file()]
    assert texts and not any(SECRET.encode() in t for t in texts)


def test_unreachable_server_fails_fast(run_app, tmp_path):
    uri = f"http://127.0.0.1:{_free_port()}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        start = time.time()
        proc = run_app(*TINY, tracking="server", check=False, timeout=120)
        elapsed = time.time() - start
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
    assert proc.returncode != 0 and elapsed < 15, (proc.returncode, elapsed)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and uri in errors[0] and "unreachable" in errors[0], proc.stderr
    assert not (tmp_path / "run" / "samples").exists()


def _assert_best_model_reproduces_predictions(uri: str, parent) -> None:
    """models:/madminer-<method>@best, evaluated on the best run's test events, gives its stored scores."""
    import mlflow
    import numpy as np
    import pandas as pd

    c = _client(uri)
    best = c.get_run(parent.data.tags["best_run_id"])
    method = best.data.tags["training"]
    assert parent.data.tags["best_model"] == f"models:/madminer-{method}@best"
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(f"models:/madminer-{method}@best")
    results = Path(best.data.tags["output_dir"]) / "results"
    x = np.load(results / "test_x.npy")
    frame = pd.DataFrame(x, columns=["pt_j1", "delta_phi_jj"]).assign(CWL2=0.0, CPWL2=0.0)
    predicted = model.predict(frame).to_numpy()
    expected = np.load(results / "test_score_theta_true.npy").reshape(predicted.shape)
    np.testing.assert_allclose(predicted, expected, rtol=1e-5, atol=1e-6)
    versions = c.search_model_versions(f"name = 'madminer-{method}'")
    assert len(versions) == 2  # one version per training


@pytest.mark.slow
def test_registered_models_sqlite(run_app, tmp_path, sqlite_uri):
    run_app("-m", *TINY, "training=sally", "training.n_epochs=1,2", "tracking.register_model=true",
            f"tracking.uri={sqlite_uri}", f"hydra.sweep.dir={tmp_path}/sweep", tracking="local")
    _, runs = _runs(sqlite_uri)
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    _assert_best_model_reproduces_predictions(sqlite_uri, parent)


def test_postgres_backed_server(run_app, tmp_path, mlflow_server):
    os.environ["MLFLOW_TRACKING_URI"] = mlflow_server
    try:
        run_app("-m", *TINY, "training=sally", "training.n_epochs=1,2", "tracking.register_model=true",
                f"hydra.sweep.dir={tmp_path}/sweep", tracking="server")
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
    c, runs = _runs(mlflow_server)
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == 3 and len(children) == 2 and parent.info.status == "FINISHED"
    _assert_best_model_reproduces_predictions(mlflow_server, parent)
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.params["training.method"] == "sally"
        assert child.data.tags["tracking"] == "server" and "val_loss" in child.data.metrics
        assert "model/model.json" in {a.path for a in c.list_artifacts(child.info.run_id, "model")}
    assert any(a.path == "comparison/comparison.csv" for a in c.list_artifacts(parent.info.run_id, "comparison"))


@pytest.mark.slow
def test_mlproject_main_entry_point(tmp_path, cache_dir):
    """`mlflow run` with MLFLOW_TRACKING_URI (the seed guide's way): one run, in that store, and the line at the end
    names that store, not tracking.uri's default sqlite:///mlflow.db."""
    sqlite_uri = f"sqlite:///{tmp_path}/m.db"
    env = dict(os.environ, MADMINER_SWEEPER_CACHE=str(cache_dir), MLFLOW_TRACKING_URI=sqlite_uri)
    overrides = " ".join([*TINY, "training=sally", f"hydra.run.dir={tmp_path}/run"])
    proc = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "main", "-P", f"overrides={overrides}",
         "--env-manager", "local", "--experiment-name", "madminer-sweeper"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    _, runs = _runs(sqlite_uri)
    assert len(runs) == 1, [r.info.run_name for r in runs]  # no duplicate run per job
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["training.method"] == "sally" and run.data.tags["training"] == "sally"
    assert run.data.tags["mlflow.project.entryPoint"] == "main" and "val_loss" in run.data.metrics
    assert (tmp_path / "run" / "results" / "metrics.json").exists()
    ui = [line for line in (proc.stdout + proc.stderr).splitlines() if "compare runs: mlflow ui" in line]
    assert len(ui) == 1 and f"--backend-store-uri {sqlite_uri} " in ui[0], ui
