"""Fisher information with MadMiner's FisherInformation: the rate and histogram information at theta_true
(estimator-independent) and, for score estimators, the full information at the point the estimator was trained at;
and what the matrices say as metrics."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from app.domain.datafile import FileInfo
from app.domain.methods import Method
from app.domain.theta import theta_true, training_point

log = logging.getLogger(__name__)


def fisher_information(cfg: DictConfig, method: Method, info: FileInfo, model_file: Path, tmp: Path,
                       memo=None) -> dict:
    """Rate and histogram Fisher information at theta_true (through ``memo``: they do not depend on the
    estimator) and, for score methods, the full information of the estimator; ``fisher_<kind>.npy`` in ``tmp``
    and :func:`fisher_metrics`.

    A score estimator learned t(x | theta_s) at its training point theta_s (``sampling.theta``), and MadMiner's
    full information uses it as the score at whatever theta it is given: it is the full information at theta_s
    only. So it is computed there; where theta_s is not theta_true, the histogram information it is compared with
    (``fisher_full_gain_over_histo``) is computed at theta_s too, and one log line says so
    (``fisher_full_theta.npy`` holds theta_s)."""
    from madminer.fisherinformation import FisherInformation

    ev = cfg.evaluation
    fisher = FisherInformation(str(info.path), include_nuisance_parameters=cfg.sampling.include_nuisance)
    theta = theta_true(cfg, info)
    observable = ev.fisher.observable or info.observables[0]
    bins = OmegaConf.to_container(ev.fisher, resolve=True)["bins"]
    bins = np.asarray(bins, dtype=float) if isinstance(bins, list) else bins

    def baselines(at: np.ndarray) -> dict:
        def compute() -> dict:
            return {
                "rate": fisher.rate_information(at, luminosity=ev.luminosity)[0],
                "histo": fisher.histo_information(at, luminosity=ev.luminosity, observable=observable, bins=bins)[0],
            }

        config = {
            "theta": at.tolist(),
            "luminosity": ev.luminosity,
            "observable": observable,
            "bins": np.asarray(bins).tolist(),
            "include_nuisance": cfg.sampling.include_nuisance,
        }
        return dict(compute() if memo is None else memo("fisher", config, compute))

    matrices = baselines(theta)
    gain_reference = matrices
    if method.family == "score":
        trained_at = training_point(cfg, info)
        if not np.allclose(trained_at, theta):
            log.info(
                "full Fisher information at the score estimator's training point %s (sampling.theta), not at "
                "theta_true %s: its score is t(x | %s); fisher_full_gain_over_histo compares it with the histogram "
                "information there",
                trained_at.tolist(), theta.tolist(), trained_at.tolist(),
            )  # fmt: skip
            gain_reference = baselines(trained_at)
        np.save(tmp / "fisher_full_theta.npy", trained_at)
        matrices["full"] = fisher.full_information(
            trained_at,
            str(model_file),
            luminosity=ev.luminosity,
            include_xsec_info=True,
            test_split=cfg.sampling.test_split,
            calculate_covariance=False,
        )[0]
    for kind, matrix in matrices.items():
        np.save(tmp / f"fisher_{kind}.npy", matrix)
    metrics = fisher_metrics(matrices, list(info.parameters))
    if gain_reference is not matrices:
        at_training_point = fisher_metrics({"histo": gain_reference["histo"], "full": matrices["full"]}, [])
        metrics.pop("fisher_full_gain_over_histo", None)
        if "fisher_full_gain_over_histo" in at_training_point:
            metrics["fisher_full_gain_over_histo"] = at_training_point["fisher_full_gain_over_histo"]
    return metrics


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
