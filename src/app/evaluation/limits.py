"""Expected limits with MadMiner's AsymptoticLimits (its batched version,
:func:`app.ml.madminer_patches.batched_limits`), and on a toy file their comparison with the limits of the exact
likelihood on the same Asimov data.

The Asimov data and cross sections come from MadMiner's *test* partition (``test_split``); the histograms of the
histogram modes from its train range (see :mod:`app.stages.evaluate`). One run per requested mode and cross-section
variant (:func:`limit_runs`); each writes ``p_values_<key>.npy`` and ``best_fit_<key>.npy`` and gives the
``limits_<key>_*`` metrics (``truth_limits_<key>_*`` on a toy file).
"""

from __future__ import annotations

import logging
import zlib
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from app.domain.datafile import FileInfo
from app.domain.methods import LIMIT_MODES, MODEL_MODES, THETAREF_MODES, Method
from app.domain.stats import CL68_P_VALUE, cl_regions
from app.domain.theta import grid_ranges, grid_resolutions, theta_true, training_point
from app.domain.validate import limit_modes
from app.ml import madminer_patches
from app.toy.truth import ToyTruth, compare_regions

log = logging.getLogger(__name__)

FEW_EVENTS = 10  # warn when fewer events are expected at theta_true
LIMIT_RESULTS = ("theta_grid", "p_values", "i_ml", "llr_kin", "llr_rate")
# Histograms are filled for this many grid points at a time (MadMiner's default, 1000, holds a weight for every
# grid point and event at once: 4 GB at 10^6 events). Every histogram mode: MadMiner's batched loop pairs each batch
# with the first grid points, which batched_limits corrects (it matters for sallino and adaptive-sally, whose data
# are transformed per grid point).
HISTO_THETA_BATCH = 64


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


def expected_limits(
    cfg: DictConfig,
    method: Method,
    info: FileInfo,
    model_file: Path,
    tmp: Path,
    truth: ToyTruth | None = None,
    memo=None,
    device: str = "cpu",
) -> dict:
    """Every run of :func:`limit_runs` into ``tmp``; returns the limit metrics (and the truth comparison's).

    ``memo(name, config, compute)``: see :func:`app.stages.evaluate.run`. ``model_file`` must be loadable by
    MadMiner (the evaluate stage wraps this in :func:`app.ml.madminer_patches.estimators_loaded_by`).
    """
    ev = cfg.evaluation
    limits = madminer_patches.batched_limits()(
        str(info.path), include_nuisance_parameters=cfg.sampling.include_nuisance, device=device
    )
    true_point = theta_true(cfg, info)
    resolutions = grid_resolutions(cfg, info)
    hist_bins = OmegaConf.to_container(ev, resolve=True)["hist_bins"]
    hist_vars = list(ev.hist_vars) if ev.hist_vars else [info.observables[0]]
    metrics = {}
    theta_grid = None
    true_limits: dict = {}  # (include kinematics, include xsec) -> truth.ExpectedLimits
    log_expected_events(cfg, limits, true_point)
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
                kwargs.update(
                    hist_bins=hist_bins, n_histo_toys=None, n_binning_toys=None, histo_theta_batchsize=HISTO_THETA_BATCH
                )
            if name in THETAREF_MODES:
                kwargs["thetaref"] = training_point(cfg, info)
        theta_grid, p_values, i_ml, llr_kin, llr_rate = _memoised(limits, kwargs, cfg.sampling.seed, memo)
        i_ml = int(i_ml)
        np.save(tmp / f"p_values_{key}.npy", p_values)
        np.save(tmp / f"best_fit_{key}.npy", theta_grid[i_ml])
        metrics[f"limits_{key}_cl68_fraction"] = float(np.mean(p_values > CL68_P_VALUE))
        estimated = np.broadcast_to(np.asarray(llr_kin + llr_rate, dtype=np.float64), p_values.shape)
        region = cl_regions(theta_grid, [estimated])
        metrics[f"limits_{key}_cl68_area"] = region.size()
        metrics[f"limits_{key}_cl68_touches_edge"] = float(region.touches_edge[0])
        if region.touches_edge[0]:
            log.warning(
                "limits %s: the 68%% CL region reaches the edge of the grid, so its area %.3g is only a lower bound; "
                "widen evaluation.grid.ranges",
                key,
                region.size(),
            )
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
                true_limits[variant] = _true_limits(cfg, limits, truth, theta_grid, true_point, *variant, llr_rate)
            exact = true_limits[variant]
            np.save(tmp / f"log_likelihood_{key}.npy", estimated)
            np.save(tmp / f"truth_log_likelihood_{key}.npy", exact.log_likelihood)
            np.save(tmp / f"truth_p_values_{key}.npy", exact.p_values)
            np.save(tmp / f"truth_best_fit_{key}.npy", exact.best_fit)
            iou, distance = compare_regions(theta_grid, estimated, exact.log_likelihood)
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


def _memoised(limits, kwargs: dict, seed: int, memo) -> tuple:
    """AsymptoticLimits.expected_limits, with a fixed random state per limit; through ``memo`` for the limits that
    do not depend on the estimator (no model_file), so a sweep computes them once."""

    def compute() -> dict:
        np.random.seed((seed + zlib.crc32(str(kwargs["mode"]).encode()) + int(kwargs["include_xsec"])) % 2**32)
        return dict(zip(LIMIT_RESULTS, limits.expected_limits(**kwargs)[:5]))

    if memo is None or "model_file" in kwargs:
        found = compute()
    else:
        config = {k: np.asarray(v).tolist() if isinstance(v, np.ndarray) else v for k, v in kwargs.items()}
        found = memo("limits", {**config, "seed": seed}, compute)
    return tuple(found[name] for name in LIMIT_RESULTS)


def expected_events(cfg: DictConfig, limits, true_point: np.ndarray) -> tuple[float, float]:
    """(n, sigma): the expected number of events at theta_true, L x sigma with MadMiner's Monte Carlo cross section
    of the test partition, as AsymptoticLimits computes it (``_calculate_xsecs`` with its default test split)."""
    xsec = float(limits._calculate_xsecs([true_point])[0])
    return cfg.evaluation.luminosity * xsec, xsec


def log_expected_events(cfg: DictConfig, limits, true_point: np.ndarray) -> None:
    """The expected number of events at theta_true (L x sigma, MadMiner's test-partition cross section)."""
    n_events, xsec = expected_events(cfg, limits, true_point)
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


def _true_limits(cfg, limits, truth, theta_grid, true_point, kinematics: bool, include_xsec: bool, llr_rate):
    """The true expected limits on the same Asimov data (test-partition events reweighted to theta_true).

    A kinematic limit's truth keeps MadMiner's event count n and rate term ``llr_rate`` (both from its Monte Carlo
    cross section) and replaces only the kinematic log-likelihood, the part an estimator estimates, by the exact
    one: an exact estimator reaches IoU 1. The rate limit's truth is the exact cross section (its IoU measures
    MadMiner's Monte Carlo sigma(theta), the only thing that limit estimates).
    """
    shared = {}
    if kinematics:
        shared["n_events"] = expected_events(cfg, limits, true_point)[0]
        shared["log_rate"] = llr_rate if include_xsec else None
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
        **shared,
    )
