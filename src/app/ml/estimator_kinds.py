"""What differs per MadMiner estimator class when the fast trainer (:mod:`app.ml.fasttrain`) trains it.

Each supported class maps to a :class:`Kind`: which ``train()`` arguments hold arrays, which of them are rescaled
like parameters or scores, the loss suffix for MadMiner's ``get_loss``, and three functions taken from (or
written after) the estimator's own ``train()``: packaging the arrays (``_package_training_data``), the check of
required inputs (``_check_required_data``) and the forward pass that gives MadMiner's loss terms (the network's
outputs, then MadMiner's loss functions of them); and how an Ensemble's mean prediction is formed from its members'
outputs, for the ensemble's validation loss (:mod:`app.ml.validation`).
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
    outputs: Callable  # (model, batch, create_graph) -> the arguments of the loss functions
    mean: Callable  # [outputs of each Ensemble member] -> the outputs of the Ensemble's mean prediction


def ratio_outputs(model, batch, create_graph):
    """The arguments of MadMiner's ratio losses: (s_hat, log_r_hat, t_hat0, t_hat1, y, r_xz, t_xz0, t_xz1)."""
    score = "t_xz" in batch
    theta = batch["theta"].detach().requires_grad_(score)
    s_hat, log_r_hat, t_hat = model(
        theta, batch["x"], track_score=score, return_grad_x=False, create_gradient_graph=create_graph
    )
    return (s_hat, log_r_hat, t_hat, None, batch["y"], batch.get("r_xz"), batch.get("t_xz"), None)


def double_outputs(model, batch, create_graph):
    score = "t_xz0" in batch or "t_xz1" in batch
    theta0 = batch["theta0"].detach().requires_grad_(score)
    theta1 = batch["theta1"].detach().requires_grad_(score)
    # always with the gradient graph: the model takes two gradients of the same output, the second needs it
    s_hat, log_r_hat, t_hat0, t_hat1 = model(
        theta0, theta1, batch["x"], track_score=score, return_grad_x=False, create_gradient_graph=True
    )
    return (s_hat, log_r_hat, t_hat0, t_hat1, batch["y"], batch.get("r_xz"), batch.get("t_xz0"), batch.get("t_xz1"))


def score_outputs(model, batch, create_graph):
    return (model(batch["x"]), batch["t_xz"])


def flow_outputs(model, batch, create_graph):
    if "t_xz" in batch:
        theta = batch["theta"].detach().requires_grad_(True)
        _, log_likelihood, t_hat = model.log_likelihood_and_score(theta, batch["x"])
    else:
        _, log_likelihood = model.log_likelihood(batch["theta"], batch["x"])
        t_hat = None
    return (log_likelihood, t_hat, batch.get("t_xz"))


def _mean(tensors):
    return None if tensors[0] is None else sum(tensors) / len(tensors)


def ratio_mean(outputs: list[tuple]) -> tuple:
    """The loss arguments of an Ensemble's prediction, as MadMiner's ``Ensemble`` predicts: the mean log r (and
    s_hat = 1 / (1 + r) of it, as the models compute it) and the mean scores; the labels of the first member."""
    import torch

    log_r = _mean([o[1] for o in outputs])
    return (torch.sigmoid(-log_r), log_r, _mean([o[2] for o in outputs]), _mean([o[3] for o in outputs]),
            *outputs[0][4:])  # fmt: skip


def score_mean(outputs: list[tuple]) -> tuple:
    return (_mean([o[0] for o in outputs]), outputs[0][1])


def flow_mean(outputs: list[tuple]) -> tuple:
    """The mean log p (MadMiner's Ensemble averages log-likelihoods: the NLL of the mean is the members' mean NLL)
    and the mean score."""
    return (_mean([o[0] for o in outputs]), _mean([o[1] for o in outputs]), outputs[0][2])


def _losses(outputs: Callable) -> Callable:
    """(model, batch, loss_functions, create_graph) -> MadMiner's loss terms of ``outputs``."""

    def forward(model, batch, loss_functions, create_graph):
        args = outputs(model, batch, create_graph)
        return [f(*args) for f in loss_functions]

    return forward


ratio_forward = _losses(ratio_outputs)
double_forward = _losses(double_outputs)
score_forward = _losses(score_outputs)
flow_forward = _losses(flow_outputs)


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
        outputs=ratio_outputs,
        mean=ratio_mean,
    )
    double = Kind(
        inputs=("x", "theta0", "theta1", "y", "r_xz", "t_xz0", "t_xz1"),
        thetas=("theta0", "theta1"),
        scores=("t_xz0", "t_xz1"),
        loss_suffix="2",
        package=lambda e, m, d: e._package_training_data(m, *a(d, *double.inputs)),
        check=lambda e, m, d: e._check_required_data(m, *a(d, "r_xz", "t_xz0", "t_xz1")),
        forward=double_forward,
        outputs=double_outputs,
        mean=ratio_mean,
    )
    score = Kind(
        inputs=("x", "t_xz"),
        thetas=(),
        scores=(),
        loss_suffix="",
        package=lambda e, m, d: e._package_training_data(*a(d, "x", "t_xz")),
        check=lambda e, m, d: None,
        forward=score_forward,
        outputs=score_outputs,
        mean=score_mean,
    )
    likelihood = Kind(
        inputs=("x", "theta", "t_xz"),
        thetas=("theta",),
        scores=("t_xz",),
        loss_suffix="",
        package=lambda e, m, d: e._package_training_data(m, *a(d, "x", "theta", "t_xz")),
        check=lambda e, m, d: e._check_required_data(m, d.get("t_xz")),
        forward=flow_forward,
        outputs=flow_outputs,
        mean=flow_mean,
    )
    return {
        ml.ParameterizedRatioEstimator: ratio,
        ml.MorphingAwareRatioEstimator: ratio,
        ml.QuadraticMorphingAwareRatioEstimator: ratio,
        ml.DoubleParameterizedRatioEstimator: double,
        ml.ScoreEstimator: score,
        ml.LikelihoodEstimator: likelihood,
    }


def set_dimensions(estimator, n_observables: int, n_parameters: int) -> None:
    """The estimator's numbers of observables and parameters, as MadMiner's ``train`` sets and checks them."""
    if estimator.n_observables is None:
        estimator.n_observables = n_observables
    if estimator.n_parameters is None:
        estimator.n_parameters = n_parameters
    if n_parameters != estimator.n_parameters:
        raise RuntimeError(f"Number of parameters does not match: {n_parameters} vs {estimator.n_parameters}")
    if n_observables != estimator.n_observables:
        raise RuntimeError(f"Number of observables does not match: {n_observables} vs {estimator.n_observables}")
