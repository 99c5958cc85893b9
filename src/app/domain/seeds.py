"""Every random draw of a job gets its own seed, derived from a config seed and what the draw is for.

MadMiner draws from NumPy's global generator (``np.random.rand``), so the global state is what must be seeded; doing
it once at the start of a stage makes a draw depend on every draw that ran before it in the process (a limit read
from the stage cache draws nothing, and the test events after it came out different). Instead each draw seeds the
global generator from :func:`derive` (config seed, purpose) on entry, in :func:`numpy_global`, and the state found
is put back on exit: no result depends on what ran before it, whether the cache was warm, cold or off, serial or
under joblib, run once or twice (docs/cache.md, Reproducibility).
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager


def derive(seed: int, *purpose: str | int) -> int:
    """A 32-bit seed that depends only on ``seed`` and ``purpose`` (names and indices), e.g.
    ``derive(cfg.sampling.seed, "evaluate", "test_predictions")``; different purposes give unrelated streams."""
    text = json.dumps([int(seed), *purpose], separators=(",", ":"))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


@contextmanager
def numpy_global(seed: int, *purpose: str | int):
    """NumPy's global generator seeded from :func:`derive` (``seed``, ``purpose``) inside the block; the state found
    on entry is restored on exit. Yields the derived seed."""
    import numpy as np

    saved = np.random.get_state()
    derived = derive(seed, *purpose)
    np.random.seed(derived)
    try:
        yield derived
    finally:
        np.random.set_state(saved)
