"""Estimators evaluated at the points they mean (issue 19): theta scaled as in training for density and
double-parameterized estimators, and a score estimator's full Fisher information at its training point. Each
against an independent computation (the network called on the transformed inputs by hand; the Fisher information
summed from the toy's exact score), not against MadMiner's evaluation, which has the bugs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from app.ml.batched import model_log_likelihood_grid, model_log_r_grid, parameter_inputs
from app.toy import simulator

THETA_MEANS, THETA_STDS = np.array([1.5, -2.0]), np.array([3.0, 0.4])  # far from (0, 1): raw theta is wrong
X_MEANS, X_STDS = np.array([60.0, 1.5]), np.array([40.0, 0.9])


def _untrained(kind: str):
    """A small density or double-parameterized estimator, as training leaves it (scalings set), untrained."""
    import torch
    from madminer import ml

    torch.manual_seed(0)
    if kind == "density":
        estimator = ml.LikelihoodEstimator(n_mades=2, n_hidden=(8,))
    else:
        estimator = ml.DoubleParameterizedRatioEstimator(n_hidden=(8,))
    estimator.n_observables, estimator.n_parameters = 2, 2
    estimator._create_model()
    estimator.x_scaling_means, estimator.x_scaling_stds = X_MEANS, X_STDS
    estimator.theta_scaling_means, estimator.theta_scaling_stds = THETA_MEANS, THETA_STDS
    return estimator


def _by_hand(estimator, x, thetas, theta1):
    """The network called on (theta - mean) / std and (x - mean) / std, written out here."""
    import torch

    n_x = len(x)
    xs = torch.tensor(np.tile((x - X_MEANS) / X_STDS, (len(thetas), 1)), dtype=torch.float)
    th = torch.tensor(np.repeat((thetas - THETA_MEANS) / THETA_STDS, n_x, 0), dtype=torch.float)
    with torch.no_grad():
        if theta1 is None:
            value = estimator.model.log_likelihood(th, xs)[1]
        else:
            th1 = torch.tensor(np.tile((theta1 - THETA_MEANS) / THETA_STDS, (len(th), 1)), dtype=torch.float)
            value = estimator.model(th, th1, xs, track_score=False, create_gradient_graph=False)[1]
    return value.numpy().reshape(len(thetas), n_x)


@pytest.mark.parametrize("kind", ["density", "double"])
def test_grids_give_the_network_theta_scaled_as_in_training(kind):
    rng = np.random.default_rng(0)
    x = np.column_stack([rng.uniform(20, 150, 30), rng.uniform(0, 3, 30)])
    thetas = rng.uniform(-5, 5, (7, 2))
    estimator = _untrained(kind)
    if kind == "density":
        ours = model_log_likelihood_grid(estimator, x, thetas)
        expected = _by_hand(estimator, x, thetas, None) - np.sum(np.log(X_STDS))
    else:
        theta1 = np.array([3.0, -2.0])
        ours = model_log_r_grid(estimator, x, thetas, theta1)
        expected = _by_hand(estimator, x, thetas, theta1)
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=1e-5)
    # not vacuous: raw theta gives other values
    raw = _by_hand(estimator, x, thetas * THETA_STDS + THETA_MEANS, None if kind == "density" else theta1)
    assert np.max(np.abs(raw - _by_hand(estimator, x, thetas, None if kind == "density" else theta1))) > 1e-2


def test_parameter_inputs_without_scaling_is_theta():
    from madminer import ml

    estimator = ml.LikelihoodEstimator(n_mades=1, n_hidden=(4,))  # morphing-aware estimators and scale_parameters=False
    np.testing.assert_array_equal(parameter_inputs(estimator, [1.0, 2.0]), [[1.0, 2.0]])
    estimator.theta_scaling_means, estimator.theta_scaling_stds = THETA_MEANS, THETA_STDS
    np.testing.assert_allclose(parameter_inputs(estimator, [[1.5, -1.6]]), [[0.0, 1.0]])


# --------------------------------------------------------------------------- full Fisher information
@pytest.fixture(scope="module")
def toy_path(tmp_path_factory) -> Path:
    return simulator.generate_toy_file(simulator.ToySettings(n_events=3000), tmp_path_factory.mktemp("f") / "toy.h5")


def _exact_score_estimator(truth, trained_at):
    """A score estimator that is exactly right at its training point: t(x | trained_at) of the toy."""
    from madminer.ml import ScoreEstimator

    class ExactScore(ScoreEstimator):
        def evaluate_score(self, x, theta=None, nuisance_mode="auto"):
            return truth.score(np.asarray(x, dtype=np.float64), trained_at)

    estimator = ExactScore()
    estimator.n_parameters, estimator.model = 2, "exact"  # MadMiner only checks that there is a model
    return estimator


def _exact_fisher(toy_path, truth, theta, luminosity, test_split):
    """L sigma(theta) E_theta[t t^T] + L grad sigma grad sigma^T / sigma, with the toy's exact score and cross
    section, the expectation over the test-partition events reweighted to theta (as MadMiner's full information
    reads them; sigma of the kinematic part is the file's, as MadMiner's)."""
    from madminer.fisherinformation import FisherInformation

    fisher = FisherInformation(str(toy_path))
    start = int(round((1.0 - test_split) * fisher.n_samples, 0)) + 1
    x, weights_benchmarks = fisher.weighted_events(start_event=start)
    weights = fisher._get_theta_benchmark_matrix(theta) @ weights_benchmarks.T
    t = truth.score(x, theta)
    sigma = float(fisher._calculate_xsec(theta=theta))
    kinematic = luminosity * sigma * np.einsum("n,ni,nj->ij", weights / weights.sum(), t, t)
    eps = 1e-4
    grad = np.array([(truth.cross_section(theta + eps * e) - truth.cross_section(theta - eps * e)) / (2 * eps)
                     for e in np.eye(2)]).ravel()  # fmt: skip
    return kinematic + luminosity * np.outer(grad, grad) / float(truth.cross_section(theta))


def test_full_fisher_information_is_computed_at_the_score_estimators_training_point(toy_path, tmp_path, caplog):
    import logging

    from app.domain import datafile
    from app.domain.methods import METHODS
    from app.evaluation.fisher import fisher_information
    from app.ml import madminer_patches
    from app.toy.truth import ToyTruth
    from app.workflow import compose

    truth = ToyTruth.from_file(toy_path)
    sm, away = np.zeros(2), np.array([3.0, -2.0])
    cfg = compose(["training=sally", "evaluation.theta_true=[3,-2]", "tracking=disabled"])
    info = datafile.inspect(toy_path, is_toy=True)
    model = _exact_score_estimator(truth, sm)  # trained at sampling.theta = sm
    with madminer_patches.estimators_loaded_by(lambda _file: model), caplog.at_level(logging.INFO):
        metrics = fisher_information(cfg, METHODS[cfg.training.method], info, tmp_path / "model", tmp_path)
    full = np.load(tmp_path / "fisher_full.npy")
    lumi, split = cfg.evaluation.luminosity, cfg.sampling.test_split
    expected = _exact_fisher(toy_path, truth, sm, lumi, split)
    np.testing.assert_allclose(full, expected, rtol=0.005)
    np.testing.assert_array_equal(np.load(tmp_path / "fisher_full_theta.npy"), sm)
    # not vacuous: the exact information at theta_true differs, and the rate / histogram information stay there
    assert np.max(np.abs(_exact_fisher(toy_path, truth, away, lumi, split) - expected) / np.abs(expected)) > 0.5
    assert np.max(np.linalg.eigvalsh(np.load(tmp_path / "fisher_rate.npy"))) > 1.0  # ~0.005 at the SM, ~10 at away
    assert "training point [0.0, 0.0]" in caplog.text
    assert "fisher_full_gain_over_histo" in metrics


# --------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_models_trained_without_input_scaling_are_evaluated(run_app, tmp_path):
    """training.scale_inputs=false: the evaluate stage used to fail ("operands could not be broadcast (10,2)
    (300,)", MadMiner's per-event input means); now the run completes with the score metrics."""
    import json

    from conftest import TINY

    run_app("training=sally", "training.scale_inputs=false", *TINY)
    m = json.loads((tmp_path / "run" / "results" / "metrics.json").read_text())
    assert np.isfinite(m["truth_score_mse"]) and "truth_limits_sally_iou" in m, m


@pytest.mark.parametrize("kind", ["density", "double"])
def test_registered_model_gives_the_network_theta_scaled_as_in_training(kind):
    """The MLflow pyfunc's predictions (app.tracking.registry) for density and double-parameterized models."""
    import pandas as pd

    from app.tracking.registry import MadMinerEstimator

    rng = np.random.default_rng(1)
    x = np.column_stack([rng.uniform(20, 150, 6), rng.uniform(0, 3, 6)])
    thetas = rng.uniform(-5, 5, (6, 2))
    model = MadMinerEstimator()
    model.estimator = _untrained(kind)
    model.meta = {"observables": ["a", "b"], "parameters": ["p", "q"], "family": "density" if kind == "density" else
                  "ratio", "estimator": "likelihood" if kind == "density" else "double_parameterized"}  # fmt: skip
    frame = pd.DataFrame(np.hstack([x, thetas]), columns=["a", "b", "p", "q"])
    predicted = model.predict(None, frame).to_numpy().ravel()
    expected = [_by_hand(model.estimator, x[i : i + 1], thetas[i : i + 1], None if kind == "density" else np.zeros(2))
                for i in range(len(x))]  # fmt: skip
    np.testing.assert_allclose(predicted, np.ravel(expected), atol=1e-4, rtol=1e-5)
