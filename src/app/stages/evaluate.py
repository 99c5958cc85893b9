"""Evaluation stage: expected limits, Fisher information and predictions on test data.

Everything reads MadMiner's *test* partition (``partition="test"`` / ``test_split``), never the
events the training samples came from. Writes .npy arrays and ``metrics.json`` into ``<run>/results``.

On a toy file (:mod:`app.toy.simulator`, whose likelihood is known exactly: :mod:`app.toy.truth`) it also compares
the estimator and the limits with the truth: the ``truth_*`` metrics (see ``docs/toy.md``). On any
other file they are absent and one log line says why.

Ensembles (``training.n_estimators > 1``): metrics of the estimator's predictions use the ensemble
mean, and each such metric ``<m>`` also comes as ``<m>_ensemble_std``, the spread of ``<m>`` over
the members. Limits use MadMiner's ensemble mean (no per-member limits).
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from app.domain.datafile import FileInfo
from app.domain.methods import LIMIT_MODES, MODEL_MODES, THETAREF_MODES, Method
from app.domain.stats import CL68_P_VALUE, region_size
from app.domain.validate import limit_modes
from app.errors import UserError
from app.ml import device as app_device
from app.ml import estimators, madminer_patches
from app.stages.sample import ratio_theta1, to_madminer_theta
from app.store.files import atomic_dir, read_json, write_json
from app.toy import truth as truth_mod

log = logging.getLogger(__name__)

FEW_EVENTS = 10  # warn when fewer events are expected at theta_true


@dataclass
class EvaluateResult:
    results_dir: Path
    metrics: dict = field(default_factory=dict)


SM = "sm"  # the benchmark evaluation.theta_true=null stands for


def theta_true(cfg: DictConfig, info: FileInfo) -> np.ndarray:
    """``evaluation.theta_true``; null = the file's ``sm`` benchmark, the origin if it has none."""
    t = cfg.evaluation.theta_true
    if t is not None:
        return np.asarray(list(t), dtype=float)
    return benchmark_points(info).get(SM, np.zeros(info.n_parameters))


def describe_theta_true(cfg: DictConfig, info: FileInfo) -> str:
    """Where theta_true comes from, for the one log line of the evaluate stage."""
    point = np.round(theta_true(cfg, info), 4).tolist()
    if cfg.evaluation.theta_true is not None:
        return f"theta_true = {point} (evaluation.theta_true)"
    if SM in benchmark_points(info):
        return f"theta_true = {point} (the file's {SM!r} benchmark; evaluation.theta_true=null)"
    return f"theta_true = {point} (the origin: the file has no {SM!r} benchmark; set evaluation.theta_true)"


def grid_ranges(cfg: DictConfig, info: FileInfo) -> list[tuple[float, float]]:
    """``evaluation.grid.ranges``; null = half the parameter ranges stored in the file or, for a file
    without them, the span of its benchmarks. UserError when neither defines a range."""
    ranges = cfg.evaluation.grid.ranges
    if ranges is not None:
        return [tuple(map(float, r)) for r in ranges]
    stored = _stored_parameter_ranges(info)
    if stored is not None:
        return [(0.5 * lo, 0.5 * hi) for lo, hi in stored]
    values = np.array(list(benchmark_points(info).values()), dtype=float).reshape(-1, info.n_parameters)
    spans = [(float(lo), float(hi)) for lo, hi in zip(values.min(axis=0), values.max(axis=0))]
    flat = [name for name, (lo, hi) in zip(info.parameters, spans) if not lo < hi]
    if flat:
        raise UserError(
            f"{info.path.name} stores no parameter ranges and its benchmarks do not span {', '.join(flat)}; "
            f"set evaluation.grid.ranges (one [min, max] per parameter: {', '.join(info.parameters)})"
        )
    return spans


def _stored_parameter_ranges(info: FileInfo) -> list[tuple[float, float]] | None:
    import h5py

    with h5py.File(info.path, "r") as f:
        if "parameters/val_ranges" not in f:
            return None
        return [tuple(map(float, r)) for r in f["parameters/val_ranges"][()]]


def limit_runs(cfg: DictConfig, method: Method) -> list[tuple[str, str, bool]]:
    """(result key, MadMiner mode, include_xsec) for every requested limit.

    The key uses the config spelling (``adaptive_sally``), the mode MadMiner's (``adaptive-sally``).
    """
    include = OmegaConf.to_container(cfg.evaluation, resolve=True)["include_xsec"]
    include = include if isinstance(include, list) else [include]
    runs = []
    for name in limit_modes(cfg, method):
        mode = LIMIT_MODES[name]
        if name == "rate":
            runs.append(("rate", mode, True))
            continue
        for xsec in include:
            runs.append((name if xsec else f"{name}_kin", mode, xsec))
    return list(dict.fromkeys(runs))


def run(
    cfg: DictConfig,
    method: Method,
    info: FileInfo,
    model_file: Path | None,
    out_dir: Path,
    train_metrics: dict | None = None,
    memo=None,
) -> EvaluateResult:
    """Limits, Fisher information and test predictions; ``metrics.json`` also holds ``train_metrics``.

    ``memo(name, config, compute)``, when given, returns ``compute()`` (a dict of arrays) for the results that do
    not depend on the estimator (rate and histogram limits, their Fisher information), computed once per data file
    and ``config`` (the pipeline backs it with the stage cache).
    """
    madminer_patches.apply()
    ev = cfg.evaluation
    target = out_dir / "results"
    metrics: dict = dict(train_metrics or {})
    truth = truth_for(cfg, info)
    log.info(describe_theta_true(cfg, info))
    with madminer_patches.events_in_memory(), atomic_dir(target) as tmp, app_device.use(cfg.training.device):
        np.random.seed(cfg.sampling.seed + 1)
        with estimators.madminer_loads_from(model_file.parent) if model_file else nullcontext():
            metrics.update(_limits(cfg, method, info, model_file, tmp, truth, memo))
            if ev.fisher.enabled:
                metrics.update(_fisher(cfg, method, info, model_file, tmp, memo))
        if model_file is not None:
            metrics.update(_test_predictions(cfg, method, info, model_file, tmp, truth))
        write_json(tmp / "limits.json", {"runs": [list(r) for r in limit_runs(cfg, method)]})
        write_json(tmp / "metrics.json", metrics)
    return EvaluateResult(target, metrics)


def truth_for(cfg: DictConfig, info: FileInfo) -> truth_mod.ToyTruth | None:
    """The exact likelihood of a toy file, or None (with one log line saying why)."""
    if not cfg.evaluation.truth:
        log.info("truth metrics skipped: evaluation.truth=false")
        return None
    truth = truth_mod.ToyTruth.from_file(info.path)
    if truth is None:
        log.info("truth metrics skipped: %s is not a toy file (no tractable likelihood)", info.path)
    return truth


def grid_resolutions(cfg: DictConfig, info: FileInfo) -> list[int]:
    resolutions = OmegaConf.to_container(cfg.evaluation.grid, resolve=True)["resolutions"]
    if isinstance(resolutions, int):  # madminer 0.9.6 only handles the list form
        resolutions = [resolutions] * info.n_parameters
    return resolutions


def theta_grid_of(cfg: DictConfig, info: FileInfo) -> np.ndarray:
    """The evaluation grid exactly as AsymptoticLimits builds it (last parameter varies fastest)."""
    from madminer.limits import AsymptoticLimits

    return AsymptoticLimits._make_theta_grid(grid_ranges(cfg, info), grid_resolutions(cfg, info))[0]


LIMIT_RESULTS = ("theta_grid", "p_values", "i_ml", "llr_kin", "llr_rate")
# Histograms are filled for this many grid points at a time (MadMiner's default, 1000, holds a weight for every
# grid point and event at once: 4 GB at 10^6 events). Only for modes whose histogram data do not depend on the grid
# point (histo, sally): MadMiner's batched loop pairs each batch with the first grid points, which matters only
# where the data are transformed per point (sallino, adaptive-sally: one batch, as before).
HISTO_THETA_BATCH = 64


def _expected_limits(limits, kwargs: dict, seed: int, memo) -> tuple:
    """AsymptoticLimits.expected_limits, with a fixed random state per limit; through ``memo`` for the limits that
    do not depend on the estimator (no model_file), so a sweep computes them once."""
    import zlib

    def compute() -> dict:
        np.random.seed((seed + zlib.crc32(str(kwargs["mode"]).encode()) + int(kwargs["include_xsec"])) % 2**32)
        return dict(zip(LIMIT_RESULTS, limits.expected_limits(**kwargs)[:5]))

    if memo is None or "model_file" in kwargs:
        found = compute()
    else:
        config = {k: np.asarray(v).tolist() if isinstance(v, np.ndarray) else v for k, v in kwargs.items()}
        found = memo("limits", {**config, "seed": seed}, compute)
    return tuple(found[name] for name in LIMIT_RESULTS)


def _limits(cfg, method, info, model_file, tmp: Path, truth: truth_mod.ToyTruth | None = None, memo=None) -> dict:
    ev = cfg.evaluation
    limits = estimators.limits_class()(
        str(info.path), include_nuisance_parameters=cfg.sampling.include_nuisance
    )
    true_point = theta_true(cfg, info)
    resolutions = grid_resolutions(cfg, info)
    hist_bins = OmegaConf.to_container(ev, resolve=True)["hist_bins"]
    hist_vars = list(ev.hist_vars) if ev.hist_vars else [info.observables[0]]
    metrics = {}
    theta_grid = None
    true_limits: dict = {}  # (include kinematics, include xsec) -> truth.ExpectedLimits
    _log_expected_events(cfg, limits, true_point)
    for key, mode, include_xsec in limit_runs(cfg, method):
        name = key[: -len("_kin")] if key.endswith("_kin") else key
        kwargs = dict(
            mode=mode,
            theta_true=true_point,
            grid_ranges=grid_ranges(cfg, info),
            grid_resolutions=resolutions,
            include_xsec=include_xsec,
            luminosity=ev.luminosity,
            test_split=cfg.sampling.test_split,
            sample_only_from_closest_benchmark=cfg.sampling.sample_only_from_closest_benchmark,
            return_histos=False,
        )
        if mode == "histo":
            kwargs.update(hist_vars=hist_vars, hist_bins=hist_bins, n_histo_toys=None, n_binning_toys=None,
                          histo_theta_batchsize=HISTO_THETA_BATCH)
        elif name in MODEL_MODES:
            kwargs["model_file"] = str(model_file)
            if mode != "ml":
                kwargs.update(hist_bins=hist_bins, n_histo_toys=None, n_binning_toys=None)
            if mode == "sally":
                kwargs["histo_theta_batchsize"] = HISTO_THETA_BATCH
            if name in THETAREF_MODES:
                kwargs["thetaref"] = training_point(cfg, info)
        theta_grid, p_values, i_ml, llr_kin, llr_rate = _expected_limits(limits, kwargs, cfg.sampling.seed, memo)
        i_ml = int(i_ml)
        np.save(tmp / f"p_values_{key}.npy", p_values)
        np.save(tmp / f"best_fit_{key}.npy", theta_grid[i_ml])
        metrics[f"limits_{key}_cl68_fraction"] = float(np.mean(p_values > CL68_P_VALUE))
        metrics[f"limits_{key}_cl68_area"] = region_size(theta_grid, p_values)
        metrics[f"limits_{key}_best_fit_distance"] = float(np.linalg.norm(theta_grid[i_ml] - true_point))
        log.info(
            "limits %-10s 68%% CL covers %.1f%% of the grid, best fit %s",
            key,
            100 * metrics[f"limits_{key}_cl68_fraction"],
            np.round(theta_grid[i_ml], 3).tolist(),
        )
        if truth is not None:
            variant = (mode != "rate", bool(include_xsec))
            if variant not in true_limits:
                true_limits[variant] = _true_limits(cfg, limits, truth, theta_grid, true_point, *variant)
            exact = true_limits[variant]
            estimated = np.broadcast_to(np.asarray(llr_kin + llr_rate, dtype=np.float64), p_values.shape)
            np.save(tmp / f"log_likelihood_{key}.npy", estimated)
            np.save(tmp / f"truth_log_likelihood_{key}.npy", exact.log_likelihood)
            np.save(tmp / f"truth_p_values_{key}.npy", exact.p_values)
            np.save(tmp / f"truth_best_fit_{key}.npy", exact.best_fit)
            iou, distance = truth_mod.compare_regions(theta_grid, estimated, exact.log_likelihood)
            metrics[f"truth_limits_{key}_iou"] = iou
            metrics[f"truth_limits_{key}_best_fit_distance"] = distance
            log.info("limits %-10s vs truth: 68%% CL IoU %.3f, best fits %.3g apart", key, iou, distance)
    # The method's own mode (with the cross section) under names that mean the same for every method.
    own = method.limit_mode
    if f"limits_{own}_cl68_area" in metrics:
        metrics["limits_cl68_area"] = metrics[f"limits_{own}_cl68_area"]
    if f"truth_limits_{own}_iou" in metrics:
        metrics["truth_limits_iou"] = metrics[f"truth_limits_{own}_iou"]
    if theta_grid is not None:
        np.save(tmp / "grid.npy", theta_grid)
        np.save(tmp / "theta_true.npy", true_point)
    return metrics


def _log_expected_events(cfg, limits, true_point: np.ndarray) -> None:
    """The expected number of events at theta_true (L x sigma, MadMiner's test-partition cross section)."""
    xsec = float(limits._calculate_xsecs([true_point])[0])  # as AsymptoticLimits computes it
    n_events = cfg.evaluation.luminosity * xsec
    log.info(
        "expected events at theta_true: %.4g (luminosity %.4g pb^-1 x cross section %.4g pb)",
        n_events,
        cfg.evaluation.luminosity,
        xsec,
    )
    if n_events < FEW_EVENTS:
        log.warning(
            "only %.3g events expected at theta_true: the limits rest on very few events; raise "
            "evaluation.luminosity (in pb^-1)",
            n_events,
        )


def training_point(cfg: DictConfig, info: FileInfo) -> np.ndarray:
    """The point a score estimator was trained at (``sampling.theta``): SALLINO's / adaptive SALLY's thetaref."""
    spec = cfg.sampling.theta
    if spec.type == "benchmark":
        return benchmark_points(info)[spec.name]
    if spec.type == "morphing_point":
        return np.asarray(list(spec["values"]), dtype=float)
    raise UserError(
        f"sampling.theta of type {spec.type} is not one point; score methods train at one point "
        "(type benchmark or morphing_point)"
    )


def _true_limits(cfg, limits, truth, theta_grid, true_point, kinematics: bool, include_xsec: bool):
    """The true expected limits on the same Asimov data (test-partition events reweighted to theta_true)."""
    x_asimov, weights = limits._asimov_data(
        true_point,
        test_split=cfg.sampling.test_split,
        sample_only_from_closest_benchmark=cfg.sampling.sample_only_from_closest_benchmark,
    )
    return truth.expected_limits(
        theta_grid,
        true_point,
        x_asimov,
        weights,
        luminosity=cfg.evaluation.luminosity,
        include_kinematics=kinematics,
        include_xsec=include_xsec,
    )


def _fisher(cfg, method, info, model_file, tmp: Path, memo=None) -> dict:
    from madminer.fisherinformation import FisherInformation

    ev = cfg.evaluation
    fisher = FisherInformation(str(info.path), include_nuisance_parameters=cfg.sampling.include_nuisance)
    theta = theta_true(cfg, info)
    observable = ev.fisher.observable or info.observables[0]
    bins = OmegaConf.to_container(ev.fisher, resolve=True)["bins"]
    bins = np.asarray(bins, dtype=float) if isinstance(bins, list) else bins

    def baselines() -> dict:
        return {
            "rate": fisher.rate_information(theta, luminosity=ev.luminosity)[0],
            "histo": fisher.histo_information(theta, luminosity=ev.luminosity, observable=observable, bins=bins)[0],
        }

    config = {"theta": theta.tolist(), "luminosity": ev.luminosity, "observable": observable,
              "bins": np.asarray(bins).tolist(), "include_nuisance": cfg.sampling.include_nuisance}
    matrices = dict(baselines() if memo is None else memo("fisher", config, baselines))
    if method.family == "score" and model_file is not None:
        matrices["full"] = fisher.full_information(
            theta,
            str(model_file),
            luminosity=ev.luminosity,
            include_xsec_info=True,
            test_split=cfg.sampling.test_split,
            calculate_covariance=False,
        )[0]
    for kind, matrix in matrices.items():
        np.save(tmp / f"fisher_{kind}.npy", matrix)
    return fisher_metrics(matrices, list(info.parameters))


def fisher_metrics(matrices: dict[str, np.ndarray], parameters: list[str]) -> dict:
    """What the Fisher matrices say, as numbers that mean something (see docs/toy.md):

    * ``fisher_<histo|full>_sigma_<PARAM>``: expected 1 sigma, sqrt(diag(I^-1)), where I is invertible;
    * ``fisher_rate_eigenvalue``: the single non-zero eigenvalue of the rank-1 rate matrix;
    * ``fisher_full_gain_over_histo``: 0.5 log(det I_full / det I_histo), the information the score
      estimator adds over the histogram (score methods only; in nats, > 0 = better than the histogram).
    """
    metrics: dict = {}
    if "rate" in matrices:
        metrics["fisher_rate_eigenvalue"] = float(np.max(np.linalg.eigvalsh(matrices["rate"])))
    dets = {}
    for kind in ("histo", "full"):
        if kind not in matrices:
            continue
        matrix = np.asarray(matrices[kind], dtype=np.float64)
        eigenvalues = np.linalg.eigvalsh(matrix)
        if eigenvalues.min() <= 1e-9 * max(eigenvalues.max(), 1e-300):
            log.info(
                "fisher_%s_sigma_* skipped: the %s Fisher matrix is singular (eigenvalues %s)",
                kind,
                kind,
                np.array2string(eigenvalues, precision=3),
            )
            continue
        sigmas = np.sqrt(np.diag(np.linalg.inv(matrix)))
        for name, sigma in zip(parameters, sigmas):
            metrics[f"fisher_{kind}_sigma_{name}"] = float(sigma)
        dets[kind] = np.linalg.slogdet(matrix)[1]
    if "full" in matrices:
        if len(dets) == 2:
            metrics["fisher_full_gain_over_histo"] = float(0.5 * (dets["full"] - dets["histo"]))
        else:
            log.info("fisher_full_gain_over_histo skipped: a Fisher matrix is singular")
    return metrics


def _test_predictions(cfg, method, info, model_file, tmp: Path, truth: truth_mod.ToyTruth | None = None) -> dict:
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
    x_true, _, _ = augmenter.sample_test(theta=to_madminer_theta_point(true_point), **common)
    np.save(tmp / "test_x.npy", x_true)
    metrics: dict = {}
    estimator_kind = cfg.training.estimator
    if method.family == "ratio":
        double = estimator_kind == "double_parameterized"
        x, theta0s, theta1s, _, r_xz, _, _ = augmenter.sample_train_ratio(
            theta0=to_madminer_theta(s.theta0), theta1=ratio_theta1(cfg, info), **common
        )
        if double:
            kwargs = dict(x=x, theta0=theta0s, theta1=theta1s, test_all_combinations=False)
        else:
            kwargs = dict(x=x, theta=theta0s, test_all_combinations=False)
        log_rs = [np.asarray(m.evaluate_log_likelihood_ratio(**kwargs)[0]).ravel() for m in members]
        log_r_xz = np.log(r_xz).ravel()
        np.save(tmp / "test_theta0.npy", theta0s)
        np.save(tmp / "test_log_r_xz.npy", log_r_xz)
        np.save(tmp / "test_log_r_est.npy", np.mean(log_rs, axis=0))
        metrics.update(
            with_spread(
                lambda log_r: {
                    "test_log_r_mse_vs_joint": float(np.mean((log_r - log_r_xz) ** 2)),
                    "test_log_r_corr_vs_joint": _corr(log_r, log_r_xz),
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
                        estimator, truth, x_true, theta_grid_of(cfg, info), reference, benchmark_points(info), tmp
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
            np.asarray(m.evaluate_log_likelihood(x=x_true, theta=true_point.reshape(1, -1))[0]).ravel()
            for m in members
        ]
        np.save(tmp / "test_log_p_theta_true.npy", np.mean(log_ps, axis=0))
        metrics.update(with_spread(lambda log_p: {"test_mean_log_likelihood": float(np.mean(log_p))}, log_ps))
        if truth is not None:
            metrics.update(
                truth_density_metrics(
                    estimator, truth, x_true, theta_grid_of(cfg, info), true_point, benchmark_points(info), tmp
                )
            )
    return metrics


def with_spread(compute, predictions: list) -> dict:
    """``compute(mean prediction)``; for an ensemble (several member predictions) also every metric's
    spread over the members, ``<metric>_ensemble_std`` (std of the metric computed per member)."""
    metrics = compute(np.mean(predictions, axis=0))
    if len(predictions) > 1:
        per_member = [compute(p) for p in predictions]
        for key in list(metrics):
            metrics[f"{key}_ensemble_std"] = float(np.std([m[key] for m in per_member]))
    return metrics


# --------------------------------------------------------------------------- truth metrics (toy files)
def truth_log_r_metrics(
    estimator, truth, x, grid, reference, points: dict[str, np.ndarray], tmp: Path | None = None
) -> dict:
    """MSE and correlation of estimated vs true log r(x | theta, reference) over the grid and at ``points``.

    ``x`` are test events (drawn at theta_true), ``reference`` the theta1 the estimator was trained against.
    """
    names = list(points)
    thetas = np.vstack([grid] + [np.reshape(points[n], (1, -1)) for n in names])
    predictions = [model_log_r_grid(m, x, thetas, reference) for m in estimators.members(estimator)]
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
    estimator, truth, x, grid, true_point, points: dict[str, np.ndarray], tmp: Path | None = None
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

    predictions = [model_log_likelihood_grid(m, x, thetas) for m in estimators.members(estimator)]
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
        "truth_score_corr": _corr(t_est.ravel(), exact.ravel()),
    }


def _log_r_comparison(estimated: np.ndarray, exact: np.ndarray, n_grid: int, names: list[str]) -> dict:
    est, true = estimated[:n_grid], exact[:n_grid]
    metrics = {
        "truth_log_r_mse": float(np.mean((est - true) ** 2)),
        "truth_log_r_corr": _corr(est.ravel(), true.ravel()),
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


def single_point(thetas) -> np.ndarray | None:
    """The one parameter point all rows of ``thetas`` share, or None."""
    thetas = np.asarray(thetas, dtype=np.float64)
    if len(thetas) == 0 or not np.allclose(thetas, thetas[0], rtol=1e-6, atol=1e-6):
        return None
    return thetas[0]


def benchmark_points(info: FileInfo) -> dict[str, np.ndarray]:
    """The file's (physics) benchmarks, by name: the named theta of the truth_log_r_mse_at_<name> metrics."""
    import h5py

    with h5py.File(info.path, "r") as f:
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in f["benchmarks/names"][()]]
        values = f["benchmarks/values"][()]
        nuisance = f["benchmarks/is_nuisance"][()] if "benchmarks/is_nuisance" in f else np.zeros(len(names))
    return {n: np.asarray(v, dtype=np.float64) for n, v, nu in zip(names, values, nuisance) if not nu}


# --------------------------------------------------------------------------- fast estimator evaluation
# MadMiner's test_all_combinations=True loops over thetas in Python and builds one tensor per event; for
# n_x events x n_theta grid points that takes minutes. These call the trained torch model directly in
# large batches, with the same input transformations as MadMiner's evaluate_* methods.
BATCH = 1 << 18


def model_log_r_grid(estimator, x, thetas, theta1) -> np.ndarray:
    """Estimated log r(x_j | theta_i, theta1), shape (n_thetas, n_x).

    For parameterized (and morphing-aware) ratio estimators theta1 is the reference they were trained against
    and is not an input; double-parameterized estimators take it as input. Ensembles: mean of the members.
    """
    from madminer.ml import DoubleParameterizedRatioEstimator, Ensemble

    if isinstance(estimator, Ensemble):
        return np.mean([model_log_r_grid(e, x, thetas, theta1) for e in estimator.estimators], axis=0)
    thetas = np.asarray(thetas, dtype=np.float64)
    if isinstance(estimator, DoubleParameterizedRatioEstimator):
        theta1s = np.array(np.broadcast_to(np.asarray(theta1, dtype=np.float64), thetas.shape))
        return _batched(estimator, x, thetas, theta1s, kind="double")
    return _batched(estimator, x, estimator._transform_parameters(thetas), None, kind="ratio")


def model_log_likelihood_grid(estimator, x, thetas) -> np.ndarray:
    """Estimated log p(x_j | theta_i) in the coordinates of x, shape (n_thetas, n_x).

    MadMiner's flows model the density of the *scaled* inputs (x - mean) / std; log p(x) adds -sum(log std).
    """
    from madminer.ml import Ensemble

    if isinstance(estimator, Ensemble):
        return np.mean([model_log_likelihood_grid(e, x, thetas) for e in estimator.estimators], axis=0)
    log_p = _batched(estimator, x, np.asarray(thetas, dtype=np.float64), None, kind="likelihood")
    if estimator.x_scaling_stds is not None:
        stds = np.asarray(estimator.x_scaling_stds, dtype=np.float64)
        if estimator.features is not None:
            stds = stds[estimator.features]
        log_p -= np.sum(np.log(stds))
    return log_p


def _batched(estimator, x, thetas, theta1s, kind: str) -> np.ndarray:
    import torch

    x = estimator._transform_inputs(np.array(x, dtype=np.float64))
    if estimator.features is not None:
        x = x[:, estimator.features]
    device = torch.device(app_device.current())  # training.device, applied by app.ml.device.use in run()
    model = estimator.model.to(device, torch.float)
    model.eval()
    xs = torch.as_tensor(x, dtype=torch.float, device=device)
    n_x, n_t = len(x), len(thetas)
    out = np.empty((n_t, n_x), dtype=np.float64)
    step = max(1, BATCH // max(1, n_x))
    with torch.no_grad():
        for start in range(0, n_t, step):
            stop = min(n_t, start + step)
            th = torch.as_tensor(thetas[start:stop], dtype=torch.float, device=device).repeat_interleave(n_x, 0)
            xx = xs.repeat(stop - start, 1)
            if kind == "ratio":
                value = model(th, xx, track_score=False, create_gradient_graph=False)[1]
            elif kind == "double":
                th1 = torch.as_tensor(theta1s[start:stop], dtype=torch.float, device=device)
                th1 = th1.repeat_interleave(n_x, 0)
                value = model(th, th1, xx, track_score=False, create_gradient_graph=False)[1]
            else:
                value = model.log_likelihood(th, xx)[1]
            out[start:stop] = value.reshape(stop - start, n_x).cpu().numpy()
    return out


def to_madminer_theta_point(theta: np.ndarray):
    from madminer.sampling import morphing_point

    return morphing_point(theta.tolist())


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    if np.std(a) == 0 or np.std(b) == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def load(results_dir: Path) -> EvaluateResult:
    return EvaluateResult(results_dir, read_json(results_dir / "metrics.json"))
