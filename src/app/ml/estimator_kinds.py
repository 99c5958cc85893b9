"""What differs per MadMiner estimator class when the fast trainer (:mod:`app.ml.fasttrain`) trains it.

Each supported class maps to a :class:`Kind`: which ``train()`` arguments hold arrays, which of them are rescaled
like parameters or scores, the loss suffix for MadMiner's ``get_loss``, and three functions taken from (or
written after) the estimator's own ``train()``: packaging the arrays (``_package_training_data``), the check of
required inputs (``_check_required_data``) and the forward pass that gives MadMiner's loss terms.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Kind:
    """How one MadMiner estimator class turns ``train()`` arguments into training data and losses."""

    inputs: tuple[str, ...]  # train() arguments holding arrays, in _package_training_data order
    thetas: tuple[str, ...]  # rescaled with the parameter transform
    scores: tuple[str, ...]  # rescaled with the score transform
    loss_suffix: str  # get_loss(method + suffix)
    package: Callable  # (estimator, method, arrays) -> OrderedDict as _package_training_data returns
    check: Callable  # (estimator, method, arrays) -> None, the estimator's _check_required_data
    forward: Callable  # (model, batch, loss_functions, create_graph) -> list of loss tensors


def ratio_forward(model, batch, loss_functions, create_graph):
    score = "t_xz" in batch
    theta = batch["theta"].detach().requires_grad_(score)
    s_hat, log_r_hat, t_hat = model(
        theta, batch["x"], track_score=score, return_grad_x=False, create_gradient_graph=create_graph
    )
    args = (s_hat, log_r_hat, t_hat, None, batch["y"], batch.get("r_xz"), batch.get("t_xz"), None)
    return [f(*args) for f in loss_functions]


def double_forward(model, batch, loss_functions, create_graph):
    score = "t_xz0" in batch or "t_xz1" in batch
    theta0 = batch["theta0"].detach().requires_grad_(score)
    theta1 = batch["theta1"].detach().requires_grad_(score)
    # always with the gradient graph: the model takes two gradients of the same output, the second needs it
    s_hat, log_r_hat, t_hat0, t_hat1 = model(
        theta0, theta1, batch["x"], track_score=score, return_grad_x=False, create_gradient_graph=True
    )
    args = (s_hat, log_r_hat, t_hat0, t_hat1, batch["y"], batch.get("r_xz"), batch.get("t_xz0"), batch.get("t_xz1"))
    return [f(*args) for f in loss_functions]


def score_forward(model, batch, loss_functions, create_graph):
    t_hat = model(batch["x"])
    return [f(t_hat, batch["t_xz"]) for f in loss_functions]


def flow_forward(model, batch, loss_functions, create_graph):
    if "t_xz" in batch:
        theta = batch["theta"].detach().requires_grad_(True)
        _, log_likelihood, t_hat = model.log_likelihood_and_score(theta, batch["x"])
    else:
        _, log_likelihood = model.log_likelihood(batch["theta"], batch["x"])
        t_hat = None
    return [f(log_likelihood, t_hat, batch.get("t_xz")) for f in loss_functions]


def kinds() -> dict[type, Kind]:
    from madminer import ml

    a = lambda arrays, *names: [arrays.get(n) for n in names]  # noqa: E731
    ratio = Kind(
        inputs=("x", "theta", "y", "r_xz", "t_xz"),
        thetas=("theta",),
        scores=("t_xz",),
        loss_suffix="",
        package=lambda e, m, d: e._package_training_data(m, *a(d, "x", "theta", "y", "r_xz", "t_xz")),
        check=lambda e, m, d: e._check_required_data(m, *a(d, "r_xz", "t_xz")),
        forward=ratio_forward,
    )
    double = Kind(
        inputs=("x", "theta0", "theta1", "y", "r_xz", "t_xz0", "t_xz1"),
        thetas=("theta0", "theta1"),
        scores=("t_xz0", "t_xz1"),
        loss_suffix="2",
        package=lambda e, m, d: e._package_training_data(m, *a(d, *double.inputs)),
        check=lambda e, m, d: e._check_required_data(m, *a(d, "r_xz", "t_xz0", "t_xz1")),
        forward=double_forward,
    )
    score = Kind(
        inputs=("x", "t_xz"),
        thetas=(),
        scores=(),
        loss_suffix="",
        package=lambda e, m, d: e._package_training_data(*a(d, "x", "t_xz")),
        check=lambda e, m, d: None,
        forward=score_forward,
    )
    likelihood = Kind(
        inputs=("x", "theta", "t_xz"),
        thetas=("theta",),
        scores=("t_xz",),
        loss_suffix="",
        package=lambda e, m, d: e._package_training_data(m, *a(d, "x", "theta", "t_xz")),
        check=lambda e, m, d: e._check_required_data(m, d.get("t_xz")),
        forward=flow_forward,
    )
    return {
        ml.ParameterizedRatioEstimator: ratio,
        ml.MorphingAwareRatioEstimator: ratio,
        ml.QuadraticMorphingAwareRatioEstimator: ratio,
        ml.DoubleParameterizedRatioEstimator: double,
        ml.ScoreEstimator: score,
        ml.LikelihoodEstimator: likelihood,
    }
