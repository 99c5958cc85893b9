"""One device per job: ``training.device`` chooses it, training and evaluation both honour it.

``cpu`` never touches CUDA, ``cuda`` requires a GPU (checked before any stage work by :func:`check`),
``auto`` uses a GPU when torch sees one. :func:`use` applies the choice to MadMiner's Trainer for the duration
of a stage and restores it afterwards, and yields the device's name for everything else that runs a model (the
fast trainer, the batched evaluation): nothing leaks into later jobs of an in-process sweep (no environment
variables are changed).

One GPU per job: jobs of a sweep that run at once on a node with several GPUs each take their own
(:func:`job_gpu`): the first GPU slot (a lock file under the sweep dir, per host) that no running job of the sweep
holds; torch's current device is that GPU while the job runs. A SLURM allocation with ``gpus_per_task`` shows
each task only its own GPU (``CUDA_VISIBLE_DEVICES``): it is the one torch sees. What was chosen is returned for
``run.json`` (the tracking callback records it as tags).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from app.errors import UserError
from app.ml import madminer_patches
from app.store.files import first_free_slot

SLURM_GPU_VARIABLES = ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS")  # the GPUs of a SLURM allocation, as SLURM numbers them
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def usable_cores() -> int:
    """The cores this process may run on (its affinity: a SLURM task's or a container's share)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def share_cores(n_jobs: int) -> int:
    """``n_jobs`` processes at once on this machine split its cores: each gets cores // n_jobs intra-op threads
    (torch, BLAS), for itself and for the processes it starts (the environment). Returns that number.

    Otherwise every process's torch and BLAS use all cores, and their idle threads spin while the other processes
    hold the cores (docs/performance.md, "The test suite's time": 4x the CPU for the same work on two cores)."""
    threads = max(1, usable_cores() // max(1, n_jobs))
    for name in THREAD_VARIABLES:
        os.environ[name] = str(threads)
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=threads)  # BLAS libraries loaded already; the environment covers later ones
    if "torch" in sys.modules:  # torch reads OMP_NUM_THREADS when it is imported
        import torch

        torch.set_num_threads(threads)
    return threads


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

        logging.getLogger("app").info(
            "torch device: cuda:%d (%s)", torch.cuda.current_device(), torch.cuda.get_device_name()
        )
    with madminer_patches.trainer_device(name):
        yield name


@contextmanager
def job_gpu(requested: str, slots_dir: str | Path | None, job_num: int = 0) -> Iterator[dict | None]:
    """This job's GPU while it runs (torch's current device), and what to record about it; None without a GPU.

    ``slots_dir``: where the jobs of a sweep that may run at once (joblib's workers, SLURM tasks sharing a node)
    take GPU slots (None: a single run, which takes torch's current device). With more jobs at once than GPUs the
    extra jobs share them (job number modulo the GPUs), which the record says.
    """
    if requested == "cpu":
        yield None
        return
    import torch

    if not torch.cuda.is_available():  # training.device=cuda fails in check(); auto runs on the CPU
        yield None
        return
    n = torch.cuda.device_count()
    record = {"count": n, "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    record.update({f"{v.lower()}": os.environ[v] for v in SLURM_GPU_VARIABLES if os.environ.get(v)})
    if slots_dir is None or n == 1:
        index = torch.cuda.current_device()
        how = "the only GPU this job sees" if n == 1 else "a single run: torch's current device"
        yield {"index": index, "name": torch.cuda.get_device_name(index), "assigned": how, **record}
        return
    with first_free_slot(Path(slots_dir) / socket.gethostname(), n) as slot:
        index = job_num % n if slot is None else slot
        how = (
            f"shared: every one of the {n} GPUs was taken, job {job_num} modulo {n}"
            if slot is None
            else f"slot {slot} of {n} on {socket.gethostname()}"
        )
        previous = torch.cuda.current_device()
        torch.cuda.set_device(index)
        logging.getLogger("app").info("GPU per job: cuda:%d (%s)", index, how)
        try:
            yield {"index": index, "name": torch.cuda.get_device_name(index), "assigned": how, **record}
        finally:
            torch.cuda.set_device(previous)
