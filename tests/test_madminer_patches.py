"""Every patch of app.ml.madminer_patches against MadMiner 0.9.6's own behaviour: what goes wrong without it, and
that with it the result equals MadMiner's (or what MadMiner means). The batched ``ml`` limits and the histogram
limits with the reused bin search are compared with MadMiner's in tests/test_limits_batched.py."""

from __future__ import annotations

import importlib
import json
import pickle

import numpy as np
import pytest

from app.ml import madminer_patches
from app.toy import simulator


@pytest.fixture(scope="module")
def toy_path(tmp_path_factory):
    return simulator.generate_toy_file(simulator.ToySettings(n_events=2000), tmp_path_factory.mktemp("p") / "toy.h5")


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


# --------------------------------------------------------------------------- the NumPy keyword shim
def test_madminer_histograms_fail_without_the_shim_and_work_with_it(unpatched):
    from madminer.utils.histo import Histo

    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 1))
    weights = rng.uniform(size=500)
    assert madminer_patches.numpy_shim_needed(), "this NumPy still accepts normed=: the shim would be unnecessary"
    with pytest.raises(TypeError, match="normed"):
        Histo(x, weights, bins=[5])

    assert madminer_patches.apply_numpy_shim() == list(madminer_patches.PATCHED_MODULES)
    histo = Histo(x, weights, bins=[5])
    assert np.all(np.isfinite(histo.log_likelihood(x)))
    assert madminer_patches.apply_numpy_shim() == list(madminer_patches.PATCHED_MODULES)  # idempotent


def test_shim_only_touches_madminer_modules(unpatched):
    madminer_patches.apply_numpy_shim()
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


# --------------------------------------------------------------------------- the reused bin search
def test_reused_bin_search_gives_numpys_histograms_and_searches_once(monkeypatch):
    rng = np.random.default_rng(1)
    sample = rng.normal(size=(5000, 2))
    sample[:3] = [[1.0, 0.0], [-1.0, 2.0], [9.0, 9.0]]  # on the right edge, on an inner edge, outside
    edges = [np.array([-3.0, -1.0, 0.0, 1.0]), np.array([-2.0, 0.0, 2.0])]
    weights = [rng.uniform(size=len(sample)) for _ in range(3)]
    expected = [np.histogramdd(sample, bins=edges, weights=w)[0] for w in weights]
    searches = []
    real = np.searchsorted
    monkeypatch.setattr(np, "searchsorted", lambda *a, **k: searches.append(1) or real(*a, **k))
    with madminer_patches.reused_bin_search():
        got = [madminer_patches.histogramdd(sample, bins=edges, weights=w)[0] for w in weights]
        assert len(searches) == 2  # one search per axis for all three histograms
        other = madminer_patches.histogramdd(sample + 0.5, bins=edges, weights=weights[0])[0]
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(other, np.histogramdd(sample + 0.5, bins=edges, weights=weights[0])[0])
    assert madminer_patches._bin_indices is None  # the events are released when the block ends


# --------------------------------------------------------------------------- events read once
def test_events_in_memory_reads_the_file_once_and_gives_the_same_samples(toy_path):
    """Sampling many theta points inside events_in_memory(): MadMiner's own samples, one read of the file,
    a fresh copy per call, and MadMiner's reader restored afterwards."""
    from madminer.sampling import SampleAugmenter, benchmark, random_morphing_points
    from madminer.utils.interfaces import hdf5

    original = hdf5._load_samples
    reads = []

    def draw():
        np.random.seed(3)
        return SampleAugmenter(str(toy_path)).sample_train_ratio(
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
            first = hdf5._load_samples(str(toy_path))[1]
            first *= 0.0  # MadMiner scales batches in place: the next call must not see it
            second = hdf5._load_samples(str(toy_path))[1]
    finally:
        restored = hdf5._load_samples
        hdf5._load_samples = original
    assert len(reads) == 1  # without the block: once per theta point and set
    assert np.all(second != 0.0)
    assert restored is counting  # the reader that was there before the block
    for a, b in zip(expected, got):
        if a is not None:
            np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------- seeded theta sets
def test_seeded_sets_give_madminers_own_draw_per_set_on_any_number_of_processes(toy_path):
    """Inside seeded_sets(seed): set i of the k-th sampling call is MadMiner's own serial draw after
    np.random.seed(derive(seed, k, i)); n_processes=2 gives the same arrays (MadMiner's own pool does not: its
    workers inherit one random state and take the sets in any order); the caller's random state is left as found."""
    from madminer.sampling import SampleAugmenter, benchmark, morphing_points

    from app.domain.seeds import derive

    thetas = [[-2.0, 1.0], [0.5, 0.5], [3.0, -1.0]]
    augmenter = SampleAugmenter(str(toy_path))

    def local(n_processes: int = 1):  # one set: SALLY's benchmark
        return augmenter.sample_train_local(theta=benchmark("sm"), n_samples=400, n_processes=n_processes)

    def density(n_processes: int = 1):  # three sets
        return augmenter.sample_train_density(theta=morphing_points(thetas), n_samples=600, n_processes=n_processes)

    # MadMiner's own result: each set alone, serially, after its seed
    np.random.seed(derive(7, 0, 0))
    own_local = local()
    own_density = []
    for i, theta in enumerate(thetas):
        np.random.seed(derive(7, 1, i))
        own_density.append(augmenter.sample_train_density(theta=morphing_points([theta]), n_samples=200))

    for n_processes in (1, 2):
        np.random.seed(11)
        with madminer_patches.seeded_sets(7):
            got_local, got_density = local(n_processes), density(n_processes)
        assert np.random.rand() == np.random.RandomState(11).rand()  # the caller's stream is untouched
        for a, b in zip(got_local, own_local):
            np.testing.assert_array_equal(a, b)
        for k in range(2):  # x and theta, set after set
            np.testing.assert_array_equal(got_density[k], np.vstack([o[k] for o in own_density]))
    from madminer.sampling import SampleAugmenter as after

    assert after._sample.__name__ == "_sample" and "seeded_sets" not in after._sample.__qualname__  # restored


# --------------------------------------------------------------------------- loading models
@pytest.fixture(scope="module")
def morphing_model(toy_path, tmp_path_factory):
    """A (briefly) trained morphing-aware estimator saved as the train stage saves it."""
    import torch
    from madminer import ml
    from madminer.sampling import SampleAugmenter, benchmark, random_morphing_points

    from app.ml import fasttrain

    np.random.seed(0)
    torch.manual_seed(0)
    x, theta0, _, y, r_xz, _, _ = SampleAugmenter(str(toy_path)).sample_train_ratio(
        random_morphing_points(5, [("flat", -5, 5)] * 2), benchmark("sm"), n_samples=400
    )
    estimator = ml.MorphingAwareRatioEstimator(morphing_setup_filename=str(toy_path), n_hidden=(8,))
    fasttrain.fit(estimator, "fast", "cpu", method="alice", x=x, y=y, theta=theta0, r_xz=r_xz, n_epochs=2,
                  batch_size=64, verbose="none")  # fmt: skip
    model_dir = tmp_path_factory.mktemp("model")
    estimator.save(str(model_dir / "estimator"))
    meta = {"estimator": "morphing_aware", "n_estimators": 1, "model_name": "estimator"}
    (model_dir / "model.json").write_text(json.dumps(meta))
    return estimator, model_dir, x[:40]


def test_limits_and_fisher_load_morphing_aware_estimators_through_the_projects_loader(morphing_model):
    import madminer.fisherinformation.information as information
    import madminer.limits.asymptotic_limits as asymptotic_limits
    from madminer.ml import MorphingAwareRatioEstimator

    from app.ml import estimators

    trained, model_dir, x = morphing_model
    thetas = np.array([[0.0, 0.0], [2.0, -1.0], [-3.0, 4.0]])
    expected = trained.evaluate_log_likelihood_ratio(x=x, theta=thetas)[0]
    filename = str(model_dir / "estimator")
    try:  # MadMiner's own: the settings say parameterized_ratio, so the morphing-aware model is not restored
        own = asymptotic_limits.load_estimator(filename)
        assert not isinstance(own, MorphingAwareRatioEstimator)
    except (RuntimeError, KeyError):
        pass
    originals = asymptotic_limits.load_estimator, information.load_estimator
    with madminer_patches.estimators_loaded_by(lambda _file: estimators.load(model_dir)):
        for module in (asymptotic_limits, information):
            loaded = module.load_estimator(filename)
            assert isinstance(loaded, MorphingAwareRatioEstimator)
            np.testing.assert_allclose(loaded.evaluate_log_likelihood_ratio(x=x, theta=thetas)[0], expected,
                                       rtol=1e-6, atol=1e-6)  # fmt: skip
    assert (asymptotic_limits.load_estimator, information.load_estimator) == originals


class _Code:
    def __reduce__(self):
        return (print, ("code ran",))


def test_model_files_load_weights_only(morphing_model, tmp_path, monkeypatch):
    """The same weights as MadMiner's own load, and a file holding a pickled call is refused on any torch version."""
    import torch
    from madminer.ml import MorphingAwareRatioEstimator

    from app.ml import estimators

    _, model_dir, _ = morphing_model
    own = MorphingAwareRatioEstimator()
    own.load(str(model_dir / "estimator"))  # MadMiner's own load
    calls = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or real(*a, **k))
    loaded = estimators.load(model_dir)
    monkeypatch.setattr(torch, "load", real)
    assert calls and all(k.get("weights_only") is True for k in calls)
    assert list(loaded.model.state_dict()) == list(own.model.state_dict())
    for a, b in zip(loaded.model.state_dict().values(), own.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump(_Code(), f)
    with madminer_patches.weights_only_loads(), pytest.raises(pickle.UnpicklingError):
        torch.load(evil, map_location="cpu")  # MadMiner's call
    assert torch.load is real


# --------------------------------------------------------------------------- training
def test_trainer_uses_the_chosen_device_not_any_visible_gpu(monkeypatch):
    import torch
    from madminer.utils.ml.trainer import Trainer

    seen = []

    class Spy(torch.nn.Linear):
        def to(self, *args, **kwargs):
            seen.append(torch.device(args[0]))
            return self

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # pretend a GPU is visible
    original = Trainer.__init__
    Trainer(Spy(1, 1), n_workers=0)
    assert seen[-1] == torch.device("cuda")  # MadMiner's own: CUDA whenever torch sees it
    with madminer_patches.trainer_device("cpu"):
        assert Trainer(Spy(1, 1), n_workers=0).device == torch.device("cpu")
    assert seen[-1] == torch.device("cpu")
    with madminer_patches.trainer_device("cuda"):
        assert Trainer(Spy(1, 1), n_workers=0).device == torch.device("cuda")
    assert Trainer.__init__ is original


def test_epoch_reports_get_madminers_own_losses_term_by_term(toy_path):
    """With MadMiner's own trainer: the totals the callback gets are the losses MadMiner's train() returns, and
    the terms add up to them with the loss weights; MadMiner's reporter is restored afterwards."""
    import torch
    from madminer import ml
    from madminer.sampling import SampleAugmenter, benchmark, random_morphing_points
    from madminer.utils.ml.trainer import Trainer

    np.random.seed(2)
    torch.manual_seed(2)
    x, theta0, _, y, r_xz, t_xz, _ = SampleAugmenter(str(toy_path)).sample_train_ratio(
        random_morphing_points(5, [("flat", -5, 5)] * 2), benchmark("sm"), n_samples=400
    )
    reports = []
    original = Trainer.__dict__["report_epoch"]
    alpha = 0.5
    with madminer_patches.epoch_reports(lambda *args: reports.append(args)):
        losses_train, losses_val = ml.ParameterizedRatioEstimator(n_hidden=(8,)).train(
            method="alices", x=x, y=y, theta=theta0, r_xz=r_xz, t_xz=t_xz, alpha=alpha, n_epochs=3, batch_size=64,
            n_workers=0, verbose="none", validation_split=0.25,
        )  # fmt: skip
    assert Trainer.__dict__["report_epoch"] is original
    assert [r[0] for r in reports] == [0, 1, 2]
    np.testing.assert_allclose([r[2] for r in reports], losses_train, rtol=1e-12)
    np.testing.assert_allclose([r[3] for r in reports], losses_val, rtol=1e-12)
    for _, labels, total, _, terms, _ in reports:
        assert labels == ["improved_xe", "mse_score"]
        assert total == pytest.approx(terms[0] + alpha * terms[1], rel=1e-5)


# --------------------------------------------------------------------------- Python 3.12
@pytest.mark.slow
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
        "from app.ml.madminer_patches import python312_shim\n"
        "python312_shim()\n"
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


# --------------------------------------------------------------------------- histograms filled in batches
def test_batched_histograms_transform_each_grid_point_at_that_point(toy_path):
    """SALLINO-style histograms (data projected on theta - thetaref, per grid point) filled 2 grid points at a time
    equal the histograms built one grid point at a time here: the data at that point, weighted to that point.
    MadMiner's own loop uses the first batch's points for every batch (docs/madminer-bugs.md)."""
    from madminer.limits import AsymptoticLimits
    from madminer.utils.histo import Histo

    madminer_patches.apply_numpy_shim()
    thetaref = np.array([0.5, -0.5])
    grid = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0], [2.0, 2.0]])
    limits = madminer_patches.batched_limits()(str(toy_path))
    start, end, _ = limits._calculate_partition_bounds("train", 0.2)
    x, weights_benchmarks = limits.weighted_events(start_event=start, end_event=end)
    mean, std = x.mean(axis=0), x.std(axis=0)

    def summary(events):
        return (events - mean) / std  # a 2-d stand-in for the estimated score

    edges = [np.linspace(-4.0, 4.0, 9)]
    processor = limits._make_score_processor("sallino", None, thetaref)
    settings = dict(n_histo_toys=None, histo_theta_batchsize=2, test_split=0.2, processor=processor,
                    fixed_adaptive_binning=False)  # fmt: skip
    ours = limits._make_histos(summary, edges, grid, **settings)
    madminers = AsymptoticLimits(str(toy_path))._make_histos(summary, edges, grid, **settings)
    stats = summary(x)
    for i, theta in enumerate(grid):
        direction = (theta - thetaref) / np.linalg.norm(theta - thetaref)
        weights = limits._get_theta_benchmark_matrix(theta) @ weights_benchmarks.T
        expected = Histo((stats @ direction).reshape(-1, 1), weights, edges, epsilon=1.0e-12)
        np.testing.assert_allclose(ours[i].histo, expected.histo, rtol=1e-9)
        if i < 2:  # MadMiner's first batch is right ...
            np.testing.assert_allclose(madminers[i].histo, expected.histo, rtol=1e-9)
    # ... and its later batches are not (the bug this corrects)
    assert not np.allclose(madminers[2].histo, ours[2].histo, rtol=1e-3)


# --------------------------------------------------------------------------- scale_inputs=False
def test_models_trained_without_input_scaling_evaluate(toy_path, tmp_path):
    """scale_inputs=False: MadMiner saves zeros(n_events) as the input means and every evaluation fails to broadcast;
    after observable_input_scaling the model evaluates its network on the raw observables, as MadMiner does for a
    model without any input scaling."""
    import torch
    from madminer import ml
    from madminer.sampling import SampleAugmenter, benchmark

    from app.ml import estimators, fasttrain

    np.random.seed(0)
    torch.manual_seed(0)
    x, _, t_xz, _ = SampleAugmenter(str(toy_path)).sample_train_local(benchmark("sm"), n_samples=300)
    estimator = ml.ScoreEstimator(n_hidden=(8,))
    fasttrain.fit(estimator, "fast", "cpu", method="sally", x=x, t_xz=t_xz, n_epochs=1, batch_size=64,
                  scale_inputs=False, verbose="none")  # fmt: skip
    assert np.shape(estimator.x_scaling_means) == (300,)  # MadMiner's bug, still there
    with pytest.raises(ValueError, match="broadcast"):
        estimator.evaluate_score(x=x[:10])
    estimator.save(str(tmp_path / "estimator"))
    meta = {"estimator": "score", "n_estimators": 1, "model_name": "estimator"}
    (tmp_path / "model.json").write_text(json.dumps(meta))
    loaded = estimators.load(tmp_path)
    with torch.no_grad():
        by_hand = estimator.model(torch.tensor(x[:10], dtype=torch.float)).numpy()
    np.testing.assert_allclose(loaded.evaluate_score(x=x[:10]), by_hand, rtol=1e-5, atol=1e-6)
    loaded.x_scaling_means = loaded.x_scaling_stds = None  # MadMiner's own result without scaling
    np.testing.assert_allclose(loaded.evaluate_score(x=x[:10]), by_hand, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- early stopping's best epoch
def _overfitting_score_training():
    """A ScoreEstimator trained by MadMiner's own trainer on 100 noisy samples: it over-fits, so its best
    validation epoch is not its last. Returns (validation losses per epoch, the saved model's validation MSE)."""
    import torch
    from madminer.ml import ScoreEstimator

    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    x, x_val = rng.normal(size=(100, 2)), rng.normal(size=(400, 2))
    t, t_val = x[:, :1] + rng.normal(size=(100, 1)), x_val[:, :1] + rng.normal(size=(400, 1))
    estimator = ScoreEstimator(n_hidden=(64, 64))
    _, losses_val = estimator.train(
        "sally", x=x, t_xz=t, x_val=x_val, t_xz_val=t_val, n_epochs=10, batch_size=25, initial_lr=0.03,
        final_lr=0.03, validation_split=0.25, early_stopping=True, n_workers=0, verbose="none",
    )  # fmt: skip
    saved = float(np.mean((estimator.evaluate_score(x=x_val) - t_val) ** 2))
    return np.asarray(losses_val, dtype=float), saved


def test_madminers_early_stopping_saves_the_best_epoch_it_reports():
    """MadMiner reports (and app.stages.train.saved_epoch records) the best validation epoch's loss, but its
    early stopping keeps references to the live weights and so saves the last epoch. With the patch the saved
    model is the best epoch's: its validation MSE is the reported minimum (the validation set is a whole number
    of batches, so MadMiner's mean of batch means is the mean over samples)."""
    losses, saved = _overfitting_score_training()
    best = int(np.argmin(losses))
    assert best < len(losses) - 1 and losses[-1] > losses[best] * 1.1, losses  # the last epoch: worse
    assert saved == pytest.approx(losses[-1], rel=1e-5)  # MadMiner alone: the last epoch, not the one it reports

    with madminer_patches.best_epoch_kept():
        patched_losses, patched_saved = _overfitting_score_training()
    np.testing.assert_allclose(patched_losses, losses, rtol=1e-6)  # the same training, epoch by epoch
    assert patched_saved == pytest.approx(losses[best], rel=1e-5)  # the saved model is the reported epoch's
