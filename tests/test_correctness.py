"""Every method, estimator, mode and metric does what its name says (issue 8).

Bounds on the toy are measured over seeds (see docs/toy.md, "Bounds used by the tests"): trained
estimators meet them, untrained or mis-wired ones do not.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import REPO, TINY
from omegaconf import OmegaConf

from app.toy import simulator

# Evaluation settings of the measured end-to-end runs (default toy, default training, a smaller grid).
EVAL = ["evaluation.grid.resolutions=11", "evaluation.n_test_samples=300"]
AWAY = [3.0, -2.0]  # a point away from the SM (and the origin) for theta_true / the score's training point
NDE_ENSEMBLE = ["training.n_estimators=2", "training.n_epochs=10", "sampling.n_samples=5000", "training.n_mades=2"]
# One NDE whose MADEs have 4-component Gaussian-mixture conditionals, every setting that matters pinned
NDE_MIXTURE = [
    "sampling.theta={type: random_morphing_points, n: 20, priors: [[flat, -10.0, 10.0]]}",
    "sampling.n_samples=10000", "sampling.n_validation_samples=2500",
    "training.n_estimators=1", "training.n_mades=2", "training.n_components=4", "training.n_hidden=[50,50]",
    "training.n_epochs=20", "training.batch_size=128", "training.initial_lr=0.001", "training.final_lr=0.0001",
    "training.early_stopping=true", "evaluation.modes=[ml]", "evaluation.fisher.enabled=false",
]

# The double-parameterized run, every setting that matters pinned (not the defaults, which change): 200 theta0
# points (theta1 drawn like them), 20 000 samples, 30 epochs; only the ml limits (the ones that use it)
DOUBLE = [
    "sampling.theta0={type: random_morphing_points, n: 200, priors: [[flat, -10.0, 10.0]]}",
    "sampling.theta1={type: benchmark, name: sm}",
    "sampling.n_samples=20000", "sampling.n_validation_samples=5000",
    "training.n_epochs=30", "training.n_hidden=[50,50]", "training.batch_size=128", "training.initial_lr=0.001",
    "training.final_lr=0.0001", "training.early_stopping=true",
    "evaluation.modes=[ml]", "evaluation.fisher.enabled=false",
]

# Bounds, measured over seeds 1-3 (docs/toy.md)
# DOUBLE at theta_true = theta_ref = AWAY, truth_log_r_corr: trained 0.80-0.83; untrained (torch seeds 0-2 on each
# run) -0.22-0.16; before the theta-scaling fix of issue 19 (raw theta into a network trained on scaled theta)
# 0.54-0.70 (0.59 on seed 1); trained at theta1 = sm only (the code before issue 8's fix; seed 1) -0.03
DOUBLE_LOG_R_CORR_MIN = 0.75
# truth_log_r_mse: trained 1.30-1.33 (seeds 1-3 on the former draws), 1.48, 1.45, 1.28, 1.33 (seeds 1-4 with each
# theta set drawn from its own seed); untrained 1.62-1.84 (1.75-1.84 on the seed-1 run the test checks); before the
# theta-scaling fix 1.05-1.40; theta1 = sm only (seed 1) 2.85
DOUBLE_LOG_R_MSE_MAX = 1.56
SALLY_ENSEMBLE_SCORE_MSE_MAX = 0.005  # 2 SALLY members: trained 0.0013-0.0017; untrained 0.172-0.242
SALLY_ENSEMBLE_IOU_MIN = 0.70  # truth_limits_sally_iou: trained 0.824-0.853
# adaptive SALLY at theta_true = thetaref = sm: 68% CL IoU 0.00-0.02 for trained and untrained networks alike (its
# h = t.(theta - thetaref) vanishes there, as SALLINO's); best fit from the true one: trained 0.84-0.94 (seeds 1-3),
# untrained (torch seeds 0-1 on the seed-1 and seed-2 runs) 1.47-1.70 (grid spacing 1.0)
ADAPTIVE_SALLY_BEST_FIT_DISTANCE_MAX = 1.2
# NDE_ENSEMBLE (2 light NDE members), truth_log_r_mse: trained 0.625-0.665; untrained (torch seeds 0-2 on each run)
# 0.75-1.11 (0.88-1.01 on the seed-1 run the test checks); before the theta-scaling fix of issue 19 0.705-0.772.
# truth_log_r_corr: trained 0.46-0.52; untrained -0.36-0.32; before the fix 0.35 (seed 1)
NDE_ENSEMBLE_LOG_R_MSE_MAX = 0.71
NDE_ENSEMBLE_LOG_R_CORR_MIN = 0.40
# NDE_MIXTURE, truth_log_likelihood_gap at theta_true = sm: trained 0.15-0.31; untrained (torch seeds 0-2 on each run)
# 0.50-1.54 (0.50-1.54 on the seed-1 run the test checks). Without the mixtures (NDE_ENSEMBLE) trained 0.27-0.37
# overlaps untrained 0.30-0.59. Its truth_log_r_mse: trained 0.575-0.598; untrained 0.82-1.09; before the
# theta-scaling fix 1.13 (seed 1)
NDE_MIXTURE_LOG_R_MSE_MAX = 0.70
NDE_GAP_MAX = 0.42


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "results" / "metrics.json").read_text())


def _seeded(seed: int) -> list[str]:
    return [f"seed={seed}", f"sampling.seed={seed}"]


def _untrained(model_dir: Path, seed: int):
    """The trained model's members, re-initialised (the same networks before training)."""
    import torch

    from app.ml import estimators

    estimator = estimators.load(model_dir)
    torch.manual_seed(seed)
    for member in estimators.members(estimator):
        member._create_model()  # a fresh network of the same architecture (input scaling kept)
    return estimator


def _untrained_limits(run_dir: Path, target: Path, seed: int, overrides: list[str]) -> dict:
    """The evaluate stage's limits (and their truth metrics) for the run's model re-initialised, saved in ``target``."""
    from app.domain import datafile
    from app.domain.methods import METHODS
    from app.evaluation.limits import expected_limits
    from app.ml import estimators, madminer_patches
    from app.store.files import read_json
    from app.toy.truth import ToyTruth
    from app.workflow import compose

    shutil.copytree(run_dir / "model", target)
    meta = read_json(target / "model.json")
    members = estimators.members(_untrained(target, seed))
    for i, member in enumerate(members):
        name = target / meta["model_name"]
        member.save(str(name / f"estimator_{i}" if len(members) > 1 else name))
    madminer_patches.apply_numpy_shim()
    cfg = compose([*overrides, "tracking=disabled"])
    info = datafile.inspect(Path(json.loads((run_dir / "run.json").read_text())["data_path"]), is_toy=True)
    out = target.parent / f"{target.name}-results"
    out.mkdir()
    np.random.seed(cfg.sampling.seed + 1)
    model_file = target / meta["model_name"]
    with madminer_patches.estimators_loaded_by(lambda _file: estimators.load(model_file.parent)):
        truth = ToyTruth.from_file(info.path)
        found = expected_limits(cfg, METHODS[cfg.training.method], info, model_file, out, truth)
    return {k.replace("LimitMode.", ""): v for k, v in found.items()}  # the composed config holds enums


@pytest.fixture(scope="module")
def toy_path(tmp_path_factory) -> Path:
    return simulator.ensure_toy_file(simulator.ToySettings(n_events=4000), tmp_path_factory.mktemp("toy"))


def _copy(path: Path, tmp_path: Path, name: str = "events.h5") -> Path:
    target = tmp_path / name
    shutil.copy(path, target)
    return target


def _cfg(**evaluation) -> OmegaConf:
    ev = {"theta_true": None, "grid": {"ranges": None, "resolutions": 5}, **evaluation}
    return OmegaConf.create({"evaluation": ev})


# --------------------------------------------------------------------------- item 8: one source of names
def test_estimator_and_mode_names_come_from_the_methods_table():
    from app import config
    from app.domain import methods
    from app.ml import estimators

    assert [e.value for e in config.EstimatorKind] == list(methods.ESTIMATORS)
    assert [m.value for m in config.LimitMode] == list(methods.LIMIT_MODES)
    assert estimators.CLASSES is methods.ESTIMATORS
    for method in methods.METHODS.values():
        assert set(method.estimators) <= set(methods.ESTIMATORS), method
        assert method.limit_mode in methods.LIMIT_MODES
    assert set(methods.MODEL_MODES) | {"rate", "histo"} == set(methods.LIMIT_MODES)
    assert methods.LIMIT_MODES["adaptive_sally"] == "adaptive-sally"  # MadMiner's spelling
    import madminer.ml

    for cls in methods.ESTIMATORS.values():
        assert hasattr(madminer.ml, cls), cls


# ---------------------------------------------------------------- item 1 + 9: score ensembles, adaptive SALLY
@pytest.mark.slow
def test_score_ensemble_with_adaptive_sally_meets_the_truth_bounds(run_app, tmp_path):
    proc = run_app(
        "training=sally", "training.n_estimators=2", "evaluation.modes=[rate,sally,adaptive_sally]", *EVAL,
        *_seeded(1),
    )
    run_dir = tmp_path / "run"
    m = _metrics(run_dir)
    assert m["truth_score_mse"] < SALLY_ENSEMBLE_SCORE_MSE_MAX, m["truth_score_mse"]
    assert 0 < m["truth_score_mse_ensemble_std"] < m["truth_score_mse"], m
    assert 0 < m["test_score_mse_vs_joint_ensemble_std"] < m["test_score_mse_vs_joint"]
    assert m["truth_limits_sally_iou"] > SALLY_ENSEMBLE_IOU_MIN, m["truth_limits_sally_iou"]
    distance = m["truth_limits_adaptive_sally_best_fit_distance"]
    assert distance < ADAPTIVE_SALLY_BEST_FIT_DISTANCE_MAX, distance
    assert (run_dir / "results" / "p_values_adaptive_sally.npy").exists()
    assert (run_dir / "model" / "ensemble").is_dir()
    assert "Assuming thetaref" not in proc.out  # MadMiner's fallback to the origin

    # the registry's pyfunc wrapper returns the ensemble's mean score, one column per parameter
    import pandas as pd

    from app.ml import estimators
    from app.tracking.registry import MadMinerEstimator

    x = np.load(run_dir / "results" / "test_score_x.npy")
    wrapper = MadMinerEstimator()
    wrapper.load_context(type("Context", (), {"artifacts": {"model_dir": str(run_dir / "model")}})())
    frame = pd.DataFrame(np.hstack([x, np.zeros((len(x), 2))]), columns=["pt_j1", "delta_phi_jj", "CWL2", "CPWL2"])
    out = wrapper.predict(None, frame)
    assert list(out.columns) == ["t_CWL2", "t_CPWL2"]
    np.testing.assert_allclose(out.to_numpy(), np.load(run_dir / "results" / "test_score_est.npy"), rtol=1e-5)
    members = [np.asarray(e.evaluate_score(x=x)) for e in estimators.load(run_dir / "model").estimators]
    assert np.max(np.abs(members[0] - members[1])) > 1e-3  # the members differ: the mean is not one of them

    # the same networks untrained miss the bound
    from app.evaluation.truth_metrics import truth_score_metrics
    from app.toy.truth import ToyTruth

    for seed in range(2):
        untrained = estimators.score(_untrained(run_dir / "model", seed), x)
        m = truth_score_metrics(untrained, ToyTruth(0.5, 2), x, np.zeros(2))
        assert m["truth_score_mse"] > SALLY_ENSEMBLE_SCORE_MSE_MAX, m
    # and their adaptive-SALLY limits miss the best-fit bound
    for seed in range(2):
        u = _untrained_limits(run_dir, tmp_path / f"untrained{seed}", seed, [
            "training=sally", "training.n_estimators=2", "evaluation.modes=[adaptive_sally]", *EVAL, *_seeded(1)])
        distance = u["truth_limits_adaptive_sally_best_fit_distance"]
        assert distance > ADAPTIVE_SALLY_BEST_FIT_DISTANCE_MAX, distance


def _untrained_density_metrics(run_dir: Path, seed: int) -> dict:
    """The truth metrics of the run's density networks re-initialised with ``seed``, on the run's test events."""
    from app.evaluation.truth_metrics import truth_density_metrics
    from app.toy.truth import ToyTruth

    x, grid = np.load(run_dir / "results" / "test_x.npy"), np.load(run_dir / "results" / "grid.npy")
    return truth_density_metrics(_untrained(run_dir / "model", seed), ToyTruth(0.5, 2), x, grid, np.zeros(2), {})


@pytest.mark.slow
def test_density_ensemble_meets_the_truth_bound(run_app, tmp_path):
    run_app("training=nde", *NDE_ENSEMBLE, *EVAL, *_seeded(1))
    run_dir = tmp_path / "run"
    m = _metrics(run_dir)
    assert m["truth_log_r_mse"] < NDE_ENSEMBLE_LOG_R_MSE_MAX, m["truth_log_r_mse"]
    assert m["truth_log_r_corr"] > NDE_ENSEMBLE_LOG_R_CORR_MIN, m["truth_log_r_corr"]
    for key in ("truth_log_r_mse", "truth_log_likelihood_gap", "test_mean_log_likelihood"):
        assert m[f"{key}_ensemble_std"] > 0, key
    assert m["truth_log_r_mse_ensemble_std"] < m["truth_log_r_mse"]
    # the same networks untrained miss the bound (their log-likelihood gap does not separate: docs/toy.md)
    for seed in range(2):
        u = _untrained_density_metrics(run_dir, seed)
        assert u["truth_log_r_mse"] > NDE_ENSEMBLE_LOG_R_MSE_MAX, u
        assert u["truth_log_r_corr"] < NDE_ENSEMBLE_LOG_R_CORR_MIN, u


@pytest.mark.slow
def test_density_with_gaussian_mixtures_meets_the_likelihood_gap_bound(run_app, tmp_path):
    """truth_log_likelihood_gap (a Monte Carlo KL(p || p_hat)) separates trained from untrained flows once each MADE
    has Gaussian-mixture conditionals: a plain MADE stack is affine in the first observable, so its best fit of the
    skewed pt_j1 marginal is no better than the untrained flow's standard normal in scaled inputs (docs/toy.md)."""
    run_app("training=nde", *NDE_MIXTURE, *EVAL, *_seeded(1))
    run_dir = tmp_path / "run"
    m = _metrics(run_dir)
    assert m["truth_log_likelihood_gap"] < NDE_GAP_MAX, m["truth_log_likelihood_gap"]
    assert m["truth_log_r_mse"] < NDE_MIXTURE_LOG_R_MSE_MAX, m["truth_log_r_mse"]
    for seed in range(2):
        u = _untrained_density_metrics(run_dir, seed)
        assert u["truth_log_likelihood_gap"] > NDE_GAP_MAX, u
        assert u["truth_log_r_mse"] > NDE_MIXTURE_LOG_R_MSE_MAX, u


# --------------------------------------------------------------------------- item 2: double-parameterized
@pytest.mark.slow
def test_double_parameterized_learns_varying_theta1_away_from_the_sm(run_app, tmp_path):
    from app.evaluation.truth_metrics import truth_log_r_metrics
    from app.toy.truth import ToyTruth

    proc = run_app(
        "training=alices", "training.estimator=double_parameterized", f"evaluation.theta_true=[{AWAY[0]},{AWAY[1]}]",
        *DOUBLE, *EVAL, *_seeded(1),
    )
    run_dir = tmp_path / "run"
    assert "theta1 is drawn like theta0" in proc.out
    theta1 = np.load(run_dir / "samples" / "theta1_train.npy")
    assert len(np.unique(theta1.round(6), axis=0)) > 100  # theta1 drawn like theta0 (200 points), not only the SM
    m = _metrics(run_dir)
    np.testing.assert_allclose(np.load(run_dir / "results" / "truth_reference.npy"), AWAY)  # as the ml limits
    assert m["truth_log_r_corr"] > DOUBLE_LOG_R_CORR_MIN, m["truth_log_r_corr"]
    assert m["truth_log_r_mse"] < DOUBLE_LOG_R_MSE_MAX, m["truth_log_r_mse"]
    # the same network untrained misses both (trained at theta1 = sm only, the code before the fix, too: docs/toy.md)
    x, grid = np.load(run_dir / "results" / "test_x.npy"), np.load(run_dir / "results" / "grid.npy")
    for seed in range(2):
        u = truth_log_r_metrics(_untrained(run_dir / "model", seed), ToyTruth(0.5, 2), x, grid, np.asarray(AWAY), {})
        assert u["truth_log_r_corr"] < DOUBLE_LOG_R_CORR_MIN and u["truth_log_r_mse"] > DOUBLE_LOG_R_MSE_MAX, u


# --------------------------------------------------------------------------- item 3: thetaref
def test_sallino_uses_the_training_point_as_thetaref(run_app, tmp_path, monkeypatch):
    from app.domain import theta

    info = type("Info", (), {"n_parameters": 2})()
    cfg = OmegaConf.create({"sampling": {"theta": {"type": "morphing_point", "values": AWAY}}})
    np.testing.assert_array_equal(theta.training_point(cfg, info), AWAY)

    proc = run_app(
        "training=sallino", f"sampling.theta={{type: morphing_point, values: [{AWAY[0]}, {AWAY[1]}]}}",
        "evaluation.modes=[sallino,adaptive_sally]", *TINY,
    )
    assert "Assuming thetaref" not in proc.out  # today's code: MadMiner warns and uses the origin
    assert "limits sallino" in proc.out and "limits adaptive_sally" in proc.out


# --------------------------------------------------------------------------- item 4: Fisher information
def test_fisher_metrics_mean_something(caplog):
    from app.evaluation.fisher import fisher_metrics

    gradient = np.array([2.0, 1.0])
    rate = np.outer(gradient, gradient)  # rank 1, as MadMiner's rate information always is
    histo = np.array([[4.0, 1.0], [1.0, 2.0]])
    full = np.array([[9.0, 1.0], [1.0, 8.0]])
    with caplog.at_level(logging.INFO, logger="app.evaluation.fisher"):
        m = fisher_metrics({"rate": rate, "histo": histo, "full": full}, ["A", "B"])
    assert m["fisher_rate_eigenvalue"] == pytest.approx(5.0)
    assert m["fisher_histo_sigma_A"] == pytest.approx(np.sqrt(2 / 7))  # inv(histo) = [[2, -1], [-1, 4]] / 7
    assert m["fisher_histo_sigma_B"] == pytest.approx(np.sqrt(4 / 7))
    assert m["fisher_full_gain_over_histo"] == pytest.approx(0.5 * np.log(71 / 7))
    assert not [k for k in m if k.endswith("_det")]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="app.evaluation.fisher"):
        m = fisher_metrics({"rate": rate, "histo": rate, "full": full}, ["A", "B"])
    assert "fisher_histo_sigma_A" not in m and "fisher_full_gain_over_histo" not in m
    assert "fisher_full_sigma_A" in m
    assert any("histo Fisher matrix is singular" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- item 5: theta_true and the grid
def test_theta_true_null_is_the_sm_benchmark_and_the_grid_follows_the_file(toy_path, tmp_path, caplog):
    from app.domain import datafile, theta
    from app.errors import UserError

    info = datafile.inspect(toy_path, is_toy=True)
    assert theta.grid_ranges(_cfg(), info) == [(-5.0, 5.0), (-5.0, 5.0)]  # half the stored ranges

    moved = _copy(toy_path, tmp_path)
    with h5py.File(moved, "a") as f:
        names = [n.decode() for n in f["benchmarks/names"][()]]
        values = f["benchmarks/values"][()]
        values[names.index("sm")] = [1.0, -0.5]
        f["benchmarks/values"][...] = values
        del f["parameters/val_ranges"]
    info = datafile.inspect(moved)
    np.testing.assert_array_equal(theta.theta_true(_cfg(), info), [1.0, -0.5])
    assert "the file's 'sm' benchmark" in theta.describe_theta_true(_cfg(), info)
    np.testing.assert_array_equal(theta.theta_true(_cfg(theta_true=[2, 3]), info), [2.0, 3.0])
    # no stored ranges: the benchmarks' span, not a silent +-0.5
    spans = theta.grid_ranges(_cfg(), info)
    assert spans == [(float(values[:, 0].min()), float(values[:, 0].max())),
                     (float(values[:, 1].min()), float(values[:, 1].max()))]
    assert spans[0][1] - spans[0][0] > 10

    renamed = _copy(toy_path, tmp_path, "renamed.h5")
    with h5py.File(renamed, "a") as f:
        f["benchmarks/names"][...] = [n.replace(b"sm", b"ref") for n in f["benchmarks/names"][()]]
        del f["parameters/val_ranges"]
        values = f["benchmarks/values"][()]
        values[:, 1] = 0.0  # the benchmarks do not span the second parameter
        f["benchmarks/values"][...] = values
    info = datafile.inspect(renamed)
    np.testing.assert_array_equal(theta.theta_true(_cfg(), info), [0.0, 0.0])
    assert "the origin: the file has no 'sm' benchmark" in theta.describe_theta_true(_cfg(), info)
    with pytest.raises(UserError, match=r"set evaluation.grid.ranges .*CPWL2"):
        theta.grid_ranges(_cfg(), info)


def test_grid_without_ranges_is_a_one_line_error_before_any_work(run_app, tmp_path, toy_path):
    path = _copy(toy_path, tmp_path)
    with h5py.File(path, "a") as f:
        del f["parameters/val_ranges"]
        values = f["benchmarks/values"][()]
        values[:, 1] = 0.0
        f["benchmarks/values"][...] = values
    tiny = [a for a in TINY if not a.startswith("data.")]
    proc = run_app("data=file", f"data.path={path}", *tiny, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "evaluation.grid.ranges" in proc.stderr
    assert "Traceback" not in proc.out and not (tmp_path / "run" / "samples").exists()


# --------------------------------------------------------------------------- item 6: statistics warnings
def test_expected_events_and_oversampling_are_reported(toy_path, caplog):
    from madminer.limits import AsymptoticLimits

    from app.domain import datafile
    from app.evaluation.limits import log_expected_events
    from app.stages import sample

    limits = AsymptoticLimits(str(toy_path))
    cfg = OmegaConf.create({"evaluation": {"luminosity": 1000.0}})
    with caplog.at_level(logging.INFO):
        log_expected_events(cfg, limits, np.zeros(2))
    text = " ".join(r.getMessage() for r in caplog.records)
    n = float(text.split("expected events at theta_true: ")[1].split()[0])
    assert n == pytest.approx(1000.0 * simulator.SIGMA_SM, rel=0.1)  # L [pb^-1] x sigma [pb]
    assert "only" in text and "events expected at theta_true" in text and "pb^-1" in text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        log_expected_events(OmegaConf.create({"evaluation": {"luminosity": 1e5}}), limits, np.zeros(2))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]

    info = datafile.inspect(toy_path)
    s = OmegaConf.create({"sampling": {"test_split": 0.2, "validation_split": 0.2}})
    caplog.clear()
    with caplog.at_level(logging.INFO):
        sample.warn_if_oversampled(s, info, 2400, 2000.0)  # 4000 x 0.6 = 2400 distinct events
        assert not caplog.records
        sample.warn_if_oversampled(s, info, 10_000, 1234.0)
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert "exceeds the 2400 distinct events" in record.getMessage() and "effective sample size 1234" in (
        record.getMessage()
    )


def test_oversampling_warning_on_the_cli(run_app, tmp_path):
    proc = run_app("stage=sample", *TINY, "sampling.n_samples=3000")  # 4000 toy events, 2400 in the train partition
    assert "sampling.n_samples=3000 exceeds the 2400 distinct events" in proc.out


# --------------------------------------------------------------------------- item 7: device
def test_device_choice_is_honoured_and_restored(monkeypatch, tmp_path):
    import torch
    from madminer.ml import ParameterizedRatioEstimator
    from madminer.utils.ml.trainer import Trainer

    from app.ml import device
    from app.ml.batched import model_log_r_grid

    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    original = Trainer.__init__
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # pretend a GPU is visible
    estimator = ParameterizedRatioEstimator(n_hidden=(4,))
    estimator.n_observables, estimator.n_parameters = 2, 2
    estimator._create_model()
    x = np.random.default_rng(0).normal(size=(50, 2))
    with device.use("cpu") as name:
        assert name == "cpu"
        assert Trainer(estimator.model, n_workers=0).device == torch.device("cpu")
        # the batched evaluation runs where it is told (the evaluate stage passes the name device.use yields)
        assert model_log_r_grid(estimator, x, np.zeros((3, 2)), np.zeros(2), name).shape == (3, 50)
        assert next(estimator.model.parameters()).device == torch.device("cpu")
    assert Trainer.__init__ is original
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == before  # nothing leaks into later jobs
    assert device.resolve("auto") == "cuda"


def test_cuda_without_a_gpu_fails_before_sampling(run_app, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    proc = run_app("training.device=cuda", *TINY, check=False)
    assert proc.returncode == 2
    assert "error: training.device=cuda but torch sees no CUDA device" in proc.stderr
    assert "Traceback" not in proc.out and not (tmp_path / "run" / "samples").exists()


# --------------------------------------------------------------------------- item 10: nuisance parameters
NUISANCE = ["data.nuisance=true", "sampling.include_nuisance=true"]


def test_nuisance_toy_is_madminer_nuisance_setup(tmp_path):
    """The variant's nuisance parameter is read by MadMiner's own machinery as written (app.toy.simulator docstring)."""
    from madminer.sampling import SampleAugmenter, benchmark

    plain = simulator.ToySettings(n_events=4000)
    varied = simulator.ToySettings(n_events=4000, nuisance=True)
    assert simulator.settings_key(plain) != simulator.settings_key(varied)
    assert simulator.toy_file_path(plain, tmp_path) != simulator.toy_file_path(varied, tmp_path)
    path, plain_path = simulator.ensure_toy_file(varied, tmp_path), simulator.ensure_toy_file(plain, tmp_path)
    with h5py.File(path, "r") as f, h5py.File(plain_path, "r") as g:
        names = [n.decode() for n in f["benchmarks/names"][()]]
        assert names[6:] == list(simulator.NUISANCE_BENCHMARKS)
        assert f["benchmarks/is_nuisance"][()].tolist() == [0] * 6 + [1, 1]
        assert [n.decode() for n in f["nuisance_parameters/names"][()]] == [simulator.NUISANCE_PARAMETER]
        assert f["samples/weights"].shape == (4000, 8)
        # the physics part is the plain toy's (same events, same weights): its truth holds at nu = 0
        np.testing.assert_array_equal(f["samples/weights"][:, :6], g["samples/weights"][()])
        np.testing.assert_array_equal(f["samples/observations"][()], g["samples/observations"][()])
        assert "nuisance_parameters" not in g
    augmenter = SampleAugmenter(str(path), include_nuisance_parameters=True)
    assert augmenter.n_nuisance_parameters == 1
    x, theta, t_xz, _ = augmenter.sample_train_local(
        theta=benchmark("sm"), n_samples=400, partition="train", test_split=0.2, validation_split=0.2
    )
    assert theta.shape == (400, 3) and t_xz.shape == (400, 3)
    np.testing.assert_array_equal(theta, 0.0)  # (theta, nu) at the SM and the nominal nu = 0
    # d/dnu log p(x, z | theta, nu) at nu = 0 is kappa x'_1 minus its sigma-weighted mean over the file
    xprime1 = simulator.smeared_from_observables(x)[:, 0]
    slope, offset = np.polyfit(xprime1, t_xz[:, 2], 1)
    assert slope == pytest.approx(simulator.NUISANCE_KAPPA, rel=1e-4) and abs(offset) < 0.05
    np.testing.assert_allclose(t_xz[:, 2], slope * xprime1 + offset, atol=1e-5)


@pytest.mark.slow
def test_include_nuisance_samples_and_trains_on_the_nuisance_toy(run_app, tmp_path):
    tiny = [a for a in TINY if a != "training.n_epochs=2"] + ["training.n_epochs=3"]
    run_app("training=sally", "stage=sample", *NUISANCE, *tiny, run_dir=tmp_path / "s")
    samples = tmp_path / "s" / "samples"
    x, theta, t_xz = (np.load(samples / f"{k}_train.npy") for k in ("x", "theta", "t_xz"))
    assert x.shape == (600, 2) and theta.shape == (600, 3) and t_xz.shape == (600, 3)  # (CWL2, CPWL2, nu)
    np.testing.assert_array_equal(theta, 0.0)
    slope = np.polyfit(simulator.smeared_from_observables(x)[:, 0], t_xz[:, 2], 1)[0]
    assert slope == pytest.approx(simulator.NUISANCE_KAPPA, rel=1e-4)  # the nuisance score of the toy's systematic
    assert json.loads((samples / "samples.json").read_text())["sampling"]["include_nuisance"] is True

    run_app(
        "training=sally", "stage=train", *NUISANCE, *tiny, f"sampling.samples_dir={samples}", run_dir=tmp_path / "t"
    )
    from app.ml import estimators

    estimator = estimators.load(tmp_path / "t" / "model")
    assert estimator.n_parameters == 3  # the score network learned the nuisance component too
    t_hat = estimators.score(estimator, x[:50])
    assert t_hat.shape == (50, 3) and np.all(np.isfinite(t_hat))
    # the nuisance component it learned follows the true one (kappa x'_1 up to a constant) after 3 tiny epochs
    assert np.corrcoef(t_hat[:, 2], t_xz[:50, 2])[0, 1] > 0.9

    proc = run_app("training=sally", *NUISANCE, *TINY, check=False, run_dir=tmp_path / "all")
    assert proc.returncode == 2, proc.out[-2000:]
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert "AsymptoticLimits does not support nuisance parameters" in line
    assert "Traceback" not in proc.out and not (tmp_path / "all" / "samples").exists()


def test_include_nuisance_is_a_one_line_error_before_any_work(run_app, tmp_path):
    proc = run_app("sampling.include_nuisance=true", *TINY, check=False)
    assert proc.returncode == 2, proc.out[-2000:]
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert "has no nuisance parameters" in line and "sampling.include_nuisance=false" in line
    assert "Traceback" not in proc.out and not (tmp_path / "run" / "samples").exists()

    # the nuisance toy without them: MadMiner 0.9.6's readers fail on it (a ValueError in its NuisanceMorpher)
    proc = run_app("data.nuisance=true", "stage=sample", *TINY, check=False, run_dir=tmp_path / "off")
    assert proc.returncode == 2, proc.out[-2000:]
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert "has nuisance parameters (scale_nuisance_param_0)" in line and "sampling.include_nuisance=true" in line
    assert "Traceback" not in proc.out and not (tmp_path / "off" / "samples").exists()

    from app.domain import datafile
    from app.domain.validate import _check_nuisance
    from app.errors import UserError

    info = datafile.inspect(simulator.ensure_toy_file(simulator.ToySettings(n_events=4000, nuisance=True), tmp_path))
    for stage in ("sample", "train"):
        _check_nuisance(OmegaConf.create({"sampling": {"include_nuisance": True}, "stage": stage}), info)
    for stage in ("all", "evaluate", "plot"):
        with pytest.raises(UserError, match="AsymptoticLimits does not support nuisance parameters"):
            _check_nuisance(OmegaConf.create({"sampling": {"include_nuisance": True}, "stage": stage}), info)


# --------------------------------------------------------------------------- item 11: defaults follow the file
def test_one_prior_applies_to_each_parameter(toy_path):
    from app.domain import datafile
    from app.domain.validate import check_theta

    info = datafile.inspect(toy_path)
    spec = OmegaConf.create({"type": "random_morphing_points", "n": 5, "priors": [["flat", -10.0, 10.0]]})
    check_theta(spec, info, "sampling.theta0")
    assert OmegaConf.to_container(spec.priors) == [["flat", -10.0, 10.0]] * 2


# --------------------------------------------------------------------------- MLproject: sample -> train -> evaluate
@pytest.mark.slow
def test_mlproject_entry_points_chain(tmp_path, cache_dir):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = dict(os.environ, MADMINER_SWEEPER_CACHE=str(cache_dir), MLFLOW_TRACKING_URI=uri)

    def mlflow_run(entry: str, run_dir: Path, **params):
        args = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", entry, "--env-manager", "local",
                "--experiment-name", "madminer-sweeper"]
        params["overrides"] = " ".join([*TINY, f"hydra.run.dir={run_dir}"])
        for key, value in params.items():
            args += ["-P", f"{key}={value}"]
        proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]

    mlflow_run("sample", tmp_path / "s")
    assert (tmp_path / "s" / "samples" / "x_train.npy").exists() and not (tmp_path / "s" / "model").exists()
    mlflow_run("train", tmp_path / "t", samples_dir=tmp_path / "s" / "samples")
    assert (tmp_path / "t" / "model" / "model.json").exists() and not (tmp_path / "t" / "samples").exists()
    mlflow_run("evaluate", tmp_path / "e", model_dir=tmp_path / "t" / "model")
    metrics = _metrics(tmp_path / "e")
    assert "limits_ml_cl68_fraction" in metrics and "val_loss" in metrics  # training metrics travel with the model

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("madminer-sweeper").experiment_id])
    entries = sorted(r.data.tags["mlflow.project.entryPoint"] for r in runs)
    assert entries == ["evaluate", "sample", "train"] and all(r.info.status == "FINISHED" for r in runs)
