"""Against a real SLURM cluster (`workflow/slurm/local-cluster.sh` starts a one-node one; CI's `slurm` tier): a grid
through hydra/launcher=slurm as one job array, an Optuna study fed by SLURM tasks, and a job that SLURM ends while the
others finish. Skipped, with one reason, where `sinfo` does not answer."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY

pytestmark = pytest.mark.slurm

# the preset's one-node values (conf/hydra/launcher/slurm.yaml): the one-node cluster has 2 CPUs in CI
ONE_NODE = ["hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1",
            "hydra.launcher.timeout_min=10", "hydra.launcher.array_parallelism=2"]
QUICK = [*TINY, "training.n_epochs=1", "evaluation.fisher.enabled=false"]
NO_SLURM = "no SLURM: sinfo does not answer with a node that is up (workflow/slurm/local-cluster.sh starts one)"


@pytest.fixture(scope="module")
def slurm():
    if shutil.which("sinfo") is None:
        pytest.skip(NO_SLURM)
    try:
        states = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=20).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        states = []
    if not any(s.rstrip("*~#!%$@^-") in ("idle", "mix", "alloc") for s in states):
        pytest.skip(NO_SLURM)


def _env(test_cache: Path, mlflow_server: str) -> dict:
    return dict(os.environ, MADMINER_SWEEPER_CACHE=str(test_cache), MLFLOW_TRACKING_URI=mlflow_server,
                PYTHONUNBUFFERED="1")


def _runs(uri: str):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=uri)
    runs = c.search_runs([c.get_experiment_by_name("madminer-sweeper").experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = sorted((r for r in runs if "mlflow.parentRunId" in r.data.tags), key=lambda r: r.data.tags["job.num"])
    return parents, children


def test_a_grid_runs_as_one_slurm_job_array(slurm, tmp_path, test_cache, mlflow_server):
    sweep = tmp_path / "sw"
    proc = subprocess.run([sys.executable, "-m", "app", "-m", *QUICK, *ONE_NODE, "sampling.seed=1,2", "tracking=server",
                           f"hydra.sweep.dir={sweep}"], cwd=tmp_path, env=_env(test_cache, mlflow_server),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "sweep: 2 jobs: 2 finished, 0 failed" in proc.stdout
    # one array, each job one of its tasks (submitit's folder per SLURM job id: <array>_<index>)
    tasks = sorted(p.name for p in (sweep / ".submitit").iterdir() if re.fullmatch(r"\d+_\d+", p.name))
    array = tasks[0].split("_")[0]
    assert tasks == [f"{array}_0", f"{array}_1"]
    parents, children = _runs(mlflow_server)
    assert len(parents) == 1 and [c.data.tags["job.num"] for c in children] == ["0", "1"]
    assert [r.info.status for r in parents + children] == ["FINISHED"] * 3
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert all("val_improved_xe" in c.data.metrics for c in children)


def test_a_job_that_slurm_ends_is_one_failed_child_while_the_others_finish(slurm, tmp_path, test_cache,
                                                                           mlflow_server):
    """Job 1 trains for ever; once its MLflow run exists, `scancel` ends it (SIGTERM, then SIGKILL: it never runs
    its end). The launcher reads its end from squeue, the sweep goes on, and the parent closes its run FAILED."""
    sweep = tmp_path / "sw"
    sweeper = subprocess.Popen(
        [sys.executable, "-m", "app", "-m", *QUICK, *ONE_NODE, "training.n_epochs=1,100000", "tracking=server",
         f"hydra.sweep.dir={sweep}"], cwd=tmp_path, env=_env(test_cache, mlflow_server),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 600
        while "mlflow_run_id" not in _text(sweep / "1" / "run.json"):  # the job's run exists: it trains
            assert time.monotonic() < deadline and sweeper.poll() is None, _text(sweep / "1" / "run.json")
            time.sleep(1)
        (job,) = [p.name for p in (sweep / ".submitit").iterdir() if re.fullmatch(r"\d+_1", p.name)]
        subprocess.run(["scancel", job], check=True, timeout=60)
        out, err = sweeper.communicate(timeout=600)
    finally:
        if sweeper.poll() is None:
            sweeper.kill()
    assert sweeper.returncode == 1, (out + err)[-4000:]
    assert "sweep: 2 jobs: 1 finished, 1 failed" in out
    failed = [line for line in err.splitlines() if line.startswith("failed:")]
    assert len(failed) == 1 and failed[0].startswith(
        f"failed: job 1 [training.n_epochs=100000]: SlurmJobEnded: SLURM ended job {job} (CANCELLED"), err[-3000:]
    parents, children = _runs(mlflow_server)
    assert [r.info.status for r in parents] == ["FINISHED"]
    assert [c.info.status for c in children] == ["FINISHED", "FAILED"]
    assert children[1].data.tags["error"].startswith(f"SlurmJobEnded: SLURM ended job {job} (CANCELLED")


def test_ctrl_c_of_a_slurm_sweep_cancels_its_jobs(slurm, tmp_path, test_cache):
    """Ctrl-C in the sweep's terminal while its array trains: the array is cancelled (nothing keeps running on the
    cluster for a sweep that is gone), one line says so, and the command ends non-zero."""
    import signal

    sweep = tmp_path / "sw"
    env = dict(os.environ, MADMINER_SWEEPER_CACHE=str(test_cache), PYTHONUNBUFFERED="1")
    sweeper = subprocess.Popen(
        [sys.executable, "-m", "app", "-m", *QUICK, *ONE_NODE, "training.n_epochs=100000,100001", "tracking=disabled",
         f"hydra.sweep.dir={sweep}"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline, states, array = time.monotonic() + 600, [], None
        while states.count("RUNNING") < 2 or not all(_trains(sweep / f"{i}") for i in (0, 1)):
            assert time.monotonic() < deadline and sweeper.poll() is None, states
            time.sleep(1)
            tasks = [p.name for p in (sweep / ".submitit").glob("*_*") if re.fullmatch(r"\d+_\d+", p.name)]
            if tasks:
                array = tasks[0].split("_")[0]
                states = _squeue(array)
        sweeper.send_signal(signal.SIGINT)
        out, err = sweeper.communicate(timeout=120)
    finally:
        if sweeper.poll() is None:
            sweeper.kill()
    assert sweeper.returncode == -signal.SIGINT and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == "interrupted (Ctrl-C)"
    assert f"interrupted: cancelled SLURM job array {array} (2 of its 2 job(s) had not returned)" in out + err
    deadline = time.monotonic() + 60
    while set(_squeue(array)) & {"RUNNING", "PENDING", "COMPLETING"}:  # SLURM ends the tasks within seconds
        assert time.monotonic() < deadline, _squeue(array)
        time.sleep(1)
    assert set(_squeue(array)) <= {"CANCELLED"}


def _trains(job_dir: Path) -> bool:
    return any("epoch" in _text(log) for log in job_dir.glob("*.log"))


def _squeue(array: str) -> list[str]:
    done = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-j", array, "-o", "%T"], capture_output=True, text=True,
                          timeout=60)
    return done.stdout.split()


def _query(url: str, sql: str) -> list[tuple]:
    import psycopg2

    with psycopg2.connect(url) as db, db.cursor() as cursor:
        cursor.execute(sql)
        return cursor.fetchall()


def _text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def worker_command(storage: str, study: str, n_trials: int) -> str:
    """One SLURM task's sweep: an Optuna search on the shared study whose ``n_trials`` counts the study's trials from
    every worker (``n_trials_scope=study``), its seed and folder from its task id."""
    fixed = [sys.executable, "-m", "app", "-m", "hparams_search=alices_optuna", *QUICK,
             f"hydra.sweeper.n_trials={n_trials}", "hydra.sweeper.n_trials_scope=study",
             f"hydra.sweeper.storage={storage}", f"hydra.sweeper.study_name={study}", "tracking=server"]
    return " ".join(map(shlex.quote, fixed)) + \
        " hydra.sweeper.sampler.seed=$SLURM_ARRAY_TASK_ID hydra.sweep.dir=worker-$SLURM_ARRAY_TASK_ID"


def test_slurm_tasks_feed_one_optuna_study(slurm, tmp_path, test_cache, postgres_db, mlflow_server):
    """Two SLURM tasks (one job array), each a `python -m app -m hparams_search=... hydra.sweeper.n_trials_scope=study`
    on one PostgreSQL study: n_trials complete trials over both workers, none lost or doubled."""
    storage, study, workers, n_trials = postgres_db("optuna_test"), "slurm-study", 2, 4
    subprocess.run([str(Path(sys.executable).parent / "optuna"), "create-study", "--storage", storage, "--study-name",
                    study, "--direction", "minimize", "--skip-if-exists"], check=True, capture_output=True)
    done = subprocess.run(["sbatch", "--wait", f"--array=0-{workers - 1}", "--cpus-per-task=1", "--mem=1G",
                           "--time=15", f"--chdir={tmp_path}", f"--output={tmp_path}/worker-%a.out",
                           "--wrap", worker_command(storage, study, n_trials)],
                          env=_env(test_cache, mlflow_server), capture_output=True, text=True, timeout=1200)
    logs = [_text(tmp_path / f"worker-{i}.out")[-2000:] for i in range(workers)]
    assert done.returncode == 0, (done.stderr, logs)
    import optuna

    trials = optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=False)
    assert [t.state.name for t in trials] == ["COMPLETE"] * n_trials, logs
    assert sorted(t.number for t in trials) == list(range(n_trials))
    # in the database itself: one row per trial id, each with its own number and its own parameter set
    rows = _query(storage, "SELECT t.trial_id, t.number, p.param_name, p.param_value FROM trials t JOIN studies s "
                           "ON s.study_id = t.study_id LEFT JOIN trial_params p ON p.trial_id = t.trial_id "
                           f"WHERE s.study_name = '{study}'")
    numbers, params = {}, {}
    for trial_id, number, name, value in rows:
        numbers[trial_id] = number
        params.setdefault(trial_id, set()).add((name, value))
    assert len(numbers) == len(set(numbers.values())) == n_trials
    assert len({frozenset(p) for p in params.values()}) == n_trials
    parents, children = _runs(mlflow_server)
    assert len(parents) == workers and len(children) == n_trials
    assert all(r.info.status == "FINISHED" for r in parents + children)
    assert {c.data.tags["mlflow.parentRunId"] for c in children} <= {p.info.run_id for p in parents}
