"""One device per job: ``training.device`` chooses it, training and evaluation both honour it.

``cpu`` never touches CUDA, ``cuda`` requires a GPU (checked before any stage work by :func:`check`),
``auto`` uses a GPU when torch sees one. :func:`use` applies the choice to MadMiner's Trainer for the duration
of a stage and restores it afterwards, and yields the device's name for everything else that runs a model (the
fast trainer, the batched evaluation): nothing leaks into later jobs of an in-process sweep (no environment
variables are changed).
"""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager

from app.errors import UserError
from app.ml import madminer_patches


def resolve(requested: str) -> str:
    """``cpu`` or ``cuda`` for ``training.device`` (``cpu``, ``cuda`` or ``auto``); UserError for ``cuda``
    without a GPU.

    The stage cache keys models by this name (``auto`` is never a key), so every job resolves it at its start; a CPU
    build of torch (``+cpu`` in its version) answers ``cpu`` for ``auto`` without importing torch, which a job whose
    stages all come from the cache never needs."""
    if requested == "cpu":
        return "cpu"
    if requested == "auto" and "torch" not in sys.modules and _cpu_only_torch():
        return "cpu"
    import torch

    available = torch.cuda.is_available()
    if requested == "cuda" and not available:
        raise UserError("training.device=cuda but torch sees no CUDA device; use training.device=auto or cpu")
    return "cuda" if available else "cpu"


def _cpu_only_torch() -> bool:
    """The installed torch is a CPU-only build (package metadata: ``2.13.0+cpu``), so it sees no GPU."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch").endswith("+cpu")
    except PackageNotFoundError:
        return False


def check(requested: str) -> None:
    """Fail at start (before sampling) when the requested device does not exist; cheap for cpu/auto."""
    if requested == "cuda":
        resolve(requested)


@contextmanager
def use(requested: str):
    """Run MadMiner's training on the chosen device (:func:`app.ml.madminer_patches.trainer_device`); yields its
    name (``cpu`` or ``cuda``) for the fast trainer and the batched evaluation."""
    name = resolve(requested)
    if name == "cuda":
        import torch

        logging.getLogger("app").info("torch device: cuda (%s)", torch.cuda.get_device_name())
    with madminer_patches.trainer_device(name):
        yield name
