"""Evaluation stage: expected limits, Fisher information and predictions on test data.

Everything reads MadMiner's *test* partition (``partition="test"`` / ``test_split``), never the
events the training samples came from. Writes .npy arrays and ``metrics.json`` into ``<run>/results``.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from app import compat, estimators
from app.datafile import FileInfo
from app.io import atomic_dir, read_json, write_json
from app.methods import MODEL_MODES, Method
from app.stages.sample import to_madminer_theta
from app.validate import limit_modes

log = logging.getLogger(__name__)

CL68_P_VALUE = 1.0 - 0.6826894921370859  # p-value above which a point lies inside the 68 % CL region


@dataclass
class EvaluateResult:
    results_dir: Path
    metrics: dict = field(default_factory=dict)


def theta_true(cfg: DictConfig, info: FileInfo) -> np.ndarray:
    t = cfg.evaluation.theta_true
    return np.zeros(info.n_parameters) if t is None else np.asarray(list(t), dtype=float)


def grid_ranges(cfg: DictConfig, info: FileInfo) -> list[tuple[float, float]]:
    ranges = cfg.evaluation.grid.ranges
    if ranges is None:
        return [(2.0 * lo, 2.0 * hi) for lo, hi in info.parameter_ranges]
    return [tuple(map(float, r)) for r in ranges]


def limit_runs(cfg: DictConfig, method: Method) -> list[tuple[str, str, bool]]:
    """(result key, MadMiner mode, include_xsec) for every requested limit."""
    include = OmegaConf.to_container(cfg.evaluation, resolve=True)["include_xsec"]
    include = include if isinstance(include, list) else [include]
    runs = []
    for mode in limit_modes(cfg, method):
        if mode == "rate":
            runs.append(("rate", "rate", True))
            continue
        for xsec in include:
            runs.append((mode if xsec else f"{mode}_kin", mode, xsec))
    return list(dict.fromkeys(runs))


def run(
    cfg: DictConfig,
    method: Method,
    info: FileInfo,
    model_file: Path | None,
    out_dir: Path,
    train_metrics: dict | None = None,
) -> EvaluateResult:
    """Limits, Fisher information and test predictions; ``metrics.json`` also holds ``train_metrics``."""
    compat.apply()
    ev = cfg.evaluation
    target = out_dir / "results"
    metrics: dict = dict(train_metrics or {})
    with atomic_dir(target) as tmp:
        np.random.seed(cfg.sampling.seed + 1)
        with estimators.madminer_loads_from(model_file.parent) if model_file else nullcontext():
            metrics.update(_limits(cfg, method, info, model_file, tmp))
            if ev.fisher.enabled:
                metrics.update(_fisher(cfg, method, info, model_file, tmp))
        if model_file is not None:
            metrics.update(_test_predictions(cfg, method, info, model_file, tmp))
        write_json(tmp / "limits.json", {"runs": [list(r) for r in limit_runs(cfg, method)]})
        write_json(tmp / "metrics.json", metrics)
    return EvaluateResult(target, metrics)


def _limits(cfg, method, info, model_file, tmp: Path) -> dict:
    ev = cfg.evaluation
    limits = estimators.limits_class()(
        str(info.path), include_nuisance_parameters=cfg.sampling.include_nuisance
    )
    truth = theta_true(cfg, info)
    resolutions = OmegaConf.to_container(ev.grid, resolve=True)["resolutions"]
    if isinstance(resolutions, int):  # madminer 0.9.6 only handles the list form
        resolutions = [resolutions] * info.n_parameters
    hist_bins = OmegaConf.to_container(ev, resolve=True)["hist_bins"]
    hist_vars = list(ev.hist_vars) if ev.hist_vars else [info.observables[0]]
    metrics = {}
    theta_grid = None
    for key, mode, include_xsec in limit_runs(cfg, method):
        kwargs = dict(
            mode=mode,
            theta_true=truth,
            grid_ranges=grid_ranges(cfg, info),
            grid_resolutions=resolutions,
            include_xsec=include_xsec,
            luminosity=ev.luminosity,
            test_split=cfg.sampling.test_split,
            sample_only_from_closest_benchmark=cfg.sampling.sample_only_from_closest_benchmark,
            return_histos=False,
        )
        if mode == "histo":
            kwargs.update(hist_vars=hist_vars, hist_bins=hist_bins, n_histo_toys=None, n_binning_toys=None)
        elif mode in MODEL_MODES:
            kwargs["model_file"] = str(model_file)
            if mode != "ml":
                kwargs.update(hist_bins=hist_bins, n_histo_toys=None, n_binning_toys=None)
        theta_grid, p_values, i_ml, llr_kin, llr_rate, _ = limits.expected_limits(**kwargs)
        np.save(tmp / f"p_values_{key}.npy", p_values)
        np.save(tmp / f"best_fit_{key}.npy", theta_grid[i_ml])
        metrics[f"limits_{key}_cl68_fraction"] = float(np.mean(p_values > CL68_P_VALUE))
        metrics[f"limits_{key}_best_fit_distance"] = float(np.linalg.norm(theta_grid[i_ml] - truth))
        log.info(
            "limits %-10s 68%% CL covers %.1f%% of the grid, best fit %s",
            key,
            100 * metrics[f"limits_{key}_cl68_fraction"],
            np.round(theta_grid[i_ml], 3).tolist(),
        )
    if theta_grid is not None:
        np.save(tmp / "grid.npy", theta_grid)
        np.save(tmp / "theta_true.npy", truth)
    return metrics


def _fisher(cfg, method, info, model_file, tmp: Path) -> dict:
    from madminer.fisherinformation import FisherInformation

    ev = cfg.evaluation
    fisher = FisherInformation(str(info.path), include_nuisance_parameters=cfg.sampling.include_nuisance)
    theta = theta_true(cfg, info)
    observable = ev.fisher.observable or info.observables[0]
    bins = OmegaConf.to_container(ev.fisher, resolve=True)["bins"]
    bins = np.asarray(bins, dtype=float) if isinstance(bins, list) else bins
    matrices = {
        "rate": fisher.rate_information(theta, luminosity=ev.luminosity)[0],
        "histo": fisher.histo_information(theta, luminosity=ev.luminosity, observable=observable, bins=bins)[
            0
        ],
    }
    if method.family == "score" and model_file is not None:
        matrices["full"] = fisher.full_information(
            theta,
            str(model_file),
            luminosity=ev.luminosity,
            include_xsec_info=True,
            test_split=cfg.sampling.test_split,
            calculate_covariance=False,
        )[0]
    metrics = {}
    for kind, matrix in matrices.items():
        np.save(tmp / f"fisher_{kind}.npy", matrix)
        metrics[f"fisher_{kind}_det"] = float(np.linalg.det(matrix))
    return metrics


def _test_predictions(cfg, method, info, model_file, tmp: Path) -> dict:
    """Estimator outputs on test-partition events, next to MadMiner's joint (parton-level) quantities."""
    from madminer.sampling import SampleAugmenter

    ev, s = cfg.evaluation, cfg.sampling
    estimator = estimators.load(model_file.parent)
    augmenter = SampleAugmenter(str(info.path), include_nuisance_parameters=s.include_nuisance)
    common = dict(
        n_samples=ev.n_test_samples,
        test_split=s.test_split,
        validation_split=s.validation_split,
        partition="test",
        sample_only_from_closest_benchmark=s.sample_only_from_closest_benchmark,
    )
    truth = theta_true(cfg, info)
    x_true, _, _ = augmenter.sample_test(theta=to_madminer_theta_point(truth), **common)
    np.save(tmp / "test_x.npy", x_true)
    metrics: dict = {}
    estimator_kind = getattr(cfg.training.estimator, "value", cfg.training.estimator)
    if method.family == "ratio":
        x, theta0, theta1, _, r_xz, _, _ = augmenter.sample_train_ratio(
            theta0=to_madminer_theta(s.theta0), theta1=to_madminer_theta(s.theta1), **common
        )
        if estimator_kind == "double_parameterized":
            log_r = estimator.evaluate_log_likelihood_ratio(
                x=x, theta0=theta0, theta1=theta1, test_all_combinations=False
            )[0]
        else:
            log_r = estimator.evaluate_log_likelihood_ratio(x=x, theta=theta0, test_all_combinations=False)[0]
        log_r_xz = np.log(r_xz).ravel()
        log_r = np.asarray(log_r).ravel()
        for name, arr in (("test_theta0", theta0), ("test_log_r_xz", log_r_xz), ("test_log_r_est", log_r)):
            np.save(tmp / f"{name}.npy", arr)
        metrics["test_log_r_mse_vs_joint"] = float(np.mean((log_r - log_r_xz) ** 2))
        metrics["test_log_r_corr_vs_joint"] = _corr(log_r, log_r_xz)
    elif method.family == "score":
        x, _, t_xz, _ = augmenter.sample_train_local(theta=to_madminer_theta(s.theta), **common)
        t_est = np.asarray(estimator.evaluate_score(x=x))
        t_est = t_est[0] if t_est.ndim == 3 else t_est
        np.save(tmp / "test_t_xz.npy", t_xz)
        np.save(tmp / "test_score_est.npy", t_est)
        np.save(tmp / "test_score_theta_true.npy", np.asarray(estimator.evaluate_score(x=x_true)))
        metrics["test_score_mse_vs_joint"] = float(np.mean((t_est - t_xz) ** 2))
    else:
        log_p = estimator.evaluate_log_likelihood(x=x_true, theta=truth.reshape(1, -1))[0]
        np.save(tmp / "test_log_p_theta_true.npy", np.asarray(log_p))
        metrics["test_mean_log_likelihood"] = float(np.mean(log_p))
    return metrics


def to_madminer_theta_point(theta: np.ndarray):
    from madminer.sampling import morphing_point

    return morphing_point(theta.tolist())


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    if np.std(a) == 0 or np.std(b) == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def load(results_dir: Path) -> EvaluateResult:
    return EvaluateResult(results_dir, read_json(results_dir / "metrics.json"))
