"""Compatibility shim: madminer 0.9.6 on NumPy >= 1.24.

madminer calls ``np.histogramdd(..., normed=False)``; NumPy 1.24 removed ``normed`` (its
replacement is ``density``), so histogram and SALLY limits raise ``TypeError``. Instead of
patching NumPy for everybody, the two madminer modules that make the call get a NumPy proxy whose
``histogramdd`` translates the keyword. Call :func:`apply` before any madminer histogram code.
"""

from __future__ import annotations

import importlib
import inspect
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
