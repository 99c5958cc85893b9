"""Reproducibility as a property (docs/cache.md, Reproducibility): the same config and seed give the same numbers,
to 1e-6 relative on CPU, whether the stage cache is warm, cold or off, whether the estimator-independent limits come
from the cache, whether anything drew random numbers before in the process, for any ``sampling.n_processes``, run
once or twice, serially or under the joblib launcher.

The in-process cases run the pipeline (Hydra's compose API and ``app.pipeline.run``) on a tiny toy with
``evaluation.modes=[ml,histo]``: the histogram limit is a ``baseline`` entry of the cache, read instead of computed
when the cache is warm. Each case is compared with one reference run (cache off, in this process)."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, compose_job

# The histogram limit is estimator-independent (memoised); the ml limit and the test predictions come after it.
CONFIG = [*TINY, "evaluation.modes=[ml,histo]", "stage=evaluate", "tracking=disabled"]
RTOL = 1e-6


def job(cache: Path, run_dir: Path, *overrides: str) -> Path:
    """One job (``python -m app OVERRIDES``) in this process with the stage cache at ``cache``; its run dir."""
    from hydra.core.hydra_config import HydraConfig

    from app import pipeline

    saved = os.environ.get("MADMINER_SWEEPER_CACHE")
    os.environ["MADMINER_SWEEPER_CACHE"] = str(cache)
    try:
        pipeline.run(compose_job(*overrides, run_dir=run_dir))
    finally:
        HydraConfig.instance().cfg = None
        if saved is None:
            os.environ.pop("MADMINER_SWEEPER_CACHE", None)
        else:
            os.environ["MADMINER_SWEEPER_CACHE"] = saved
    return run_dir


def run(cache: Path, run_dir: Path, *extra: str) -> dict:
    """A job of :data:`CONFIG` (and ``extra``): its metrics, with the cache record of its run.json as ``_cache``."""
    job(cache, run_dir, *CONFIG, *extra)
    return read_metrics(run_dir)


def read_metrics(run_dir: Path) -> dict:
    metrics = json.loads((run_dir / "results" / "metrics.json").read_text())
    metrics["_cache"] = json.loads((run_dir / "run.json").read_text()).get("cache", {})
    return metrics


def numbers(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def assert_same_numbers(got: dict, expected: dict) -> None:
    got, expected = numbers(got), numbers(expected)
    assert set(got) == set(expected)
    differ = {k: (got[k], expected[k]) for k in expected if not np.isclose(got[k], expected[k], rtol=RTOL, atol=0)}
    assert not differ, differ


@pytest.fixture(scope="module")
def toys(cache_dir) -> Path:
    """The generated toy files, shared with the session's other tests (conftest's ``cache_dir``)."""
    (cache_dir / "toy").mkdir(exist_ok=True)
    return cache_dir / "toy"


def fresh_cache(folder: Path, toys: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "toy").symlink_to(toys, target_is_directory=True)
    return folder


@pytest.fixture(scope="module")
def reference(tmp_path_factory, toys) -> dict:
    root = tmp_path_factory.mktemp("reference")
    return run(fresh_cache(root / "cache", toys), root / "run", "cache.enabled=false")


def _off(cache, tmp):  # run once more, after other jobs ran in this process
    return run(cache, tmp / "run", "cache.enabled=false")


def _cold(cache, tmp):
    found = run(cache, tmp / "run")
    assert found["_cache"]["evaluate"]["status"] == "computed" and found["_cache"]["baseline"]["computed"] == 2
    return found


def _warm(cache, tmp):  # every stage from the cache
    run(cache, tmp / "first")
    found = run(cache, tmp / "run")
    assert found["_cache"]["evaluate"]["status"] == "reused"
    return found


def _baseline_warm(cache, tmp):  # the evaluation is computed, the histogram limit read from the cache
    run(cache, tmp / "other", "training.n_epochs=3")
    found = run(cache, tmp / "run")
    # the histogram limit and the rate and histogram Fisher information
    assert found["_cache"]["evaluate"]["status"] == "computed" and found["_cache"]["baseline"] == {
        "reused": 2,
        "computed": 0,
    }
    return found


def _after_other_draws(cache, tmp):  # whatever drew random numbers before in the process
    import torch

    np.random.seed(999)
    np.random.rand(17)
    torch.manual_seed(5)
    torch.rand(3)
    return run(cache, tmp / "run")


def _n_processes(cache, tmp):  # theta sets drawn on two worker processes
    return run(cache, tmp / "run", "sampling.n_processes=2", "cache.enabled=false")


CASES = {
    "off": _off,
    "cold": _cold,
    "warm": _warm,
    "baseline_warm": _baseline_warm,
    "after_other_draws": _after_other_draws,
    "n_processes": _n_processes,
}


@pytest.mark.parametrize("case", list(CASES))
def test_same_numbers_whatever_the_cache_and_the_process_did_before(case, reference, tmp_path, toys):
    found = CASES[case](fresh_cache(tmp_path / "cache", toys), tmp_path)
    assert len(numbers(reference)) > 20  # limits, truth and test metrics, not an empty comparison
    assert_same_numbers(found, reference)


def test_one_theta_set_on_two_processes_ends_and_gives_the_serial_samples(tmp_path, toys):
    """SALLY samples at one benchmark: one theta set, on which MadMiner's own pool never ends its progress loop
    (``verbose_steps = n_sets // 10 = 0``). Guarded by a thread, so a hang fails the test instead of stopping it."""

    def sample(n_processes: int) -> np.ndarray:
        cache = fresh_cache(tmp_path / f"cache{n_processes}", toys)
        overrides = [*TINY, "training=sally", "stage=sample", "tracking=disabled", "cache.enabled=false"]
        run_dir = job(cache, tmp_path / f"run{n_processes}", *overrides, f"sampling.n_processes={n_processes}")
        return np.load(run_dir / "samples" / "x_train.npy")

    serial = sample(1)
    found: dict = {}
    worker = threading.Thread(target=lambda: found.update(x=sample(2)), daemon=True)
    worker.start()
    worker.join(60)
    assert "x" in found, "sampling.n_processes=2 with one theta set did not end within 60 s"
    np.testing.assert_array_equal(found["x"], serial)


@pytest.mark.slow
def test_joblib_jobs_give_the_numbers_of_serial_jobs(run_app, tmp_path):
    """The same two jobs under the joblib launcher (other processes, one thread each on two cores) and one after the
    other in this process: the same numbers."""
    sweep = ["-m", *CONFIG, "cache.enabled=false", "seed=1,2"]
    run_app(*sweep, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={tmp_path}/joblib")
    run_app(*sweep, f"hydra.sweep.dir={tmp_path}/serial")
    for number in ("0", "1"):
        parallel = read_metrics(tmp_path / "joblib" / number)
        assert len(numbers(parallel)) > 20
        assert_same_numbers(parallel, read_metrics(tmp_path / "serial" / number))


def test_auto_device_is_keyed_as_the_device_it_resolves_to(tmp_path, toys):
    """On this machine training.device=auto resolves to what ``app.ml.device.resolve`` says: a model trained with
    that device named explicitly is the same cache entry (and one trained on the other device would not be)."""
    from app.ml.device import resolve

    cache = fresh_cache(tmp_path / "cache", toys)
    overrides = [*TINY, "stage=train", "tracking=disabled"]
    job(cache, tmp_path / "named", *overrides, f"training.device={resolve('auto')}")
    record = json.loads((job(cache, tmp_path / "auto", *overrides, "training.device=auto") / "run.json").read_text())
    assert record["cache"]["train"]["status"] == "reused", record["cache"]


def test_a_draws_seed_depends_on_the_seed_and_its_purpose_only():
    from app.domain.seeds import derive, numpy_global

    assert derive(1, "evaluate", "fisher") == derive(1, "evaluate", "fisher")
    assert len({derive(1, "a"), derive(2, "a"), derive(1, "b"), derive(1, "a", 0), derive(1, "a", 1)}) == 5
    np.random.seed(3)
    with numpy_global(1, "a") as seed:
        inside = np.random.rand()
    assert inside == np.random.RandomState(seed).rand()
    assert np.random.rand() == np.random.RandomState(3).rand()  # the state found is put back
