"""Fisher information at theta_true with MadMiner's FisherInformation: the rate and histogram information
(estimator-independent) and, for score estimators, the full information; and what the matrices say as metrics."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from app.domain.datafile import FileInfo
from app.domain.methods import Method
from app.domain.theta import theta_true

log = logging.getLogger(__name__)


def fisher_information(cfg: DictConfig, method: Method, info: FileInfo, model_file: Path, tmp: Path,
                       memo=None) -> dict:
    """Rate and histogram Fisher information at theta_true (through ``memo``: they do not depend on the
    estimator) and, for score methods, the full information of the estimator; ``fisher_<kind>.npy`` in ``tmp``
    and :func:`fisher_metrics`."""
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
    if method.family == "score":
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
