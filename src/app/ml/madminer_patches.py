"""Every change this project makes to MadMiner 0.9.6 (pinned), each scoped and each tested against MadMiner's own
result (tests/test_madminer_patches.py, tests/test_limits_batched.py).

========================  =====================================================================================
:func:`python312_shim`     uproot3 (a MadMiner import) on Python 3.12: ``FileFinder.find_module``, ``distutils``
:func:`apply_numpy_shim`   ``np.histogramdd(normed=...)`` on NumPy >= 1.24, for MadMiner's two histogram modules
:func:`reused_bin_search`  histograms of the same events with new weights reuse the events' bin indices
:func:`events_in_memory`   the event file read once per file, not once per sampled theta
:func:`seeded_sets`        every theta set drawn from its own seed: ``n_processes > 1`` gives the samples of
                           ``n_processes=1`` (MadMiner's pool does not, and hangs with fewer than 10 sets)
:func:`batched_limits`     AsymptoticLimits with a batched ``ml`` mode (and double-parameterized estimators), a
                           binning without its (grid points x events) weight matrix, and histograms filled in
                           batches of grid points that transform each point's data at that point
:func:`weights_only_loads` ``torch.load(weights_only=True)`` for model files on every torch version
:func:`estimators_loaded_by`  AsymptoticLimits / FisherInformation load the model with this project's loader
:func:`observable_input_scaling`  ``scale_inputs=False`` models get input means per observable, not per event
:func:`trainer_device`     MadMiner's Trainer uses the chosen device, not CUDA whenever torch sees one
:func:`epoch_reports`      every epoch's losses, term by term, reach a callback
:func:`best_epoch_kept`    early stopping restores the best epoch's weights, not the last epoch's
========================  =====================================================================================

Nothing is patched at import except :func:`python312_shim` (on Python 3.12+ only, called by ``app/__init__.py``);
the rest are context managers that restore what they replaced, or module-local proxies (the NumPy shim).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import itertools
import multiprocessing
import os
import sys
import types

import numpy

from app.domain.seeds import derive
from app.ml.batched import log_input_scaling, model_log_likelihood_grid, model_log_r_grid
from app.ml.parallel_sets import sets_in_parallel


# --------------------------------------------------------------------------- Python 3.12
def python312_shim() -> None:
    """Let madminer 0.9.6 import on Python 3.12+ (the GPU machines' images have 3.12; the package targets 3.11).

    madminer imports uproot3, whose helpers use two things Python 3.12 removed: ``FileFinder.find_module``
    (uproot3_methods walks its classes with it) and ``distutils.version.LooseVersion`` (awkward0 compares NumPy's
    version once). Both get a minimal stand-in only where they are missing; nothing else changes."""
    import importlib.machinery

    if not hasattr(importlib.machinery.FileFinder, "find_module"):

        def find_module(self, fullname, path=None):
            spec = self.find_spec(fullname)
            return spec.loader if spec is not None else None

        importlib.machinery.FileFinder.find_module = find_module
    try:
        import distutils.version  # noqa: F401  (setuptools' own stand-in, where installed)
    except ImportError:
        from packaging.version import Version

        class LooseVersion:
            def __init__(self, version):
                self.version = Version(str(version).split("+")[0])

            def __lt__(self, other):
                return self.version < other.version

            def __ge__(self, other):
                return self.version >= other.version

        version = types.ModuleType("distutils.version")
        version.LooseVersion = LooseVersion
        package = types.ModuleType("distutils")
        package.version = version
        package.__path__ = []
        sys.modules.update({"distutils": package, "distutils.version": version})


# --------------------------------------------------------------------------- histograms
PATCHED_MODULES = ("madminer.utils.histo", "madminer.likelihood.histo")
_bin_indices: dict | None = None  # inside reused_bin_search(): the last sample's bin indices, else None


def histogramdd(sample, bins=10, range=None, normed=None, weights=None, density=None):  # noqa: A002
    """``numpy.histogramdd`` that also takes MadMiner's ``normed``; inside :func:`reused_bin_search` it reuses the
    bin indices of the last sample it saw."""
    if normed is not None and density is None:
        density = normed
    index = _bin_index(sample, bins) if _bin_indices is not None and not density else None
    if index is None:
        return numpy.histogramdd(sample, bins=bins, range=range, weights=weights, density=density)
    xy, nbin, edges = index
    hist = numpy.bincount(xy, weights, minlength=int(nbin.prod())).reshape(nbin).astype(float, casting="safe")
    return hist[len(nbin) * (slice(1, -1),)], [e.copy() for e in edges]


class _NumpyProxy(types.ModuleType):
    """``numpy`` for one module, except for ``histogramdd``."""

    histogramdd = staticmethod(histogramdd)

    def __getattr__(self, name):
        return getattr(numpy, name)


def numpy_shim_needed() -> bool:
    return "normed" not in inspect.signature(numpy.histogramdd).parameters


def apply_numpy_shim() -> list[str]:
    """MadMiner calls ``np.histogramdd(..., normed=False)``; NumPy 1.24 removed ``normed`` (its replacement is
    ``density``), so histogram and SALLY limits raise ``TypeError``. Instead of patching NumPy for everybody, the
    two MadMiner modules that make the call get a NumPy proxy whose ``histogramdd`` translates the keyword.
    Idempotent; returns the names of the patched modules."""
    if not numpy_shim_needed():
        return []
    patched = []
    for name in PATCHED_MODULES:
        module = importlib.import_module(name)
        if not isinstance(module.np, _NumpyProxy):
            module.np = _NumpyProxy("numpy")
        patched.append(name)
    return patched


@contextlib.contextmanager
def reused_bin_search():
    """MadMiner's limits fill 2 histograms for each of the 625 grid points from the same events, with only the
    weights changing, and NumPy searches every event's bin each time (80 % of a histo limit at 10^6 events).
    Inside this block (with :func:`apply_numpy_shim` applied) the flat bin index of every event is computed once
    per events and explicit edges and reused; the same steps as NumPy's, so the histograms are identical. The
    indices (and the events they belong to) are released when the block ends. Nests."""
    global _bin_indices
    previous = _bin_indices
    _bin_indices = {} if previous is None else previous
    try:
        yield
    finally:
        _bin_indices = previous


def _bin_index(sample, bins):
    """``numpy.histogramdd``'s flat bin index of every event, for explicit bin edges, from the last call with the
    same sample and edges or computed now. None where it does not apply (numpy then does everything)."""
    if not isinstance(sample, numpy.ndarray) or sample.ndim != 2 or isinstance(bins, int):
        return None
    if len(bins) != sample.shape[1]:
        return None
    edges = [numpy.asarray(b) for b in bins]
    if any(e.ndim != 1 for e in edges):
        return None
    key = (sample.__array_interface__["data"][0], sample.shape, sample.strides, sample.dtype.str)
    last = _bin_indices.get("key")
    if last is not None and last[:4] == key and all(numpy.array_equal(a, b) for a, b in zip(last[5], edges)):
        return _bin_indices["value"]
    if any(numpy.any(e[:-1] > e[1:]) for e in edges):
        return None  # numpy raises its own error
    counts = []
    for i, e in enumerate(edges):
        c = numpy.searchsorted(e, sample[:, i], side="right")
        c[sample[:, i] == e[-1]] -= 1  # the right edge belongs to the last bin
        counts.append(c)
    nbin = numpy.asarray([len(e) + 1 for e in edges])
    _bin_indices["key"] = (*key, sample, edges)  # holds the sample: its buffer cannot be reused while cached
    _bin_indices["value"] = (numpy.ravel_multi_index(counts, nbin), nbin, edges)
    return _bin_indices["value"]


# --------------------------------------------------------------------------- events read once per file
@contextlib.contextmanager
def events_in_memory():
    """MadMiner re-reads all events of the file for every theta it samples (``load_events`` ->
    ``_load_samples``: open the HDF5 file, read observations, weights and sampling ids), about half of
    the time of a sampling call with many theta points. Inside this block the arrays are read once per
    file (keyed by path, size and modification time) and every call gets a fresh copy of them (MadMiner
    scales some batches in place): the same arrays, so the same samples. Idempotent when nested."""
    from madminer.utils.interfaces import hdf5

    original = hdf5._load_samples
    if getattr(original, "_app_in_memory", False):
        yield
        return
    cache: dict = {}

    def load(file_name):
        stat = os.stat(file_name)
        key = (os.path.realpath(file_name), stat.st_size, stat.st_mtime_ns)
        if key not in cache:
            cache[key] = original(file_name)
        # a copy per call (~0.1 ms for the toy): MadMiner may change a batch in place (weights *= factor)
        return tuple(array.copy() for array in cache[key])

    load._app_in_memory = True
    hdf5._load_samples = load
    try:
        yield
    finally:
        hdf5._load_samples = original


# --------------------------------------------------------------------------- seeded theta sets
# what MadMiner's _sample hands on to _sample_set unchanged
_SET_ARGUMENTS = (
    "sampling_index",
    "partition",
    "test_split",
    "validation_split",
    "nuisance_score",
    "n_eff_forced",
    "sample_only_from_closest_benchmark",
    "double_precision",
)


@contextlib.contextmanager
def seeded_sets(seed: int):
    """``SampleAugmenter`` with ``n_processes > 1`` forks a ``multiprocessing.Pool`` whose workers all inherit the
    parent's NumPy random state and take the theta sets in whatever order they come free: the same seed gives other
    samples on every call, and the first sets of two workers share their random numbers. With fewer than 10 sets its
    progress loop never ends (``verbose_steps = n_sets // 10 = 0``; SALLY's one benchmark is one set).
    docs/madminer-bugs.md has a reproducer.

    Inside this block every ``_sample`` call (one per ``sample_*`` call, two for the ratio methods) draws set ``i``
    of call ``k`` after ``np.random.seed(derive(seed, k, i))``, serially for ``n_processes=1``, else on a pool of
    ``min(n_processes, sets)`` workers (results in set order); MadMiner's serial loop then combines them, so both
    give the same arrays. The global random state is the one found before the call (the sets draw from their own
    seeds), so what MadMiner draws between calls (random theta points, the final shuffle) is the same either way."""
    from madminer.sampling import SampleAugmenter

    original = SampleAugmenter._sample
    original_set = SampleAugmenter._sample_set
    signature = inspect.signature(original)
    calls = itertools.count()

    def _sample(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        sets, n_processes = a["sets"], a["n_processes"]
        call = next(calls)
        seeds = [derive(seed, call, i) for i in range(len(sets))]
        definitions = a["augmented_data_definitions"] or []
        job = {name: a[name] for name in _SET_ARGUMENTS}
        job.update(n_samples=a["n_samples_per_set"], augmented_data_definitions=definitions,
                   needs_gradients=self._check_gradient_need(definitions))
        n_workers = min(multiprocessing.cpu_count() if n_processes is None else n_processes, len(sets))
        state = numpy.random.get_state()
        try:
            if n_workers > 1:
                done = sets_in_parallel(self, original_set, job, sets, seeds, n_workers)
            else:
                done, counters = [], (0, 0, 0)
                for set_, set_seed in zip(sets, seeds):
                    numpy.random.seed(set_seed)
                    found = original_set(self, set_, **job, n_stats_warnings=counters[0],
                                         n_neg_weights_warnings=counters[1], n_too_large_weights_warnings=counters[2])
                    counters = found[5:8]
                    done.append(found)
            results = iter(done)
            self._sample_set = lambda set_, **_: next(results)  # MadMiner's serial loop combines them
            try:
                a["n_processes"] = 1
                return original(*bound.args, **bound.kwargs)
            finally:
                del self._sample_set
        finally:
            numpy.random.set_state(state)

    SampleAugmenter._sample = _sample
    try:
        yield
    finally:
        SampleAugmenter._sample = original


# --------------------------------------------------------------------------- limits
@functools.cache
def batched_limits():
    """AsymptoticLimits (constructor: ``filename, include_nuisance_parameters=False, device="cpu"``) whose ``ml``
    mode evaluates the estimator in large batches on ``device``.

    MadMiner's ``_calculate_log_likelihood_ratio_kinematics`` calls the estimator once per grid point and does
    not evaluate double-parameterized ratio estimators. This one evaluates every (grid point, event) pair through
    the trained torch model (:mod:`app.ml.batched`) and returns what MadMiner's returns: log r(x | theta,
    reference) for ratio estimators, MadMiner's log p(x | theta) (of the scaled inputs) for likelihood
    estimators, the mean over the members of an Ensemble; but with theta standardised as in training for
    likelihood and double-parameterized estimators, which MadMiner's evaluation omits (docs/madminer-bugs.md).
    Its adaptive binning (histograms of sallino and adaptive-sally) gives MadMiner's edges without MadMiner's
    (grid points x events) weight matrix, and its histograms filled in batches of grid points
    (``histo_theta_batchsize``) transform each grid point's data at that grid point (MadMiner's use the first
    batch's points for every batch: docs/madminer-bugs.md).
    """
    from madminer.limits import AsymptoticLimits
    from madminer.ml import DoubleParameterizedRatioEstimator as Double
    from madminer.ml import Ensemble, LikelihoodEstimator, ParameterizedRatioEstimator

    def kind(model):
        members = model.estimators if isinstance(model, Ensemble) else [model]
        if all(isinstance(m, (ParameterizedRatioEstimator, Double)) for m in members):
            return "ratio"
        if all(isinstance(m, LikelihoodEstimator) for m in members):
            return "likelihood"
        return None

    class BatchedLimits(AsymptoticLimits):
        def __init__(self, filename=None, include_nuisance_parameters=False, device: str = "cpu"):
            super().__init__(filename, include_nuisance_parameters=include_nuisance_parameters)
            self.device = device

        def _fixed_adaptive_binning(self, n_toys, processor, summary_function, test_split, thetas_binning, x_bins):
            """MadMiner's binning, from the weights averaged over the grid, without its (grid points x events)
            weight matrix (5 GB for 625 points and 10^6 events). The weights are linear in the morphing matrix,
            so their mean over the grid is the mean matrix times the benchmark weights: the same edges."""
            from madminer.utils.histo import Histo
            from madminer.utils.various import mdot

            if self.include_nuisance_parameters:
                return super()._fixed_adaptive_binning(n_toys, processor, summary_function, test_split,
                                                       thetas_binning, x_bins)  # fmt: skip
            start, end, _ = self._calculate_partition_bounds("train", test_split)
            x, weights_benchmarks = self.weighted_events(start_event=start, end_event=end, n_draws=n_toys)
            summary_stats = summary_function(x)
            matrix = numpy.mean([self._get_theta_benchmark_matrix(t) for t in thetas_binning], axis=0)
            weights = mdot(matrix, weights_benchmarks)
            data = summary_stats if processor is None else processor(summary_stats, thetas_binning)
            return Histo(data, weights, x_bins, epsilon=1.0e-12).edges

        def _make_histos(self, summary_function, x_bins, theta_grid, n_histo_toys=1000, histo_theta_batchsize=100,
                         weighted_histo=True, test_split=0.2, processor=None, fixed_adaptive_binning=True,
                         theta_binning=None, n_binning_toys=1000):  # fmt: skip
            """MadMiner's histograms, but each grid point's data transformed at that grid point. MadMiner's batched
            loop (``n_histo_toys=None``) pairs the weights of batch b with ``zip(theta_grid, ...)``, the *first*
            grid points, instead of the batch's: sallino and adaptive-sally histograms (whose data are rotated or
            projected per theta) past the first batch use the wrong theta. Here the binning is fixed once for the
            grid as MadMiner fixes it, then MadMiner fills each batch as a grid of its own."""
            if not (weighted_histo and n_histo_toys is None) or len(theta_grid) <= histo_theta_batchsize:
                return super()._make_histos(summary_function, x_bins, theta_grid, n_histo_toys, histo_theta_batchsize,
                                            weighted_histo, test_split, processor, fixed_adaptive_binning,
                                            theta_binning, n_binning_toys)  # fmt: skip
            if fixed_adaptive_binning and (isinstance(x_bins, int) or any(isinstance(b, int) for b in x_bins)):
                thetas_binning = theta_grid if theta_binning is None else [theta_binning]
                x_bins = self._fixed_adaptive_binning(n_binning_toys, processor, summary_function, test_split,
                                                      thetas_binning, x_bins)  # fmt: skip
            histos = []
            for start in range(0, len(theta_grid), histo_theta_batchsize):
                batch = theta_grid[start : start + histo_theta_batchsize]
                histos += super()._make_histos(summary_function, x_bins, batch, n_histo_toys, len(batch),
                                               weighted_histo, test_split, processor, False)  # fmt: skip
            return histos

        def _calculate_log_likelihood_ratio_kinematics(self, x_observed, theta_grid, model, theta1=None):
            what = kind(model)
            if what is None:
                return super()._calculate_log_likelihood_ratio_kinematics(x_observed, theta_grid, model, theta1)
            theta_grid = numpy.asarray(theta_grid, dtype=numpy.float64)
            if what == "ratio":
                # double-parameterized: log r(x | theta, reference) for a fixed reference (MadMiner passes
                # theta_true); differences over the grid, all that the limits use, do not depend on it.
                reference = numpy.zeros(theta_grid.shape[1]) if theta1 is None else numpy.asarray(theta1, float)
                return model_log_r_grid(model, x_observed, theta_grid, reference, self.device)
            members = model.estimators if isinstance(model, Ensemble) else [model]
            return numpy.mean(
                [model_log_likelihood_grid(m, x_observed, theta_grid, self.device) + log_input_scaling(m)
                 for m in members], axis=0,
            )  # fmt: skip

    return BatchedLimits


# --------------------------------------------------------------------------- loading models
def observable_input_scaling(estimator):
    """MadMiner's ``initialize_input_transform(x, transform=False)`` (``train(scale_inputs=False)``) sets the input
    means and stds to ``zeros(x.shape[0])`` and ``ones(x.shape[0])``: one entry per training *event*, not per
    observable, and saves them with the model. Every later evaluation then fails to broadcast ("operands could not
    be broadcast together with shapes (10,2) (300,)"). Those arrays mean "no scaling": here they become zeros and
    ones of one entry per observable, for the estimator or every member of an Ensemble, which is returned. Scalings
    of the right length are left as they are."""
    members = estimator.estimators if hasattr(estimator, "estimators") else [estimator]
    for member in members:
        means, stds, n = member.x_scaling_means, member.x_scaling_stds, member.n_observables
        if means is None or stds is None or n is None or member.features is not None or numpy.shape(means) == (n,):
            continue
        if numpy.any(numpy.asarray(means) != 0) or numpy.any(numpy.asarray(stds) != 1):
            continue  # not MadMiner's "no scaling" arrays: leave them to fail as they do
        member.x_scaling_means, member.x_scaling_stds = numpy.zeros(n), numpy.ones(n)
    return estimator


@contextlib.contextmanager
def weights_only_loads():
    """MadMiner's ``load`` calls ``torch.load(path, map_location="cpu")``, which before torch 2.6 unpickles
    anything, code included. Inside this block it is ``weights_only=True`` on every torch version, so a model
    file can hold tensors but never code."""
    import torch

    original = torch.load
    torch.load = functools.partial(original, weights_only=True)
    try:
        yield
    finally:
        torch.load = original


@contextlib.contextmanager
def estimators_loaded_by(load):
    """MadMiner's ``load_estimator`` reads the estimator type from the saved settings, and morphing-aware
    estimators save ``parameterized_ratio``: AsymptoticLimits and FisherInformation would evaluate them as plain
    parameterized estimators (without their morphing). Inside this block both load through ``load(filename)``
    (this project's :func:`app.ml.estimators.load`, which knows every class it trains)."""
    import madminer.fisherinformation.information as information
    import madminer.limits.asymptotic_limits as asymptotic_limits

    modules = [m for m in (asymptotic_limits, information) if hasattr(m, "load_estimator")]
    originals = [m.load_estimator for m in modules]
    for m in modules:
        m.load_estimator = load
    try:
        yield
    finally:
        for m, original in zip(modules, originals):
            m.load_estimator = original


# --------------------------------------------------------------------------- training
@contextlib.contextmanager
def trainer_device(name: str):
    """MadMiner's ``Trainer`` moves the model to CUDA whenever torch sees a GPU (``run_on_gpu=True`` is the
    default and ``train()`` offers no device choice). Inside this block it does so only for ``name == "cuda"``."""
    from madminer.utils.ml.trainer import Trainer

    original = Trainer.__init__

    def __init__(self, model, run_on_gpu=True, *args, **kwargs):
        original(self, model, run_on_gpu and name == "cuda", *args, **kwargs)

    Trainer.__init__ = __init__
    try:
        yield
    finally:
        Trainer.__init__ = original


@contextlib.contextmanager
def epoch_reports(callback):
    """MadMiner's ``train()`` returns only the total loss per epoch and takes no callback; its Trainer hands every
    epoch's losses, term by term, to the static ``Trainer.report_epoch``, which only logs them. Inside this block
    ``callback(i_epoch, loss_labels, loss_train, loss_val, contributions_train, contributions_val)`` gets them
    first (MadMiner's own and the fast trainer's epochs alike); MadMiner's logging still runs."""
    from madminer.utils.ml.trainer import Trainer

    original = Trainer.__dict__["report_epoch"]  # a staticmethod in madminer 0.9.6

    def report_epoch(i_epoch, loss_labels, loss_train, loss_val, *rest, **kwargs):
        contributions = list(rest[:2]) + [None] * (2 - len(rest[:2]))
        callback(i_epoch, loss_labels, loss_train, loss_val, *contributions)
        return original.__func__(i_epoch, loss_labels, loss_train, loss_val, *rest, **kwargs)

    Trainer.report_epoch = staticmethod(report_epoch)
    try:
        yield
    finally:
        Trainer.report_epoch = original


@contextlib.contextmanager
def best_epoch_kept():
    """MadMiner's early stopping keeps ``best_model = self.model.state_dict()`` (``Trainer.check_early_stopping``):
    a dict of references to the live parameter tensors, which every later optimizer step changes in place. Its
    final ``load_state_dict(best_model)`` therefore loads the last epoch's weights onto themselves: the saved model
    is the last epoch's, while the validation loss it reports (and ``app.stages.train.saved_epoch``) is the best
    epoch's. Inside this block the best state is a detached copy taken when the epoch is the best so far, so the
    restore gives the best epoch's weights (as the fast trainer does, :mod:`app.ml.fasttrain`). Everything else of
    ``check_early_stopping`` (its patience and its stop on a non-finite loss) is MadMiner's own."""
    from madminer.utils.ml.trainer import Trainer

    original = Trainer.check_early_stopping

    def check_early_stopping(self, best_loss, best_model, best_epoch, loss, i_epoch, early_stopping_patience=None):
        # MadMiner's own bookkeeping (and its EarlyStoppingException); then the state it kept, copied
        best_loss, kept, best_epoch = original(self, best_loss, best_model, best_epoch, loss, i_epoch,
                                               early_stopping_patience)  # fmt: skip
        if kept is not best_model:  # this epoch is the best so far: MadMiner kept the live state_dict()
            kept = {k: v.detach().clone() for k, v in kept.items()}
        return best_loss, kept, best_epoch

    Trainer.check_early_stopping = check_early_stopping
    try:
        yield
    finally:
        Trainer.check_early_stopping = original
