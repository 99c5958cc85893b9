"""The metric table (app.domain.metrics): MadMiner's loss terms, directions, and what may be ranked against what."""

from __future__ import annotations

import numpy as np
import pytest

from app.domain import metrics
from app.domain.methods import METHODS
from app.domain.stats import CL68_P_VALUE, region_size
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


def test_region_size_is_interpolated_not_a_cell_count():
    # a Gaussian p-value surface whose 68 % CL region is a disc of known area
    for n in (9, 25):
        xs = np.linspace(-5, 5, n)
        grid = np.array([(a, b) for a in xs for b in xs])
        p = np.exp(-(grid**2).sum(1) / 8)
        radius2 = -8 * np.log(CL68_P_VALUE)
        area = region_size(grid, p)
        cells = np.mean(p > CL68_P_VALUE) * 100
        assert area == pytest.approx(np.pi * radius2, rel=0.03 if n == 25 else 0.08)
        if n == 9:  # the cell count is far off on a coarse grid; the interpolated area is not
            assert abs(cells - np.pi * radius2) > 3 * abs(area - np.pi * radius2)
    xs = np.linspace(-5, 5, 25)
    assert region_size(xs[:, None], np.exp(-xs**2 / 8)) == pytest.approx(2 * np.sqrt(radius2), rel=0.01)
