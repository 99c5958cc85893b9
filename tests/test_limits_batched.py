"""The batched ``ml`` limits (app.ml.madminer_patches.batched_limits) against MadMiner's per-grid-point evaluation
(for density and double-parameterized estimators with theta standardised as in training, which MadMiner's
evaluation omits).

Same trained model, same Asimov data: the p-values agree within P_VALUE_TOLERANCE and the kinematic
log-likelihoods within LLR_TOLERANCE (float32 networks evaluated in different batch shapes; measured
differences: p-values <= 3e-8, log-likelihoods <= 1e-6, see docs/performance.md).
"""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest

from app.evaluation.limits import HISTO_THETA_BATCH
from app.ml import fasttrain, madminer_patches
from app.toy import simulator

P_VALUE_TOLERANCE = 1e-6
LLR_TOLERANCE = 1e-4  # absolute, on n_events * sum_x w(x) log r(x | theta); measured <= 1e-6 (ranges 24-449)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    import torch
    from madminer import ml
    from madminer.sampling import SampleAugmenter, benchmark, random_morphing_points

    path = simulator.generate_toy_file(simulator.ToySettings(n_events=3000), tmp_path_factory.mktemp("lim") / "toy.h5")
    augmenter = SampleAugmenter(str(path))
    prior = random_morphing_points(10, [("flat", -10, 10)] * 2)
    np.random.seed(1)
    torch.manual_seed(1)
    train = dict(n_epochs=3, n_workers=0, verbose="none", batch_size=64, initial_lr=0.01)
    x, theta0, _, y, r_xz, t_xz, _ = augmenter.sample_train_ratio(prior, benchmark("sm"), n_samples=1000)
    ratio = ml.ParameterizedRatioEstimator(n_hidden=(16,))
    fasttrain.fit(ratio, method="alices", x=x, y=y, theta=theta0, r_xz=r_xz, t_xz=t_xz, **train)
    ensemble = ml.Ensemble([ml.ParameterizedRatioEstimator(n_hidden=(8,)) for _ in range(2)])
    fasttrain.fit(ensemble, method="alice", x=x, y=y, theta=theta0, r_xz=r_xz, **train)
    x2, th0, th1, y2, *_ = augmenter.sample_train_more_ratios(prior, benchmark("sm"), n_samples=1000)
    double = ml.DoubleParameterizedRatioEstimator(n_hidden=(16,))
    fasttrain.fit(double, method="carl", x=x2, y=y2, theta0=th0, theta1=th1, **train)
    xd, thd, _, _ = augmenter.sample_train_density(prior, n_samples=1000)
    density = ml.LikelihoodEstimator(n_mades=1, n_hidden=(16,))
    fasttrain.fit(density, method="nde", x=xd, theta=thd, **train)
    return dict(path=path, ratio=ratio, ensemble=ensemble, double=double, density=density)


def _limits(cls, path, model, include_xsec=True):
    limits = cls(str(path))
    with mock.patch("madminer.limits.asymptotic_limits.load_estimator", lambda _file: model):
        grid, p_values, i_ml, llr_kin, llr_rate, _ = limits.expected_limits(
            mode="ml", theta_true=np.array([1.0, -2.0]), grid_ranges=[(-8.0, 8.0), (-8.0, 8.0)],
            grid_resolutions=[9, 9], luminosity=10000.0, include_xsec=include_xsec, model_file="unused",
            test_split=0.2, return_histos=False,
        )  # fmt: skip
    return grid, p_values, i_ml, np.asarray(llr_kin)


class ByMadMinerAPI(__import__("madminer.limits", fromlist=["AsymptoticLimits"]).AsymptoticLimits):
    """MadMiner's own estimator API, per grid point, with theta standardised as training standardised it.

    MadMiner's AsymptoticLimits gives density estimators raw theta (``evaluate_log_likelihood`` scales x only) and
    has no double-parameterized case, whose ``evaluate_log_likelihood_ratio`` scales x only too; both networks
    were trained on (theta - mean) / std (docs/madminer-bugs.md). The transform is written out here."""

    def _calculate_log_likelihood_ratio_kinematics(self, x_observed, theta_grid, model, theta1=None):
        from madminer.ml import DoubleParameterizedRatioEstimator, LikelihoodEstimator

        def scaled(thetas):
            return (np.asarray(thetas, np.float64) - model.theta_scaling_means) / model.theta_scaling_stds

        if isinstance(model, LikelihoodEstimator):
            return model.evaluate_log_likelihood(x=x_observed, theta=scaled(theta_grid), test_all_combinations=True)[0]
        if isinstance(model, DoubleParameterizedRatioEstimator):
            theta1s = np.broadcast_to(np.asarray(theta1, np.float64), theta_grid.shape)
            return model.evaluate_log_likelihood_ratio(
                x=x_observed, theta0=scaled(theta_grid), theta1=scaled(theta1s), test_all_combinations=True
            )[0]
        return super()._calculate_log_likelihood_ratio_kinematics(x_observed, theta_grid, model, theta1)


@pytest.mark.parametrize("name", ["ratio", "ensemble", "density", "double"])
def test_batched_ml_limits_equal_madminers(models, name):
    from madminer.limits import AsymptoticLimits

    reference_cls = ByMadMinerAPI if name in ("density", "double") else AsymptoticLimits
    if name in ("density", "double"):  # not vacuous: training standardised theta, far from the identity
        assert np.max(np.abs(models[name].theta_scaling_stds - 1)) > 1, models[name].theta_scaling_stds
    for include_xsec in (True, False):
        batched = madminer_patches.batched_limits()
        grid, p_fast, i_fast, llr_fast = _limits(batched, models["path"], models[name], include_xsec)
        grid_mm, p_mm, i_mm, llr_mm = _limits(reference_cls, models["path"], models[name], include_xsec)
        np.testing.assert_array_equal(grid, grid_mm)
        assert i_fast == i_mm
        np.testing.assert_allclose(llr_fast, llr_mm, atol=LLR_TOLERANCE, rtol=0)
        np.testing.assert_allclose(p_fast, p_mm, atol=P_VALUE_TOLERANCE, rtol=0)
        # not vacuous: the log-likelihood and the p-values vary over the grid
        assert np.ptp(llr_mm) > 1.0 and (p_mm < 0.05).any() and (p_mm > 0.3).any(), (name, p_mm)


@pytest.mark.parametrize("hist_bins", [None, [5, 4]])
def test_histo_limits_with_low_memory_binning_and_cached_bin_search_equal_madminers(models, hist_bins):
    """The histogram limits as the evaluate stage computes them (batched_limits: the binning from the mean weight over
    the grid, histograms filled HISTO_THETA_BATCH grid points at a time, reused_bin_search) equal MadMiner's own
    AsymptoticLimits with its defaults (only the NumPy keyword shim): the same bins, the same p-values."""
    from madminer.limits import AsymptoticLimits

    madminer_patches.apply_numpy_shim()
    settings = dict(mode="histo", theta_true=np.array([1.0, -2.0]), grid_ranges=[(-8.0, 8.0), (-8.0, 8.0)],
                    grid_resolutions=[12, 12], luminosity=10000.0, include_xsec=True, test_split=0.2,
                    hist_vars=["pt_j1", "delta_phi_jj"][: 1 if hist_bins is None else 2], hist_bins=hist_bins,
                    n_histo_toys=None, n_binning_toys=None, return_histos=True)  # fmt: skip
    assert HISTO_THETA_BATCH < 144  # several batches
    with madminer_patches.reused_bin_search():
        ours = madminer_patches.batched_limits()(str(models["path"])).expected_limits(
            **settings, histo_theta_batchsize=HISTO_THETA_BATCH
        )
    theirs = AsymptoticLimits(str(models["path"])).expected_limits(**settings)  # numpy's own histogramdd every time
    np.testing.assert_array_equal(ours[0], theirs[0])
    for a, b in zip(ours[5], theirs[5]):
        for edges_a, edges_b in zip(a.edges, b.edges):
            np.testing.assert_allclose(edges_a, edges_b, rtol=1e-12)
    np.testing.assert_allclose(ours[1], theirs[1], rtol=1e-9, atol=1e-12)
    assert ours[2] == theirs[2]
