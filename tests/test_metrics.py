"""The metric table (app.domain.metrics): MadMiner's loss terms, directions, and what may be ranked against what."""

from __future__ import annotations

import numpy as np
import pytest

from app.domain import metrics
from app.domain.methods import METHODS
from app.domain.stats import cl_regions, q_threshold
from app.errors import UserError


def test_loss_terms_are_madminers():
    """The methods table's loss terms (which the metric table reads) are MadMiner's, in its order."""
    from madminer.utils.ml.utils import get_loss

    for method in METHODS.values():
        _, labels, weights = get_loss(method.name, alpha=7.0)
        assert tuple(labels) == method.loss_terms, method.name
        # the first term is never weighted by alpha: it is the default objective; the score terms are
        assert weights[0] == 1.0 and metrics.default_objective(method.name) == f"val_{labels[0]}"
        assert all(w == 7.0 for w in weights[1:]), (method.name, weights)


@pytest.mark.parametrize(
    "name,direction,scope",
    [("val_improved_xe", "minimize", "term"), ("val_loss", "minimize", "setting"),
     ("truth_log_r_mse", "minimize", "all"), ("truth_limits_iou", "maximize", "all"),
     ("truth_limits_ml_kin_iou", "maximize", "all"), ("limits_cl68_area", "minimize", "all"),
     ("fisher_full_gain_over_histo", "maximize", "family"), ("limits_ml_cl68_fraction", "", "run"),
     ("val_loss_ensemble_std", "", "run"), ("truth_log_r_mse_at_sm", "minimize", "all"),
     ("limits_ml_cl68_touches_edge", "", "run"),
     ("val_improved_xe_members_mean", "", "run"), ("val_loss_members_mean", "", "run")],
)
def test_table(name, direction, scope):
    spec = metrics.spec(name)
    assert (spec.direction, spec.scope) == (direction, scope)


def test_objective_defaults_and_errors():
    assert metrics.objective(None, None, "sally") == ("val_mse_score", "minimize")
    assert metrics.objective("truth_limits_iou", None, "alices") == ("truth_limits_iou", "maximize")
    with pytest.raises(UserError, match="set objective.direction=minimize"):
        metrics.objective("val_nll", "maximize", "nde")
    with pytest.raises(UserError, match="has no loss term xe"):
        metrics.objective("val_xe", None, "alices")
    with pytest.raises(UserError, match="val_improved_xe, val_mse_score"):
        metrics.objective("limits_ml_cl68_fraction", None, "alices")  # informational, never an objective


def _child(i, method, value, alpha="1.0", samples="s"):
    return metrics.Child(f"r{i}", method, value, alpha, samples)


def test_comparability_rules():
    alphas = [_child(0, "alices", 0.5, "0.1"), _child(1, "alices", 0.9, "100")]
    assert metrics.comparable("val_improved_xe", alphas)[0]
    ok, why = metrics.comparable("val_loss", alphas)
    assert not ok and "alpha" in why
    ok, why = metrics.comparable("val_improved_xe", [_child(0, "alices", 1), _child(1, "sally", 1)])
    assert not ok and "different function" in why
    assert metrics.comparable("val_improved_xe", [_child(0, "alice", 1), _child(1, "alices", 1)])[0]
    ok, why = metrics.comparable("val_improved_xe", [_child(0, "alices", 1, samples="a"),
                                                     _child(1, "alices", 1, samples="b")])
    assert not ok and "validation samples" in why
    assert metrics.comparable("truth_limits_iou", [_child(0, "alices", 1), _child(1, "nde", 1)])[0]
    assert not metrics.comparable("fisher_full_sigma_CWL2", [_child(0, "sally", 1), _child(1, "alices", 1)])[0]


def test_best_is_per_method_when_methods_are_not_comparable():
    children = [_child(0, "alices", 0.4, "1"), _child(1, "alices", 0.3, "1"), _child(2, "carl", 0.1)]
    overall, per_method, why = metrics.best("val_loss", "minimize", children)
    assert overall is None and "different loss" in why
    assert per_method["alices"].run_id == "r1" and per_method["carl"].run_id == "r2"
    overall, _, _ = metrics.best("truth_limits_iou", "maximize", children)
    assert overall.run_id == "r0"  # the largest IoU


def _gaussian_log_l(grid, sigma, rho, mu):
    cov = np.array([[sigma[0] ** 2, rho * sigma[0] * sigma[1]], [rho * sigma[0] * sigma[1], sigma[1] ** 2]])
    d = grid - np.asarray(mu)
    return -0.5 * np.einsum("ij,jk,ik->i", d, np.linalg.inv(cov), d), np.pi * q_threshold(dof=2) * np.sqrt(
        np.linalg.det(cov)
    )


def test_cl_region_area_is_the_analytic_area_of_a_gaussian_log_likelihood():
    """A Gaussian log L has the ellipse pi q68 sqrt(det cov) as its 68 % CL region. Before (bilinear p-values on an
    8x finer grid) a region smaller than a grid cell came out 57 % too large, and log L x 2 (an overconfident
    estimator) shrank it to 0.62 or even grew it; from splines of log L it is exact and halves."""
    xs = np.linspace(-5, 5, 25)  # the default grid: spacing 0.42
    grid = np.array([(a, b) for a in xs for b in xs])
    for sigma, rho, mu in (((0.35, 0.25), 0.5, (0.1, -0.2)), ((0.6, 0.4), -0.3, (0.0, 0.0)), ((1.5, 1.0), 0, (0.3, 0))):
        log_l, exact = _gaussian_log_l(grid, sigma, rho, mu)
        region = cl_regions(grid, [log_l + 3.0, 2 * log_l])  # a constant offset does not matter
        assert region.size(0) == pytest.approx(exact, rel=0.01), sigma
        assert region.size(1) == pytest.approx(exact / 2, rel=0.01), sigma
        assert region.touches_edge == [False, False]
    # the cell count is far off on a coarse grid; the interpolated area is not
    coarse = np.array([(a, b) for a in np.linspace(-5, 5, 9) for b in np.linspace(-5, 5, 9)])
    log_l, exact = _gaussian_log_l(coarse, (1.0, 1.0), 0.0, (0.0, 0.0))
    cells = np.mean(-2 * log_l < q_threshold(dof=2)) * 100
    assert cl_regions(coarse, [log_l]).size() == pytest.approx(exact, rel=0.01) and abs(cells / exact - 1) > 0.1
    # three parameters (rows in any order): an ellipsoid of volume 4/3 pi q68^(3/2) prod(sigma)
    axis = np.linspace(-5, 5, 11)
    cube = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)[::-1]
    sigma = np.array([1.5, 1.0, 0.8])
    log_l = -0.5 * (((cube - [0.3, 0.0, -0.2]) / sigma) ** 2).sum(1)
    volume = 4 / 3 * np.pi * q_threshold(dof=3) ** 1.5 * sigma.prod()
    assert cl_regions(cube, [log_l], n_zoom=21).size() == pytest.approx(volume, rel=0.02)
    # one parameter: |x - 1| < sigma (q68 = 1 for one degree of freedom)
    line = np.linspace(-5, 5, 25)[:, None]
    assert cl_regions(line, [-0.5 * ((line[:, 0] - 1) / 0.3) ** 2]).size() == pytest.approx(0.6, rel=0.01)


def test_cl_region_reaching_the_grid_edge_is_flagged():
    xs = np.linspace(-5, 5, 25)
    grid = np.array([(a, b) for a in xs for b in xs])
    log_l, exact = _gaussian_log_l(grid, (1.0, 1.0), 0.0, (4.5, 0.0))  # the ellipse is cut at theta_0 = 5
    region = cl_regions(grid, [log_l, _gaussian_log_l(grid, (1.0, 1.0), 0.0, (0.0, 0.0))[0]])
    assert region.touches_edge == [True, False]
    assert region.size(0) < 0.8 * exact and region.size(1) == pytest.approx(exact, rel=0.01)
    assert cl_regions(grid[:, :1][::25], [-0.5 * (xs + 4.8) ** 2]).touches_edge == [True]
    # a flat direction (the rate alone constrains one combination of the parameters): a band across the grid
    assert cl_regions(grid, [-0.5 * ((grid[:, 0] + grid[:, 1]) / 0.5) ** 2]).touches_edge == [True]


def test_methods_search_ranks_by_truth_iou_and_refuses_it_without_truth(compose_app, tmp_path, physics_file):
    """hparams_search=methods ranks methods by truth_limits_iou on the toy (an overconfident estimator, log r x 2,
    scores 0.50 against the exact 1.0: tests/test_truth.py), not by limits_cl68_area, which it halves. A file
    without an exact likelihood refuses a truth objective in one line, before any work."""
    from app import pipeline

    cfg = compose_app("hparams_search=methods")
    assert (cfg.objective.metric, cfg.objective.direction) == ("truth_limits_iou", "maximize")
    assert metrics.objective(cfg.objective.metric, cfg.objective.direction, "alices") == (
        "truth_limits_iou", "maximize")
    path = physics_file  # a MadMiner file of a physics process: no exact likelihood
    cfg = compose_app("hparams_search=methods", "data=file", f"data.path={path}", run_dir=tmp_path / "file")
    with pytest.raises(UserError, match=rf"truth_limits_iou .* {path.name} .* use objective.metric=null") as err:
        pipeline.run(cfg)
    assert "\n" not in str(err.value) and not (tmp_path / "file" / "run.json").exists()
    cfg = compose_app("data=file", f"data.path={path}", "objective.metric=truth_log_r_mse", "evaluation.truth=false",
                      run_dir=tmp_path / "off")
    with pytest.raises(UserError, match="evaluation.truth=false"):
        pipeline.run(cfg)
