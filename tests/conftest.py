"""Shared helpers: run the real CLI in a subprocess, with a per-session toy cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PHYSICS_FILE = REPO.parent / "shared" / "data" / "madminer_physics_sample.h5"

# Small but real: every end-to-end test adds these unless it says otherwise.
TINY = [
    "sampling.n_samples=600",
    "training.n_epochs=2",
    "training.n_hidden=[16,16]",
    "evaluation.grid.resolutions=5",
    "evaluation.n_test_samples=100",
    "evaluation.fisher.bins=4",
    "data.n_events=4000",
]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """Shared by the whole session: the generated toy files (and the stage cache of tests that use it)."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def test_cache(tmp_path, cache_dir) -> Path:
    """A stage cache of this test alone (no test reuses another test's samples or models), sharing the toys."""
    own = tmp_path / "cache"
    own.mkdir(exist_ok=True)
    (cache_dir / "toy").mkdir(exist_ok=True)
    if not (own / "toy").exists():
        (own / "toy").symlink_to(cache_dir / "toy", target_is_directory=True)
    return own


@pytest.fixture
def run_app(tmp_path, test_cache):
    """Run ``python -m app ARGS`` in ``tmp_path``; returns the CompletedProcess (output in .out).

    The stage cache is per test (``test_cache``): runs of one test may reuse each other's stages.
    """

    def run(
        *args: str, check: bool = True, tracking: str = "disabled", run_dir: Path | None = None, timeout=600
    ):
        env = dict(os.environ, MADMINER_SWEEPER_CACHE=str(test_cache), PYTHONUNBUFFERED="1")
        cmd = [sys.executable, "-m", "app", *args]
        if tracking and not any(a.startswith("tracking=") for a in args):
            cmd.append(f"tracking={tracking}")
        if (
            not any(a.startswith("hydra.run.dir") or a in ("-m", "--multirun") for a in args)
            and "--cfg" not in args
        ):
            cmd.append(f"hydra.run.dir={run_dir or tmp_path / 'run'}")
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
        proc.out = proc.stdout + proc.stderr
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.out[-4000:]}")
        return proc

    return run


@pytest.fixture
def physics_file() -> Path:
    if not PHYSICS_FILE.exists():
        pytest.skip(f"{PHYSICS_FILE} not available (needs ../shared beside the checkout)")
    return PHYSICS_FILE
