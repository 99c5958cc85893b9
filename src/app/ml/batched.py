"""Trained estimators evaluated on every (grid point, event) pair in large batches.

MadMiner's ``test_all_combinations=True`` loops over thetas in Python and builds one tensor per event; for
n_x events x n_theta grid points that takes minutes. These call the trained torch model directly in
large batches, with the transformations the estimator was trained with, on the device the caller names
(``training.device``, resolved by :func:`app.ml.device.use`). The truth metrics and the batched ``ml`` limits
(:mod:`app.ml.madminer_patches`) use them.

Training standardises theta (``scale_parameters=True``: mean and std of the training thetas) for every
parameterized estimator, but MadMiner 0.9.6 applies that transform at evaluation only for
ParameterizedRatioEstimator: ``LikelihoodEstimator.evaluate_log_likelihood`` and
``DoubleParameterizedRatioEstimator.evaluate_log_likelihood_ratio`` feed raw theta to a network trained on scaled
theta (docs/madminer-bugs.md). Here every estimator gets :func:`parameter_inputs`.
"""

from __future__ import annotations

import numpy as np

BATCH = 1 << 18  # (grid point, event) pairs per forward pass


def model_log_r_grid(estimator, x, thetas, theta1, device: str = "cpu") -> np.ndarray:
    """Estimated log r(x_j | theta_i, theta1), shape (n_thetas, n_x).

    For parameterized (and morphing-aware) ratio estimators theta1 is the reference they were trained against
    and is not an input; double-parameterized estimators take it as input. Ensembles: mean of the members.
    """
    from madminer.ml import DoubleParameterizedRatioEstimator, Ensemble

    if isinstance(estimator, Ensemble):
        return np.mean([model_log_r_grid(e, x, thetas, theta1, device) for e in estimator.estimators], axis=0)
    thetas = np.asarray(thetas, dtype=np.float64)
    if isinstance(estimator, DoubleParameterizedRatioEstimator):
        theta1s = np.array(np.broadcast_to(np.asarray(theta1, dtype=np.float64), thetas.shape))
        return _batched(
            estimator, x, parameter_inputs(estimator, thetas), parameter_inputs(estimator, theta1s), "double", device
        )
    return _batched(estimator, x, parameter_inputs(estimator, thetas), None, "ratio", device)


def model_log_likelihood_grid(estimator, x, thetas, device: str = "cpu") -> np.ndarray:
    """Estimated log p(x_j | theta_i) in the coordinates of x, shape (n_thetas, n_x).

    MadMiner's flows model the density of the *scaled* inputs (x - mean) / std; log p(x) adds -sum(log std)
    (:func:`log_input_scaling`).
    """
    from madminer.ml import Ensemble

    if isinstance(estimator, Ensemble):
        return np.mean([model_log_likelihood_grid(e, x, thetas, device) for e in estimator.estimators], axis=0)
    log_p = _batched(estimator, x, parameter_inputs(estimator, thetas), None, "likelihood", device)
    if estimator.x_scaling_stds is not None:
        log_p -= log_input_scaling(estimator)
    return log_p


def parameter_inputs(estimator, thetas) -> np.ndarray:
    """theta as the estimator's network saw it in training: (theta - mean) / std of the training thetas where it
    was trained with ``scale_parameters=True`` (MadMiner saves both with the model), else theta itself."""
    thetas = np.array(thetas, dtype=np.float64, ndmin=2)
    means = getattr(estimator, "theta_scaling_means", None)
    stds = getattr(estimator, "theta_scaling_stds", None)
    if means is None or stds is None:
        return thetas
    return (thetas - np.asarray(means, dtype=np.float64)) / np.asarray(stds, dtype=np.float64)


def log_input_scaling(estimator) -> float:
    """sum(log std) of the estimator's input scaling (0 without one): the log Jacobian between MadMiner's scaled
    inputs and the observables."""
    if estimator.x_scaling_stds is None:
        return 0.0
    stds = np.asarray(estimator.x_scaling_stds, dtype=np.float64)
    if estimator.features is not None:
        stds = stds[estimator.features]
    return float(np.sum(np.log(stds)))


def _batched(estimator, x, thetas, theta1s, kind: str, device: str) -> np.ndarray:
    import torch

    x = estimator._transform_inputs(np.array(x, dtype=np.float64))
    if estimator.features is not None:
        x = x[:, estimator.features]
    device = torch.device(device)
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
