"""Faults: a job killed in the middle of a stage, and Ctrl-C in the middle of a sweep.

After ``kill -9`` the same command completes, its results equal a clean run's (same seed), and no partial stage is
ever served from the stage cache. After SIGINT every open MLflow run ends KILLED and the same command resumes the
Optuna study.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY

RUN = [*TINY, "evaluation.fisher.enabled=true", "tracking=disabled"]


def _cmd(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "app", *RUN, *extra, f"hydra.run.dir={run_dir}"]


def _env(cache: Path) -> dict:
    return dict(os.environ, MADMINER_SWEEPER_CACHE=str(cache), PYTHONUNBUFFERED="1")


def _cache(tmp: Path, name: str, toys: Path) -> Path:
    cache = tmp / name
    cache.mkdir()
    toys.mkdir(exist_ok=True)
    (cache / "toy").symlink_to(toys, target_is_directory=True)
    return cache


def _numbers(run_dir: Path) -> dict:
    metrics = json.loads((run_dir / "results" / "metrics.json").read_text())
    return {k: v for k, v in metrics.items() if isinstance(v, float)}


@pytest.mark.slow
@pytest.mark.parametrize("stage,after", [("sample", "stage data "), ("train", "stage sample "),
                                         ("evaluate", "stage train ")])
def test_kill_9_in_a_stage_then_the_same_command_completes(tmp_path, cache_dir, stage, after):
    from app.store import cache as cache_mod

    clean_cache = _cache(tmp_path, "clean", cache_dir / "toy")
    subprocess.run(_cmd(tmp_path / "clean"), cwd=tmp_path, env=_env(clean_cache), check=True, capture_output=True)

    cache = _cache(tmp_path, "killed", cache_dir / "toy")
    proc = subprocess.Popen(_cmd(tmp_path / "run"), cwd=tmp_path, env=_env(cache), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    for line in proc.stdout:  # kill as soon as the stage before has finished: in the middle of `stage`
        if after in line or time.time() > deadline:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    entries = list((cache / "stages").glob("*/*")) if (cache / "stages").exists() else []
    assert all(cache_mod.verify(e) is None for e in entries), entries  # nothing partial in place
    killed_stage = cache / "stages" / stage
    assert not killed_stage.exists() or not any(killed_stage.iterdir()), f"a {stage} entry of the killed run"
    assert not (tmp_path / "run" / {"sample": "samples", "train": "model", "evaluate": "results"}[stage]).exists()

    again = subprocess.run(_cmd(tmp_path / "run"), cwd=tmp_path, env=_env(cache), capture_output=True, text=True)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    clean, resumed = _numbers(tmp_path / "clean"), _numbers(tmp_path / "run")
    assert clean.keys() == resumed.keys()
    for key in clean:
        assert resumed[key] == pytest.approx(clean[key], rel=1e-6, abs=1e-9), key
    np.testing.assert_array_equal(np.load(tmp_path / "clean" / "samples" / "x_train.npy"),
                                  np.load(tmp_path / "run" / "samples" / "x_train.npy"))


@pytest.mark.slow
def test_ctrl_c_in_an_optuna_search_then_the_study_resumes(tmp_path, test_cache):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = [sys.executable, "-m", "app", "-m", "hparams_search=alices_optuna", *TINY, "training.n_epochs=1",
            "tracking=local", f"tracking.uri={uri}"]
    proc = subprocess.Popen([*args, "hydra.sweeper.n_trials=6", f"hydra.sweep.dir={tmp_path}/first"], cwd=tmp_path,
                            env=_env(test_cache),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    for line in proc.stdout:  # interrupt the second trial while it trains
        if "#1 :" in line or time.time() > deadline:
            break
    for line in proc.stdout:
        if "stage sample " in line or time.time() > deadline:
            break
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    assert proc.returncode != 0

    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=uri)
    runs = c.search_runs([c.get_experiment_by_name("madminer-sweeper").experiment_id])
    statuses = {r.data.tags.get("mlflow.runName"): r.info.status for r in runs}
    assert "RUNNING" not in statuses.values(), statuses
    assert "KILLED" in statuses.values(), statuses
    import optuna

    storage = f"sqlite:///{tmp_path}/multirun/optuna.db"
    states = [t.state.name for t in optuna.load_study(study_name="alices-optuna", storage=storage).trials]
    assert "RUNNING" not in states and "FAIL" in states, states  # the interrupted trial is not left RUNNING

    again = subprocess.run([*args, "hydra.sweeper.n_trials=1", f"hydra.sweep.dir={tmp_path}/second"], cwd=tmp_path,
                           env=_env(test_cache),
                           capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    study = optuna.load_study(study_name="alices-optuna", storage=storage)
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(complete) == 2  # the first trial of the interrupted invocation and the resumed one
