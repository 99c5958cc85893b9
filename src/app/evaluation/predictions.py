"""The estimator on test-partition events: its predictions next to MadMiner's joint (parton-level) quantities
(``test_*`` metrics and arrays) and, on a toy file, next to the exact likelihood (:mod:`.truth_metrics`).

Ensembles (``training.n_estimators > 1``): metrics use the ensemble mean, and each metric ``<m>`` also comes as
``<m>_ensemble_std``, the spread of ``<m>`` over the members.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from app.domain.datafile import FileInfo
from app.domain.methods import Method
from app.domain.stats import correlation, with_spread
from app.domain.theta import (
    benchmark_points,
    ratio_theta1,
    single_point,
    theta_grid_of,
    theta_true,
    to_madminer_point,
    to_madminer_theta,
)
from app.evaluation.truth_metrics import truth_density_metrics, truth_log_r_metrics, truth_score_metrics
from app.ml import estimators
from app.ml.batched import parameter_inputs
from app.toy.truth import ToyTruth

log = logging.getLogger(__name__)


def test_predictions(
    cfg: DictConfig,
    method: Method,
    info: FileInfo,
    model_file: Path,
    tmp: Path,
    truth: ToyTruth | None = None,
    device: str = "cpu",
) -> dict:
    """Estimator outputs on test-partition events, next to MadMiner's joint (parton-level) quantities
    and, on a toy file, next to the exact likelihood (``truth_*`` metrics)."""
    from madminer.sampling import SampleAugmenter

    ev, s = cfg.evaluation, cfg.sampling
    estimator = estimators.load(model_file.parent)
    members = estimators.members(estimator)
    augmenter = SampleAugmenter(str(info.path), include_nuisance_parameters=s.include_nuisance)
    common = dict(
        n_samples=ev.n_test_samples,
        test_split=s.test_split,
        validation_split=s.validation_split,
        partition="test",
        sample_only_from_closest_benchmark=s.sample_only_from_closest_benchmark,
    )
    true_point = theta_true(cfg, info)
    x_true, _, _ = augmenter.sample_test(theta=to_madminer_point(true_point), **common)
    np.save(tmp / "test_x.npy", x_true)
    metrics: dict = {}
    estimator_kind = cfg.training.estimator
    if method.family == "ratio":
        double = estimator_kind == "double_parameterized"
        x, theta0s, theta1s, _, r_xz, _, _ = augmenter.sample_train_ratio(
            theta0=to_madminer_theta(s.theta0), theta1=ratio_theta1(cfg, info), **common
        )
        if double:  # MadMiner's double-parameterized evaluation does not scale theta as training did
            log_rs = [
                m.evaluate_log_likelihood_ratio(x=x, theta0=parameter_inputs(m, theta0s),
                                                theta1=parameter_inputs(m, theta1s), test_all_combinations=False)[0]
                for m in members
            ]  # fmt: skip
        else:
            log_rs = [
                m.evaluate_log_likelihood_ratio(x=x, theta=theta0s, test_all_combinations=False)[0] for m in members
            ]
        log_rs = [np.asarray(log_r).ravel() for log_r in log_rs]
        log_r_xz = np.log(r_xz).ravel()
        np.save(tmp / "test_theta0.npy", theta0s)
        np.save(tmp / "test_log_r_xz.npy", log_r_xz)
        np.save(tmp / "test_log_r_est.npy", np.mean(log_rs, axis=0))
        metrics.update(
            with_spread(
                lambda log_r: {
                    "test_log_r_mse_vs_joint": float(np.mean((log_r - log_r_xz) ** 2)),
                    "test_log_r_corr_vs_joint": correlation(log_r, log_r_xz),
                },
                log_rs,
            )
        )
        if truth is not None:
            # Parameterized estimators learned r(x | theta, theta1) for the theta1 they were trained against;
            # double-parameterized ones take theta1 as input and the ml limits evaluate them at theta_true.
            reference = true_point if double else single_point(theta1s)
            if reference is None:
                log.info("truth log r metrics skipped: sampling.theta1 is not a single point")
            else:
                metrics.update(
                    truth_log_r_metrics(
                        estimator, truth, x_true, theta_grid_of(cfg, info), reference, benchmark_points(info), tmp,
                        device,
                    )
                )
    elif method.family == "score":
        x, thetas, t_xz, _ = augmenter.sample_train_local(theta=to_madminer_theta(s.theta), **common)
        t_ests = [estimators.score(m, x) for m in members]
        t_est = np.mean(t_ests, axis=0)
        np.save(tmp / "test_score_x.npy", x)
        np.save(tmp / "test_t_xz.npy", t_xz)
        np.save(tmp / "test_score_est.npy", t_est)
        np.save(tmp / "test_score_theta_true.npy", estimators.score(estimator, x_true))
        metrics.update(with_spread(lambda t: {"test_score_mse_vs_joint": float(np.mean((t - t_xz) ** 2))}, t_ests))
        if truth is not None:
            reference = single_point(thetas)
            if reference is None:
                log.info("truth score metrics skipped: sampling.theta is not a single point")
            else:
                exact = truth.score(x, reference)
                np.save(tmp / "test_score_truth.npy", exact)
                metrics.update(with_spread(lambda t: truth_score_metrics(t, truth, x, reference), t_ests))
    else:
        log_ps = [
            # MadMiner's evaluate_log_likelihood scales x but not theta, which training scaled
            np.asarray(m.evaluate_log_likelihood(x=x_true, theta=parameter_inputs(m, true_point))[0]).ravel()
            for m in members
        ]
        np.save(tmp / "test_log_p_theta_true.npy", np.mean(log_ps, axis=0))
        metrics.update(with_spread(lambda log_p: {"test_mean_log_likelihood": float(np.mean(log_p))}, log_ps))
        if truth is not None:
            metrics.update(
                truth_density_metrics(
                    estimator, truth, x_true, theta_grid_of(cfg, info), true_point, benchmark_points(info), tmp, device
                )
            )
    return metrics
