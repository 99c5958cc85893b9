"""One device per job: ``training.device`` chooses it, training and evaluation both honour it.

``cpu`` never touches CUDA, ``cuda`` requires a GPU (checked before any stage work by :func:`check`),
``auto`` uses a GPU when torch sees one. :func:`use` applies the choice for the duration of a stage and
restores everything afterwards: nothing leaks into later jobs of an in-process sweep (no environment
variables are changed).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

from app.errors import UserError

_current: str | None = None  # the device of the stage running now (None outside :func:`use`)


def resolve(requested: str) -> str:
    """``cpu`` or ``cuda`` for ``training.device``; UserError for ``cuda`` without a GPU."""
    if requested == "cpu":
        return "cpu"
    import torch

    available = torch.cuda.is_available()
    if requested == "cuda" and not available:
        raise UserError("training.device=cuda but torch sees no CUDA device; use training.device=auto or cpu")
    return "cuda" if available else "cpu"


def check(requested: str) -> None:
    """Fail at start (before sampling) when the requested device does not exist; cheap for cpu/auto."""
    if requested == "cuda":
        resolve(requested)


def current() -> str:
    """The device chosen by the enclosing :func:`use` (``cpu`` outside any)."""
    return _current or "cpu"


@contextmanager
def use(requested: str):
    """Run MadMiner's training and this app's batched evaluation on the chosen device; yields its name.

    MadMiner's ``Trainer`` moves the model to CUDA whenever torch sees one; inside this context it
    does so only when the chosen device is ``cuda``.
    """
    global _current
    from madminer.utils.ml.trainer import Trainer

    name = resolve(requested)
    original, previous = Trainer.__init__, _current

    def __init__(self, model, run_on_gpu=True, *args, **kwargs):
        original(self, model, run_on_gpu and name == "cuda", *args, **kwargs)

    Trainer.__init__ = __init__
    _current = name
    if name == "cuda":
        import torch

        logging.getLogger("app").info("torch device: cuda (%s)", torch.cuda.get_device_name())
    try:
        yield name
    finally:
        Trainer.__init__ = original
        _current = previous
