"""The one metric table: what each metric measures, its direction, and what it may be compared with.

A sweep ranks its trials with ``objective.metric``. A number is only a ranking if every trial measures the same
thing: the total training loss ``val_loss`` is ``first term + alpha * score term`` (so a smaller alpha "wins"
whatever the estimator), the loss terms of different methods are different functions, and the validation
samples must be the same draw. Each metric here says which trials it is comparable across:

- ``all``: every method (the ``truth_*`` metrics of the toy, the limit area ``limits_cl68_area``, the
  estimator-independent Fisher information), with the caveats of each row (a truth_log_r_mse needs the same
  reference point; an area rewards overconfidence, so it never ranks estimators alone);
- ``term``: methods of one family that report this loss term, on the same validation samples (``val_improved_xe``
  is the same function for ALICE and ALICES, whatever their alpha);
- ``family``: methods of one family (``fisher_full_*`` for score methods);
- ``setting``: one method with one alpha and one sampling: the alpha-weighted totals ``val_loss``/``train_loss``.

This module imports nothing heavy: it is used when the config is checked and when a sweep is compared.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from app.domain.methods import METHODS
from app.errors import UserError


@dataclass(frozen=True)
class MetricSpec:
    pattern: str  # regular expression over metric names
    direction: str  # "minimize" | "maximize" | "" (informational, never an objective)
    scope: str  # "all" | "term" | "family" | "setting" | "run"
    meaning: str

    def matches(self, name: str) -> bool:
        return re.fullmatch(self.pattern, name) is not None

    @property
    def label(self) -> str:
        """The pattern as a person reads it: val_<term>, limits_<mode>_cl68_area, ..."""
        text = self.pattern.replace(f"({_TERMS})", "<term>").replace(r"(_at_\w+)?", "[_at_<benchmark>]")
        text = text.replace("(val|train)_loss", "val_loss, train_loss").replace("(rate|histo)", "rate|histo")
        return text.replace(r"\w+", "<x>").replace("(val|train)", "val|train")


_TERMS = "|".join(sorted({t for m in METHODS.values() for t in m.loss_terms}))
TABLE: tuple[MetricSpec, ...] = (
    MetricSpec(rf"val_({_TERMS})", "minimize", "term",
               "one loss term (unweighted, alpha-independent) of the saved model's prediction on the validation "
               "samples; an ensemble's is that of its mean prediction, so any n_estimators compare"),
    MetricSpec(rf"train_({_TERMS})", "minimize", "term",
               "the same term on the training samples during the saved epoch (optimistic; an ensemble's: the mean "
               "over its members)"),
    MetricSpec(r"(val|train)_loss", "minimize", "setting",
               "the total loss first term + alpha * score term of the saved model: depends on alpha"),
    MetricSpec(r"val_\w+_members_mean", "", "run",
               "an ensemble's members: the mean of their own validation losses (not the ensemble's)"),
    MetricSpec(r"truth_log_r_mse(_at_\w+)?", "minimize", "all",
               "toy only: mean squared error of the estimated vs the exact log r(x|theta, theta_ref); theta_ref is "
               "theta1 (sampling.theta1) for parameterized ratio estimators, theta_true for double-parameterized "
               "ones, the origin for density estimators: comparable across methods only where these coincide"),
    MetricSpec(r"truth_log_r_corr", "maximize", "all", "toy only: correlation of estimated and exact log r"),
    MetricSpec(r"truth_score_mse", "minimize", "all", "toy only: MSE of the estimated vs the exact score"),
    MetricSpec(r"truth_score_corr", "maximize", "all", "toy only: correlation of estimated and exact score"),
    MetricSpec(r"truth_log_likelihood_gap", "minimize", "all", "toy only: KL(p || p_hat) estimate at theta_true"),
    MetricSpec(r"truth_limits_iou", "maximize", "all",
               "toy only: IoU of the method's own 68% CL region (with xsec) and the true one on the same Asimov data, "
               "event count and rate term (1 for an exact estimator); the objective that ranks methods on the toy"),
    MetricSpec(r"truth_limits_\w+_iou", "maximize", "all",
               "toy only: IoU of one mode's 68% CL region and the true one; histo/sally/sallino also lose the "
               "information of their summary; rate compares MadMiner's Monte Carlo sigma(theta) with the exact one"),
    MetricSpec(r"truth_limits_\w+_best_fit_distance", "minimize", "all",
               "toy only: distance of the estimated and the true best fit"),
    MetricSpec(r"limits_cl68_area", "minimize", "all",
               "area (length) of the method's own 68% CL region in parameter units, from splines of log L; smaller "
               "is stronger only for an honest estimator: an overconfident one (log r x 2) halves it, so never rank "
               "estimators with it alone (on the toy: truth_limits_iou); a lower bound where it touches the edge"),
    MetricSpec(r"limits_\w+_cl68_area", "minimize", "all", "the same area for one limit mode"),
    MetricSpec(r"limits_\w+_cl68_touches_edge", "", "run",
               "1 if the 68% CL region reaches the grid's edge (its area is then a lower bound; widen the grid)"),
    MetricSpec(r"limits_\w+_cl68_fraction", "", "run", "fraction of grid cells inside the 68% CL region"),
    MetricSpec(r"limits_\w+_best_fit_distance", "", "run", "distance of the best fit from theta_true"),
    MetricSpec(r"fisher_rate_eigenvalue", "maximize", "all",
               "the rate's Fisher information along its one informative direction (estimator-independent)"),
    MetricSpec(r"fisher_(rate|histo)_\w+", "minimize", "all",
               "Fisher information of the rate / a histogram: does not depend on the estimator"),
    MetricSpec(r"fisher_full_gain_over_histo", "maximize", "family", "information the score adds over the histogram"),
    MetricSpec(r"fisher_full_\w+", "minimize", "family", "Fisher information of the trained score (score methods)"),
    MetricSpec(r"test_\w+", "", "run", "estimator vs MadMiner's joint (parton-level) quantities on test events"),
    MetricSpec(r".*_ensemble_std", "", "run", "spread over the members of an ensemble"),
    MetricSpec(r"saved_epoch|n_epochs_trained|best_epoch", "", "run", "bookkeeping"),
)


def spec(name: str) -> MetricSpec | None:
    for suffix, pattern in (("_ensemble_std", r".*_ensemble_std"), ("_members_mean", r"val_\w+_members_mean")):
        if name.endswith(suffix):  # before the patterns its stem would match
            return next(s for s in TABLE if s.pattern == pattern)
    return next((s for s in TABLE if s.matches(name)), None)


def default_objective(method: str) -> str:
    """The method's alpha-independent validation term: the first term of its loss."""
    return f"val_{METHODS[method].loss_terms[0]}"


def objective(metric: str | None, direction: str | None, method: str) -> tuple[str, str]:
    """(metric, direction) of ``objective.*`` with nulls filled in; raises UserError on a contradiction."""

    metric = metric or default_objective(method)
    found = spec(metric)
    terms = METHODS[method].loss_terms
    if found is None or not found.direction:
        listed = ", ".join(f"val_{t}" for t in terms)
        usable = ", ".join(s.label for s in TABLE if s.direction)
        raise UserError(
            f"objective.metric={metric} is not a metric this app can optimise; use {listed} (training={method}'s "
            f"loss terms) or one of: {usable}"
        )
    if direction and direction != found.direction:
        raise UserError(
            f"objective.direction={direction} contradicts objective.metric={metric}, which is best "
            f"{'low' if found.direction == 'minimize' else 'high'}; set objective.direction={found.direction}"
        )
    term = re.fullmatch(r"(?:val|train)_(\w+)", metric)
    if found.scope == "term" and term and term.group(1) not in terms:
        raise UserError(
            f"objective.metric={metric}: training={method} has no loss term {term.group(1)} "
            f"(its terms: {', '.join(terms)}); use {default_objective(method)}"
        )
    return metric, found.direction


@dataclass
class Child:
    """What a comparison needs of one finished trial."""

    run_id: str
    method: str
    value: float
    alpha: str | None = None  # as logged (a param string)
    samples_key: str | None = None  # the sample stage's cache key: same key = same validation samples
    metric: str = ""  # what ``value`` is (for rank: trials of one sweep may each have their method's own objective)
    direction: str = ""


def comparable(metric: str, children: list[Child]) -> tuple[bool, str]:
    """Whether ``metric`` ranks these trials against each other, and if not, why (one sentence)."""
    found = spec(metric)
    if found is None or not found.direction:
        return False, f"{metric} is not an objective metric"
    methods = sorted({c.method for c in children})
    if found.scope == "all":
        return True, f"{metric} measures the same thing for every method"
    if found.scope == "family":
        families = sorted({METHODS[m].family for m in methods})
        if len(families) > 1:
            return False, f"{metric} is only comparable within one method family (here: {', '.join(families)})"
        return True, f"{metric} is comparable within the {families[0]} family"
    if found.scope == "term":
        families = sorted({METHODS[m].family for m in methods})
        if len(families) > 1:
            return False, (f"{metric} is a loss term, a different function in each family "
                           f"({', '.join(families)}); rank methods with truth_limits_iou on the toy")
        if len({c.samples_key for c in children}) > 1:
            return False, f"{metric} was measured on different validation samples (the sampling settings differ)"
        return True, f"{metric} does not depend on alpha and the trials share their validation samples"
    # setting: the alpha-weighted total
    if len(methods) > 1:
        return False, f"{metric} is a different loss for each method ({', '.join(methods)}); use val_<term>"
    if len({c.alpha for c in children}) > 1:
        return False, (f"{metric} = first term + alpha * score term shrinks with alpha whatever the estimator; "
                       f"rank with {default_objective(methods[0])} instead")
    if len({c.samples_key for c in children}) > 1:
        return False, f"{metric} was measured on different validation samples (the sampling settings differ)"
    return True, f"{metric}: one method, one alpha, the same validation samples"


def best(metric: str, direction: str, children: list[Child]) -> tuple[Child | None, dict[str, Child], str]:
    """(cross-trial best or None, best per method, reason). The cross best exists only if the metric is
    comparable across all these trials; the per-method best only where it is comparable within the method."""
    pick = min if direction == "minimize" else max
    ok, reason = comparable(metric, children)
    overall = pick(children, key=lambda c: c.value) if ok and children else None
    per_method: dict[str, Child] = {}
    for method in sorted({c.method for c in children}):
        group = [c for c in children if c.method == method]
        if comparable(metric, group)[0]:
            per_method[method] = pick(group, key=lambda c: c.value)
    return overall, per_method, reason


def rank(children: list[Child]) -> tuple[Child | None, dict[str, Child], str]:
    """A sweep's finished trials, each scored with its own ``metric``: (the best of all or None, the best per method,
    why). One metric for all: :func:`best`. Several (``objective.metric=null``: each method's own loss term): no best
    of all, the best per method under each metric. The sweep's table and the parent run's comparison both use it."""
    if not children:
        return None, {}, "no trial finished with its objective"
    scored = sorted({(c.metric, c.direction) for c in children})
    if len(scored) == 1:
        return best(*scored[0], children)
    per_method: dict[str, Child] = {}
    for metric, direction in scored:
        per_method.update(best(metric, direction, [c for c in children if (c.metric, c.direction) == (metric,
                                                                                                      direction)])[1])
    why = (f"each method was scored with its own metric ({', '.join(m for m, _ in scored)}), which are not "
           "comparable; set objective.metric to a truth_* metric (toy) to rank methods")
    return None, dict(sorted(per_method.items())), why
