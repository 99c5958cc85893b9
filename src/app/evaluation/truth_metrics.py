"""How close the estimator is to the exact likelihood of a toy file (:mod:`app.toy.truth`): the ``truth_*``
metrics of log r over the evaluation grid and at the benchmarks, of the score, and of the density (docs/toy.md)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from app.domain.datafile import FileInfo
from app.domain.stats import correlation, with_spread
from app.ml import estimators
from app.ml.batched import model_log_likelihood_grid, model_log_r_grid
from app.toy.truth import ToyTruth

log = logging.getLogger(__name__)


def truth_for(cfg: DictConfig, info: FileInfo) -> ToyTruth | None:
    """The exact likelihood of a toy file, or None (with one log line saying why)."""
    if not cfg.evaluation.truth:
        log.info("truth metrics skipped: evaluation.truth=false")
        return None
    truth = ToyTruth.from_file(info.path)
    if truth is None:
        log.info("truth metrics skipped: %s is not a toy file (no tractable likelihood)", info.path)
    return truth


def truth_log_r_metrics(
    estimator, truth, x, grid, reference, points: dict[str, np.ndarray], tmp: Path | None = None, device: str = "cpu"
) -> dict:
    """MSE and correlation of estimated vs true log r(x | theta, reference) over the grid and at ``points``.

    ``x`` are test events (drawn at theta_true), ``reference`` the theta1 the estimator was trained against.
    """
    names = list(points)
    thetas = np.vstack([grid] + [np.reshape(points[n], (1, -1)) for n in names])
    predictions = [model_log_r_grid(m, x, thetas, reference, device) for m in estimators.members(estimator)]
    estimated = np.mean(predictions, axis=0)
    exact = truth.log_r_grid(x, thetas, reference)
    metrics = with_spread(lambda est: _log_r_comparison(est, exact, len(grid), names), predictions)
    _log_comparison(metrics, estimated[: len(grid)].shape)
    if tmp is not None:
        np.save(tmp / "test_log_r_grid_est.npy", estimated[: len(grid)].astype(np.float32))
        np.save(tmp / "truth_log_r_grid.npy", exact[: len(grid)].astype(np.float32))
        np.save(tmp / "truth_reference.npy", np.asarray(reference, dtype=np.float64))
    return metrics


def truth_density_metrics(
    estimator, truth, x, grid, true_point, points: dict[str, np.ndarray], tmp: Path | None = None, device: str = "cpu"
) -> dict:
    """Density estimators: the log r metrics (reference = the origin) and the mean log-likelihood gap at theta_true.

    truth_log_likelihood_gap = mean over test events x ~ p(x | theta_true) of log p(x | theta_true) - log p_hat(x |
    theta_true): a Monte Carlo estimate of KL(p || p_hat) >= 0.
    """
    names = list(points)
    reference = np.zeros(truth.n_parameters)
    thetas = np.vstack([grid] + [np.reshape(points[n], (1, -1)) for n in names] + [reference, true_point])
    exact = truth.log_r_grid(x, thetas[:-2], reference)
    exact_log_p = truth.log_likelihood(x, true_point)

    def compare(log_p):
        metrics = _log_r_comparison(log_p[:-2] - log_p[-2], exact, len(grid), names)
        metrics["truth_log_likelihood_gap"] = float(np.mean(exact_log_p - log_p[-1]))
        return metrics

    predictions = [model_log_likelihood_grid(m, x, thetas, device) for m in estimators.members(estimator)]
    log_p = np.mean(predictions, axis=0)
    estimated = log_p[:-2] - log_p[-2]
    metrics = with_spread(compare, predictions)
    _log_comparison(metrics, estimated[: len(grid)].shape)
    if tmp is not None:
        np.save(tmp / "test_log_r_grid_est.npy", estimated[: len(grid)].astype(np.float32))
        np.save(tmp / "truth_log_r_grid.npy", exact[: len(grid)].astype(np.float32))
        np.save(tmp / "truth_reference.npy", reference)
        np.save(tmp / "truth_log_p_theta_true.npy", truth.log_likelihood(x, true_point))
    return metrics


def truth_score_metrics(t_est, truth, x, reference) -> dict:
    """MSE (mean over events and components) of the estimated vs the true score t(x | reference)."""
    exact = truth.score(x, reference)
    t_est = np.asarray(t_est, dtype=np.float64).reshape(exact.shape)
    return {
        "truth_score_mse": float(np.mean((t_est - exact) ** 2)),
        "truth_score_corr": correlation(t_est.ravel(), exact.ravel()),
    }


def _log_r_comparison(estimated: np.ndarray, exact: np.ndarray, n_grid: int, names: list[str]) -> dict:
    est, true = estimated[:n_grid], exact[:n_grid]
    metrics = {
        "truth_log_r_mse": float(np.mean((est - true) ** 2)),
        "truth_log_r_corr": correlation(est.ravel(), true.ravel()),
    }
    for i, name in enumerate(names):
        row = n_grid + i
        metrics[f"truth_log_r_mse_at_{name}"] = float(np.mean((estimated[row] - exact[row]) ** 2))
    return metrics


def _log_comparison(metrics: dict, shape: tuple[int, int]) -> None:
    spread = metrics.get("truth_log_r_mse_ensemble_std")
    log.info(
        "truth: log r MSE %.4g%s over %d grid points x %d test events (correlation %.4f)",
        metrics["truth_log_r_mse"],
        "" if spread is None else f" (ensemble spread {spread:.3g})",
        shape[0],
        shape[1],
        metrics["truth_log_r_corr"],
    )
