"""The NumPy >= 1.24 shim for madminer's histogramdd(normed=...) calls."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

from app.ml import madminer_patches


@pytest.fixture
def unpatched():
    """The madminer histogram modules with the real numpy, restored to the shim afterwards."""
    modules = [importlib.import_module(name) for name in madminer_patches.PATCHED_MODULES]
    saved = [m.np for m in modules]
    for m in modules:
        m.np = np
    yield modules
    for m, value in zip(modules, saved):
        m.np = value


def test_madminer_histograms_fail_without_the_shim_and_work_with_it(unpatched):
    from madminer.utils.histo import Histo

    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 1))
    weights = rng.uniform(size=500)
    assert madminer_patches.needed(), "this NumPy still accepts normed=: the shim would be unnecessary"
    with pytest.raises(TypeError, match="normed"):
        Histo(x, weights, bins=[5])

    assert madminer_patches.apply() == list(madminer_patches.PATCHED_MODULES)
    histo = Histo(x, weights, bins=[5])
    probs = histo.log_likelihood(x)
    assert np.all(np.isfinite(probs))
    assert madminer_patches.apply() == list(madminer_patches.PATCHED_MODULES)  # idempotent


def test_shim_only_touches_madminer_modules(unpatched):
    madminer_patches.apply()
    assert np.histogramdd is not madminer_patches.histogramdd  # numpy itself is untouched
    for module in unpatched:
        assert module.np.histogramdd is madminer_patches.histogramdd
        assert module.np.sum is np.sum  # everything else is plain numpy


def test_shim_translates_normed_to_density():
    sample = np.arange(10.0).reshape(-1, 1)
    counts, _ = madminer_patches.histogramdd(sample, bins=[2], range=[(0, 10)], normed=False)
    density, _ = madminer_patches.histogramdd(sample, bins=[2], range=[(0, 10)], normed=True)
    assert counts.tolist() == [5.0, 5.0]
    assert np.isclose(density.sum() * 5.0, 1.0)


def test_events_in_memory_reads_the_file_once_and_gives_the_same_samples(tmp_path):
    """Sampling many theta points inside madminer_patches.events_in_memory(): identical samples, one read of the file,
    a fresh copy per call, and MadMiner's reader restored afterwards."""
    from madminer.sampling import SampleAugmenter, benchmark, random_morphing_points
    from madminer.utils.interfaces import hdf5

    from app.toy import simulator

    path = simulator.generate_toy_file(simulator.ToySettings(n_events=2000), tmp_path / "toy.h5")
    original = hdf5._load_samples
    reads = []

    def draw():
        np.random.seed(3)
        return SampleAugmenter(str(path)).sample_train_ratio(
            theta0=random_morphing_points(15, [("flat", -5.0, 5.0)] * 2), theta1=benchmark("sm"), n_samples=300,
            test_split=0.2, validation_split=0.2, partition="train",
        )

    expected = draw()
    def counting(name):
        reads.append(name)
        return original(name)

    hdf5._load_samples = counting
    try:
        with madminer_patches.events_in_memory():
            assert hdf5._load_samples is not counting
            with madminer_patches.events_in_memory():  # nested: the outer cache stays
                got = draw()
            first = hdf5._load_samples(str(path))[1]
            first *= 0.0  # MadMiner scales batches in place: the next call must not see it
            second = hdf5._load_samples(str(path))[1]
    finally:
        restored = hdf5._load_samples
        hdf5._load_samples = original
    assert len(reads) == 1  # without the block: once per theta point and set
    assert np.all(second != 0.0)
    assert restored is counting  # the reader that was there before the block
    for a, b in zip(expected, got):
        if a is not None:
            np.testing.assert_array_equal(a, b)


def test_python312_shim_lets_uproot3_import_without_find_module_and_distutils():
    """The GPU machines' Python 3.12 has neither ``FileFinder.find_module`` nor ``distutils``: madminer's uproot3
    imports fail there. Simulated on 3.11 in a subprocess (both removed), the shim makes them import again; without
    it the same imports fail (checked first, so the simulation really removes what 3.12 removes)."""
    import subprocess
    import sys

    simulate = (
        "import importlib.machinery as m, sys\n"
        "del m.FileFinder.find_module\n"
        "sys.modules['distutils'] = None\n"
        "sys.modules['distutils.version'] = None\n"
    )
    without = subprocess.run([sys.executable, "-c", simulate + "import uproot3_methods, awkward0"],
                             capture_output=True, text=True)  # fmt: skip
    assert without.returncode != 0 and ("find_module" in without.stderr or "distutils" in without.stderr)
    check = (
        "import app\n"
        "app._python312_shim()\n"
        "import uproot3_methods.classes.TLorentzVector, awkward0, madminer.utils.interfaces.delphes\n"
        "import distutils.version as v\n"
        "assert v.LooseVersion('1.13.1') < v.LooseVersion('2.5.2+local')\n"
        "assert v.LooseVersion('2.0') >= v.LooseVersion('2')\n"
        "print('ok')\n"
    )
    with_shim = subprocess.run([sys.executable, "-c", simulate + check],
                               capture_output=True, text=True)  # fmt: skip
    assert with_shim.returncode == 0, with_shim.stderr[-2000:]
    assert with_shim.stdout.strip() == "ok"
