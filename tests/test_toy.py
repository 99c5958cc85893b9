"""Tests of app.toy.simulator: the generated MadMiner toy file and the model functions behind it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest

from app.toy import simulator

BENCHMARKS_2D = ["sm", "w"] + [f"morphing_basis_vector_{i}" for i in range(2, 6)]
BENCHMARKS_1D = ["sm", "w", "morphing_basis_vector_2"]


def _read(path):
    with h5py.File(path, "r") as f:
        return {
            "observations": f["samples/observations"][()],
            "weights": f["samples/weights"][()],
            "ids": f["samples/sampling_benchmarks"][()],
            "thetas": f["benchmarks/values"][()],
            "n_per_benchmark": f["sample_summary/signal_events"][()],
        }


def _names(raw):
    return [n.decode() for n in raw]


@pytest.fixture(scope="module")
def toy2(tmp_path_factory):
    settings = simulator.ToySettings(n_events=50000)
    return settings, simulator.generate_toy_file(settings, tmp_path_factory.mktemp("toy2") / "toy2.h5")


@pytest.fixture(scope="module")
def toy1(tmp_path_factory):
    settings = simulator.ToySettings(n_events=5000, n_parameters=1, seed=7)
    return settings, simulator.generate_toy_file(settings, tmp_path_factory.mktemp("toy1") / "toy1.h5")


# --------------------------------------------------------------------------- module hygiene
@pytest.mark.parametrize("module", ["app.toy.simulator", "app.toy.truth"])
def test_import_does_not_load_madminer_or_torch(module):
    src = str(Path(simulator.__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    code = f"import sys, {module}; print(sorted(m for m in ('madminer', 'torch', 'h5py') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- determinism and caching
def test_same_settings_give_identical_events_other_seed_differs(tmp_path):
    settings = simulator.ToySettings(n_events=600, seed=3)
    a = _read(simulator.generate_toy_file(settings, tmp_path / "a.h5"))
    b = _read(simulator.generate_toy_file(settings, tmp_path / "b.h5"))
    c = _read(simulator.generate_toy_file(replace(settings, seed=4), tmp_path / "c.h5"))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["observations"], c["observations"])
    assert not np.array_equal(a["weights"], c["weights"])


def test_generation_leaves_numpy_global_rng_alone(tmp_path):
    np.random.seed(99)
    expected = np.random.rand(3)
    np.random.seed(99)
    simulator.generate_toy_file(simulator.ToySettings(n_events=300), tmp_path / "t.h5")
    np.testing.assert_array_equal(np.random.rand(3), expected)


def test_ensure_is_content_addressed_and_reuses(tmp_path):
    settings = simulator.ToySettings(n_events=600)
    first = simulator.ensure_toy_file(settings, tmp_path)
    assert first == simulator.toy_file_path(settings, tmp_path)
    assert first.parent == tmp_path / "toy" and first.name.startswith("toy-") and first.suffix == ".h5"
    assert len(first.stem) == len("toy-") + 12
    os.utime(first, (1_000_000, 1_000_000))
    second = simulator.ensure_toy_file(settings, tmp_path)
    assert second == first
    assert first.stat().st_mtime == 1_000_000  # reused, not regenerated
    for other in (
        replace(settings, seed=1),
        replace(settings, n_events=601),
        replace(settings, smearing=0.0),
        replace(settings, n_parameters=1),
    ):
        assert simulator.toy_file_path(other, tmp_path) != first
    # the same settings written with other number types are the same file
    assert simulator.toy_file_path(replace(settings, smearing=1), tmp_path) == simulator.toy_file_path(
        replace(settings, smearing=1.0), tmp_path
    )
    assert [p.name for p in (tmp_path / "toy").iterdir()] == [first.name]  # no temporary files left


def test_ensure_with_explicit_path(tmp_path):
    settings = simulator.ToySettings(n_events=600)
    target = tmp_path / "sub" / "mine.h5"
    assert simulator.ensure_toy_file(settings, tmp_path / "cache", path=str(target)) == target
    assert not (tmp_path / "cache").exists()
    os.utime(target, (1_000_000, 1_000_000))
    simulator.ensure_toy_file(settings, tmp_path / "cache", path=target)
    assert target.stat().st_mtime == 1_000_000  # same settings: reused
    simulator.ensure_toy_file(replace(settings, seed=2), tmp_path / "cache", path=target)
    assert target.stat().st_mtime != 1_000_000  # a toy file for other settings: regenerated
    assert simulator.read_toy_settings(target)["seed"] == 2

    foreign = tmp_path / "foreign.h5"
    foreign.write_bytes(b"not a toy")
    with pytest.raises(ValueError, match="not a toy file"):
        simulator.ensure_toy_file(settings, tmp_path / "cache", path=foreign)
    assert foreign.read_bytes() == b"not a toy"


def test_failed_generation_leaves_no_file(tmp_path, monkeypatch):
    import madminer.utils.interfaces.hdf5 as mm_hdf5

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(mm_hdf5, "save_events", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        simulator.generate_toy_file(simulator.ToySettings(n_events=600), tmp_path / "t.h5")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- file structure
@pytest.mark.parametrize("which, n_params, names", [("toy2", 2, BENCHMARKS_2D), ("toy1", 1, BENCHMARKS_1D)])
def test_structure(request, which, n_params, names):
    settings, path = request.getfixturevalue(which)
    with h5py.File(path, "r") as f:
        assert _names(f["parameters/names"][()]) == ["CWL2", "CPWL2"][:n_params]
        assert _names(f["parameters/lha_blocks"][()]) == ["dim6"] * n_params
        assert list(f["parameters/lha_ids"][()]) == [2, 5][:n_params]
        assert list(f["parameters/max_power"][()]) == [2] * n_params
        np.testing.assert_array_equal(f["parameters/val_ranges"][()], [[-10.0, 10.0]] * n_params)
        assert _names(f["observables/names"][()]) == ["pt_j1", "delta_phi_jj"]
        assert _names(f["benchmarks/names"][()]) == names
        values = f["benchmarks/values"][()]
        assert values.shape == (len(names), n_params)
        np.testing.assert_array_equal(values[0], np.zeros(n_params))
        np.testing.assert_array_equal(values[1], [10.0, 0.0][:n_params])
        assert list(f["benchmarks/is_nuisance"][()]) == [0] * len(names)
        assert list(f["benchmarks/is_reference"][()]) == [1] + [0] * (len(names) - 1)
        assert f["morphing/components"].shape == (len(names), n_params)
        assert f["morphing/morphing_matrix"].shape == (len(names), len(names))
        assert f["samples/observations"].shape == (settings.n_events, 2)
        assert f["samples/weights"].shape == (settings.n_events, len(names))
        n_b = f["sample_summary/signal_events"][()]
        assert f["sample_summary/background_events"][()] == 0
        ids = f["samples/sampling_benchmarks"][()]
    assert n_b.sum() == settings.n_events
    np.testing.assert_array_equal(np.bincount(ids, minlength=len(names)), n_b)
    assert n_b[1:].tolist() == [settings.n_events // len(names)] * (len(names) - 1)
    assert not np.all(np.diff(ids) >= 0)  # shuffled
    assert simulator.read_toy_settings(path) == {**settings.canonical(), "format_version": simulator.FORMAT_VERSION}


def test_file_holds_simulate_events(toy2):
    settings, path = toy2
    data = _read(path)
    events = simulator.simulate_events(settings, data["thetas"])
    np.testing.assert_array_equal(events.observations, data["observations"])
    np.testing.assert_array_equal(events.weights, data["weights"])
    np.testing.assert_array_equal(events.sampling_ids, data["ids"])
    np.testing.assert_array_equal(events.n_per_benchmark, data["n_per_benchmark"])
    np.testing.assert_allclose(simulator.smeared_from_observables(events.observations), events.xprime, atol=1e-12)


# --------------------------------------------------------------------------- physics
@pytest.mark.parametrize("which", ["toy2", "toy1"])
def test_morphing_is_exact(request, which):
    from madminer.analysis import DataAnalyzer

    settings, path = request.getfixturevalue(which)
    data = _read(path)
    events = simulator.simulate_events(settings, data["thetas"])
    morpher = DataAnalyzer(str(path)).morpher
    rng = np.random.default_rng(0)
    for theta in rng.uniform(-15, 15, size=(4, settings.n_parameters)):
        morphed = data["weights"] @ morpher.calculate_morphing_weights(theta)
        direct = simulator.event_weights(events.z, data["ids"], data["thetas"], data["n_per_benchmark"], [theta])
        np.testing.assert_allclose(morphed, direct[:, 0], rtol=1e-6)


def test_morphing_is_exact_without_smearing(tmp_path):
    from madminer.analysis import DataAnalyzer

    path = simulator.generate_toy_file(simulator.ToySettings(n_events=600, smearing=0.0), tmp_path / "s0.h5")
    data = _read(path)
    z = simulator.smeared_from_observables(data["observations"])  # smearing 0: x' = z
    theta = np.array([-7.0, 12.0])
    morphed = data["weights"] @ DataAnalyzer(str(path)).morpher.calculate_morphing_weights(theta)
    direct = simulator.event_weights(z, data["ids"], data["thetas"], data["n_per_benchmark"], [theta])[:, 0]
    np.testing.assert_allclose(morphed, direct, rtol=1e-6)


def test_cross_sections(toy2):
    from madminer.analysis import DataAnalyzer

    _, path = toy2
    data = _read(path)
    expected = simulator.cross_section(data["thetas"])
    assert expected[0] == pytest.approx(0.006)
    # MadMiner's view (all runs, sampling factors n_b / N), which is what its tools use
    xsecs, _ = DataAnalyzer(str(path)).xsecs()
    np.testing.assert_allclose(xsecs, expected, rtol=0.03)
    factors = data["n_per_benchmark"] / data["n_per_benchmark"].sum()
    combined = (data["weights"] * factors[data["ids"]][:, None]).sum(axis=0)
    np.testing.assert_allclose(combined, expected, rtol=0.03)
    # each run on its own estimates every cross section (within 5 MC standard deviations)
    for b in range(len(expected)):
        w = data["weights"][data["ids"] == b]
        assert np.all(np.abs(w.sum(axis=0) - expected) < 5 * np.sqrt((w**2).sum(axis=0)))
        assert w[:, b].sum() == pytest.approx(expected[b], rel=1e-9)  # its own column: exactly sigma_b


def test_cross_section_formula():
    assert simulator.cross_section([0.0, 0.0]) == pytest.approx(simulator.SIGMA_SM)
    assert simulator.cross_section([0.0]) == pytest.approx(simulator.SIGMA_SM)
    k2 = (10 / simulator.C0) ** 2
    sigma_w = simulator.SIGMA_SM * (1 + k2 + simulator.DELTA) / (1 + simulator.DELTA)
    assert simulator.cross_section([10.0, 0.0]) == pytest.approx(sigma_w)
    assert simulator.cross_section([10.0]) == pytest.approx(simulator.cross_section([10.0, 0.0]))
    # numerical integral of dsigma/dz on a grid
    g = np.linspace(-9, 9, 901)
    zz = np.stack(np.meshgrid(g, g, indexing="ij"), axis=-1)
    for theta in ([0.0, 0.0], [10.0, -4.0], [-3.0, 8.0]):
        integral = simulator.differential_cross_section(zz, theta).sum() * (g[1] - g[0]) ** 2
        assert integral == pytest.approx(simulator.cross_section(theta), rel=1e-6)
        smeared = simulator.smeared_density(zz, theta, 0.7).sum() * (g[1] - g[0]) ** 2
        assert smeared == pytest.approx(1.0, rel=1e-5)
    thetas = np.array([[0.0, 0.0], [10.0, 0.0], [1.0, 2.0]])
    assert simulator.cross_section(thetas).shape == (3,)


@pytest.mark.parametrize("theta", [[0.0, 0.0], [10.0, 0.0], [-6.0, 8.0], [3.0, -40.0]])
def test_sample_latent_matches_density(theta):
    rng = np.random.default_rng(11)
    n = 200_000
    z = simulator.sample_latent(theta, n, rng)
    assert z.shape == (n, 2)
    a = simulator.couplings(theta)
    k = np.linalg.norm(a)
    norm = 1 + simulator.DELTA + k**2
    a_hat = a / k if k > 0 else np.array([1.0, 0.0])
    u = z @ a_hat
    v = z @ np.array([-a_hat[1], a_hat[0]])
    se = 5 / np.sqrt(n)
    assert u.mean() == pytest.approx(2 * k / norm, abs=5 * se * np.sqrt((1 + 3 * k**2) / norm))
    assert (u**2).mean() == pytest.approx((1 + simulator.DELTA + 3 * k**2) / norm, abs=10 * se * (1 + k))
    assert v.mean() == pytest.approx(0.0, abs=se)
    assert (v**2).mean() == pytest.approx(1.0, abs=2 * se)
    # histogram of u against the analytic marginal phi(u) [(1 + k u)^2 + DELTA] / norm
    edges = np.linspace(-4, 4, 33)
    counts, _ = np.histogram(u, bins=edges)
    centres = 0.5 * (edges[1:] + edges[:-1])
    fine = np.linspace(-4, 4, 32 * 50 + 1)
    dens = np.exp(-0.5 * fine**2) / np.sqrt(2 * np.pi) * ((1 + k * fine) ** 2 + simulator.DELTA) / norm
    probs = np.add.reduceat(dens[:-1] * (fine[1] - fine[0]), np.arange(0, 32 * 50, 50))
    expected = n * probs
    keep = expected > 50
    pulls = (counts[keep] - expected[keep]) / np.sqrt(expected[keep])
    assert np.abs(pulls).max() < 5, (centres[keep], pulls)


def test_smearing_and_observables_transforms():
    rng = np.random.default_rng(5)
    z = rng.standard_normal((1000, 2))
    np.testing.assert_array_equal(simulator.smear(z, 0.0, np.random.default_rng(1)), z)
    xprime = simulator.smear(z, 0.5, np.random.default_rng(1))
    assert np.std(xprime - z) == pytest.approx(0.5, rel=0.1)
    x = simulator.observables_from_smeared(xprime)
    assert np.all(x[:, 0] > 0)
    np.testing.assert_allclose(x[:, 0], 150 * np.exp(0.6 * xprime[:, 0]))
    np.testing.assert_array_equal(x[:, 1], xprime[:, 1])
    np.testing.assert_allclose(simulator.smeared_from_observables(x), xprime, atol=1e-12)
    # densities: smearing 0 is the latent density; the observable density carries the Jacobian
    theta = [4.0, -2.0]
    np.testing.assert_allclose(simulator.smeared_density(z, theta, 0.0), simulator.latent_density(z, theta), rtol=1e-12)
    np.testing.assert_allclose(
        simulator.observables_density(x, theta, 0.5), simulator.smeared_density(xprime, theta, 0.5) / (0.6 * x[:, 0])
    )


def test_smeared_density_matches_simulation():
    rng = np.random.default_rng(2)
    theta, s, n = [8.0, 5.0], 0.8, 400_000
    xprime = simulator.smear(simulator.sample_latent(theta, n, rng), s, rng)
    edges = np.linspace(-4, 4, 17)
    counts, _, _ = np.histogram2d(xprime[:, 0], xprime[:, 1], bins=[edges, edges])
    fine = np.linspace(-4, 4, 16 * 20 + 1)
    mid = 0.5 * (fine[1:] + fine[:-1])
    grid = np.stack(np.meshgrid(mid, mid, indexing="ij"), axis=-1)
    dens = simulator.smeared_density(grid, theta, s) * (fine[1] - fine[0]) ** 2
    expected = n * dens.reshape(16, 20, 16, 20).sum(axis=(1, 3))
    keep = expected > 100
    pulls = (counts[keep] - expected[keep]) / np.sqrt(expected[keep])
    assert np.abs(pulls).max() < 5


def test_couplings_shapes():
    np.testing.assert_array_equal(simulator.couplings([3.0, 4.0]), [1.0, 1.0])
    np.testing.assert_array_equal(simulator.couplings([[3.0], [6.0]]), [[1.0, 0.0], [2.0, 0.0]])
    assert simulator.amplitude_squared(np.zeros((5, 2)), [1.0, 1.0]).shape == (5,)
    with pytest.raises(ValueError):
        simulator.couplings([1.0, 2.0, 3.0])


# --------------------------------------------------------------------------- MadMiner accepts it
def test_madminer_tools_accept_the_two_parameter_file(toy2, tmp_path):
    from madminer.fisherinformation import FisherInformation
    from madminer.limits import AsymptoticLimits
    from madminer.sampling import SampleAugmenter, benchmark, benchmarks, random_morphing_points

    _, path = toy2
    sa = SampleAugmenter(str(path))
    prior = random_morphing_points(5, [("flat", -10, 10)] * 2)
    x, theta0, theta1, y, r_xz, t_xz, _ = sa.sample_train_ratio(
        theta0=prior,
        theta1=benchmark("sm"),
        n_samples=500,
        test_split=0.2,
        validation_split=0.2,
        folder=str(tmp_path),
        filename="ratio",
    )
    assert x.shape == (500, 2) and theta0.shape == (500, 2)
    assert np.all(np.isfinite(r_xz)) and np.all(r_xz > 0) and np.all(np.isfinite(t_xz))
    x, theta, t_xz, _ = sa.sample_train_local(theta=benchmark("sm"), n_samples=300, test_split=0.2)
    assert t_xz.shape == (300, 2) and np.all(np.isfinite(t_xz))
    x, theta, t_xz, _ = sa.sample_train_density(theta=prior, n_samples=300)
    assert x.shape == (300, 2) and np.all(np.isfinite(t_xz))
    out = sa.sample_train_more_ratios(
        theta0=prior, theta1=benchmark("sm"), n_samples=300, additional_thetas=[benchmarks(["w"])]
    )
    assert all(np.all(np.isfinite(a)) for a in out[:-1])
    x, theta, _ = sa.sample_test(theta=benchmark("sm"), n_samples=300)
    assert x.shape == (300, 2) and np.all(np.isfinite(x))

    grid, p_values, i_ml, *_ = AsymptoticLimits(str(path)).expected_limits(
        mode="rate",
        theta_true=[0.0, 0.0],
        grid_ranges=[(-20, 20), (-20, 20)],
        grid_resolutions=[5, 5],
        luminosity=10000.0,
    )
    assert grid.shape == (25, 2) and np.all(np.isfinite(p_values)) and 0 <= i_ml < 25

    info, _ = FisherInformation(str(path)).rate_information([0.0, 0.0], luminosity=10000.0)
    assert info.shape == (2, 2) and np.all(np.isfinite(info))


def test_madminer_tools_accept_the_one_parameter_file(toy1):
    from madminer.sampling import SampleAugmenter, benchmark, random_morphing_points

    _, path = toy1
    out = SampleAugmenter(str(path)).sample_train_ratio(
        theta0=random_morphing_points(5, [("flat", -10, 10)]),
        theta1=benchmark("sm"),
        n_samples=300,
        test_split=0.2,
        validation_split=0.2,
    )
    x, theta0, _, _, r_xz, t_xz, _ = out
    assert x.shape == (300, 2) and theta0.shape == (300, 1)
    assert np.all(np.isfinite(r_xz)) and np.all(np.isfinite(t_xz))


# --------------------------------------------------------------------------- bad settings
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_events": 59}, r"n_events=59 is too small for 6 benchmarks; use n_events >= 60"),
        ({"n_events": 29, "n_parameters": 1}, r"use n_events >= 30"),
        ({"n_events": 100.5}, r"n_events=100.5 is not an integer"),
        ({"n_parameters": 3}, r"n_parameters=3 is not supported; use n_parameters=1 or 2"),
        ({"smearing": -0.1}, r"smearing=-0.1 is invalid; use a finite float >= 0"),
        ({"smearing": float("nan")}, r"smearing=nan is invalid"),
        ({"smearing": "0.5"}, r"smearing='0.5' is not a number"),
        ({"seed": -1}, r"seed=-1 is not a non-negative integer"),
    ],
)
def test_bad_settings_raise_helpful_value_error(tmp_path, kwargs, match):
    settings = simulator.ToySettings(**kwargs)
    for call in (
        lambda: simulator.ensure_toy_file(settings, tmp_path),
        lambda: simulator.generate_toy_file(settings, tmp_path / "t.h5"),
    ):
        with pytest.raises(ValueError, match=match) as err:
            call()
        assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_minimum_settings_work(tmp_path):
    path = simulator.ensure_toy_file(simulator.ToySettings(n_events=30, n_parameters=1, smearing=0), tmp_path)
    data = _read(path)
    assert data["observations"].shape == (30, 2)
    assert json.loads(json.dumps(simulator.read_toy_settings(path)))["smearing"] == 0.0
