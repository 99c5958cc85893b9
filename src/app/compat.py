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
    return numpy.histogramdd(sample, bins=bins, range=range, weights=weights, density=density)


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
