"""Ground truth of the toy (app.toy.truth) and the truth_* metrics of the evaluate stage.

Bounds of the end-to-end checks were measured on CPU runs with seeds 1-10 of the default configuration;
the measured values and margins are listed in docs/toy.md ("Truth metrics").
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import TINY

from app.domain.stats import q_threshold
from app.toy import simulator
from app.toy.truth import ToyTruth, compare_regions, refine

# --------------------------------------------------------------------------- bounds (see docs/toy.md)
# Measured on CPU (2 cores, torch 2.13) with the default configuration; "untrained" = the same network
# re-initialised with torch seeds 0-4. ALICES (issue 9 defaults): seeds 1-5 and 42 (seed=N sampling.seed=N)
# and the default run; SALLY: seeds 1-10 (seed=N sampling.seed=N) and the default seed 42.
ALICES_LOG_R_MSE_MAX = 0.15  # trained 0.030-0.045 (default run: 0.0309); untrained 0.776-0.947
ALICES_LOG_R_CORR_MIN = 0.90  # trained 0.968-0.980 (default run: 0.979); untrained -0.017-0.046
ALICES_ML_IOU_MIN = 0.60  # trained 0.644-0.913 (default run: 0.767, deterministic on CPU)
SALLY_SCORE_MSE_MAX = 0.005  # trained 0.0015-0.0027 (seed 42: 0.0020); untrained 0.167-0.323
ALICES_ML_BEST_FIT_DISTANCE_MAX = 0.5  # trained 0.02-0.18 (default run 0.07); grid spacing 0.42 on ±5
SALLY_LIMITS_IOU_MIN = 0.70  # trained: default run 0.832 (on the former ±20 grid, seeds 1-10: 0.851-0.904)


def _x(rng, n, smearing=0.5):
    return simulator.observables_from_smeared(rng.standard_normal((n, 2)) * np.sqrt(1 + smearing**2))


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "results" / "metrics.json").read_text())


# --------------------------------------------------------------------------- the closed form
@pytest.mark.parametrize("n_parameters", [1, 2])
@pytest.mark.parametrize("smearing", [0.0, 0.5, 1.3])
def test_log_likelihood_is_the_toy_density(n_parameters, smearing):
    rng = np.random.default_rng(1)
    truth = ToyTruth(smearing, n_parameters)
    x = _x(rng, 500, smearing)
    thetas = rng.uniform(-20, 20, (7, n_parameters))
    expected = simulator.observables_density(x[None], thetas[:, None], smearing)
    np.testing.assert_allclose(np.exp(truth.log_likelihood(x[None], thetas[:, None])), expected, rtol=1e-12)
    grid = truth.log_likelihood_grid(x, thetas)
    assert grid.shape == (7, 500)
    np.testing.assert_allclose(np.exp(grid), expected, rtol=1e-12)
    theta1 = thetas[3]
    np.testing.assert_allclose(
        truth.log_r_grid(x, thetas, theta1), np.log(expected) - np.log(expected[3]), atol=1e-12
    )
    np.testing.assert_allclose(truth.log_r(x, thetas[0], theta1), grid[0] - grid[3], atol=1e-12)
    np.testing.assert_allclose(truth.cross_section(thetas), simulator.cross_section(thetas))
    with pytest.raises(ValueError, match="theta must have shape"):
        truth.log_likelihood(x, np.zeros(3))


@pytest.mark.parametrize("n_parameters", [1, 2])
def test_density_integrates_to_one_in_observable_space(n_parameters):
    """Stated precision: the closed form integrates to 1 within 1e-8 (midpoint rule on (log pt_j1, delta_phi_jj))."""
    smearing = 0.5
    truth = ToyTruth(smearing, n_parameters)
    half = 9.0 * np.sqrt(1 + smearing**2)
    edges = np.linspace(-half, half, 1201)
    mid = 0.5 * (edges[1:] + edges[:-1])
    h = edges[1] - edges[0]
    log_pt = np.log(simulator.PT_SCALE) + simulator.PT_SLOPE * mid  # u = log(pt_j1): dpt = pt du
    pt, dphi = np.meshgrid(np.exp(log_pt), mid, indexing="ij")
    x = np.stack([pt.ravel(), dphi.ravel()], axis=1)
    jac = pt.ravel() * simulator.PT_SLOPE * h * h  # d pt d dphi = pt * PT_SLOPE dx'_1 * dx'_2
    thetas = np.array([[0.0, 0.0], [10.0, 0.0], [-6.0, 8.0], [20.0, -20.0]])[:, :n_parameters]
    integrals = np.exp(truth.log_likelihood_grid(x, thetas)) @ jac
    np.testing.assert_allclose(integrals, 1.0, atol=1e-8)


@pytest.mark.parametrize("n_parameters", [1, 2])
@pytest.mark.parametrize("smearing", [0.0, 0.5])
def test_score_is_the_gradient(n_parameters, smearing):
    rng = np.random.default_rng(2)
    truth = ToyTruth(smearing, n_parameters)
    x = _x(rng, 400, smearing)
    eps = 1e-5
    for theta in rng.uniform(-15, 15, (4, n_parameters)):
        fd = np.stack(
            [
                (truth.log_likelihood(x, theta + eps * e) - truth.log_likelihood(x, theta - eps * e)) / (2 * eps)
                for e in np.eye(n_parameters)
            ],
            axis=-1,
        )
        score = truth.score(x, theta)
        assert score.shape == (400, n_parameters)
        np.testing.assert_allclose(score, fd, atol=1e-6)
    # one theta per event broadcasts like MadMiner's t_xz(x_i | theta_i)
    thetas = rng.uniform(-15, 15, (400, n_parameters))
    per_event = truth.score(x, thetas)
    np.testing.assert_allclose(per_event[7], truth.score(x[7], thetas[7]))


def test_density_matches_high_statistics_histogram_of_generated_events():
    """400k events drawn from the toy's generator at one theta, binned in the observables (pt_j1, delta_phi_jj)."""
    rng = np.random.default_rng(3)
    theta, smearing, n = np.array([7.0, -5.0]), 0.5, 400_000
    x = simulator.observables_from_smeared(simulator.smear(simulator.sample_latent(theta, n, rng), smearing, rng))
    pt_edges = simulator.PT_SCALE * np.exp(simulator.PT_SLOPE * np.linspace(-3.5, 3.5, 15))
    phi_edges = np.linspace(-3.5, 3.5, 15)
    counts, _, _ = np.histogram2d(x[:, 0], x[:, 1], bins=[pt_edges, phi_edges])
    expected = n * _bin_probabilities(ToyTruth(smearing, 2), theta, pt_edges, phi_edges)
    keep = expected > 100
    pulls = (counts[keep] - expected[keep]) / np.sqrt(expected[keep])
    assert keep.sum() > 100 and np.abs(pulls).max() < 5, pulls


def _bin_probabilities(truth, theta, pt_edges, phi_edges, sub=20):
    """Integral of p(x | theta) over each (pt, delta_phi) bin (midpoint rule, sub x sub points per bin)."""
    u_edges = np.log(pt_edges)
    u = np.concatenate([np.linspace(a, b, sub + 1)[:-1] + (b - a) / (2 * sub) for a, b in zip(u_edges, u_edges[1:])])
    du = np.repeat(np.diff(u_edges) / sub, sub)
    phi = np.concatenate(
        [np.linspace(a, b, sub + 1)[:-1] + (b - a) / (2 * sub) for a, b in zip(phi_edges, phi_edges[1:])]
    )
    dphi = np.repeat(np.diff(phi_edges) / sub, sub)
    pt, ph = np.meshgrid(np.exp(u), phi, indexing="ij")
    dens = np.exp(truth.log_likelihood(np.stack([pt, ph], axis=-1), theta)) * pt * du[:, None] * dphi[None, :]
    return dens.reshape(len(u_edges) - 1, sub, len(phi_edges) - 1, sub).sum(axis=(1, 3))


@pytest.fixture(scope="module")
def toy_file(tmp_path_factory):
    settings = simulator.ToySettings(n_events=60_000, seed=5)
    return settings, simulator.generate_toy_file(settings, tmp_path_factory.mktemp("truth") / "toy.h5")


def test_cross_section_and_density_agree_with_the_toy_file(toy_file):
    """The file's weighted events (MadMiner's morphing to any theta) against sigma(theta) and p(x | theta)."""
    from madminer.analysis import DataAnalyzer

    settings, path = toy_file
    truth = ToyTruth.from_file(path)
    assert truth == ToyTruth(settings.smearing, settings.n_parameters)
    analyzer = DataAnalyzer(str(path))
    thetas = np.array([[0.0, 0.0], [10.0, 0.0], [-6.0, 8.0], [15.0, 15.0], [3.0, -12.0]])
    xsecs, errors = analyzer.xsecs(thetas=thetas)
    exact = truth.cross_section(thetas)
    # stated tolerance: within 4 Monte Carlo standard deviations and 3 %
    assert np.all(np.abs(xsecs - exact) < 4 * errors), (xsecs, exact, errors)
    np.testing.assert_allclose(xsecs, exact, rtol=0.03)

    pt_edges = simulator.PT_SCALE * np.exp(simulator.PT_SLOPE * np.linspace(-3, 3, 9))
    phi_edges = np.linspace(-3, 3, 9)
    for theta in thetas[[0, 2]]:
        x, weights = analyzer.weighted_events(theta=theta)
        sums, _, _ = np.histogram2d(x[:, 0], x[:, 1], bins=[pt_edges, phi_edges], weights=weights)
        sq, _, _ = np.histogram2d(x[:, 0], x[:, 1], bins=[pt_edges, phi_edges], weights=weights**2)
        expected = truth.cross_section(theta) * _bin_probabilities(truth, theta, pt_edges, phi_edges)
        keep = sq > 0
        pulls = (sums[keep] - expected[keep]) / np.sqrt(sq[keep])
        assert np.abs(pulls).max() < 5, pulls


def test_from_file_only_for_toy_files(toy_file, tmp_path):
    _, path = toy_file
    other = tmp_path / "other.h5"
    shutil.copy(path, other)
    with h5py.File(other, "a") as f:
        del f.attrs[simulator.SETTINGS_ATTR]
    assert ToyTruth.from_file(other) is None
    assert ToyTruth.from_file(tmp_path / "missing.h5") is None
    (tmp_path / "text.h5").write_text("not hdf5")
    assert ToyTruth.from_file(tmp_path / "text.h5") is None


# --------------------------------------------------------------------------- truth of the truth: smearing 0
@pytest.mark.parametrize("n_parameters", [1, 2])
def test_zero_smearing_makes_madminer_joint_quantities_the_truth(tmp_path, n_parameters):
    """Without smearing x = z, so MadMiner's joint r(x, z | theta0, theta1) and t(x, z | theta) are the true
    r(x | theta0, theta1) and t(x | theta) -- once MadMiner's Monte Carlo estimate of sigma(theta), which
    normalises its joint quantities, is replaced by the exact sigma(theta) (float32 rounding aside)."""
    from madminer.sampling import SampleAugmenter, benchmark, random_morphing_points

    def differences(smearing):
        settings = simulator.ToySettings(n_events=6000, n_parameters=n_parameters, smearing=smearing)
        path = simulator.generate_toy_file(settings, tmp_path / f"s{smearing}.h5")
        augmenter = SampleAugmenter(str(path))
        truth = ToyTruth.from_file(path)
        split = dict(partition="train", test_split=0.2, validation_split=0.2)
        common = dict(sample_only_from_closest_benchmark=False, **split)

        def log_xsec(thetas):  # log(sigma / sigma_MC) and grad log sigma - grad log sigma_MC, per row
            unique, index = np.unique(thetas, axis=0, return_inverse=True)
            mc, _ = augmenter.xsecs(thetas=list(unique), **split)
            grad = augmenter.xsec_gradients(thetas=list(unique), gradients="theta", **split)
            a = simulator.couplings(unique)
            jac = np.diag([1 / simulator.C0, 1 / simulator.C1])[:, :n_parameters]
            exact_grad = 2 * a / (1 + np.sum(a * a, axis=-1, keepdims=True) + simulator.DELTA) @ jac
            index = index.ravel()
            return (
                np.log(truth.cross_section(unique) / mc)[index],
                (exact_grad - grad / mc[:, None])[index],
            )

        np.random.seed(0)
        x, theta0, theta1, _, r_xz, t_xz, _ = augmenter.sample_train_ratio(
            theta0=random_morphing_points(10, [("flat", -15, 15)] * n_parameters),
            theta1=benchmark("w"),
            n_samples=2000,
            **common,
        )
        xl, thetal, tl_xz, _ = augmenter.sample_train_local(theta=benchmark("sm"), n_samples=1000, **common)
        x, xl = x.astype(np.float64), xl.astype(np.float64)
        (c0, g0), (c1, _), (_, gl) = log_xsec(theta0), log_xsec(theta1), log_xsec(thetal)
        return [
            (np.log(r_xz).ravel() - c0 + c1, truth.log_r(x, theta0, theta1)),
            (t_xz - g0, truth.score(x, theta0)),
            (tl_xz - gl, truth.score(xl, thetal)),
        ]

    for madminer, exact in differences(0.0):
        np.testing.assert_allclose(madminer, exact, atol=2e-4)
    # with smearing the joint quantities only scatter around the truth: the comparison above can fail
    for madminer, exact in differences(0.5):
        assert np.max(np.abs(madminer - exact)) > 0.1


# --------------------------------------------------------------------------- expected limits
def test_expected_limits_are_madminer_statistic_with_a_perfect_estimator(toy_file):
    """MadMiner's AsymptoticLimits fed the true log r reproduces truth.expected_limits exactly when the truth
    uses MadMiner's sigma(theta) (from the weighted test events); with the exact sigma they stay close
    (measured: |delta p| < 0.03, IoU >= 0.92 for the kinematic modes)."""
    import madminer.limits.asymptotic_limits as asymptotic_limits

    from app.ml import madminer_patches

    madminer_patches.apply_numpy_shim()
    _, path = toy_file
    truth = ToyTruth.from_file(path)

    class Perfect(asymptotic_limits.AsymptoticLimits):
        def _calculate_log_likelihood_ratio_kinematics(self, x, theta_grid, model, theta1=None):
            return truth.log_r_grid(x, theta_grid, np.zeros(2))

    original = asymptotic_limits.load_estimator
    asymptotic_limits.load_estimator = lambda _filename: None
    try:
        limits = Perfect(str(path))

        class MonteCarloSigma(ToyTruth):
            def cross_section(self, theta):
                theta = np.asarray(theta, dtype=np.float64)
                return limits._calculate_xsecs(theta.reshape(-1, 2)).reshape(theta.shape[:-1])

        mc_truth = MonteCarloSigma(truth.smearing, truth.n_parameters)
        options = dict(grid_ranges=[(-20, 20), (-20, 20)], grid_resolutions=[21, 21], luminosity=1e4)
        for theta_true in ([0.0, 0.0], [4.0, -3.0]):
            x, w = limits._asimov_data(np.asarray(theta_true))
            for mode, include_xsec in (("ml", True), ("ml", False), ("rate", True)):
                grid, p_values, i_ml, *_ = limits.expected_limits(
                    mode=mode,
                    model_file="perfect",
                    theta_true=theta_true,
                    include_xsec=include_xsec,
                    return_histos=False,
                    **options,
                )
                kwargs = dict(luminosity=1e4, include_kinematics=mode == "ml", include_xsec=include_xsec)
                same = mc_truth.expected_limits(grid, theta_true, x, w, **kwargs)
                np.testing.assert_allclose(same.p_values, p_values, rtol=1e-9, atol=1e-12)
                assert same.i_ml == i_ml
                exact = truth.expected_limits(grid, theta_true, x, w, **kwargs)
                if mode == "ml":  # (rate-only regions are rings that a 1 % shift of sigma moves visibly)
                    assert np.max(np.abs(exact.p_values - p_values)) < 0.05
                    assert compare_regions(grid, exact.log_likelihood, same.log_likelihood)[0] > 0.9
    finally:
        asymptotic_limits.load_estimator = original


def test_expected_limits_options_and_shapes():
    truth = ToyTruth(0.5, 1)
    grid = np.linspace(-20, 20, 41)[:, None]
    x = _x(np.random.default_rng(4), 3000)
    limits = truth.expected_limits(grid, [0.0], x, luminosity=1e4)
    assert limits.p_values.shape == (41,) and limits.p_values[limits.i_ml] == pytest.approx(1.0)
    assert limits.n_events == pytest.approx(1e4 * simulator.SIGMA_SM)
    kin = truth.expected_limits(grid, [0.0], x, luminosity=1e4, include_xsec=False)
    np.testing.assert_array_equal(kin.log_likelihood_rate, 0.0)
    rate = truth.expected_limits(grid, [0.0], x, luminosity=1e4, include_kinematics=False)
    np.testing.assert_array_equal(rate.log_likelihood_kinematics, 0.0)
    np.testing.assert_allclose(limits.log_likelihood, kin.log_likelihood + rate.log_likelihood)
    with pytest.raises(ValueError):
        truth.expected_limits(grid, [0.0], x, include_kinematics=False, include_xsec=False)


def test_fast_enough_for_1e5_events_on_625_grid_points():
    truth = ToyTruth(0.5, 2)
    x = _x(np.random.default_rng(5), 100_000)
    axis = np.linspace(-20, 20, 25)
    grid = np.stack(np.meshgrid(axis, axis, indexing="ij"), axis=-1).reshape(-1, 2)
    start = time.perf_counter()
    log_r = truth.log_r_grid(x, grid, [0.0, 0.0])
    limits = truth.expected_limits(grid, [0.0, 0.0], x)
    scores = truth.score(x, [1.0, 2.0])
    elapsed = time.perf_counter() - start
    assert log_r.shape == (625, 100_000) and scores.shape == (100_000, 2) and limits.p_values.shape == (625,)
    assert elapsed < 15, elapsed  # about 3 s on 2 cores
    np.testing.assert_allclose(
        limits.log_likelihood_kinematics / limits.n_events,
        log_r.mean(axis=1) + truth.log_likelihood(x, [0.0, 0.0]).mean(),
        rtol=1e-10,
    )


def test_compare_regions():
    axis = np.linspace(-5, 5, 11)
    grid = np.stack(np.meshgrid(axis, axis, indexing="ij"), axis=-1).reshape(-1, 2)
    bowl = -0.5 * np.sum((grid - [0.3, -0.2]) ** 2, axis=1)
    assert compare_regions(grid, bowl, bowl + 7.0) == (1.0, 0.0)  # constant offsets do not matter
    shifted = -0.5 * np.sum((grid - [1.3, -0.2]) ** 2, axis=1)
    iou, distance = compare_regions(grid, shifted, bowl)
    assert 0.2 < iou < 0.8 and distance == pytest.approx(1.0, abs=0.07)
    assert compare_regions(grid, bowl - 0.5 * np.sum(grid**2, axis=1) * 30, bowl)[0] < 0.2
    # the refined regions measure areas, not grid points: a circle of radius sqrt(q) has area pi q
    fine, values = refine(grid, bowl)
    inside = -2 * (values - values.max()) < q_threshold(dof=2)
    cell = (10 / (len(np.unique(fine[:, 0])) - 1)) ** 2
    assert inside.sum() * cell == pytest.approx(np.pi * q_threshold(dof=2), rel=0.03)
    # one parameter
    line = np.linspace(-5, 5, 11)[:, None]
    iou, distance = compare_regions(line, -0.5 * (line[:, 0] - 1) ** 2, -0.5 * line[:, 0] ** 2)
    assert iou == pytest.approx(1 / 3, abs=0.01) and distance == pytest.approx(1.0, abs=0.03)



def _limits_with(cfg, kinematics, tmp: Path) -> dict:
    """The evaluate stage's limits (app.evaluation.limits.expected_limits, with the truth comparison) for an
    "estimator" whose kinematic log r is ``kinematics(x, theta_grid)``, through MadMiner's statistic."""
    from app.domain import datafile
    from app.domain.methods import METHODS
    from app.evaluation.limits import expected_limits
    from app.ml import madminer_patches
    from app.pipeline import resolved

    cfg = resolved(cfg)
    tmp.mkdir(parents=True, exist_ok=True)
    info = datafile.resolve(cfg.data, cfg.paths.cache_dir)
    madminer_patches.apply_numpy_shim()
    batched = madminer_patches.batched_limits()

    class Given(batched):
        def _calculate_log_likelihood_ratio_kinematics(self, x, theta_grid, model, theta1=None):
            return kinematics(x, theta_grid)

    original = madminer_patches.batched_limits
    madminer_patches.batched_limits = lambda: Given
    try:
        with madminer_patches.estimators_loaded_by(lambda _file: None), madminer_patches.events_in_memory():
            return expected_limits(cfg, METHODS["alices"], info, tmp / "model.pt", tmp, ToyTruth.from_file(info.path))
    finally:
        madminer_patches.batched_limits = original


@pytest.mark.parametrize("theta_true", ["[0.0,0.0]", "[3.0,-2.0]"])
def test_exact_log_r_through_the_limit_statistic_reaches_iou_one(compose_app, tmp_path, theta_true):
    """The truth of a kinematic limit shares MadMiner's event count and rate term (its Monte Carlo cross section):
    the exact log r through MadMiner's statistic reaches IoU 1. Before (the truth with the exact sigma: 59.72
    instead of 60.00 events at the SM) this ceiling was 0.991 / 0.953 with the rate, 0.996 / 0.964 without."""
    cfg = compose_app("training=alices", "evaluation.modes=[ml]", "evaluation.include_xsec=[true,false]",
                      f"evaluation.theta_true={theta_true}")
    truth = ToyTruth(0.5, 2)
    metrics = _limits_with(cfg, lambda x, grid: truth.log_r_grid(x, grid, np.zeros(2)), tmp_path)
    assert metrics["truth_limits_ml_iou"] >= 0.999 and metrics["truth_limits_ml_kin_iou"] >= 0.999
    assert metrics["truth_limits_ml_best_fit_distance"] < 1e-9
    assert metrics["limits_ml_cl68_touches_edge"] == 0.0
    area = metrics["limits_ml_cl68_area"]
    # and it can fail: an overconfident estimator (log r x 2) shrinks its region to about half the true one
    # (measured IoU: 0.50 / 0.64 with the rate, 0.50 / 0.49 without)
    metrics = _limits_with(cfg, lambda x, grid: 2 * truth.log_r_grid(x, grid, np.zeros(2)), tmp_path / "x2")
    assert metrics["truth_limits_ml_iou"] < 0.7, metrics["truth_limits_ml_iou"]
    assert metrics["truth_limits_ml_kin_iou"] < 0.6, metrics["truth_limits_ml_kin_iou"]
    assert metrics["limits_ml_cl68_area"] < 0.7 * area  # which the area rewards: it never ranks estimators

# --------------------------------------------------------------------------- fast estimator evaluation
@pytest.fixture(scope="module")
def tiny_estimators(tmp_path_factory):
    """One-epoch MadMiner estimators of every kind the truth metrics evaluate (seconds on 2 cores)."""
    import torch
    from madminer import ml
    from madminer.sampling import SampleAugmenter, benchmark, random_morphing_points

    path = simulator.generate_toy_file(simulator.ToySettings(n_events=3000), tmp_path_factory.mktemp("tiny") / "toy.h5")
    augmenter = SampleAugmenter(str(path))
    prior = random_morphing_points(10, [("flat", -10, 10)] * 2)
    np.random.seed(1)
    torch.manual_seed(1)
    train = dict(n_epochs=1, n_workers=0, verbose="none", validation_split=None, batch_size=64)
    x, theta0, _, y, r_xz, t_xz, _ = augmenter.sample_train_ratio(prior, benchmark("sm"), n_samples=400)
    ratio = ml.ParameterizedRatioEstimator(n_hidden=(8,))
    ratio.train(method="alices", x=x, y=y, theta=theta0, r_xz=r_xz, t_xz=t_xz, **train)
    ensemble = ml.Ensemble([ml.ParameterizedRatioEstimator(n_hidden=(8,)) for _ in range(2)])
    ensemble.train_all(method="carl", x=x, y=y, theta=theta0, **train)
    x2, th0, th1, y2, *_ = augmenter.sample_train_more_ratios(prior, benchmark("sm"), n_samples=400)
    double = ml.DoubleParameterizedRatioEstimator(n_hidden=(8,))
    double.train(method="carl", x=x2, y=y2, theta0=th0, theta1=th1, **train)
    xd, thd, _, _ = augmenter.sample_train_density(prior, n_samples=400)
    density = ml.LikelihoodEstimator(n_mades=1, n_hidden=(8,))
    density.train(method="nde", x=xd, theta=thd, **train)
    x_test, _, _ = augmenter.sample_test(benchmark("sm"), n_samples=60)
    return dict(ratio=ratio, ensemble=ensemble, double=double, density=density, x=x_test.astype(np.float64))


def test_batched_estimator_evaluation_equals_madminer(tiny_estimators):
    """The batched grids give MadMiner's evaluation; for the double-parameterized and density estimators MadMiner's is
    asked with theta scaled as in training, which its own evaluation omits (docs/madminer-bugs.md)."""
    from app.ml.batched import model_log_likelihood_grid, model_log_r_grid, parameter_inputs

    e = tiny_estimators
    x = e["x"]
    grid = np.array([[0.0, 0.0], [5.0, -3.0], [-12.0, 7.0], [20.0, 20.0]])
    ref = np.zeros(2)
    fast = model_log_r_grid(e["ratio"], x, grid, ref)
    assert fast.shape == (4, len(x))
    api = e["ratio"].evaluate_log_likelihood_ratio(x=x, theta=grid, test_all_combinations=True)[0]
    np.testing.assert_allclose(fast, api, atol=1e-5)
    api = e["ensemble"].evaluate_log_likelihood_ratio(x=x, theta=grid, test_all_combinations=True)[0]
    np.testing.assert_allclose(model_log_r_grid(e["ensemble"], x, grid, ref), api, atol=1e-5)
    ref1 = np.array([3.0, 1.0])
    double = e["double"]
    api = double.evaluate_log_likelihood_ratio(
        x=x, theta0=parameter_inputs(double, grid), theta1=parameter_inputs(double, np.tile(ref1, (4, 1))),
        test_all_combinations=True,
    )[0]
    np.testing.assert_allclose(model_log_r_grid(e["double"], x, grid, ref1), api, atol=1e-5)
    # flows: MadMiner's log likelihood is that of the scaled inputs; ours adds the Jacobian -sum(log std)
    density = e["density"]
    api = density.evaluate_log_likelihood(x=x, theta=parameter_inputs(density, grid), test_all_combinations=True)[0]
    log_std = np.sum(np.log(density.x_scaling_stds))
    np.testing.assert_allclose(model_log_likelihood_grid(density, x, grid) + log_std, api, atol=1e-4)


def test_density_estimates_are_normalised_in_observable_space(tiny_estimators):
    """With the Jacobian the estimated p(x | theta) integrates to 1 over (pt_j1, delta_phi_jj)."""
    from app.ml.batched import model_log_likelihood_grid

    density = tiny_estimators["density"]
    mean, std = density.x_scaling_means, density.x_scaling_stds
    axes = [np.linspace(m - 10 * s, m + 10 * s, 301) for m, s in zip(mean, std)]
    mid = [0.5 * (a[1:] + a[:-1]) for a in axes]
    mesh = np.stack(np.meshgrid(*mid, indexing="ij"), axis=-1).reshape(-1, 2)
    cell = np.prod([a[1] - a[0] for a in axes])
    for theta in ([0.0, 0.0], [8.0, -5.0]):
        log_p = model_log_likelihood_grid(density, mesh, np.array([theta]))[0]
        assert np.exp(log_p).sum() * cell == pytest.approx(1.0, abs=0.02)


def test_truth_metrics_skipped_with_one_reason(tmp_path, caplog):
    import logging

    from omegaconf import OmegaConf

    from app.domain.datafile import inspect
    from app.evaluation.truth_metrics import truth_for

    path = simulator.generate_toy_file(simulator.ToySettings(n_events=600), tmp_path / "toy.h5")
    info = inspect(path)
    on = OmegaConf.create({"evaluation": {"truth": True}})
    assert truth_for(on, info) == ToyTruth(0.5, 2)
    with caplog.at_level(logging.INFO, logger="app.evaluation.truth_metrics"):
        assert truth_for(OmegaConf.create({"evaluation": {"truth": False}}), info) is None
        with h5py.File(path, "a") as f:
            del f.attrs[simulator.SETTINGS_ATTR]
        assert truth_for(on, info) is None
    assert [r.getMessage() for r in caplog.records if r.name == "app.evaluation.truth_metrics"] == [
        "truth metrics skipped: evaluation.truth=false",
        f"truth metrics skipped: {path} is not a toy file (no tractable likelihood)",
    ]


# --------------------------------------------------------------------------- end to end (the real CLI)
def _reinitialise(estimator, seed: int):
    import torch

    torch.manual_seed(seed)
    for module in estimator.model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return estimator


def _check_scalar_metrics(metrics: dict) -> None:
    for key, value in metrics.items():
        if key != "loss_history":
            assert isinstance(value, float) or (isinstance(value, int) and not isinstance(value, bool)), key


def test_default_alices_run_reaches_the_log_r_bound_an_untrained_model_does_not(run_app, tmp_path):
    from app.domain import datafile
    from app.domain.theta import benchmark_points
    from app.evaluation.truth_metrics import truth_log_r_metrics
    from app.ml import estimators

    proc = run_app("objective.metric=truth_log_r_mse")
    run_dir = tmp_path / "run"
    metrics = _metrics(run_dir)
    _check_scalar_metrics(metrics)
    assert metrics["truth_log_r_mse"] < ALICES_LOG_R_MSE_MAX, metrics["truth_log_r_mse"]
    assert metrics["truth_log_r_corr"] > ALICES_LOG_R_CORR_MIN, metrics["truth_log_r_corr"]
    assert f"objective truth_log_r_mse = {metrics['truth_log_r_mse']:.6g}" in proc.out
    results = run_dir / "results"
    for key in ("rate", "histo", "ml"):  # the metrics are the comparison of the regions the run saved
        iou, distance = compare_regions(
            np.load(results / "grid.npy"),
            np.load(results / f"log_likelihood_{key}.npy"),
            np.load(results / f"truth_log_likelihood_{key}.npy"),
        )
        assert metrics[f"truth_limits_{key}_iou"] == pytest.approx(iou)
        assert metrics[f"truth_limits_{key}_best_fit_distance"] == pytest.approx(distance)
        assert (results / f"truth_p_values_{key}.npy").exists()
    assert metrics["truth_limits_rate_iou"] > 0.8  # MadMiner's MC sigma(theta) vs the exact one
    assert metrics["truth_limits_ml_best_fit_distance"] < ALICES_ML_BEST_FIT_DISTANCE_MAX
    assert metrics["truth_limits_ml_iou"] > ALICES_ML_IOU_MIN, metrics["truth_limits_ml_iou"]
    assert "truth metrics skipped" not in proc.out
    for plot in ("log_r_vs_truth.png", "limits_vs_truth.png"):
        assert (run_dir / "plots" / plot).stat().st_size > 1000

    x, grid = np.load(results / "test_x.npy"), np.load(results / "grid.npy")
    assert np.load(results / "truth_log_r_grid.npy").shape == (625, len(x))
    np.testing.assert_array_equal(np.load(results / "truth_reference.npy"), [0.0, 0.0])  # theta1 = sm
    truth = ToyTruth(0.5, 2)
    # the trained model through the same function reproduces the run's metric ...
    trained = truth_log_r_metrics(estimators.load(run_dir / "model"), truth, x, grid, np.zeros(2), {})
    assert trained["truth_log_r_mse"] == pytest.approx(metrics["truth_log_r_mse"], rel=1e-4)
    # ... and randomly initialised networks of the same architecture fail the bounds, also at each benchmark
    points = benchmark_points(datafile.inspect(Path(json.loads((run_dir / "run.json").read_text())["data_path"])))
    for seed in range(3):
        untrained = _reinitialise(estimators.load(run_dir / "model"), seed)
        m = truth_log_r_metrics(untrained, truth, x, grid, np.zeros(2), points)
        assert m["truth_log_r_mse"] > ALICES_LOG_R_MSE_MAX, (seed, m)
        assert m["truth_log_r_corr"] < ALICES_LOG_R_CORR_MIN, (seed, m)
        # (not at sm = theta_ref, where the true log r is 0 and a fresh network's small outputs are close to it)
        for name in ("w", "morphing_basis_vector_2"):
            assert metrics[f"truth_log_r_mse_at_{name}"] < m[f"truth_log_r_mse_at_{name}"], (seed, name, m)


@pytest.mark.slow
def test_default_sally_run_reaches_the_score_and_limit_bounds(run_app, tmp_path):
    from app.evaluation.truth_metrics import truth_score_metrics
    from app.ml import estimators

    proc = run_app("training=sally", "objective.metric=truth_score_mse")
    run_dir = tmp_path / "run"
    metrics = _metrics(run_dir)
    _check_scalar_metrics(metrics)
    assert metrics["truth_score_mse"] < SALLY_SCORE_MSE_MAX, metrics["truth_score_mse"]
    assert metrics["truth_limits_sally_iou"] > SALLY_LIMITS_IOU_MIN, metrics["truth_limits_sally_iou"]
    assert "objective truth_score_mse" in proc.out
    assert "truth_log_r_mse" not in metrics
    for plot in ("score_vs_truth.png", "limits_vs_truth.png"):
        assert (run_dir / "plots" / plot).stat().st_size > 1000
    # the same check on a randomly initialised score network fails
    x = np.load(run_dir / "results" / "test_score_x.npy")
    truth_score = np.load(run_dir / "results" / "test_score_truth.npy")
    assert truth_score.shape == x.shape == np.load(run_dir / "results" / "test_t_xz.npy").shape
    untrained = _reinitialise(estimators.load(run_dir / "model"), 0)
    m = truth_score_metrics(untrained.evaluate_score(x=x), ToyTruth(0.5, 2), x, np.zeros(2))
    assert m["truth_score_mse"] > SALLY_SCORE_MSE_MAX, m


def test_density_method_reports_likelihood_gap(run_app, tmp_path):
    from app.ml import estimators

    run_app("training=nde", "training.n_mades=2", *TINY)
    metrics = _metrics(tmp_path / "run")
    _check_scalar_metrics(metrics)
    # TINY trains 2 epochs: no quality bound here (test_correctness bounds a default-size density run);
    # the gap is KL(p || p_hat) from the saved exact and estimated log-likelihoods, in observable coordinates
    results = tmp_path / "run" / "results"
    estimator = estimators.load(tmp_path / "run" / "model")
    log_std = np.sum(np.log(estimator.x_scaling_stds))  # MadMiner's flows model the scaled inputs
    exact, estimated = np.load(results / "truth_log_p_theta_true.npy"), np.load(results / "test_log_p_theta_true.npy")
    gap = np.mean(exact - (estimated - log_std))
    assert metrics["truth_log_likelihood_gap"] == pytest.approx(gap, rel=1e-4, abs=1e-4)
    for key in ("truth_log_r_mse", "truth_log_r_corr", "truth_limits_ml_iou"):
        assert np.isfinite(metrics[key]), key
    assert (tmp_path / "run" / "plots" / "log_r_vs_truth.png").exists()


@pytest.mark.slow
def test_file_without_truth_has_no_truth_metrics(run_app, tmp_path):
    path = simulator.generate_toy_file(simulator.ToySettings(n_events=4000), tmp_path / "events.h5")
    with h5py.File(path, "a") as f:
        del f.attrs[simulator.SETTINGS_ATTR]
    tiny = [a for a in TINY if not a.startswith("data.")]
    # a truth objective is refused in one line before any work (issue 19; it used to fail after the whole job)
    proc = run_app("data=file", f"data.path={path}", *tiny, "objective.metric=truth_log_r_mse", check=False)
    assert proc.returncode == 2, proc.out[-3000:]
    assert "objective.metric=truth_log_r_mse compares with the toy's exact likelihood" in proc.stderr
    assert not (tmp_path / "run" / "results").exists() and not (tmp_path / "run" / "run.json").exists()
    proc = run_app("data=file", f"data.path={path}", *tiny)
    metrics = _metrics(tmp_path / "run")
    assert "limits_ml_cl68_fraction" in metrics
    assert not [k for k in metrics if k.startswith("truth_")]
    assert proc.out.count("truth metrics skipped") == 1
    assert f"truth metrics skipped: {path} is not a toy file (no tractable likelihood)" in proc.out
    assert not list((tmp_path / "run" / "plots").glob("*truth*"))
