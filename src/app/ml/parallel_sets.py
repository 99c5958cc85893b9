"""Theta sets of MadMiner's ``SampleAugmenter`` drawn on a pool of processes, each from its own seed: the process
pool behind :func:`app.ml.madminer_patches.seeded_sets` (the patch itself, which replaces MadMiner's own pool, lives
there)."""

from __future__ import annotations

import multiprocessing

import numpy

_set_job: tuple | None = None  # in a worker: (augmenter, MadMiner's _sample_set, its keywords)


def sets_in_parallel(augmenter, sample_set, job: dict, sets, seeds, n_workers: int) -> list:
    """``sample_set(augmenter, set_, **job)`` for every set after ``np.random.seed(its seed)``, on ``n_workers``
    processes (forked where the platform can, like MadMiner's pool: they share the events read in memory); the
    results in set order. MadMiner's parallel path silences the per-set warnings the same way."""
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    job = dict(job, n_stats_warnings=1000, n_neg_weights_warnings=1000)
    with ProcessPoolExecutor(
        n_workers, mp_context=context, initializer=_start_set_worker, initargs=(augmenter, sample_set, job)
    ) as pool:
        return list(pool.map(_sample_one_set, sets, seeds))


def _start_set_worker(augmenter, sample_set, job: dict) -> None:
    global _set_job
    _set_job = (augmenter, sample_set, job)


def _sample_one_set(set_, seed: int):
    augmenter, sample_set, job = _set_job
    numpy.random.seed(seed)
    return sample_set(augmenter, set_, **job)
