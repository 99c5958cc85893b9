"""Build, load and evaluate MadMiner estimators by ``training.estimator`` name.

madminer 0.9.6's ``load_estimator`` cannot restore morphing-aware estimators (their settings say
``parameterized_ratio``), and its AsymptoticLimits ``ml`` mode only evaluates single-parameterized
ratio and likelihood estimators, one grid point at a time. :func:`load` restores every estimator this
project trains from ``model.json``; :func:`limits_class` gives AsymptoticLimits a batched ``ml`` mode
that also evaluates double-parameterized estimators.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from app.domain.methods import ESTIMATORS as CLASSES  # training.estimator -> madminer.ml class name
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
    with _weights_only():
        if meta["n_estimators"] > 1:
            folder = Path(model_dir) / meta["model_name"]
            members = []
            for i in range(meta["n_estimators"]):
                member = cls()
                member.load(str(folder / f"estimator_{i}"))
                members.append(member)
            return ml.Ensemble(members)
        estimator = cls()
        estimator.load(str(Path(model_dir) / meta["model_name"]))
        return estimator


@contextmanager
def _weights_only():
    """MadMiner's ``load`` calls ``torch.load(path, map_location="cpu")``: make it ``weights_only=True`` on every
    torch version (the default only from torch 2.6), so a model file can hold tensors but never code."""
    import functools

    import torch

    original = torch.load
    torch.load = functools.partial(original, weights_only=True)
    try:
        yield
    finally:
        torch.load = original


def members(estimator) -> list:
    """The members of an Ensemble, or ``[estimator]``."""
    from madminer.ml import Ensemble

    return list(estimator.estimators) if isinstance(estimator, Ensemble) else [estimator]


def score(estimator, x):
    """The estimated score t(x), shape (n_events, n_parameters); for an Ensemble the mean of its members.

    (``Ensemble.evaluate_score`` returns a (mean, covariance) tuple, ``ScoreEstimator.evaluate_score`` an array.)
    """
    import numpy as np

    return np.mean([np.asarray(m.evaluate_score(x=x), dtype=np.float64) for m in members(estimator)], axis=0)


@contextmanager
def madminer_loads_from(model_dir: Path):
    """Let MadMiner's AsymptoticLimits / FisherInformation load the model through :func:`load`."""
    import madminer.fisherinformation.information as information
    import madminer.limits.asymptotic_limits as asymptotic_limits

    modules = [m for m in (asymptotic_limits, information) if hasattr(m, "load_estimator")]
    originals = [m.load_estimator for m in modules]
    for m in modules:
        m.load_estimator = lambda _filename: load(model_dir)
    try:
        yield
    finally:
        for m, original in zip(modules, originals):
            m.load_estimator = original


def limits_class():
    """AsymptoticLimits whose ``ml`` mode evaluates the estimator in large batches.

    MadMiner's ``_calculate_log_likelihood_ratio_kinematics`` calls the estimator once per grid point (and
    does not evaluate double-parameterized ratio estimators). This one evaluates every (grid point, event)
    pair through the trained torch model in large batches (``model_log_r_grid`` /
    ``model_log_likelihood_grid`` of the evaluate stage) and returns what MadMiner's returns: log r(x | theta,
    reference) for ratio estimators, MadMiner's log p(x | theta) (of the scaled inputs) for likelihood
    estimators, the mean over the members of an Ensemble. tests/test_limits_batched.py compares the p-values.
    """
    from madminer.limits import AsymptoticLimits
    from madminer.ml import DoubleParameterizedRatioEstimator as Double
    from madminer.ml import Ensemble, LikelihoodEstimator, ParameterizedRatioEstimator

    def kind(model):
        members = model.estimators if isinstance(model, Ensemble) else [model]
        if all(isinstance(m, (ParameterizedRatioEstimator, Double)) for m in members):
            return "ratio"
        if all(isinstance(m, LikelihoodEstimator) for m in members):
            return "likelihood"
        return None

    class Limits(AsymptoticLimits):
        def _fixed_adaptive_binning(self, n_toys, processor, summary_function, test_split, thetas_binning, x_bins):
            """MadMiner's binning, from the weights averaged over the grid, without its (grid points x events)
            weight matrix (5 GB for 625 points and 10^6 events). The weights are linear in the morphing matrix,
            so their mean over the grid is the mean matrix times the benchmark weights: the same edges."""
            import numpy as np
            from madminer.utils.histo import Histo
            from madminer.utils.various import mdot

            if self.include_nuisance_parameters:
                return super()._fixed_adaptive_binning(n_toys, processor, summary_function, test_split,
                                                       thetas_binning, x_bins)  # fmt: skip
            start, end, _ = self._calculate_partition_bounds("train", test_split)
            x, weights_benchmarks = self.weighted_events(start_event=start, end_event=end, n_draws=n_toys)
            summary_stats = summary_function(x)
            matrix = np.mean([self._get_theta_benchmark_matrix(t) for t in thetas_binning], axis=0)
            weights = mdot(matrix, weights_benchmarks)
            data = summary_stats if processor is None else processor(summary_stats, thetas_binning)
            return Histo(data, weights, x_bins, epsilon=1.0e-12).edges

        def _calculate_log_likelihood_ratio_kinematics(self, x_observed, theta_grid, model, theta1=None):
            import numpy as np

            from app.stages.evaluate import model_log_likelihood_grid, model_log_r_grid

            what = kind(model)
            if what is None:
                return super()._calculate_log_likelihood_ratio_kinematics(x_observed, theta_grid, model, theta1)
            theta_grid = np.asarray(theta_grid, dtype=np.float64)
            if what == "ratio":
                # double-parameterized: log r(x | theta, reference) for a fixed reference (MadMiner passes
                # theta_true); differences over the grid, all that the limits use, do not depend on it.
                reference = np.zeros(theta_grid.shape[1]) if theta1 is None else np.asarray(theta1, np.float64)
                return model_log_r_grid(model, x_observed, theta_grid, reference)
            members = model.estimators if isinstance(model, Ensemble) else [model]
            return np.mean([model_log_likelihood_grid(m, x_observed, theta_grid) + _log_jacobian(m) for m in members],
                           axis=0)  # fmt: skip

    return Limits


def _log_jacobian(estimator) -> float:
    """sum(log std) of the input scaling: MadMiner's flow log likelihood is that of the scaled inputs."""
    import numpy as np

    if estimator.x_scaling_stds is None:
        return 0.0
    stds = np.asarray(estimator.x_scaling_stds, dtype=np.float64)
    if estimator.features is not None:
        stds = stds[estimator.features]
    return float(np.sum(np.log(stds)))
