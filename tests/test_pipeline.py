"""End to end through the real CLI, on a small toy and (when ../shared exists) the physics sample."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import TINY, app_checked_at_exit

RATIO_FILES = {"x", "theta0", "theta1", "y", "r_xz", "t_xz"}


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "results" / "metrics.json").read_text())


def _check_outputs(run_dir: Path, *limit_keys: str) -> dict:
    """Plumbing on TINY runs (2 epochs: no estimator quality to bound, see test_truth / test_correctness):
    every metric is the quantity its name says, recomputed from the arrays the run saved."""
    from app.domain.stats import CL68_P_VALUE

    metrics = _metrics(run_dir)
    results = run_dir / "results"
    assert (run_dir / "model" / "model.json").exists()
    assert np.isfinite(metrics["val_loss"]) and np.isfinite(metrics["train_loss"])
    assert len(metrics["loss_history"]) == metrics["n_epochs_trained"] >= 1
    grid, theta_true = np.load(results / "grid.npy"), np.load(results / "theta_true.npy")
    for key in limit_keys:
        p_values, best_fit = np.load(results / f"p_values_{key}.npy"), np.load(results / f"best_fit_{key}.npy")
        assert p_values.shape == (len(grid),)
        np.testing.assert_array_equal(best_fit, grid[np.argmax(p_values)])  # the best fit has p = 1
        assert p_values.max() == pytest.approx(1.0)
        assert metrics[f"limits_{key}_cl68_fraction"] == pytest.approx(np.mean(p_values > CL68_P_VALUE))
        assert metrics[f"limits_{key}_best_fit_distance"] == pytest.approx(np.linalg.norm(best_fit - theta_true))
        assert (run_dir / "plots" / f"pvalues_{key}.png").exists()
    rate = np.load(results / "fisher_rate.npy")
    assert np.linalg.matrix_rank(rate, tol=1e-9 * np.abs(rate).max()) == 1  # rate information is rank 1
    assert metrics["fisher_rate_eigenvalue"] == pytest.approx(np.trace(rate))
    histo_sigmas = np.sqrt(np.diag(np.linalg.inv(np.load(results / "fisher_histo.npy"))))
    parameters = json.loads((run_dir / "model" / "model.json").read_text())["parameters"]
    for name, sigma in zip(parameters, histo_sigmas):
        assert metrics[f"fisher_histo_sigma_{name}"] == pytest.approx(sigma)
    assert not [k for k in metrics if k.startswith("fisher_") and k.endswith("_det")]
    for plot in ("limits.png", "training_curves.png"):
        assert (run_dir / "plots" / plot).stat().st_size > 1000
    leftovers = [p.name for p in run_dir.iterdir() if ".tmp-" in p.name]
    assert not leftovers, leftovers
    return metrics


@pytest.mark.parametrize(
    "args,limit_keys",
    [
        (["training=alices"], ["rate", "histo", "ml"]),
        (["training=carl", "training.estimator=double_parameterized"], ["ml"]),
        (["training=rascal", "training.estimator=morphing_aware", "training.n_estimators=2"], ["ml"]),
        (["training=sally"], ["sally"]),
        (["training=sallino"], ["sallino"]),
        (["training=nde", "training.n_mades=2"], ["ml"]),
        (["training=scandal", "training.n_mades=2"], ["ml"]),
    ],
    ids=["alices", "carl-double", "rascal-morphing-ensemble", "sally", "sallino", "nde", "scandal"],
)
def test_method_families_end_to_end(run_app, tmp_path, args, limit_keys):
    proc = run_app(*args, *TINY)
    run_dir = tmp_path / "run"
    metrics = _check_outputs(run_dir, *limit_keys)
    assert "objective val_" in proc.out and "stage train" in proc.out and "epoch   1/2" in proc.out
    if "training.n_estimators=2" in args:  # an ensemble's val_*: its mean prediction's; the members' mean apart
        assert metrics["val_loss"] != metrics["val_loss_members_mean"] > 0, metrics
    if "training=sally" in args:
        assert "fisher_full_gain_over_histo" in metrics and (run_dir / "plots" / "score_vs_joint.png").exists()
    if "training=alices" in args:
        assert (run_dir / "plots" / "log_r_vs_joint.png").exists()
        assert RATIO_FILES <= {
            p.name[: -len("_train.npy")] for p in (run_dir / "samples").glob("*_train.npy")
        }


def test_quadratic_morphing_aware_on_one_parameter_toy(run_app, tmp_path):
    # the default priors (one entry: the same prior for each parameter) follow the 1-parameter file
    run_app("training=alices", "training.estimator=quadratic_morphing_aware", *TINY, "data.n_parameters=1")
    metrics = _check_outputs(tmp_path / "run", "ml")
    assert np.load(tmp_path / "run" / "results" / "grid.npy").shape[1] == 1
    assert metrics["limits_ml_cl68_fraction"] > 0
    assert json.loads((tmp_path / "run" / "samples" / "samples.json").read_text())["sampling"]["theta0"]["priors"] == [
        ["flat", -5.0, 5.0]
    ]


def test_stages_run_alone_from_given_inputs(run_app, tmp_path):
    first, second, third, fourth = (tmp_path / n for n in ("s", "t", "e", "p"))
    run_app("stage=sample", *TINY, run_dir=first)
    assert (first / "samples" / "x_train.npy").exists() and not (first / "model").exists()
    run_app("stage=train", *TINY, f"sampling.samples_dir={first}/samples", run_dir=second)
    assert (second / "model" / "model.json").exists() and not (second / "samples").exists()
    assert "val_loss" in _metrics(second)
    run_app("stage=evaluate", *TINY, f"training.model_dir={second}/model", run_dir=third)
    assert "limits_ml_cl68_fraction" in _metrics(third) and not (third / "plots").exists()
    run_app(
        "stage=plot",
        *TINY,
        f"evaluation.results_dir={third}/results",
        f"training.model_dir={second}/model",
        run_dir=fourth,
    )
    assert (fourth / "plots" / "limits.png").exists() and (fourth / "plots" / "training_curves.png").exists()


def test_evaluation_uses_only_test_partition_events(run_app, tmp_path, cache_dir):
    run_app("training=alices", *TINY, "sampling.test_split=0.3", "sampling.validation_split=0.2")
    run_dir = tmp_path / "run"
    toy = json.loads((run_dir / "samples" / "samples.json").read_text())["data_path"]
    with h5py.File(toy, "r") as f:
        events = f["samples/observations"][()].astype(np.float32)  # MadMiner samples in single precision
    n = len(events)
    # MadMiner's partitions: train = first 50 %, validation = next 20 %, test = last 30 %
    train_rows = {tuple(r) for r in events[: int(round(0.5 * n))]}
    test_rows = {tuple(r) for r in events[int(round(0.7 * n)) :]}
    for name in ("test_x", "test_theta0"):
        assert (run_dir / "results" / f"{name}.npy").exists()
    test_x = np.load(run_dir / "results" / "test_x.npy").astype(np.float32)
    assert len(test_x) > 0
    assert all(tuple(r) in test_rows for r in test_x)
    assert not any(tuple(r) in train_rows for r in test_x)
    train_x = np.load(run_dir / "samples" / "x_train.npy").astype(np.float32)
    assert all(tuple(r) in train_rows for r in train_x)


def test_physics_sample_alices_and_sally(run_app, tmp_path, physics_file):
    for method, key in (("alices", "ml"), ("sally", "sally")):
        run_dir = tmp_path / method
        tiny = [a for a in TINY if not a.startswith("data.")]
        run_app(f"training={method}", "data=file", f"data.path={physics_file}", *tiny, run_dir=run_dir)
        _check_outputs(run_dir, "rate", "histo", key)


def test_help_and_cfg_do_not_import_heavy_modules():
    code = app_checked_at_exit("'HEAVY', [m for m in ('torch', 'madminer', 'mlflow') if m in sys.modules]")
    for args in (["--help"], ["--cfg", "job"], ["training=sally", "--cfg", "job"]):
        proc = subprocess.run(
            [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120
        )
        assert "HEAVY []" in proc.stderr, (args, proc.stderr[-2000:])
    help_text = subprocess.run(
        [sys.executable, "-m", "app", "--help"], capture_output=True, text=True, timeout=120
    ).stdout
    for group in ("data:", "sampling:", "training:", "evaluation:", "tracking:"):
        assert group in help_text
    assert "alices" in help_text and "sally" in help_text


@pytest.mark.slow
def test_tracking_disabled_never_imports_mlflow(tmp_path, cache_dir):
    code = app_checked_at_exit("'MLFLOW', 'mlflow' in sys.modules")
    env = dict(__import__("os").environ, MADMINER_SWEEPER_CACHE=str(cache_dir))
    proc = subprocess.run(
        [sys.executable, "-c", code, "stage=sample", *TINY, "tracking=disabled", f"hydra.run.dir={tmp_path}/run"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0 and "MLFLOW False" in proc.stderr, proc.stderr[-3000:]
    assert (tmp_path / "run" / "samples" / "x_train.npy").exists()
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()


def test_progress_is_a_bar_on_a_terminal(tmp_path):
    """On a terminal the per-epoch progress is a tqdm bar (in logs and CI it is one line per epoch)."""
    import fcntl
    import os
    import pty
    import struct
    import termios

    script = tmp_path / "progress.py"
    script.write_text(
        "from app.pipeline import _progress\n"
        "with _progress(3) as on_epoch:\n"
        "    for epoch in (1, 2, 3):\n"
        "        on_epoch(epoch, 3, 1.0, 0.5)\n"
    )
    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen([sys.executable, str(script)], stdin=child, stdout=child, stderr=child, close_fds=True)
    os.close(child)
    out = b""
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    assert proc.wait(timeout=60) == 0
    text = out.decode(errors="replace")
    assert "train: 100%" in text and "3/3" in text and "val=0.5000" in text, text[-2000:]
