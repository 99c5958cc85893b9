"""Compatibility shim: madminer 0.9.6 on NumPy >= 1.24.

madminer calls ``np.histogramdd(..., normed=False)``; NumPy 1.24 removed ``normed`` (its
replacement is ``density``), so histogram and SALLY limits raise ``TypeError``. Instead of
patching NumPy for everybody, the two madminer modules that make the call get a NumPy proxy whose
``histogramdd`` translates the keyword. Call :func:`apply` before any madminer histogram code.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import types

import numpy

PATCHED_MODULES = ("madminer.utils.histo", "madminer.likelihood.histo")


def histogramdd(sample, bins=10, range=None, normed=None, weights=None, density=None):  # noqa: A002
    if normed is not None and density is None:
        density = normed
    index = _bin_index(sample, bins) if REUSE_BIN_SEARCH and not density else None
    if index is None:
        return numpy.histogramdd(sample, bins=bins, range=range, weights=weights, density=density)
    xy, nbin, edges = index
    hist = numpy.bincount(xy, weights, minlength=int(nbin.prod())).reshape(nbin).astype(float, casting="safe")
    return hist[len(nbin) * (slice(1, -1),)], [e.copy() for e in edges]


REUSE_BIN_SEARCH = True  # False: NumPy's histogramdd every time (bench/seed_scenario.py's MadMiner-as-is baseline)
_LAST: dict = {}  # the last sample's bin indices: MadMiner fills one histogram per grid point from the same events


def _bin_index(sample, bins):
    """``numpy.histogramdd``'s flat bin index of every event, for explicit bin edges, computed once per events and
    edges and reused for every further call with them (MadMiner's limits fill 2 histograms for each of the 625 grid
    points from the same events, with only the weights changing: the bin search was 80 % of a histo limit at 10^6
    events). Returns None where it does not apply (numpy then does everything, and the index is computed for next
    time). The same steps as NumPy's, so the histograms are identical."""
    if not isinstance(sample, numpy.ndarray) or sample.ndim != 2 or isinstance(bins, int):
        return None
    if len(bins) != sample.shape[1]:
        return None
    edges = [numpy.asarray(b) for b in bins]
    if any(e.ndim != 1 for e in edges):
        return None
    key = (sample.__array_interface__["data"][0], sample.shape, sample.strides, sample.dtype.str)
    last = _LAST.get("key")
    if last is not None and last[:4] == key and all(numpy.array_equal(a, b) for a, b in zip(last[5], edges)):
        return _LAST["value"]
    if any(numpy.any(e[:-1] > e[1:]) for e in edges):
        return None  # numpy raises its own error
    counts = []
    for i, e in enumerate(edges):
        c = numpy.searchsorted(e, sample[:, i], side="right")
        c[sample[:, i] == e[-1]] -= 1  # the right edge belongs to the last bin
        counts.append(c)
    nbin = numpy.asarray([len(e) + 1 for e in edges])
    _LAST["key"] = (*key, sample, edges)  # holds the sample: its buffer cannot be reused while cached
    _LAST["value"] = (numpy.ravel_multi_index(counts, nbin), nbin, edges)
    return _LAST["value"]


class _NumpyProxy(types.ModuleType):
    """``numpy`` for one module, except for ``histogramdd``."""

    histogramdd = staticmethod(histogramdd)

    def __getattr__(self, name):
        return getattr(numpy, name)


def needed() -> bool:
    return "normed" not in inspect.signature(numpy.histogramdd).parameters


def apply() -> list[str]:
    """Patch the madminer modules that need it; idempotent. Returns the names of patched modules."""
    if not needed():
        return []
    patched = []
    for name in PATCHED_MODULES:
        module = importlib.import_module(name)
        if not isinstance(module.np, _NumpyProxy):
            module.np = _NumpyProxy("numpy")
        patched.append(name)
    return patched


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
