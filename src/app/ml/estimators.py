"""Build and load MadMiner estimators by ``training.estimator`` name.

madminer 0.9.6's ``load_estimator`` cannot restore morphing-aware estimators (their settings say
``parameterized_ratio``): :func:`load` restores every estimator this project trains from ``model.json``, with
``torch.load(weights_only=True)``. Their batched evaluation on grids is :mod:`app.ml.batched`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from app.domain.methods import ESTIMATORS as CLASSES  # training.estimator -> madminer.ml class name
from app.ml import madminer_patches
from app.store.files import read_json


def build(training_cfg, data_path: Path):
    """A fresh, untrained estimator for ``training.estimator``."""
    from madminer import ml

    t = training_cfg
    kind = t.estimator
    net = dict(n_hidden=tuple(t.n_hidden), activation=t.activation)
    if kind == "likelihood":
        return ml.LikelihoodEstimator(n_mades=t.n_mades, n_components=t.n_components, **net)
    net["dropout_prob"] = t.dropout_prob
    if kind == "morphing_aware":
        return ml.MorphingAwareRatioEstimator(morphing_setup_filename=str(data_path), **net)
    return getattr(ml, CLASSES[kind])(**net)


def load(model_dir: Path):
    """The trained estimator (or Ensemble) saved in ``model_dir`` by the train stage."""
    from madminer import ml

    meta = read_json(Path(model_dir) / "model.json")
    cls = getattr(ml, CLASSES[meta["estimator"]])
    with madminer_patches.weights_only_loads():
        if meta["n_estimators"] > 1:
            folder = Path(model_dir) / meta["model_name"]
            members = []
            for i in range(meta["n_estimators"]):
                member = cls()
                member.load(str(folder / f"estimator_{i}"))
                members.append(member)
            return madminer_patches.observable_input_scaling(ml.Ensemble(members))
        estimator = cls()
        estimator.load(str(Path(model_dir) / meta["model_name"]))
        return madminer_patches.observable_input_scaling(estimator)


def members(estimator) -> list:
    """The members of an Ensemble, or ``[estimator]``."""
    from madminer.ml import Ensemble

    return list(estimator.estimators) if isinstance(estimator, Ensemble) else [estimator]


def score(estimator, x):
    """The estimated score t(x), shape (n_events, n_parameters); for an Ensemble the mean of its members.

    (``Ensemble.evaluate_score`` returns a (mean, covariance) tuple, ``ScoreEstimator.evaluate_score`` an array.)
    """
    return np.mean([np.asarray(m.evaluate_score(x=x), dtype=np.float64) for m in members(estimator)], axis=0)
