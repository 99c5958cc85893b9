"""The one table: MadMiner method -> family, sampling kind, estimators, training inputs, loss terms, own limit mode.

Sampling, training, evaluation, the metric table (``app.domain.metrics``) and config checks all read this
table; nothing else lists methods, estimators or limit modes: the config schema's choices (``app.config``) and
the estimator classes (``app.ml.estimators``) are derived from :data:`ESTIMATORS` and :data:`LIMIT_MODES` below.
This module imports nothing heavy (``--help`` reads it).
"""

from __future__ import annotations

from dataclasses import dataclass

from app.errors import UserError

# training.estimator -> the madminer.ml class that implements it
ESTIMATORS: dict[str, str] = {
    "parameterized": "ParameterizedRatioEstimator",
    "double_parameterized": "DoubleParameterizedRatioEstimator",
    "morphing_aware": "MorphingAwareRatioEstimator",
    "quadratic_morphing_aware": "QuadraticMorphingAwareRatioEstimator",
    "score": "ScoreEstimator",
    "likelihood": "LikelihoodEstimator",
}
RATIO_ESTIMATORS = ("parameterized", "double_parameterized", "morphing_aware", "quadratic_morphing_aware")


@dataclass(frozen=True)
class Method:
    name: str
    family: str  # "ratio" | "score" | "density"
    sampling: str  # the sampling kind it trains on: "ratio" | "local" | "density"
    estimators: tuple[str, ...]  # allowed estimators
    needs_r_xz: bool
    needs_t_xz: bool
    limit_mode: str  # the AsymptoticLimits mode that uses the trained model
    # MadMiner 0.9.6's loss terms, in its order (madminer.utils.ml.utils.get_loss; tests/test_metrics.py checks
    # them): the first is never weighted by alpha, the others (the score terms) are
    loss_terms: tuple[str, ...]

    def check_estimator(self, estimator: str) -> None:

        if estimator not in self.estimators:
            raise UserError(
                f"training.estimator={estimator} cannot train method {self.name}; "
                f"use one of: {', '.join(self.estimators)}"
            )


def _ratio(name: str, r_xz: bool, t_xz: bool, loss_terms: tuple[str, ...]) -> Method:
    return Method(name, "ratio", "ratio", RATIO_ESTIMATORS, r_xz, t_xz, "ml", loss_terms)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        _ratio("carl", r_xz=False, t_xz=False, loss_terms=("xe",)),
        _ratio("rolr", r_xz=True, t_xz=False, loss_terms=("mse_r",)),
        _ratio("alice", r_xz=True, t_xz=False, loss_terms=("improved_xe",)),
        _ratio("rascal", r_xz=True, t_xz=True, loss_terms=("mse_r", "mse_score")),
        _ratio("cascal", r_xz=False, t_xz=True, loss_terms=("xe", "mse_score")),
        _ratio("alices", r_xz=True, t_xz=True, loss_terms=("improved_xe", "mse_score")),
        Method("sally", "score", "local", ("score",), False, True, "sally", ("mse_score",)),
        Method("sallino", "score", "local", ("score",), False, True, "sallino", ("mse_score",)),
        Method("nde", "density", "density", ("likelihood",), False, False, "ml", ("nll",)),
        Method("scandal", "density", "density", ("likelihood",), False, True, "ml", ("nll", "mse_score")),
    )
}

# evaluation.modes spelling (also the key of its results and metrics) -> AsymptoticLimits' mode.
LIMIT_MODES: dict[str, str] = {
    "rate": "rate",
    "histo": "histo",
    "ml": "ml",
    "sally": "sally",
    "sallino": "sallino",
    "adaptive_sally": "adaptive-sally",
}

# Limit modes (config spelling) that need a trained model of a given family.
MODEL_MODES = {
    "ml": ("ratio", "density"),
    "sally": ("score",),
    "sallino": ("score",),
    "adaptive_sally": ("score",),
}
# Score-histogram modes whose statistic h = t(x) . (theta - thetaref) needs the training point thetaref.
THETAREF_MODES = ("sallino", "adaptive_sally")


def get_method(name: str) -> Method:

    try:
        return METHODS[name]
    except KeyError:
        raise UserError(
            f"unknown training.method={name}; choose a preset with training=NAME, one of: {', '.join(METHODS)}"
        ) from None
