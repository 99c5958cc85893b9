"""Pruning (``hydra/sweeper/pruner``) and trials that never wait for each other (``hydra.sweeper.asynchronous``,
``hydra.sweeper.n_trials_scope=study``): what the sweep, Optuna's storage and MLflow hold afterwards. The small
checks run in the default tier; the app's searches and the multi-process ones are slow / services."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from conftest import TINY
from hydra.utils import instantiate
from omegaconf import OmegaConf
from optuna.trial import TrialState

from app.sweeps.pruning import active
from app.sweeps.storage import check_shared, network_filesystem
from hydra_plugins.madminer_sweeper.config import PRUNERS, check

APPS = Path(__file__).parent / "sweeper_apps"
optuna.logging.set_verbosity(optuna.logging.WARNING)


def _record(sweep_dir: Path) -> dict:
    return json.loads((sweep_dir / "sweep.json").read_text())


# --------------------------------------------------------------------------- default tier
@pytest.mark.parametrize("name, cls", [("nop", "NopPruner"), ("median", "MedianPruner"),
                                       ("percentile", "PercentilePruner"), ("hyperband", "HyperbandPruner"),
                                       ("successive_halving", "SuccessiveHalvingPruner"),
                                       ("threshold", "ThresholdPruner")])
def test_the_pruner_group_makes_optunas_pruners(name, cls):
    config = OmegaConf.structured(PRUNERS[name])
    if name == "threshold":  # refused without a bound (one line, by the sweeper's check)
        with pytest.raises(ValueError, match="needs a bound"):
            check({"_target_": "x.TolerantOptunaSweeper", "pruner": config})
        config.upper = 1.0
    pruner = instantiate(config)
    assert type(pruner).__name__ == cls
    assert active(config) == (name != "nop") and active(pruner) == (name != "nop") and not active(None)


def test_sqlite_on_a_network_filesystem_is_refused_for_several_workers(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text(f"/dev/sda1 / ext4 rw 0 0\nserver:/export {tmp_path}/shared nfs4 rw 0 0\n")
    (tmp_path / "shared").mkdir()
    assert network_filesystem(tmp_path / "shared" / "o.db", str(mounts)) == "nfs4"
    assert network_filesystem(tmp_path / "local.db", str(mounts)) is None
    assert network_filesystem(tmp_path / "sharedx" / "o.db", str(mounts)) is None  # a prefix is not a mount

    import app.sweeps.storage as storage

    real = storage.network_filesystem
    storage.network_filesystem = lambda path: real(path, str(mounts))
    try:
        joblib = {"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"}
        basic = {"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"}
        on_nfs = f"sqlite:///{tmp_path}/shared/o.db"
        line = check_shared({"storage": on_nfs, "n_jobs": 2}, joblib)
        assert line is not None and "network filesystem (nfs4)" in line and "postgresql://" in line
        assert "\n" not in line
        assert check_shared({"storage": on_nfs, "n_jobs": 1}, joblib) is None
        assert check_shared({"storage": on_nfs, "n_jobs": 2}, basic) is None  # one job at a time
        assert check_shared({"storage": on_nfs, "n_jobs": 1, "n_trials_scope": "study"}, basic) is not None
        assert check_shared({"storage": f"sqlite:///{tmp_path}/o.db", "n_jobs": 4}, joblib) is None
        assert check_shared({"storage": "postgresql://u@h/db", "n_jobs": 4}, joblib) is None
    finally:
        storage.network_filesystem = real


@pytest.mark.parametrize("objective, pruned_at", [("val_improved_xe", 2), ("truth_log_r_mse", 1)])
def test_a_job_reports_its_epochs_to_its_trial_and_stops_when_pruned(tmp_path, objective, pruned_at):
    """The objective's per-epoch value (val_loss standing in for one that is not per-epoch) goes to the trial at
    step = epoch; Pruned carries the epochs trained once the pruner says so."""
    from app.errors import Pruned
    from app.sweeps.pruning import TrialReporter

    storage = f"sqlite:///{tmp_path}/o.db"
    study = optuna.create_study(study_name="s", storage=storage)
    study.ask()  # trial 0: another trial of the study
    number = study.ask().number
    config = OmegaConf.structured(PRUNERS["threshold"])
    config.upper = 0.5  # val_improved_xe 0.4, 0.6; val_loss 0.7: pruned where the reported value passes 0.5
    report = TrialReporter(storage, "s", config, number)
    epochs = [{"epoch": 1, "train_loss": 0.9, "val_loss": 0.7, "val_improved_xe": 0.4},
              {"epoch": 2, "train_loss": 0.8, "val_loss": 0.7, "val_improved_xe": 0.6}]
    with pytest.raises(Pruned) as caught:
        for entry in epochs:
            report(entry, objective)
    assert caught.value.epoch == pruned_at
    assert [e["epoch"] for e in caught.value.history] == list(range(1, pruned_at + 1))
    key = objective if objective in epochs[0] else "val_loss"
    trial = optuna.load_study(study_name="s", storage=storage).trials[number]
    assert trial.intermediate_values == {e["epoch"]: e[key] for e in epochs[:pruned_at]}
    assert optuna.load_study(study_name="s", storage=storage).trials[0].intermediate_values == {}


def test_a_pruner_on_a_grid_sweep_is_one_line(run_app, tmp_path):
    proc = run_app("-m", "training.alpha=1,2", "+hydra/sweeper/pruner=median", f"hydra.sweep.dir={tmp_path}/sw",
                   check=False)
    assert proc.returncode == 2, proc.out[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "hydra/sweeper=tolerant runs every job" in lines[0]
    assert not (tmp_path / "sw" / "0").exists()


def _sphere(runner, tmp_path: Path, *overrides: str):
    sys.path.insert(0, str(APPS))
    import sphere

    return runner(calling_file=str(APPS / "sphere.py"), calling_module=None, task_function=sphere.sphere,
                  config_path="conf", config_name="sphere", overrides=list(overrides), temp_dir=tmp_path / "sweep")


def test_asynchronous_search_in_process_runs_n_trials_once_each(hydra_sweep_runner, tmp_path):
    """The in-process launcher runs one job at a time: the asynchronous loop still claims n_trials, each once."""
    with _sphere(hydra_sweep_runner, tmp_path, "hydra.sweeper.asynchronous=true", "hydra.sweeper.n_jobs=2",
                 "hydra.sweeper.n_trials=5", f"hydra.sweeper.storage=sqlite:///{tmp_path}/o.db",
                 "hydra/sweeper/sampler=random"):
        record = _record(tmp_path / "sweep")
    assert sorted(j["job"] for j in record["jobs"]) == list(range(5))
    study = optuna.load_study(study_name="sphere", storage=f"sqlite:///{tmp_path}/o.db")
    assert sorted(t.number for t in study.trials) == list(range(5))
    assert {t.state for t in study.trials} == {TrialState.COMPLETE}
    objectives = sorted(j["objective"] for j in record["jobs"])
    assert objectives == sorted(t.value for t in study.trials)  # each job told its own trial


# --------------------------------------------------------------------------- slow: the app, processes
@pytest.mark.slow
def test_a_pruner_that_always_prunes_gives_pruned_trials_without_evaluation(run_app, tmp_path):
    """ThresholdPruner(upper=0) prunes every trial after its first epoch: PRUNED in Optuna, in the sweep's record
    and table, KILLED with optuna.trial_state=PRUNED and its per-epoch series in MLflow, counted on the parent."""
    from mlflow.tracking import MlflowClient

    db, uri = f"sqlite:///{tmp_path}/optuna.db", f"sqlite:///{tmp_path}/mlflow.db"
    proc = run_app("-m", "hparams_search=alices_optuna", *TINY, "training.n_epochs=4", "hydra/sweeper/pruner=threshold",
                   "hydra.sweeper.pruner.upper=0", "hydra.sweeper.n_trials=2", f"hydra.sweeper.storage={db}",
                   f"tracking.uri={uri}", f"hydra.sweep.dir={tmp_path}/sw", tracking="local")
    assert "sweep: 2 jobs: 0 finished, 0 failed, 2 pruned" in proc.stdout, proc.out[-3000:]
    study = optuna.load_study(study_name="alices-optuna", storage=db)
    assert [t.state for t in study.trials] == [TrialState.PRUNED] * 2
    assert all(list(t.intermediate_values) == [1] for t in study.trials)  # pruned at the first report
    for job in (0, 1):
        out = tmp_path / "sw" / str(job)
        metrics = json.loads((out / "results" / "metrics.json").read_text())
        assert metrics["n_epochs_trained"] == 1 and len(metrics["loss_history"]) == 1
        assert not (out / "model").exists() and not (out / "results" / "limits.json").exists()
        assert json.loads((out / "run.json").read_text())["pruned"] == {"epoch": 1}
    c = MlflowClient(tracking_uri=uri)
    runs = c.search_runs([c.get_experiment_by_name("madminer-sweeper").experiment_id])
    children = [r for r in runs if r.data.tags.get("kind") != "sweep"]
    parent = next(r for r in runs if r.data.tags.get("kind") == "sweep")
    assert len(children) == 2
    for r in children:
        assert r.info.status == "KILLED" and r.data.tags["optuna.trial_state"] == "PRUNED"
        assert "error" not in r.data.tags
        assert len(c.get_metric_history(r.info.run_id, "epoch_val_improved_xe")) == 1
    assert parent.data.tags.get("n_pruned") == "2"


@pytest.mark.slow
@pytest.mark.parametrize("launcher", [["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
                                      ["hydra/launcher=submitit_local"]], ids=["joblib", "submitit"])
def test_asynchronous_search_never_waits_for_a_long_trial(tmp_path, launcher):
    """Two slots under joblib or submitit: short trials start while a long one runs; n_trials in all, each once.
    The random sampler's seed 56 draws trial 0 long (4 s) and trials 1-5 short (0.1 s)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(APPS / "sphere.py"), "-m", f"hydra.sweep.dir={tmp_path}/sweep",
                           *launcher, "hydra.sweeper.n_jobs=2", "hydra.sweeper.asynchronous=true",
                           "hydra.sweeper.n_trials=6", f"hydra.sweeper.storage=sqlite:///{tmp_path}/o.db",
                           "hydra/sweeper/sampler=random", "hydra.sweeper.sampler.seed=56", "sleep=choice(0.1,4)"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = _record(tmp_path / "sweep")
    assert sorted(j["job"] for j in record["jobs"]) == list(range(6))
    study = optuna.load_study(study_name="sphere", storage=f"sqlite:///{tmp_path}/o.db")
    assert sorted(t.number for t in study.trials) == list(range(6))
    assert {t.state for t in study.trials} == {TrialState.COMPLETE}
    assert [t.params["sleep"] for t in sorted(study.trials, key=lambda t: t.number)] == [4, 0.1, 0.1, 0.1, 0.1, 0.1]
    order = [j["job"] for j in record["jobs"]]  # the record follows the order in which the trials ended
    # in batches of two, trial 2 would start only once trial 0 ended; here it ends first
    assert order.index(2) < order.index(0), order
    assert time.perf_counter() - start < 200


@pytest.mark.slow
def test_two_worker_processes_feed_one_postgresql_study(tmp_path, postgres_db):
    """The documented command twice, at once, on a fresh database: n_trials over both, no trial lost or doubled."""
    url = postgres_db("pruneasync")
    procs = [subprocess.Popen([sys.executable, str(APPS / "sphere.py"), "-m",
                               f"hydra.sweep.dir={tmp_path}/worker-{i}", f"hydra.sweeper.storage={url}",
                               "hydra.sweeper.n_trials_scope=study", "hydra.sweeper.n_trials=8",
                               "hydra/sweeper/sampler=random", "sleep=choice(0.05,0.4)"],
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    study = optuna.load_study(study_name="sphere", storage=url)
    assert sorted(t.number for t in study.trials) == list(range(8))
    assert {t.state for t in study.trials} == {TrialState.COMPLETE}
    counts = [len(_record(tmp_path / f"worker-{i}")["jobs"]) for i in (0, 1)]
    assert sum(counts) == 8 and min(counts) >= 1, counts  # both workers ran trials


@pytest.mark.slow
def test_asynchronous_app_search_under_joblib_nests_every_trial_under_one_parent(run_app, tmp_path):
    from mlflow.tracking import MlflowClient

    db, uri = f"sqlite:///{tmp_path}/optuna.db", f"sqlite:///{tmp_path}/mlflow.db"
    proc = run_app("-m", "hparams_search=alices_optuna", *TINY, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                   "hydra.sweeper.n_jobs=2", "hydra.sweeper.asynchronous=true", "hydra.sweeper.n_trials=3",
                   f"hydra.sweeper.storage={db}", f"tracking.uri={uri}", f"hydra.sweep.dir={tmp_path}/sw",
                   tracking="local")
    assert "sweep: 3 jobs: 3 finished, 0 failed, 0 pruned" in proc.stdout, proc.out[-3000:]
    study = optuna.load_study(study_name="alices-optuna", storage=db)
    assert sorted(t.number for t in study.trials) == [0, 1, 2]
    assert {t.state for t in study.trials} == {TrialState.COMPLETE}
    c = MlflowClient(tracking_uri=uri)
    runs = c.search_runs([c.get_experiment_by_name("madminer-sweeper").experiment_id])
    parents = [r for r in runs if r.data.tags.get("kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("kind") != "sweep"]
    assert len(parents) == 1 and len(children) == 3
    assert {r.data.tags.get("mlflow.parentRunId") for r in children} == {parents[0].info.run_id}
    assert sorted(int(r.data.tags["job.num"]) for r in children) == [0, 1, 2]


def test_ctrl_c_ends_an_asynchronous_search_whose_jobs_run_elsewhere():
    """Ctrl-C while every trial slot waits for a job that runs elsewhere (SLURM): the kernel may hand SIGINT to a
    slot's thread, so the sweep's thread must wake up to take it; it then asks the launcher to interrupt its waits
    (the SLURM launcher cancels the jobs) and no slot claims another trial."""
    import signal
    import threading
    from types import SimpleNamespace

    from hydra_plugins.madminer_sweeper import _async

    class Launcher:  # each launch waits until interrupted, as the SLURM launcher waits for a job on the cluster
        def __init__(self):
            self.stop, self.launched = threading.Event(), []

        def launch(self, overrides, initial_job_idx):
            self.launched.append(initial_job_idx)
            if len(self.launched) == 2:  # both slots wait: Ctrl-C from a slot's thread
                signal.raise_signal(signal.SIGINT)
            if not self.stop.wait(timeout=30):
                raise AssertionError("not interrupted within 30 s")
            raise KeyboardInterrupt

        def interrupt(self):
            self.stop.set()

    study = optuna.create_study()
    claims = _async.Claims(study, {}, n_trials=6, scope="invocation", shared=None)
    launcher = Launcher()
    sweeper = SimpleNamespace(n_jobs=2, launcher=launcher, validate_batch_is_legal=lambda batch: None)
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        _async.run(sweeper, claims, build=lambda trial: [], tell=lambda trial, ret: (None, False),
                   on_over_budget=lambda error: None)
    assert time.monotonic() - start < 10 and launcher.stop.is_set()
    assert sorted(launcher.launched) == [0, 1] and claims.stopped.is_set()  # no third trial
