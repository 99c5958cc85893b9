"""Evaluation stage: expected limits, Fisher information and predictions on test data, into ``<run>/results``.

The test predictions, the truth metrics and the limits' Asimov data and cross sections read MadMiner's *test*
partition (``partition="test"`` / ``test_split``). One exception: MadMiner's histogram modes (``histo``, ``sally``,
``sallino``, ``adaptive_sally``) fill their histograms, and find their adaptive binning, with the events of
MadMiner's *train* range (``AsymptoticLimits._make_weighted_histo_data``: everything but the test split, so the
training and validation partitions), which hold the events of the estimator's own training samples: a SALLY
limit's histograms of the learned score are filled with SALLY's training events (Monte Carlo statistics that the
score was fitted on, not an independent sample). Writes .npy arrays, ``limits.json`` (the limit runs, for the plots)
and ``metrics.json`` atomically. The work is done in :mod:`app.evaluation`: :mod:`~app.evaluation.limits`,
:mod:`~app.evaluation.fisher`, :mod:`~app.evaluation.predictions`.

On a toy file (:mod:`app.toy.simulator`, whose likelihood is known exactly: :mod:`app.toy.truth`) it also compares
the estimator and the limits with the truth: the ``truth_*`` metrics (:mod:`app.evaluation.truth_metrics`, see
``docs/toy.md``). On any other file they are absent and one log line says why.

Ensembles (``training.n_estimators > 1``): metrics of the estimator's predictions use the ensemble
mean, and each such metric ``<m>`` also comes as ``<m>_ensemble_std``, the spread of ``<m>`` over
the members. Limits use MadMiner's ensemble mean (no per-member limits).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from app.domain import seeds
from app.domain.datafile import FileInfo
from app.domain.methods import Method
from app.domain.theta import describe_theta_true
from app.evaluation.fisher import fisher_information
from app.evaluation.limits import expected_limits, limit_runs
from app.evaluation.predictions import test_predictions
from app.evaluation.truth_metrics import truth_for
from app.ml import device, estimators, madminer_patches
from app.store.files import atomic_dir, read_json, write_json

log = logging.getLogger(__name__)


@dataclass
class EvaluateResult:
    results_dir: Path
    metrics: dict = field(default_factory=dict)


def run(
    cfg: DictConfig,
    method: Method,
    info: FileInfo,
    model_file: Path,
    out_dir: Path,
    train_metrics: dict | None = None,
    memo=None,
) -> EvaluateResult:
    """Limits, Fisher information and test predictions; ``metrics.json`` also holds ``train_metrics``.

    ``memo(name, config, compute)``, when given, returns ``compute()`` (a dict of arrays) for the results that do
    not depend on the estimator (rate and histogram limits, their Fisher information), computed once per data file
    and ``config`` (the pipeline backs it with the stage cache).
    """
    madminer_patches.apply_numpy_shim()
    target = out_dir / "results"
    metrics: dict = dict(train_metrics or {})
    truth = truth_for(cfg, info)
    log.info(describe_theta_true(cfg, info))
    with (
        madminer_patches.events_in_memory(),
        madminer_patches.reused_bin_search(),
        madminer_patches.estimators_loaded_by(lambda _file: estimators.load(model_file.parent)),
        atomic_dir(target) as tmp,
        device.use(cfg.training.device) as name,
    ):
        # Each part draws from its own seed (each limit from one of its own, in expected_limits): a part's numbers do
        # not depend on whether another part was computed or read from the stage cache before it (docs/cache.md).
        with seeds.numpy_global(cfg.sampling.seed, "evaluate", "limits"):
            metrics.update(expected_limits(cfg, method, info, model_file, tmp, truth, memo, name))
        if cfg.evaluation.fisher.enabled:
            with seeds.numpy_global(cfg.sampling.seed, "evaluate", "fisher"):
                metrics.update(fisher_information(cfg, method, info, model_file, tmp, memo))
        with seeds.numpy_global(cfg.sampling.seed, "evaluate", "test_predictions"):
            metrics.update(test_predictions(cfg, method, info, model_file, tmp, truth, name))
        write_json(tmp / "limits.json", {"runs": [list(r) for r in limit_runs(cfg, method)]})
        write_json(tmp / "metrics.json", metrics)
    return EvaluateResult(target, metrics)


def load(results_dir: Path) -> EvaluateResult:
    return EvaluateResult(results_dir, read_json(results_dir / "metrics.json"))
